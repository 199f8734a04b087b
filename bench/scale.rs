//! Data-parallel scaling of `pso online`: the same global work (24 steps of 2 pairs, rounds of
//! 4 prompts) as one process with 2 libtorch threads and as two torchrun-style ranks (Gloo on
//! the loopback) with 1 thread each and half the batch and prompts per rank; pairs per hour,
//! learner step time and the share of the step spent averaging gradients. Then, on paper, the
//! bytes a LoRA r32 step all-reduces on the real SD-Turbo and SDXL-Turbo UNets and the time
//! that takes at NVLink and 100 Gb/s bandwidths.
//!
//! Run: `cargo bench --bench scale`. Prints Markdown tables.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const STEPS: u64 = 24;

fn config(dir: &Path, prompts_per_round: u32, batch: u32) -> PathBuf {
    let text = format!(
        "[run]\nname = \"bench\"\n[model]\nid = \"{}\"\ndevice = \"cpu\"\n[sampler]\n\
         name = \"euler_ancestral\"\nsteps = 4\nheight = 32\nwidth = 32\n[reward]\n\
         scorer = \"pickscore\"\nmodel = \"{}\"\n[peft]\nrank = 4\nalpha = 4.0\n[optim]\n\
         lr = 1e-4\n[learner]\nbatch_size = {batch}\nrefresh_every = 2\nmax_steps = {STEPS}\n\
         checkpoint_every = 1000\n[online]\nprompts_per_round = {prompts_per_round}\n\
         [eval]\nevery = 0\n",
        dir.join("sd").display(),
        dir.join("clip/quick").display()
    );
    let path = dir.join(format!("scale-{prompts_per_round}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `pso online` as `world` ranks with `threads` libtorch threads each; returns rank 0's
/// metrics lines.
fn online(dir: &Path, world: usize, threads: usize) -> Vec<Value> {
    let out = dir.join(format!("world-{world}"));
    let _ = std::fs::remove_dir_all(&out);
    let config = config(dir, 4 / world as u32, 2 / world as u32);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_pso"));
            c.args(["online", "--config"])
                .arg(&config)
                .arg("--out")
                .arg(&out)
                .env("OMP_NUM_THREADS", threads.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if world > 1 {
                c.envs(dist::Launch::local(rank, world, port).to_env())
                    .env("GLOO_SOCKET_IFNAME", "lo");
            }
            c.spawn().unwrap()
        })
        .collect();
    for child in children {
        let done = child.wait_with_output().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mean(lines: &[Value], key: &str) -> f64 {
    let values: Vec<f64> = lines.iter().filter_map(|l| l[key].as_f64()).collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/bench-scale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    let run = |script: &Path, args: &[&Path]| -> String {
        let out = Command::new(&python)
            .arg(script)
            .args(args)
            .output()
            .expect("run scripts/setup.sh first");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let oracle = root.join("scripts/oracle");
    run(&oracle.join("peft_oracle.py"), &["make".as_ref(), &dir]);
    run(&oracle.join("make_clip.py"), &[&dir.join("clip")]);

    println!("| processes | threads each | pairs/hour | learner step (s) | gradient sync (s) | sync share of the step |");
    println!("|---|---|---|---|---|---|");
    for (world, threads) in [(1, 2), (2, 1)] {
        let lines = online(&dir, world, threads);
        assert_eq!(lines.len() as u64, STEPS);
        let per_hour = lines.last().unwrap()["pairs_per_s"].as_f64().unwrap() * 3600.0;
        let step = mean(&lines, "time_learner_s");
        let sync = match world {
            1 => "—".to_string(),
            _ => format!("{:.4}", mean(&lines, "time_grad_sync_s")),
        };
        let share = match world {
            1 => "—".to_string(),
            _ => format!("{:.1} %", 100.0 * mean(&lines, "time_grad_sync_s") / step),
        };
        println!("| {world} | {threads} | {per_hour:.0} | {step:.3} | {sync} | {share} |");
    }

    // On paper: fp32 gradients, a ring all-reduce moves 2·(N−1)/N of the buffer per rank.
    println!();
    println!("| UNet | LoRA r32 params | fp32 gradient buffer | ring all-reduce, 8 ranks, NVLink (~350 GB/s bus) | 100 Gb/s network (~11 GB/s) |");
    println!("|---|---|---|---|---|");
    let counts = run(&root.join("bench/scale_lora_bytes.py"), &["32".as_ref()]);
    for line in counts.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let params = v["params"].as_f64().unwrap();
        let bytes = params * 4.0;
        let moved = bytes * 2.0 * 7.0 / 8.0;
        println!(
            "| {} | {:.1} M | {:.0} MB | {:.2} ms | {:.1} ms |",
            v["model"].as_str().unwrap(),
            params / 1e6,
            bytes / 1e6,
            moved / 350e9 * 1e3,
            moved / 11e9 * 1e3,
        );
    }
}
