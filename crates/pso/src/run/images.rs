//! Training images with their prompts: source c of method.md §3 (a style or a subject, each
//! image paired as the preferred side against a reference image freshly sampled from the
//! current model for the same prompt), and the dataset of SFT fine-tuning (DiffFit's Algorithm
//! 2: a folder with one sub-folder per class, whose name is the class, or a Parquet table of
//! image + label).

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::Tensor;

use super::data::image_tensor;
use super::image_table::{parquet_files, read_image_table, TableColumns, TableLabel};
use super::{step_seed, RunError};

/// One training image, resized and centre-cropped to the run's size.
#[derive(Debug)]
pub struct TrainingImage {
    /// Where it came from: its file, or `TABLE, row N`.
    pub source: String,
    /// Its prompt (`NAME.txt` next to it, its class sub-folder's name, its table label, or the
    /// default prompt).
    pub prompt: String,
    /// [H, W, 3] uint8.
    pub pixels: Tensor,
    /// Its latent and its mirror image's, [2, C, h, w], once encoded.
    latents: Option<Tensor>,
}

/// What an integer class label of a table becomes as a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelAs {
    /// The id itself (a class-conditional model's class).
    Id,
    /// Its ClassLabel name (a text-to-image model's prompt, or a DiT's id2label name).
    Name,
}

/// Where training images are read from and how their prompts are found.
#[derive(Debug, Clone)]
pub struct ImageSetOptions {
    /// Prompt of folder images without a `NAME.txt`.
    pub default_prompt: Option<String>,
    /// The columns of a Parquet table.
    pub columns: TableColumns,
    /// The split of a dataset folder (default: `train` when its files name one).
    pub split: Option<String>,
    /// What a table's integer labels become.
    pub label_as: LabelAs,
    /// Run height in pixels.
    pub height: u32,
    /// Run width in pixels.
    pub width: u32,
    /// Seed of the order.
    pub seed: u64,
}

/// The images of a folder in a seeded order per epoch, with a cursor for checkpoints.
#[derive(Debug)]
pub struct TrainingImages {
    images: Vec<TrainingImage>,
    /// Image indices per prompt (class), when sampling is class-balanced.
    balanced: Option<Vec<Vec<usize>>>,
    seed: u64,
    order: Vec<usize>,
    epoch: u64,
    consumed: u64,
}

impl TrainingImages {
    /// Reads a folder or a Parquet table of training images.
    ///
    /// A folder's PNG / JPEG images (sorted by name) take their prompt from `NAME.txt` beside
    /// them, else from the default prompt; a folder whose images sit in sub-folders is a
    /// class-per-folder dataset, each image's prompt its sub-folder's name. A `.parquet` file, or
    /// a folder of them (a Hugging Face dataset), holds one image and its label per row.
    pub fn open(path: &Path, opts: &ImageSetOptions) -> Result<TrainingImages, RunError> {
        let images = if path.is_file() {
            table_images(&parquet_files(path, opts.split.as_deref())?, opts)?
        } else {
            let found = folder_image_files(path)?;
            if found.is_empty() {
                let tables = parquet_files(path, opts.split.as_deref())?;
                if tables.is_empty() {
                    return Err(RunError::Data(format!(
                        "{} holds no .png / .jpg training image, neither directly nor in class \
                         sub-folders, and no .parquet table",
                        path.display()
                    )));
                }
                table_images(&tables, opts)?
            } else {
                let columns = &opts.columns;
                if columns.image.is_some() || columns.label.is_some() || opts.split.is_some() {
                    return Err(RunError::Data(format!(
                        "{} is a folder of images: --image-column, --label-column and --split \
                         apply to Parquet tables only",
                        path.display()
                    )));
                }
                folder_images(found, opts)?
            }
        };
        let mut out = TrainingImages {
            images,
            balanced: None,
            seed: opts.seed,
            order: Vec::new(),
            epoch: 0,
            consumed: 0,
        };
        out.shuffle();
        Ok(out)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.images.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(step_seed(self.seed, self.epoch, u32::MAX - 1));
        self.order.shuffle(&mut rng);
    }

    /// Images handed out so far (the checkpoint's data cursor).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Draws the next image's class uniformly, then an image of it, instead of going through
    /// the images in shuffled epochs (so rare classes are seen as often as common ones).
    pub fn balance_classes(&mut self) {
        let mut classes: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (i, image) in self.images.iter().enumerate() {
            classes.entry(&image.prompt).or_default().push(i);
        }
        self.balanced = Some(classes.into_values().collect());
    }

    /// The distinct prompts (classes), sorted.
    pub fn prompts(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.images.iter().map(|i| i.prompt.as_str()).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The index of the next image, reshuffling at each epoch (or class-balanced).
    pub fn next_index(&mut self) -> usize {
        if let Some(classes) = &self.balanced {
            // Drawn from the cursor, so that a resumed run draws the same images.
            let mut rng =
                ChaCha8Rng::seed_from_u64(step_seed(self.seed, self.consumed, u32::MAX - 2));
            let class = &classes[rng.random_range(0..classes.len())];
            self.consumed += 1;
            return class[rng.random_range(0..class.len())];
        }
        let n = self.images.len() as u64;
        let epoch = self.consumed / n;
        if epoch != self.epoch {
            self.epoch = epoch;
            self.shuffle();
        }
        let index = self.order[(self.consumed % n) as usize];
        self.consumed += 1;
        index
    }

    /// The latents [2, C, h, w] of image `index` and of its mirror image, encoded with `encode`
    /// ([N, H, W, 3] uint8 → latents) on first use and cached.
    pub fn latents(&mut self, index: usize, encode: impl FnOnce(&Tensor) -> Tensor) -> &Tensor {
        let image = &mut self.images[index];
        image.latents.get_or_insert_with(|| {
            let both = Tensor::stack(&[&image.pixels, &image.pixels.flip([1])], 0);
            encode(&both)
        })
    }

    /// How many images there are.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Image `index` (as [`TrainingImages::next_index`] returns), in reading order.
    pub fn get(&self, index: usize) -> &TrainingImage {
        &self.images[index]
    }

    /// Skips `n` images (to a checkpoint's cursor).
    pub fn skip(&mut self, n: u64) {
        for _ in 0..n {
            self.next_index();
        }
    }
}

/// The .png / .jpg / .jpeg files of `dir`, sorted.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, RunError> {
    let mut paths: Vec<PathBuf> = entries(dir)?
        .into_iter()
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// The sub-folders of `dir`, sorted.
fn sub_folders(dir: &Path) -> Result<Vec<PathBuf>, RunError> {
    let mut dirs: Vec<PathBuf> = entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs)
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, RunError> {
    Ok(std::fs::read_dir(dir)
        .map_err(|source| RunError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect())
}

/// Decodes, resizes and crops one image (run from rayon's threads).
fn decode(
    source: String,
    prompt: String,
    bytes: &[u8],
    opts: &ImageSetOptions,
) -> Result<TrainingImage, RunError> {
    let pixels = image_tensor(bytes, opts.height, opts.width, &source)?;
    Ok(TrainingImage {
        source,
        prompt,
        pixels,
        latents: None,
    })
}

/// The image files of a folder, each with its class: directly in it (no class), else in one
/// sub-folder per class.
fn folder_image_files(dir: &Path) -> Result<Vec<(PathBuf, Option<String>)>, RunError> {
    let mut found = image_files(dir)?
        .into_iter()
        .map(|p| (p, None))
        .collect::<Vec<_>>();
    if found.is_empty() {
        for class_dir in sub_folders(dir)? {
            let class = class_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for path in image_files(&class_dir)? {
                found.push((path, Some(class.clone())));
            }
        }
    }
    Ok(found)
}

/// The images of [`folder_image_files`] with their prompts.
fn folder_images(
    found: Vec<(PathBuf, Option<String>)>,
    opts: &ImageSetOptions,
) -> Result<Vec<TrainingImage>, RunError> {
    found
        .into_par_iter()
        .map(|(path, class)| {
            let caption = path.with_extension("txt");
            let prompt = match (std::fs::read_to_string(&caption), class) {
                (Ok(text), _) => text.trim().to_owned(),
                (Err(_), Some(class)) => class,
                (Err(_), None) => opts.default_prompt.clone().ok_or_else(|| {
                    RunError::Data(format!(
                        "{} has no prompt: write it into {} or give --prompt",
                        path.display(),
                        caption.display()
                    ))
                })?,
            };
            let bytes = std::fs::read(&path).map_err(super::io(&path))?;
            decode(path.display().to_string(), prompt, &bytes, opts)
        })
        .collect()
}

/// The images of Parquet tables, each row's prompt its label.
fn table_images(
    tables: &[PathBuf],
    opts: &ImageSetOptions,
) -> Result<Vec<TrainingImage>, RunError> {
    let mut images = Vec::new();
    read_image_table(tables, &opts.columns, |rows| {
        let decoded: Vec<TrainingImage> = rows
            .into_par_iter()
            .map(|row| {
                let prompt = match (row.label, opts.label_as) {
                    (TableLabel::Text(text), _) => text,
                    (TableLabel::Class { id, .. }, LabelAs::Id) => id.to_string(),
                    (
                        TableLabel::Class {
                            name: Some(name), ..
                        },
                        LabelAs::Name,
                    ) => name,
                    (TableLabel::Class { id, name: None }, LabelAs::Name) => {
                        return Err(RunError::Data(format!(
                            "{}: label {id} is a class id, and the file's metadata lists no \
                             ClassLabel names to prompt a text-to-image model with; use a text \
                             label column (--label-column) or --label-as id",
                            row.source
                        )))
                    }
                };
                decode(row.source, prompt, &row.bytes, opts)
            })
            .collect::<Result<_, _>>()?;
        images.extend(decoded);
        Ok(())
    })?;
    if images.is_empty() {
        return Err(RunError::Data(format!(
            "{} hold(s) no rows",
            tables
                .iter()
                .map(|t| t.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(default_prompt: Option<&str>) -> ImageSetOptions {
        ImageSetOptions {
            default_prompt: default_prompt.map(str::to_owned),
            columns: TableColumns::default(),
            split: None,
            label_as: LabelAs::Id,
            height: 8,
            width: 8,
            seed: 0,
        }
    }

    #[test]
    fn prompts_come_from_captions_or_the_default_and_epochs_cover_every_image() {
        let dir = tempfile::tempdir().unwrap();
        for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
            image::RgbImage::from_pixel(20, 12, image::Rgb([i as u8 * 50, 0, 0]))
                .save(dir.path().join(name))
                .unwrap();
        }
        std::fs::write(dir.path().join("b.txt"), "a photo of sks dog\n").unwrap();
        let e = TrainingImages::open(dir.path(), &opts(None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.png has no prompt") && e.contains("a.txt"),
            "{e}"
        );
        let mut set = TrainingImages::open(dir.path(), &opts(Some("a dog"))).unwrap();
        let mut seen: Vec<(String, String)> = (0..3)
            .map(|_| {
                let i = set.next_index();
                let t = set.get(i);
                let name = Path::new(&t.source)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                assert_eq!(t.pixels.size(), [8, 8, 3]);
                (name, t.prompt.clone())
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("a.png".into(), "a dog".into()),
                ("b.png".into(), "a photo of sks dog".into()),
                ("c.png".into(), "a dog".into())
            ]
        );
        assert_eq!(set.consumed(), 3);
        let empty = tempfile::tempdir().unwrap();
        let e = TrainingImages::open(empty.path(), &opts(Some("x"))).unwrap_err();
        assert!(e.to_string().contains("no .png / .jpg"), "{e}");
    }

    #[test]
    fn class_folders_name_the_prompts_and_balanced_draws_favour_no_class() {
        let dir = tempfile::tempdir().unwrap();
        for (class, count) in [("cat", 9), ("dog", 1)] {
            let sub = dir.path().join(class);
            std::fs::create_dir(&sub).unwrap();
            for i in 0..count {
                image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8, 0, 0]))
                    .save(sub.join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let mut set = TrainingImages::open(dir.path(), &opts(None)).unwrap();
        assert_eq!(set.prompts(), ["cat", "dog"]);
        let dogs = |set: &mut TrainingImages| {
            (0..400)
                .filter(|_| {
                    let i = set.next_index();
                    set.get(i).prompt == "dog"
                })
                .count()
        };
        assert_eq!(dogs(&mut set), 40, "shuffled epochs: 1 in 10");
        set.balance_classes();
        let balanced = dogs(&mut set);
        assert!((160..240).contains(&balanced), "{balanced} of 400");

        // Latents are encoded once, with the mirror image second.
        let mut calls = 0;
        let (first, again) = {
            let mut encode = |px: &Tensor| {
                calls += 1;
                assert_eq!(px.size(), [2, 8, 8, 3]);
                px.to_kind(tch::Kind::Float)
            };
            (
                set.latents(0, &mut encode).shallow_clone(),
                set.latents(0, &mut encode).shallow_clone(),
            )
        };
        assert!(first.equal(&again));
        assert!(first.get(1).equal(&first.get(0).flip([1])));
        assert_eq!(calls, 1);
    }
}
