//! The learner side of `pso online`: the online PSO loss over stored trajectories, or SFT.

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::check;
use crate::actor::ActorSettings;
use crate::config::RunConfig;
use crate::objective::online_pso::{OnlinePso, Transitions};
use crate::objective::{sft_loss, Loss, ObjectiveKind, SftTimesteps, TrainingSchedule};
use crate::peft::Adapter;
use crate::run::rounds::{Round, TrainingPair};
use crate::run::{load_pipeline, step_seed, RunError};
use diffusion::pipeline::{Conditioning, Pipeline};
use diffusion::sampling::{NoiseSource, Scheduler, SeededNoise, Timesteps};

/// What the learner minimises.
enum OnlineObjective {
    /// Online PSO over the stored transitions.
    Pso(OnlinePso),
    /// The SFT baseline: ε/v (flow: velocity) regression on the winners' final latents, at
    /// uniform timesteps or (`distilled`) at the sampler's.
    Sft {
        schedule: TrainingSchedule,
        distilled: Option<Vec<u32>>,
    },
}

/// The learner's model: the pipeline with its adapter, the objective and the schedule.
pub struct OnlineTrainer {
    /// The pipeline (its UNet carries the adapter).
    pub pipeline: Pipeline,
    /// The trainable tensors and the reference model.
    pub adapter: Adapter,
    objective: OnlineObjective,
    pub(super) scheduler: Scheduler,
    stochastic: Vec<usize>,
    settings: ActorSettings,
}

/// A pair moved to the learner's device, with its prompt's conditioning.
pub struct Prepared {
    pair: TrainingPair,
    cond: Conditioning,
}

/// What the actor samples, from the config and the loaded pipeline.
pub(super) fn actor_settings(config: &RunConfig) -> ActorSettings {
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
pub(super) fn attach(pipeline: &Pipeline, config: &RunConfig) -> Result<Adapter, RunError> {
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
        let scheduler =
            pipeline.scheduler(settings.timesteps.clone(), settings.height, settings.width)?;
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
                 stochastic transitions; use euler_ancestral, lcm, or ddim with eta > 0 (a \
                 flow-matching model: sampler.flow_kernel = \"renoise\" or \"sde\")",
                config.sampler.name
            )));
        }
        let objective = if config.objective.kind == ObjectiveKind::Sft {
            let schedule = TrainingSchedule::of(
                &pipeline.scheduler_config,
                config.objective.zero_terminal_snr,
            );
            OnlineObjective::Sft {
                distilled: (config.objective.sft_timesteps == SftTimesteps::Distilled).then(|| {
                    scheduler
                        .timesteps()
                        .iter()
                        .map(|&t| match &schedule {
                            // The sampler's integral timesteps, as training indices.
                            TrainingSchedule::Vp { .. } => t.round() as u32,
                            TrainingSchedule::Flow { .. } => schedule.index_of(t),
                        })
                        .collect()
                }),
                schedule,
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

    /// Steps of the sampler's schedule (a trajectory holds one latent more).
    pub fn scheduler_steps(&self) -> usize {
        self.scheduler.num_steps()
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
                schedule,
                distilled,
            } => return self.sft_loss(pairs, steps, schedule, distilled.as_deref()),
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
        schedule: &TrainingSchedule,
        distilled: Option<&[u32]>,
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
            timesteps.push(sft_timestep(seed, schedule.len(), distilled));
            let mut draw = SeededNoise::new(seed);
            noise.extend(draw.draw(&x0.size()[1..], 1)?);
        }
        let noise = Tensor::stack(&noise, 0).to_device(device);
        let x = schedule.add_noise(&x0, &noise, &timesteps)?;
        let target = schedule.target(&x0, &noise, &timesteps)?;
        let t: Vec<f32> = timesteps
            .iter()
            .map(|&t| schedule.model_timestep(t))
            .collect();
        let t = Tensor::from_slice(&t).to_device(device);
        let conds: Vec<&Conditioning> = pairs.iter().map(|p| &p.cond).collect();
        let cond = Conditioning::cat(&conds)?;
        let pred = self
            .pipeline
            .predict_batch(&self.pipeline.backbone, &cond, &x, &t);
        Ok(sft_loss(&pred, &target)?)
    }
}

/// The timestep SFT noises one winner at, from its seed: uniform over the `train_steps` of the
/// training schedule, or one of the `distilled` timesteps.
fn sft_timestep(seed: u64, train_steps: usize, distilled: Option<&[u32]>) -> u32 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match distilled {
        None => rand::Rng::random_range(&mut rng, 0..train_steps as u32),
        Some(list) => list[rand::Rng::random_range(&mut rng, 0..list.len())],
    }
}

#[cfg(test)]
mod sft_tests {
    use super::*;

    #[test]
    fn sft_draws_distilled_timesteps_only_when_asked() {
        let distilled = [999, 759, 499, 259];
        let draws: Vec<u32> = (0..400)
            .map(|seed| sft_timestep(seed, 1000, Some(&distilled)))
            .collect();
        for t in distilled {
            assert!(draws.contains(&t), "{t} never drawn");
        }
        assert!(draws.iter().all(|t| distilled.contains(t)));
        let uniform: std::collections::HashSet<u32> = (0..400)
            .map(|seed| sft_timestep(seed, 1000, None))
            .collect();
        assert!(uniform.len() > 300, "{} distinct of 400", uniform.len());
        assert!(uniform.iter().all(|&t| t < 1000));
    }
}
