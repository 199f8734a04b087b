//! Run configs: TOML files (see docs/configuration.md) with `--set key.path=value` overrides.
//!
//! Every section rejects unknown keys; a wrong type or an out-of-range value is reported with the
//! file, the dotted key and what is expected. The fully resolved config is written into each run
//! directory, so a run can always be reproduced from its own folder.

mod device;
mod sections;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::learner::LearnerSection;
pub use crate::objective::{ObjectiveKind, ObjectiveSection};
pub use crate::optim::{OptimSection, ScheduleKind};
pub use crate::peft::{LoraInit, PeftKind, PeftSection};
pub use crate::problems::Problems;
pub use crate::run::label::Pairing;
pub use device::{resolve_device, DType};
pub use sections::{
    EvalSection, FlowKernelName, ModelSection, OnlineSection, PairsSection, PromptsSection,
    RewardSection, RunSection, SamplerSection,
};

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

/// serde's "unknown variant `x`, expected one of `a`, `b`" as "`x` is not one of: a, b", the
/// form of every other enum message in a config error.
fn plain_message(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown variant ") else {
        return message.to_owned();
    };
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let value = quoted.next().unwrap_or_default();
    let allowed: Vec<&str> = quoted.collect();
    format!("`{value}` is not one of: {}", allowed.join(", "))
}

impl RunConfig {
    /// Range checks serde cannot do, section by section: (dotted key, what is expected).
    pub fn problems(&self) -> Problems {
        [
            self.run.problems(),
            self.model.problems(),
            self.sampler.problems(),
            self.objective.problems(),
            self.peft.problems(),
            self.optim.problems(),
            self.learner.problems(),
            self.pairs.problems(),
            self.reward.problems(),
            self.prompts.problems(),
            self.online.problems(),
            self.eval.problems(),
        ]
        .concat()
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
                    message: plain_message(e.into_inner().message().trim()),
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
        c.run.tensorboard = false;
        c.learner.checkpoint_every = 0;
        c.learner.keep_checkpoints = 0;
        // Where prompts are encoded and whether blocks are recomputed change memory, not what
        // trains (up to rounding).
        c.model.text_encoder_device = None;
        c.learner.recompute_blocks = false;
        c.reward.token_file = None;
        // Where a reward server listens is no part of what trains: a moved server resumes.
        if c.reward.scorer == reward::ScorerKind::Http {
            c.reward.model.clear();
        }
        c.reward.retry_seconds = 0.0;
        c.reward.patience_seconds = 0.0;
        c.eval = EvalSection::default();
        if c.optim.schedule != ScheduleKind::Cosine {
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
            err.contains("`model.dtype`") && err.contains("`f64` is not one of: f32, f16, bf16"),
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
    fn a_moved_reward_server_keeps_the_training_hash_but_another_model_does_not() {
        let http = load("[reward]\nscorer = \"http\"\nmodel = \"http://a:1\"\n", &[]).unwrap();
        let moved = load("[reward]\nscorer = \"http\"\nmodel = \"http://b:2\"\n", &[]).unwrap();
        assert_eq!(http.training_hash(), moved.training_hash());
        let other = load("", &["reward.model=other/PickScore"]).unwrap();
        assert_ne!(RunConfig::default().training_hash(), other.training_hash());
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
