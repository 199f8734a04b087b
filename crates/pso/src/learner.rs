//! The optimizer loop around an objective: gradient accumulation, clipping, the learning-rate
//! schedule, an optional EMA of the trainable tensors, and skipping of non-finite steps.
//!
//! One [`Learner::step`] = `learner.grad_accumulation` micro-batches, each a closure that runs the
//! models and returns a [`Loss`]; their gradients are averaged, clipped and applied once.

use std::sync::Arc;
use std::time::Instant;

use dist::ProcessGroup;

use tch::{Kind, Tensor};

use serde::{Deserialize, Serialize};

use crate::problems::{failing, Problems};

use crate::objective::{Diagnostics, Loss};
use crate::optim::OptimSection;
use crate::optim::{AdamW, AdamWConfig, LrSchedule, OptimError};

/// Errors of a learner step.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// A micro-batch could not be built or evaluated.
    #[error("{0}")]
    Batch(Box<dyn std::error::Error + Send + Sync>),
    /// Too many steps in a row had a non-finite loss or gradient.
    #[error(
        "{count} optimizer steps in a row had a non-finite loss or gradient (learner.\
         max_nonfinite_steps = {count}); the run stops here. Lower optim.lr, check the data, \
         or train in f32"
    )]
    NonFinite {
        /// How many in a row.
        count: u32,
    },
    /// The optimizer refused a state.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// A collective across the data-parallel ranks failed.
    #[error(transparent)]
    Dist(#[from] dist::DistError),
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Optimizer steps done after this one (counting skipped steps).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping (non-finite when the step was skipped for it).
    pub grad_norm: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// Mean of the micro-batches' diagnostics.
    pub diagnostics: Diagnostics,
    /// Pairs (or samples) counted by the objective over the step.
    pub pairs: usize,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    /// Of those, seconds spent averaging gradients over the data-parallel ranks (the all-reduce,
    /// waiting for the slowest rank included; 0 alone).
    pub sync_seconds: f64,
}

/// Mutable learner state that a checkpoint must restore, besides tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Optimizer steps done (skipped ones included).
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient, in total.
    pub nonfinite_total: u64,
    /// ...and in a row, up to now.
    pub nonfinite_in_row: u32,
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
    /// Recompute each transformer block's activations in the backward pass instead of keeping
    /// them (SD3 / FLUX / Z-Image): the learner's activation memory drops to the block boundaries, for
    /// about a third more compute.
    pub recompute_blocks: bool,
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
            recompute_blocks: false,
        }
    }
}

impl LearnerSection {
    /// `learner.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let at_least_one = |key, v: u64| (v >= 1, key, format!("{v} is below 1"));
        failing([
            at_least_one("learner.batch_size", self.batch_size.into()),
            at_least_one("learner.grad_accumulation", self.grad_accumulation.into()),
            at_least_one("learner.refresh_every", self.refresh_every.into()),
            at_least_one("learner.max_steps", self.max_steps),
            at_least_one("learner.checkpoint_every", self.checkpoint_every),
            at_least_one("learner.keep_checkpoints", self.keep_checkpoints.into()),
            at_least_one(
                "learner.max_nonfinite_steps",
                self.max_nonfinite_steps.into(),
            ),
            (
                (0.0..1.0).contains(&self.ema_decay),
                "learner.ema_decay",
                format!("{} is not in [0, 1) (0 disables the EMA)", self.ema_decay),
            ),
        ])
    }
}

/// AdamW + schedule + accumulation + clipping + EMA over named trainable tensors.
#[derive(Debug)]
pub struct Learner {
    adamw: AdamW,
    schedule: LrSchedule,
    grad_clip: f64,
    accumulation: u32,
    ema: Option<(f64, Vec<Tensor>)>,
    max_nonfinite: u32,
    counters: Counters,
    /// The data-parallel ranks the gradients are averaged over, if more than this process.
    group: Option<Arc<ProcessGroup>>,
}

impl Learner {
    /// A learner over `params` (requiring grad) with the run's optimizer and learner sections.
    pub fn new(
        params: Vec<(String, Tensor)>,
        optim: &OptimSection,
        learner: &LearnerSection,
    ) -> Learner {
        let schedule = LrSchedule::from_config(optim, learner.max_steps);
        let adamw = AdamW::new(
            params,
            AdamWConfig {
                betas: (optim.betas[0], optim.betas[1]),
                eps: optim.eps,
                weight_decay: optim.weight_decay,
            },
        );
        let ema = (learner.ema_decay > 0.0).then(|| {
            let copies = adamw
                .fp32_params()
                .into_iter()
                .map(|(_, t)| t.copy())
                .collect();
            (learner.ema_decay, copies)
        });
        Learner {
            adamw,
            schedule,
            grad_clip: optim.grad_clip,
            accumulation: learner.grad_accumulation.max(1),
            ema,
            max_nonfinite: learner.max_nonfinite_steps.max(1),
            counters: Counters::default(),
            group: None,
        }
    }

    /// Trains data-parallel over `group`: rank 0's trainable values are copied to every rank
    /// now (call it after any resume: every rank restores the same checkpoint), and each step
    /// averages the gradients over the ranks before clipping, so the ranks stay equal.
    pub fn join(&mut self, group: Arc<ProcessGroup>) -> Result<(), LearnerError> {
        let mut values = self.adamw.fp32_params();
        for (_, value) in &mut values {
            let mut copy = value.copy();
            group.broadcast(&mut copy, 0)?;
            *value = copy;
        }
        self.adamw.set_params(values)?;
        self.group = Some(group);
        Ok(())
    }

    /// Data-parallel ranks this learner trains with (1 without a group).
    pub fn world_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world_size())
    }

    /// Step counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The optimizer (for its state).
    pub fn optimizer(&self) -> &AdamW {
        &self.adamw
    }

    /// The fp32 trainable tensors, by name.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.adamw.fp32_params()
    }

    /// The EMA tensors, named like the trainable ones, when an EMA is kept.
    pub fn ema(&self) -> Option<Vec<(String, Tensor)>> {
        self.ema.as_ref().map(|(_, copies)| {
            self.adamw
                .params()
                .iter()
                .zip(copies)
                .map(|((n, _), t)| (n.clone(), t.shallow_clone()))
                .collect()
        })
    }

    /// Restores a checkpoint: trainable values, optimizer state, EMA and counters.
    pub fn restore(
        &mut self,
        trainable: Vec<(String, Tensor)>,
        optimizer: Vec<(String, Tensor)>,
        ema: Option<Vec<(String, Tensor)>>,
        counters: Counters,
    ) -> Result<(), LearnerError> {
        self.adamw.set_params(trainable)?;
        self.adamw.load_state(optimizer)?;
        if let Some((_, copies)) = &mut self.ema {
            let values = match ema {
                Some(v) => v,
                // A checkpoint without an EMA (it was off): start the EMA at the weights.
                None => self.adamw.fp32_params(),
            };
            let map: std::collections::HashMap<String, Tensor> = values.into_iter().collect();
            for ((name, p), copy) in self.adamw.params().iter().zip(copies.iter_mut()) {
                let v = map
                    .get(name)
                    .ok_or_else(|| OptimError::Missing(format!("ema.{name}")))?;
                *copy = v.to_device(p.device()).to_kind(Kind::Float).copy();
            }
        }
        self.counters = counters;
        Ok(())
    }

    /// The learning rate of the next step.
    fn lr(&self) -> f64 {
        self.schedule.lr_at(self.counters.step)
    }

    /// One optimizer step over `learner.grad_accumulation` micro-batches: `micro(i)` returns
    /// micro-batch i's loss, which is backpropagated scaled by 1/accumulation.
    pub fn step(
        &mut self,
        micro: impl FnMut(u32) -> Result<Loss, LearnerError>,
    ) -> Result<StepReport, LearnerError> {
        self.step_over(self.accumulation, micro)
    }

    /// [`Learner::step`], calling `after_backward` after each micro-batch's backward.
    pub fn step_then(
        &mut self,
        micro: impl FnMut(u32) -> Result<Loss, LearnerError>,
        after_backward: &dyn Fn(),
    ) -> Result<StepReport, LearnerError> {
        self.step_over_then(self.accumulation, micro, after_backward)
    }

    /// One optimizer step over `count` micro-batches (online PSO: accumulation × transitions),
    /// each backpropagated scaled by 1/count.
    pub fn step_over(
        &mut self,
        count: u32,
        micro: impl FnMut(u32) -> Result<Loss, LearnerError>,
    ) -> Result<StepReport, LearnerError> {
        self.step_over_then(count, micro, &|| {})
    }

    /// [`Learner::step_over`], calling `after_backward` after each micro-batch's backward (a
    /// backbone that recomputes its blocks completes their backward there).
    pub fn step_over_then(
        &mut self,
        count: u32,
        mut micro: impl FnMut(u32) -> Result<Loss, LearnerError>,
        after_backward: &dyn Fn(),
    ) -> Result<StepReport, LearnerError> {
        let start = Instant::now();
        let lr = self.lr();
        self.adamw.zero_grad();
        let count = count.max(1);
        let mut reports = Vec::with_capacity(count as usize);
        let mut finite = true;
        for i in 0..count {
            let Loss { loss, diagnostics } = micro(i)?;
            finite &= diagnostics.loss.is_finite();
            if finite {
                (loss / count as f64).backward();
            }
            after_backward();
            reports.push(diagnostics);
        }
        let mut diagnostics = mean_diagnostics(&reports);
        let mut pairs: usize = reports.iter().map(|d| d.counted).sum();
        let mut sync_seconds = 0.0;
        if let Some(group) = self.group.clone() {
            let sync = Instant::now();
            let (all_finite, loss, counted) =
                self.average_gradients(&group, finite, diagnostics.loss, pairs)?;
            sync_seconds = sync.elapsed().as_secs_f64();
            finite = all_finite;
            diagnostics.loss = loss;
            pairs = counted;
        }
        let max_norm = if self.grad_clip > 0.0 {
            self.grad_clip
        } else {
            f64::INFINITY
        };
        let grad_norm = if finite {
            self.adamw.clip_grad_norm(max_norm)
        } else {
            f64::NAN
        };
        let skipped = !(finite && grad_norm.is_finite());
        self.counters.step += 1;
        if skipped {
            self.adamw.zero_grad();
            self.counters.nonfinite_total += 1;
            self.counters.nonfinite_in_row += 1;
        } else {
            self.adamw.step(lr);
            self.counters.nonfinite_in_row = 0;
            self.update_ema();
        }
        let report = StepReport {
            step: self.counters.step,
            lr,
            grad_norm,
            skipped,
            pairs,
            diagnostics,
            seconds: start.elapsed().as_secs_f64(),
            sync_seconds,
        };
        if self.counters.nonfinite_in_row >= self.max_nonfinite {
            return Err(LearnerError::NonFinite {
                count: self.counters.nonfinite_in_row,
            });
        }
        Ok(report)
    }

    /// Replaces every gradient with its mean over the ranks (one all-reduce of one flat fp32
    /// buffer: LoRA and DiffFit tensors are small), and agrees on the step: it is skipped on
    /// every rank when any rank's loss was not finite. Returns (every rank finite, the mean
    /// loss over the ranks, pairs counted over the ranks).
    fn average_gradients(
        &mut self,
        group: &ProcessGroup,
        finite: bool,
        loss: f64,
        pairs: usize,
    ) -> Result<(bool, f64, usize), LearnerError> {
        let params: Vec<Tensor> = self
            .adamw
            .params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        // A parameter this rank's loss did not reach still takes part, with a zero gradient.
        for p in params.iter().filter(|p| !p.grad().defined()) {
            (p * 0.0).sum(Kind::Float).backward();
        }
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        let device = grads.first().map_or(tch::Device::Cpu, |g| g.device());
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                if finite {
                    g.to_kind(Kind::Float).flatten(0, -1)
                } else {
                    g.zeros_like().to_kind(Kind::Float).flatten(0, -1)
                }
            })
            .collect();
        let extra = [
            if finite { 0.0 } else { 1.0 },
            if finite { loss as f32 } else { 0.0 },
            pairs as f32,
        ];
        let extra = Tensor::from_slice(&extra).to_device(device);
        let mut buffer = Tensor::cat(&[Tensor::cat(&flat, 0), extra], 0);
        group.all_reduce_sum(&mut buffer)?;
        let world = group.world_size() as f64;
        let tail = Vec::<f64>::try_from(
            buffer
                .narrow(0, buffer.size()[0] - 3, 3)
                .to_kind(Kind::Double),
        )
        .expect("three values");
        let all_finite = tail[0] == 0.0;
        if all_finite {
            let mut offset = 0;
            tch::no_grad(|| {
                for g in &grads {
                    let n = g.numel() as i64;
                    let mean = buffer.narrow(0, offset, n).view_as(g) / world;
                    let mut g = g.shallow_clone();
                    g.copy_(&mean);
                    offset += n;
                }
            });
        }
        let loss = if all_finite {
            tail[1] / world
        } else {
            f64::NAN
        };
        Ok((all_finite, loss, tail[2].round() as usize))
    }

    fn update_ema(&mut self) {
        let Some((decay, copies)) = &mut self.ema else {
            return;
        };
        let values = self.adamw.fp32_params();
        tch::no_grad(|| {
            for (copy, (_, v)) in copies.iter_mut().zip(values) {
                let _ = copy.lerp_(&v, 1.0 - *decay);
            }
        });
    }
}

/// The mean of each diagnostic over micro-batches (counts are summed).
fn mean_diagnostics(all: &[Diagnostics]) -> Diagnostics {
    let n = all.len().max(1) as f64;
    let mean = |f: fn(&Diagnostics) -> Option<f64>| {
        let present: Vec<f64> = all.iter().filter_map(f).collect();
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
    };
    Diagnostics {
        loss: all.iter().map(|d| d.loss).sum::<f64>() / n,
        counted: all.iter().map(|d| d.counted).sum(),
        skipped: all.iter().map(|d| d.skipped).sum(),
        margin: mean(|d| d.margin),
        accuracy: mean(|d| d.accuracy),
        log_ratio_winner: mean(|d| d.log_ratio_winner),
        log_ratio_loser: mean(|d| d.log_ratio_loser),
        clamped_fraction: mean(|d| d.clamped_fraction),
        mse_policy: mean(|d| d.mse_policy),
        mse_reference: mean(|d| d.mse_reference),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn setup(accumulation: u32, ema: f64) -> (Tensor, Learner) {
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let optim = OptimSection {
            lr: 0.1,
            weight_decay: 0.0,
            grad_clip: 0.0,
            ..OptimSection::default()
        };
        let learner = LearnerSection {
            grad_accumulation: accumulation,
            ema_decay: ema,
            max_nonfinite_steps: 2,
            ..LearnerSection::default()
        };
        let l = Learner::new(vec![("w".into(), w.shallow_clone())], &optim, &learner);
        (w, l)
    }

    fn quadratic(w: &Tensor, target: f32) -> Loss {
        let loss = (w - target as f64).square().sum(Kind::Float);
        Loss {
            diagnostics: Diagnostics {
                loss: loss.double_value(&[]),
                counted: 1,
                ..Diagnostics::default()
            },
            loss,
        }
    }

    #[test]
    fn accumulation_averages_the_micro_batch_gradients() {
        // Two micro-batches pulling to 0 and 2 equal one pulling to their mean, 1.
        let (w2, mut two) = setup(2, 0.0);
        let (w1, mut one) = setup(1, 0.0);
        let r = two
            .step(|i| Ok(quadratic(&w2, if i == 0 { 0.0 } else { 2.0 })))
            .unwrap();
        one.step(|_| Ok(quadratic(&w1, 1.0))).unwrap();
        assert!(w2.allclose(&w1, 1e-6, 1e-7, false));
        assert_eq!((r.step, r.pairs, r.skipped), (1, 2, false));
        // Gradients of the mean-of-two loss at w = [1, -2]: 2(w − 1) = [0, −6].
        assert!((r.grad_norm - 6.0).abs() < 1e-5, "{}", r.grad_norm);
    }

    #[test]
    fn non_finite_steps_are_skipped_counted_and_abort_when_in_a_row() {
        let (w, mut l) = setup(1, 0.5);
        let before = w.copy();
        let nan = |w: &Tensor| {
            let mut loss = quadratic(w, 0.0);
            loss.loss = &loss.loss * f64::NAN;
            loss.diagnostics.loss = f64::NAN;
            loss
        };
        let r = l.step(|_| Ok(nan(&w))).unwrap();
        assert!(r.skipped);
        assert!(
            w.equal(&before),
            "a skipped step must not change the weights"
        );
        l.step(|_| Ok(quadratic(&w, 0.0))).unwrap();
        assert_eq!(
            l.counters(),
            Counters {
                step: 2,
                nonfinite_total: 1,
                nonfinite_in_row: 0
            }
        );
        // The EMA moved halfway towards the one real update.
        let ema = &l.ema().unwrap()[0].1;
        let want = (&before + &w.detach()) * 0.5;
        assert!(ema.allclose(&want, 1e-6, 1e-7, false));
        l.step(|_| Ok(nan(&w))).unwrap();
        let e = l.step(|_| Ok(nan(&w))).unwrap_err();
        assert!(matches!(e, LearnerError::NonFinite { count: 2 }), "{e}");
        assert_eq!(w.device(), Device::Cpu);
    }
}
