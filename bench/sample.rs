//! `pso sample`'s pipeline vs diffusers' StableDiffusionPipeline: images/s on the same small
//! random-weight SD 2.x-like model (128×128, fp32, CPU), 1 and 4 steps, batch 1 and 8, in one run.
//! Both sides time prompt encoding, sampling and VAE decoding to 8-bit images; best of 3 after a
//! warm-up.
//!
//! Run: `cargo bench --bench sample`. Prints a Markdown table.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use diffusion::sampling::{SeededNoise, Timesteps};
use tch::{Device, Kind};

const CASES: [(usize, i64); 4] = [(1, 1), (4, 1), (1, 8), (4, 8)];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-sample");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let cases_json = serde_json::to_string(&CASES.map(|(s, b)| [s as i64, b])).unwrap();
    let py = Command::new(python)
        .arg(root.join("bench/sample_diffusers.py"))
        .arg(&out)
        .arg(&cases_json)
        .output()
        .expect("run scripts/setup.sh: the bench compares with diffusers");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();

    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: None,
        text_encoder_device: None,
    };
    let pipeline = Pipeline::load(&out.join("pipeline"), &opts).unwrap();
    println!("threads: {} libtorch threads\n", tch::get_num_threads());
    println!("| steps | batch | pso images/s | diffusers images/s | pso / diffusers |");
    println!("|---|---|---|---|---|");
    for (steps, batch) in CASES {
        let run = || {
            let request = GenerateRequest {
                prompt: "a photo of a cat",
                negative_prompt: None,
                timesteps: Timesteps::Steps(steps),
                guidance: 0.0,
                height: 128,
                width: 128,
                num_images: batch,
                init_latents: None,
                record: false,
            };
            let start = Instant::now();
            let out = pipeline
                .generate(request, &mut SeededNoise::new(0))
                .unwrap();
            std::hint::black_box(&out.images);
            start.elapsed().as_secs_f64()
        };
        run();
        let best = (0..3).map(|_| run()).fold(f64::INFINITY, f64::min);
        let ours = batch as f64 / best;
        let reference = theirs[format!("{steps},{batch}")].as_f64().unwrap();
        println!(
            "| {steps} | {batch} | {ours:.2} | {reference:.2} | {:.2}× |",
            ours / reference
        );
    }
}
