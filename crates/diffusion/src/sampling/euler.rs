//! diffusers' `EulerDiscreteScheduler` (deterministic, `s_churn = 0`): Karras et al.'s Euler step
//! in σ-space, where the latent is x = x0 + σ·ε and the model sees x/sqrt(σ²+1).
//!
//! The σ schedule built here is shared with [`super::euler_ancestral`].

use tch::Tensor;

use super::betas;
use super::config::{
    FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing, TimestepType,
};
use super::fp32;
use super::kernel::Kernel;

/// numpy's `interp(x, arange(len(fp)), fp)` for x inside [0, len − 1].
fn interp(x: f64, fp: &[f64]) -> f64 {
    let j = (x.floor() as usize).min(fp.len() - 1);
    if x == j as f64 {
        return fp[j];
    }
    fp[j] + (fp[j + 1] - fp[j]) * (x - j as f64)
}

/// The σ of each timestep, linearly interpolated in t as diffusers does, plus the final σ;
/// everything rounded to fp32 like diffusers' `sigmas` tensor.
pub fn sigma_schedule(
    alphas_cumprod: &[f64],
    timesteps: &[f64],
    final_sigma: FinalSigmasType,
) -> Vec<f64> {
    let train = betas::sigmas(alphas_cumprod);
    let last = match final_sigma {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => train[0],
    };
    timesteps
        .iter()
        .map(|&t| interp(t, &train))
        .chain([last])
        .map(|s| f64::from(s as f32))
        .collect()
}

/// diffusers' `init_noise_sigma` of the Euler family: σ_max for `linspace`/`trailing`, else
/// sqrt(σ_max² + 1) (the `leading` schedule does not start at the last training timestep).
pub fn init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::MIN, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
        TimestepSpacing::Leading => f64::from(fp32::sqrt(max * max + 1.0)),
    }
}

/// x / sqrt(σ² + 1): the model input of the Euler family (the VP-scaled latent).
pub fn scale_model_input(sample: &Tensor, sigma: f64) -> Tensor {
    let s = sigma as f32;
    sample / f64::from(fp32::sqrt(s * s + 1.0))
}

/// The denoised x̂0 from the model output at noise level σ. Scalars are fp32 like diffusers' 0-dim
/// `sigma` tensor, so the fp32 tensor arithmetic rounds exactly as diffusers' does.
pub fn predict_original(
    prediction: PredictionType,
    sigma: f32,
    sample: &Tensor,
    model_output: &Tensor,
) -> Tensor {
    match prediction {
        PredictionType::Epsilon => sample - model_output * f64::from(sigma),
        PredictionType::VPrediction => {
            let var = sigma * sigma + 1.0;
            model_output * f64::from(-sigma / fp32::sqrt(var)) + sample / f64::from(var)
        }
        PredictionType::Sample => model_output.shallow_clone(),
    }
}

/// x + (x − x̂0)/σ·dt: an Euler step of the probability-flow ODE over dt (fp32 scalars).
pub fn euler_step(sample: &Tensor, x0: &Tensor, sigma: f32, dt: f32) -> Tensor {
    let derivative = (sample - x0) / f64::from(sigma);
    sample + derivative * f64::from(dt)
}

/// The Euler scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Model timesteps, first to last (fp32 values).
    pub timesteps: Vec<f64>,
    /// σ of each step plus the final σ (one more than `timesteps`).
    pub sigmas: Vec<f64>,
    /// The config's spacing, which decides `init_noise_sigma` even for explicit timesteps.
    pub spacing: TimestepSpacing,
}

impl EulerDiscrete {
    /// Builds the schedule for the given training-scale timesteps (spaced or explicit).
    pub fn new(
        config: &SchedulerConfig,
        alphas_cumprod: &[f64],
        timesteps: Vec<f64>,
    ) -> EulerDiscrete {
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| f64::from(t as f32)).collect();
        let sigmas = sigma_schedule(alphas_cumprod, &timesteps, config.final_sigmas_type);
        let timesteps = match (config.timestep_type, config.prediction_type) {
            // EDM-style v-prediction models take c_noise = ln(σ)/4 as timestep.
            (TimestepType::Continuous, PredictionType::VPrediction) => sigmas[..timesteps.len()]
                .iter()
                .map(|&s| f64::from(0.25f32 * fp32::ln(s as f32)))
                .collect(),
            _ => timesteps,
        };
        EulerDiscrete {
            prediction_type: config.prediction_type,
            timesteps,
            sigmas,
            spacing: config.timestep_spacing,
        }
    }

    /// The deterministic Euler step from σ_i to σ_{i+1}: μ = x + (x − x̂0)/σ·(σ_next − σ), s = 0.
    pub fn transition(&self, step: usize, sample: &Tensor, model_output: &Tensor) -> Kernel {
        let (sigma, sigma_next) = (self.sigmas[step] as f32, self.sigmas[step + 1] as f32);
        let x0 = predict_original(self.prediction_type, sigma, sample, model_output);
        Kernel::fixed(euler_step(sample, &x0, sigma, sigma_next - sigma), 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::config::SchedulerKind;

    #[test]
    fn interpolation_hits_table_values_and_midpoints() {
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(interp(0.0, &fp), 1.0);
        assert_eq!(interp(2.0, &fp), 7.0);
        assert_eq!(interp(1.5, &fp), 5.0);
    }

    #[test]
    fn leading_spacing_inflates_init_noise_sigma() {
        let sigmas = [14.0, 3.0, 0.0];
        assert_eq!(init_noise_sigma(&sigmas, TimestepSpacing::Trailing), 14.0);
        let lead = init_noise_sigma(&sigmas, TimestepSpacing::Leading);
        assert!((lead - 197f64.sqrt()).abs() < 1e-5);
    }

    #[test]
    fn sigma_min_final_sigma_and_continuous_timesteps() {
        let mut c = SchedulerConfig::new(SchedulerKind::Euler);
        let ac = betas::alphas_cumprod(&c);
        c.final_sigmas_type = FinalSigmasType::SigmaMin;
        c.timestep_type = TimestepType::Continuous;
        c.prediction_type = PredictionType::VPrediction;
        let e = EulerDiscrete::new(&c, &ac, vec![999.0, 499.0]);
        assert_eq!(e.sigmas.len(), 3);
        assert_eq!(e.sigmas[2], betas::sigmas(&ac)[0] as f32 as f64);
        assert!((e.timesteps[0] - 0.25 * e.sigmas[0].ln()).abs() < 1e-6);
    }
}
