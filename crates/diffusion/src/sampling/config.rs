//! The scheduler config: a diffusers `scheduler/scheduler_config.json`, read with serde.
//!
//! Keys this crate does not use are ignored, as diffusers ignores keys of other schedulers. Keys
//! whose default differs between scheduler classes (beta schedule, spacing, clipping) take the
//! default of the class named by `_class_name`, exactly as diffusers' constructors do. Every
//! field is public so that a caller can override it (spacing, prediction type, η) after parsing.

use serde::{Deserialize, Serialize};

use super::flow_match::{FlowKernel, FlowMatchConfig};
use super::SamplingError;

/// Which diffusers scheduler class the config describes; a run config's `sampler.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `LCMScheduler`.
    Lcm,
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler`.
    Ddpm,
    /// `FlowMatchEulerDiscreteScheduler` (SD3 / SD3.5, FLUX): its keys are in
    /// [`SchedulerConfig::flow`], its kernel in [`SchedulerConfig::flow_kernel`].
    FlowMatchEuler,
}

impl SchedulerKind {
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::FlowMatchEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// Every kind.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Lcm,
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::FlowMatchEuler,
    ];

    /// The name a run config's `sampler.name` and `pso sample --sampler` use.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::FlowMatchEuler => "flow_match_euler",
        }
    }

    /// Whether it is the flow-matching scheduler (rectified-flow models predict a velocity).
    pub fn is_flow(self) -> bool {
        self == SchedulerKind::FlowMatchEuler
    }

    /// Parses a run config's `sampler.name` (`euler`, `euler_ancestral`, `lcm`, `ddim`, `ddpm`,
    /// `flow_match_euler`).
    pub fn from_name(name: &str) -> Result<SchedulerKind, SamplingError> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| SamplingError::UnknownScheduler(name.to_owned()))
    }

    /// Parses a diffusers class name.
    pub fn from_class_name(name: &str) -> Result<SchedulerKind, SamplingError> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.class_name() == name)
            .ok_or_else(|| SamplingError::UnknownScheduler(name.to_owned()))
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0.
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// How inference timesteps are spread over the training timesteps (Lin et al. 2023, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from 0 to N−1, both ends included.
    Linspace,
    /// Multiples of N/steps from 0, plus `steps_offset`.
    Leading,
    /// Multiples of N/steps counted down from N, minus one (always includes N−1).
    Trailing,
}

/// How the betas of the training schedule are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in β.
    Linear,
    /// Linear in sqrt(β) (Stable Diffusion).
    ScaledLinear,
    /// The cosine ᾱ schedule of improved DDPM, β capped at 0.999.
    SquaredcosCapV2,
}

/// What the Euler scheduler feeds the model as timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// The (possibly fractional) training timestep.
    Discrete,
    /// 0.25·ln σ (EDM-style v-prediction models only, as in diffusers).
    Continuous,
}

/// The σ after the last Euler step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// σ = 0: the last step lands on the clean sample.
    Zero,
    /// σ of training timestep 0.
    SigmaMin,
}

/// The variance DDPM's ancestral step adds (diffusers' `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance β̃_t = (1 − ᾱ_{t'})/(1 − ᾱ_t)·β_t.
    FixedSmall,
    /// β̃_t, through its logarithm.
    FixedSmallLog,
    /// β_t.
    FixedLarge,
    /// Interpolated in log space between β̃_t and β_t by the model's extra output channels.
    LearnedRange,
}

impl VarianceType {
    /// Whether the model predicts it (and so outputs twice the latent channels).
    pub fn is_learned(self) -> bool {
        self == VarianceType::LearnedRange
    }
}

/// A resolved scheduler config: every diffusers default filled in for its class.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The scheduler class.
    pub kind: SchedulerKind,
    /// Number of training timesteps N.
    pub num_train_timesteps: usize,
    /// First β of the `linear` / `scaled_linear` schedules.
    pub beta_start: f64,
    /// Last β of the `linear` / `scaled_linear` schedules.
    pub beta_end: f64,
    /// How the betas are made (ignored when `trained_betas` is set).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, one per training timestep.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023, Algorithm 1).
    pub rescale_betas_zero_snr: bool,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Timestep spacing (LCM ignores it, as in diffusers).
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (the other spacings ignore it, as in diffusers).
    pub steps_offset: i64,
    /// Euler only: the timestep given to the model.
    pub timestep_type: TimestepType,
    /// Euler only: the σ after the last step.
    pub final_sigmas_type: FinalSigmasType,
    /// LCM only: length of the distillation schedule the inference timesteps are taken from.
    pub original_inference_steps: usize,
    /// LCM only: timestep scale of the consistency boundary condition.
    pub timestep_scaling: f64,
    /// LCM, DDIM and DDPM: clamp the predicted x0 to ±`clip_sample_range`.
    pub clip_sample: bool,
    /// LCM, DDIM and DDPM: the clamp bound.
    pub clip_sample_range: f64,
    /// LCM and DDIM: use ᾱ = 1 (instead of ᾱ_0) after the last timestep.
    pub set_alpha_to_one: bool,
    /// DDIM only: η of the DDIM step (0 = deterministic). Not a diffusers config key but an
    /// argument of its `step`, so it defaults to 0 and is set by the caller.
    pub eta: f64,
    /// DDPM only: the variance of the ancestral step.
    pub variance_type: VarianceType,
    /// Flow matching only: the keys of a `FlowMatchEulerDiscreteScheduler` config.
    pub flow: FlowMatchConfig,
    /// Flow matching only: how a step moves (like η, set by the caller: the pipelines' ODE step
    /// by default, a stochastic kernel for PSO).
    pub flow_kernel: FlowKernel,
}

/// The JSON as written by diffusers; `None` means "the class default".
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    rescale_betas_zero_snr: Option<bool>,
    prediction_type: Option<String>,
    timestep_spacing: Option<String>,
    steps_offset: Option<i64>,
    timestep_type: Option<String>,
    final_sigmas_type: Option<String>,
    interpolation_type: Option<String>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    original_inference_steps: Option<usize>,
    timestep_scaling: Option<f64>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    thresholding: Option<bool>,
    variance_type: Option<String>,
}

/// Parses a string-valued enum key with serde, naming the key and the accepted values on error.
fn enum_key<T: for<'de> Deserialize<'de>>(
    key: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, SamplingError> {
    match value {
        None => Ok(default),
        Some(v) => serde_json::from_value(serde_json::Value::String(v)).map_err(|e| {
            SamplingError::Config {
                key,
                why: format!("{e}"),
            }
        }),
    }
}

/// Rejects a diffusers option whose effect this crate does not implement.
fn unsupported(key: &'static str, set: bool, what: &str) -> Result<(), SamplingError> {
    if set {
        return Err(SamplingError::Config {
            key,
            why: format!("{what} is not implemented; remove the key or set it to its default"),
        });
    }
    Ok(())
}

impl SchedulerConfig {
    /// diffusers' constructor defaults of `kind`.
    pub fn new(kind: SchedulerKind) -> SchedulerConfig {
        let lcm = kind == SchedulerKind::Lcm;
        let euler = matches!(kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral);
        SchedulerConfig {
            kind,
            num_train_timesteps: 1000,
            beta_start: if lcm { 0.00085 } else { 0.0001 },
            beta_end: if lcm { 0.012 } else { 0.02 },
            beta_schedule: if lcm {
                BetaSchedule::ScaledLinear
            } else {
                BetaSchedule::Linear
            },
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: if euler {
                TimestepSpacing::Linspace
            } else {
                TimestepSpacing::Leading
            },
            steps_offset: 0,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            clip_sample: matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm),
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            eta: 0.0,
            variance_type: VarianceType::FixedSmall,
            flow: FlowMatchConfig::default(),
            flow_kernel: FlowKernel::default(),
        }
    }

    /// Reads the text of a diffusers `scheduler_config.json`; `_class_name` selects the scheduler.
    pub fn from_json(text: &str) -> Result<SchedulerConfig, SamplingError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| SamplingError::Parse(e.to_string()))?;
        let class = raw.class_name.ok_or_else(|| SamplingError::Config {
            key: "_class_name",
            why: "is missing; it names the scheduler class, e.g. \"EulerDiscreteScheduler\"".into(),
        })?;
        let mut c = SchedulerConfig::new(SchedulerKind::from_class_name(&class)?);
        if c.kind.is_flow() {
            c.flow = FlowMatchConfig::from_json(text)?;
            c.num_train_timesteps = c.flow.num_train_timesteps as usize;
            return Ok(c);
        }

        unsupported(
            "use_karras_sigmas",
            raw.use_karras_sigmas == Some(true),
            "Karras sigmas",
        )?;
        unsupported(
            "use_exponential_sigmas",
            raw.use_exponential_sigmas == Some(true),
            "exponential sigmas",
        )?;
        unsupported(
            "use_beta_sigmas",
            raw.use_beta_sigmas == Some(true),
            "beta sigmas",
        )?;
        unsupported(
            "thresholding",
            raw.thresholding == Some(true),
            "dynamic thresholding",
        )?;
        unsupported(
            "interpolation_type",
            raw.interpolation_type
                .as_deref()
                .is_some_and(|t| t != "linear"),
            "an interpolation type other than \"linear\"",
        )?;

        c.num_train_timesteps = raw.num_train_timesteps.unwrap_or(c.num_train_timesteps);
        c.beta_start = raw.beta_start.unwrap_or(c.beta_start);
        c.beta_end = raw.beta_end.unwrap_or(c.beta_end);
        c.beta_schedule = enum_key("beta_schedule", raw.beta_schedule, c.beta_schedule)?;
        c.trained_betas = raw.trained_betas;
        c.rescale_betas_zero_snr = raw.rescale_betas_zero_snr.unwrap_or(false);
        c.prediction_type = enum_key("prediction_type", raw.prediction_type, c.prediction_type)?;
        c.timestep_spacing =
            enum_key("timestep_spacing", raw.timestep_spacing, c.timestep_spacing)?;
        c.steps_offset = raw.steps_offset.unwrap_or(0);
        c.timestep_type = enum_key("timestep_type", raw.timestep_type, c.timestep_type)?;
        c.final_sigmas_type = enum_key(
            "final_sigmas_type",
            raw.final_sigmas_type,
            c.final_sigmas_type,
        )?;
        c.original_inference_steps = raw
            .original_inference_steps
            .unwrap_or(c.original_inference_steps);
        c.timestep_scaling = raw.timestep_scaling.unwrap_or(c.timestep_scaling);
        c.clip_sample = raw.clip_sample.unwrap_or(c.clip_sample);
        c.clip_sample_range = raw.clip_sample_range.unwrap_or(c.clip_sample_range);
        c.set_alpha_to_one = raw.set_alpha_to_one.unwrap_or(c.set_alpha_to_one);
        c.variance_type = match raw.variance_type.as_deref() {
            // diffusers returns the raw output as the variance for `learned`, and takes the root
            // of a log for `fixed_large_log` (NaN): neither samples anything meaningful.
            Some(v @ ("learned" | "fixed_large_log")) => {
                return Err(SamplingError::Config {
                    key: "variance_type",
                    why: format!(
                        "\"{v}\" is not supported (diffusers' DDPMScheduler mis-handles it); use \
                         \"learned_range\" for models with a learned sigma, or \"fixed_small\""
                    ),
                })
            }
            other => enum_key("variance_type", other.map(str::to_owned), c.variance_type)?,
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a `scheduler_config.json`, or a model folder's `scheduler/scheduler_config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<SchedulerConfig, SamplingError> {
        let file = if path.is_dir() {
            path.join("scheduler").join("scheduler_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| SamplingError::Parse(format!("cannot read {}: {e}", file.display())))?;
        SchedulerConfig::from_json(&text).map_err(|e| match e {
            SamplingError::Parse(m) => SamplingError::Parse(format!("{}: {m}", file.display())),
            other => other,
        })
    }

    /// Checks the values that diffusers would reject (or silently mis-handle) later.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |key, why: String| Err(SamplingError::Config { key, why });
        if self.num_train_timesteps < 2 {
            return bad(
                "num_train_timesteps",
                format!("is {}; it must be at least 2", self.num_train_timesteps),
            );
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return bad(
                    "trained_betas",
                    format!(
                        "has {} values; it needs one per training timestep ({})",
                        b.len(),
                        self.num_train_timesteps
                    ),
                );
            }
        }
        if self.original_inference_steps == 0
            || self.original_inference_steps > self.num_train_timesteps
        {
            return bad(
                "original_inference_steps",
                format!(
                    "is {}; it must be between 1 and num_train_timesteps ({})",
                    self.original_inference_steps, self.num_train_timesteps
                ),
            );
        }
        if self.kind.is_flow() {
            self.flow.validate()?;
            if let FlowKernel::Sde { noise_level } = self.flow_kernel {
                if !(noise_level.is_finite() && noise_level > 0.0) {
                    return bad(
                        "noise_level",
                        format!("is {noise_level}; the SDE kernel's noise level must be positive"),
                    );
                }
            }
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return bad(
                "eta",
                format!("is {}; DDIM's η must be in [0, 1]", self.eta),
            );
        }
        if self.kind == SchedulerKind::EulerAncestral && self.rescale_betas_zero_snr {
            return bad(
                "rescale_betas_zero_snr",
                "makes the first σ of EulerAncestralDiscreteScheduler infinite in diffusers; use \
                 EulerDiscreteScheduler (which caps ᾱ_T at 2⁻²⁴) or turn it off"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/sd-turbo's scheduler/scheduler_config.json.
    const SD_TURBO: &str = r#"{
      "_class_name": "EulerDiscreteScheduler",
      "_diffusers_version": "0.24.0.dev0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "clip_sample": false,
      "interpolation_type": "linear",
      "num_train_timesteps": 1000,
      "prediction_type": "epsilon",
      "sample_max_value": 1.0,
      "set_alpha_to_one": false,
      "sigma_max": null,
      "sigma_min": null,
      "skip_prk_steps": true,
      "steps_offset": 1,
      "timestep_spacing": "trailing",
      "timestep_type": "discrete",
      "trained_betas": null,
      "use_karras_sigmas": false
    }"#;

    #[test]
    fn sd_turbo_config_parses_with_unknown_keys_ignored() {
        let c = SchedulerConfig::from_json(SD_TURBO).unwrap();
        assert_eq!(c.kind, SchedulerKind::Euler);
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!((c.beta_start, c.beta_end), (0.00085, 0.012));
        assert_eq!(c.timestep_spacing, TimestepSpacing::Trailing);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
        assert_eq!(c.steps_offset, 1);
        assert!(!c.set_alpha_to_one);
        assert_eq!(c.trained_betas, None);
    }

    #[test]
    fn reads_a_model_folder_or_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("scheduler")).unwrap();
        let file = dir.path().join("scheduler").join("scheduler_config.json");
        std::fs::write(&file, SD_TURBO).unwrap();
        assert_eq!(
            SchedulerConfig::from_file(dir.path()).unwrap(),
            SchedulerConfig::from_json(SD_TURBO).unwrap()
        );
        assert_eq!(SchedulerConfig::from_file(&file).unwrap().steps_offset, 1);
        std::fs::write(&file, "{").unwrap();
        let err = SchedulerConfig::from_file(&file).unwrap_err().to_string();
        assert!(err.contains("scheduler_config.json"), "{err}");
        let err = SchedulerConfig::from_file(&dir.path().join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read") && err.contains("nope.json"),
            "{err}"
        );
    }

    #[test]
    fn class_defaults_follow_diffusers() {
        let lcm = SchedulerConfig::from_json(r#"{"_class_name": "LCMScheduler"}"#).unwrap();
        assert_eq!(lcm.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(lcm.timestep_spacing, TimestepSpacing::Leading);
        assert!(!lcm.clip_sample);
        let ddim = SchedulerConfig::from_json(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
        assert_eq!(ddim.beta_schedule, BetaSchedule::Linear);
        assert!(ddim.clip_sample);
        let ea =
            SchedulerConfig::from_json(r#"{"_class_name": "EulerAncestralDiscreteScheduler"}"#)
                .unwrap();
        assert_eq!(ea.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(ea.eta, 0.0);
    }

    #[test]
    fn fields_can_be_overridden_after_parsing() {
        let mut c = SchedulerConfig::from_json(SD_TURBO).unwrap();
        c.kind = SchedulerKind::EulerAncestral;
        c.timestep_spacing = TimestepSpacing::Leading;
        c.prediction_type = PredictionType::VPrediction;
        c.validate().unwrap();
        assert_eq!(c.kind.class_name(), "EulerAncestralDiscreteScheduler");
    }

    #[test]
    fn unknown_class_name_is_named_with_the_supported_ones() {
        let err = SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#).unwrap_err();
        assert!(matches!(err, SamplingError::UnknownScheduler(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("PNDMScheduler") && msg.contains("LCMScheduler"),
            "{msg}"
        );
        let err = SchedulerConfig::from_json(r#"{"beta_end": 0.012}"#).unwrap_err();
        assert!(err.to_string().contains("_class_name"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (json, key) in [
            (
                r#"{"_class_name": "DDIMScheduler", "prediction_type": "flow"}"#,
                "prediction_type",
            ),
            (
                r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}"#,
                "timestep_spacing",
            ),
            (
                r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}"#,
                "beta_schedule",
            ),
            (
                r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#,
                "use_karras_sigmas",
            ),
            (
                r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#,
                "thresholding",
            ),
            (
                r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
                "interpolation_type",
            ),
            (
                r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
                "trained_betas",
            ),
            (
                r#"{"_class_name": "LCMScheduler", "original_inference_steps": 0}"#,
                "original_inference_steps",
            ),
        ] {
            let err = SchedulerConfig::from_json(json).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{json}: {err}"
            );
        }
        let err = SchedulerConfig::from_json("{not json").unwrap_err();
        assert!(matches!(err, SamplingError::Parse(_)), "{err}");
        let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
        c.eta = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("`eta`"));
    }
}
