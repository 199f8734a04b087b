//! diffusers' `LCMScheduler` (LCM, DMD2): predict x0 with the consistency boundary condition,
//! then re-noise it to the next timestep with fresh noise.
//!
//! The kernel is method.md §2.4's "re-noise kernel": μ = sqrt(ᾱ_{t'})·x̂0, s = sqrt(1 − ᾱ_{t'}),
//! where x̂0 is LCM's `denoised` = c_out·x0 + c_skip·x_t (c_skip ≈ 0 and c_out ≈ 1 away from t = 0,
//! but kept exact so the learner's μ is the sampler's μ). The last step returns x̂0 (s = 0).

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::fp32;
use super::kernel::{predict_original_vp, Kernel};
use super::spacing::np_linspace;
use super::SamplingError;

/// σ_data of the consistency-model boundary condition (fixed in diffusers).
const SIGMA_DATA: f32 = 0.5;

/// The LCM scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Lcm {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Integer model timesteps, first to last.
    pub timesteps: Vec<f64>,
    /// Timestep scale of the boundary condition.
    pub timestep_scaling: f64,
    /// Clamp bound of x0, when clipping.
    pub clip: Option<f64>,
}

/// LCM's timesteps for `steps` steps: evenly chosen (by index) from the distillation schedule
/// k−1, 2k−1, …, N−1 with k = N / original_inference_steps.
pub fn lcm_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<f64>, SamplingError> {
    let original = config.original_inference_steps;
    if steps > original {
        return Err(SamplingError::Timesteps {
            scheduler: "LCMScheduler",
            why: format!(
                "{steps} steps is more than original_inference_steps ({original}), the \
                 distillation schedule they are taken from; use at most {original} steps or raise \
                 original_inference_steps"
            ),
        });
    }
    let k = config.num_train_timesteps / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    Ok(np_linspace(0.0, origin.len() as f64, steps, false)
        .into_iter()
        .map(|i| origin[i.floor() as usize] as f64)
        .collect())
}

impl Lcm {
    /// Builds the schedule for integer timesteps (spaced by [`lcm_timesteps`] or explicit).
    pub fn new(config: &SchedulerConfig, timesteps: Vec<f64>) -> Lcm {
        Lcm {
            prediction_type: config.prediction_type,
            timesteps,
            timestep_scaling: config.timestep_scaling,
            clip: config.clip_sample.then_some(config.clip_sample_range),
        }
    }

    /// c_skip and c_out of the consistency boundary condition at timestep t (fp32, as diffusers
    /// scales the integer timestep tensor into a float one).
    pub fn boundary_scalings(&self, timestep: f64) -> (f32, f32) {
        let scaled = (timestep * self.timestep_scaling) as f32;
        let data2 = SIGMA_DATA * SIGMA_DATA;
        let denom = scaled * scaled + data2;
        (data2 / denom, scaled / fp32::sqrt(denom))
    }

    /// The re-noise kernel of step `step`.
    pub fn transition(
        &self,
        alphas_cumprod: &[f64],
        step: usize,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Kernel {
        let t = self.timesteps[step];
        let alpha_prod_t = alphas_cumprod[t as usize] as f32;
        let mut x0 = predict_original_vp(self.prediction_type, alpha_prod_t, sample, model_output);
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r);
        }
        let (c_skip, c_out) = self.boundary_scalings(t);
        let denoised = x0 * f64::from(c_out) + sample * f64::from(c_skip);
        match self.timesteps.get(step + 1) {
            Some(&prev) => {
                let alpha_prod_prev = alphas_cumprod[prev as usize] as f32;
                Kernel::fixed(
                    denoised * f64::from(fp32::sqrt(alpha_prod_prev)),
                    f64::from(fp32::sqrt(1.0 - alpha_prod_prev)),
                )
            }
            None => Kernel::fixed(denoised, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::config::SchedulerKind;

    #[test]
    fn lcm_schedules_match_diffusers() {
        let c = SchedulerConfig::new(SchedulerKind::Lcm);
        assert_eq!(lcm_timesteps(&c, 1).unwrap(), [999.0]);
        assert_eq!(lcm_timesteps(&c, 2).unwrap(), [999.0, 499.0]);
        assert_eq!(lcm_timesteps(&c, 4).unwrap(), [999.0, 759.0, 499.0, 259.0]);
        let err = lcm_timesteps(&c, 51).unwrap_err().to_string();
        assert!(err.contains("original_inference_steps (50)"), "{err}");
    }

    #[test]
    fn boundary_condition_is_identity_at_large_t_and_skip_at_zero() {
        let lcm = Lcm::new(&SchedulerConfig::new(SchedulerKind::Lcm), vec![999.0]);
        let (skip, out) = lcm.boundary_scalings(999.0);
        assert!(skip < 1e-8 && (out - 1.0).abs() < 1e-6);
        assert_eq!(lcm.boundary_scalings(0.0), (1.0, 0.0));
    }
}
