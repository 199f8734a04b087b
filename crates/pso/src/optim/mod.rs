//! AdamW with savable state, gradient-norm clipping and learning-rate schedules.

mod adamw;
mod schedule;

use serde::{Deserialize, Serialize};

use crate::problems::{failing, Problems};

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig, OptimError};
pub use schedule::{LrSchedule, ScheduleKind};

/// AdamW and its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam β1, β2.
    pub betas: [f64; 2],
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam ε.
    pub eps: f64,
    /// Gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// `constant`, `warmup` or `cosine`.
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 1e-5,
            betas: [0.9, 0.999],
            weight_decay: 1e-6,
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
        }
    }
}

impl OptimSection {
    /// `optim.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        failing([
            (
                self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0,
                "optim.lr",
                format!("{} is not in (0, 1)", self.lr),
            ),
            (
                self.betas.iter().all(|b| (0.0..1.0).contains(b)),
                "optim.betas",
                format!("{:?}: both must be in [0, 1)", self.betas),
            ),
            (
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                "optim.weight_decay",
                format!("{} is not a number ≥ 0", self.weight_decay),
            ),
            (
                self.eps.is_finite() && self.eps > 0.0,
                "optim.eps",
                format!("{} is not a positive number", self.eps),
            ),
            (
                self.grad_clip.is_finite() && self.grad_clip >= 0.0,
                "optim.grad_clip",
                format!(
                    "{} is not a number ≥ 0 (0 disables clipping)",
                    self.grad_clip
                ),
            ),
        ])
    }
}
