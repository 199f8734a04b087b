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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reward::Scorer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::eval::Evaluator;
use super::label::PatientScorer;
use super::prompts::PromptSet;
use super::rounds::{Round, RoundMaker, TrainingPair};
use super::{load_pipeline, progress, save, start_learner, step_seed, stop_flag, Metrics, RunDir};
use super::{RunError, Summary};
use crate::actor::{Actor, ActorSettings};
use crate::checkpoint;
use crate::config::{resolve_device, RunConfig};
use crate::learner::{Learner, LearnerError, StepReport};
use crate::objective::online_pso::{OnlinePso, Transitions};
use crate::objective::{add_noise, regression_target, sft_loss, Loss};
use crate::peft::Adapter;
use diffusion::pipeline::{Conditioning, Pipeline};
use diffusion::sampling::{NoiseSource, Scheduler, SeededNoise, Timesteps};
use pairs::writer::{AsyncPairWriter, WriterOptions};

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
}

/// The scorers of a run: the one that labels pairs, and the eval scorers by name.
pub struct Scorers {
    /// Labels the pairs.
    pub train: Arc<dyn Scorer>,
    /// Scores the fixed-seed eval images (name, scorer).
    pub eval: Vec<(String, Arc<dyn Scorer>)>,
}

/// What the learner minimises.
enum OnlineObjective {
    /// Online PSO over the stored transitions.
    Pso(OnlinePso),
    /// The SFT baseline: ε/v regression on the winners' final latents at uniform timesteps.
    Sft {
        alphas_cumprod: Vec<f64>,
        prediction: diffusion::sampling::PredictionType,
    },
}

/// The learner's model: the pipeline with its adapter, the objective and the schedule.
pub struct OnlineTrainer {
    /// The pipeline (its UNet carries the adapter).
    pub pipeline: Pipeline,
    /// The trainable tensors and the reference model.
    pub adapter: Adapter,
    objective: OnlineObjective,
    scheduler: Scheduler,
    stochastic: Vec<usize>,
    settings: ActorSettings,
}

/// A pair moved to the learner's device, with its prompt's conditioning.
pub struct Prepared {
    pair: TrainingPair,
    cond: Conditioning,
}

/// Refuses configs the online loop cannot run.
pub fn check(config: &RunConfig) -> Result<(), RunError> {
    if !["online_pso", "sft"].contains(&config.objective.kind.as_str()) {
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

/// What the actor samples, from the config and the loaded pipeline.
fn actor_settings(config: &RunConfig) -> ActorSettings {
    ActorSettings {
        timesteps: if config.sampler.timesteps.is_empty() {
            Timesteps::Steps(config.sampler.steps as usize)
        } else {
            Timesteps::Explicit(config.sampler.timesteps.clone())
        },
        height: config.sampler.height as i64,
        width: config.sampler.width as i64,
        samples_per_prompt: config.sampler.samples_per_prompt,
        seed: config.run.seed,
    }
}

/// Attaches `config.peft` to the pipeline's UNet: learner and actor copies start equal.
fn attach(pipeline: &Pipeline, config: &RunConfig) -> Result<Adapter, RunError> {
    Ok(Adapter::new(
        &pipeline.backbone,
        &pipeline.backbone_vs,
        &config.peft,
        config.run.seed,
    )?)
}

impl OnlineTrainer {
    /// Loads `config.model` on `device` and attaches `config.peft`.
    pub fn load(config: &RunConfig, device: Device) -> Result<OnlineTrainer, RunError> {
        check(config)?;
        let pipeline = load_pipeline(config, device)?;
        let settings = actor_settings(config);
        let scheduler = pipeline.scheduler(settings.timesteps.clone())?;
        if scheduler.learns_variance() {
            return Err(RunError::Config(format!(
                "the DDPM scheduler of {} has variance_type \"learned_range\": online PSO's \
                 transition likelihood needs a variance fixed by the schedule; use sampler.name = \
                 ddim with sampler.eta > 0, or a scheduler config with variance_type \"fixed_small\"",
                config.model.id
            )));
        }
        // A transition is stochastic when its kernel has s > 0, whatever the latents.
        let probe = Tensor::zeros([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let mut stochastic = Vec::new();
        for i in 0..scheduler.num_steps() {
            if scheduler.transition(i, &probe, &probe)?.std > 0.0 {
                stochastic.push(i);
            }
        }
        if stochastic.is_empty() {
            return Err(RunError::Config(format!(
                "sampler.name = {} samples deterministically: online PSO needs the likelihood of \
                 stochastic transitions; use euler_ancestral, lcm, or ddim with eta > 0",
                config.sampler.name
            )));
        }
        let objective = if config.objective.kind == "sft" {
            OnlineObjective::Sft {
                alphas_cumprod: diffusion::sampling::betas::alphas_cumprod(
                    &pipeline.scheduler_config,
                ),
                prediction: pipeline.scheduler_config.prediction_type,
            }
        } else {
            let beta = config
                .objective
                .beta
                .unwrap_or(crate::objective::online_pso::BETA);
            OnlineObjective::Pso(OnlinePso::new(beta, config.objective.epsilon)?)
        };
        let adapter = attach(&pipeline, config)?;
        Ok(OnlineTrainer {
            pipeline,
            adapter,
            objective,
            scheduler,
            stochastic,
            settings,
        })
    }

    /// The steps of the schedule with a likelihood (all but a deterministic last one).
    pub fn stochastic_steps(&self) -> &[usize] {
        &self.stochastic
    }

    /// The actor's settings for this model.
    pub fn settings(&self) -> &ActorSettings {
        &self.settings
    }

    /// Moves a round's pairs to the learner's device and encodes their prompts.
    pub fn prepare(&self, round: Round) -> Result<Vec<Prepared>, RunError> {
        let device = self.pipeline.device();
        let (h, w) = (self.settings.height, self.settings.width);
        let mut conds: HashMap<String, Conditioning> = HashMap::new();
        let mut out = Vec::with_capacity(round.pairs.len());
        for mut pair in round.pairs {
            if !conds.contains_key(&pair.prompt) {
                let c = self.pipeline.condition(&pair.prompt, None, 0.0, h, w, 1)?;
                conds.insert(pair.prompt.clone(), c);
            }
            let cond = conds[&pair.prompt].repeat(1);
            pair.winner = pair.winner.to_device(device);
            pair.loser = pair.loser.to_device(device);
            out.push(Prepared { pair, cond });
        }
        Ok(out)
    }

    /// The loss of `pairs`: online PSO at transition `steps[i]` of both trajectories of pair
    /// i, or SFT on each winner's final latents (noise and timestep drawn from the pair id and
    /// `steps[i]`, so a resumed run draws the same).
    pub fn loss(&self, pairs: &[&Prepared], steps: &[usize]) -> Result<Loss, RunError> {
        let objective = match &self.objective {
            OnlineObjective::Pso(objective) => objective,
            OnlineObjective::Sft {
                alphas_cumprod,
                prediction,
            } => return self.sft_loss(pairs, steps, alphas_cumprod, *prediction),
        };
        let b = pairs.len() as i64;
        let at = |side: fn(&TrainingPair) -> &Tensor, offset: usize| {
            let rows: Vec<Tensor> = pairs
                .iter()
                .zip(steps)
                .map(|(p, &i)| side(&p.pair).get((i + offset) as i64))
                .collect();
            Tensor::stack(&rows, 0)
        };
        let x = Tensor::cat(&[at(|p| &p.winner, 0), at(|p| &p.loser, 0)], 0);
        let next_winner = at(|p| &p.winner, 1);
        let next_loser = at(|p| &p.loser, 1);
        let row_steps: Vec<usize> = steps.iter().chain(steps).copied().collect();
        let inputs = row_steps
            .iter()
            .enumerate()
            .map(|(r, &i)| {
                self.scheduler
                    .scale_model_input(i, &x.narrow(0, r as i64, 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inputs = Tensor::cat(&inputs, 0);
        let times: Vec<f32> = row_steps
            .iter()
            .map(|&i| self.scheduler.timesteps()[i] as f32)
            .collect();
        let times = Tensor::from_slice(&times).to_device(x.device());
        let conds: Vec<&Conditioning> = pairs.iter().map(|p| &p.cond).collect();
        let cond = Conditioning::cat(&conds)?.repeat(2);
        let backbone = &self.pipeline.backbone;
        let reference = self.adapter.reference(backbone, |b| {
            self.pipeline.predict_batch(b, &cond, &inputs, &times)
        });
        let policy = self
            .pipeline
            .predict_batch(backbone, &cond, &inputs, &times);
        let kernels = |out: &Tensor| -> Result<(Tensor, Vec<f64>), RunError> {
            let out = out.to_kind(Kind::Float);
            let mut means = Vec::with_capacity(row_steps.len());
            let mut stds = Vec::with_capacity(row_steps.len());
            for (r, &i) in row_steps.iter().enumerate() {
                let r = r as i64;
                let k = self
                    .scheduler
                    .transition(i, &x.narrow(0, r, 1), &out.narrow(0, r, 1))?;
                means.push(k.mean);
                stds.push(k.std);
            }
            Ok((Tensor::cat(&means, 0), stds))
        };
        let (mean_reference, stds) = tch::no_grad(|| kernels(&reference))?;
        let (mean_policy, _) = kernels(&policy)?;
        let counted: Vec<bool> = pairs.iter().map(|p| p.pair.counted).collect();
        let half = |t: &Tensor, first: bool| t.narrow(0, if first { 0 } else { b }, b);
        let (bu, b2) = (b as usize, 2 * b as usize);
        Ok(objective.loss(
            &Transitions {
                next: &next_winner,
                mean_policy: &half(&mean_policy, true),
                mean_reference: &half(&mean_reference, true),
                std: &stds[..bu],
            },
            &Transitions {
                next: &next_loser,
                mean_policy: &half(&mean_policy, false),
                mean_reference: &half(&mean_reference, false),
                std: &stds[bu..b2],
            },
            Some(&counted),
        )?)
    }

    /// The SFT baseline's loss: winners' final latents noised to uniform training timesteps.
    fn sft_loss(
        &self,
        pairs: &[&Prepared],
        steps: &[usize],
        alphas_cumprod: &[f64],
        prediction: diffusion::sampling::PredictionType,
    ) -> Result<Loss, RunError> {
        let device = self.pipeline.device();
        let x0 = Tensor::stack(
            &pairs
                .iter()
                .map(|p| p.pair.winner.get(-1))
                .collect::<Vec<_>>(),
            0,
        );
        let mut noise = Vec::with_capacity(pairs.len());
        let mut timesteps = Vec::with_capacity(pairs.len());
        for (p, &i) in pairs.iter().zip(steps) {
            let seed = step_seed(p.pair.pair_id as u64, i as u64, u32::MAX - 1);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            timesteps.push(rand::Rng::random_range(
                &mut rng,
                0..alphas_cumprod.len() as u32,
            ));
            let mut draw = SeededNoise::new(seed);
            noise.extend(draw.draw(&x0.size()[1..], 1)?);
        }
        let noise = Tensor::stack(&noise, 0).to_device(device);
        let x = add_noise(&x0, &noise, &timesteps, alphas_cumprod)?;
        let target = regression_target(&x0, &noise, &timesteps, alphas_cumprod, prediction)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_slice(&t).to_device(device);
        let conds: Vec<&Conditioning> = pairs.iter().map(|p| &p.cond).collect();
        let cond = Conditioning::cat(&conds)?;
        let pred = self
            .pipeline
            .predict_batch(&self.pipeline.backbone, &cond, &x, &t);
        Ok(sft_loss(&pred, &target)?)
    }
}

/// The newest trainable tensors, published by the learner for a concurrent actor.
type WeightSlot = Arc<Mutex<Option<(u64, Vec<(String, Tensor)>)>>>;

/// Where the learner's rounds come from.
enum Rounds {
    /// Sampled by the learner's own model between its steps.
    Inline { maker: Box<RoundMaker>, next: u64 },
    /// Sampled by a concurrent actor thread on another device.
    Thread {
        rounds: Receiver<Result<Round, RunError>>,
        weights: WeightSlot,
        device: Device,
        actor: std::thread::JoinHandle<()>,
    },
}

/// Starts the concurrent actor: loads its own model on `device`, then samples round after
/// round from `first`, taking the newest published weights before each.
fn spawn_actor(
    config: RunConfig,
    device: Device,
    mut maker: RoundMaker,
    first: u64,
    weights: WeightSlot,
    halt: Arc<AtomicBool>,
    rounds: SyncSender<Result<Round, RunError>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let result = (|| -> Result<(), RunError> {
            let pipeline = load_pipeline(&config, device)?;
            let adapter = attach(&pipeline, &config)?;
            let actor = Actor::new(&pipeline, actor_settings(&config))?;
            let mut version = 0;
            for index in first.. {
                if let Some((v, values)) = weights.lock().expect("weights lock").take() {
                    adapter.set_values(&values)?;
                    version = v;
                }
                match maker.make(&actor, index, version, &halt)? {
                    None => return Ok(()),
                    Some(round) => {
                        if rounds.send(Ok(round)).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = rounds.send(Err(e));
        }
    })
}

/// Checks before the first sample that the run directory takes files and has room for a few
/// checkpoints and rounds of pairs.
fn preflight(dir: &RunDir, config: &RunConfig, trainable: i64) -> Result<(), RunError> {
    for sub in ["pairs", "checkpoints"] {
        let path = dir.path.join(sub);
        let probe = path.join(".pso-write-probe");
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
    let dir = RunDir::prepare(&opts.out, config, opts.resume)?;
    let prompts = PromptSet::load(&config.prompts.train)?;
    let eval_prompts = (config.eval.every > 0)
        .then(|| PromptSet::load(&config.eval.prompts))
        .transpose()?;
    let device = resolve_device(&config.model.device).map_err(RunError::Config)?;
    let actor_device = match config.online.actor_device.as_str() {
        "" => None,
        spec => Some(resolve_device(spec).map_err(RunError::Config)?),
    };
    let trainer = OnlineTrainer::load(config, device)?;
    let (mut learner, first_round) = start_learner(&trainer.adapter, config, &dir, opts.resume)?;
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
    let writer = runtime.block_on(async {
        AsyncPairWriter::spawn(WriterOptions {
            flush_every_pairs: p.flush_every_pairs as usize,
            flush_interval: Duration::from_secs_f64(p.flush_seconds),
            max_shard_rows: p.max_shard_rows as usize,
            max_shard_bytes: p.max_shard_mib as u64 * 1024 * 1024,
            ..WriterOptions::new(dir.path.join("pairs"), &config.run.name)
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
    let halt = stop_flag();
    let maker = RoundMaker::new(
        config,
        trainer.scheduler.timesteps(),
        prompts,
        train_scorer.clone(),
        writer.clone(),
        runtime.handle().clone(),
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
        "online PSO"
    );
    let step = learner.counters().step;
    let mut state = Loop {
        config,
        opts: &opts,
        dir: &dir,
        trainer: &trainer,
        metrics: Metrics::open(&dir, step)?,
        learner: &mut learner,
        evaluator: evaluator.as_ref(),
        runtime: runtime.handle().clone(),
        halt: halt.clone(),
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
            if let Ok(at) = state.checkpoint() {
                tracing::error!(checkpoint = %at.display(), "stopping: {e}");
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

/// Publishes the learner's trainable tensors (copied onto the actor's device).
fn publish(weights: &WeightSlot, learner: &Learner, device: Device) {
    let values = tch::no_grad(|| {
        learner
            .trainable()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy().to_device(device)))
            .collect()
    });
    *weights.lock().expect("weights lock") = Some((learner.counters().step, values));
}

/// The state of the learner's loop.
struct Loop<'a> {
    config: &'a RunConfig,
    opts: &'a OnlineOptions,
    dir: &'a RunDir,
    trainer: &'a OnlineTrainer,
    learner: &'a mut Learner,
    metrics: Metrics,
    evaluator: Option<&'a Evaluator>,
    runtime: tokio::runtime::Handle,
    halt: Arc<AtomicBool>,
    writer: &'a Arc<AsyncPairWriter>,
    totals: Totals,
    /// Step of the last checkpoint.
    last_checkpoint: u64,
    summary: Summary,
    /// The next round to train on (the checkpoint's data cursor).
    cursor: u64,
}

impl Loop<'_> {
    fn step(&self) -> u64 {
        self.learner.counters().step
    }

    fn out_of_time(&self) -> bool {
        self.opts
            .max_hours
            .is_some_and(|h| self.totals.started.elapsed().as_secs_f64() >= h * 3600.0)
    }

    fn should_stop(&mut self) -> bool {
        if self.halt.load(Ordering::SeqCst) {
            self.summary.stopped = true;
            return true;
        }
        if self.out_of_time() {
            tracing::info!("--max-hours reached");
            self.summary.stopped = true;
            return true;
        }
        self.step() >= self.config.learner.max_steps
    }

    fn drive(&mut self, rounds: &mut Rounds, scorer: &PatientScorer) -> Result<(), RunError> {
        let bar = progress(
            self.opts.progress,
            self.config.learner.max_steps,
            self.step(),
        );
        if self.step() == 0 && !self.opts.resume {
            self.evaluate()?;
        }
        let trainer = self.trainer;
        let inline_actor = Actor::new(&trainer.pipeline, trainer.settings().clone())?;
        let mut last_log = Instant::now();
        while !self.should_stop() {
            let round = match rounds {
                Rounds::Inline { maker, next } => {
                    match maker.make(&inline_actor, *next, self.step(), &self.halt)? {
                        Some(round) => {
                            *next += 1;
                            round
                        }
                        None => continue,
                    }
                }
                Rounds::Thread { rounds, .. } => {
                    match rounds.recv_timeout(Duration::from_millis(200)) {
                        Ok(round) => round?,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(RunError::Data(
                                "the actor thread ended without a word".into(),
                            ))
                        }
                    }
                }
            };
            let staleness = self.step().saturating_sub(round.policy_version);
            self.totals.pairs += round.pairs.len() as u64;
            self.totals.images += round.images as u64;
            if staleness > self.config.online.max_staleness as u64 {
                self.totals.dropped_rounds += 1;
                tracing::info!(
                    round = round.index,
                    staleness,
                    "round dropped: sampled {staleness} steps ago (online.max_staleness = {})",
                    self.config.online.max_staleness
                );
                self.cursor = round.index + 1;
                continue;
            }
            let finished = self.train_round(round, staleness, rounds, &bar)?;
            if finished
                && self.step() - self.last_checkpoint >= self.config.learner.checkpoint_every
            {
                self.checkpoint()?;
            }
            if !self.opts.progress && last_log.elapsed() >= Duration::from_secs(30) {
                last_log = Instant::now();
                tracing::info!(
                    step = self.step(),
                    loss = self.summary.last_loss.unwrap_or(f64::NAN),
                    pairs = self.totals.pairs,
                    scorer_failures = scorer.failures(),
                    "online PSO"
                );
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Trains `refresh_every` steps on `round`; returns whether the round was finished (not cut
    /// short by a stop or the last step).
    fn train_round(
        &mut self,
        round: Round,
        staleness: u64,
        rounds: &Rounds,
        bar: &indicatif::ProgressBar,
    ) -> Result<bool, RunError> {
        let c = self.config;
        let index = round.index;
        let stats = RoundStats::of(&round);
        let version = round.policy_version;
        let prepared = self.trainer.prepare(round)?;
        if prepared.is_empty() {
            self.cursor = index + 1;
            return Ok(true);
        }
        let mut order: Vec<usize> = (0..prepared.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(step_seed(
            c.run.seed,
            index,
            u32::MAX - 2,
        )));
        let (batch, accumulation) = (c.learner.batch_size as usize, c.learner.grad_accumulation);
        let per_step = batch * accumulation as usize;
        let transitions = self.trainer.stochastic_steps();
        let t = transitions.len() as u32;
        for k in 0..c.learner.refresh_every as usize {
            if self.should_stop() {
                self.cursor = index + 1;
                return Ok(false);
            }
            let chosen: Vec<&Prepared> = (0..per_step)
                .map(|i| &prepared[order[(k * per_step + i) % order.len()]])
                .collect();
            let step = self.step();
            let mut rng = ChaCha8Rng::seed_from_u64(step_seed(c.run.seed, step, 0));
            let perms: Vec<Vec<usize>> = chosen
                .iter()
                .map(|_| {
                    let mut p = transitions.to_vec();
                    p.shuffle(&mut rng);
                    p
                })
                .collect();
            let trainer = self.trainer;
            let outcome = self.learner.step_over(accumulation * t, |micro| {
                let (a, j) = ((micro / t) as usize, (micro % t) as usize);
                let rows = a * batch..(a + 1) * batch;
                let steps: Vec<usize> = perms[rows.clone()].iter().map(|p| p[j]).collect();
                trainer
                    .loss(&chosen[rows], &steps)
                    .map_err(|e| LearnerError::Batch(Box::new(e)))
            });
            let report = outcome?;
            self.totals.learner_seconds += report.seconds;
            if let Rounds::Thread {
                weights, device, ..
            } = rounds
            {
                publish(weights, self.learner, *device);
            }
            self.record(&report, &stats, index, version, staleness)?;
            bar.set_position(report.step);
            bar.set_message(format!(
                "loss {:.4} reward {:.4}",
                report.diagnostics.loss, stats.mean
            ));
            if c.eval.every > 0 && report.step % c.eval.every == 0 {
                self.evaluate()?;
            }
        }
        self.cursor = index + 1;
        Ok(true)
    }

    fn record(
        &mut self,
        report: &StepReport,
        stats: &RoundStats,
        round: u64,
        version: u64,
        staleness: u64,
    ) -> Result<(), RunError> {
        let wall = self.totals.started.elapsed().as_secs_f64().max(1e-9);
        let f = |v: f64| Value::from(v.is_finite().then_some(v));
        self.metrics.write(
            report,
            &[
                ("round", round.into()),
                ("sample_policy_version", version.into()),
                ("staleness", staleness.into()),
                ("reward_mean", f(stats.mean)),
                ("reward_std", f(stats.std)),
                ("reward_max", f(stats.max)),
                ("score_margin", f(stats.margin)),
                ("pairs_per_s", f(self.totals.pairs as f64 / wall)),
                ("images_per_s", f(self.totals.images as f64 / wall)),
                ("time_actor_s", f(stats.actor_seconds)),
                ("time_reward_s", f(stats.reward_wait_seconds)),
                ("time_learner_s", f(report.seconds)),
                ("learner_busy", f(self.totals.learner_seconds / wall)),
                ("dropped_rounds", self.totals.dropped_rounds.into()),
            ],
        )?;
        self.summary.last_loss = Some(report.diagnostics.loss);
        self.summary.steps = report.step;
        Ok(())
    }

    fn evaluate(&mut self) -> Result<(), RunError> {
        let Some(evaluator) = self.evaluator else {
            return Ok(());
        };
        let means = evaluator.run(
            &self.trainer.pipeline,
            self.step(),
            &self.runtime,
            &self.halt,
        )?;
        tracing::info!(step = self.step(), scores = ?means, "evaluation");
        Ok(())
    }

    /// Flushes the pair store and writes a checkpoint whose cursor is the next round.
    fn checkpoint(&mut self) -> Result<PathBuf, RunError> {
        self.runtime.block_on(self.writer.flush())?;
        let at = save(self.dir, self.learner, self.config, self.cursor)?;
        self.last_checkpoint = self.step();
        self.summary.checkpoint = Some(at.clone());
        Ok(at)
    }

    /// The final checkpoint, unless the newest one is already of this step.
    fn finish(&mut self) -> Result<(), RunError> {
        let last = checkpoint::latest(&self.dir.checkpoints())?;
        let up_to_date = last
            .as_ref()
            .is_some_and(|p| p.ends_with(checkpoint::dir_name(self.step())));
        if up_to_date {
            self.summary.checkpoint = last;
        } else {
            self.checkpoint()?;
        }
        Ok(())
    }
}

/// Reward statistics of a round.
struct RoundStats {
    mean: f64,
    std: f64,
    max: f64,
    margin: f64,
    actor_seconds: f64,
    reward_wait_seconds: f64,
}

impl RoundStats {
    fn of(round: &Round) -> RoundStats {
        let s: Vec<f64> = round.scores.iter().map(|&v| v as f64).collect();
        let n = s.len().max(1) as f64;
        let mean = s.iter().sum::<f64>() / n;
        let std = (s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let counted: Vec<f64> = round
            .pairs
            .iter()
            .filter(|p| p.counted)
            .map(|p| p.margin as f64)
            .collect();
        RoundStats {
            mean,
            std,
            max: s.iter().copied().fold(f64::NAN, f64::max),
            margin: counted.iter().sum::<f64>() / counted.len().max(1) as f64,
            actor_seconds: round.actor_seconds,
            reward_wait_seconds: round.reward_wait_seconds,
        }
    }
}
