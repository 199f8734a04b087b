//! DiffFit vs full fine-tuning vs LoRA on the same DiT: one SFT step (iDDPM's hybrid loss, as
//! DiffFit's Algorithm 2 trains; backward; grad-norm clip; AdamW) on random latents and class
//! labels, and the trainable-parameter count. Each method runs in its own process so that its
//! peak RSS is its own. The DiT-XL/2 counts come from building that architecture (random
//! weights, 2.7 GB in fp32).
//!
//! Run: `cargo bench --bench difffit` (CPU: a DiT-S/2-like model on 16×16 latents) or
//! `PSO_DEVICE=cuda cargo bench --bench difffit` (DiT-XL/2 on 32×32 latents, the 256² model).
//! Prints a Markdown table.

use std::process::Command;
use std::time::Instant;

use diffusion::models::backbone::{Backbone, Condition};
use diffusion::models::dit::{DiTTransformer2DConfig, DiTTransformer2DModel};
use pso::config::{LearnerSection, OptimSection, PeftSection};
use pso::learner::Learner;
use pso::objective::{add_noise, hybrid_loss};
use pso::peft::Adapter;
use tch::{nn, Device, Kind, Tensor};

const METHODS: [&str; 3] = ["difffit", "lora", "full"];
const STEPS: usize = 5;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn device() -> Device {
    match std::env::var("PSO_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

/// DiT-XL/2 (the default config, learned sigma); on the CPU a DiT-S/2-like model.
fn config(device: Device) -> (DiTTransformer2DConfig, i64, i64) {
    let xl = DiTTransformer2DConfig {
        out_channels: Some(8),
        ..DiTTransformer2DConfig::default()
    };
    match device {
        Device::Cpu => (
            DiTTransformer2DConfig {
                num_attention_heads: 6,
                attention_head_dim: 64,
                num_layers: 12,
                sample_size: 16,
                ..xl
            },
            16,
            8,
        ),
        _ => (xl, 32, 32),
    }
}

fn build(config: &DiTTransformer2DConfig, device: Device) -> (nn::VarStore, Backbone) {
    let vs = nn::VarStore::new(device);
    let mut model = DiTTransformer2DModel::new(vs.root(), config);
    // Converted DiT checkpoints: one conditioning embedding, copied into every block.
    model.share_conditioning(&vs);
    (vs, Backbone::DiT(Box::new(model)))
}

/// Parameters the model's forward pass reads (the per-block embedding copies are not DiT's).
fn model_size(vs: &nn::VarStore, backbone: &Backbone) -> i64 {
    vs.variables()
        .iter()
        .filter(|(name, _)| backbone.reads(name))
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

fn section(method: &str) -> PeftSection {
    PeftSection {
        kind: serde_json::from_value(method.into()).expect("METHODS are peft.kind names"),
        rank: 4,
        alpha: 4.0,
        ..PeftSection::default()
    }
}

/// Trainable scalars of each method on DiT-XL/2, and the model's size.
fn count_xl() {
    let _guard = tch::no_grad_guard();
    let (config, _, _) = config(Device::Cuda(0));
    let (vs, backbone) = build(&config, Device::Cpu);
    let total = model_size(&vs, &backbone);
    let mut line = vec![format!("total={total}")];
    for method in METHODS {
        let adapter = Adapter::new(&backbone, &vs, &section(method), 0).unwrap();
        line.push(format!("{method}={}", adapter.numel()));
        if method == "difffit" {
            let table: i64 = adapter
                .params()
                .iter()
                .filter(|(n, _)| n.contains("class_embedder"))
                .map(|(_, t)| t.numel() as i64)
                .sum();
            let gamma: i64 = adapter
                .params()
                .iter()
                .filter(|(n, _)| n.contains(".gamma_"))
                .map(|(_, t)| t.numel() as i64)
                .sum();
            line.push(format!("difffit_class_table={table}"));
            line.push(format!("difffit_gamma={gamma}"));
        }
    }
    println!("{}", line.join(" "));
}

/// Median seconds per step and the trainable count of `method`, printed as one line.
fn time_method(method: &str) {
    let device = device();
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let (config, side, batch) = config(device);
    let (vs, backbone) = build(&config, device);
    let adapter = Adapter::new(&backbone, &vs, &section(method), 0).unwrap();
    let mut learner = Learner::new(
        adapter.params_shallow(),
        &OptimSection {
            lr: 1e-3,
            ..OptimSection::default()
        },
        &LearnerSection::default(),
    );
    let alphas_cumprod: Vec<f64> = {
        let betas = (0..1000).map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0);
        betas
            .scan(1.0, |ac, b| {
                *ac *= 1.0 - b;
                Some(*ac)
            })
            .collect()
    };
    let opts = (Kind::Float, device);
    let mut times = Vec::new();
    for step in 0..STEPS + 2 {
        let x0 = Tensor::randn([batch, 4, side, side], opts);
        let noise = Tensor::randn([batch, 4, side, side], opts);
        let ts: Vec<u32> = (0..batch)
            .map(|i| ((step as i64 * 97 + i * 131) % 1000) as u32)
            .collect();
        let labels = Tensor::from_slice(&(0..batch).map(|i| i * 7 % 1000).collect::<Vec<i64>>())
            .to_device(device);
        let start = Instant::now();
        learner
            .step(|_| {
                let x = add_noise(&x0, &noise, &ts, &alphas_cumprod).unwrap();
                let t: Vec<i64> = ts.iter().map(|&t| t as i64).collect();
                let t = Tensor::from_slice(&t).to_device(device);
                let out = backbone.forward(&x, &t, &Condition::Classes(labels.shallow_clone()));
                Ok(hybrid_loss(&out, &noise, &x0, &x, &ts, &alphas_cumprod).unwrap())
            })
            .unwrap();
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let total = model_size(&vs, &backbone);
    println!(
        "seconds={} trainable={} total={total} rss_mib={:.0}",
        times[times.len() / 2],
        adapter.numel(),
        peak_rss_mib()
    );
}

/// Runs this binary again with `args`; its one output line as key=value pairs.
fn child(args: &[&str]) -> std::collections::HashMap<String, f64> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--time") => return time_method(&args[1]),
        Some("--count-xl") => return count_xl(),
        _ => {}
    }
    let (config, side, batch) = config(device());
    println!(
        "model: {} layers × {} wide, {side}×{side} latents (patch {}), batch {batch}, device {:?}\n",
        config.num_layers,
        config.num_attention_heads * config.attention_head_dim,
        config.patch_size,
        device()
    );
    println!("| method | trainable | % of model | s/step | vs full | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let rows: Vec<(&str, std::collections::HashMap<String, f64>)> = METHODS
        .iter()
        .map(|m| (*m, child(&["--time", m])))
        .collect();
    let full = rows.iter().find(|(m, _)| *m == "full").unwrap().1["seconds"];
    for (method, r) in &rows {
        println!(
            "| {method} | {:.0} | {:.3} % | {:.3} | {:.2}× faster | {:.0} |",
            r["trainable"],
            100.0 * r["trainable"] / r["total"],
            r["seconds"],
            full / r["seconds"],
            r["rss_mib"]
        );
    }
    let xl = child(&["--count-xl"]);
    println!(
        "\nDiT-XL/2 ({:.1} M parameters), trainable:",
        xl["total"] / 1e6
    );
    for method in METHODS {
        println!(
            "- {method}: {:.3} M ({:.3} %)",
            xl[method] / 1e6,
            100.0 * xl[method] / xl["total"]
        );
    }
    println!(
        "- difffit without the 1001-row class table: {:.3} M ({:.3} %); γ: {:.3} M",
        (xl["difffit"] - xl["difffit_class_table"]) / 1e6,
        100.0 * (xl["difffit"] - xl["difffit_class_table"]) / xl["total"],
        xl["difffit_gamma"] / 1e6
    );
}
