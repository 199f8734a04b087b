//! `pso bench`: how fast this binary samples, scores and trains on this machine, as JSON.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use diffusion::pipeline::{LoadOptions, Pipeline};
use pso::config::{resolve_device, DType};
use reward::{build_scorer, ScorerKind};
use serde_json::json;

use super::scorer_kind;
use super::train::ConfigArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images/s of text-to-image sampling: prompt encoding, the steps, VAE decoding to 8-bit.
    Sample(SampleBench),
    /// Images/s of a scorer (preprocessing and the model), on generated 512² images.
    Score(ScoreBench),
    /// Seconds per online-PSO optimizer step of a run config (its model, dtype, PEFT, sampler),
    /// on random trajectories.
    Learn(LearnBench),
}

#[derive(Args)]
pub struct SampleBench {
    /// Diffusers pipeline folder or hub id.
    #[arg(long)]
    model: String,
    /// Step counts to time, e.g. 1,4.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    steps: Vec<usize>,
    /// Batch sizes to time, e.g. 1,8.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<i64>,
    /// Image height and width in pixels (default: the model's training size).
    #[arg(long)]
    size: Option<i64>,
    /// Weights dtype (default fp16 on CUDA, fp32 on CPU).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed calls per case after one warm-up; the best counts.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(Args)]
pub struct ScoreBench {
    /// Which scorer (any that scores in this process).
    #[arg(long, value_parser = scorer_kind(ScorerKind::ALL.into_iter().filter(|k| k.is_local())))]
    scorer: ScorerKind,
    /// Model folder or hub id (pixel: a metric).
    #[arg(long)]
    model: String,
    /// Images per pass.
    #[arg(long, default_value_t = 64)]
    images: usize,
    /// Images per scorer call.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Timed passes after one warm-up; the best counts.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(Args)]
pub struct LearnBench {
    #[command(flatten)]
    config: ConfigArgs,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Timed steps after one warm-up; the median counts.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

/// Runs a `pso bench` subcommand and prints its result as one JSON object.
pub fn run(command: BenchCommand) -> Result<()> {
    let result = match command {
        BenchCommand::Sample(args) => sample(args)?,
        BenchCommand::Score(args) => score(args)?,
        BenchCommand::Learn(args) => learn(args)?,
    };
    println!("{result}");
    Ok(())
}

fn sample(args: SampleBench) -> Result<serde_json::Value> {
    anyhow::ensure!(
        args.steps.iter().all(|s| (1..=1000).contains(s)),
        "--steps {:?}: each must be in 1..=1000",
        args.steps
    );
    anyhow::ensure!(
        args.batch.iter().all(|b| (1..=1024).contains(b)),
        "--batch {:?}: each must be in 1..=1024",
        args.batch
    );
    if let Some(size) = args.size {
        anyhow::ensure!(
            (8..=4096).contains(&size) && size % 8 == 0,
            "--size {size} is not a multiple of 8 in 8..=4096"
        );
    }
    let device = resolve_device(&args.device).map_err(anyhow::Error::msg)?;
    let dtype = args.dtype.unwrap_or(if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    });
    let root = hf::hub::resolve_model(&args.model, None)?;
    let pipeline = Pipeline::load(
        &root,
        &LoadOptions {
            device,
            kind: dtype.kind(),
            variant: None,
            backbone_weights: None,
            max_sequence_length: None,
            text_encoder_device: None,
        },
    )
    .with_context(|| format!("loading {}", root.display()))?;
    anyhow::ensure!(
        !pipeline.is_class_conditional(),
        "{} is a class-conditional (DiT) pipeline; pso bench sample times text-to-image pipelines",
        root.display()
    );
    let size = args.size.map_or(pipeline.default_size(), |s| (s, s));
    let mut cases = Vec::new();
    for &steps in &args.steps {
        for &batch in &args.batch {
            let rate = pso::bench::sample_rate(
                &pipeline,
                "a photo of a cat",
                steps,
                batch,
                size,
                args.repeats,
            )?;
            cases.push(json!({"steps": steps, "batch": batch, "images_per_s": rate}));
        }
    }
    Ok(json!({
        "bench": "sample",
        "model": root,
        "device": device_name(device),
        "dtype": dtype,
        "height": size.0,
        "width": size.1,
        "cases": cases,
    }))
}

fn score(args: ScoreBench) -> Result<serde_json::Value> {
    anyhow::ensure!(
        args.images >= 1 && args.batch >= 1,
        "--images and --batch must be at least 1"
    );
    let scorer = build_scorer(args.scorer, &args.model, None)
        .with_context(|| format!("loading scorer {}:{}", args.scorer, args.model))?;
    let images: Vec<_> = (0..args.images as u64)
        .map(|seed| pso::bench::sample_like_image(seed, 512))
        .collect();
    let rate = pso::bench::score_rate(
        scorer.as_ref(),
        &images,
        "a photo of a cat",
        args.batch,
        args.repeats,
    )?;
    Ok(json!({
        "bench": "score",
        "scorer": scorer.info().to_string(),
        "images": args.images,
        "batch": args.batch,
        "images_per_s": rate,
    }))
}

fn learn(args: LearnBench) -> Result<serde_json::Value> {
    anyhow::ensure!(args.pairs >= 1, "--pairs must be at least 1");
    let config = args.config.load()?;
    let device = resolve_device(&config.model.device).map_err(anyhow::Error::msg)?;
    let timing = pso::bench::online_step_seconds(&config, device, args.pairs, args.repeats)?;
    Ok(json!({
        "bench": "learn",
        "model": config.model.id,
        "device": device_name(device),
        "dtype": config.model.dtype,
        "peft": config.peft.kind.to_string(),
        "seconds_per_step": timing.seconds,
        "pairs": timing.pairs,
        "transitions": timing.transitions,
        "trainable": timing.trainable,
    }))
}

/// `cpu` or `cuda:N`, as the flags and configs name devices.
fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
