//! The learner's per-round loop of `pso online`: take a round, train on it, record, checkpoint.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tch::Tensor;

use super::actor_thread::{publish, Rounds};
use super::trainer::{OnlineTrainer, Prepared};
use super::{OnlineOptions, Totals};
use crate::actor::Actor;
use crate::checkpoint;
use crate::config::RunConfig;
use crate::learner::{Learner, LearnerError, StepReport};
use crate::run::eval::Evaluator;
use crate::run::label::PatientScorer;
use crate::run::rounds::Round;
use crate::run::{
    any_rank, latest_or_none, progress, save, step_seed, Metrics, RunDir, RunError, Summary,
};
use dist::ProcessGroup;
use pairs::writer::AsyncPairWriter;

/// The state of the learner's loop.
pub(super) struct Loop<'a> {
    pub(super) config: &'a RunConfig,
    pub(super) opts: &'a OnlineOptions,
    pub(super) dir: &'a RunDir,
    pub(super) trainer: &'a OnlineTrainer,
    pub(super) learner: &'a mut Learner,
    /// The data-parallel group (None alone).
    pub(super) group: Option<Arc<ProcessGroup>>,
    /// Rank 0's metrics (None on the other ranks).
    pub(super) metrics: Option<Metrics>,
    pub(super) evaluator: Option<&'a Evaluator>,
    pub(super) runtime: tokio::runtime::Handle,
    /// Set by a stop request.
    pub(super) halt: Arc<AtomicBool>,
    /// What round sampling watches: `halt`, or (data-parallel) a flag never set, so that every
    /// rank finishes its round and the stop is agreed on at the next step.
    pub(super) sampling_halt: Arc<AtomicBool>,
    pub(super) writer: &'a Arc<AsyncPairWriter>,
    pub(super) totals: Totals,
    /// Step of the last checkpoint.
    pub(super) last_checkpoint: u64,
    pub(super) summary: Summary,
    /// The next round to train on (the checkpoint's data cursor).
    pub(super) cursor: u64,
}

impl Loop<'_> {
    fn step(&self) -> u64 {
        self.learner.counters().step
    }

    /// This process's data-parallel rank (0 alone).
    fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world_size())
    }

    fn out_of_time(&self) -> bool {
        self.opts
            .max_hours
            .is_some_and(|h| self.totals.started.elapsed().as_secs_f64() >= h * 3600.0)
    }

    /// Whether to stop now: a stop request or `--max-hours` here or (data-parallel) on any rank,
    /// or the last step done. Every rank calls it at the same points.
    fn should_stop(&mut self) -> Result<bool, RunError> {
        let asked = self.halt.load(Ordering::SeqCst);
        let timed_out = !asked && self.out_of_time();
        if timed_out {
            tracing::info!("--max-hours reached");
        }
        if any_rank(asked || timed_out, self.group.as_deref())? {
            self.summary.stopped = true;
            return Ok(true);
        }
        Ok(self.step() >= self.config.learner.max_steps)
    }

    pub(super) fn drive(
        &mut self,
        rounds: &mut Rounds,
        scorer: &PatientScorer,
    ) -> Result<(), RunError> {
        let bar = progress(
            self.opts.progress && self.rank() == 0,
            self.config.learner.max_steps,
            self.step(),
        );
        if self.step() == 0 && !self.opts.resume {
            self.evaluate()?;
        }
        let trainer = self.trainer;
        let inline_actor = Actor::new(&trainer.pipeline, trainer.settings().clone())?;
        let mut last_log = Instant::now();
        while !self.should_stop()? {
            let round = match rounds {
                Rounds::Inline { maker, next } => {
                    match maker.make(&inline_actor, *next, self.step(), &self.sampling_halt)? {
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
            let stats = RoundStats::of(&round).over_ranks(self.group.as_deref())?;
            self.totals.pairs += stats.pairs;
            self.totals.images += stats.images;
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
            let finished = self.train_round(round, stats, staleness, rounds, &bar)?;
            if finished
                && self.step() - self.last_checkpoint >= self.config.learner.checkpoint_every
            {
                self.checkpoint()?;
            }
            if !self.opts.progress
                && self.rank() == 0
                && last_log.elapsed() >= Duration::from_secs(30)
            {
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
        stats: RoundStats,
        staleness: u64,
        rounds: &Rounds,
        bar: &indicatif::ProgressBar,
    ) -> Result<bool, RunError> {
        let c = self.config;
        let index = round.index;
        let (rank, world) = (self.rank(), self.world());
        let version = round.policy_version;
        let prepared = self.trainer.prepare(round)?;
        if prepared.is_empty() {
            self.cursor = index + 1;
            return Ok(true);
        }
        let mut order: Vec<usize> = (0..prepared.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(step_seed(
            c.run.seed,
            index * world as u64 + rank as u64,
            u32::MAX - 2,
        )));
        let (batch, accumulation) = (c.learner.batch_size as usize, c.learner.grad_accumulation);
        let per_step = batch * accumulation as usize;
        let transitions = self.trainer.stochastic_steps();
        let t = transitions.len() as u32;
        for k in 0..c.learner.refresh_every as usize {
            if self.should_stop()? {
                self.cursor = index + 1;
                return Ok(false);
            }
            let chosen: Vec<&Prepared> = (0..per_step)
                .map(|i| &prepared[order[(k * per_step + i) % order.len()]])
                .collect();
            let step = self.step();
            // Each rank its own draw of transitions (rank 0's is the single process's).
            let mut rng = ChaCha8Rng::seed_from_u64(step_seed(c.run.seed, step, rank as u32));
            let perms: Vec<Vec<usize>> = chosen
                .iter()
                .map(|_| {
                    let mut p = transitions.to_vec();
                    p.shuffle(&mut rng);
                    p
                })
                .collect();
            let trainer = self.trainer;
            let backbone = &trainer.pipeline.backbone;
            let outcome = self.learner.step_over_then(
                accumulation * t,
                |micro| {
                    let (a, j) = ((micro / t) as usize, (micro % t) as usize);
                    let rows = a * batch..(a + 1) * batch;
                    let steps: Vec<usize> = perms[rows.clone()].iter().map(|p| p[j]).collect();
                    trainer
                        .loss(&chosen[rows], &steps)
                        .map_err(|e| LearnerError::Batch(Box::new(e)))
                },
                &|| backbone.finish_recomputation(),
            );
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
        self.summary.last_loss = Some(report.diagnostics.loss);
        self.summary.steps = report.step;
        let world = self.world();
        let Some(metrics) = &mut self.metrics else {
            return Ok(());
        };
        let wall = self.totals.started.elapsed().as_secs_f64().max(1e-9);
        let f = |v: f64| Value::from(v.is_finite().then_some(v));
        let mut extra = vec![
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
        ];
        if world > 1 {
            extra.push(("world_size", world.into()));
            extra.push(("time_grad_sync_s", f(report.sync_seconds)));
        }
        let parts: Vec<(String, Value)> = stats
            .parts
            .iter()
            .map(|(name, sum, count)| (format!("reward/{name}"), f(sum / (*count).max(1) as f64)))
            .collect();
        extra.extend(parts.iter().map(|(k, v)| (k.as_str(), v.clone())));
        metrics.write(report, &extra)?;
        Ok(())
    }

    /// Rank 0's fixed-seed evaluation (the other ranks have no evaluator).
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

    /// Flushes the pair store and (rank 0) writes a checkpoint whose cursor is the next round;
    /// returns where, or None on the other ranks.
    pub(super) fn checkpoint(&mut self) -> Result<Option<PathBuf>, RunError> {
        self.runtime.block_on(self.writer.flush())?;
        self.last_checkpoint = self.step();
        if self.rank() != 0 {
            return Ok(None);
        }
        let at = save(self.dir, self.learner, self.config, self.cursor)?;
        self.summary.checkpoint = Some(at.clone());
        Ok(Some(at))
    }

    /// The final checkpoint, unless the newest one is already of this step.
    pub(super) fn finish(&mut self) -> Result<(), RunError> {
        if self.rank() != 0 {
            return self.checkpoint().map(drop);
        }
        let last = latest_or_none(&self.dir.checkpoints());
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

/// Reward statistics of a round (data-parallel: of the round of every rank).
struct RoundStats {
    mean: f64,
    std: f64,
    max: f64,
    margin: f64,
    actor_seconds: f64,
    reward_wait_seconds: f64,
    pairs: u64,
    images: u64,
    /// Pairs the loss counts (the margin is their mean).
    counted: u64,
    /// A composite scorer's parts: (name, sum of raw scores, count).
    parts: Vec<(String, f64, u64)>,
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
            pairs: round.pairs.len() as u64,
            images: round.images as u64,
            counted: counted.len() as u64,
            parts: round.parts.clone(),
        }
    }

    /// The statistics of the rounds every rank sampled at this point (one all-reduce of a few
    /// numbers; seconds are the mean over the ranks). Alone: unchanged.
    fn over_ranks(self, group: Option<&ProcessGroup>) -> Result<RoundStats, RunError> {
        let Some(group) = group else {
            return Ok(self);
        };
        let (rank, world) = (group.rank(), group.world_size());
        let n = self.images as f64;
        let counted = self.counted as f64;
        // Sums, then one slot per rank for its maximum (a gather by sum).
        let mut values = vec![
            self.mean * n,
            (self.std.powi(2) + self.mean.powi(2)) * n,
            n,
            self.margin * counted,
            counted,
            self.actor_seconds,
            self.reward_wait_seconds,
            self.pairs as f64,
        ];
        // Every rank runs the same scorer config, so the same parts in the same order.
        for (_, sum, count) in &self.parts {
            values.extend([*sum, *count as f64]);
        }
        let sums = values.len();
        values.extend((0..world).map(|r| if r == rank { self.max } else { 0.0 }));
        let mut t = Tensor::from_slice(&values);
        group.all_reduce_sum(&mut t).map_err(LearnerError::from)?;
        let v = Vec::<f64>::try_from(&t).map_err(|e| RunError::Data(e.to_string()))?;
        let n = v[2].max(1.0);
        let mean = v[0] / n;
        Ok(RoundStats {
            mean,
            std: (v[1] / n - mean * mean).max(0.0).sqrt(),
            max: v[sums..].iter().copied().fold(f64::NAN, f64::max),
            margin: v[3] / v[4].max(1.0),
            actor_seconds: v[5] / world as f64,
            reward_wait_seconds: v[6] / world as f64,
            pairs: v[7] as u64,
            images: v[2] as u64,
            counted: v[4] as u64,
            parts: self
                .parts
                .iter()
                .enumerate()
                .map(|(i, (name, _, _))| (name.clone(), v[8 + 2 * i], v[9 + 2 * i] as u64))
                .collect(),
        })
    }
}
