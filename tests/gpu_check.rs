//! The GPU proof's dry run: bench/gpu/check.py runs every stage of scripts/gpu-check.sh on the
//! CPU with tiny models (fp32), so the script the GPU machine runs cannot rot between the
//! sessions that have one.

mod common;

use std::process::Command;

#[test]
fn the_gpu_check_runs_every_stage_on_tiny_models() {
    let out = tempfile::tempdir().unwrap();
    let script = common::workspace_root().join("bench/gpu/check.py");
    let run = Command::new(common::python())
        .arg(&script)
        .args([
            "--pso",
            env!("CARGO_BIN_EXE_pso"),
            "--dry-run",
            "--budget",
            "600",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run scripts/setup.sh: the check needs the oracle's Python");
    let log =
        String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: serde_json::Value = serde_json::from_str(&text).unwrap();
    let stages = results["stages"].as_object().unwrap();
    for name in [
        "build",
        "parity",
        "sample_speed",
        "learn",
        "score_speed",
        "online_loop",
    ] {
        let stage = &stages[name];
        assert!(
            stage.get("error").is_none() && stage.get("skipped").is_none(),
            "{name}: {stage}"
        );
    }
    // fp32 parity with diffusers, on every pipeline and step count.
    let parity = stages["parity"]["rows"].as_array().unwrap();
    assert_eq!(parity.len(), 6, "{parity:?}");
    for row in parity {
        assert_eq!(row["pass"], true, "{row}");
        assert!(row["max_abs"].as_i64().unwrap() <= 3, "{row}");
    }
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    for row in stages["sample_speed"]["rows"].as_array().unwrap() {
        if row.get("ratio").is_some() {
            assert!(
                positive(&row["pso_images_per_s"]) && positive(&row["diffusers_images_per_s"]),
                "{row}"
            );
        }
    }
    let learn = &stages["learn"];
    assert!(
        positive(&learn["pso_seconds_per_step"]) && positive(&learn["pytorch_seconds_per_step"])
    );
    // Both sides train the same LoRA: the same parameters, counted independently.
    assert_eq!(
        learn["trainable_pso"], learn["trainable_pytorch"],
        "{learn}"
    );
    assert!(positive(&stages["score_speed"]["pso_images_per_s"]));
    let loops = stages["online_loop"]["rows"].as_array().unwrap();
    assert_eq!(loops.len(), 2);
    for row in loops {
        assert!(
            positive(&row["pairs_per_hour"]) && positive(&row["learner_busy"]),
            "{row}"
        );
    }
}
