//! Source c of method.md §3: training images (a style or a subject) with their prompts, each
//! paired as the preferred side against a reference image freshly sampled from the current
//! model for the same prompt.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use super::data::image_tensor;
use super::{step_seed, RunError};

/// One training image, resized and centre-cropped to the run's size.
#[derive(Debug)]
pub struct TrainingImage {
    /// The file.
    pub path: PathBuf,
    /// Its prompt (`NAME.txt` next to it, or the default prompt).
    pub prompt: String,
    /// [H, W, 3] uint8.
    pub pixels: Tensor,
}

/// The images of a folder in a seeded order per epoch, with a cursor for checkpoints.
#[derive(Debug)]
pub struct TrainingImages {
    images: Vec<TrainingImage>,
    seed: u64,
    order: Vec<usize>,
    epoch: u64,
    consumed: u64,
}

impl TrainingImages {
    /// Reads every PNG / JPEG of `dir` (sorted by name). A prompt comes from `NAME.txt` beside
    /// the image, else from `default_prompt`.
    pub fn open(
        dir: &Path,
        default_prompt: Option<&str>,
        height: u32,
        width: u32,
        seed: u64,
    ) -> Result<TrainingImages, RunError> {
        let io = |source| RunError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(RunError::Data(format!(
                "{} holds no .png / .jpg training image",
                dir.display()
            )));
        }
        let mut images = Vec::with_capacity(paths.len());
        for path in paths {
            let caption = path.with_extension("txt");
            let prompt = match std::fs::read_to_string(&caption) {
                Ok(text) => text.trim().to_owned(),
                Err(_) => default_prompt.map(str::to_owned).ok_or_else(|| {
                    RunError::Data(format!(
                        "{} has no prompt: write it into {} or give --prompt",
                        path.display(),
                        caption.display()
                    ))
                })?,
            };
            let bytes = std::fs::read(&path).map_err(|source| RunError::Io {
                path: path.clone(),
                source,
            })?;
            let pixels = image_tensor(&bytes, height, width, &path.display().to_string())?;
            images.push(TrainingImage {
                path,
                prompt,
                pixels,
            });
        }
        let mut out = TrainingImages {
            images,
            seed,
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

    /// The index of the next image, reshuffling at each epoch.
    pub fn next_index(&mut self) -> usize {
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

    /// Image `index` (as [`TrainingImages::next_index`] returns).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_come_from_captions_or_the_default_and_epochs_cover_every_image() {
        let dir = tempfile::tempdir().unwrap();
        for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
            image::RgbImage::from_pixel(20, 12, image::Rgb([i as u8 * 50, 0, 0]))
                .save(dir.path().join(name))
                .unwrap();
        }
        std::fs::write(dir.path().join("b.txt"), "a photo of sks dog\n").unwrap();
        let e = TrainingImages::open(dir.path(), None, 8, 8, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.png has no prompt") && e.contains("a.txt"),
            "{e}"
        );
        let mut set = TrainingImages::open(dir.path(), Some("a dog"), 8, 8, 0).unwrap();
        let mut seen: Vec<(String, String)> = (0..3)
            .map(|_| {
                let i = set.next_index();
                let t = set.get(i);
                let name = t.path.file_name().unwrap().to_string_lossy().into_owned();
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
        let e = TrainingImages::open(empty.path(), Some("x"), 8, 8, 0).unwrap_err();
        assert!(e.to_string().contains("no .png / .jpg"), "{e}");
    }
}
