//! The sections of a run config that the run layer owns: the run itself, the model, the actor's
//! sampler, the scorer, the pair store, prompts, the online loop and evaluation. The objective,
//! PEFT, optimizer and learner sections live with the modules that implement them.

use std::path::PathBuf;

use diffusion::sampling::{FlowKernel, SchedulerKind};
use reward::ScorerKind;
use serde::{Deserialize, Serialize};

use super::DType;
use crate::problems::{failing, Problems};
use crate::run::label::Pairing;

/// Run identity, seed and output location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Run name: the run directory's name and the pair store's run id.
    pub name: String,
    /// Seed from which every image seed and the learner's RNG are derived.
    pub seed: u64,
    /// Parent directory of run directories.
    pub out: PathBuf,
    /// Also log metrics, evals and sample grids as TensorBoard event files in RUN/tensorboard/.
    pub tensorboard: bool,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            name: "run".into(),
            seed: 0,
            out: "runs".into(),
            tensorboard: false,
        }
    }
}

impl RunSection {
    /// `run.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        failing([(
            name_ok,
            "run.name",
            format!(
                "`{}` must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.name
            ),
        )])
    }
}

/// The distilled model to tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Diffusers folder or hub id.
    pub id: String,
    /// Weight precision.
    pub dtype: DType,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
    pub device: String,
    /// A safetensors file replacing `unet/`'s weights (e.g. DMD2's UNet in an SDXL folder).
    pub unet: Option<PathBuf>,
    /// T5 tokens per prompt of an SD3 / FLUX model (default 256; FLUX.1-dev 512); the most Qwen3
    /// tokens of a Z-Image prompt (default 512).
    pub max_sequence_length: Option<usize>,
    /// Where the text encoders run when not on `device` (`cpu`, `cuda:N`): T5-XXL (9.5 GB in
    /// bf16) on the CPU leaves the GPU to the transformer; prompts are cached after the first
    /// encoding.
    pub text_encoder_device: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            id: "stabilityai/sd-turbo".into(),
            dtype: DType::F32,
            device: "auto".into(),
            unet: None,
            max_sequence_length: None,
            text_encoder_device: None,
        }
    }
}

/// Whether `spec` reads as a device: `cpu`, `cuda`, `cuda:N` or `auto` (whether it exists is
/// checked when the model loads).
fn device_spec_ok(spec: &str) -> bool {
    matches!(spec, "cpu" | "cuda" | "auto")
        || spec
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

impl ModelSection {
    /// `model.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let device_ok = device_spec_ok(&self.device);
        failing([
            (
                !self.id.is_empty(),
                "model.id",
                "a model folder or hub id".into(),
            ),
            (
                device_ok,
                "model.device",
                format!("`{}` is not cpu, cuda, cuda:N or auto", self.device),
            ),
            (
                self.text_encoder_device
                    .as_deref()
                    .is_none_or(device_spec_ok),
                "model.text_encoder_device",
                format!(
                    "`{}` is not cpu, cuda, cuda:N or auto",
                    self.text_encoder_device.as_deref().unwrap_or_default()
                ),
            ),
            (
                self.max_sequence_length != Some(0),
                "model.max_sequence_length",
                "0 leaves T5 no tokens; give at least 1 (SD3 256, FLUX.1-dev 512)".into(),
            ),
        ])
    }
}

/// How a flow-matching model's sampler steps (docs/method.md §2 item 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FlowKernelName {
    /// diffusers' deterministic Euler step (no likelihood: sampling only).
    Ode,
    /// Re-noise the x0 estimate to the next σ (the flow analogue of DMD2's kernel).
    Renoise,
    /// Flow-GRPO's SDE step with `sampler.noise_level`.
    Sde,
}

impl FlowKernelName {
    /// The kernel, with `noise_level` for the SDE.
    pub fn kernel(self, noise_level: f64) -> FlowKernel {
        match self {
            FlowKernelName::Ode => FlowKernel::Ode,
            FlowKernelName::Renoise => FlowKernel::Renoise,
            FlowKernelName::Sde => FlowKernel::Sde { noise_level },
        }
    }
}

/// Few-step sampler of the actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerSection {
    /// `euler`, `euler_ancestral`, `lcm`, `ddim`, `ddpm`, or `flow_match_euler` (SD3, FLUX,
    /// Z-Image).
    pub name: SchedulerKind,
    /// `flow_match_euler` only: `renoise`, `sde` or `ode`.
    pub flow_kernel: FlowKernelName,
    /// `flow_kernel = "sde"` only: Flow-GRPO's noise level a.
    pub noise_level: f64,
    /// Number of denoising steps.
    pub steps: u32,
    /// Explicit timesteps (first to last); overrides `steps` when not empty.
    pub timesteps: Vec<u32>,
    /// Classifier-free guidance scale; ≤ 1 means none (Z-Image: ZImagePipeline's scale, any
    /// value > 0 guides).
    pub guidance: f32,
    /// Image height in pixels.
    pub height: u32,
    /// Image width in pixels.
    pub width: u32,
    /// Images sampled per prompt (K ≥ 2).
    pub samples_per_prompt: u32,
}

impl Default for SamplerSection {
    fn default() -> Self {
        SamplerSection {
            name: SchedulerKind::EulerAncestral,
            flow_kernel: FlowKernelName::Renoise,
            noise_level: 0.7,
            steps: 4,
            timesteps: Vec::new(),
            guidance: 0.0,
            height: 512,
            width: 512,
            samples_per_prompt: 2,
        }
    }
}

impl SamplerSection {
    /// The flow-matching kernel the keys describe.
    pub fn flow_kernel(&self) -> FlowKernel {
        self.flow_kernel.kernel(self.noise_level)
    }

    /// `sampler.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let size = |key, v: u32| {
            (
                v >= 8 && v.is_multiple_of(8) && v <= 4096,
                key,
                format!("{v} is not a multiple of 8 in 8..=4096"),
            )
        };
        failing([
            (
                (1..=1000).contains(&self.steps),
                "sampler.steps",
                format!("{} is not in 1..=1000", self.steps),
            ),
            (
                self.timesteps.iter().all(|&t| t < 1000)
                    && self.timesteps.windows(2).all(|w| w[0] > w[1]),
                "sampler.timesteps",
                format!(
                    "{:?} must be strictly decreasing values below 1000",
                    self.timesteps
                ),
            ),
            (
                self.noise_level.is_finite() && self.noise_level > 0.0,
                "sampler.noise_level",
                format!("{} is not a finite value > 0", self.noise_level),
            ),
            (
                self.guidance.is_finite() && self.guidance >= 0.0,
                "sampler.guidance",
                format!("{} is not a finite value ≥ 0", self.guidance),
            ),
            size("sampler.height", self.height),
            size("sampler.width", self.width),
            (
                self.samples_per_prompt >= 2,
                "sampler.samples_per_prompt",
                format!(
                    "{} is below 2: a pair needs two samples",
                    self.samples_per_prompt
                ),
            ),
        ])
    }
}

/// The scorer that labels pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    /// `clip`, `pickscore`, `aesthetic`, `pixel` or `http`.
    pub scorer: ScorerKind,
    /// Model folder or hub id (URL for `http`; `centered`, `redness` or `size` for `pixel`).
    pub model: String,
    /// File holding the bearer token of an `http` scorer.
    pub token_file: Option<PathBuf>,
    /// Seconds before the first retry of a failed scoring call; each further retry waits twice
    /// as long, at most a minute.
    pub retry_seconds: f64,
    /// Seconds a scorer may keep failing before the run checkpoints and exits non-zero.
    pub patience_seconds: f64,
}

impl Default for RewardSection {
    fn default() -> Self {
        RewardSection {
            scorer: ScorerKind::Pickscore,
            model: "yuvalkirstain/PickScore_v1".into(),
            token_file: None,
            retry_seconds: 2.0,
            patience_seconds: 1800.0,
        }
    }
}

impl RewardSection {
    /// `reward.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        failing([
            (
                self.retry_seconds.is_finite() && self.retry_seconds > 0.0,
                "reward.retry_seconds",
                format!("{} is not a positive number of seconds", self.retry_seconds),
            ),
            (
                self.patience_seconds.is_finite() && self.patience_seconds >= 0.0,
                "reward.patience_seconds",
                format!("{} is not a number of seconds ≥ 0", self.patience_seconds),
            ),
        ])
    }
}

/// The pair store of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsSection {
    /// Flush a row group after this many pairs...
    pub flush_every_pairs: u32,
    /// ...or after this many seconds.
    pub flush_seconds: f64,
    /// Rotate the shard after this many rows...
    pub max_shard_rows: u32,
    /// ...or this many MiB.
    pub max_shard_mib: u32,
    /// Store the final latents of both sides.
    pub keep_latents: bool,
    /// Store every latent of both trajectories (online PSO replay).
    pub keep_trajectory: bool,
}

impl Default for PairsSection {
    fn default() -> Self {
        PairsSection {
            flush_every_pairs: 64,
            flush_seconds: 30.0,
            max_shard_rows: 10_000,
            max_shard_mib: 1024,
            keep_latents: true,
            keep_trajectory: true,
        }
    }
}

impl PairsSection {
    /// `pairs.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let at_least_one = |key, v: u32| (v >= 1, key, format!("{v} is below 1"));
        failing([
            at_least_one("pairs.flush_every_pairs", self.flush_every_pairs),
            at_least_one("pairs.max_shard_rows", self.max_shard_rows),
            at_least_one("pairs.max_shard_mib", self.max_shard_mib),
            (
                self.flush_seconds.is_finite() && self.flush_seconds > 0.0,
                "pairs.flush_seconds",
                format!("{} is not a positive number of seconds", self.flush_seconds),
            ),
            (
                !self.keep_trajectory || self.keep_latents,
                "pairs.keep_trajectory",
                "true requires pairs.keep_latents = true".into(),
            ),
        ])
    }
}

/// Where the training prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsSection {
    /// A text file with one prompt per line, or `builtin:NAME` for a set shipped in
    /// `data/prompts/NAME.txt`.
    pub train: String,
}

impl Default for PromptsSection {
    fn default() -> Self {
        PromptsSection {
            train: "builtin:simple".into(),
        }
    }
}

impl PromptsSection {
    /// `prompts.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        failing([(
            !self.train.is_empty(),
            "prompts.train",
            "a prompt file or builtin:NAME".into(),
        )])
    }
}

/// The online loop (method.md §2): rounds of sampling, labelling and learning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineSection {
    /// Prompts sampled per round; a round's pairs feed the next `learner.refresh_every` steps.
    pub prompts_per_round: u32,
    /// `best_worst` (one pair per prompt: highest vs lowest score) or `all_pairs`.
    pub pairing: Pairing,
    /// Pairs whose scores differ by less than this are stored but not trained on.
    pub min_score_margin: f32,
    /// Empty: actor and learner alternate on `model.device`. Otherwise the actor samples on
    /// this device (`cpu`, `cuda:N`) concurrently with the learner.
    pub actor_device: String,
    /// Concurrent actor: a round sampled more than this many optimizer steps before the
    /// learner reaches it is dropped (it stays in the pair store).
    pub max_staleness: u32,
}

impl Default for OnlineSection {
    fn default() -> Self {
        OnlineSection {
            prompts_per_round: 4,
            pairing: Pairing::BestWorst,
            min_score_margin: 0.0,
            actor_device: String::new(),
            max_staleness: 4,
        }
    }
}

impl OnlineSection {
    /// `online.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let actor_ok = self.actor_device.is_empty()
            || self.actor_device == "cpu"
            || self
                .actor_device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        failing([
            (
                self.prompts_per_round >= 1,
                "online.prompts_per_round",
                format!("{} is below 1", self.prompts_per_round),
            ),
            (
                self.min_score_margin.is_finite() && self.min_score_margin >= 0.0,
                "online.min_score_margin",
                format!("{} is not a number ≥ 0", self.min_score_margin),
            ),
            (
                actor_ok,
                "online.actor_device",
                format!(
                    "`{}` is not empty (alternate with the learner), cpu or cuda:N",
                    self.actor_device
                ),
            ),
        ])
    }
}

/// Fixed-seed evaluation during online runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every this many optimizer steps (and before the first); 0 disables.
    pub every: u64,
    /// Held-out prompts: a file or `builtin:NAME`.
    pub prompts: String,
    /// How many of them (one image each, same seeds every time).
    pub count: u32,
    /// `SCORER:MODEL` specs; empty means the training scorer.
    pub scorers: Vec<String>,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 100,
            prompts: "builtin:eval".into(),
            count: 8,
            scorers: Vec::new(),
        }
    }
}

impl EvalSection {
    /// `eval.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let bad_scorer = self.scorers.iter().find(|s| !s.contains(':'));
        failing([
            (
                self.count >= 1,
                "eval.count",
                format!("{} is below 1", self.count),
            ),
            (
                bad_scorer.is_none(),
                "eval.scorers",
                format!(
                    "`{}` is not SCORER:MODEL, e.g. pickscore:yuvalkirstain/PickScore_v1",
                    bad_scorer.map_or("", String::as_str)
                ),
            ),
        ])
    }
}
