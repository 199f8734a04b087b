//! `pso sample` against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on tiny
//! random-weight pipelines built by scripts/oracle/make_pipeline.py (fp32, CPU): the same
//! `--init-noise` (diffusers' `latents=`) and seed give the same final latents and images.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use diffusion::sampling::{SeededNoise, Timesteps};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Deserialize)]
struct Case {
    case: String,
    folder: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance: f64,
    seed: u64,
    height: i64,
    width: i64,
    num_images: i64,
}

fn expected(dir: &Path, case: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(format!("{case}.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

/// The oracle's pipelines and cases, built once per test run for both tests (in Cargo's
/// per-target scratch folder, replaced on every run).
fn oracle_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sample_parity");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::oracle("make_pipeline.py", &[dir.as_os_str()]);
        dir
    })
}

fn cases(dir: &Path) -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap()
}

#[test]
fn final_latents_match_diffusers_pipelines() {
    let dir = oracle_dir();
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: None,
        text_encoder_device: None,
    };
    for c in cases(dir) {
        let pipeline = Pipeline::load(&dir.join(&c.folder), &opts).unwrap();
        let e = expected(dir, &c.case);
        let out = pipeline
            .generate(
                GenerateRequest {
                    prompt: &c.prompt,
                    negative_prompt: c.negative_prompt.as_deref(),
                    timesteps: Timesteps::Steps(c.steps),
                    guidance: c.guidance,
                    height: c.height,
                    width: c.width,
                    num_images: c.num_images,
                    init_latents: Some(e["latents"].shallow_clone()),
                    record: true,
                },
                &mut SeededNoise::new(c.seed),
            )
            .unwrap();
        let want = &e["final"];
        let err = (&out.latents - want).abs().max().double_value(&[])
            / want.abs().max().double_value(&[]);
        assert!(
            err < 1e-4,
            "{}: final latents relative error {err:e}",
            c.case
        );
        let trajectory = out.trajectory.unwrap();
        assert_eq!(trajectory.latents.len(), c.steps + 1, "{}", c.case);
        assert!(trajectory.latents.last().unwrap().equal(&out.latents));
    }
}

#[test]
fn pso_sample_writes_the_images_diffusers_makes() {
    let dir = oracle_dir();
    for c in cases(dir) {
        let e = expected(dir, &c.case);
        let noise = dir.join(format!("{}.safetensors", c.case));
        let out_dir = dir.join(format!("out-{}", c.case));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pso"));
        cmd.args(["sample", "--device", "cpu", "--prompt", &c.prompt])
            .arg("--model")
            .arg(dir.join(&c.folder))
            .args([
                "--steps",
                &c.steps.to_string(),
                "--guidance",
                &c.guidance.to_string(),
            ])
            .args(["--seed", &c.seed.to_string()])
            .args([
                "--height",
                &c.height.to_string(),
                "--width",
                &c.width.to_string(),
            ])
            .arg("--init-noise")
            .arg(&noise)
            .arg("--out")
            .arg(&out_dir);
        if let Some(n) = &c.negative_prompt {
            cmd.args(["--negative-prompt", n]);
        }
        let run = cmd.output().unwrap();
        assert!(
            run.status.success(),
            "{}: {}",
            c.case,
            String::from_utf8_lossy(&run.stderr)
        );
        let want = &e["images"];
        for i in 0..c.num_images {
            let png = out_dir.join(format!("{i:06}.png"));
            let ours = image::open(&png).unwrap().to_rgb8();
            common::assert_image_matches(&ours, &want.get(i), &format!("{} image {i}", c.case));
        }
    }
}

/// Lays a pipeline folder out as the Hugging Face cache stores a downloaded repository.
fn fake_hf_cache(home: &Path, repo: &str, pipeline: &Path) {
    let folder = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    std::fs::create_dir_all(folder.join("snapshots")).unwrap();
    let snapshot = folder.join("snapshots").join(commit);
    let copy = Command::new("cp")
        .arg("-r")
        .arg(pipeline)
        .arg(&snapshot)
        .status()
        .unwrap();
    assert!(copy.success());
}

#[test]
fn hub_ids_resolve_through_the_hf_cache_offline() {
    let dir = oracle_dir();
    let home = tempfile::tempdir().unwrap();
    fake_hf_cache(home.path(), "tiny/sd-pipeline", &dir.join("sd"));
    let run = |model: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_pso"))
            .args([
                "sample", "--device", "cpu", "--prompt", "a cat", "--steps", "1", "--model", model,
            ])
            .arg("--out")
            .arg(out)
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let out = home.path().join("out");
    let ok = run("tiny/sd-pipeline", &out);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.join("000000.png").exists());
    let missing = run("tiny/not-cached", &out);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("tiny/not-cached") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn a_backbone_weights_file_replaces_the_folder_weights() {
    let dir = oracle_dir();
    let case = cases(dir)
        .into_iter()
        .find(|c| c.case == "sd_euler_1")
        .unwrap();
    let noise = dir.join("sd_euler_1.safetensors");
    let sample = |extra: &[&std::ffi::OsStr], out: &Path| {
        let run = Command::new(env!("CARGO_BIN_EXE_pso"))
            .args([
                "sample",
                "--device",
                "cpu",
                "--prompt",
                &case.prompt,
                "--steps",
                "1",
            ])
            .arg("--model")
            .arg(dir.join("sd"))
            .arg("--init-noise")
            .arg(&noise)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(out.join("000000.png")).unwrap().to_rgb8()
    };
    let scratch = tempfile::tempdir().unwrap();
    let base = sample(&[], &scratch.path().join("base"));
    // The same weights through --unet give the same image; perturbed weights give another.
    let weights = dir.join("sd/unet/diffusion_pytorch_model.safetensors");
    assert_eq!(
        sample(
            &["--unet".as_ref(), weights.as_os_str()],
            &scratch.path().join("same")
        ),
        base
    );
    let perturbed: Vec<(String, Tensor)> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if n == "conv_out.bias" { t + 0.5 } else { t };
            (n, t)
        })
        .collect();
    let file = scratch.path().join("distilled_unet.safetensors");
    Tensor::write_safetensors(&perturbed, &file).unwrap();
    assert_ne!(
        sample(
            &["--unet".as_ref(), file.as_os_str()],
            &scratch.path().join("other")
        ),
        base
    );
}

/// The half-precision paths (UNet and text encoders in bf16/f16, latents and the scheduler in
/// fp32, SDXL's VAE kept in fp32 by force_upcast) run and stay close to fp32. libtorch runs both
/// kinds on the CPU, so this checks the dtype plumbing the CUDA path uses.
#[test]
fn half_precision_pipelines_stay_close_to_f32() {
    let dir = oracle_dir();
    let e = expected(dir, "sd_euler_1");
    for folder in ["sd", "sdxl"] {
        let images = |kind: Kind| {
            let opts = LoadOptions {
                device: Device::Cpu,
                kind,
                variant: None,
                backbone_weights: None,
                max_sequence_length: None,
                text_encoder_device: None,
            };
            let pipeline = Pipeline::load(&dir.join(folder), &opts).unwrap();
            let request = GenerateRequest {
                prompt: "a photo of a cat on the moon",
                negative_prompt: None,
                timesteps: Timesteps::Steps(2),
                guidance: 0.0,
                height: 32,
                width: 32,
                num_images: 1,
                init_latents: Some(e["latents"].shallow_clone()),
                record: false,
            };
            let out = pipeline
                .generate(request, &mut SeededNoise::new(0))
                .unwrap();
            assert_eq!(
                out.latents.kind(),
                Kind::Float,
                "{folder} {kind:?}: latents stay fp32"
            );
            out.images.to_kind(Kind::Float)
        };
        let reference = images(Kind::Float);
        for (kind, mean_bound) in [(Kind::BFloat16, 2.0), (Kind::Half, 0.5)] {
            let diff = (images(kind) - &reference).abs();
            let mean = diff.mean(Kind::Float).double_value(&[]);
            let max = diff.max().double_value(&[]);
            assert!(
                mean < mean_bound && max < 32.0,
                "{folder} {kind:?}: mean |Δ| {mean}, max {max}"
            );
        }
    }
}
