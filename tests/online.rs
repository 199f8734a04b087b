//! `pso online` on a tiny random-weight SD pipeline scored by a tiny CLIP (PickScore layout):
//! a short run's files, exact regeneration from the store, kill -9 and SIGTERM with resume,
//! a scorer that fails half its calls, a concurrent actor's staleness, and the learner's loss
//! against the sampler's own recorded kernels.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pairs::reader::{PairReader, ReadOptions};
use pairs::{batch_to_records, PairRecord};
use pso::config::RunConfig;
use pso::run::online::{run, OnlineOptions, Scorers};
use reward::{RewardError, ScoreItem, Scorer, ScorerInfo};
use serde_json::Value;
use tch::Device;

/// The tiny pipelines and the tiny CLIP, once per test binary.
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("online-models");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::oracle("peft_oracle.py", &["make".as_ref(), dir.as_os_str()]);
        common::oracle("make_clip.py", &[dir.join("clip").as_os_str()]);
        dir
    })
}

fn config_text(extra: &str) -> String {
    format!(
        r#"
[run]
name = "t"
seed = 3
[model]
id = "{sd}"
device = "cpu"
[sampler]
name = "euler_ancestral"
steps = 4
height = 16
width = 16
samples_per_prompt = 2
[reward]
scorer = "pickscore"
model = "{clip}"
retry_seconds = 0.01
[objective]
kind = "online_pso"
[peft]
kind = "lora"
rank = 4
alpha = 4.0
[optim]
lr = 1e-3
[learner]
batch_size = 2
refresh_every = 2
max_steps = 6
checkpoint_every = 2
[online]
prompts_per_round = 3
[eval]
every = 3
count = 3
[pairs]
flush_every_pairs = 2
{extra}
"#,
        sd = models().join("sd").display(),
        clip = models().join("clip/quick").display(),
    )
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("online.toml");
    std::fs::write(&path, config_text(extra)).unwrap();
    path
}

fn pso() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pso"))
}

fn online(config: &Path, out: &Path, args: &[&str]) -> Command {
    let mut c = pso();
    c.args(["online", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(args);
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn steps(run: &Path) -> Vec<u64> {
    metrics(run)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

fn pairs(run: &Path) -> Vec<PairRecord> {
    let reader = PairReader::open(&[run.join("pairs")], ReadOptions::default()).unwrap();
    let mut out: Vec<PairRecord> = reader
        .flat_map(|b| batch_to_records(&b.unwrap(), 0).unwrap())
        .collect();
    out.sort_by_key(|r| r.pair_id);
    out
}

fn file(run: &Path, step: u64, name: &str) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/{name}"))).unwrap()
}

/// Waits until `path` exists (the run got that far), or fails after a minute.
fn wait_for(child: &mut Child, path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {}",
            path.display()
        );
        assert!(start.elapsed() < Duration::from_secs(60), "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_short_run_writes_pairs_metrics_evals_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let run = dir.path().join("run");
    let stdout = ok(online(&config, &run, &[]));
    assert!(stdout.contains("done after 6 steps"), "{stdout}");
    assert!(stdout.contains(&run.join("pairs").display().to_string()));

    let m = metrics(&run);
    assert_eq!(steps(&run), [1, 2, 3, 4, 5, 6]);
    for key in [
        "loss",
        "reward_mean",
        "reward_std",
        "reward_max",
        "score_margin",
        "accuracy",
        "clamped_fraction",
        "grad_norm",
        "lr",
        "pairs_per_s",
        "images_per_s",
        "time_actor_s",
        "time_reward_s",
        "time_learner_s",
        "policy_version",
        "sample_policy_version",
    ] {
        assert!(m.iter().all(|l| !l[key].is_null()), "{key} missing: {m:?}");
    }
    // Round r (3 prompts, 1 pair each) was sampled after 2r steps and feeds steps 2r+1, 2r+2.
    let versions: Vec<u64> = m
        .iter()
        .map(|l| l["sample_policy_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [0, 0, 2, 2, 4, 4]);

    let stored = pairs(&run);
    let ids: Vec<i64> = stored.iter().map(|r| r.pair_id).collect();
    assert_eq!(ids, (0..9).collect::<Vec<_>>());
    let pv: Vec<i64> = stored.iter().map(|r| r.policy_version.unwrap()).collect();
    assert_eq!(pv, [0, 0, 0, 2, 2, 2, 4, 4, 4]);
    assert!(stored
        .iter()
        .all(|r| r.latents.as_ref().unwrap().trajectories.is_some()));
    ok({
        let mut c = pso();
        c.args(["pairs", "validate"]).arg(run.join("pairs"));
        c
    });

    let evals: Vec<Value> = std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let eval_steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [0, 3, 6]);
    assert!(evals.iter().all(|e| e["eval/pickscore"].is_f64()));
    for step in [0, 3, 6] {
        let grid = image::open(run.join(format!("samples/step-{step:08}.png"))).unwrap();
        assert_eq!((grid.width(), grid.height()), (48, 16));
    }
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-00000006"
    );

    // A pair of the base policy (version 0) regenerates from its seed with `pso sample`.
    let first = &stored[0];
    let out = dir.path().join("regen");
    ok({
        let mut c = pso();
        c.args(["sample", "--model"])
            .arg(models().join("sd"))
            .args(["--prompt", &first.prompt, "--sampler", "euler_ancestral"])
            .args([
                "--steps", "4", "--height", "16", "--width", "16", "--device", "cpu",
            ])
            .args(["--seed", &first.sides[0].seed.unwrap().to_string(), "--out"])
            .arg(&out);
        c
    });
    let again = image::open(out.join("000000.png")).unwrap().to_rgb8();
    let stored_image = image::load_from_memory(&first.sides[0].image)
        .unwrap()
        .to_rgb8();
    // Sampled in a batch of K there and alone here: equal up to fp32 rounding of the batch.
    let worst = again
        .as_raw()
        .iter()
        .zip(stored_image.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "regenerated image differs by {worst}");
}

#[test]
fn kill_9_then_resume_repeats_the_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let sets = ["--max-steps", "30", "--set", "eval.every=0"];
    let whole = dir.path().join("whole");
    ok(online(&config, &whole, &sets));

    let killed = dir.path().join("killed");
    let mut child = online(&config, &killed, &sets)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        &mut child,
        &killed.join("checkpoints/step-00000004/state.json"),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let before = steps(&killed).len();
    assert!(before < 30, "the run finished before it was killed");
    ok(online(
        &config,
        &killed,
        &[&sets[..], &["--resume"]].concat(),
    ));

    assert_eq!(steps(&killed), (1..=30).collect::<Vec<u64>>());
    for name in [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(
            file(&whole, 30, name) == file(&killed, 30, name),
            "{name} differs from the uninterrupted run"
        );
    }
    let (a, b) = (pairs(&whole), pairs(&killed));
    assert_eq!(a.len(), b.len(), "pairs repeated or lost");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.pair_id, &x.sides[0].seed), (y.pair_id, &y.sides[0].seed));
        assert_eq!(x.latents, y.latents);
    }
}

#[cfg(unix)]
#[test]
fn sigterm_checkpoints_within_seconds_and_resume_neither_repeats_nor_loses_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let run = dir.path().join("run");
    let sets = ["--max-steps", "1000", "--set", "eval.every=0"];
    let mut child = online(&config, &run, &sets)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        &mut child,
        &run.join("checkpoints/step-00000004/state.json"),
    );
    let sent = Instant::now();
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(sent.elapsed() < Duration::from_secs(10));
    let stopped_at = *steps(&run).last().unwrap();
    assert!(stopped_at < 1000);
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{stopped_at:08}"));
    let before = pairs(&run).len();

    let target = (stopped_at + 4).to_string();
    ok(online(
        &config,
        &run,
        &["--max-steps", &target, "--set", "eval.every=0", "--resume"],
    ));
    assert_eq!(steps(&run), (1..=stopped_at + 4).collect::<Vec<u64>>());
    let stored = pairs(&run);
    let ids: Vec<i64> = stored.iter().map(|r| r.pair_id).collect();
    assert_eq!(ids, (0..stored.len() as i64).collect::<Vec<_>>());
    assert!(stored.len() > before, "the resumed run stored new pairs");
}

/// A real scorer that fails every other call.
struct Flaky {
    inner: Box<dyn Scorer>,
    calls: AtomicU64,
}

#[async_trait]
impl Scorer for Flaky {
    fn info(&self) -> ScorerInfo {
        self.inner.info()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if self.calls.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            return Err(RewardError::Config("HTTP 503 (simulated)".into()));
        }
        self.inner.score(items).await
    }
}

fn pickscore() -> Box<dyn Scorer> {
    reward::load_local(
        reward::LocalScorerKind::Pickscore,
        &models().join("clip/quick"),
        Device::Cpu,
    )
    .unwrap()
}

fn options(out: &Path) -> OnlineOptions {
    OnlineOptions {
        out: out.to_owned(),
        resume: false,
        progress: false,
        max_hours: None,
        group: None,
    }
}

#[test]
fn a_scorer_failing_half_its_calls_delays_labels_but_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = RunConfig::from_toml(
        &config_text(""),
        Path::new("online.toml"),
        &["eval.every=0".into()],
    )
    .unwrap();
    let flaky = Arc::new(Flaky {
        inner: pickscore(),
        calls: AtomicU64::new(0),
    });
    let out = dir.path().join("run");
    let scorers = Scorers {
        train: flaky.clone(),
        eval: Vec::new(),
    };
    let summary = run(&config, options(&out), scorers).unwrap();
    assert_eq!(summary.steps, 6);
    assert!(
        flaky.calls.load(Ordering::SeqCst) >= 18,
        "3 rounds × 3 prompts × (fail + ok)"
    );
    let stored = pairs(&out);
    assert_eq!(stored.len(), 9);
    // Every stored score is the real scorer's score of the stored image.
    let real = pickscore();
    for r in &stored {
        let images: Vec<image::RgbImage> = r
            .sides
            .iter()
            .map(|s| image::load_from_memory(&s.image).unwrap().to_rgb8())
            .collect();
        let items: Vec<ScoreItem> = images
            .iter()
            .map(|image| ScoreItem {
                prompt: &r.prompt,
                image,
            })
            .collect();
        let scores = block_on(real.score(&items));
        for (s, want) in r.sides.iter().zip(scores) {
            assert!((s.score - want).abs() < 1e-5, "{} vs {want}", s.score);
        }
    }

    // A scorer that never answers: the run gives up after its patience, with a checkpoint and
    // without a pair labelled from a failed call.
    struct Down;
    #[async_trait]
    impl Scorer for Down {
        fn info(&self) -> ScorerInfo {
            ScorerInfo {
                name: "down".into(),
                version: "0".into(),
                higher_is_better: true,
            }
        }
        async fn score(&self, _: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
            Err(RewardError::Config("connection refused (simulated)".into()))
        }
    }
    let mut patient = config.clone();
    patient.reward.patience_seconds = 0.2;
    let out = dir.path().join("down");
    let e = run(
        &patient,
        options(&out),
        Scorers {
            train: Arc::new(Down),
            eval: Vec::new(),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("connection refused") && e.contains("--resume"),
        "{e}"
    );
    assert!(out.join("checkpoints/step-00000000/state.json").exists());
    assert!(pairs(&out).is_empty());
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, RewardError>>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
        .unwrap()
}

#[test]
fn a_concurrent_actor_gets_every_update_and_staleness_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = RunConfig::from_toml(
        &config_text(""),
        Path::new("online.toml"),
        &[
            "eval.every=0".into(),
            "online.actor_device=cpu".into(),
            "online.max_staleness=2".into(),
            "learner.max_steps=16".into(),
        ],
    )
    .unwrap();
    let out = dir.path().join("run");
    let scorers = Scorers {
        train: Arc::from(pickscore()),
        eval: Vec::new(),
    };
    run(&config, options(&out), scorers).unwrap();
    let m = metrics(&out);
    assert_eq!(steps(&out), (1..=16).collect::<Vec<u64>>());
    for line in &m {
        let staleness = line["staleness"].as_u64().unwrap();
        let (step, version) = (
            line["step"].as_u64().unwrap(),
            line["sample_policy_version"].as_u64().unwrap(),
        );
        assert!(staleness <= 2, "{line}");
        // Recorded at the round's first step, which is at most refresh_every − 1 steps back.
        assert!(step - 1 - version <= staleness + 1, "{line}");
    }
    let stored = pairs(&out);
    let versions: BTreeSet<i64> = stored.iter().map(|r| r.policy_version.unwrap()).collect();
    assert!(
        versions.len() >= 3,
        "the actor sampled with updated weights: {versions:?}"
    );
    let ids: Vec<i64> = stored.iter().map(|r| r.pair_id).collect();
    assert_eq!(ids, (0..stored.len() as i64).collect::<Vec<_>>());
}

#[test]
fn the_learner_loss_matches_the_samplers_recorded_kernels() {
    let config = RunConfig::from_toml(&config_text(""), Path::new("online.toml"), &[]).unwrap();
    common::learner_loss_matches_recorded_kernels(&config);
}

/// The SFT baseline runs on the same loop: the loss is the winners' denoising MSE (no
/// preference margin), the weights move, and a kill-free resume from a checkpoint repeats the
/// uninterrupted run exactly (its noise and timesteps are drawn from pair ids, not a stream).
#[test]
fn the_sft_baseline_trains_on_winners_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let sft = ["--set", "objective.kind=sft", "--set", "eval.every=0"];
    let whole = dir.path().join("whole");
    ok(online(
        &config,
        &whole,
        &[&sft[..], &["--max-steps", "4"]].concat(),
    ));
    let m = metrics(&whole);
    assert_eq!(m.len(), 4);
    for line in &m {
        let (loss, mse) = (
            line["loss"].as_f64().unwrap(),
            line["mse_policy"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && loss > 0.0 && loss == mse, "{line}");
        assert!(line.get("margin").is_none_or(Value::is_null), "{line}");
    }
    assert_ne!(
        file(&whole, 2, "trainable.safetensors"),
        file(&whole, 4, "trainable.safetensors")
    );
    let split = dir.path().join("split");
    ok(online(
        &config,
        &split,
        &[&sft[..], &["--max-steps", "2"]].concat(),
    ));
    ok(online(
        &config,
        &split,
        &[&sft[..], &["--max-steps", "4", "--resume"]].concat(),
    ));
    assert_eq!(
        file(&whole, 4, "trainable.safetensors"),
        file(&split, 4, "trainable.safetensors")
    );
    let losses = |run: &Path| -> Vec<f64> {
        metrics(run)
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&whole), losses(&split));
}

/// The online loop on a class-conditional DiT: prompts are class names or ids, pairs keep them,
/// and DiffFit trains.
#[test]
fn an_online_run_on_a_dit_samples_classes_and_trains_difffit() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("classes.txt");
    std::fs::write(&prompts, "kitty\ndog\n0\n").unwrap();
    let text = config_text(&format!("[prompts]\ntrain = \"{}\"\n", prompts.display()))
        .replace(
            &models().join("sd").display().to_string(),
            &models().join("dit").display().to_string(),
        )
        .replace("name = \"euler_ancestral\"", "name = \"ddpm\"")
        .replace("kind = \"lora\"", "kind = \"difffit\"")
        .replace(
            "[eval]\n",
            &format!("[eval]\nprompts = \"{}\"\n", prompts.display()),
        );
    let config = dir.path().join("dit.toml");
    std::fs::write(&config, text).unwrap();
    let run = dir.path().join("run");
    let stdout = ok(online(&config, &run, &[]));
    assert!(stdout.contains("done after 6 steps"), "{stdout}");
    let m = metrics(&run);
    assert!(m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    let stored = pairs(&run);
    assert_eq!(stored.len(), 9);
    assert!(stored
        .iter()
        .all(|r| ["kitty", "dog", "0"].contains(&r.prompt.as_str())));
    let trained =
        tch::Tensor::read_safetensors(run.join("checkpoints/step-00000006/trainable.safetensors"))
            .unwrap();
    assert!(trained
        .iter()
        .any(|(n, _)| n == "transformer_blocks.0.gamma_attn1"));
}

fn shard_ranks(run: &Path) -> BTreeSet<String> {
    std::fs::read_dir(run.join("pairs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .map(|n| n.split('-').nth(1).unwrap().to_owned())
        .collect()
}

/// Data-parallel online PSO under torchrun's contract: each rank samples its own rounds (rank
/// r the global rounds r, r + 2, … of one process's numbering) and writes its own shards into
/// the one store; rank 0 alone writes metrics (over both ranks), evaluations and checkpoints;
/// stopping after two steps and resuming both ranks gives the straight run's weights bit for
/// bit.
#[test]
fn two_ranks_sample_their_own_rounds_into_one_store_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let sets = ["--set", "learner.batch_size=1", "--set", "eval.every=2"];
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["online", "--config", s(&config), "--out", s(out)]
            .map(String::from)
            .to_vec();
        v.extend(sets.iter().chain(extra).map(|a| a.to_string()));
        v
    };
    let (straight, resumed, single) = (
        dir.path().join("straight"),
        dir.path().join("resumed"),
        dir.path().join("single"),
    );
    let outs = common::run_ranks(2, &refs(&args(&straight, &["--max-steps", "4"])));
    assert!(outs[0].contains("after 4 steps"), "{outs:?}");
    assert!(outs[1].is_empty(), "only rank 0 reports: {outs:?}");

    // One store, both ranks' shards, the pair ids of rounds 0..4 of one numbering.
    assert_eq!(
        shard_ranks(&straight),
        BTreeSet::from(["rank000".to_string(), "rank001".to_string()])
    );
    let stored = pairs(&straight);
    let per_round = 3; // prompts_per_round × one pair per group of two
    let ids: Vec<i64> = stored.iter().map(|r| r.pair_id).collect();
    assert_eq!(
        ids,
        (0..4 * per_round).collect::<Vec<_>>(),
        "two rounds per rank"
    );
    // Global round 0 is rank 0's first: the same pairs a single process samples first.
    ok(online(
        &config,
        &single,
        &["--max-steps", "1", "--set", "eval.every=0"],
    ));
    let first = pairs(&single);
    for (a, b) in first.iter().take(per_round as usize).zip(&stored) {
        assert_eq!((a.pair_id, &a.prompt), (b.pair_id, &b.prompt));
        assert_eq!(a.sides[0].image, b.sides[0].image, "pair {}", a.pair_id);
    }
    let m = metrics(&straight);
    assert_eq!(steps(&straight), vec![1, 2, 3, 4]);
    for line in &m {
        assert_eq!(line["world_size"], 2, "{line}");
        assert!(line["reward_mean"].is_f64(), "{line}");
    }
    let evals = std::fs::read_to_string(straight.join("eval.jsonl")).unwrap();
    assert_eq!(
        evals.lines().count(),
        3,
        "steps 0, 2 and 4, once each:\n{evals}"
    );

    // Two steps, then both ranks resume from rank 0's checkpoint.
    common::run_ranks(2, &refs(&args(&resumed, &["--max-steps", "2"])));
    common::run_ranks(2, &refs(&args(&resumed, &["--max-steps", "4", "--resume"])));
    assert_eq!(
        file(&straight, 4, "trainable.safetensors"),
        file(&resumed, 4, "trainable.safetensors"),
        "the resumed data-parallel run differs"
    );
    assert_eq!(steps(&resumed), vec![1, 2, 3, 4]);
    assert_eq!(
        pairs(&resumed)
            .iter()
            .map(|r| r.pair_id)
            .collect::<Vec<_>>(),
        ids,
        "resume neither repeats nor loses pairs"
    );
}

/// SIGTERM to one rank stops both after the same step with one checkpoint and exit 0; kill -9
/// of rank 1 makes rank 0 fail within seconds, naming the lost rank, and leaves a store that
/// recovers and validates and a checkpoint that reads back.
#[test]
fn sigterm_on_one_rank_stops_both_and_a_killed_rank_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let run = dir.path().join("run");
    let args = |resume: bool| -> Vec<String> {
        let mut v: Vec<String> = ["online", "--config", s(&config), "--out", s(&run)]
            .map(String::from)
            .to_vec();
        v.extend(
            [
                "--max-steps",
                "1000",
                "--set",
                "eval.every=0",
                "--set",
                "learner.batch_size=1",
            ]
            .map(String::from),
        );
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let wait_checkpoint = |children: &mut [Child], step: u64| {
        let path = run.join(format!("checkpoints/step-{step:08}/state.json"));
        let start = Instant::now();
        while !path.exists() {
            for c in children.iter_mut() {
                assert!(c.try_wait().unwrap().is_none(), "a rank ended early");
            }
            assert!(start.elapsed() < Duration::from_secs(120), "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut children = common::spawn_ranks(2, &refs(&args(false)), 60);
    wait_checkpoint(&mut children, 4);
    let sent = Instant::now();
    // SAFETY: signalling a child process this test started.
    assert_eq!(
        unsafe { libc::kill(children[1].id() as i32, libc::SIGTERM) },
        0
    );
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        sent.elapsed() < Duration::from_secs(20),
        "{:?}",
        sent.elapsed()
    );
    let stopped_at = *steps(&run).last().unwrap();
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{stopped_at:08}"));

    let mut children = common::spawn_ranks(2, &refs(&args(true)), 60);
    let next = (stopped_at / 2 + 2) * 2;
    wait_checkpoint(&mut children, next);
    let mut rank1 = children.pop().unwrap();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed = Instant::now();
    let out = children.pop().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 went on without rank 1");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    assert!(stderr.contains("lost rank 1"), "{stderr}");

    ok({
        let mut c = pso();
        c.args(["pairs", "recover"]).arg(run.join("pairs"));
        c
    });
    ok({
        let mut c = pso();
        c.args(["pairs", "validate"]).arg(run.join("pairs"));
        c
    });
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let state = run
        .join("checkpoints")
        .join(latest.trim())
        .join("state.json");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    assert!(
        state["counters"]["step"].as_u64().unwrap() >= next,
        "{state}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A composite training scorer (tiny PickScore + redness, both normalised by running
/// statistics): metrics.jsonl logs each part's mean raw score per round next to the composite's.
#[test]
fn a_composite_scorer_logs_each_part() {
    let dir = tempfile::tempdir().unwrap();
    let composite = dir.path().join("composite.toml");
    std::fs::write(
        &composite,
        format!(
            "[[parts]]\nscorer = \"pickscore\"\nmodel = \"{}\"\nnormalize = \"running\"\n\n\
             [[parts]]\nscorer = \"pixel\"\nmodel = \"redness\"\nname = \"redness\"\n\
             weight = 0.5\nnormalize = \"running\"\n",
            models().join("clip/quick").display()
        ),
    )
    .unwrap();
    let config = write_config(dir.path(), "");
    let run = dir.path().join("run");
    let model = format!("reward.model={}", composite.display());
    ok(online(
        &config,
        &run,
        &[
            "--max-steps",
            "2",
            "--set",
            "eval.every=0",
            "--set",
            "reward.scorer=composite",
            "--set",
            &model,
        ],
    ));
    let m = metrics(&run);
    assert_eq!(m.len(), 2);
    for line in &m {
        let pick = line["reward/pickscore"].as_f64().unwrap();
        let red = line["reward/redness"].as_f64().unwrap();
        assert!(pick.abs() > 0.0 && (-1.0..=1.0).contains(&red), "{line}");
        // The composite of running z-scores averages 0 over everything scored so far.
        assert!(line["reward_mean"].as_f64().unwrap().abs() < 3.0, "{line}");
    }
    assert!(pairs(&run).iter().all(|p| p.scorer == "composite"));
}
