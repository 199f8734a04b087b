//! Orchestration of training runs: the run directory contract (docs/design.md), metrics,
//! checkpoints and resume, shared by `pso offline` and `pso online`.

pub mod class_samples;
pub mod data;
pub mod eval;
pub mod image_table;
pub mod images;
pub mod label;
pub mod offline;
pub mod online;
pub mod prompts;
pub mod relabel;
pub mod rounds;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::checkpoint::{self, CheckpointError};
use crate::config::{ConfigError, RunConfig};
use crate::learner::{Learner, LearnerError, StepReport};
use crate::objective::ObjectiveError;
use crate::pairs::PairsError;
use crate::peft::PeftError;
use crate::pipeline::{LoadOptions, Pipeline, PipelineError};
use crate::sampling::SchedulerKind;

/// Errors of a training run; each names what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run directory cannot be used as asked.
    #[error("{path}: {why}")]
    RunDir {
        /// The run directory.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config does not allow this run.
    #[error("{0}")]
    Config(String),
    /// Bad training data.
    #[error("{0}")]
    Data(String),
    /// Writing the resolved config failed.
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    /// The scheduler refused the sampler config.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// The pipeline failed to load or run.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The pair store failed.
    #[error(transparent)]
    Pairs(#[from] PairsError),
    /// Choosing trainable tensors failed.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The objective refused its inputs.
    #[error(transparent)]
    Objective(#[from] ObjectiveError),
    /// The learner failed.
    #[error(transparent)]
    Learner(#[from] LearnerError),
    /// A checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The scorer kept failing past its patience.
    #[error("{0}")]
    Scorer(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads `config.model` on `device`, with the scheduler of the model folder turned into
/// `sampler.name` (as diffusers' `Scheduler.from_config(pipe.scheduler.config)`): SD-Turbo's
/// folder names Euler, its PSO recipe samples with Euler ancestral.
pub fn load_pipeline(config: &RunConfig, device: tch::Device) -> Result<Pipeline, RunError> {
    let root = crate::pipeline::hub::resolve_model(&config.model.id, None)?;
    let mut pipeline = Pipeline::load(
        &root,
        &LoadOptions {
            device,
            kind: config.model.dtype.kind(),
            variant: None,
            backbone_weights: config.model.unet.clone(),
        },
    )?;
    pipeline.scheduler_config.kind = SchedulerKind::from_name(&config.sampler.name)?;
    Ok(pipeline)
}

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

    /// `RUN/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }
}

/// Appends one JSON object per learner step to `metrics.jsonl`.
#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
    file: File,
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
            crate::tensor_file::write_atomically(&path, text.as_bytes())
                .map_err(|e| RunError::Data(format!("cannot rewrite {}: {e}", path.display())))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Metrics { path, file })
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
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        Ok(())
    }
}

/// Set when the user asks the run to stop (Ctrl-C / SIGTERM): the loop finishes its step,
/// checkpoints and returns.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut term) = signal(SignalKind::terminate()) else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            tracing::warn!("stop requested: finishing the current step, then checkpointing");
            set.store(true, Ordering::SeqCst);
        });
    });
    flag
}

/// A seed for (run seed, step, micro-batch): every random draw of a step derives from it, so a
/// resumed run draws exactly what an uninterrupted one would.
pub fn step_seed(seed: u64, step: u64, micro: u32) -> u64 {
    // SplitMix64 over the three words.
    let mut z = seed
        ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (micro as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The run directory.
    pub run: PathBuf,
    /// Optimizer steps done in total.
    pub steps: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Whether a stop request ended it early.
    pub stopped: bool,
}

/// Writes a checkpoint of `learner` with data cursor `cursor` (pairs or rounds consumed).
pub fn save(
    dir: &RunDir,
    learner: &Learner,
    config: &RunConfig,
    cursor: u64,
) -> Result<PathBuf, RunError> {
    let state = checkpoint::State {
        pso_version: env!("CARGO_PKG_VERSION").into(),
        counters: learner.counters(),
        data_cursor: cursor,
        config_hash: config.training_hash(),
        peft: config.peft.kind.clone(),
    };
    Ok(checkpoint::save(
        &dir.checkpoints(),
        learner,
        &state,
        config.learner.keep_checkpoints,
    )?)
}

/// A learner over `adapter`'s tensors, restored from `dir`'s latest checkpoint when resuming;
/// returns it with the data cursor to continue from (0 for a new run).
pub fn start_learner(
    adapter: &crate::peft::Adapter,
    config: &RunConfig,
    dir: &RunDir,
    resuming: bool,
) -> Result<(Learner, u64), RunError> {
    let mut learner = Learner::new(adapter.params_shallow(), &config.optim, &config.learner)?;
    let cursor = if resuming {
        resume(dir, &mut learner, config)?
    } else {
        0
    };
    Ok((learner, cursor))
}

/// Restores the latest checkpoint of `dir` into `learner`; returns the data cursor (0 when the
/// run has no checkpoint yet).
pub fn resume(dir: &RunDir, learner: &mut Learner, config: &RunConfig) -> Result<u64, RunError> {
    let Some(latest) = checkpoint::latest(&dir.checkpoints())? else {
        return Ok(0);
    };
    let loaded = checkpoint::load(&latest)?;
    if loaded.state.config_hash != config.training_hash() {
        return Err(RunError::RunDir {
            path: latest,
            why: "was written under a different training config; resume with the run's own \
                  config.toml"
                .into(),
        });
    }
    learner.restore(
        loaded.trainable,
        loaded.optimizer,
        loaded.ema,
        loaded.state.counters,
    )?;
    tracing::info!(
        checkpoint = %latest.display(),
        step = loaded.state.counters.step,
        "resumed"
    );
    Ok(loaded.state.data_cursor)
}

/// A progress bar over optimizer steps (hidden when `show` is false).
pub fn progress(show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    progress_of("step", show, total, done)
}

/// A progress bar counting `unit`s (hidden when `show` is false).
pub fn progress_of(unit: &str, show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:40}}] {unit} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(done);
    bar
}

/// `RUN` for a config: `--out` when given, else `run.out/run.name`.
pub fn run_path(config: &RunConfig, out: Option<&Path>) -> PathBuf {
    out.map(Path::to_owned)
        .unwrap_or_else(|| config.run.out.join(&config.run.name))
}
