//! Does PSO learn on the toy model, and does it keep few-step ability where SFT loses it?
//!
//! Online runs of `configs/tiny-cpu.toml` with the same budget (steps, pairs per step), on CPU,
//! each arm with several run seeds (LoRA init, prompts and sampling noise differ):
//! - `pso`: online PSO with the `pixel:centered` reward (lr 1e-3, the config's);
//! - `sft-uniform`: the baseline, the plain denoising loss on each pair's winner
//!   (`objective.kind = "sft"`) at uniform timesteps, lr 1e-4 (at 1e-3 it collapses);
//! - `sft-distilled`: the same at the distilled (LCM) timesteps PSO trains at, lr 1e-4.
//!
//! Before and after, on held-out captions (builtin:shapes-eval) and seeds no training draw uses,
//! at 1, 2 and 4 LCM steps: caption accuracy read by the toy classifier (and per attribute),
//! mean reward, and sharpness (Laplacian variance; the dataset's is the reference). Writes
//! OUT/learning.json (every run, and mean ± sd over seeds), OUT/samples.png (rows: base, then
//! each arm's first seed at 4 steps; then the same at 1 step) and a `pso report` page per run;
//! prints a Markdown table of mean ± sd.
//!
//! Run: `cargo bench --bench learning -- [--steps N] [--seeds K] [--out DIR]` (default 300
//! steps, 3 seeds, target/bench-learning).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diffusion::pipeline::Pipeline;
use diffusion::sampling::Timesteps;
use image::RgbImage;
use pso::config::RunConfig;
use pso::objective::{ObjectiveKind, SftTimesteps};
use pso::peft::Adapter;
use pso::run::online::{run, OnlineOptions, Scorers};
use pso::run::prompts::PromptSet;
use reward::scorers::pixel::{PixelMetric, PixelScorer};
use serde_json::json;
use tch::Device;
use toy::classifier::{Accuracy, Classifier};
use toy::shapes::Attributes;
use toy::{sample_captions, sharpness};

/// Seeds per held-out caption.
const SEEDS: usize = 8;
/// Step counts the few-step ability is measured at.
const STEP_COUNTS: [usize; 3] = [1, 2, 4];

struct Args {
    steps: u64,
    seeds: u64,
    out: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        steps: 300,
        seeds: 3,
        out: PathBuf::from("target/bench-learning"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--steps" => args.steps = it.next().expect("--steps N").parse().expect("a number"),
            "--seeds" => args.seeds = it.next().expect("--seeds K").parse().expect("a number"),
            "--out" => args.out = it.next().expect("--out DIR").into(),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    args
}

/// What one model does on the held-out set at one step count.
#[derive(Debug, Clone)]
struct Measure {
    reward: f64,
    accuracy: Accuracy,
    sharpness: f64,
}

fn measure(
    pipeline: &Pipeline,
    classifier: &Classifier,
    captions: &[Attributes],
) -> (Vec<Measure>, Vec<Vec<RgbImage>>) {
    let mut rows = Vec::new();
    let mut grids = Vec::new();
    for steps in STEP_COUNTS {
        let images = sample_captions(pipeline, captions, Timesteps::Steps(steps), 0.0, 32).unwrap();
        let reward = images
            .iter()
            .map(|i| PixelMetric::Centered.measure(i) as f64)
            .sum::<f64>()
            / images.len() as f64;
        rows.push(Measure {
            reward,
            accuracy: Accuracy::of(&classifier.predict(&images), captions),
            sharpness: sharpness(&images),
        });
        grids.push(images);
    }
    (rows, grids)
}

/// The run's final trainable tensors applied to a fresh copy of the base model.
fn trained(config: &RunConfig, run_dir: &Path) -> (Pipeline, Adapter) {
    let pipeline = pso::run::load_pipeline(config, Device::Cpu).unwrap();
    let adapter = Adapter::new(
        &pipeline.backbone,
        &pipeline.backbone_vs,
        &config.peft,
        config.run.seed,
    )
    .unwrap();
    let latest = pso::checkpoint::latest(&run_dir.join("checkpoints"))
        .unwrap()
        .expect("the run checkpointed");
    adapter
        .set_values(&pso::checkpoint::load_trainable(&latest, false).unwrap())
        .unwrap();
    (pipeline, adapter)
}

/// Rows of 16 images (the first seed of each caption), one row per model and step count.
fn write_grid(path: &Path, rows: &[&[RgbImage]]) {
    let (cols, side) = (16u32, 32u32);
    let mut grid = RgbImage::new(cols * side, rows.len() as u32 * side);
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().take(cols as usize).enumerate() {
            image::imageops::replace(
                &mut grid,
                img,
                (c as u32 * side) as i64,
                (r as u32 * side) as i64,
            );
        }
    }
    grid.save(path).unwrap();
}

/// One arm of the comparison: an objective, where SFT noises, and a learning rate.
struct Arm {
    name: &'static str,
    kind: ObjectiveKind,
    sft_timesteps: SftTimesteps,
    lr: f64,
}

const ARMS: [Arm; 3] = [
    Arm {
        name: "pso",
        kind: ObjectiveKind::OnlinePso,
        sft_timesteps: SftTimesteps::Uniform,
        lr: 1e-3,
    },
    Arm {
        name: "sft-uniform",
        kind: ObjectiveKind::Sft,
        sft_timesteps: SftTimesteps::Uniform,
        lr: 1e-4,
    },
    Arm {
        name: "sft-distilled",
        kind: ObjectiveKind::Sft,
        sft_timesteps: SftTimesteps::Distilled,
        lr: 1e-4,
    },
];

/// What one arm measured: per seed, a [`Measure`] per step count; per seed, training seconds.
struct ArmResult {
    name: &'static str,
    measures: Vec<Vec<Measure>>,
    seconds: Vec<f64>,
}

/// The metrics of the table, as (column, reader of one measure).
type Metric = (&'static str, fn(&Measure) -> f64);

const METRICS: [Metric; 7] = [
    ("caption", |m| m.accuracy.caption),
    ("reward", |m| m.reward),
    ("shape", |m| m.accuracy.shape),
    ("colour", |m| m.accuracy.colour),
    ("size", |m| m.accuracy.size),
    ("background", |m| m.accuracy.background),
    ("sharpness", |m| m.sharpness),
];

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn main() {
    let args = args();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    std::fs::create_dir_all(&args.out).unwrap();
    let base_config = RunConfig::load(Path::new("configs/tiny-cpu.toml"), &[]).unwrap();
    let (_, classifier) =
        Classifier::load(Path::new("data/toy/classifier.safetensors"), Device::Cpu).unwrap();
    let held_out = PromptSet::load("builtin:shapes-eval").unwrap();
    // Caption i·SEEDS + s gets seed i·SEEDS + s: disjoint from the hashed training seeds.
    let captions: Vec<Attributes> = (0..held_out.len())
        .flat_map(|i| {
            let a = Attributes::parse(held_out.get(i)).expect("a dataset caption");
            std::iter::repeat_n(a, SEEDS)
        })
        .collect();
    let firsts =
        |images: &[RgbImage]| -> Vec<RgbImage> { images.iter().step_by(SEEDS).cloned().collect() };

    let base = pso::run::load_pipeline(&base_config, Device::Cpu).unwrap();
    let (before, base_images) = measure(&base, &classifier, &captions);
    drop(base);
    let mut arms = vec![ArmResult {
        name: "base",
        measures: vec![before],
        seconds: vec![],
    }];
    let mut grids = vec![("base", firsts(&base_images[2]), firsts(&base_images[0]))];
    for arm in &ARMS {
        let mut measures = Vec::new();
        let mut seconds = Vec::new();
        for seed in 0..args.seeds {
            let mut config = base_config.clone();
            config.run.seed = seed;
            config.objective.kind = arm.kind;
            config.objective.sft_timesteps = arm.sft_timesteps;
            config.optim.lr = arm.lr;
            config.learner.max_steps = args.steps;
            config.learner.checkpoint_every = args.steps;
            config.eval.every = 50;
            let out = args.out.join(format!("{}-seed{seed}", arm.name));
            let _ = std::fs::remove_dir_all(&out);
            let started = std::time::Instant::now();
            let scorer: Arc<dyn reward::Scorer> = Arc::new(PixelScorer::new("centered").unwrap());
            run(
                &config,
                OnlineOptions {
                    out: out.clone(),
                    resume: false,
                    progress: false,
                    max_hours: None,
                    group: None,
                },
                Scorers {
                    train: scorer.clone(),
                    eval: vec![("pixel:centered".into(), scorer)],
                },
            )
            .unwrap();
            seconds.push(started.elapsed().as_secs_f64());
            pso::report::write_report(&out, &out.join("report")).unwrap();
            let (pipeline, _adapter) = trained(&config, &out);
            let (after, images) = measure(&pipeline, &classifier, &captions);
            eprintln!(
                "{} seed {seed}: caption {:.3} reward {:.3} at 4 steps ({:.0} s)",
                arm.name,
                after[2].accuracy.caption,
                after[2].reward,
                seconds.last().unwrap()
            );
            if seed == 0 {
                grids.push((arm.name, firsts(&images[2]), firsts(&images[0])));
            }
            measures.push(after);
        }
        arms.push(ArmResult {
            name: arm.name,
            measures,
            seconds,
        });
    }

    let rows: Vec<&[RgbImage]> = grids
        .iter()
        .map(|g| g.1.as_slice())
        .chain(grids.iter().map(|g| g.2.as_slice()))
        .collect();
    write_grid(&args.out.join("samples.png"), &rows);
    // The dataset itself: the sharpness samples should keep, the reward of an unbiased layout.
    let dataset: Vec<RgbImage> = {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
        (0..256)
            .map(|_| toy::shapes::example(&mut rng, 32).image)
            .collect()
    };
    let data_sharpness = sharpness(&dataset);
    let data_reward = dataset
        .iter()
        .map(|i| PixelMetric::Centered.measure(i) as f64)
        .sum::<f64>()
        / dataset.len() as f64;

    let mut summary = Vec::new();
    println!(
        "| model | LCM steps | caption acc. | reward (centered) | shape | colour | size | background | sharpness |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for ArmResult { name, measures, .. } in &arms {
        for (k, steps) in STEP_COUNTS.iter().enumerate() {
            let mut cells = Vec::new();
            let mut stats = serde_json::Map::new();
            for (metric, read) in METRICS {
                let values: Vec<f64> = measures.iter().map(|m| read(&m[k])).collect();
                let (mean, sd) = mean_sd(&values);
                stats.insert(
                    metric.into(),
                    json!({"mean": mean, "sd": sd, "runs": values}),
                );
                cells.push(if metric == "sharpness" {
                    format!("{mean:.0} ± {sd:.0}")
                } else {
                    format!("{mean:.3} ± {sd:.3}")
                });
            }
            summary.push(json!({"model": name, "steps": steps, "metrics": stats}));
            println!("| {name} | {steps} | {} |", cells.join(" | "));
        }
    }
    let report = json!({
        "steps": args.steps,
        "seeds": args.seeds,
        "held_out_images": captions.len(),
        "dataset_sharpness": data_sharpness,
        "dataset_reward": data_reward,
        "train_seconds": arms
            .iter()
            .map(|a| (a.name.to_string(), json!(a.seconds)))
            .collect::<serde_json::Map<_, _>>(),
        "summary": summary,
    });
    std::fs::write(
        args.out.join("learning.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("dataset: sharpness {data_sharpness:.0}, reward {data_reward:.3}");
    println!("written: {}", args.out.display());
}
