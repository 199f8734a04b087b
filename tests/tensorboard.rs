//! TensorBoard event files, read back by TensorBoard's own loader (scripts/oracle).

mod common;

use std::path::Path;
use std::process::Command;

use pso::tensorboard::EventWriter;
use serde_json::{json, Value};

fn read(folder: &Path) -> Value {
    serde_json::from_str(&common::oracle(
        "read_tensorboard.py",
        &[folder.as_os_str()],
    ))
    .unwrap()
}

/// Scalars and images come back with their steps and values; a writer started for a resume
/// makes TensorBoard drop what an earlier file logged from its first step on.
#[test]
fn tensorboard_reads_our_scalars_images_and_resume_points() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = EventWriter::create(dir.path(), "a", 1).unwrap();
    for step in 1..=3u64 {
        first
            .scalars(
                step,
                &[
                    ("train/loss".into(), step as f64),
                    ("train/nan".into(), f64::NAN),
                ],
            )
            .unwrap();
    }
    let picture =
        image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
    let mut png = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    first.image(2, "eval/samples", &png, 5, 3).unwrap();
    drop(first);
    // Resumed from a checkpoint at step 2: step 3 is trained (and logged) again.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut resumed = EventWriter::create(dir.path(), "b", 3).unwrap();
    resumed.scalars(3, &[("train/loss".into(), 30.0)]).unwrap();
    drop(resumed);
    let back = read(dir.path());
    assert_eq!(
        back["scalars"]["train/loss"],
        json!([[1, 1.0], [2, 2.0], [3, 30.0]]),
        "{back}"
    );
    assert!(back["scalars"].get("train/nan").is_none(), "{back}");
    assert_eq!(
        back["images"]["eval/samples"],
        json!([[2, 5, 3, png.len()]]),
        "{back}"
    );
}

/// `pso online --tensorboard` logs every metrics.jsonl number as `train/*`, and each eval as
/// `eval/*` scalars with its sample grid.
#[test]
fn an_online_run_logs_metrics_evals_and_sample_grids() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = common::workspace_root();
    let out = Command::new(env!("CARGO_BIN_EXE_pso"))
        .current_dir(&root)
        .args([
            "online",
            "--config",
            "configs/tiny-cpu.toml",
            "--tensorboard",
            "--max-steps",
            "2",
        ])
        .args([
            "--set",
            "eval.every=1",
            "--set",
            "eval.count=2",
            "--set",
            "online.prompts_per_round=2",
        ])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = read(&run.join("tensorboard"));
    let metrics: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses = back["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(losses.len(), metrics.len(), "{back}");
    for (logged, line) in losses.iter().zip(&metrics) {
        assert_eq!(logged[0], line["step"]);
        let (a, b) = (logged[1].as_f64().unwrap(), line["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert!(back["scalars"]["train/grad_norm"].is_array(), "{back}");
    let evals = std::fs::read_to_string(run.join("eval.jsonl")).unwrap();
    let eval_tag = back["scalars"]
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.starts_with("eval/"))
        .cloned()
        .unwrap_or_else(|| panic!("no eval scalar: {back}"));
    assert!(
        evals.contains(&format!("\"{eval_tag}\"")),
        "{eval_tag} not in {evals}"
    );
    let grids = back["images"]["eval/samples"].as_array().unwrap();
    assert_eq!(grids.len(), evals.lines().count(), "{back}");
}
