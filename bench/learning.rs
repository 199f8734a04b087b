//! Does PSO learn on the toy model, and does it keep few-step ability where SFT loses it?
//!
//! Two online runs of `configs/tiny-cpu.toml` with the same budget (steps, pairs, seeds), on CPU:
//! - `pso`: online PSO with the `pixel:centered` reward;
//! - `sft`: the baseline, the plain denoising loss on each pair's winner (`objective.kind =
//!   "sft"`), i.e. fine-tuning on the reward's preferred samples;
//! - `sft-lr/10`: the same at a tenth of the learning rate (is SFT's damage only a step size?).
//!
//! Before and after, on held-out captions (builtin:shapes-eval) and seeds no training draw uses,
//! at 1, 2 and 4 LCM steps: mean reward, caption accuracy read by the toy classifier, and
//! sharpness (Laplacian variance; the dataset's is the reference). Writes OUT/learning.json,
//! OUT/samples.png (rows: base, PSO, SFT, SFT lr/10 at 4 steps; then the same at 1 step) and a
//! `pso report` page per run; prints a Markdown table.
//!
//! Run: `cargo bench --bench learning -- [--steps N] [--out DIR]` (default 300 steps,
//! target/bench-learning).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diffusion::pipeline::Pipeline;
use diffusion::sampling::Timesteps;
use image::RgbImage;
use pso::config::RunConfig;
use pso::objective::ObjectiveKind;
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
    out: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        steps: 300,
        out: PathBuf::from("target/bench-learning"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--steps" => args.steps = it.next().expect("--steps N").parse().expect("a number"),
            "--out" => args.out = it.next().expect("--out DIR").into(),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    args
}

/// What one model does on the held-out set at one step count.
#[derive(Debug, Clone, serde::Serialize)]
struct Measure {
    steps: usize,
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
            steps,
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
    let mut results = vec![json!({"model": "base", "measures": before})];
    let mut grids = vec![("base", firsts(&base_images[2]), firsts(&base_images[0]))];
    for (name, kind, lr_scale) in [
        ("pso", ObjectiveKind::OnlinePso, 1.0),
        ("sft", ObjectiveKind::Sft, 1.0),
        ("sft-lr/10", ObjectiveKind::Sft, 0.1),
    ] {
        let mut config = base_config.clone();
        config.objective.kind = kind;
        config.optim.lr *= lr_scale;
        config.learner.max_steps = args.steps;
        config.learner.checkpoint_every = args.steps;
        config.eval.every = 50;
        let out = args.out.join(name.replace('/', "-"));
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
            },
            Scorers {
                train: scorer.clone(),
                eval: vec![("pixel:centered".into(), scorer)],
            },
        )
        .unwrap();
        let seconds = started.elapsed().as_secs_f64();
        pso::report::write_report(&out, &out.join("report")).unwrap();
        let (pipeline, _adapter) = trained(&config, &out);
        let (after, images) = measure(&pipeline, &classifier, &captions);
        results.push(json!({"model": name, "measures": after, "train_seconds": seconds}));
        grids.push((name, firsts(&images[2]), firsts(&images[0])));
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
    let report = json!({
        "steps": args.steps,
        "held_out_images": captions.len(),
        "dataset_sharpness": data_sharpness,
        "dataset_reward": data_reward,
        "models": results,
    });
    std::fs::write(
        args.out.join("learning.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();

    println!(
        "| model | LCM steps | reward (centered) | caption acc. | shape | colour | size | background | sharpness |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for model in report["models"].as_array().unwrap() {
        for m in model["measures"].as_array().unwrap() {
            let a = &m["accuracy"];
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |",
                model["model"].as_str().unwrap(),
                m["steps"],
                m["reward"].as_f64().unwrap(),
                a["caption"].as_f64().unwrap(),
                a["shape"].as_f64().unwrap(),
                a["colour"].as_f64().unwrap(),
                a["size"].as_f64().unwrap(),
                a["background"].as_f64().unwrap(),
                m["sharpness"].as_f64().unwrap(),
            );
        }
    }
    println!(
        "dataset: sharpness {data_sharpness:.0}, reward {:.3}",
        report["dataset_reward"]
    );
    println!("written: {}", args.out.display());
}
