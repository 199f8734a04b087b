//! Fixed-seed evaluation of online runs: the same held-out prompts and seeds at every
//! evaluation, scored by one or more eval scorers (which may differ from the training scorer),
//! with a PNG grid per evaluation in `RUN/samples/` and one line per evaluation in
//! `RUN/eval.jsonl`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use image::RgbImage;
use reward::ScoreItem;
use serde_json::{Map, Value};

use diffusion::pipeline::images::{png, rgb_images};
use image::codecs::png::CompressionType;

use super::label::PatientScorer;
use super::prompts::PromptSet;
use super::{RunDir, RunError};
use crate::actor::{Actor, ActorSettings};
use crate::checkpoint::dir_name;
use crate::tensorboard::SharedEvents;
use diffusion::pipeline::Pipeline;

/// The evaluation of a run.
pub struct Evaluator {
    prompts: Vec<String>,
    scorers: Vec<(String, Arc<PatientScorer>)>,
    settings: ActorSettings,
    samples: PathBuf,
    log: PathBuf,
    events: Option<SharedEvents>,
}

/// Seeds of the eval images are drawn from this run-seed offset, apart from training seeds.
const EVAL_SEED: u64 = 0x6576_616c;

impl Evaluator {
    /// The first `count` prompts of `prompts`, scored by `scorers` (name, scorer).
    pub fn new(
        dir: &RunDir,
        prompts: &PromptSet,
        count: u32,
        scorers: Vec<(String, Arc<PatientScorer>)>,
        mut settings: ActorSettings,
    ) -> Evaluator {
        settings.samples_per_prompt = 1;
        settings.seed ^= EVAL_SEED;
        Evaluator {
            prompts: (0..prompts.len().min(count as usize))
                .map(|i| prompts.get(i).to_owned())
                .collect(),
            scorers,
            settings,
            samples: dir.path.join("samples"),
            log: dir.path.join("eval.jsonl"),
            events: None,
        }
    }

    /// Also logs each evaluation to `events`: the mean scores as `eval/*` scalars and the sample
    /// grid as the image `eval/samples`.
    pub fn with_tensorboard(mut self, events: SharedEvents) -> Self {
        self.events = Some(events);
        self
    }

    /// Samples the eval prompts with `pipeline` after `step` optimizer steps, writes
    /// `samples/step-XXXXXXXX.png` and a line of `eval.jsonl`; returns the mean score per scorer.
    pub fn run(
        &self,
        pipeline: &Pipeline,
        step: u64,
        runtime: &tokio::runtime::Handle,
        halt: &AtomicBool,
    ) -> Result<Vec<(String, f64)>, RunError> {
        let actor = Actor::new(pipeline, self.settings.clone())?;
        let mut images = Vec::new();
        for (i, prompt) in self.prompts.iter().enumerate() {
            let group = actor.sample(0, i as u32, i, prompt, step)?;
            images.extend(rgb_images(&group.images));
        }
        std::fs::create_dir_all(&self.samples).map_err(|source| RunError::Io {
            path: self.samples.clone(),
            source,
        })?;
        let grid_path = self.samples.join(format!("{}.png", dir_name(step)));
        let grid = grid(&images);
        let grid_png = png(&grid, CompressionType::Fast);
        hf::tensor_file::write_atomically(&grid_path, &grid_png)
            .map_err(|e| RunError::Data(format!("cannot write {}: {e}", grid_path.display())))?;
        let items: Vec<ScoreItem> = self
            .prompts
            .iter()
            .zip(&images)
            .map(|(prompt, image)| ScoreItem { prompt, image })
            .collect();
        let mut means = Vec::new();
        for (name, scorer) in &self.scorers {
            let Some(scores) = runtime.block_on(scorer.score(&items, halt))? else {
                break;
            };
            let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len() as f64;
            means.push((name.clone(), mean));
        }
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        line.insert("samples".into(), grid_path.display().to_string().into());
        for (name, mean) in &means {
            line.insert(format!("eval/{name}"), (*mean).into());
        }
        if let Some(events) = &self.events {
            let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
            let scalars: Vec<(String, f64)> = means
                .iter()
                .map(|(name, mean)| (format!("eval/{name}"), *mean))
                .collect();
            let path = events.path().to_owned();
            events
                .scalars(step, &scalars)
                .and_then(|()| {
                    events.image(step, "eval/samples", &grid_png, grid.width(), grid.height())
                })
                .map_err(|source| RunError::Io { path, source })?;
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| RunError::Io {
                path: self.log.clone(),
                source,
            })?;
        Ok(means)
    }
}

/// The images side by side, up to four per row.
fn grid(images: &[RgbImage]) -> RgbImage {
    let (w, h) = images[0].dimensions();
    let cols = images.len().min(4) as u32;
    let rows = images.len().div_ceil(4) as u32;
    let mut out = RgbImage::new(cols * w, rows * h);
    for (i, image) in images.iter().enumerate() {
        let (c, r) = (i as u32 % 4, i as u32 / 4);
        image::imageops::replace(&mut out, image, (c * w) as i64, (r * h) as i64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_hold_four_images_per_row() {
        let images: Vec<RgbImage> = (0..5)
            .map(|i| RgbImage::from_pixel(3, 2, image::Rgb([i * 40, 0, 0])))
            .collect();
        let g = grid(&images);
        assert_eq!(g.dimensions(), (12, 4));
        assert_eq!(g.get_pixel(10, 1)[0], 120);
        assert_eq!(g.get_pixel(1, 3)[0], 160);
        assert_eq!(g.get_pixel(5, 3)[0], 0);
    }
}
