//! pso's SD3, FLUX and Z-Image pipelines vs diffusers' `StableDiffusion3Pipeline`,
//! `FluxPipeline` and `ZImagePipeline`: images/s on small random-weight SD3-, FLUX- and
//! Z-Image-like models (128×128, fp32, CPU, 2 threads), 1 and 4 steps, batch 1 and 4, from the
//! same latents, in one run. Both sides time prompt encoding (CLIP + T5, or Qwen3), sampling and
//! decoding to 8-bit images; best of 3 after a warm-up.
//!
//! Run: `cargo bench --bench flow_sample`. Prints a Markdown table.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use diffusion::sampling::{SeededNoise, Timesteps};
use tch::{Device, Kind, Tensor};

const CASES: [(usize, i64); 4] = [(1, 1), (4, 1), (1, 4), (4, 4)];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-flow-sample");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let cases_json = serde_json::to_string(&CASES.map(|(s, b)| [s as i64, b])).unwrap();
    let py = Command::new(python)
        .arg(root.join("bench/flow_sample_diffusers.py"))
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
    tch::set_num_threads(2);
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: Some(32),
        text_encoder_device: None,
    };
    let names = ["sd3", "flux", "zimage"];
    let pipes: Vec<Pipeline> = names
        .iter()
        .map(|name| Pipeline::load(&out.join(name), &opts).unwrap())
        .collect();
    println!("| model | steps | batch | pso images/s | diffusers images/s | pso / diffusers |");
    println!("|---|---|---|---|---|---|");
    for (name, pipe) in names.iter().zip(&pipes) {
        for (steps, batch) in CASES {
            let latents =
                Tensor::read_safetensors(out.join(format!("latents-{name}-{batch}.safetensors")))
                    .unwrap()
                    .remove(0)
                    .1;
            let f = pipe.vae_scale_factor();
            let size = latents.size();
            // One prompt for the whole batch: encoded once, as diffusers repeats one prompt's
            // embedding per image.
            let run = || {
                pipe.generate(
                    GenerateRequest {
                        prompt: "a photo of a cat",
                        negative_prompt: None,
                        timesteps: Timesteps::Steps(steps),
                        guidance: 0.0,
                        height: size[2] * f,
                        width: size[3] * f,
                        num_images: batch,
                        init_latents: Some(latents.shallow_clone()),
                        record: false,
                    },
                    &mut SeededNoise::new(0),
                )
                .unwrap()
                .images
            };
            let _ = run();
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let _ = run();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let ours = batch as f64 / best;
            let diffusers = theirs[name][format!("{steps},{batch}")].as_f64().unwrap();
            println!(
                "| {name} | {steps} | {batch} | {ours:.2} | {diffusers:.2} | {:.2}× |",
                ours / diffusers
            );
        }
    }
}
