//! `pso offline`: trains on logged or imported pairs (method.md §3 sources a and b) with
//! offline PSO, Diffusion-DPO or SFT, under the run-directory, metrics and checkpoint contracts
//! of the online loop.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::data::{image_tensor, stored_latent, PairStream};
use super::image_table::TableColumns;
use super::images::{ImageSetOptions, LabelAs, TrainingImage, TrainingImages};
use super::reference_pool::{self, ReferencePool};
use super::relabel::Relabeler;
use super::{
    any_rank, latest_or_none, progress, save, start_learner, step_seed, stop_flag, Metrics, RunDir,
    RunError, Summary,
};
use crate::checkpoint;
use crate::config::{resolve_device, RunConfig};
use crate::learner::LearnerError;
use crate::objective::{
    hybrid_loss, noise_pair, sft_loss, Loss, NoisedPair, Objective, PairPredictions, SftTimesteps,
    TimestepPolicy, TrainingSchedule,
};
use crate::peft::{Adapter, PeftKind};
use diffusion::pipeline::{Conditioning, GenerateRequest, Pipeline};
use diffusion::sampling::{PredictionType, SeededNoise, Timesteps};
use dist::ProcessGroup;
use pairs::{Label, PairRecord};

/// What to train on and where.
pub struct OfflineOptions {
    /// Pair shards or directories of shards (the store of a run, or an import).
    pub pairs: Vec<PathBuf>,
    /// Or: a folder of training images (+ `NAME.txt` prompts, or one sub-folder per class) or a
    /// Parquet table of image + label (a file, or a Hugging Face dataset folder),
    /// each paired with a fresh sample of the current model (method.md §3 source c; `pso_db` or
    /// `offline_pso`), or regressed on (`sft`, with cached latents).
    pub train_images: Option<PathBuf>,
    /// Prompt of training images without a `NAME.txt`.
    pub prompt: Option<String>,
    /// The image and label columns of a Parquet table of training images.
    pub columns: TableColumns,
    /// The split of a dataset folder of tables (default: `train` when its files name one).
    pub split: Option<String>,
    /// What a table's integer labels become (default: ids for a class-conditional model, names
    /// for a text-to-image one).
    pub label_as: Option<LabelAs>,
    /// SFT on images: draw classes uniformly instead of images.
    pub class_balanced: bool,
    /// SFT on images: mirror each drawn image with probability 1/2.
    pub random_flip: bool,
    /// Label every pair again with this scorer as it is read (`--relabel-with`).
    pub relabel_with: Option<Relabeler>,
    /// The run directory.
    pub out: PathBuf,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Train data-parallel over these ranks (torchrun's launch): each takes its share of the
    /// pairs, gradients are averaged, rank 0 alone writes the run directory.
    pub group: Option<Arc<ProcessGroup>>,
}

/// The model, its trainable tensors and what a micro-batch needs.
pub struct Trainer {
    /// The pipeline (its UNet carries the adapter).
    pub pipeline: Pipeline,
    /// The trainable tensors and the reference model.
    pub adapter: Adapter,
    objective: Objective,
    timesteps: Timesteps,
    distilled: Vec<u32>,
    schedule: TrainingSchedule,
    height: u32,
    width: u32,
}

impl Trainer {
    /// Loads `config.model` and attaches `config.peft`.
    pub fn load(config: &RunConfig) -> Result<Trainer, RunError> {
        let device = resolve_device(&config.model.device).map_err(RunError::Config)?;
        let pipeline = super::load_pipeline(config, device)?;
        let timesteps = if config.sampler.timesteps.is_empty() {
            Timesteps::Steps(config.sampler.steps as usize)
        } else {
            Timesteps::Explicit(config.sampler.timesteps.clone())
        };
        let scheduler = pipeline.scheduler(
            timesteps.clone(),
            config.sampler.height as i64,
            config.sampler.width as i64,
        )?;
        let schedule = TrainingSchedule::of(scheduler.config(), config.objective.zero_terminal_snr);
        let distilled: Vec<u32> = scheduler
            .timesteps()
            .iter()
            .map(|&t| schedule.index_of(t))
            .collect();
        let num_train = scheduler.config().num_train_timesteps;
        let objective = Objective::from_section(&config.objective, &distilled, num_train)?;
        if let Objective::OnlinePso(_) = objective {
            return Err(RunError::Config(
                "objective.kind = online_pso needs trajectories sampled by the current policy: \
                 run `pso online`, or replay stored pairs with objective.kind = offline_pso (or \
                 dpo, sft)"
                    .into(),
            ));
        }
        let adapter = Adapter::new(
            &pipeline.backbone,
            &pipeline.backbone_vs,
            &config.peft,
            config.run.seed,
        )?;
        Ok(Trainer {
            schedule,
            pipeline,
            adapter,
            objective,
            timesteps,
            distilled,
            height: config.sampler.height,
            width: config.sampler.width,
        })
    }

    /// The latent of one side: the stored one when it fits the configured size, else the image
    /// encoded by the VAE.
    fn latent(&self, record: &PairRecord, side: usize) -> Result<Tensor, RunError> {
        let f = self.pipeline.vae_scale_factor();
        let want = [
            self.pipeline.backbone.in_channels(),
            self.height as i64 / f,
            self.width as i64 / f,
        ];
        if let Some(t) = stored_latent(record, side).filter(|t| t.size() == want) {
            return Ok(t.to_device(self.pipeline.device()));
        }
        let what = format!(
            "pair {} of run `{}`, side {side}",
            record.pair_id, record.run_id
        );
        let image = image_tensor(&record.sides[side].image, self.height, self.width, &what)?;
        Ok(self.pipeline.encode(&image.unsqueeze(0)).squeeze_dim(0))
    }

    /// The model-side inputs of a micro-batch of pairs: latents of winners and losers (stored,
    /// or encoded from the images) and the prompts' conditioning.
    pub fn batch(&self, records: &[PairRecord]) -> Result<Batch, RunError> {
        let (mut winners, mut losers, mut conds) = (Vec::new(), Vec::new(), Vec::new());
        for r in records {
            let w = if r.label == Label::Side1 { 1 } else { 0 };
            winners.push(self.latent(r, w)?);
            losers.push(self.latent(r, 1 - w)?);
            conds.push(self.pipeline.condition(
                &r.prompt,
                None,
                0.0,
                self.height as i64,
                self.width as i64,
                1,
            )?);
        }
        Ok(Batch {
            x0_winner: Tensor::stack(&winners, 0),
            x0_loser: Tensor::stack(&losers, 0),
            cond: Conditioning::cat(&conds.iter().collect::<Vec<_>>())?,
        })
    }

    /// Latent [1, C, h, w] of an image for `prompt` sampled from the current model with the
    /// run's sampler, noise from `seed`.
    fn sample(&self, prompt: &str, seed: u64) -> Result<Tensor, RunError> {
        let request = GenerateRequest {
            prompt,
            negative_prompt: None,
            timesteps: self.timesteps.clone(),
            guidance: 0.0,
            height: self.height as i64,
            width: self.width as i64,
            num_images: 1,
            init_latents: None,
            record: false,
        };
        Ok(self
            .pipeline
            .generate(request, &mut SeededNoise::new(seed))?
            .latents)
    }

    /// [`Self::sample`] from the initial model: adapters off, DiffFit's original tensors (under
    /// full fine-tuning the policy itself, so only before the first update).
    pub fn reference_sample(&self, prompt: &str, seed: u64) -> Result<Tensor, RunError> {
        self.adapter
            .reference(&self.pipeline.backbone, |_| self.sample(prompt, seed))
    }

    /// A micro-batch of source c (method.md §3): each training image is the preferred side,
    /// against distinct images of the fixed reference `pool`, or, without one, against an image
    /// sampled now from the current model for its prompt. Both sides are conditioned on the
    /// training image's prompt; every draw comes from `seed`.
    pub fn image_batch(
        &self,
        images: &[&TrainingImage],
        pool: Option<&ReferencePool>,
        seed: u64,
    ) -> Result<Batch, RunError> {
        let _no_grad = tch::no_grad_guard();
        let pixels: Vec<&Tensor> = images.iter().map(|i| &i.pixels).collect();
        let x0_winner = self.pipeline.encode(&Tensor::stack(&pixels, 0));
        let x0_loser = match pool {
            Some(pool) => pool.draw(images.len(), seed, x0_winner.device())?,
            None => {
                let fresh = images
                    .iter()
                    .enumerate()
                    .map(|(i, image)| {
                        self.sample(&image.prompt, step_seed(seed, i as u64, u32::MAX))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::cat(&fresh, 0)
            }
        };
        let conds = images
            .iter()
            .map(|image| {
                let (h, w) = (self.height as i64, self.width as i64);
                self.pipeline.condition(&image.prompt, None, 0.0, h, w, 1)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            x0_winner,
            x0_loser,
            cond: Conditioning::cat(&conds.iter().collect::<Vec<_>>())?,
        })
    }

    /// An SFT micro-batch of training images: their cached latents (each mirrored with
    /// probability 1/2 when `random_flip`, drawn from `seed`) and prompts; on a class-conditional
    /// model each label becomes the null class with probability `label_dropout` (also drawn
    /// from `seed`). SFT reads only the winners; the losers are the same tensors.
    pub fn sft_batch(
        &self,
        images: &mut TrainingImages,
        picked: &[usize],
        random_flip: bool,
        label_dropout: f64,
        seed: u64,
    ) -> Result<Batch, RunError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5f1f);
        let dropout = if self.pipeline.is_class_conditional() {
            dropped_labels(seed, picked.len(), label_dropout)
        } else {
            vec![false; picked.len()]
        };
        let (mut latents, mut conds) = (Vec::new(), Vec::new());
        for (&i, dropped) in picked.iter().zip(dropout) {
            let side = i64::from(random_flip && rng.random_bool(0.5));
            let both = images.latents(i, |pixels| self.pipeline.encode(pixels));
            latents.push(both.get(side));
            conds.push(if dropped {
                self.pipeline.null_class_condition(1)?
            } else {
                self.pipeline.condition(
                    &images.get(i).prompt,
                    None,
                    0.0,
                    self.height as i64,
                    self.width as i64,
                    1,
                )?
            });
        }
        let x0 = Tensor::stack(&latents, 0);
        Ok(Batch {
            x0_loser: x0.shallow_clone(),
            x0_winner: x0,
            cond: Conditioning::cat(&conds.iter().collect::<Vec<_>>())?,
        })
    }

    /// The loss of one micro-batch of pairs; every random draw comes from `seed`.
    pub fn loss(&self, records: &[PairRecord], seed: u64) -> Result<Loss, RunError> {
        self.batch_loss(&self.batch(records)?, seed)
    }

    /// The loss of a prepared micro-batch; every random draw comes from `seed`.
    pub fn batch_loss(&self, batch: &Batch, seed: u64) -> Result<Loss, RunError> {
        let x0 = &batch.x0_winner;
        let pairs = x0.size()[0] as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        tch::manual_seed(seed as i64);
        // Drawn on the CPU so that a run draws the same noise on every device.
        let noise = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)).to_device(x0.device());
        let dpo = match &self.objective {
            Objective::OfflinePso(d) | Objective::Dpo(d) => d,
            Objective::Sft(at) => {
                let policy = match at {
                    SftTimesteps::Uniform => TimestepPolicy::Uniform {
                        num_train_timesteps: self.schedule.len(),
                    },
                    SftTimesteps::Distilled => TimestepPolicy::Distilled(self.distilled.clone()),
                };
                let ts = policy.draw(&mut rng, pairs);
                let x = self.schedule.add_noise(x0, &noise, &ts)?;
                let target = self.schedule.target(x0, &noise, &ts)?;
                let t = self.schedule.timestep_tensor(&ts, x0.device());
                let backbone = &self.pipeline.backbone;
                if let (true, Some(PredictionType::Epsilon), Some(ac)) = (
                    backbone.learns_variance(),
                    self.schedule.prediction(),
                    self.schedule.alphas_cumprod(),
                ) {
                    let pred =
                        self.pipeline
                            .predict_batch_with_variance(backbone, &batch.cond, &x, &t);
                    return Ok(hybrid_loss(&pred, &noise, x0, &x, &ts, ac)?);
                }
                let pred = self.pipeline.predict_batch(backbone, &batch.cond, &x, &t);
                return Ok(sft_loss(&pred, &target)?);
            }
            Objective::PsoDb(db) => {
                let ts = TimestepPolicy::Distilled(self.distilled.clone()).draw(&mut rng, pairs);
                let n = self.noised(batch, &noise, &ts)?;
                let policy =
                    self.pipeline
                        .predict_batch(&self.pipeline.backbone, &n.cond, &n.x, &n.t);
                let (train, reference) = halves(&policy);
                let p = &n.pair;
                return Ok(db.loss(&train, &reference, &p.target_winner, &p.target_loser)?);
            }
            Objective::OnlinePso(_) => unreachable!("Trainer::load refuses online_pso"),
        };
        let ts = dpo.timesteps.draw(&mut rng, pairs);
        let n = self.noised(batch, &noise, &ts)?;
        let p = &n.pair;
        let reference = self
            .adapter
            .reference(&self.pipeline.backbone, |reference| {
                self.pipeline.predict_batch(reference, &n.cond, &n.x, &n.t)
            });
        let policy = self
            .pipeline
            .predict_batch(&self.pipeline.backbone, &n.cond, &n.x, &n.t);
        let (pw, pl) = halves(&policy);
        let (rw, rl) = halves(&reference);
        Ok(dpo.loss(
            &PairPredictions {
                policy_winner: &pw,
                policy_loser: &pl,
                reference_winner: &rw,
                reference_loser: &rl,
                target_winner: &p.target_winner,
                target_loser: &p.target_loser,
            },
            &ts,
            None,
        )?)
    }
}

/// Winners and losers noised with a shared ε at shared timesteps, stacked for one UNet call.
struct Noised {
    /// The noised pair and its targets.
    pair: NoisedPair,
    /// [noisy winners; noisy losers].
    x: Tensor,
    /// Their timesteps.
    t: Tensor,
    /// The conditioning, repeated for both halves.
    cond: Conditioning,
}

impl Trainer {
    fn noised(&self, batch: &Batch, noise: &Tensor, ts: &[u32]) -> Result<Noised, RunError> {
        let pair = noise_pair(&batch.x0_winner, &batch.x0_loser, noise, ts, &self.schedule)?;
        let x = Tensor::cat(&[&pair.noisy_winner, &pair.noisy_loser], 0);
        let both: Vec<u32> = ts.iter().chain(ts).copied().collect();
        Ok(Noised {
            pair,
            x,
            t: self.schedule.timestep_tensor(&both, noise.device()),
            cond: batch.cond.repeat(2),
        })
    }
}

/// What a micro-batch feeds the models.
pub struct Batch {
    /// Winners' latents [B, C, h, w] (fp32, UNet space).
    pub x0_winner: Tensor,
    /// Losers' latents.
    pub x0_loser: Tensor,
    /// The prompts' conditioning, one row per pair.
    pub cond: Conditioning,
}

/// Where a run's micro-batches come from.
enum Source {
    /// Labelled pairs (sources a and b).
    Pairs(Box<PairStream>),
    /// Training images against fresh samples (source c).
    Images(TrainingImages),
}

impl Source {
    fn consumed(&self) -> u64 {
        match self {
            Source::Pairs(s) => s.consumed(),
            Source::Images(i) => i.consumed(),
        }
    }
}

fn halves(t: &Tensor) -> (Tensor, Tensor) {
    let parts = t.chunk(2, 0);
    (parts[0].shallow_clone(), parts[1].shallow_clone())
}

/// Mean score of the pairs' sides, when a scorer (not humans) labelled them.
fn reward_mean(records: &[PairRecord]) -> Value {
    let scored: Vec<f64> = records
        .iter()
        .filter(|r| r.scorer != "human")
        .flat_map(|r| r.sides.iter().map(|s| s.score as f64))
        .filter(|s| s.is_finite())
        .collect();
    if scored.is_empty() {
        Value::Null
    } else {
        (scored.iter().sum::<f64>() / scored.len() as f64).into()
    }
}

/// Trains until `config.learner.max_steps` (or a stop request), checkpointing as configured.
pub fn run(config: &RunConfig, opts: OfflineOptions) -> Result<Summary, RunError> {
    let trainer = Trainer::load(config)?;
    run_with(&trainer, config, opts)
}

/// [`run`] with a loaded trainer.
pub fn run_with(
    trainer: &Trainer,
    config: &RunConfig,
    opts: OfflineOptions,
) -> Result<Summary, RunError> {
    let (rank, world) = opts
        .group
        .as_ref()
        .map_or((0, 1), |g| (g.rank(), g.world_size()));
    if world > 1 && (opts.train_images.is_some() || opts.relabel_with.is_some()) {
        return Err(RunError::Config(
            "data-parallel offline runs (torchrun) train on stored pairs only for now; run \
             --train-images or --relabel-with in one process"
                .into(),
        ));
    }
    // Rank 0 writes the run directory; the others read it (checkpoints to resume) once it is.
    let dir = if rank == 0 {
        RunDir::prepare(&opts.out, config, opts.resume)?
    } else {
        RunDir {
            path: opts.out.clone(),
        }
    };
    if let Some(group) = &opts.group {
        group.barrier().map_err(LearnerError::from)?;
    }
    let (mut learner, cursor) = start_learner(
        &trainer.adapter,
        config,
        &dir,
        opts.resume,
        opts.group.clone(),
    )?;
    let mut source = match &opts.train_images {
        Some(dir) => {
            let class_conditional = trainer.pipeline.is_class_conditional();
            let set = ImageSetOptions {
                default_prompt: opts.prompt.clone(),
                columns: opts.columns.clone(),
                split: opts.split.clone(),
                label_as: opts.label_as.unwrap_or(if class_conditional {
                    LabelAs::Id
                } else {
                    LabelAs::Name
                }),
                height: config.sampler.height,
                width: config.sampler.width,
                seed: config.run.seed,
            };
            let mut images = TrainingImages::open(dir, &set)?;
            if opts.class_balanced {
                images.balance_classes();
            }
            images.skip(cursor);
            // Every prompt must condition the model (a class name of a DiT, …): fail now, not
            // at the batch that first draws it.
            for prompt in images.prompts() {
                let (h, w) = (config.sampler.height as i64, config.sampler.width as i64);
                trainer.pipeline.condition(prompt, None, 0.0, h, w, 1)?;
            }
            Source::Images(images)
        }
        None => {
            if let Objective::PsoDb(_) = trainer.objective {
                return Err(RunError::Config(
                    "objective.kind = pso_db pairs training images with fresh samples: give \
                     --train-images DIR instead of --pairs"
                        .into(),
                ));
            }
            let mut stream = PairStream::open(&opts.pairs, config.run.seed, opts.relabel_with)?
                .shard(rank, world);
            stream.skip(cursor)?;
            Source::Pairs(Box::new(stream))
        }
    };
    let pool = match (&source, &trainer.objective) {
        (Source::Images(_), Objective::PsoDb(_) | Objective::OfflinePso(_))
            if config.objective.reference_pool > 0 =>
        {
            Some(open_reference_pool(
                trainer,
                config,
                &dir,
                learner.counters().step,
            )?)
        }
        _ => None,
    };
    let mut metrics = match rank {
        0 => {
            let step = learner.counters().step;
            let metrics = Metrics::open(&dir, step)?;
            Some(match dir.events(config, step)? {
                Some(events) => metrics.with_tensorboard(events),
                None => metrics,
            })
        }
        _ => None,
    };
    tracing::info!(
        run = %dir.path.display(),
        objective = trainer.objective.kind(),
        peft = %config.peft.kind,
        trainable = trainer.adapter.numel(),
        "training"
    );
    let stop = stop_flag();
    let bar = progress(
        opts.progress && rank == 0,
        config.learner.max_steps,
        learner.counters().step,
    );
    let (batch, seed) = (config.learner.batch_size, config.run.seed);
    // Rank r draws the noise of micro-batches r·A … r·A + A − 1 of the step: N ranks draw what
    // one process accumulating N·A micro-batches would.
    let micro_offset = rank as u32 * config.learner.grad_accumulation;
    let mut summary = Summary {
        run: dir.path.clone(),
        steps: learner.counters().step,
        last_loss: None,
        checkpoint: None,
        stopped: false,
    };
    while learner.counters().step < config.learner.max_steps {
        if any_rank(stop.load(Ordering::SeqCst), opts.group.as_deref())? {
            summary.stopped = true;
            break;
        }
        let step = learner.counters().step;
        let mut seen = Vec::new();
        let backbone = &trainer.pipeline.backbone;
        let outcome = learner.step_then(
            |micro| {
                let micro_seed = step_seed(seed, step, micro_offset + micro);
                let loss = match &mut source {
                    Source::Pairs(stream) => {
                        let records = (0..batch)
                            .map(|_| stream.next_pair())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| LearnerError::Batch(Box::new(e)))?;
                        let loss = trainer.loss(&records, micro_seed);
                        seen.extend(records);
                        loss
                    }
                    Source::Images(images) => {
                        let picked: Vec<usize> = (0..batch).map(|_| images.next_index()).collect();
                        let batch = if let Objective::Sft(_) = trainer.objective {
                            trainer.sft_batch(
                                images,
                                &picked,
                                opts.random_flip,
                                config.objective.label_dropout,
                                micro_seed,
                            )
                        } else {
                            let chosen: Vec<&TrainingImage> =
                                picked.iter().map(|&i| images.get(i)).collect();
                            trainer.image_batch(&chosen, pool.as_ref(), micro_seed)
                        };
                        batch.and_then(|b| trainer.batch_loss(&b, micro_seed))
                    }
                };
                loss.map_err(|e| LearnerError::Batch(Box::new(e)))
            },
            &|| backbone.finish_recomputation(),
        );
        let report = match outcome {
            Ok(r) => r,
            Err(e @ LearnerError::NonFinite { .. }) => {
                if rank == 0 {
                    let at = save(&dir, &learner, config, source.consumed())?;
                    tracing::error!(checkpoint = %at.display(), "aborting: {e}");
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(metrics) = &mut metrics {
            let mut extra = vec![("reward_mean", reward_mean(&seen))];
            if world > 1 {
                extra.push(("world_size", world.into()));
                extra.push(("time_grad_sync_s", report.sync_seconds.into()));
            }
            metrics.write(&report, &extra)?;
        }
        summary.last_loss = Some(report.diagnostics.loss);
        summary.steps = report.step;
        bar.set_position(report.step);
        bar.set_message(format!("loss {:.4}", report.diagnostics.loss));
        if rank == 0 && report.step % config.learner.checkpoint_every == 0 {
            summary.checkpoint = Some(save(&dir, &learner, config, source.consumed())?);
        }
    }
    bar.finish_and_clear();
    if rank != 0 {
        return Ok(summary);
    }
    let last = latest_or_none(&dir.checkpoints());
    let up_to_date = last
        .as_ref()
        .is_some_and(|p| p.ends_with(checkpoint::dir_name(learner.counters().step)));
    summary.checkpoint = if up_to_date {
        last
    } else {
        Some(save(&dir, &learner, config, source.consumed())?)
    };
    Ok(summary)
}

/// The run's reference pool: stored in `dir` by its first invocation (at step 0, from the
/// initial model with `objective.class_prompt`), read back on resume.
fn open_reference_pool(
    trainer: &Trainer,
    config: &RunConfig,
    dir: &RunDir,
    step: u64,
) -> Result<ReferencePool, RunError> {
    let Some(class_prompt) = &config.objective.class_prompt else {
        return Err(RunError::Config(format!(
            "objective.kind = {} pairs training images with a pool of reference images sampled \
             from the class prompt: give --class-prompt \"a photo of a dog\" (the subject's \
             class; objective.class_prompt), or set objective.reference_pool = 0 to sample each \
             reference from the current model with the image's own prompt",
            config.objective.kind
        )));
    };
    let stored = dir.path.join(reference_pool::FILE).exists();
    if !stored && step > 0 && config.peft.kind == PeftKind::Full {
        return Err(RunError::RunDir {
            path: dir.path.clone(),
            why: format!(
                "has no {} and full fine-tuning has moved past the initial model it must be \
                 sampled from; start a new run",
                reference_pool::FILE
            ),
        });
    }
    let size = config.objective.reference_pool as usize;
    ReferencePool::open_or_build(dir, class_prompt, size, |k| {
        trainer.reference_sample(
            class_prompt,
            step_seed(config.run.seed, k as u64, u32::MAX - 1),
        )
    })
}

/// Which of `n` images of a micro-batch train on the null class: each with probability `p`,
/// from its own stream of `seed` (so mirroring draws stay as they were).
fn dropped_labels(seed: u64, n: usize, p: f64) -> Vec<bool> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd20b);
    (0..n).map(|_| p > 0.0 && rng.random_bool(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_drop_to_the_null_class_at_the_configured_rate() {
        let drawn: Vec<bool> = (0..2000)
            .flat_map(|seed| dropped_labels(seed, 8, 0.1))
            .collect();
        let rate = drawn.iter().filter(|&&d| d).count() as f64 / drawn.len() as f64;
        // 16 000 draws: the standard error of the rate is 0.0024.
        assert!((rate - 0.1).abs() < 0.01, "{rate}");
        assert!(dropped_labels(7, 64, 0.0).iter().all(|&d| !d));
        assert_eq!(dropped_labels(7, 64, 0.3), dropped_labels(7, 64, 0.3));
    }
}
