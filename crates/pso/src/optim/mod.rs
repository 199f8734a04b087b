//! AdamW with savable state, gradient-norm clipping and learning-rate schedules.

mod adamw;
mod schedule;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig, OptimError};
pub use schedule::{LrSchedule, ScheduleError, ScheduleKind};
