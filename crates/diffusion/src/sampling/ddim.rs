//! diffusers' `DDIMScheduler` with η (the `eta` argument of its `step`; 0 = deterministic DDIM).
//!
//! μ = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − s²)·ε̂,
//! s = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)).

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::fp32;
use super::kernel::{predict_original_vp, Kernel};

/// The DDIM scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddim {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Integer model timesteps, first to last.
    pub timesteps: Vec<f64>,
    /// The timestep each step goes to; negative means "past the end" (ᾱ = `final_alpha_cumprod`).
    pub prev_timesteps: Vec<i64>,
    /// ᾱ after the last training timestep: 1, or ᾱ_0 when `set_alpha_to_one` is false.
    pub final_alpha_cumprod: f64,
    /// η.
    pub eta: f64,
    /// Clamp bound of x0, when clipping.
    pub clip: Option<f64>,
}

impl Ddim {
    /// Builds the schedule. For spaced timesteps diffusers steps a fixed stride N/steps back (even
    /// when the spacing's timesteps are not that far apart); for an explicit list, which
    /// diffusers' DDIM does not take, each step goes to the next listed timestep and the last one
    /// past the end.
    pub fn new(
        config: &SchedulerConfig,
        alphas_cumprod: &[f64],
        timesteps: Vec<f64>,
        explicit: bool,
    ) -> Ddim {
        let stride = (config.num_train_timesteps / timesteps.len()) as i64;
        let prev_timesteps = if explicit {
            timesteps
                .iter()
                .skip(1)
                .map(|&t| t as i64)
                .chain([-1])
                .collect()
        } else {
            timesteps.iter().map(|&t| t as i64 - stride).collect()
        };
        Ddim {
            prediction_type: config.prediction_type,
            timesteps,
            prev_timesteps,
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            eta: config.eta,
            clip: config.clip_sample.then_some(config.clip_sample_range),
        }
    }

    /// The DDIM kernel of step `step` (fp32 scalars, as diffusers' `alphas_cumprod` entries).
    pub fn transition(
        &self,
        alphas_cumprod: &[f64],
        step: usize,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Kernel {
        let alpha_prod_t = alphas_cumprod[self.timesteps[step] as usize] as f32;
        let prev = self.prev_timesteps[step];
        let alpha_prod_prev = if prev >= 0 {
            alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        } as f32;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let x0 = predict_original_vp(self.prediction_type, alpha_prod_t, sample, model_output);
        let (sqrt_alpha, sqrt_beta) = (
            f64::from(fp32::sqrt(alpha_prod_t)),
            f64::from(fp32::sqrt(beta_prod_t)),
        );
        // ε̂ comes from the unclipped x̂0, as in diffusers (use_clipped_model_output = False).
        let eps = match self.prediction_type {
            PredictionType::Epsilon => model_output.shallow_clone(),
            PredictionType::Sample => (sample - &x0 * sqrt_alpha) / sqrt_beta,
            PredictionType::VPrediction => model_output * sqrt_alpha + sample * sqrt_beta,
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        let variance = (beta_prod_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev);
        let std = self.eta as f32 * fp32::sqrt(variance);
        let direction = eps * f64::from(fp32::sqrt(1.0 - alpha_prod_prev - std * std));
        Kernel::fixed(
            x0 * f64::from(fp32::sqrt(alpha_prod_prev)) + direction,
            f64::from(std),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::betas::alphas_cumprod;
    use crate::sampling::config::SchedulerKind;

    #[test]
    fn spaced_schedules_step_a_fixed_stride_and_explicit_ones_follow_the_list() {
        let c = SchedulerConfig::new(SchedulerKind::Ddim);
        let ac = alphas_cumprod(&c);
        let spaced = Ddim::new(&c, &ac, vec![999.0, 500.0, 0.0], false);
        assert_eq!(spaced.prev_timesteps, [666, 167, -333]);
        let explicit = Ddim::new(&c, &ac, vec![999.0, 500.0, 0.0], true);
        assert_eq!(explicit.prev_timesteps, [500, 0, -1]);
    }
}
