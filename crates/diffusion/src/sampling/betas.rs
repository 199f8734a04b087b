//! The training noise schedule: betas and ᾱ (`alphas_cumprod`), as every diffusers scheduler's
//! constructor builds them.
//!
//! The arithmetic runs in libtorch fp32 with the same operations diffusers uses, so the ᾱ values
//! are bit-identical to diffusers' and the sampler's σ and timesteps match it exactly.

use tch::{Device, Kind, Tensor};

use super::config::{BetaSchedule, SchedulerConfig, SchedulerKind};

/// ᾱ(t) of improved DDPM's cosine schedule.
fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
        .cos()
        .powi(2)
}

/// The betas of the config (before zero-SNR rescaling), fp32.
fn betas(config: &SchedulerConfig) -> Tensor {
    let n = config.num_train_timesteps as i64;
    let opts = (Kind::Float, Device::Cpu);
    if let Some(b) = &config.trained_betas {
        return Tensor::from_slice(b).to_kind(Kind::Float);
    }
    match config.beta_schedule {
        BetaSchedule::Linear => Tensor::linspace(config.beta_start, config.beta_end, n, opts),
        BetaSchedule::ScaledLinear => {
            Tensor::linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n, opts)
                .pow_tensor_scalar(2)
        }
        BetaSchedule::SquaredcosCapV2 => {
            let n = config.num_train_timesteps;
            let b: Vec<f64> = (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1)).min(0.999)
                })
                .collect();
            Tensor::from_slice(&b).to_kind(Kind::Float)
        }
    }
}

/// Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas_cumprod = (-betas + 1.0).cumprod(0, Kind::Float);
    let sqrt = alphas_cumprod.sqrt();
    let first = sqrt.get(0);
    let last = sqrt.get(-1);
    let sqrt = (&sqrt - &last) * (&first / (&first - &last));
    let alphas_bar = sqrt.square();
    let n = alphas_bar.size()[0];
    let alphas = Tensor::cat(
        &[
            alphas_bar.narrow(0, 0, 1),
            alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1),
        ],
        0,
    );
    1.0 - alphas
}

/// ᾱ_t for t = 0 … N−1, as fp32 values widened to f64.
pub fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let mut betas = betas(config);
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas_cumprod = (-betas + 1.0).cumprod(0, Kind::Float);
    let mut values: Vec<f64> = Vec::<f32>::try_from(&alphas_cumprod)
        .expect("a 1-D fp32 CPU tensor converts to Vec<f32>")
        .into_iter()
        .map(f64::from)
        .collect();
    // Euler keeps σ_T finite with zero terminal SNR; the other schedulers keep ᾱ_T = 0.
    if config.rescale_betas_zero_snr && config.kind == SchedulerKind::Euler {
        *values.last_mut().expect("num_train_timesteps ≥ 2") = 2f64.powi(-24);
    }
    values
}

/// σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for t = 0 … N−1, computed on the fp32 vector as diffusers does.
pub fn sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    let ac = Tensor::from_slice(alphas_cumprod).to_kind(Kind::Float);
    let sigmas = ((-&ac + 1.0) / &ac).sqrt();
    Vec::<f32>::try_from(&sigmas)
        .expect("a 1-D fp32 CPU tensor converts to Vec<f32>")
        .into_iter()
        .map(f64::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_linear_matches_stable_diffusion_endpoints() {
        let mut c = SchedulerConfig::new(SchedulerKind::Euler);
        c.beta_schedule = BetaSchedule::ScaledLinear;
        c.beta_start = 0.00085;
        c.beta_end = 0.012;
        let a = alphas_cumprod(&c);
        assert_eq!(a.len(), 1000);
        assert!((a[0] - (1.0 - 0.00085)).abs() < 1e-7, "{}", a[0]);
        // Stable Diffusion's well-known ᾱ_999 ≈ 0.00466, σ_max ≈ 14.61.
        assert!((a[999] - 0.004_660_5).abs() < 1e-6, "{}", a[999]);
        assert!((sigmas(&a)[999] - 14.6146).abs() < 1e-3);
    }

    #[test]
    fn zero_snr_rescaling_ends_at_zero_and_euler_caps_it() {
        let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
        c.rescale_betas_zero_snr = true;
        assert!(alphas_cumprod(&c)[999].abs() < 1e-9);
        c.kind = SchedulerKind::Euler;
        assert_eq!(alphas_cumprod(&c)[999], 2f64.powi(-24));
    }

    #[test]
    fn cosine_and_trained_betas() {
        let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
        c.beta_schedule = BetaSchedule::SquaredcosCapV2;
        let a = alphas_cumprod(&c);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
        c.trained_betas = Some(vec![0.5; 1000]);
        let a = alphas_cumprod(&c);
        assert_eq!((a[0], a[1]), (0.5, 0.25));
    }
}
