//! The actor of the online loop (method.md §2.1): K images per prompt from the current policy
//! along the distilled schedule, guidance off, each from its own seed, keeping every latent of
//! each trajectory for the learner.

use tch::{Kind, Tensor};

use crate::seed::step_seed;
use diffusion::pipeline::{GenerateRequest, Pipeline, PipelineError};
use diffusion::sampling::{ExplicitNoise, NoiseSource, SeededNoise, Timesteps};

/// The seed of sample `sample` of prompt `prompt_index` in round `round`: stored with the pair,
/// it regenerates the image (`pso sample --seed`) under the pair's policy version.
pub fn image_seed(run_seed: u64, prompt_index: usize, sample: u32, round: u64) -> u64 {
    step_seed(step_seed(run_seed, round, sample), prompt_index as u64, 0)
}

/// The K samples of one prompt.
#[derive(Debug)]
pub struct Group {
    /// The round that sampled it.
    pub round: u64,
    /// Its place among the round's prompts.
    pub slot: u32,
    /// Index of the prompt in the prompt set.
    pub prompt_index: usize,
    /// The prompt.
    pub prompt: String,
    /// The seed of each sample.
    pub seeds: Vec<u64>,
    /// Every latent of each trajectory, x_T first and x0 last: [K, steps + 1, C, h, w], fp32.
    pub trajectories: Tensor,
    /// The decoded images, [K, H, W, 3] uint8 on the CPU.
    pub images: Tensor,
    /// Optimizer steps of the policy that sampled it.
    pub policy_version: u64,
}

/// What the actor samples: the run's schedule, size and group size.
#[derive(Debug, Clone)]
pub struct ActorSettings {
    /// The distilled schedule.
    pub timesteps: Timesteps,
    /// Image height in pixels.
    pub height: i64,
    /// Image width in pixels.
    pub width: i64,
    /// Samples per prompt (K ≥ 2).
    pub samples_per_prompt: u32,
    /// The run seed.
    pub seed: u64,
}

/// Samples group after group with a pipeline whose UNet carries the policy's adapter.
pub struct Actor<'a> {
    pipeline: &'a Pipeline,
    settings: ActorSettings,
    /// Noise tensors per image: the initial latents and one per step that draws noise.
    draws: usize,
}

impl<'a> Actor<'a> {
    /// An actor sampling with `pipeline`.
    pub fn new(
        pipeline: &'a Pipeline,
        settings: ActorSettings,
    ) -> Result<Actor<'a>, PipelineError> {
        let scheduler =
            pipeline.scheduler(settings.timesteps.clone(), settings.height, settings.width)?;
        let draws = 1
            + (0..scheduler.num_steps())
                .filter(|&i| scheduler.draws_noise(i))
                .count();
        Ok(Actor {
            pipeline,
            settings,
            draws,
        })
    }

    /// Samples the K images of `prompt` (prompt set index `prompt_index`) for `round`.
    pub fn sample(
        &self,
        round: u64,
        slot: u32,
        prompt_index: usize,
        prompt: &str,
        policy_version: u64,
    ) -> Result<Group, PipelineError> {
        let s = &self.settings;
        let k = s.samples_per_prompt;
        let seeds: Vec<u64> = (0..k)
            .map(|i| image_seed(s.seed, prompt_index, i, round))
            .collect();
        let noise = self.noise(&seeds)?;
        let generated = self.pipeline.generate(
            GenerateRequest {
                prompt,
                negative_prompt: None,
                timesteps: s.timesteps.clone(),
                guidance: 0.0,
                height: s.height,
                width: s.width,
                num_images: k as i64,
                init_latents: None,
                record: true,
            },
            &mut ExplicitNoise::new(noise),
        )?;
        let trajectory = generated
            .trajectory
            .expect("the actor asks for its trajectories");
        Ok(Group {
            round,
            slot,
            prompt_index,
            prompt: prompt.to_owned(),
            seeds,
            trajectories: Tensor::stack(&trajectory.latents, 1).to_kind(Kind::Float),
            images: generated.images,
            policy_version,
        })
    }

    /// The noise of K images, each drawn as `pso sample --seed S` draws it for one image, and
    /// stacked along the batch draw by draw.
    fn noise(&self, seeds: &[u64]) -> Result<Vec<Tensor>, PipelineError> {
        let p = self.pipeline;
        let f = p.vae_scale_factor();
        let shape = [
            1,
            p.backbone.in_channels(),
            self.settings.height / f,
            self.settings.width / f,
        ];
        let s = &self.settings;
        let scheduler = p.scheduler(s.timesteps.clone(), s.height, s.width)?;
        let draws = 1
            + (0..scheduler.num_steps())
                .filter(|&i| scheduler.draws_noise(i))
                .count();
        let per_image = seeds
            .iter()
            .map(|&seed| SeededNoise::new(seed).draw(&shape, draws))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((0..self.draws)
            .map(|d| {
                let parts: Vec<&Tensor> = per_image.iter().map(|n| &n[d]).collect();
                Tensor::cat(&parts, 0)
            })
            .collect())
    }
}
