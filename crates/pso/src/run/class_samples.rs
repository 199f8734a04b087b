//! Evaluation samples of a class-conditional model (`pso sample --per-class N`): N images per
//! class, generated a batch at a time across classes and written as PNGs for `pso eval fid`.
//! Each image draws its noise from its own seed, so the batch size never changes an image, and
//! a rerun after a crash generates only the files that are missing. The settings are kept in
//! `per_class.json` beside the images, and a rerun with other settings is refused rather than
//! mixing two generations in one folder.

use std::path::Path;

use super::{io, progress_of, RunError};
use diffusion::pipeline::dit::ClassRequest;
use diffusion::pipeline::images::{png, rgb_images};
use diffusion::pipeline::Pipeline;
use diffusion::sampling::{RowSeededNoise, Timesteps};
use image::codecs::png::CompressionType;

/// What to generate.
#[derive(Debug, Clone)]
pub struct ClassSamples {
    /// Class ids.
    pub classes: Vec<i64>,
    /// Images per class.
    pub per_class: u32,
    /// Images per sampler call.
    pub batch_size: usize,
    /// Base seed (see [`image_seed`]).
    pub seed: u64,
    /// Steps or explicit timesteps.
    pub timesteps: Timesteps,
    /// Guidance scale; ≤ 1 means none.
    pub guidance: f64,
    /// Latent side (default: the model's `sample_size`).
    pub latent_size: Option<i64>,
    /// What generates the images (model, adapter, sampler), recorded in the settings file.
    pub generator: String,
    /// Show a progress bar.
    pub progress: bool,
}

/// The settings file of an output folder.
pub const SETTINGS_FILE: &str = "per_class.json";

/// How many images a call wrote, and how many it found already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassSamplesReport {
    /// Images generated now.
    pub written: usize,
    /// Images kept from an earlier call.
    pub kept: usize,
}

/// The seed of image `index` of class `class` when each class gets `per_class` images:
/// seed · 2³² + class · per_class + index, so that runs with different seeds (below 2³²) share
/// no image. It is also what `pso sample --class-label CLASS --seed …` takes to draw that image
/// alone.
pub fn image_seed(seed: u64, class: i64, per_class: u32, index: u32) -> u64 {
    (seed << 32).wrapping_add(class as u64 * u64::from(per_class) + u64::from(index))
}

/// The settings that decide the images, as `per_class.json` records them.
fn settings(req: &ClassSamples) -> serde_json::Value {
    serde_json::json!({
        "generator": req.generator,
        "per_class": req.per_class,
        "seed": req.seed,
        "timesteps": format!("{:?}", req.timesteps),
        "guidance": req.guidance,
        "latent_size": req.latent_size,
    })
}

/// Records the settings in a new folder, or checks them against those already recorded.
fn check_settings(req: &ClassSamples, out: &Path) -> Result<(), RunError> {
    let path = out.join(SETTINGS_FILE);
    let ours = settings(req);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let theirs: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                RunError::Data(format!(
                    "{}: unreadable ({e}); delete it only if every image in {} comes from the \
                     settings you are running now",
                    path.display(),
                    out.display()
                ))
            })?;
            let differ: Vec<String> = ours
                .as_object()
                .expect("an object")
                .iter()
                .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
                .map(|(k, v)| {
                    let was = theirs.get(k.as_str()).cloned().unwrap_or_default();
                    format!("{k} {v} (the folder's: {was})")
                })
                .collect();
            if differ.is_empty() {
                Ok(())
            } else {
                Err(RunError::Config(format!(
                    "{} holds samples made with other settings: {}; give a new --out, or run \
                     with the folder's settings to complete it",
                    out.display(),
                    differ.join(", ")
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(&ours).expect("JSON values serialise");
            hf::tensor_file::write_atomically(&path, text.as_bytes())
                .map_err(|e| RunError::Data(format!("cannot write {}: {e}", path.display())))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// The file name of image `index` of class `class`.
pub fn file_name(class: i64, index: u32) -> String {
    format!("class{class:04}_{index:05}.png")
}

/// Generates the images of `req` that `out` does not hold yet.
pub fn write_class_samples(
    pipeline: &Pipeline,
    req: &ClassSamples,
    out: &Path,
) -> Result<ClassSamplesReport, RunError> {
    if req.per_class == 0 || req.batch_size == 0 || req.classes.is_empty() {
        return Err(RunError::Config(format!(
            "nothing to generate: {} class(es), {} per class, batches of {}; all must be at \
             least 1",
            req.classes.len(),
            req.per_class,
            req.batch_size
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    check_settings(req, out)?;
    let all: Vec<(i64, u32)> = req
        .classes
        .iter()
        .flat_map(|&c| (0..req.per_class).map(move |i| (c, i)))
        .collect();
    let missing: Vec<(i64, u32)> = all
        .iter()
        .copied()
        .filter(|&(c, i)| !out.join(file_name(c, i)).exists())
        .collect();
    let kept = all.len() - missing.len();
    let bar = progress_of("image", req.progress, all.len() as u64, kept as u64);
    bar.set_message("sampling");
    for chunk in missing.chunks(req.batch_size) {
        let seeds = chunk
            .iter()
            .map(|&(c, i)| image_seed(req.seed, c, req.per_class, i));
        let request = ClassRequest {
            class_labels: chunk.iter().map(|&(c, _)| c).collect(),
            timesteps: req.timesteps.clone(),
            guidance: req.guidance,
            latent_size: req.latent_size,
            init_latents: None,
            record: false,
        };
        let generated = pipeline.generate_classes(request, &mut RowSeededNoise::new(seeds))?;
        for (&(c, i), image) in chunk.iter().zip(rgb_images(&generated.images)) {
            let path = out.join(file_name(c, i));
            hf::tensor_file::write_atomically(&path, &png(&image, CompressionType::Fast))
                .map_err(|e| RunError::Data(format!("cannot write {}: {e}", path.display())))?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(ClassSamplesReport {
        written: missing.len(),
        kept,
    })
}
