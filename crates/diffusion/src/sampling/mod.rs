//! Samplers: diffusers' Euler, Euler-ancestral, LCM, DDIM and DDPM schedulers (few-step for the
//! distilled models, DDIM and DDPM for DiT), and a sampler loop that can record its trajectory
//! with the transition kernels of docs/method.md §2.4.
//!
//! [`SchedulerConfig`] reads a diffusers `scheduler_config.json`; [`Scheduler::new`] is diffusers'
//! constructor followed by `set_timesteps`; [`Scheduler::transition`] is one `step` split into the
//! kernel mean μ and std s, so that `x_{t'} = μ + s·z`; [`sample`] runs the loop.

pub mod betas;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod euler;
pub mod euler_ancestral;
pub mod flow_match;
mod fp32;
pub mod kernel;
pub mod lcm;
pub mod noise;
pub mod sampler;
pub mod scheduler;
pub mod spacing;

pub use config::{
    BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing,
    TimestepType, VarianceType,
};
pub use flow_match::{FlowKernel, FlowMatchConfig, FlowMatchEuler, FlowSchedule};
pub use kernel::Kernel;
pub use noise::{ExplicitNoise, NoiseSource, RowSeededNoise, SeededNoise};
pub use sampler::{sample, Denoiser, InitialLatents, SampleOutput, Trajectory};
pub use scheduler::{Scheduler, Timesteps};

/// Errors of the schedulers and the sampler; each says what was wrong, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// The scheduler config could not be parsed.
    #[error("scheduler config: {0} (expected a diffusers scheduler/scheduler_config.json)")]
    Parse(String),
    /// `_class_name` names a scheduler this crate does not implement.
    #[error(
        "scheduler config: `_class_name` is `{0}`, which is not supported; use one of \
         EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCMScheduler, DDIMScheduler, \
         DDPMScheduler, FlowMatchEulerDiscreteScheduler (or override the kind)"
    )]
    UnknownScheduler(String),
    /// A config key has a value that is not implemented or out of range.
    #[error("scheduler config: `{key}` {why}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// The requested number of steps or timestep list is not usable.
    #[error("{scheduler} timesteps: {why}")]
    Timesteps {
        /// The scheduler's diffusers class name.
        scheduler: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// A step index or tensor does not fit the schedule.
    #[error("{0}")]
    Step(String),
    /// The noise source cannot provide what the sampler needs.
    #[error("noise: {0}")]
    Noise(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
