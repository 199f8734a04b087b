//! The online loop's throughput: pairs per hour and the fraction of wall time the learner is
//! busy, for the same work run three ways on a tiny random-weight SD pipeline scored by a tiny
//! CLIP (PickScore layout), fp32, CPU:
//! - `sequential`: sample a prompt's group, score it, next prompt; then learn (no overlap);
//! - `pipelined`: `pso online` with actor and learner alternating on one device, each group
//!   scored while the next one is sampled;
//! - `concurrent`: `pso online` with a second model copy sampling in its own thread
//!   (`online.actor_device = "cpu"`), the learner training meanwhile.
//!
//! Run: `cargo bench --bench loop`. Prints a Markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diffusion::pipeline::images::rgb_images;
use pso::actor::Actor;
use pso::config::RunConfig;
use pso::learner::{Learner, LearnerError};
use pso::run::label::PatientScorer;
use pso::run::online::{run, OnlineOptions, OnlineTrainer, Scorers};
use pso::run::rounds::{Round, TrainingPair};
use reward::{ScoreItem, Scorer};
use serde_json::Value;
use tch::Device;

const STEPS: u64 = 48;

fn scorer(dir: &Path) -> Arc<dyn Scorer> {
    Arc::from(
        reward::load_local(
            reward::LocalScorerKind::Pickscore,
            &dir.join("clip/quick"),
            Device::Cpu,
        )
        .unwrap(),
    )
}

fn config(dir: &Path, sets: &[&str]) -> RunConfig {
    let text = format!(
        "[run]\nname = \"bench\"\n[model]\nid = \"{}\"\ndevice = \"cpu\"\n[sampler]\n\
         name = \"euler_ancestral\"\nsteps = 4\nheight = 32\nwidth = 32\n[reward]\n\
         scorer = \"pickscore\"\nmodel = \"{}\"\n[peft]\nrank = 4\nalpha = 4.0\n[optim]\n\
         lr = 1e-4\n[learner]\nbatch_size = 2\nrefresh_every = 2\nmax_steps = {STEPS}\n\
         checkpoint_every = 1000\n[online]\nprompts_per_round = 4\n[eval]\nevery = 0\n",
        dir.join("sd").display(),
        dir.join("clip/quick").display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml(&text, Path::new("bench.toml"), &sets).unwrap()
}

/// (pairs per hour, learner busy fraction) of a `pso online` run.
fn online(dir: &Path, name: &str, sets: &[&str]) -> (f64, f64) {
    let out = dir.join(name);
    let _ = std::fs::remove_dir_all(&out);
    run(
        &config(dir, sets),
        OnlineOptions {
            out: out.clone(),
            resume: false,
            progress: false,
            max_hours: None,
            group: None,
        },
        Scorers {
            train: scorer(dir),
            eval: Vec::new(),
        },
    )
    .unwrap();
    // Both are measured from the loop's start (model loading excluded, as in `sequential`).
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    (
        last["pairs_per_s"].as_f64().unwrap() * 3600.0,
        last["learner_busy"].as_f64().unwrap(),
    )
}

/// The same rounds and steps with nothing overlapped.
fn sequential(dir: &Path) -> (f64, f64) {
    let config = config(dir, &[]);
    let trainer = OnlineTrainer::load(&config, Device::Cpu).unwrap();
    let mut learner = Learner::new(
        trainer.adapter.params_shallow(),
        &config.optim,
        &config.learner,
    );
    let patient = PatientScorer::new(scorer(dir), Duration::from_secs(1), Duration::from_secs(60));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let prompts = pso::run::prompts::PromptSet::load("builtin:simple").unwrap();
    let halt = AtomicBool::new(false);
    let t = trainer.stochastic_steps().len() as u32;
    let started = Instant::now();
    let (mut pairs, mut learner_seconds) = (0usize, 0.0);
    let mut round = 0u64;
    while learner.counters().step < STEPS {
        let actor = Actor::new(&trainer.pipeline, trainer.settings().clone()).unwrap();
        let mut made = Vec::new();
        for slot in 0..4u32 {
            let index = (round as usize * 4 + slot as usize) % prompts.len();
            let group = actor
                .sample(
                    round,
                    slot,
                    index,
                    prompts.get(index),
                    learner.counters().step,
                )
                .unwrap();
            let images = rgb_images(&group.images);
            let items: Vec<ScoreItem> = images
                .iter()
                .map(|image| ScoreItem {
                    prompt: &group.prompt,
                    image,
                })
                .collect();
            let scores = runtime
                .block_on(patient.score(&items, &halt))
                .unwrap()
                .unwrap();
            let (w, l) = if scores[0] >= scores[1] {
                (0, 1)
            } else {
                (1, 0)
            };
            made.push(TrainingPair {
                pair_id: pairs as i64,
                prompt: group.prompt.clone(),
                winner: group.trajectories.get(w),
                loser: group.trajectories.get(l),
                counted: scores[0] != scores[1],
                margin: (scores[0] - scores[1]).abs(),
            });
            pairs += 1;
        }
        let prepared = trainer
            .prepare(Round {
                index: round,
                policy_version: learner.counters().step,
                pairs: made,
                scores: Vec::new(),
                actor_seconds: 0.0,
                reward_wait_seconds: 0.0,
                images: 8,
                parts: Vec::new(),
            })
            .unwrap();
        for k in 0..2 {
            let chosen: Vec<_> = (0..2).map(|i| &prepared[(k * 2 + i) % 4]).collect();
            let report = learner
                .step_over(t, |micro| {
                    let steps = vec![micro as usize; 2];
                    trainer
                        .loss(&chosen, &steps)
                        .map_err(|e| LearnerError::Batch(Box::new(e)))
                })
                .unwrap();
            learner_seconds += report.seconds;
        }
        round += 1;
    }
    let wall = started.elapsed().as_secs_f64();
    (pairs as f64 * 3600.0 / wall, learner_seconds / wall)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/bench-loop");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let python = std::env::var("PSO_PYTHON")
        .unwrap_or_else(|_| root.join(".venv/bin/python").display().to_string());
    for (script, target) in [
        ("peft_oracle.py", dir.clone()),
        ("make_clip.py", dir.join("clip")),
    ] {
        let mut c = Command::new(&python);
        c.arg(root.join("scripts/oracle").join(script));
        if script == "peft_oracle.py" {
            c.arg("make");
        }
        let out = c.arg(&target).output().expect("run scripts/setup.sh first");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tch::set_num_threads(2);
    let rows = [
        ("sequential (no overlap)", sequential(&dir)),
        (
            "pipelined scoring, alternating",
            online(&dir, "pipelined", &[]),
        ),
        (
            "concurrent actor thread",
            online(&dir, "concurrent", &["online.actor_device=cpu"]),
        ),
    ];
    println!("| loop | pairs/hour | learner busy | pairs/hour vs sequential |");
    println!("|---|---|---|---|");
    let base = rows[0].1 .0;
    for (name, (per_hour, busy)) in rows {
        println!(
            "| {name} | {per_hour:.0} | {:.0} % | {:.2}× |",
            busy * 100.0,
            per_hour / base
        );
    }
}
