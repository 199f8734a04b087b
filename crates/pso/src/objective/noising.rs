//! The forward process and regression targets of the offline objectives (Diffusion-DPO, offline
//! PSO, `pso_db`, SFT), as diffusers' `DDPMScheduler.add_noise` / `get_velocity` compute them.
//!
//! x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε is the model input for every scheduler family: for the Euler
//! family (σ-space, x = x0 + σε) it equals `scale_model_input(x) = x/sqrt(σ²+1)`. The target is
//! what the model predicts: ε, v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 (diffusers' `get_velocity`, as
//! its training scripts use for `v_prediction`), or x0.

use tch::{Kind, Tensor};

use super::{check_alike, ObjectiveError};
use diffusion::sampling::betas::alphas_cumprod;
use diffusion::sampling::{PredictionType, SchedulerConfig, SchedulerKind};

/// ᾱ of the training forward process for a model's scheduler config: DDPM's (a training
/// schedule has no Euler σ cap), rescaled to zero terminal SNR (ᾱ_{N−1} = 0) when
/// `zero_terminal_snr`, as Diffusion-DPO's `train.py` does for Turbo models (l. 480–505).
pub fn training_alphas_cumprod(config: &SchedulerConfig, zero_terminal_snr: bool) -> Vec<f64> {
    let mut config = config.clone();
    config.kind = SchedulerKind::Ddpm;
    config.rescale_betas_zero_snr |= zero_terminal_snr;
    alphas_cumprod(&config)
}

/// The images of a batch of pairs noised with a shared ε at a shared timestep, and their targets.
#[derive(Debug)]
pub struct NoisedPair {
    /// Model input for the winners (training images for `pso_db`).
    pub noisy_winner: Tensor,
    /// Model input for the losers (reference images for `pso_db`).
    pub noisy_loser: Tensor,
    /// Regression target of the winners.
    pub target_winner: Tensor,
    /// Regression target of the losers.
    pub target_loser: Tensor,
}

/// (sqrt(ᾱ_t), sqrt(1−ᾱ_t)) per sample, [B, 1, …, 1] in `like`'s dtype and device; ᾱ is held in
/// fp32 and cast to the sample dtype as diffusers does.
fn coefficients(
    like: &Tensor,
    timesteps: &[u32],
    alphas_cumprod: &[f64],
) -> Result<(Tensor, Tensor), ObjectiveError> {
    let err = |why: String| ObjectiveError::Input {
        objective: "add_noise",
        why,
    };
    let batch = like.size()[0] as usize;
    if timesteps.len() != batch {
        return Err(err(format!(
            "{} timesteps for a batch of {batch}; give one timestep per sample",
            timesteps.len()
        )));
    }
    let alphas = timesteps
        .iter()
        .map(|&t| {
            alphas_cumprod
                .get(t as usize)
                .map(|&a| a as f32)
                .ok_or_else(|| {
                    err(format!(
                    "timestep {t} is outside the training schedule 0..={}; use a timestep of the \
                     model's scheduler",
                    alphas_cumprod.len().saturating_sub(1)
                ))
                })
        })
        .collect::<Result<Vec<f32>, _>>()?;
    let mut shape = vec![1i64; like.dim()];
    shape[0] = batch as i64;
    let alphas = Tensor::from_slice(&alphas)
        .to_device(like.device())
        .to_kind(like.kind())
        .view(shape.as_slice());
    Ok((alphas.sqrt(), (-&alphas + 1.0).sqrt()))
}

/// x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε per sample (diffusers' `add_noise`).
pub fn add_noise(
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[u32],
    alphas_cumprod: &[f64],
) -> Result<Tensor, ObjectiveError> {
    check_alike("add_noise", &[("x0", x0), ("noise", noise)])?;
    let (sqrt_alpha, sqrt_one_minus) = coefficients(x0, timesteps, alphas_cumprod)?;
    Ok(sqrt_alpha * x0 + sqrt_one_minus * noise)
}

/// The regression target of a model with this prediction type: ε, v or x0.
pub fn regression_target(
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[u32],
    alphas_cumprod: &[f64],
    prediction: PredictionType,
) -> Result<Tensor, ObjectiveError> {
    check_alike("add_noise", &[("x0", x0), ("noise", noise)])?;
    let (sqrt_alpha, sqrt_one_minus) = coefficients(x0, timesteps, alphas_cumprod)?;
    Ok(match prediction {
        PredictionType::Epsilon => noise.shallow_clone(),
        PredictionType::VPrediction => sqrt_alpha * noise - sqrt_one_minus * x0,
        PredictionType::Sample => x0.shallow_clone(),
    })
}

/// Noises winner and loser with the same ε at the same timestep (pair i: row i of each) and
/// builds both targets, as Diffusion-DPO and `pso_db` require.
pub fn noise_pair(
    x0_winner: &Tensor,
    x0_loser: &Tensor,
    noise: &Tensor,
    timesteps: &[u32],
    alphas_cumprod: &[f64],
    prediction: PredictionType,
) -> Result<NoisedPair, ObjectiveError> {
    check_alike(
        "add_noise",
        &[
            ("x0_winner", x0_winner),
            ("x0_loser", x0_loser),
            ("noise", noise),
        ],
    )?;
    let side = |x0: &Tensor| -> Result<(Tensor, Tensor), ObjectiveError> {
        Ok((
            add_noise(x0, noise, timesteps, alphas_cumprod)?,
            regression_target(x0, noise, timesteps, alphas_cumprod, prediction)?,
        ))
    };
    let (noisy_winner, target_winner) = side(x0_winner)?;
    let (noisy_loser, target_loser) = side(x0_loser)?;
    Ok(NoisedPair {
        noisy_winner,
        noisy_loser,
        target_winner,
        target_loser,
    })
}

/// Per-sample mean squared error over every dimension but the batch, in fp32.
pub fn per_sample_mse(prediction: &Tensor, target: &Tensor) -> Tensor {
    let d = prediction.to_kind(Kind::Float) - target.to_kind(Kind::Float);
    super::per_sample_mean(&d.square())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn ac() -> Vec<f64> {
        (0..1000).map(|t| 1.0 - (t as f64 + 1.0) / 1001.0).collect()
    }

    #[test]
    fn v_target_and_noised_sample_recover_x0_and_eps() {
        tch::manual_seed(0);
        let x0 = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu));
        let t = [0, 500, 999];
        let xt = add_noise(&x0, &eps, &t, &ac()).unwrap();
        let v = regression_target(&x0, &eps, &t, &ac(), PredictionType::VPrediction).unwrap();
        let (a, b) = coefficients(&x0, &t, &ac()).unwrap();
        // x0 = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v, the inversion the schedulers use.
        assert!((&a * &xt - &b * &v).allclose(&x0, 1e-5, 1e-5, false));
        let e = regression_target(&x0, &eps, &t, &ac(), PredictionType::Epsilon).unwrap();
        assert!(e.equal(&eps));
        let s = regression_target(&x0, &eps, &t, &ac(), PredictionType::Sample).unwrap();
        assert!(s.equal(&x0));
    }

    #[test]
    fn bad_timesteps_are_refused() {
        let x = Tensor::zeros([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let e = add_noise(&x, &x, &[1, 2, 3], &ac())
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 timesteps for a batch of 2"), "{e}");
        let e = add_noise(&x, &x, &[1, 1000], &ac())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("timestep 1000 is outside the training schedule 0..=999"),
            "{e}"
        );
        let y = Tensor::zeros([2, 4, 2, 3], (Kind::Float, Device::Cpu));
        let e = noise_pair(&x, &y, &x, &[1, 2], &ac(), PredictionType::Epsilon)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x0_loser` has shape [2, 4, 2, 3]"), "{e}");
    }
}
