//! diffusers' `EulerAncestralDiscreteScheduler` (SD-Turbo / SDXL-Turbo): an Euler step to σ_down
//! followed by fresh noise of std σ_up, so that the marginal noise level lands on σ_next.
//!
//! The kernel is method.md §2.4's "Euler-ancestral kernel": x̂0 from the model output,
//! σ_up = sqrt(σ_to²(σ_from² − σ_to²)/σ_from²), σ_down = sqrt(σ_to² − σ_up²),
//! μ = x + (x − x̂0)/σ·(σ_down − σ), s = σ_up.

use tch::Tensor;

use super::config::{FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};
use super::euler::{euler_step, predict_original, sigma_schedule};
use super::fp32;
use super::kernel::Kernel;

/// The Euler-ancestral scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscrete {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Model timesteps, first to last (fp32 values).
    pub timesteps: Vec<f64>,
    /// σ of each step plus the final σ = 0.
    pub sigmas: Vec<f64>,
    /// The config's spacing, which decides `init_noise_sigma`.
    pub spacing: TimestepSpacing,
}

impl EulerAncestralDiscrete {
    /// Builds the schedule for the given training-scale timesteps; σ is interpolated as in
    /// `EulerDiscreteScheduler` (diffusers' ancestral class only spaces, it takes no explicit
    /// list).
    pub fn new(
        config: &SchedulerConfig,
        alphas_cumprod: &[f64],
        timesteps: Vec<f64>,
    ) -> EulerAncestralDiscrete {
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| f64::from(t as f32)).collect();
        let sigmas = sigma_schedule(alphas_cumprod, &timesteps, FinalSigmasType::Zero);
        EulerAncestralDiscrete {
            prediction_type: config.prediction_type,
            timesteps,
            sigmas,
            spacing: config.timestep_spacing,
        }
    }

    /// σ_up and σ_down of the step from σ_from to σ_to, in fp32 as diffusers computes them.
    pub fn ancestral_sigmas(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let up = fp32::sqrt(to2 * (from2 - to2) / from2);
        let down = fp32::sqrt((to2 - up * up).max(0.0));
        (up, down)
    }

    /// The ancestral kernel of step `step`; the last step (σ_to = 0) has s = 0.
    pub fn transition(&self, step: usize, sample: &Tensor, model_output: &Tensor) -> Kernel {
        let (sigma, sigma_to) = (self.sigmas[step] as f32, self.sigmas[step + 1] as f32);
        let x0 = predict_original(self.prediction_type, sigma, sample, model_output);
        let (up, down) = Self::ancestral_sigmas(sigma, sigma_to);
        Kernel::fixed(euler_step(sample, &x0, sigma, down - sigma), f64::from(up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestral_sigmas_preserve_the_marginal_variance() {
        for (from, to) in [(14.6, 3.2), (3.2, 0.9), (1.0, 0.5)] {
            let (up, down) = EulerAncestralDiscrete::ancestral_sigmas(from, to);
            assert!((up * up + down * down - to * to).abs() < 1e-5);
            assert!(up > 0.0 && down > 0.0 && down < to);
        }
        assert_eq!(
            EulerAncestralDiscrete::ancestral_sigmas(0.9, 0.0),
            (0.0, 0.0)
        );
    }
}
