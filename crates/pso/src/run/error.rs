//! The errors of a training run.

use std::path::{Path, PathBuf};

use diffusion::pipeline::PipelineError;
use pairs::PairsError;

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;
use crate::learner::LearnerError;
use crate::objective::ObjectiveError;
use crate::peft::PeftError;

/// Errors of a training run; each names what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run directory cannot be used as asked.
    #[error("{path}: {why}")]
    RunDir {
        /// The run directory.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config does not allow this run.
    #[error("{0}")]
    Config(String),
    /// Bad training data.
    #[error("{0}")]
    Data(String),
    /// Writing the resolved config failed.
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    /// The scheduler refused the sampler config.
    #[error(transparent)]
    Sampling(#[from] diffusion::sampling::SamplingError),
    /// A model path or hub id could not be resolved.
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    /// The pipeline failed to load or run.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The pair store failed.
    #[error(transparent)]
    Pairs(#[from] PairsError),
    /// Choosing trainable tensors failed.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The objective refused its inputs.
    #[error(transparent)]
    Objective(#[from] ObjectiveError),
    /// The learner failed.
    #[error(transparent)]
    Learner(#[from] LearnerError),
    /// A checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The scorer kept failing past its patience.
    #[error("{0}")]
    Scorer(String),
}

/// A [`RunError::Io`] maker for `map_err`, naming the file.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}
