//! The learner step vs PyTorch: one offline-PSO step (LoRA r4 on to_q/to_k/to_v/to_out.0,
//! reference = adapters off, Diffusion-DPO loss at a distilled timestep, backward, grad-norm clip,
//! AdamW) on the same tiny random-weight SD 2.x-like UNet, same batch, fp32, CPU, 2 threads, in
//! one run. `bench/learn_pytorch.py` writes the step with diffusers + peft + torch.optim.AdamW
//! as the official scripts do. Median of STEPS steps after 2 warm-up steps.
//!
//! Run: `cargo bench --bench learn`. Prints a Markdown table.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use pso::config::RunConfig;
use pso::learner::Learner;
use pso::run::offline::{Batch, Trainer};
use tch::{Device, Kind, Tensor};

/// (pairs per step, latent side).
const CASES: [(i64, i64); 3] = [(1, 16), (2, 32), (4, 32)];
const STEPS: usize = 10;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-learn");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let cases_json = serde_json::to_string(&CASES.map(|(p, s)| [p, s])).unwrap();
    let py = Command::new(python)
        .arg(root.join("bench/learn_pytorch.py"))
        .arg(&out)
        .arg(&cases_json)
        .arg(STEPS.to_string())
        .output()
        .expect("run scripts/setup.sh: the bench compares with PyTorch");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();

    tch::set_num_threads(2);
    let text = format!(
        "[model]\nid = \"{}\"\ndevice = \"cpu\"\n[sampler]\nname = \"euler\"\nsteps = 4\n\
         [objective]\nkind = \"offline_pso\"\n[peft]\nrank = 4\nalpha = 4.0\n",
        out.join("sd").display()
    );
    let config_path = out.join("bench.toml");
    std::fs::write(&config_path, text).unwrap();
    let config = RunConfig::load(&config_path, &[]).unwrap();
    let trainer = Trainer::load(&config).unwrap();
    let mut learner = Learner::new(
        trainer.adapter.params_shallow(),
        &config.optim,
        &config.learner,
    );
    let cond = trainer
        .pipeline
        .condition("a photo of a cat", None, 0.0, 32, 32, 1)
        .unwrap();
    println!("threads: 2 libtorch threads each\n");
    println!("| pairs | latent | pso s/step | PyTorch s/step | pso / PyTorch |");
    println!("|---|---|---|---|---|");
    for (pairs, side) in CASES {
        let batch = Batch {
            x0_winner: Tensor::randn([pairs, 4, side, side], (Kind::Float, Device::Cpu)),
            x0_loser: Tensor::randn([pairs, 4, side, side], (Kind::Float, Device::Cpu)),
            cond: cond.repeat(pairs),
        };
        let mut times = Vec::new();
        for i in 0..STEPS + 2 {
            let start = Instant::now();
            learner
                .step(|_| Ok(trainer.batch_loss(&batch, i as u64).unwrap()))
                .unwrap();
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let ours = times[times.len() / 2];
        let py = theirs["seconds"][format!("{pairs}x{side}")]
            .as_f64()
            .unwrap();
        println!(
            "| {pairs} | {side}×{side} | {ours:.4} | {py:.4} | {:.2}× |",
            ours / py
        );
    }
    println!(
        "\npeak RSS: pso {:.0} MiB, PyTorch process {:.0} MiB",
        peak_rss_mib(),
        theirs["peak_rss_mib"].as_f64().unwrap()
    );
}
