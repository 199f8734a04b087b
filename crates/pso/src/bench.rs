//! Throughput of pso's hot paths on this machine, for `pso bench` and the GPU proof
//! (scripts/gpu-check.sh): images per second of the sampling pipeline and of a scorer, and
//! seconds per online-PSO learner step. Each runs once to warm up (CUDA loads and tunes its
//! kernels on the first call) before the timed runs; every timed call ends in a value on the
//! host, so a GPU's queued work is inside the time.

use std::time::Instant;

use diffusion::pipeline::{GenerateRequest, Pipeline};
use diffusion::sampling::{SeededNoise, Timesteps};
use image::RgbImage;
use reward::{score_checked, RewardError, ScoreItem, Scorer};
use tch::{Device, Kind, Tensor};

use crate::config::RunConfig;
use crate::learner::{Learner, LearnerError};
use crate::run::online::{OnlineTrainer, Prepared};
use crate::run::rounds::{Round, TrainingPair};
use crate::run::RunError;

/// Best images/s of `repeats` calls generating `batch` images of `height`×`width` in `steps`
/// steps (prompt encoding, sampling and decoding to 8-bit images).
pub fn sample_rate(
    pipeline: &Pipeline,
    prompt: &str,
    steps: usize,
    batch: i64,
    (height, width): (i64, i64),
    repeats: usize,
) -> Result<f64, RunError> {
    let run = || -> Result<f64, RunError> {
        let request = GenerateRequest {
            prompt,
            negative_prompt: None,
            timesteps: Timesteps::Steps(steps),
            guidance: 0.0,
            height,
            width,
            num_images: batch,
            init_latents: None,
            record: false,
        };
        let start = Instant::now();
        let out = pipeline.generate(request, &mut SeededNoise::new(0))?;
        std::hint::black_box(&out.images);
        Ok(start.elapsed().as_secs_f64())
    };
    run()?;
    let best = best_of(repeats, run)?;
    Ok(batch as f64 / best)
}

/// Best images/s of `repeats` passes scoring `images` against `prompt` in batches of `batch`.
pub fn score_rate(
    scorer: &dyn Scorer,
    images: &[RgbImage],
    prompt: &str,
    batch: usize,
    repeats: usize,
) -> Result<f64, RewardError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RewardError::Config(format!("cannot start a tokio runtime: {e}")))?;
    let items: Vec<ScoreItem> = images
        .iter()
        .map(|image| ScoreItem { prompt, image })
        .collect();
    let pass = || -> Result<f64, RewardError> {
        let start = Instant::now();
        for chunk in items.chunks(batch.max(1)) {
            std::hint::black_box(runtime.block_on(score_checked(scorer, chunk))?);
        }
        Ok(start.elapsed().as_secs_f64())
    };
    pass()?;
    let best = best_of(repeats, pass)?;
    Ok(images.len() as f64 / best)
}

/// What [`online_step_seconds`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepTiming {
    /// Median seconds of one optimizer step.
    pub seconds: f64,
    /// Pairs in the step.
    pub pairs: usize,
    /// Transitions per pair (forward and backward passes of the step).
    pub transitions: usize,
    /// Trainable parameters.
    pub trainable: i64,
}

/// Median seconds of one online-PSO optimizer step of `config` (its model, dtype, PEFT,
/// optimizer and sampler) on `device`, over `pairs` pairs of random trajectories, each step
/// visiting every stochastic transition as `pso online` does; `repeats` timed steps after one.
pub fn online_step_seconds(
    config: &RunConfig,
    device: Device,
    pairs: usize,
    repeats: usize,
) -> Result<StepTiming, RunError> {
    let trainer = OnlineTrainer::load(config, device)?;
    let mut learner = Learner::new(
        trainer.adapter.params_shallow(),
        &config.optim,
        &config.learner,
    );
    let settings = trainer.settings().clone();
    let f = trainer.pipeline.vae_scale_factor();
    let channels = trainer.pipeline.backbone.in_channels();
    let steps = trainer.scheduler_steps();
    let shape = [
        steps as i64 + 1,
        channels,
        settings.height / f,
        settings.width / f,
    ];
    let trajectory = || Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let round = Round {
        index: 0,
        policy_version: 0,
        pairs: (0..pairs)
            .map(|i| TrainingPair {
                pair_id: i as i64,
                prompt: "a photo of a cat".into(),
                winner: trajectory(),
                loser: trajectory(),
                counted: true,
                margin: 1.0,
            })
            .collect(),
        scores: vec![0.0; 2 * pairs],
        actor_seconds: 0.0,
        reward_wait_seconds: 0.0,
        images: 2 * pairs,
        parts: Vec::new(),
    };
    let prepared = trainer.prepare(round)?;
    let chosen: Vec<&Prepared> = prepared.iter().collect();
    let transitions = trainer.stochastic_steps().to_vec();
    let backbone = &trainer.pipeline.backbone;
    let mut step = || -> Result<f64, RunError> {
        let report = learner.step_over_then(
            transitions.len() as u32,
            |micro| {
                let at = vec![transitions[micro as usize]; chosen.len()];
                trainer
                    .loss(&chosen, &at)
                    .map_err(|e| LearnerError::Batch(Box::new(e)))
            },
            &|| backbone.finish_recomputation(),
        )?;
        Ok(report.seconds)
    };
    step()?;
    let mut times = (0..repeats.max(1))
        .map(|_| step())
        .collect::<Result<Vec<_>, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(StepTiming {
        seconds: times[times.len() / 2],
        pairs,
        transitions: transitions.len(),
        trainable: trainer
            .adapter
            .params_shallow()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum(),
    })
}

/// A square image with smooth structure and mild noise, like a sample: what a scorer is timed
/// on (its preprocessing cost depends on the content through the resize only mildly).
pub fn sample_like_image(seed: u64, side: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(6364136223846793005) | 1;
    RgbImage::from_fn(side, side, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 59) as i32) - 16;
        let channel = |k: u32| {
            let phase = (x * k + y * (7 - k)) as f32 / 40.0 + seed as f32;
            ((phase.sin() * 100.0 + 128.0) as i32 + noise).clamp(0, 255) as u8
        };
        image::Rgb([channel(1), channel(3), channel(5)])
    })
}

/// The shortest of `repeats` (at least one) timings.
fn best_of<E>(repeats: usize, mut time: impl FnMut() -> Result<f64, E>) -> Result<f64, E> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        best = best.min(time()?);
    }
    Ok(best)
}
