//! pso: Pairwise Sample Optimization for timestep-distilled text-to-image diffusion models.
//!
//! The training layer: objectives, the optimizer, PEFT, the learner, checkpoints, online and
//! offline runs and their reports. Models and sampling live in `diffusion`, scorers in `reward`,
//! the pair store in `pairs`; the `pso` binary (src/main.rs) is a thin CLI over them. Layout:
//! docs/design.md.

pub mod actor;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod fid;
pub mod learner;
pub mod memory;
pub mod objective;
pub mod optim;
pub mod peft;
pub mod problems;
pub mod report;
pub mod run;
pub mod seed;
pub mod tensorboard;
