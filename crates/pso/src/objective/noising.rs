//! The forward process and regression targets of the offline objectives (Diffusion-DPO, offline
//! PSO, `pso_db`, SFT), as diffusers' `DDPMScheduler.add_noise` / `get_velocity` compute them,
//! and for rectified-flow models as diffusers' SD3 / FLUX training scripts do.
//!
//! x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε is the model input for every scheduler family: for the Euler
//! family (σ-space, x = x0 + σε) it equals `scale_model_input(x) = x/sqrt(σ²+1)`. The target is
//! what the model predicts: ε, v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 (diffusers' `get_velocity`, as
//! its training scripts use for `v_prediction`), or x0. A flow model is noised to
//! x_t = (1 − σ_t)·x0 + σ_t·ε and regresses the velocity ε − x0, at model timestep σ_t·N.

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

/// The forward process a model was trained with, indexed by training timestep t = 0 … N−1.
#[derive(Debug, Clone)]
pub enum TrainingSchedule {
    /// Variance-preserving (SD, SDXL, DiT): ᾱ_t, and what the model predicts.
    Vp {
        /// ᾱ_t.
        alphas_cumprod: Vec<f64>,
        /// ε, v or x0.
        prediction: PredictionType,
    },
    /// Rectified flow (SD3, FLUX, Z-Image): σ_t; the model predicts the velocity.
    Flow {
        /// σ_t, rising with t.
        sigmas: Vec<f64>,
    },
}

impl TrainingSchedule {
    /// The schedule of a model's scheduler config: DDPM's ᾱ (see [`training_alphas_cumprod`]),
    /// or the flow scheduler's training σ (zero terminal SNR is built in: σ_{N−1} = 1).
    pub fn of(config: &SchedulerConfig, zero_terminal_snr: bool) -> TrainingSchedule {
        if config.kind.is_flow() {
            TrainingSchedule::Flow {
                sigmas: config.flow.training_sigmas(),
            }
        } else {
            TrainingSchedule::Vp {
                alphas_cumprod: training_alphas_cumprod(config, zero_terminal_snr),
                prediction: config.prediction_type,
            }
        }
    }

    /// N, the number of training timesteps.
    pub fn len(&self) -> usize {
        match self {
            TrainingSchedule::Vp { alphas_cumprod, .. } => alphas_cumprod.len(),
            TrainingSchedule::Flow { sigmas } => sigmas.len(),
        }
    }

    /// Whether the schedule has no timesteps.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// ᾱ of a variance-preserving schedule (what the learned-variance VLB needs).
    pub fn alphas_cumprod(&self) -> Option<&[f64]> {
        match self {
            TrainingSchedule::Vp { alphas_cumprod, .. } => Some(alphas_cumprod),
            TrainingSchedule::Flow { .. } => None,
        }
    }

    /// The prediction type of a variance-preserving model.
    pub fn prediction(&self) -> Option<PredictionType> {
        match self {
            TrainingSchedule::Vp { prediction, .. } => Some(*prediction),
            TrainingSchedule::Flow { .. } => None,
        }
    }

    /// The timestep the model is given for training timestep `t`: t itself, or σ_t·N for a
    /// flow model (as its scheduler's `timesteps`).
    pub fn model_timestep(&self, t: u32) -> f32 {
        match self {
            TrainingSchedule::Vp { .. } => t as f32,
            TrainingSchedule::Flow { sigmas } => sigmas
                .get(t as usize)
                .map_or(f32::NAN, |&s| s as f32 * sigmas.len() as f32),
        }
    }

    /// The training timestep nearest to a sampler's model timestep (the distilled schedule as
    /// training indices).
    pub fn index_of(&self, model_timestep: f64) -> u32 {
        match self {
            // The sampler's integral (LCM, DDIM) or fractional (Euler) timestep, truncated.
            TrainingSchedule::Vp { alphas_cumprod, .. } => {
                (model_timestep.max(0.0) as u32).min(alphas_cumprod.len() as u32 - 1)
            }
            TrainingSchedule::Flow { sigmas } => {
                let n = sigmas.len() as f64;
                let distance = |s: f64| (s * n - model_timestep).abs();
                (0..sigmas.len())
                    .min_by(|&a, &b| distance(sigmas[a]).total_cmp(&distance(sigmas[b])))
                    .unwrap_or(0) as u32
            }
        }
    }

    /// The model's timestep input for training timesteps `ts` on `device`: the integers (i64)
    /// for a variance-preserving model, σ_t·N (fp32) for a flow model.
    pub fn timestep_tensor(&self, ts: &[u32], device: tch::Device) -> Tensor {
        match self {
            TrainingSchedule::Vp { .. } => {
                let t: Vec<i64> = ts.iter().map(|&t| i64::from(t)).collect();
                Tensor::from_slice(&t).to_device(device)
            }
            TrainingSchedule::Flow { .. } => {
                let t: Vec<f32> = ts.iter().map(|&t| self.model_timestep(t)).collect();
                Tensor::from_slice(&t).to_device(device)
            }
        }
    }

    /// x_t per sample: `add_noise`, or (1 − σ_t)·x0 + σ_t·ε.
    pub fn add_noise(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
    ) -> Result<Tensor, ObjectiveError> {
        match self {
            TrainingSchedule::Vp { alphas_cumprod, .. } => {
                add_noise(x0, noise, timesteps, alphas_cumprod)
            }
            TrainingSchedule::Flow { sigmas } => {
                check_alike("add_noise", &[("x0", x0), ("noise", noise)])?;
                let sigma = per_sample(x0, timesteps, sigmas)?;
                Ok((-&sigma + 1.0) * x0 + sigma * noise)
            }
        }
    }

    /// The regression target: by prediction type, or the velocity ε − x0.
    pub fn target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
    ) -> Result<Tensor, ObjectiveError> {
        match self {
            TrainingSchedule::Vp {
                alphas_cumprod,
                prediction,
            } => regression_target(x0, noise, timesteps, alphas_cumprod, *prediction),
            TrainingSchedule::Flow { sigmas } => {
                check_alike("add_noise", &[("x0", x0), ("noise", noise)])?;
                // The timesteps are checked as for x_t, though the velocity does not use σ.
                per_sample(x0, timesteps, sigmas).map(|_| noise - x0)
            }
        }
    }
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
    let alphas = per_sample(like, timesteps, alphas_cumprod)?;
    Ok((alphas.sqrt(), (-&alphas + 1.0).sqrt()))
}

/// `table[t]` per sample, [B, 1, …, 1] in `like`'s dtype and device, held in fp32 first (as
/// diffusers' schedule tensors); an error naming a timestep outside the table.
fn per_sample(like: &Tensor, timesteps: &[u32], table: &[f64]) -> Result<Tensor, ObjectiveError> {
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
    let values = timesteps
        .iter()
        .map(|&t| {
            table.get(t as usize).map(|&a| a as f32).ok_or_else(|| {
                err(format!(
                    "timestep {t} is outside the training schedule 0..={}; use a timestep of the \
                     model's scheduler",
                    table.len().saturating_sub(1)
                ))
            })
        })
        .collect::<Result<Vec<f32>, _>>()?;
    let mut shape = vec![1i64; like.dim()];
    shape[0] = batch as i64;
    Ok(Tensor::from_slice(&values)
        .to_device(like.device())
        .to_kind(like.kind())
        .view(shape.as_slice()))
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
    schedule: &TrainingSchedule,
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
            schedule.add_noise(x0, noise, timesteps)?,
            schedule.target(x0, noise, timesteps)?,
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
        let vp = TrainingSchedule::Vp {
            alphas_cumprod: ac(),
            prediction: PredictionType::Epsilon,
        };
        let e = noise_pair(&x, &y, &x, &[1, 2], &vp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x0_loser` has shape [2, 4, 2, 3]"), "{e}");
    }

    #[test]
    fn flow_noising_interpolates_to_the_noise_and_targets_the_velocity() {
        let mut config = SchedulerConfig::new(SchedulerKind::FlowMatchEuler);
        config.flow.shift = 3.0;
        let schedule = TrainingSchedule::of(&config, false);
        let TrainingSchedule::Flow { sigmas } = &schedule else {
            panic!("a flow config gives a flow schedule");
        };
        // σ_t = shift·s / (1 + (shift − 1)·s) with s = (t + 1) / N: SD3's training sigmas.
        assert_eq!(sigmas.len(), 1000);
        assert!((sigmas[999] - 1.0).abs() < 1e-7);
        assert!((sigmas[0] - 0.003 / 1.002).abs() < 1e-7, "{}", sigmas[0]);
        assert!((schedule.model_timestep(999) - 1000.0).abs() < 1e-3);
        assert_eq!(schedule.index_of(1000.0), 999);
        assert_eq!(
            schedule.index_of(f64::from(schedule.model_timestep(500))),
            500
        );
        tch::manual_seed(1);
        let x0 = Tensor::randn([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let t = [999, 400];
        let xt = schedule.add_noise(&x0, &eps, &t).unwrap();
        assert!(xt.get(0).allclose(&eps.get(0), 1e-6, 1e-6, false));
        let v = schedule.target(&x0, &eps, &t).unwrap();
        assert!(v.equal(&(&eps - &x0)));
        // The Euler step from x_t with the true velocity lands on x0.
        let s = sigmas[400] as f32 as f64;
        assert!((xt.get(1) - v.get(1) * s).allclose(&x0.get(1), 1e-5, 1e-5, false));
        assert!(schedule.add_noise(&x0, &eps, &[1000, 0]).is_err());
    }
}
