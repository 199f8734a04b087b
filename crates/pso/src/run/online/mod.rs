//! `pso online` (method.md §2): rounds of K samples per prompt from the current policy, scored
//! while the next group is sampled, stored as pairs, and learned from with the online PSO
//! objective over the stored trajectories. `objective.kind = "sft"` runs the baseline of the
//! paper instead: the plain denoising loss on the winners' images (rejection-sampling
//! fine-tuning), with everything else the same.
//!
//! On one device the actor and the learner alternate: round r is sampled by the policy after
//! r · `refresh_every` steps and feeds the next `refresh_every` steps (on-policy). With
//! `online.actor_device` set, a second copy of the model samples on that device in its own
//! thread and receives the trainable tensors after every update; a round older than
//! `online.max_staleness` steps when the learner reaches it is dropped.
//!
//! Checkpoints fall on round boundaries (the cursor is the next round), so a resumed
//! alternating run samples exactly what an uninterrupted one would. A stop request ends the
//! current step, abandons the rest of its round and checkpoints.
//!
//! Data-parallel (torchrun's launch, docs/distributed.md), every rank alternates its own actor
//! and learner replica: rank r samples the global rounds r, r + W, … (rounds.rs), scores them
//! and writes its pairs under its own shard names; the learners average gradients every step;
//! rank 0 alone writes metrics (reduced over the ranks), evaluations and checkpoints. A stop
//! request takes effect at the next step every rank agrees on, after the round being sampled.

mod actor_thread;
mod driver;
mod trainer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reward::Scorer;

use super::eval::Evaluator;
use super::label::PatientScorer;
use super::prompts::PromptSet;
use super::rounds::RoundMaker;
use super::{start_learner, stop_flag, Metrics, RunDir};
use super::{RunError, Summary};
use crate::config::{resolve_device, RunConfig};
use crate::objective::ObjectiveKind;
use actor_thread::{publish, spawn_actor, Rounds, WeightSlot};
use dist::ProcessGroup;
use driver::Loop;
use pairs::writer::{AsyncPairWriter, WriterOptions};
pub use trainer::{OnlineTrainer, Prepared};

/// How to run.
#[derive(Debug, Clone)]
pub struct OnlineOptions {
    /// The run directory.
    pub out: PathBuf,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar (else a log line every 30 s).
    pub progress: bool,
    /// Stop (with a checkpoint) after this many hours.
    pub max_hours: Option<f64>,
    /// Train data-parallel over these ranks (torchrun's launch).
    pub group: Option<Arc<ProcessGroup>>,
}

/// The scorers of a run: the one that labels pairs, and the eval scorers by name.
pub struct Scorers {
    /// Labels the pairs.
    pub train: Arc<dyn Scorer>,
    /// Scores the fixed-seed eval images (name, scorer).
    pub eval: Vec<(String, Arc<dyn Scorer>)>,
}

/// Refuses configs the online loop cannot run.
pub fn check(config: &RunConfig) -> Result<(), RunError> {
    if !matches!(
        config.objective.kind,
        ObjectiveKind::OnlinePso | ObjectiveKind::Sft
    ) {
        return Err(RunError::Config(format!(
            "objective.kind = {} replays stored pairs: run `pso offline`, or set \
             objective.kind = online_pso (or sft, the baseline)",
            config.objective.kind
        )));
    }
    if config.sampler.guidance > 1.0 {
        return Err(RunError::Config(format!(
            "sampler.guidance = {}: online PSO samples distilled models without classifier-free \
             guidance; set it to 0",
            config.sampler.guidance
        )));
    }
    Ok(())
}

/// Checks before the first sample that the run directory takes files and has room for a few
/// checkpoints and rounds of pairs.
fn preflight(dir: &RunDir, config: &RunConfig, trainable: i64) -> Result<(), RunError> {
    for sub in ["pairs", "checkpoints"] {
        let path = dir.path.join(sub);
        // One probe per process: the ranks of a data-parallel run probe the same folders.
        let probe = path.join(format!(".pso-write-probe.{}", std::process::id()));
        let written = std::fs::create_dir_all(&path)
            .and_then(|_| std::fs::write(&probe, [0u8; 4096]))
            .and_then(|_| std::fs::File::open(&probe)?.sync_all())
            .and_then(|_| std::fs::remove_file(&probe));
        if let Err(source) = written {
            return Err(RunError::RunDir {
                path: path.clone(),
                why: format!(
                    "cannot write here ({source}); choose another --out or fix the permissions"
                ),
            });
        }
    }
    let s = &config.sampler;
    let latent = 4 * 4 * (s.height as u64 / 8) * (s.width as u64 / 8);
    let per_pair = 2 * (3 * s.height as u64 * s.width as u64 + latent * (s.steps as u64 + 2));
    let per_round =
        per_pair * config.online.prompts_per_round as u64 * (s.samples_per_prompt as u64).pow(2)
            / 2;
    let per_checkpoint = trainable as u64 * 4 * 4;
    let need = per_checkpoint * (config.learner.keep_checkpoints as u64 + 1) + 10 * per_round;
    if let Some(free) = free_bytes(&dir.path) {
        if free < need {
            return Err(RunError::RunDir {
                path: dir.path.clone(),
                why: format!(
                    "only {} MiB free, but checkpoints and the first rounds of pairs need about \
                     {} MiB; free some space or choose another --out",
                    free >> 20,
                    need >> 20
                ),
            });
        }
    }
    Ok(())
}

/// Free bytes on the file system of `path`, when the OS says.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stat` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Running totals for the metrics.
struct Totals {
    started: Instant,
    learner_seconds: f64,
    pairs: u64,
    images: u64,
    dropped_rounds: u64,
}

/// Trains online until `learner.max_steps`, a stop request, `--max-hours`, or a failure (which
/// is checkpointed first).
pub fn run(config: &RunConfig, opts: OnlineOptions, scorers: Scorers) -> Result<Summary, RunError> {
    check(config)?;
    let group = opts.group.clone();
    let (rank, world) = group
        .as_ref()
        .map_or((0, 1), |g| (g.rank(), g.world_size()));
    if world > 1 && !config.online.actor_device.is_empty() {
        return Err(RunError::Config(format!(
            "online.actor_device = {:?} with {world} data-parallel ranks: each rank samples              with its own learner's model; leave online.actor_device empty and give every GPU              its own rank (torchrun --nproc-per-node)",
            config.online.actor_device
        )));
    }
    // Rank 0 writes the run directory; the others wait until it is there.
    let dir = if rank == 0 {
        RunDir::prepare(&opts.out, config, opts.resume)?
    } else {
        RunDir {
            path: opts.out.clone(),
        }
    };
    if let Some(group) = &group {
        group
            .barrier()
            .map_err(crate::learner::LearnerError::from)?;
    }
    let prompts = PromptSet::load(&config.prompts.train)?;
    let eval_prompts = (config.eval.every > 0 && rank == 0)
        .then(|| PromptSet::load(&config.eval.prompts))
        .transpose()?;
    let device = resolve_device(&config.model.device).map_err(RunError::Config)?;
    let actor_device = match config.online.actor_device.as_str() {
        "" => None,
        spec => Some(resolve_device(spec).map_err(RunError::Config)?),
    };
    let trainer = OnlineTrainer::load(config, device)?;
    let (mut learner, first_round) =
        start_learner(&trainer.adapter, config, &dir, opts.resume, group.clone())?;
    preflight(&dir, config, trainer.adapter.numel())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| RunError::Io {
            path: dir.path.clone(),
            source,
        })?;
    let p = &config.pairs;
    let mut names = WriterOptions::new(dir.path.join("pairs"), &config.run.name);
    if world > 1 {
        names = names.for_rank(rank);
    }
    let writer = runtime.block_on(async {
        AsyncPairWriter::spawn(WriterOptions {
            flush_every_pairs: p.flush_every_pairs as usize,
            flush_interval: Duration::from_secs_f64(p.flush_seconds),
            max_shard_rows: p.max_shard_rows as usize,
            max_shard_bytes: p.max_shard_mib as u64 * 1024 * 1024,
            ..names
        })
    })?;
    let writer = Arc::new(writer);
    let patient = |s: Arc<dyn Scorer>| {
        Arc::new(PatientScorer::new(
            s,
            Duration::from_secs_f64(config.reward.retry_seconds),
            Duration::from_secs_f64(config.reward.patience_seconds),
        ))
    };
    let train_scorer = patient(scorers.train);
    let evaluator = eval_prompts.map(|set| {
        Evaluator::new(
            &dir,
            &set,
            config.eval.count,
            scorers
                .eval
                .into_iter()
                .map(|(name, s)| (name, patient(s)))
                .collect(),
            trainer.settings().clone(),
        )
    });
    let events = match rank {
        0 => dir.events(config, learner.counters().step)?,
        _ => None,
    };
    let evaluator = match (evaluator, &events) {
        (Some(e), Some(events)) => Some(e.with_tensorboard(events.clone())),
        (e, _) => e,
    };
    let halt = stop_flag();
    // Data-parallel, every rank finishes the round it samples, so that all of them reach the
    // same collectives; the stop request is agreed on at the next step instead.
    let sampling_halt = match world {
        1 => halt.clone(),
        _ => Arc::new(AtomicBool::new(false)),
    };
    let maker = RoundMaker::new(
        config,
        trainer.scheduler.timesteps(),
        prompts,
        train_scorer.clone(),
        writer.clone(),
        runtime.handle().clone(),
        (rank, world),
    )?;
    let mut rounds = match actor_device {
        None => Rounds::Inline {
            maker: Box::new(maker),
            next: first_round,
        },
        Some(device) => {
            let weights: WeightSlot = Arc::new(Mutex::new(None));
            publish(&weights, &learner, device);
            let (tx, rx) = mpsc::sync_channel(1);
            let actor = spawn_actor(
                config.clone(),
                device,
                maker,
                first_round,
                weights.clone(),
                halt.clone(),
                tx,
            );
            Rounds::Thread {
                rounds: rx,
                weights,
                device,
                actor,
            }
        }
    };
    tracing::info!(
        run = %dir.path.display(),
        peft = %config.peft.kind,
        trainable = trainer.adapter.numel(),
        scorer = %train_scorer.info(),
        concurrent_actor = actor_device.is_some(),
        rank,
        world_size = world,
        "online PSO"
    );
    let step = learner.counters().step;
    let metrics = match (rank, events) {
        (0, Some(events)) => Some(Metrics::open(&dir, step)?.with_tensorboard(events)),
        (0, None) => Some(Metrics::open(&dir, step)?),
        _ => None,
    };
    let mut state = Loop {
        config,
        opts: &opts,
        dir: &dir,
        trainer: &trainer,
        metrics,
        learner: &mut learner,
        group,
        evaluator: evaluator.as_ref(),
        runtime: runtime.handle().clone(),
        halt: halt.clone(),
        sampling_halt,
        writer: &writer,
        totals: Totals {
            started: Instant::now(),
            learner_seconds: 0.0,
            pairs: 0,
            images: 0,
            dropped_rounds: 0,
        },
        last_checkpoint: step,
        summary: Summary {
            run: dir.path.clone(),
            steps: step,
            last_loss: None,
            checkpoint: None,
            stopped: false,
        },
        cursor: first_round,
    };
    let outcome = state.drive(&mut rounds, &train_scorer);
    halt.store(true, Ordering::SeqCst);
    match rounds {
        Rounds::Thread { rounds, actor, .. } => {
            drop(rounds);
            let _ = actor.join();
        }
        inline @ Rounds::Inline { .. } => drop(inline),
    }
    let result = match outcome {
        Ok(()) => state.finish(),
        Err(e) => {
            // Keep what was learned: a failure after training still leaves a checkpoint.
            match state.checkpoint() {
                Ok(Some(at)) => tracing::error!(checkpoint = %at.display(), "stopping: {e}"),
                _ => tracing::error!("stopping: {e}"),
            }
            Err(e)
        }
    };
    let summary = state.summary.clone();
    drop(state);
    let writer = Arc::try_unwrap(writer)
        .map_err(|_| RunError::Data("the pair writer is still in use".into()))?;
    let stats = runtime.block_on(writer.close())?;
    tracing::info!(
        pairs = stats.pairs,
        shards = stats.shards_closed,
        "pair store closed"
    );
    result.map(|()| summary)
}
