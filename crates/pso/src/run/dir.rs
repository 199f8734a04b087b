//! The run directory contract (docs/design.md): its layout, and `metrics.jsonl`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{io, RunError};
use crate::checkpoint;
use crate::config::RunConfig;
use crate::learner::StepReport;
use crate::tensorboard::{EventWriter, SharedEvents};

/// A run directory: `config.toml`, `metrics.jsonl`, `checkpoints/`, `pairs/`, `samples/`.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
}

impl RunDir {
    /// Prepares `path` for a run of `config`: a new run needs a directory without checkpoints;
    /// a resume needs the checkpoints of a run with the same training config. Writes
    /// `config.toml` either way.
    pub fn prepare(path: &Path, config: &RunConfig, resume: bool) -> Result<RunDir, RunError> {
        let dir = RunDir {
            path: path.to_owned(),
        };
        if resume && !dir.path.exists() {
            return Err(RunError::RunDir {
                path: dir.path.clone(),
                why: "does not exist, so there is nothing to resume; check --out (or run.name), \
                      or drop --resume to start a new run"
                    .into(),
            });
        }
        let has_checkpoints = !checkpoint::list(&dir.checkpoints())?.is_empty();
        if has_checkpoints && !resume {
            return Err(RunError::RunDir {
                path: dir.path.clone(),
                why: "already holds checkpoints of a run; pass --resume to continue it, or \
                      choose another --out (or run.name)"
                    .into(),
            });
        }
        if resume && has_checkpoints {
            let old = dir.path.join("config.toml");
            let text = fs::read_to_string(&old).unwrap_or_default();
            if old.exists() && text.trim().is_empty() {
                return Err(RunError::RunDir {
                    path: old,
                    why: "is empty, so the checkpoints' training config cannot be checked; put \
                          the run's config back (the one it was started with), or delete the \
                          file to resume under this config at your own risk"
                        .into(),
                });
            }
            if old.exists() {
                let previous = RunConfig::load(&old, &[])?;
                if previous.training_hash() != config.training_hash() {
                    return Err(RunError::RunDir {
                        path: dir.path.clone(),
                        why: format!(
                            "was trained with a different config ({}); resume with that config \
                             (only run.name, run.out, checkpoint cadence and, for non-cosine \
                             schedules, learner.max_steps may change)",
                            old.display()
                        ),
                    });
                }
            }
        }
        fs::create_dir_all(&dir.path).map_err(io(&dir.path))?;
        config.write_resolved(&dir.path)?;
        Ok(dir)
    }

    /// `RUN/checkpoints`.
    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// `RUN/tensorboard/`: event files, when `run.tensorboard` is on.
    pub fn tensorboard(&self) -> PathBuf {
        self.path.join("tensorboard")
    }

    /// A new event file for this invocation of a run resumed at `resumed_step` (0: new), when
    /// `run.tensorboard` asks for one.
    pub fn events(
        &self,
        config: &RunConfig,
        resumed_step: u64,
    ) -> Result<Option<SharedEvents>, RunError> {
        if !config.run.tensorboard {
            return Ok(None);
        }
        let folder = self.tensorboard();
        EventWriter::shared(&folder, "pso", resumed_step + 1)
            .map(Some)
            .map_err(io(&folder))
    }

    /// `RUN/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }
}

/// Appends one JSON object per learner step to `metrics.jsonl` (and, when asked, its numbers
/// as `train/*` scalars to a TensorBoard event file).
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
    file: File,
    events: Option<SharedEvents>,
}

impl Metrics {
    /// Opens the metrics file of `dir`, first dropping lines of steps after `resumed_step` (a
    /// crash after the last checkpoint leaves steps that will be trained again).
    pub fn open(dir: &RunDir, resumed_step: u64) -> Result<Metrics, RunError> {
        let path = dir.metrics();
        if path.exists() {
            let kept: Vec<String> = BufReader::new(File::open(&path).map_err(io(&path))?)
                .lines()
                .map_while(Result::ok)
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= resumed_step)
                })
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            hf::tensor_file::write_atomically(&path, text.as_bytes())
                .map_err(|e| RunError::Data(format!("cannot rewrite {}: {e}", path.display())))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Metrics {
            path,
            file,
            events: None,
        })
    }

    /// Also writes every step's numbers to `events` as `train/*` scalars.
    pub fn with_tensorboard(mut self, events: SharedEvents) -> Self {
        self.events = Some(events);
        self
    }

    /// Writes one step: the report's fields, then `extra` (e.g. `reward_mean`).
    pub fn write(&mut self, report: &StepReport, extra: &[(&str, Value)]) -> Result<(), RunError> {
        let mut m = Map::new();
        let f = |v: f64| Value::from(if v.is_finite() { Some(v) } else { None });
        m.insert("step".into(), report.step.into());
        m.insert("policy_version".into(), report.step.into());
        for (k, v) in report.diagnostics.fields() {
            m.insert(k.into(), f(v));
        }
        m.insert("grad_norm".into(), f(report.grad_norm));
        m.insert("lr".into(), report.lr.into());
        m.insert("skipped".into(), report.skipped.into());
        m.insert(
            "pairs_per_s".into(),
            f(report.pairs as f64 / report.seconds.max(1e-9)),
        );
        m.insert("seconds".into(), f(report.seconds));
        for (k, v) in extra {
            m.insert((*k).into(), v.clone());
        }
        if let Some(events) = &self.events {
            let scalars: Vec<(String, f64)> = m
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "step" | "policy_version"))
                .filter_map(|(k, v)| v.as_f64().map(|v| (format!("train/{k}"), v)))
                .collect();
            let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
            let path = events.path().to_owned();
            events.scalars(report.step, &scalars).map_err(io(&path))?;
        }
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        Ok(())
    }
}

/// `RUN` for a config: `--out` when given, else `run.out/run.name`.
pub fn run_path(config: &RunConfig, out: Option<&Path>) -> PathBuf {
    out.map(Path::to_owned)
        .unwrap_or_else(|| config.run.out.join(&config.run.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_a_missing_run_or_one_with_an_empty_config_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let config = RunConfig::default();
        let missing = tmp.path().join("missing");
        let e = RunDir::prepare(&missing, &config, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nothing to resume") && e.contains("drop --resume"),
            "{e}"
        );
        assert!(!missing.exists());
        let run = tmp.path().join("run");
        fs::create_dir_all(run.join("checkpoints/step-00000001")).unwrap();
        fs::write(run.join("checkpoints/latest"), "step-00000001\n").unwrap();
        fs::write(run.join("config.toml"), "").unwrap();
        let e = RunDir::prepare(&run, &config, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
