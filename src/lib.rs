//! pso: Pairwise Sample Optimization for timestep-distilled text-to-image diffusion models.
//!
//! The `pso` binary (src/main.rs) is a thin CLI over this library. Layout: docs/design.md.

pub mod actor;
pub mod checkpoint;
pub mod config;
pub mod doctor;
pub mod fid;
pub mod learner;
pub mod logging;
pub mod models;
pub mod objective;
pub mod optim;
pub mod pairs;
pub mod peft;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod sampling;
pub mod tensor_file;
pub mod toy;
