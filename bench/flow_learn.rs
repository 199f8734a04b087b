//! The online-PSO learner step on flow-matching models vs PyTorch: one step (LoRA r4 on
//! to_q/to_k/to_v/to_out.0, reference = adapters off, the re-noise kernel's means of one stored
//! transition per trajectory, the clamped likelihood ratio and the PSO loss, backward, grad-norm
//! clip, AdamW) on the small random-weight SD3-, FLUX- and Z-Image-like models of bench/flow_sample
//! (128² images, 32² latents), same shapes, fp32, CPU, 2 threads, in one run; pso also with
//! `learner.recompute_blocks`. `bench/flow_learn_pytorch.py` writes the step with diffusers + peft
//! + torch.optim.AdamW. Median of STEPS steps after 2 warm-up steps.
//!
//! Run: `cargo bench --bench flow_learn`. Prints a Markdown table.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use pso::config::RunConfig;
use pso::learner::Learner;
use pso::run::online::OnlineTrainer;
use pso::run::rounds::{Round, TrainingPair};
use tch::{Device, Kind, Tensor};

/// Pairs per step.
const CASES: [i64; 2] = [1, 2];
const STEPS: usize = 10;
/// The transition trained: the second of 4 steps.
const STEP: usize = 1;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-flow-learn");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let py = Command::new(python)
        .arg(root.join("bench/flow_learn_pytorch.py"))
        .arg(&out)
        .arg(serde_json::to_string(&CASES).unwrap())
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
    println!("threads: 2 libtorch threads each\n");
    println!(
        "| model | pairs | pso s/step | pso recomputed s/step | PyTorch s/step | pso / PyTorch |"
    );
    println!("|---|---|---|---|---|---|");
    for name in ["sd3", "flux", "zimage"] {
        let text = format!(
            "[model]\nid = \"{}\"\ndevice = \"cpu\"\nmax_sequence_length = 32\n[sampler]\n\
             name = \"flow_match_euler\"\nflow_kernel = \"renoise\"\nsteps = 4\nheight = 128\n\
             width = 128\n[objective]\nkind = \"online_pso\"\n[peft]\nrank = 4\nalpha = 4.0\n",
            out.join(name).display()
        );
        let config_path = out.join(format!("{name}.toml"));
        std::fs::write(&config_path, text).unwrap();
        let config = RunConfig::load(&config_path, &[]).unwrap();
        let trainer = OnlineTrainer::load(&config, Device::Cpu).unwrap();
        for pairs in CASES {
            let trajectory = || Tensor::randn([5, 16, 32, 32], (Kind::Float, Device::Cpu));
            let round = Round {
                index: 0,
                policy_version: 0,
                pairs: (0..pairs)
                    .map(|i| TrainingPair {
                        pair_id: i,
                        prompt: "a photo of a cat".into(),
                        winner: trajectory(),
                        loser: trajectory(),
                        counted: true,
                        margin: 1.0,
                    })
                    .collect(),
                scores: Vec::new(),
                actor_seconds: 0.0,
                reward_wait_seconds: 0.0,
                images: 2 * pairs as usize,
                parts: Vec::new(),
            };
            let prepared = trainer.prepare(round).unwrap();
            let refs: Vec<_> = prepared.iter().collect();
            let steps = vec![STEP; pairs as usize];
            let mut seconds = [0.0; 2];
            for (slot, recompute) in [false, true].into_iter().enumerate() {
                trainer.pipeline.backbone.set_recompute(recompute).unwrap();
                let mut learner = Learner::new(
                    trainer.adapter.params_shallow(),
                    &config.optim,
                    &config.learner,
                );
                let backbone = &trainer.pipeline.backbone;
                let mut times = Vec::new();
                for i in 0..STEPS + 2 {
                    let start = Instant::now();
                    learner
                        .step_over_then(1, |_| Ok(trainer.loss(&refs, &steps).unwrap()), &|| {
                            backbone.finish_recomputation()
                        })
                        .unwrap();
                    if i >= 2 {
                        times.push(start.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                seconds[slot] = times[times.len() / 2];
            }
            let py = theirs["seconds"][format!("{name},{pairs}")]
                .as_f64()
                .unwrap();
            println!(
                "| {name} | {pairs} | {:.4} | {:.4} | {py:.4} | {:.2}× |",
                seconds[0],
                seconds[1],
                seconds[0] / py
            );
        }
    }
    println!(
        "\nPyTorch process peak RSS {:.0} MiB",
        theirs["peak_rss_mib"].as_f64().unwrap()
    );
}
