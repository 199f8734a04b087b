//! Run configs: TOML files (see docs/configuration.md) with `--set key.path=value` overrides.
//!
//! Every section rejects unknown keys; a wrong type or an out-of-range value is reported with the
//! file, the dotted key and what is expected. The fully resolved config is written into each run
//! directory, so a run can always be reproduced from its own folder.

use std::path::{Path, PathBuf};

use reward::ScorerKind;
use serde::{Deserialize, Serialize};

/// Errors reading or checking a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A `--set` argument is malformed.
    #[error("--set {arg}: {why}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        why: String,
    },
    /// A key is unknown, has the wrong type, or is out of range.
    #[error("{path}: key `{key}`{origin}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// " (set on the command line)" when it came from `--set`.
        origin: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The resolved config could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Numeric precision of the model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float (CPU default).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16 (CUDA, compute capability ≥ 8.0).
    Bf16,
}

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
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            name: "run".into(),
            seed: 0,
            out: "runs".into(),
        }
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
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            id: "stabilityai/sd-turbo".into(),
            dtype: DType::F32,
            device: "auto".into(),
            unet: None,
        }
    }
}

/// Few-step sampler of the actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerSection {
    /// `euler`, `euler_ancestral`, `lcm`, `ddim` or `ddpm`.
    pub name: String,
    /// Number of denoising steps.
    pub steps: u32,
    /// Explicit timesteps (first to last); overrides `steps` when not empty.
    pub timesteps: Vec<u32>,
    /// Classifier-free guidance scale; ≤ 1 means none.
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
            name: "euler_ancestral".into(),
            steps: 4,
            timesteps: Vec::new(),
            guidance: 0.0,
            height: 512,
            width: 512,
            samples_per_prompt: 2,
        }
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

/// The training objective (method.md §2–3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// `online_pso`, `offline_pso`, `pso_db`, `dpo` or `sft`.
    pub kind: String,
    /// β of the loss; unset means the kind's official default (50 for online_pso, 5000 for
    /// offline_pso and dpo, 5 for pso_db).
    pub beta: Option<f64>,
    /// Clamp of the likelihood ratio to [1 − ε, 1 + ε].
    pub epsilon: f64,
}

impl Default for ObjectiveSection {
    fn default() -> Self {
        ObjectiveSection {
            kind: "online_pso".into(),
            beta: None,
            epsilon: 0.1,
        }
    }
}

/// Which parameters train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftSection {
    /// `lora`, `difffit` or `full`.
    pub kind: String,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Names of the linear layers that get LoRA adapters: a layer matches a pattern equal to its
    /// dotted name or to a suffix of it after a dot (as peft's `target_modules`).
    pub targets: Vec<String>,
    /// LoRA A initialisation: `gaussian` (std 1/rank, diffusers' training scripts) or `kaiming`
    /// (peft's default); B starts at zero either way.
    pub init: String,
    /// DiffFit: transformer blocks [first, last) that get γ, counted in module order over the
    /// whole model; unset means every block of a UNet and the first half of a DiT's.
    pub gamma_blocks: Option<[u32; 2]>,
}

impl Default for PeftSection {
    fn default() -> Self {
        PeftSection {
            kind: "lora".into(),
            rank: 32,
            alpha: 32.0,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            init: "gaussian".into(),
            gamma_blocks: None,
        }
    }
}

/// AdamW and its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam β1, β2.
    pub betas: [f64; 2],
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam ε.
    pub eps: f64,
    /// Gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// `constant`, `warmup` or `cosine`.
    pub schedule: String,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 1e-5,
            betas: [0.9, 0.999],
            weight_decay: 1e-6,
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: "constant".into(),
            warmup_steps: 0,
        }
    }
}

/// The learner's schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerSection {
    /// Pairs per micro-batch.
    pub batch_size: u32,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accumulation: u32,
    /// Optimizer steps between refreshes of the actor's samples.
    pub refresh_every: u32,
    /// Stop after this many optimizer steps.
    pub max_steps: u64,
    /// Write a checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: u32,
    /// Decay of an exponential moving average of the trainable tensors; 0 keeps none.
    pub ema_decay: f64,
    /// Abort (after a checkpoint) when this many optimizer steps in a row had a non-finite loss
    /// or gradient.
    pub max_nonfinite_steps: u32,
}

impl Default for LearnerSection {
    fn default() -> Self {
        LearnerSection {
            batch_size: 1,
            grad_accumulation: 1,
            refresh_every: 2,
            max_steps: 1000,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            ema_decay: 0.0,
            max_nonfinite_steps: 10,
        }
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

/// The online loop (method.md §2): rounds of sampling, labelling and learning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineSection {
    /// Prompts sampled per round; a round's pairs feed the next `learner.refresh_every` steps.
    pub prompts_per_round: u32,
    /// `best_worst` (one pair per prompt: highest vs lowest score) or `all_pairs`.
    pub pairing: String,
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
            pairing: "best_worst".into(),
            min_score_margin: 0.0,
            actor_device: String::new(),
            max_staleness: 4,
        }
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

/// A whole run config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Identity, seed, output.
    pub run: RunSection,
    /// The model.
    pub model: ModelSection,
    /// The actor's sampler.
    pub sampler: SamplerSection,
    /// The scorer.
    pub reward: RewardSection,
    /// The objective.
    pub objective: ObjectiveSection,
    /// The trainable parameters.
    pub peft: PeftSection,
    /// The optimizer.
    pub optim: OptimSection,
    /// The learner's schedule.
    pub learner: LearnerSection,
    /// The pair store.
    pub pairs: PairsSection,
    /// Training prompts.
    pub prompts: PromptsSection,
    /// The online loop.
    pub online: OnlineSection,
    /// Evaluation during online runs.
    pub eval: EvalSection,
}

fn one_of(key: &'static str, value: &str, allowed: &[&str]) -> Option<(&'static str, String)> {
    (!allowed.contains(&value)).then(|| {
        (
            key,
            format!("`{value}` is not one of: {}", allowed.join(", ")),
        )
    })
}

impl RunConfig {
    /// Range and enum checks serde cannot do: (dotted key, what is expected).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out: Vec<(&'static str, String)> = Vec::new();
        let mut need = |ok: bool, key: &'static str, expected: String| {
            if !ok {
                out.push((key, expected));
            }
        };
        let run_name_ok = !self.run.name.is_empty()
            && self
                .run
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        need(
            run_name_ok,
            "run.name",
            format!(
                "`{}` must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.run.name
            ),
        );
        need(
            !self.model.id.is_empty(),
            "model.id",
            "a model folder or hub id".into(),
        );
        let device_ok = matches!(self.model.device.as_str(), "cpu" | "cuda" | "auto")
            || self
                .model
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        need(
            device_ok,
            "model.device",
            format!("`{}` is not cpu, cuda, cuda:N or auto", self.model.device),
        );
        let s = &self.sampler;
        need(
            (1..=1000).contains(&s.steps),
            "sampler.steps",
            format!("{} is not in 1..=1000", s.steps),
        );
        need(
            s.timesteps.iter().all(|&t| t < 1000) && s.timesteps.windows(2).all(|w| w[0] > w[1]),
            "sampler.timesteps",
            format!(
                "{:?} must be strictly decreasing values below 1000",
                s.timesteps
            ),
        );
        need(
            s.guidance.is_finite() && s.guidance >= 0.0,
            "sampler.guidance",
            format!("{} is not a finite value ≥ 0", s.guidance),
        );
        for (key, v) in [("sampler.height", s.height), ("sampler.width", s.width)] {
            need(
                v >= 8 && v % 8 == 0 && v <= 4096,
                key,
                format!("{v} is not a multiple of 8 in 8..=4096"),
            );
        }
        need(
            s.samples_per_prompt >= 2,
            "sampler.samples_per_prompt",
            format!(
                "{} is below 2: a pair needs two samples",
                s.samples_per_prompt
            ),
        );
        let o = &self.objective;
        if let Some(beta) = o.beta {
            need(
                beta.is_finite() && beta > 0.0,
                "objective.beta",
                format!("{beta} is not a positive number"),
            );
        }
        need(
            o.epsilon.is_finite() && o.epsilon > 0.0 && o.epsilon < 1.0,
            "objective.epsilon",
            format!("{} is not in (0, 1)", o.epsilon),
        );
        let p = &self.peft;
        need(
            (1..=1024).contains(&p.rank),
            "peft.rank",
            format!("{} is not in 1..=1024", p.rank),
        );
        need(
            p.alpha.is_finite() && p.alpha > 0.0,
            "peft.alpha",
            format!("{} is not a positive number", p.alpha),
        );
        let o = &self.optim;
        need(
            o.lr.is_finite() && o.lr > 0.0 && o.lr < 1.0,
            "optim.lr",
            format!("{} is not in (0, 1)", o.lr),
        );
        need(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optim.betas",
            format!("{:?}: both must be in [0, 1)", o.betas),
        );
        need(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optim.weight_decay",
            format!("{} is not a number ≥ 0", o.weight_decay),
        );
        need(
            o.eps.is_finite() && o.eps > 0.0,
            "optim.eps",
            format!("{} is not a positive number", o.eps),
        );
        need(
            o.grad_clip.is_finite() && o.grad_clip >= 0.0,
            "optim.grad_clip",
            format!("{} is not a number ≥ 0 (0 disables clipping)", o.grad_clip),
        );
        let l = &self.learner;
        for (key, v) in [
            ("learner.batch_size", l.batch_size as u64),
            ("learner.grad_accumulation", l.grad_accumulation as u64),
            ("learner.refresh_every", l.refresh_every as u64),
            ("learner.max_steps", l.max_steps),
            ("learner.checkpoint_every", l.checkpoint_every),
            ("learner.keep_checkpoints", l.keep_checkpoints as u64),
            ("learner.max_nonfinite_steps", l.max_nonfinite_steps as u64),
        ] {
            need(v >= 1, key, format!("{v} is below 1"));
        }
        need(
            (0.0..1.0).contains(&l.ema_decay),
            "learner.ema_decay",
            format!("{} is not in [0, 1) (0 disables the EMA)", l.ema_decay),
        );
        if let Some([first, last]) = self.peft.gamma_blocks {
            need(
                first < last,
                "peft.gamma_blocks",
                format!("[{first}, {last}] is not a range [first, last) with first < last"),
            );
        }
        let q = &self.pairs;
        for (key, v) in [
            ("pairs.flush_every_pairs", q.flush_every_pairs),
            ("pairs.max_shard_rows", q.max_shard_rows),
            ("pairs.max_shard_mib", q.max_shard_mib),
        ] {
            need(v >= 1, key, format!("{v} is below 1"));
        }
        need(
            q.flush_seconds.is_finite() && q.flush_seconds > 0.0,
            "pairs.flush_seconds",
            format!("{} is not a positive number of seconds", q.flush_seconds),
        );
        need(
            !q.keep_trajectory || q.keep_latents,
            "pairs.keep_trajectory",
            "true requires pairs.keep_latents = true".into(),
        );
        let r = &self.reward;
        need(
            r.retry_seconds.is_finite() && r.retry_seconds > 0.0,
            "reward.retry_seconds",
            format!("{} is not a positive number of seconds", r.retry_seconds),
        );
        need(
            r.patience_seconds.is_finite() && r.patience_seconds >= 0.0,
            "reward.patience_seconds",
            format!("{} is not a number of seconds ≥ 0", r.patience_seconds),
        );
        need(
            !self.prompts.train.is_empty(),
            "prompts.train",
            "a prompt file or builtin:NAME".into(),
        );
        let on = &self.online;
        need(
            on.prompts_per_round >= 1,
            "online.prompts_per_round",
            format!("{} is below 1", on.prompts_per_round),
        );
        need(
            on.min_score_margin.is_finite() && on.min_score_margin >= 0.0,
            "online.min_score_margin",
            format!("{} is not a number ≥ 0", on.min_score_margin),
        );
        let actor_ok = on.actor_device.is_empty()
            || on.actor_device == "cpu"
            || on
                .actor_device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        need(
            actor_ok,
            "online.actor_device",
            format!(
                "`{}` is not empty (alternate with the learner), cpu or cuda:N",
                on.actor_device
            ),
        );
        let e = &self.eval;
        need(
            e.count >= 1,
            "eval.count",
            format!("{} is below 1", e.count),
        );
        if let Some(bad) = e.scorers.iter().find(|s| !s.contains(':')) {
            need(
                false,
                "eval.scorers",
                format!("`{bad}` is not SCORER:MODEL, e.g. pickscore:yuvalkirstain/PickScore_v1"),
            );
        }
        out.extend(one_of(
            "online.pairing",
            &self.online.pairing,
            &["best_worst", "all_pairs"],
        ));
        out.extend(one_of(
            "sampler.name",
            &self.sampler.name,
            &["euler", "euler_ancestral", "lcm", "ddim", "ddpm"],
        ));
        out.extend(one_of(
            "objective.kind",
            &self.objective.kind,
            &["online_pso", "offline_pso", "pso_db", "dpo", "sft"],
        ));
        out.extend(one_of(
            "peft.kind",
            &self.peft.kind,
            &["lora", "difffit", "full"],
        ));
        out.extend(one_of(
            "peft.init",
            &self.peft.init,
            &["gaussian", "kaiming"],
        ));
        out.extend(one_of(
            "optim.schedule",
            &self.optim.schedule,
            &["constant", "warmup", "cosine"],
        ));
        out
    }

    /// Reads `path`, applies `--set` overrides, and checks every key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path, overrides)
    }

    /// Parses TOML text (`path` only names it in errors), applies overrides, checks every key.
    pub fn from_toml(
        text: &str,
        path: &Path,
        overrides: &[String],
    ) -> Result<RunConfig, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string().trim().to_owned(),
                })?;
        let mut overridden = Vec::new();
        for arg in overrides {
            overridden.push(apply_override(&mut table, arg)?);
        }
        let origin = |key: &str| {
            let related = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
            if overridden
                .iter()
                .any(|o| related(o, key) || related(key, o))
            {
                " (set on the command line)".to_owned()
            } else {
                String::new()
            }
        };
        let config: RunConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Key {
                    path: path.to_owned(),
                    origin: origin(&key),
                    key,
                    message: e.into_inner().message().trim().to_owned(),
                }
            })?;
        if let Some((key, message)) = config.problems().into_iter().next() {
            return Err(ConfigError::Key {
                path: path.to_owned(),
                origin: origin(key),
                key: key.to_owned(),
                message,
            });
        }
        Ok(config)
    }

    /// The config as TOML, every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serializes")
    }

    /// A hash of everything that changes what training computes (so not the run's name and
    /// place, its length under a schedule that does not depend on it, or checkpoint cadence);
    /// a resume refuses a checkpoint written under another hash.
    pub fn training_hash(&self) -> String {
        let mut c = self.clone();
        c.run.name.clear();
        c.run.out = PathBuf::new();
        c.learner.checkpoint_every = 0;
        c.learner.keep_checkpoints = 0;
        c.reward.token_file = None;
        c.reward.retry_seconds = 0.0;
        c.reward.patience_seconds = 0.0;
        c.eval = EvalSection::default();
        if c.optim.schedule != "cosine" {
            c.learner.max_steps = 0;
        }
        // FNV-1a, 64 bit: stable across builds and platforms.
        let hash = c.to_toml().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }

    /// Writes the resolved config as `dir/config.toml` (atomically).
    pub fn write_resolved(&self, dir: &Path) -> Result<PathBuf, ConfigError> {
        let path = dir.join("config.toml");
        let tmp = dir.join("config.toml.tmp");
        let write = |p: &Path| {
            let p = p.to_owned();
            move |source| ConfigError::Write { path: p, source }
        };
        std::fs::create_dir_all(dir).map_err(write(dir))?;
        std::fs::write(&tmp, self.to_toml()).map_err(write(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(write(&path))?;
        Ok(path)
    }
}

/// Resolves a device spec (`cpu`, `cuda`, `cuda:N`, `auto`) to a device that exists here.
pub fn resolve_device(spec: &str) -> Result<tch::Device, String> {
    let cuda = tch::Cuda::device_count();
    match spec {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cuda" => resolve_device("cuda:0"),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) if (n as i64) < cuda => Ok(tch::Device::Cuda(n)),
            Some(Ok(n)) => Err(format!(
                "device `{other}`: this machine has {cuda} CUDA device(s) (cuda:{n} does not exist); `pso doctor` lists them"
            )),
            _ => Err(format!("device `{other}` is not cpu, cuda, cuda:N or auto")),
        },
    }
}

impl DType {
    /// The libtorch kind of this precision.
    pub fn kind(self) -> tch::Kind {
        match self {
            DType::F32 => tch::Kind::Float,
            DType::F16 => tch::Kind::Half,
            DType::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// Applies one `key.path=value` to the table; returns the key.
///
/// The value is read as a TOML value (`0.5`, `true`, `[1, 2]`, `"text"`); anything that does not
/// parse as one is taken as a bare string, so `--set model.id=stabilityai/sd-turbo` works.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| ConfigError::Override {
        arg: arg.to_owned(),
        why: why.to_owned(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected key.path=value, e.g. optim.lr=2e-5"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("the key has an empty part"));
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, parents) = parts.split_last().expect("at least one part");
    let mut node = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            bad(&format!(
                "`{}` is a value, not a section",
                parts[..=i].join(".")
            ))
        })?;
    }
    node.insert(last.to_string(), value);
    Ok(key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<RunConfig, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::from_toml(text, Path::new("configs/x.toml"), &sets)
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(load("", &[]).unwrap(), RunConfig::default());
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = load("[optim]\nlrr = 1e-4\n", &[]).unwrap_err().to_string();
        assert!(err.starts_with("configs/x.toml: key `optim.lrr`"), "{err}");
        assert!(
            err.contains("unknown field `lrr`") && err.contains("`lr`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_section_is_rejected() {
        let err = load("[optimiser]\nlr = 1e-4\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `optimiser`") && err.contains("unknown field"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_expectation() {
        let err = load("[sampler]\nsteps = \"four\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `sampler.steps`"), "{err}");
        assert!(err.contains("invalid type") && err.contains("u32"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_rejected() {
        let err = load("[objective]\nepsilon = 1.5\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "configs/x.toml: key `objective.epsilon`: 1.5 is not in (0, 1)"
        );
        let err = load("", &["sampler.samples_per_prompt=1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(set on the command line)") && err.contains("below 2"),
            "{err}"
        );
    }

    #[test]
    fn enum_values_are_checked() {
        let err = load("[peft]\nkind = \"lora2\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`peft.kind`") && err.contains("lora, difffit, full"),
            "{err}"
        );
        let err = load("[model]\ndtype = \"f64\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`model.dtype`") && err.contains("unknown variant"),
            "{err}"
        );
    }

    #[test]
    fn online_eval_and_reward_keys_are_checked() {
        let err = |sets: &[&str]| load("", sets).unwrap_err().to_string();
        assert!(err(&["online.pairing=\"best\""]).contains("best_worst, all_pairs"));
        assert!(err(&["online.actor_device=\"gpu\""]).contains("cpu or cuda:N"));
        assert!(err(&["online.prompts_per_round=0"]).contains("below 1"));
        assert!(err(&["eval.scorers=[\"pickscore\"]"]).contains("is not SCORER:MODEL"));
        assert!(err(&["reward.retry_seconds=0"]).contains("positive number of seconds"));
        let ok = load("", &["online.actor_device=cuda:1", "eval.every=0"]).unwrap();
        assert_eq!(ok.online.actor_device, "cuda:1");
    }

    #[test]
    fn eval_and_scorer_patience_do_not_change_the_training_hash() {
        let a = load("", &[]).unwrap();
        let b = load("", &["eval.every=7", "reward.patience_seconds=5"]).unwrap();
        let c = load("", &["online.prompts_per_round=9"]).unwrap();
        assert_eq!(a.training_hash(), b.training_hash());
        assert_ne!(a.training_hash(), c.training_hash());
    }

    #[test]
    fn syntax_error_names_the_file_and_line() {
        let err = load("[optim\nlr = 1\n", &[]).unwrap_err().to_string();
        assert!(err.starts_with("configs/x.toml is not valid TOML"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn overrides_parse_toml_values_and_bare_strings() {
        let c = load(
            "[optim]\nlr = 1e-5\n",
            &[
                "optim.lr=2e-4",
                "model.id=stabilityai/sd-turbo",
                "sampler.timesteps=[999, 499]",
                "pairs.keep_trajectory=false",
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 2e-4);
        assert_eq!(c.model.id, "stabilityai/sd-turbo");
        assert_eq!(c.sampler.timesteps, vec![999, 499]);
        assert!(!c.pairs.keep_trajectory);
    }

    #[test]
    fn malformed_overrides_are_rejected() {
        let err = load("", &["optim.lr"]).unwrap_err().to_string();
        assert!(err.contains("expected key.path=value"), "{err}");
        let err = load("[optim]\nlr = 1e-5\n", &["optim.lr.x=1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`optim.lr` is a value, not a section"),
            "{err}"
        );
        let err = load("", &["optim.lr.x=1"]).unwrap_err().to_string();
        assert!(
            err.contains("key `optim.lr` (set on the command line)")
                && err.contains("invalid type: map"),
            "{err}"
        );
        let err = load("", &["optim..lr=1"]).unwrap_err().to_string();
        assert!(err.contains("empty part"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = load("[run]\nname = \"r1\"\nseed = 7\n", &["optim.lr=3e-5"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = c.write_resolved(dir.path()).unwrap();
        let back = RunConfig::load(&path, &[]).unwrap();
        assert_eq!(back, c);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("[learner]"));
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n > 0, "no configs in {}", dir.display());
    }
}
