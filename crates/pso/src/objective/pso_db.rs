//! `pso_db`, the customization variant of offline PSO (method.md §3), as the official
//! `personalization/train_pso_sdxl_turbo_dreambooth.py` (l. 1842–1893, `--loss_type pso_db`)
//! computes it: a training (subject/style) image and a reference image sampled once from the
//! initial model are noised with a shared ε at a shared timestep; with L = per-sample MSE,
//! z = −(L^θ_train − λ·L^θ_ref_img), L = mean ReLU(1 − β·z) + w·mean L^θ_ref_img. No frozen model
//! enters: the reference image itself anchors the policy.
//!
//! The official script trains SDXL-Turbo "EDM-style": it turns the ε prediction into
//! x̂0 = x − σ·ε̂ and weights (x̂0 − x0)² by σ⁻², which is exactly the ε-MSE used here. For a
//! v-prediction model that route would give ᾱ_t·(v̂ − v)², not the v-MSE this crate uses.

use tch::{Kind, Tensor};

use super::noising::per_sample_mse;
use super::{check_alike, check_positive, host_values, Diagnostics, Loss, ObjectiveError};

/// The official β (`--beta_pso=5` in `personalization/scripts/*.sh`).
pub const BETA: f64 = 5.0;
/// The official weight λ of the reference image's MSE inside z (`--neg_defactor`, default 0.1).
pub const LAMBDA: f64 = 0.1;
/// The official weight of the reference image's MSE added to the loss (`--prior_loss_weight=0.5`).
pub const PRIOR_WEIGHT: f64 = 0.5;

/// The `pso_db` objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PsoDb {
    /// β of the hinge.
    pub beta: f64,
    /// λ: weight of the reference image's MSE inside z.
    pub lambda: f64,
    /// Weight of the reference image's MSE added to the loss (keeps the model fitting it).
    pub prior_weight: f64,
}

impl Default for PsoDb {
    fn default() -> Self {
        PsoDb {
            beta: BETA,
            lambda: LAMBDA,
            prior_weight: PRIOR_WEIGHT,
        }
    }
}

impl PsoDb {
    /// The loss of a batch: row i of the training-image and reference-image tensors share ε and t.
    pub fn loss(
        &self,
        policy_train: &Tensor,
        policy_reference_image: &Tensor,
        target_train: &Tensor,
        target_reference_image: &Tensor,
    ) -> Result<Loss, ObjectiveError> {
        check_positive("pso_db", "beta", self.beta)?;
        for (name, value) in [("lambda", self.lambda), ("prior_weight", self.prior_weight)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ObjectiveError::Parameter {
                    objective: "pso_db",
                    name,
                    value,
                    why: "must be a finite number ≥ 0",
                });
            }
        }
        let batch = check_alike(
            "pso_db",
            &[
                ("policy_train", policy_train),
                ("policy_reference_image", policy_reference_image),
                ("target_train", target_train),
                ("target_reference_image", target_reference_image),
            ],
        )?;
        let train = per_sample_mse(policy_train, &target_train.detach());
        let reference = per_sample_mse(policy_reference_image, &target_reference_image.detach());
        let z = (&train - &reference * self.lambda).neg();
        let hinge = ((&z * self.beta).neg() + 1.0).relu().mean(Kind::Float);
        let loss = hinge + reference.mean(Kind::Float) * self.prior_weight;
        let stats = host_values(&[
            loss.shallow_clone(),
            (&z * self.beta).mean(Kind::Float),
            z.gt(0.0).to_kind(Kind::Float).mean(Kind::Float),
            (train.mean(Kind::Float) + reference.mean(Kind::Float)) * 0.5,
        ]);
        Ok(Loss {
            loss,
            diagnostics: Diagnostics {
                loss: stats[0],
                counted: batch,
                margin: Some(stats[1]),
                accuracy: Some(stats[2]),
                mse_policy: Some(stats[3]),
                ..Diagnostics::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_hinge_switches_off_once_the_margin_exceeds_one_over_beta() {
        let opts = (Kind::Float, Device::Cpu);
        let target = Tensor::zeros([1, 1, 2, 2], opts);
        // L_train = 0, L_ref = 4 ⇒ z = 0.4, β·z = 2 > 1: only the prior term is left.
        let train = Tensor::zeros([1, 1, 2, 2], opts).set_requires_grad(true);
        let reference = Tensor::full([1, 1, 2, 2], 2.0, opts).set_requires_grad(true);
        let out = PsoDb::default()
            .loss(&train, &reference, &target, &target)
            .unwrap();
        assert!((out.diagnostics.loss - PRIOR_WEIGHT * 4.0).abs() < 1e-6);
        assert_eq!(out.diagnostics.accuracy, Some(1.0));
        out.loss.backward();
        assert_eq!(train.grad().abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn bad_parameters_and_shapes_are_refused() {
        let a = Tensor::zeros([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2, 4, 2], (Kind::Float, Device::Cpu));
        let e = PsoDb::default()
            .loss(&a, &a, &a, &b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`target_reference_image` has shape [2, 4, 2]"),
            "{e}"
        );
        let bad = PsoDb {
            lambda: -1.0,
            ..PsoDb::default()
        };
        let e = bad.loss(&a, &a, &a, &a).unwrap_err().to_string();
        assert!(e.contains("lambda = -1 must be a finite number ≥ 0"), "{e}");
    }
}
