//! Orchestration of training runs: the run directory contract (docs/design.md), metrics,
//! checkpoints and resume, shared by `pso offline` and `pso online`.

pub mod class_samples;
pub mod data;
mod dir;
mod error;
pub mod eval;
pub mod image_table;
pub mod images;
pub mod label;
pub mod offline;
pub mod online;
mod progress;
pub mod prompts;
pub mod relabel;
mod resume;
pub mod rounds;
mod stop;

use std::path::PathBuf;

use diffusion::pipeline::{LoadOptions, Pipeline};

use crate::config::RunConfig;
pub use crate::seed::step_seed;
pub use dir::{run_path, Metrics, RunDir};
pub(crate) use error::io;
pub use error::RunError;
pub use progress::{progress, progress_of};
pub use resume::{resume, save, start_learner};
pub use stop::stop_flag;

/// Loads `config.model` on `device`, with the scheduler of the model folder turned into
/// `sampler.name` (as diffusers' `Scheduler.from_config(pipe.scheduler.config)`): SD-Turbo's
/// folder names Euler, its PSO recipe samples with Euler ancestral.
pub fn load_pipeline(config: &RunConfig, device: tch::Device) -> Result<Pipeline, RunError> {
    let root = hf::hub::resolve_model(&config.model.id, None)?;
    let mut pipeline = Pipeline::load(
        &root,
        &LoadOptions {
            device,
            kind: config.model.dtype.kind(),
            variant: None,
            backbone_weights: config.model.unet.clone(),
        },
    )?;
    pipeline.scheduler_config.kind = config.sampler.name;
    Ok(pipeline)
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The run directory.
    pub run: PathBuf,
    /// Optimizer steps done in total.
    pub steps: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Whether a stop request ended it early.
    pub stopped: bool,
}
