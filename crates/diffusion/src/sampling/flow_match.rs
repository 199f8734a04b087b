//! diffusers' `FlowMatchEulerDiscreteScheduler` (SD3 / SD3.5, FLUX, Z-Image) and the two
//! stochastic transition kernels PSO trains flow models with (docs/method.md §2.6).
//!
//! Rectified flow: x_σ = (1 − σ)·x0 + σ·ε with σ from 1 (noise) to 0 (data), the model predicts
//! the velocity v = ε − x0, and one Euler step is x_{σ'} = x_σ + (σ' − σ)·v. The σ schedule is
//! diffusers' to the float: the training sigmas shifted by `shift` (or, with
//! `use_dynamic_shifting`, by the image-size-dependent `mu` of the pipeline), optionally
//! stretched to `shift_terminal`, and a final σ = 0.

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::kernel::Kernel;
use super::SamplingError;

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// `scheduler_config.json` of a flow-matching model, as diffusers reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchConfig {
    /// Training timesteps N (σ = t / N).
    pub num_train_timesteps: u32,
    /// Static shift of the sigmas: σ ↦ shift·σ / (1 + (shift − 1)·σ).
    pub shift: f64,
    /// Shift by the pipeline's `mu` instead (FLUX.1-dev).
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len` tokens.
    pub max_shift: f64,
    /// Token count where `mu` = `base_shift`.
    pub base_image_seq_len: u64,
    /// Token count where `mu` = `max_shift`.
    pub max_image_seq_len: u64,
    /// Stretch the shifted schedule so that its last σ is this.
    pub shift_terminal: Option<f64>,
    /// `exponential` or `linear` dynamic shifting.
    pub time_shift_type: String,
    /// Not supported: 1 − σ schedules.
    pub invert_sigmas: bool,
    /// Not supported: Karras sigmas.
    pub use_karras_sigmas: bool,
    /// Not supported: exponential sigmas.
    pub use_exponential_sigmas: bool,
    /// Not supported: beta sigmas.
    pub use_beta_sigmas: bool,
    /// Not supported: diffusers' own stochastic sampling (the kernels below replace it).
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            shift_terminal: None,
            time_shift_type: "exponential".into(),
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchConfig {
    /// Parses `scheduler_config.json` text.
    pub fn from_json(text: &str) -> Result<FlowMatchConfig, SamplingError> {
        let config: FlowMatchConfig =
            serde_json::from_str(text).map_err(|e| SamplingError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses what this scheduler does not implement, naming the key.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        for (key, on) in unsupported {
            if on {
                return Err(SamplingError::Config {
                    key,
                    why: "is true, which no distilled flow model pso supports uses; set it to \
                          false"
                        .into(),
                });
            }
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(SamplingError::Config {
                key: "shift",
                why: format!("is {}; it must be a positive number", self.shift),
            });
        }
        if self.num_train_timesteps < 2 {
            return Err(SamplingError::Config {
                key: "num_train_timesteps",
                why: format!("is {}; it must be at least 2", self.num_train_timesteps),
            });
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(SamplingError::Config {
                key: "time_shift_type",
                why: format!(
                    "is {:?}; use \"exponential\" or \"linear\"",
                    self.time_shift_type
                ),
            });
        }
        if let Some(t) = self.shift_terminal {
            if !(0.0..1.0).contains(&t) {
                return Err(SamplingError::Config {
                    key: "shift_terminal",
                    why: format!("is {t}; it must be in [0, 1)"),
                });
            }
        }
        Ok(())
    }

    /// The FLUX pipelines' `calculate_shift`: `mu` linear in the number of image tokens
    /// (`image_seq_len` = packed latent height × width).
    pub fn mu(&self, image_seq_len: u64) -> f64 {
        let slope = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let intercept = self.base_shift - slope * self.base_image_seq_len as f64;
        image_seq_len as f64 * slope + intercept
    }

    /// The shift of one σ, in fp64 (diffusers' numpy path for `set_timesteps(n)`).
    /// The σ of training timestep index t = 0 … N−1 (least noisy first), as the scheduler's
    /// constructor sets them and diffusers' training scripts noise with: (t + 1) / N, shifted
    /// by `shift` unless the model shifts dynamically, in fp32.
    pub fn training_sigmas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps as f32;
        (1..=self.num_train_timesteps)
            .map(|t| {
                let sigma = t as f32 / n;
                let shifted = if self.use_dynamic_shifting {
                    sigma
                } else {
                    self.shift32(None, sigma)
                };
                f64::from(shifted)
            })
            .collect()
    }

    fn shift64(&self, mu: Option<f64>, sigma: f64) -> f64 {
        match mu {
            Some(mu) if self.use_dynamic_shifting => {
                let factor = if self.time_shift_type == "linear" {
                    mu
                } else {
                    mu.exp()
                };
                factor / (factor + (1.0 / sigma - 1.0))
            }
            _ => self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma),
        }
    }

    /// The same in fp32 (its path for `set_timesteps(sigmas=…)`, an fp32 array, and for the
    /// training sigmas of `__init__`): every operation rounds to fp32, constants computed in
    /// fp64 first as Python does.
    fn shift32(&self, mu: Option<f64>, sigma: f32) -> f32 {
        match mu {
            Some(mu) if self.use_dynamic_shifting => {
                let factor = if self.time_shift_type == "linear" {
                    mu as f32
                } else {
                    mu.exp() as f32
                };
                factor / (factor + (1.0 / sigma - 1.0))
            }
            _ => {
                let shift = self.shift as f32;
                shift * sigma / (1.0 + (self.shift - 1.0) as f32 * sigma)
            }
        }
    }
}

/// Where the sigmas of a sampling run come from.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowSchedule {
    /// diffusers' `set_timesteps(n)` (the SD3 pipelines): n timesteps spaced linearly between
    /// the training schedule's largest and smallest σ, then shifted.
    Steps(usize),
    /// `set_timesteps(sigmas=…)` (the FLUX pipelines pass linspace(1, 1/n, n)), then shifted.
    Sigmas(Vec<f64>),
}

/// How a step moves, read as a Gaussian transition kernel (docs/method.md §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FlowKernel {
    /// diffusers' own deterministic Euler step x_{σ'} = x + (σ' − σ)·v (std 0): what the
    /// pipelines sample with, and no likelihood to train on.
    #[default]
    Ode,
    /// The distilled samplers' re-noising: x_{σ'} = (1 − σ')·x̂0 + σ'·ε with x̂0 = x − σ·v, a
    /// Gaussian of mean (1 − σ')·x̂0 and std σ' (deterministic at σ' = 0).
    Renoise,
    /// Flow-GRPO's SDE form of the flow ODE, with noise level `a`:
    /// s_σ = a·sqrt(σ / (1 − σ)) (σ = 1 read as σ_1), mean
    /// x·(1 + s_σ²·dt / 2σ) + v·(1 + s_σ²·(1 − σ) / 2σ)·dt and std s_σ·sqrt(−dt), dt = σ' − σ.
    Sde {
        /// The noise level a (Flow-GRPO's default 0.7).
        noise_level: f64,
    },
}

/// A `FlowMatchEulerDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    config: FlowMatchConfig,
    /// σ per step and the final 0 (diffusers' `scheduler.sigmas`), fp32 values.
    pub sigmas: Vec<f64>,
    /// σ·N per step (diffusers' `scheduler.timesteps`), what the transformer is given.
    pub timesteps: Vec<f64>,
}

impl FlowMatchEuler {
    /// diffusers' `FlowMatchEulerDiscreteScheduler(**config).set_timesteps(…, mu=mu)`; `mu` is
    /// required exactly when the config shifts dynamically.
    pub fn new(
        config: FlowMatchConfig,
        schedule: FlowSchedule,
        mu: Option<f64>,
    ) -> Result<FlowMatchEuler, SamplingError> {
        config.validate()?;
        let bad = |why: String| SamplingError::Timesteps {
            scheduler: CLASS,
            why,
        };
        if config.use_dynamic_shifting && mu.is_none() {
            return Err(bad(
                "use_dynamic_shifting is on: give mu (the pipeline's calculate_shift of the \
                 image's token count)"
                    .into(),
            ));
        }
        let n = config.num_train_timesteps as f32;
        let terminal = config.shift_terminal;
        let shifted: Vec<f32> = match &schedule {
            FlowSchedule::Steps(0) => return Err(bad("0 steps; use at least 1".into())),
            FlowSchedule::Steps(steps) => {
                // __init__'s training sigmas t/N (fp32), statically shifted unless dynamic;
                // set_timesteps spaces σ·N linearly between the first and last (numpy fp64).
                let (first, last) = (1.0f32, 1.0 / n);
                let (hi, lo) = if config.use_dynamic_shifting {
                    (first, last)
                } else {
                    (config.shift32(None, first), config.shift32(None, last))
                };
                let n64 = f64::from(n);
                let sigmas: Vec<f64> = linspace(f64::from(hi) * n64, f64::from(lo) * n64, *steps)
                    .into_iter()
                    .map(|t| config.shift64(mu, t / n64))
                    .collect();
                let sigmas = match terminal {
                    Some(t) => {
                        let scale = (1.0 - sigmas[sigmas.len() - 1]) / (1.0 - t);
                        sigmas.iter().map(|s| 1.0 - (1.0 - s) / scale).collect()
                    }
                    None => sigmas,
                };
                sigmas.into_iter().map(|s| s as f32).collect()
            }
            FlowSchedule::Sigmas(list) => {
                if list.is_empty()
                    || list.iter().any(|&s| !(s > 0.0 && s <= 1.0))
                    || list.windows(2).any(|w| w[1] >= w[0])
                {
                    return Err(bad(format!(
                        "sigmas {list:?} must be one or more values falling strictly, within \
                         (0, 1]"
                    )));
                }
                let sigmas: Vec<f32> = list.iter().map(|&s| config.shift32(mu, s as f32)).collect();
                match terminal {
                    Some(t) => {
                        let scale = (1.0 - sigmas[sigmas.len() - 1]) / (1.0 - t) as f32;
                        sigmas.iter().map(|s| 1.0 - (1.0 - s) / scale).collect()
                    }
                    None => sigmas,
                }
            }
        };
        let timesteps = shifted.iter().map(|&s| f64::from(s * n)).collect();
        let mut sigmas: Vec<f64> = shifted.iter().map(|&s| f64::from(s)).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler {
            config,
            sigmas,
            timesteps,
        })
    }

    /// The config.
    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    /// Number of denoising steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn check(&self, step: usize) -> Result<(f64, f64), SamplingError> {
        if step >= self.num_steps() {
            return Err(SamplingError::Step(format!(
                "step {step} of a {}-step flow-matching schedule",
                self.num_steps()
            )));
        }
        Ok((self.sigmas[step], self.sigmas[step + 1]))
    }

    /// diffusers' deterministic `step`: x + (σ' − σ)·v, in fp32.
    pub fn step(
        &self,
        step: usize,
        sample: &Tensor,
        velocity: &Tensor,
    ) -> Result<Tensor, SamplingError> {
        let (sigma, next) = self.check(step)?;
        let dt = (next as f32 - sigma as f32) as f64;
        Ok(sample.to_kind(Kind::Float) + velocity.to_kind(Kind::Float) * dt)
    }

    /// Whether step `step` under `kind` adds noise (its kernel std is positive).
    pub fn draws_noise(&self, step: usize, kind: FlowKernel) -> bool {
        match kind {
            FlowKernel::Ode => false,
            FlowKernel::Renoise => self.sigmas.get(step + 1).is_some_and(|&s| s > 0.0),
            FlowKernel::Sde { .. } => step < self.num_steps(),
        }
    }

    /// Step `step` as the Gaussian kernel `kind` (mean differentiable in `velocity`, fp32).
    pub fn transition(
        &self,
        step: usize,
        sample: &Tensor,
        velocity: &Tensor,
        kind: FlowKernel,
    ) -> Result<Kernel, SamplingError> {
        let (sigma, next) = self.check(step)?;
        let (x, v) = (sample.to_kind(Kind::Float), velocity.to_kind(Kind::Float));
        match kind {
            FlowKernel::Ode => Ok(Kernel::fixed(self.step(step, &x, &v)?, 0.0)),
            FlowKernel::Renoise => {
                let x0 = &x - &v * sigma;
                Ok(Kernel::fixed(x0 * (1.0 - next), next))
            }
            FlowKernel::Sde { noise_level } => {
                if !(noise_level.is_finite() && noise_level > 0.0) {
                    return Err(SamplingError::Step(format!(
                        "the SDE kernel's noise level is {noise_level}; it must be positive"
                    )));
                }
                // σ = 1 would divide by zero: Flow-GRPO reads it as the second σ of the schedule.
                let sigma_max = self.sigmas[1.min(self.sigmas.len() - 1)];
                let guarded = if sigma == 1.0 { sigma_max } else { sigma };
                let level = (sigma / (1.0 - guarded)).sqrt() * noise_level;
                let dt = next - sigma;
                let mean = &x * (1.0 + level * level / (2.0 * sigma) * dt)
                    + &v * ((1.0 + level * level * (1.0 - sigma) / (2.0 * sigma)) * dt);
                Ok(Kernel::fixed(mean, level * (-dt).sqrt()))
            }
        }
    }
}

/// numpy's `linspace(start, stop, num)` (fp64; the last value exactly `stop`).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_schnell_and_sd3_schedules_are_diffusers() {
        // FLUX.1-schnell: no shift, sigmas linspace(1, 1/4, 4).
        let schnell = FlowMatchEuler::new(
            FlowMatchConfig::default(),
            FlowSchedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25]),
            None,
        )
        .unwrap();
        assert_eq!(schnell.sigmas, [1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(schnell.timesteps, [1000.0, 750.0, 500.0, 250.0]);
        // SD3 with shift 3: σ = 3s / (1 + 2s), the first step at σ = 1.
        let sd3 = FlowMatchEuler::new(
            FlowMatchConfig {
                shift: 3.0,
                ..Default::default()
            },
            FlowSchedule::Steps(4),
            None,
        )
        .unwrap();
        assert_eq!(sd3.sigmas[0], 1.0);
        assert_eq!(sd3.sigmas.len(), 5);
        assert!(sd3.sigmas.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn unusable_configs_and_schedules_name_the_key() {
        let e = FlowMatchConfig::from_json(r#"{"use_karras_sigmas": true}"#).unwrap_err();
        assert!(e.to_string().contains("use_karras_sigmas"), "{e}");
        let dynamic = FlowMatchConfig {
            use_dynamic_shifting: true,
            ..Default::default()
        };
        let e = FlowMatchEuler::new(dynamic, FlowSchedule::Steps(4), None).unwrap_err();
        assert!(e.to_string().contains("give mu"), "{e}");
        let e = FlowMatchEuler::new(
            FlowMatchConfig::default(),
            FlowSchedule::Sigmas(vec![0.5, 0.75]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("falling strictly"), "{e}");
    }

    /// The re-noise kernel at the last step (σ' = 0) is the deterministic x̂0 = x − σ·v.
    #[test]
    fn the_renoise_kernel_is_deterministic_at_the_end() {
        let s = FlowMatchEuler::new(
            FlowMatchConfig::default(),
            FlowSchedule::Sigmas(vec![1.0, 0.5]),
            None,
        )
        .unwrap();
        let x = Tensor::from_slice(&[1.0f32, -2.0]);
        let v = Tensor::from_slice(&[0.5f32, 0.25]);
        let k = s.transition(1, &x, &v, FlowKernel::Renoise).unwrap();
        assert_eq!(k.std, 0.0);
        let mean = Vec::<f32>::try_from(&k.mean).unwrap();
        assert_eq!(mean, [0.75, -2.125]);
        let k = s.transition(0, &x, &v, FlowKernel::Renoise).unwrap();
        assert_eq!(k.std, 0.5);
        assert_eq!(Vec::<f32>::try_from(&k.mean).unwrap(), [0.25, -1.125]);
    }
}
