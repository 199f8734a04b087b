//! The embedded toy model: `pso toy build` writes a folder that diffusers samples exactly as
//! `pso sample` does, and the committed model (data/toy) draws what its captions ask for.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use diffusion::pipeline::{LoadOptions, Pipeline};
use diffusion::sampling::Timesteps;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use toy::classifier::{Accuracy, Classifier};
use toy::shapes::Attributes;
use toy::{eval_captions, sample_captions};

const PROMPTS: [&str; 2] = [
    "a small red circle on a blue background",
    "a large white triangle on a black background",
];

#[derive(Debug, Deserialize)]
struct Case {
    case: String,
    prompt: String,
    steps: usize,
    seed: u64,
}

fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/toy")
}

/// Every case of scripts/oracle/sample_folder.py on `folder`, sampled again by `pso sample`:
/// images within 1/255, on at least 99 % of the values.
fn assert_samples_like_diffusers(folder: &Path, scratch: &Path) {
    let _ = std::fs::remove_dir_all(scratch);
    let mut args = vec![folder.as_os_str(), scratch.as_os_str()];
    args.extend(PROMPTS.iter().map(std::ffi::OsStr::new));
    common::oracle("sample_folder.py", &args);
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(scratch.join("cases.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let file = scratch.join(format!("{}.safetensors", c.case));
        let want: Tensor = Tensor::read_safetensors(&file)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "images")
            .unwrap()
            .1;
        let out = scratch.join(format!("out-{}", c.case));
        let run = Command::new(env!("CARGO_BIN_EXE_pso"))
            .args(["sample", "--device", "cpu", "--guidance", "0"])
            .args(["--prompt", &c.prompt])
            .arg("--model")
            .arg(folder)
            .args([
                "--steps",
                &c.steps.to_string(),
                "--seed",
                &c.seed.to_string(),
            ])
            .args(["--height", "32", "--width", "32"])
            .arg("--init-noise")
            .arg(&file)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: {}",
            c.case,
            String::from_utf8_lossy(&run.stderr)
        );
        let ours = image::open(out.join("000000.png")).unwrap().to_rgb8();
        common::assert_image_matches(&ours, &want.get(0), &c.case);
    }
}

#[test]
fn a_quick_build_writes_a_folder_diffusers_samples_like_pso() {
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("toy-quick");
    let _ = std::fs::remove_dir_all(&scratch);
    let out = scratch.join("toy");
    let run = Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(["toy", "build", "--quick", "--seed", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("distilled, LCM"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap();
    let steps: Vec<u64> = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [25, 1, 2, 4]);
    assert!(
        !out.join(".build").exists(),
        "the teacher's scratch folder is removed"
    );
    assert_samples_like_diffusers(&out.join("pipeline"), &scratch.join("oracle"));
}

#[test]
fn the_committed_model_samples_like_diffusers() {
    assert_samples_like_diffusers(
        &committed().join("pipeline"),
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("toy-committed"),
    );
}

/// The claim of data/toy/build.json, checked again: the classifier reads back what the caption
/// asked for from 4-step samples of the committed model, far above chance (1/180).
#[test]
fn the_committed_model_draws_its_captions() {
    let (_, classifier) =
        Classifier::load(&committed().join("classifier.safetensors"), Device::Cpu).unwrap();
    let pipeline = Pipeline::load(
        &committed().join("pipeline"),
        &LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            variant: None,
            backbone_weights: None,
            max_sequence_length: None,
            text_encoder_device: None,
        },
    )
    .unwrap();
    let captions: Vec<Attributes> = eval_captions(11, 48);
    let images = sample_captions(&pipeline, &captions, Timesteps::Steps(4), 0.0, 32).unwrap();
    let accuracy = Accuracy::of(&classifier.predict(&images), &captions);
    assert!(
        accuracy.colour > 0.8
            && accuracy.size > 0.7
            && accuracy.background > 0.9
            && accuracy.caption > 0.2,
        "{accuracy:?}"
    );
}
