//! Offline PSO (method.md §3) as the official personalization script computes it with
//! `--loss_type pso` (Pairwise_Sample_Optimization `personalization/train_pso_sdxl_turbo_dreambooth.py`
//! l. 1843–1883): per-sample MSEs of policy and frozen reference for winner and loser, the
//! loser's weighted by λ (`--neg_defactor`, default 0.1) in each model's difference, and
//! L = −log σ(β·[(L^ref_w − λ·L^ref_l) − (L^θ_w − λ·L^θ_l)]) with β = `--beta_pso` (default 200)
//! and no ½. Pairs are noised at the model's distilled timesteps only, with a shared ε and t.

use super::dpo::{Dpo, TimestepPolicy};
use super::{check_positive, ObjectiveError};

/// The official β (`--beta_pso`'s default).
pub const BETA: f64 = 200.0;
/// The official λ (`--neg_defactor`'s default).
pub const LAMBDA: f64 = 0.1;

/// Offline PSO with β and λ at the distilled schedule's timesteps.
pub fn offline_pso(distilled: &[u32], beta: f64, lambda: f64) -> Result<Dpo, ObjectiveError> {
    check_positive("offline_pso", "beta", beta)?;
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(ObjectiveError::Parameter {
            objective: "offline_pso",
            name: "lambda",
            value: lambda,
            why: "is not a number ≥ 0",
        });
    }
    if distilled.is_empty() {
        return Err(ObjectiveError::Input {
            objective: "offline_pso",
            why: "the distilled schedule is empty; pass the model's few-step timesteps, e.g. \
                  [999, 749, 499, 249]"
                .into(),
        });
    }
    Ok(Dpo {
        beta,
        beta_scale: 1.0,
        loser_weight: lambda,
        timesteps: TimestepPolicy::Distilled(distilled.to_vec()),
    })
}
