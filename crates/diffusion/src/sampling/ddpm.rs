//! diffusers' `DDPMScheduler`: ancestral sampling with the posterior q(x_{t'} | x_t, x̂0),
//!
//! μ = sqrt(ᾱ_{t'})·β_t/(1 − ᾱ_t)·x̂0 + sqrt(α_t)·(1 − ᾱ_{t'})/(1 − ᾱ_t)·x_t, where
//! α_t = ᾱ_t/ᾱ_{t'} and β_t = 1 − α_t, and a variance that is fixed (β̃_t = (1 − ᾱ_{t'})/(1 − ᾱ_t)·β_t,
//! or β_t) or learned: with `learned_range` the model's second half of channels v ∈ [−1, 1] picks
//! log s² = (v + 1)/2·ln β_t + (1 − v)/2·ln β̃_t per element (improved DDPM; DiT's learned sigma).

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, VarianceType};
use super::fp32;
use super::kernel::{predict_original_vp, Kernel};

/// diffusers clamps β̃ to this before taking its root or log.
const MIN_VARIANCE: f32 = 1e-20;

/// The DDPM scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddpm {
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Integer model timesteps, first to last.
    pub timesteps: Vec<f64>,
    /// The timestep each step goes to (the next listed one); −1 after the last (ᾱ = 1).
    pub prev_timesteps: Vec<i64>,
    /// Which variance the ancestral step adds.
    pub variance_type: VarianceType,
    /// Clamp bound of x0, when clipping.
    pub clip: Option<f64>,
}

impl Ddpm {
    /// Builds the schedule; whether spaced or explicit, diffusers' `previous_timestep` is the next
    /// listed timestep.
    pub fn new(config: &SchedulerConfig, timesteps: Vec<f64>) -> Ddpm {
        let prev_timesteps = timesteps
            .iter()
            .skip(1)
            .map(|&t| t as i64)
            .chain([-1])
            .collect();
        Ddpm {
            prediction_type: config.prediction_type,
            timesteps,
            prev_timesteps,
            variance_type: config.variance_type,
            clip: config.clip_sample.then_some(config.clip_sample_range),
        }
    }

    /// Whether diffusers' `step` draws noise: at every timestep above 0.
    pub fn draws_noise(&self, step: usize) -> bool {
        self.timesteps[step] > 0.0
    }

    /// The DDPM kernel of step `step`. With a learned variance `model_output` has twice the
    /// channels of `sample` (ε̂ first); fp32 scalars as diffusers' `alphas_cumprod` entries.
    pub fn transition(
        &self,
        alphas_cumprod: &[f64],
        step: usize,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Kernel {
        let t = self.timesteps[step];
        let alpha_prod_t = alphas_cumprod[t as usize] as f32;
        let prev = self.prev_timesteps[step];
        let alpha_prod_prev = if prev >= 0 {
            alphas_cumprod[prev as usize] as f32
        } else {
            1.0
        };
        let c = sample.size()[1];
        let output = model_output.narrow(1, 0, c);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let current_alpha = alpha_prod_t / alpha_prod_prev;
        let current_beta = 1.0 - current_alpha;
        let x0 = predict_original_vp(self.prediction_type, alpha_prod_t, sample, &output);
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        let x0_coeff = fp32::sqrt(alpha_prod_prev) * current_beta / beta_prod_t;
        let sample_coeff = fp32::sqrt(current_alpha) * beta_prod_prev / beta_prod_t;
        let mean = x0 * f64::from(x0_coeff) + sample * f64::from(sample_coeff);
        if !self.draws_noise(step) {
            return Kernel::fixed(mean, 0.0);
        }
        let posterior = beta_prod_prev / beta_prod_t * current_beta;
        match self.variance_type {
            VarianceType::LearnedRange => {
                let min_log = f64::from(fp32::ln(posterior.max(MIN_VARIANCE)));
                let max_log = f64::from(fp32::ln(current_beta));
                let frac: Tensor = (model_output.narrow(1, c, c) + 1.0) / 2.0;
                let log_variance = &frac * max_log + (frac.neg() + 1.0) * min_log;
                let bound = f64::from(fp32::sqrt(current_beta));
                Kernel::learned(mean, (log_variance * 0.5).exp(), bound)
            }
            // β̃ hits the floor only where x_{t'} is the clean sample (the last step of a schedule
            // ending above t = 0); diffusers adds 1e-10·z there, which is kept out of the kernel
            // so that the step counts as deterministic.
            VarianceType::FixedSmall | VarianceType::FixedSmallLog if posterior <= MIN_VARIANCE => {
                Kernel::fixed(mean, 0.0)
            }
            VarianceType::FixedSmall => Kernel::fixed(mean, f64::from(fp32::sqrt(posterior))),
            VarianceType::FixedSmallLog => {
                Kernel::fixed(mean, f64::from(fp32::ln(posterior) * 0.5).exp())
            }
            VarianceType::FixedLarge => Kernel::fixed(mean, f64::from(fp32::sqrt(current_beta))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::betas::alphas_cumprod;
    use crate::sampling::config::SchedulerKind;
    use tch::{Device, Kind};

    #[test]
    fn each_step_goes_to_the_next_listed_timestep_and_the_last_to_the_clean_sample() {
        let c = SchedulerConfig::new(SchedulerKind::Ddpm);
        let d = Ddpm::new(&c, vec![999.0, 500.0, 0.0]);
        assert_eq!(d.prev_timesteps, [500, 0, -1]);
        assert!(d.draws_noise(1) && !d.draws_noise(2));
    }

    #[test]
    fn learned_range_spans_the_fixed_small_and_fixed_large_variances() {
        let mut c = SchedulerConfig::new(SchedulerKind::Ddpm);
        c.clip_sample = false;
        let ac = alphas_cumprod(&c);
        let x = Tensor::ones([1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let std_for = |v: f64, variance_type: VarianceType| {
            let mut c = c.clone();
            c.variance_type = variance_type;
            let d = Ddpm::new(&c, vec![600.0, 300.0]);
            let out = if variance_type == VarianceType::LearnedRange {
                Tensor::cat(&[x.zeros_like(), x.full_like(v)], 1)
            } else {
                x.zeros_like()
            };
            let k = d.transition(&ac, 0, &x, &out);
            match k.learned_std {
                Some(s) => s.mean(Kind::Float).double_value(&[]),
                None => k.std,
            }
        };
        let small = std_for(0.0, VarianceType::FixedSmall);
        let large = std_for(0.0, VarianceType::FixedLarge);
        assert!(small < large);
        assert!((std_for(-1.0, VarianceType::LearnedRange) - small).abs() < 1e-6 * small);
        assert!((std_for(1.0, VarianceType::LearnedRange) - large).abs() < 1e-6 * large);
    }
}
