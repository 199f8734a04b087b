//! The GPU proof's dry run: bench/gpu/check.py runs every stage of scripts/gpu-check.sh on the
//! CPU with tiny models (fp32), so the script the GPU machine runs cannot rot between the
//! sessions that have one.

mod common;

use std::process::Command;

/// The dry run of `stages` (unet or flow); its results.json, every stage of `names` run
/// without an error.
fn dry_run(stages: &str, names: &[&str]) -> serde_json::Value {
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
            "--stages",
            stages,
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
    for name in names {
        let stage = &results["stages"][name];
        assert!(
            stage.is_object() && stage.get("error").is_none() && stage.get("skipped").is_none(),
            "{name}: {stage}"
        );
    }
    results["stages"].clone()
}

fn positive(v: &serde_json::Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite())
}

#[test]
fn the_gpu_check_runs_every_stage_on_tiny_models() {
    let stages = dry_run(
        "unet",
        &[
            "build",
            "parity",
            "sample_speed",
            "learn",
            "score_speed",
            "online_loop",
        ],
    );
    // fp32 parity with diffusers, on every pipeline and step count.
    let parity = stages["parity"]["rows"].as_array().unwrap();
    assert_eq!(parity.len(), 6, "{parity:?}");
    for row in parity {
        assert_eq!(row["pass"], true, "{row}");
        assert!(row["max_abs"].as_i64().unwrap() <= 3, "{row}");
    }
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

#[test]
fn the_gpu_checks_flow_stages_run_on_a_tiny_z_image() {
    let stages = dry_run(
        "flow",
        &[
            "flow_build",
            "flow_parity",
            "flow_sample_speed",
            "flow_learn",
        ],
    );
    // fp32 parity with ZImagePipeline at 4 and 9 steps.
    let parity = stages["flow_parity"]["rows"].as_array().unwrap();
    assert_eq!(parity.len(), 2, "{parity:?}");
    for row in parity {
        assert_eq!(row["pass"], true, "{row}");
    }
    for row in stages["flow_sample_speed"]["rows"].as_array().unwrap() {
        if row.get("ratio").is_some() {
            assert!(
                positive(&row["pso_images_per_s"]) && positive(&row["diffusers_images_per_s"]),
                "{row}"
            );
        }
    }
    // Blocks kept and recomputed; both sides train the same LoRA.
    let learn = stages["flow_learn"]["rows"].as_array().unwrap();
    assert_eq!(learn.len(), 2, "{learn:?}");
    for row in learn {
        assert!(
            positive(&row["pso_seconds_per_step"]) && positive(&row["pytorch_seconds_per_step"]),
            "{row}"
        );
        assert_eq!(row["trainable_pso"], row["trainable_pytorch"], "{row}");
        assert_eq!(row["transitions"], 3, "{row}");
    }
}
