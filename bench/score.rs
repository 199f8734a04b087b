//! Reward scoring throughput: PickScore-style scoring (preprocess, both CLIP towers, cosine times
//! `logit_scale.exp()`) in Rust next to transformers' CLIPModel on the same tiny random model and
//! images, same batch, CPU, in the same run; plus the HTTP protocol's round-trip overhead per
//! batch on loopback (server with a scorer that does no work).
//!
//! Run: `cargo bench -p reward --bench score [-- IMAGES BATCH REPS]` (default 64 images of
//! 512×512, batch 16, 3 passes). Needs `.venv/bin/python` (or `PSO_PYTHON`) with torch and
//! transformers. Prints a Markdown table.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use image::RgbImage;
use reward::http::{HttpScorer, HttpScorerOptions, ServerOptions};
use reward::{score_checked, RewardError, ScoreItem, Scorer, ScorerInfo};

const PROMPT: &str = "a photo of a cat";

/// A square image with smooth structure and mild noise, like a real sample.
fn sample(seed: u64, side: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(6364136223846793005) | 1;
    RgbImage::from_fn(side, side, |x, y| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 59) as i32) - 16;
        let f = |k: u32| {
            let v =
                (((x * k + y * (7 - k)) as f32 / 40.0 + seed as f32).sin() * 100.0 + 128.0) as i32;
            (v + noise).clamp(0, 255) as u8
        };
        image::Rgb([f(1), f(3), f(5)])
    })
}

/// A scorer that does no work, so the HTTP rows measure the protocol alone.
struct Zero;

#[async_trait]
impl Scorer for Zero {
    fn info(&self) -> ScorerInfo {
        ScorerInfo {
            name: "zero".into(),
            version: "bench".into(),
            higher_is_better: true,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        Ok(vec![0.0; items.len()])
    }
}

fn python() -> PathBuf {
    std::env::var_os("PSO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"))
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_python(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh) or set PSO_PYTHON");
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("arguments: IMAGES BATCH REPS"))
        .collect();
    let n = args.first().copied().unwrap_or(64);
    let batch = args.get(1).copied().unwrap_or(16);
    let reps = args.get(2).copied().unwrap_or(3);
    let side = 512;

    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    run_python(&[
        workspace().join("scripts/oracle/make_clip.py").as_os_str(),
        models.as_os_str(),
    ]);
    let model = models.join("quick");
    let images_dir = work.path().join("images");
    std::fs::create_dir_all(&images_dir).unwrap();
    let images: Vec<RgbImage> = (0..n as u64).map(|i| sample(i, side)).collect();
    for (i, image) in images.iter().enumerate() {
        image.save(images_dir.join(format!("{i:06}.png"))).unwrap();
    }
    let items: Vec<ScoreItem> = images
        .iter()
        .map(|image| ScoreItem {
            prompt: PROMPT,
            image,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Rust: the local PickScore scorer, one warm-up batch, then `reps` passes over the set.
    let scorer =
        reward::load_local(reward::LocalScorerKind::Pickscore, &model, tch::Device::Cpu).unwrap();
    runtime
        .block_on(score_checked(scorer.as_ref(), &items[..batch.min(n)]))
        .unwrap();
    let start = Instant::now();
    let mut ours = Vec::new();
    for _ in 0..reps {
        ours.clear();
        for chunk in items.chunks(batch) {
            ours.extend(
                runtime
                    .block_on(score_checked(scorer.as_ref(), chunk))
                    .unwrap(),
            );
        }
    }
    let rust_ips = (reps * n) as f64 / start.elapsed().as_secs_f64();

    let reply = run_python(&[
        workspace().join("bench/score_transformers.py").as_os_str(),
        model.as_os_str(),
        images_dir.as_os_str(),
        PROMPT.as_ref(),
        batch.to_string().as_ref(),
        reps.to_string().as_ref(),
    ]);
    let theirs: serde_json::Value = serde_json::from_str(reply.trim().lines().last().unwrap())
        .expect("score_transformers.py prints one JSON line");
    let py_ips = theirs["images_per_s"].as_f64().unwrap();
    let max_diff = theirs["scores"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&ours)
        .map(|(t, o)| (t.as_f64().unwrap() - *o as f64).abs())
        .fold(0.0, f64::max);

    // HTTP: the same batches through the client and `serve` with a do-nothing scorer.
    let http_rows: Vec<(u32, Duration, Duration, Duration)> = [side, 64]
        .into_iter()
        .map(|image_side| {
            let small: Vec<RgbImage> = (0..batch as u64).map(|i| sample(i, image_side)).collect();
            let batch_items: Vec<ScoreItem> = small
                .iter()
                .map(|image| ScoreItem {
                    prompt: PROMPT,
                    image,
                })
                .collect();
            runtime.block_on(async {
                let (listener, addr) = reward::http::bind("127.0.0.1:0").await.unwrap();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let options = ServerOptions {
                    max_batch: batch,
                    ..Default::default()
                };
                let server = tokio::spawn(reward::http::serve(
                    listener,
                    Box::new(Zero),
                    options,
                    async {
                        let _ = stopped.await;
                    },
                ));
                let client =
                    HttpScorer::connect(&format!("http://{addr}"), HttpScorerOptions::default())
                        .await
                        .unwrap();
                let direct = Instant::now();
                for _ in 0..20 {
                    score_checked(&Zero, &batch_items).await.unwrap();
                }
                let direct = direct.elapsed() / 20;
                score_checked(&client, &batch_items).await.unwrap();
                let mut times = Vec::with_capacity(30);
                for _ in 0..30 {
                    let start = Instant::now();
                    score_checked(&client, &batch_items).await.unwrap();
                    times.push(start.elapsed().saturating_sub(direct));
                }
                times.sort();
                let _ = stop.send(());
                server.await.unwrap().unwrap();
                (
                    image_side,
                    percentile(&times, 0.5),
                    percentile(&times, 0.95),
                    times.iter().sum::<Duration>() / times.len() as u32,
                )
            })
        })
        .collect();

    println!(
        "\nPickScore-architecture scoring, tiny random CLIPModel (scripts/oracle/make_clip.py \
         `quick`: 32 px crop), {n} images of {side}×{side}, batch {batch}, {reps} passes, CPU, \
         {} torch threads; max |score difference| {max_diff:.2e}\n",
        theirs["threads"]
    );
    println!("| scorer | images/s | vs transformers |");
    println!("|---|---|---|");
    println!("| pso (tch) | {rust_ips:.1} | {:.2}× |", rust_ips / py_ips);
    println!("| transformers CLIPModel | {py_ips:.1} | 1.00× |");
    println!(
        "\nHTTP round trip per batch of {batch} on loopback (`pso reward serve` stack, \
         do-nothing scorer; PNG encode + base64 + JSON + decode), 30 batches\n"
    );
    println!("| image size | p50 ms | p95 ms | mean ms | per image ms (mean) |");
    println!("|---|---|---|---|---|");
    for (s, p50, p95, mean) in http_rows {
        println!(
            "| {s}×{s} | {} | {} | {} | {:.3} |",
            ms(p50),
            ms(p95),
            ms(mean),
            mean.as_secs_f64() * 1e3 / batch as f64
        );
    }
}
