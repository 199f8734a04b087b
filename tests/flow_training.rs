//! Training the flow-matching models (SD3 / SD3.5, FLUX and Z-Image) through the same backbone
//! interface as the UNets, on tiny random folders from the oracle (scripts/oracle/make_sd3_text.py,
//! make_flux_pipeline.py, make_z_image.py): LoRA exports that diffusers' `load_lora_weights` loads with the same
//! transformer output, DiffFit's tensors and γ merging exactly, and `pso online` / `pso offline`
//! runs with the flow kernels, resumed, exported and sampled back.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use diffusion::models::backbone::Backbone;
use diffusion::pipeline::{Conditioning, LoadOptions, Pipeline};
use hf::tensor_file;
use pairs::reader::{PairReader, ReadOptions};
use pairs::{batch_to_records, PairRecord};
use pso::config::PeftSection;
use pso::peft::export::{apply_file, merge};
use pso::peft::{lora, Adapter, PeftKind};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// OUT/sd3/{with_t5,no_t5}, OUT/flux/{schnell,dev} and OUT/zimage/{turbo,cfg}.
fn folders() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flow-training");
        let _ = std::fs::remove_dir_all(&dir);
        for (script, sub) in [
            ("make_sd3_text.py", "sd3"),
            ("make_flux_pipeline.py", "flux"),
            ("make_z_image.py", "zimage"),
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            common::oracle(script, &[dir.join(sub).as_os_str()]);
        }
        dir
    })
}

fn load(name: &str) -> Pipeline {
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: Some(12),
        text_encoder_device: None,
    };
    Pipeline::load(&folders().join(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Fixed inputs for a batch of 2 prompts at σ = 1 and 0.5 (model timesteps 1000, 500), on a
/// 12 × 12 latent; FLUX-dev with its embedded guidance 3.5.
struct Inputs {
    x: Tensor,
    t: Tensor,
    cond: Conditioning,
}

fn inputs(p: &Pipeline) -> Inputs {
    tch::manual_seed(5);
    let cond = |prompt| p.condition(prompt, None, 3.5, 24, 24, 1).unwrap();
    let (a, b) = if matches!(p.backbone, Backbone::Flux(_)) {
        // FLUX embeds the guidance scale (dev) instead of guiding classifier-free.
        (cond("a red cat"), cond("a dog on the grass"))
    } else {
        let unguided = |prompt| p.condition(prompt, None, 0.0, 24, 24, 1).unwrap();
        (unguided("a red cat"), unguided("a dog on the grass"))
    };
    Inputs {
        x: Tensor::randn([2, 16, 12, 12], (Kind::Float, Device::Cpu)),
        t: Tensor::from_slice(&[1000.0f32, 500.0]),
        cond: Conditioning::cat(&[&a, &b]).unwrap(),
    }
}

fn output(p: &Pipeline, i: &Inputs) -> Tensor {
    tch::no_grad(|| p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t))
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}");
    let diff = (ours - theirs).abs().max().double_value(&[]);
    let scale = theirs.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{what}: max |Δ| {diff} of {scale}"
    );
}

/// LoRA's B starts at zero; random values make the adapter change the output.
fn randomize_up(adapter: &Adapter) {
    tch::manual_seed(9);
    tch::no_grad(|| {
        for (name, t) in adapter.params() {
            if name.ends_with("lora_B.weight") {
                t.shallow_clone().copy_(&(t.randn_like() * 0.2));
            }
        }
    });
}

#[test]
fn lora_exports_load_in_diffusers_with_the_same_transformer_output() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("sd3/with_t5", ["ff.net.2", "add_q_proj"]),
        ("flux/dev", ["ff.net.2", "proj_mlp"]),
        ("flux/schnell", ["ff_context.net.2", "proj_out"]),
        ("zimage/turbo", ["feed_forward.w1", "w3"]),
    ] {
        let p = load(name);
        let i = inputs(&p);
        let base = output(&p, &i);
        let mut s = PeftSection {
            kind: PeftKind::Lora,
            rank: 4,
            alpha: 8.0,
            ..PeftSection::default()
        };
        s.targets.extend(extra.map(String::from));
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &s, 3).unwrap();
        randomize_up(&adapter);
        let ours = output(&p, &i);
        assert!(
            !ours.allclose(&base, 1e-3, 1e-4, false),
            "{name}: the adapter matters"
        );
        let tag = name.replace('/', "-");
        let lora_file = dir.path().join(format!("{tag}-lora.safetensors"));
        tensor_file::write(
            &lora_file,
            &lora::to_diffusers(&adapter.tensors(), s.alpha / s.rank as f64, "transformer"),
            &HashMap::new(),
        )
        .unwrap();
        let mut feed = vec![
            ("sample".to_string(), i.x.shallow_clone()),
            ("timestep".to_string(), i.t.shallow_clone()),
        ];
        feed.extend(i.cond.tensors());
        let inputs_file = dir.path().join(format!("{tag}-inputs.safetensors"));
        tensor_file::write(&inputs_file, &feed, &HashMap::new()).unwrap();
        let out_file = dir.path().join(format!("{tag}-out.safetensors"));
        common::oracle(
            "peft_oracle.py",
            &[
                "flow_lora".as_ref(),
                folders().join(name).as_os_str(),
                lora_file.as_os_str(),
                inputs_file.as_os_str(),
                out_file.as_os_str(),
            ],
        );
        let theirs = tensor_file::read(&out_file).unwrap().tensors.remove(0).1;
        assert_close(&ours, &theirs, name);
        // The same file through `pso sample --adapter`'s loader, then merged.
        let fresh = load(name);
        let file = tensor_file::read(&lora_file).unwrap();
        apply_file(&fresh.backbone, &fresh.backbone_vs, file, &lora_file).unwrap();
        assert_close(&output(&fresh, &i), &ours, &format!("{name} reloaded"));
        merge(&fresh.backbone, &fresh.backbone_vs);
        assert_close(&output(&fresh, &i), &ours, &format!("{name} merged"));
    }
}

#[test]
fn difffit_trains_biases_norms_embeddings_and_gamma_and_merges_exactly() {
    // (folder, blocks with γ, the timestep embedding, qk-norms, a trained bias, the prompt
    // projection that stays frozen).
    for (name, gamma_blocks, embedding, qk_norm, bias, prompt_projection) in [
        (
            "sd3/with_t5",
            1,
            "time_text_embed.",
            false,
            "attn.to_q.bias",
            "context_embedder.weight",
        ),
        (
            "flux/schnell",
            1,
            "time_text_embed.",
            true,
            "attn.to_q.bias",
            "context_embedder.weight",
        ),
        // Every Z-Image block: 1 noise refiner, 1 context refiner, 2 main blocks.
        (
            "zimage/turbo",
            4,
            "t_embedder.",
            true,
            "adaLN_modulation.0.bias",
            "cap_embedder.1.weight",
        ),
    ] {
        let p = load(name);
        let s = PeftSection {
            kind: PeftKind::Difffit,
            ..PeftSection::default()
        };
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &s, 0).unwrap();
        let names: Vec<String> = adapter.params().iter().map(|(n, _)| n.clone()).collect();
        let has = |f: &dyn Fn(&str) -> bool| names.iter().any(|n| f(n));
        assert!(has(&|n| n.starts_with(embedding)), "{name}: {names:?}");
        // The tiny SD3 has no qk-norm (SD3.0); FLUX and Z-Image always have one.
        assert_eq!(
            has(&|n| n.ends_with("norm_q.weight")),
            qk_norm,
            "{name}: {names:?}"
        );
        assert!(has(&|n| n.ends_with(bias)), "{name}: {names:?}");
        assert!(!has(&|n| n.ends_with("to_q.weight")), "{name}: {names:?}");
        assert!(!has(&|n| n == prompt_projection), "{name}: {names:?}");
        let gammas = names.iter().filter(|n| n.contains("gamma_")).count();
        assert_eq!(gammas, 2 * gamma_blocks, "{name}: {names:?}");
        let i = inputs(&p);
        let base = output(&p, &i);
        tch::manual_seed(4);
        tch::no_grad(|| {
            for (_, t) in adapter.params() {
                let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.1));
            }
        });
        let tuned = output(&p, &i);
        assert!(!tuned.allclose(&base, 1e-4, 1e-5, false), "{name}: tuned");
        // γ = 1 and the original tensors: the reference model is the base model.
        let reference = tch::no_grad(|| {
            adapter.reference(&p.backbone, |b| p.predict_batch(b, &i.cond, &i.x, &i.t))
        });
        assert_close(&reference, &base, &format!("{name} reference"));
        let path = std::env::temp_dir().join(format!(
            "pso-flow-difffit-{}-{}.safetensors",
            std::process::id(),
            name.replace('/', "-")
        ));
        let meta = HashMap::from([(
            pso::peft::export::FORMAT_KEY.to_string(),
            "difffit".to_string(),
        )]);
        tensor_file::write(&path, &adapter.tensors(), &meta).unwrap();
        let fresh = load(name);
        apply_file(
            &fresh.backbone,
            &fresh.backbone_vs,
            tensor_file::read(&path).unwrap(),
            &path,
        )
        .unwrap();
        let _ = std::fs::remove_file(&path);
        assert_close(&output(&fresh, &i), &tuned, &format!("{name} applied"));
        merge(&fresh.backbone, &fresh.backbone_vs);
        assert!(fresh
            .backbone
            .scaled_blocks()
            .iter()
            .all(|b| b.branch_scales().is_none()));
        assert_close(&output(&fresh, &i), &tuned, &format!("{name} merged"));
    }
}

fn pso(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = pso(args);
    assert!(
        out.status.success(),
        "pso {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (step, loss) of each metrics line with a loss.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

fn run_config(dir: &Path, model: &str, kernel: &str, objective: &str) -> PathBuf {
    let path = dir.join(format!(
        "{}-{kernel}-{objective}.toml",
        model.replace('/', "-")
    ));
    let text = format!(
        r#"
[run]
name = "flow"
seed = 3
[model]
id = "{model}"
device = "cpu"
max_sequence_length = 12
[sampler]
name = "flow_match_euler"
flow_kernel = "{kernel}"
noise_level = 0.7
steps = 2
height = 24
width = 24
samples_per_prompt = 2
[reward]
scorer = "pixel"
model = "redness"
[objective]
kind = "{objective}"
[peft]
kind = "lora"
rank = 4
alpha = 4.0
[optim]
lr = 1e-3
[learner]
batch_size = 2
refresh_every = 2
max_steps = 4
checkpoint_every = 2
[online]
prompts_per_round = 2
[eval]
every = 0
[pairs]
flush_every_pairs = 2
"#,
        model = folders().join(model).display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_learner_loss_matches_the_flow_samplers_recorded_kernels() {
    let dir = tempfile::tempdir().unwrap();
    for (model, kernel) in [
        ("sd3/with_t5", "renoise"),
        ("flux/schnell", "sde"),
        ("zimage/turbo", "renoise"),
    ] {
        let path = run_config(dir.path(), model, kernel, "online_pso");
        let config = pso::config::RunConfig::load(&path, &["sampler.steps=3".into()]).unwrap();
        common::learner_loss_matches_recorded_kernels(&config);
    }
}

#[test]
fn online_pso_trains_sd3_flux_and_z_image_resumes_exactly_and_exports_what_diffusers_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (model, kernel) in [
        ("sd3/with_t5", "renoise"),
        ("flux/schnell", "sde"),
        ("zimage/turbo", "sde"),
    ] {
        let cfg = run_config(dir.path(), model, kernel, "online_pso");
        let tag = model.replace('/', "-");
        let straight = dir.path().join(format!("{tag}-straight"));
        let split = dir.path().join(format!("{tag}-split"));
        ok(&["online", "--config", s(&cfg), "--out", s(&straight)]);
        ok(&[
            "online",
            "--config",
            s(&cfg),
            "--out",
            s(&split),
            "--max-steps",
            "2",
        ]);
        ok(&[
            "online",
            "--config",
            s(&cfg),
            "--out",
            s(&split),
            "--resume",
        ]);
        if !model.starts_with("flux") {
            // Recomputing the blocks in the backward pass trains the same (to rounding).
            let recomputed = dir.path().join(format!("{tag}-recomputed"));
            ok(&[
                "online",
                "--config",
                s(&cfg),
                "--out",
                s(&recomputed),
                "--set",
                "learner.recompute_blocks=true",
            ]);
            for ((_, a), (_, b)) in losses(&straight).iter().zip(losses(&recomputed)) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
        let a = losses(&straight);
        assert_eq!(
            a.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "{model}: {a:?}"
        );
        assert!(a.iter().all(|(_, l)| l.is_finite()), "{model}: {a:?}");
        // Step 1's policy is the reference (LoRA's B = 0): every ratio is 1 and L = log 2.
        assert!(
            (a[0].1 - std::f64::consts::LN_2).abs() < 1e-5,
            "{model}: {a:?}"
        );
        assert_eq!(a, losses(&split), "{model}: resume is bit-exact");
        let trained = |run: &Path| {
            std::fs::read(run.join("checkpoints/step-00000004/trainable.safetensors")).unwrap()
        };
        assert_eq!(trained(&straight), trained(&split), "{model}");
        ok(&["pairs", "validate", s(&straight.join("pairs"))]);
        // A pair of the base policy (version 0) regenerates from its seed with `pso sample`
        // and the run's kernel.
        let reader = PairReader::open(&[straight.join("pairs")], ReadOptions::default()).unwrap();
        let mut stored: Vec<PairRecord> = reader
            .flat_map(|b| batch_to_records(&b.unwrap(), 0).unwrap())
            .collect();
        stored.sort_by_key(|r| r.pair_id);
        let first = &stored[0];
        assert_eq!(first.policy_version, Some(0));
        let regen = dir.path().join(format!("{tag}-regen"));
        let seed = first.sides[0].seed.unwrap().to_string();
        sample(model, &first.prompt, kernel, &["--seed", &seed], &regen);
        let again = image::open(regen.join("000000.png")).unwrap().to_rgb8();
        let kept = image::load_from_memory(&first.sides[0].image)
            .unwrap()
            .to_rgb8();
        // Sampled in a batch of K there and alone here: equal up to fp32 rounding of the batch.
        let worst = again
            .as_raw()
            .iter()
            .zip(kept.as_raw())
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "{model}: regenerated image differs by {worst}");
        // Exported, then sampled with the online run's kernel from a stored seed.
        let lora_file = dir.path().join(format!("{tag}.safetensors"));
        ok(&[
            "export",
            "--run",
            s(&straight),
            "--format",
            "diffusers-lora",
            "--out",
            s(&lora_file),
        ]);
        let images = dir.path().join(format!("{tag}-images"));
        sample(
            model,
            "a red cat",
            kernel,
            &["--text-encoder-device", "cpu", "--adapter", s(&lora_file)],
            &images,
        );
        assert!(images.join("000000.png").exists());
    }
}

/// `pso sample` of `prompt` from the oracle folder `model` as the run configs sample (2 steps,
/// 24², 12 tokens, `kernel`, on the CPU) with `extra` flags, into `out`.
fn sample(model: &str, prompt: &str, kernel: &str, extra: &[&str], out: &Path) {
    let folder = folders().join(model);
    let mut args = vec![
        "sample",
        "--model",
        s(&folder),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--height",
        "24",
        "--width",
        "24",
        "--max-sequence-length",
        "12",
        "--flow-kernel",
        kernel,
        "--device",
        "cpu",
        "--out",
        s(out),
    ];
    args.extend(extra);
    ok(&args);
}

/// `pso online` on `model` with `sets` exits 1 before training, saying each of `needles`.
fn online_is_refused(model: &str, sets: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path(), model, "renoise", "online_pso");
    let run = dir.path().join("run");
    let mut args = vec!["online", "--config", s(&cfg), "--out", s(&run)];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = pso(&args);
    assert_eq!(out.status.code(), Some(1), "{model}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(needles.iter().all(|n| err.contains(n)), "{model}: {err}");
}

#[test]
fn a_guidance_embedding_flux_is_refused_for_training_with_the_reason() {
    online_is_refused(
        "flux/dev",
        &[],
        &["embeds a guidance scale", "FLUX.1-schnell"],
    );
}

#[test]
fn z_image_training_refuses_guidance() {
    online_is_refused(
        "zimage/turbo",
        &["sampler.guidance=0.5"],
        &["sampler.guidance = 0.5", "guidance_scale"],
    );
}

#[test]
fn offline_objectives_train_flow_models_on_stored_pairs() {
    for model in ["sd3/with_t5", "zimage/turbo"] {
        offline_objectives_train(model);
    }
}

fn offline_objectives_train(model: &str) {
    let dir = tempfile::tempdir().unwrap();
    let online = run_config(dir.path(), model, "renoise", "online_pso");
    let pairs_run = dir.path().join("pairs-run");
    ok(&[
        "online",
        "--config",
        s(&online),
        "--out",
        s(&pairs_run),
        "--max-steps",
        "2",
    ]);
    for objective in ["offline_pso", "dpo", "sft"] {
        let cfg = run_config(dir.path(), model, "renoise", objective);
        let out = dir.path().join(objective);
        ok(&[
            "offline",
            "--config",
            s(&cfg),
            "--pairs",
            s(&pairs_run.join("pairs")),
            "--out",
            s(&out),
            "--max-steps",
            "2",
        ]);
        let l = losses(&out);
        assert_eq!(l.len(), 2, "{model} {objective}: {l:?}");
        assert!(
            l.iter().all(|(_, l)| l.is_finite()),
            "{model} {objective}: {l:?}"
        );
    }
    // Subject tuning on training images against a reference pool (`pso_db`): images encoded by
    // the 16-channel VAE with its shift, references sampled by the flow scheduler.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..2u8 {
        let img = image::RgbImage::from_fn(24, 24, |x, y| {
            image::Rgb([x as u8 * 10, y as u8 * 10, 60 * i])
        });
        img.save(images.join(format!("{i}.png"))).unwrap();
    }
    let cfg = run_config(dir.path(), model, "renoise", "pso_db");
    let out = dir.path().join("pso_db");
    ok(&[
        "offline",
        "--config",
        s(&cfg),
        "--train-images",
        s(&images),
        "--prompt",
        "a photo of sks",
        "--class-prompt",
        "a photo",
        "--out",
        s(&out),
        "--max-steps",
        "2",
    ]);
    let l = losses(&out);
    assert_eq!(l.len(), 2, "{model} pso_db: {l:?}");
    assert!(
        l.iter().all(|(_, l)| l.is_finite()),
        "{model} pso_db: {l:?}"
    );
}

#[test]
fn doctor_estimates_a_flow_runs_memory_from_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let flux = run_config(dir.path(), "flux/schnell", "renoise", "online_pso");
    let doctor = |cfg: &Path, sets: &[&str]| -> Value {
        let mut args = vec!["doctor", "--json", "--config", s(cfg)];
        for set in sets {
            args.extend(["--set", set]);
        }
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let report = |sets: &[&str]| doctor(&flux, sets);
    let part = |r: &Value, what: &str| -> u64 {
        r["memory"]["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["what"] == what)
            .unwrap_or_else(|| panic!("no {what}: {r}"))["bytes"]
            .as_u64()
            .unwrap()
    };
    let small = report(&[]);
    // Weights: exactly the transformer's parameters in fp32.
    let p = load("flux/schnell");
    let params: i64 = p
        .backbone_vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(part(&small, "denoiser weights"), 4 * params as u64);
    // LoRA r4 on to_q/to_k/to_v/to_out.0: 4·(in + out) per targeted layer, 16 bytes each.
    let adapter = Adapter::new(
        &p.backbone,
        &p.backbone_vs,
        &PeftSection {
            kind: PeftKind::Lora,
            rank: 4,
            alpha: 4.0,
            ..PeftSection::default()
        },
        0,
    )
    .unwrap();
    let trainable: i64 = adapter.params().iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(part(&small, "trainable + AdamW"), 16 * trainable as u64);
    // DiffFit: exactly the variables it trains (the γ left out).
    let difffit = Adapter::new(
        &p.backbone,
        &p.backbone_vs,
        &PeftSection {
            kind: PeftKind::Difffit,
            ..PeftSection::default()
        },
        0,
    )
    .unwrap();
    let variables: i64 = difffit
        .params()
        .iter()
        .filter(|(n, _)| !n.contains(".gamma_"))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert_eq!(
        part(&report(&["peft.kind=\"difffit\""]), "trainable + AdamW"),
        16 * variables as u64
    );
    // Activations grow with the image: 24² → 48² is 36 → 144 image tokens (+ 12 of T5).
    let large = report(&["sampler.height=48", "sampler.width=48"]);
    let (a, b) = (
        part(&small, "learner activations"),
        part(&large, "learner activations"),
    );
    assert_eq!(b * 48, a * 156, "{a} → {b}");
    let recomputed = report(&["learner.recompute_blocks=true"]);
    // 2 pairs (4 samples) × (2 blocks × 48 tokens × 16 channels × 4 bytes + one block's 30
    // values per token and channel).
    assert_eq!(
        part(&recomputed, "learner activations"),
        4 * (2 * 48 * 16 * 4 + 48 * 16 * 30 * 4)
    );
    assert!(part(&recomputed, "learner activations") < a);
    // The weights and optimizer, plus the larger of the learner's and the decoder's memory.
    let parts = small["memory"]["parts"].as_array().unwrap();
    let bytes = |transient: bool| {
        parts
            .iter()
            .filter(move |p| p["transient"] == transient)
            .map(|p| p["bytes"].as_u64().unwrap())
    };
    let total = bytes(false).sum::<u64>() + bytes(true).max().unwrap();
    assert_eq!(small["memory"]["total_bytes"].as_u64().unwrap(), total);
    let text = ok(&["doctor", "--config", s(&flux)]);
    assert!(
        text.contains("memory of the run") && text.contains("learner activations"),
        "{text}"
    );
    // Z-Image: 36 image tokens padded to 64 and 12 prompt tokens to 32, 2 main blocks of width
    // 32; its 1 + 1 refiner blocks keep their activations even when the main ones recompute.
    let z = run_config(dir.path(), "zimage/turbo", "renoise", "online_pso");
    let z_report = |sets: &[&str]| doctor(&z, sets);
    let block = 96 * 32 * 30 * 4;
    assert_eq!(
        part(&z_report(&[]), "learner activations"),
        4 * (2 * block + block)
    );
    assert_eq!(
        part(
            &z_report(&["learner.recompute_blocks=true"]),
            "learner activations"
        ),
        4 * (2 * 96 * 32 * 4 + block + block)
    );
}

/// Every trainable tensor's gradient of a loss through `p`'s backbone, after zeroing them.
fn gradients(p: &Pipeline, adapter: &Adapter, i: &Inputs) -> Vec<(String, Tensor)> {
    for (_, t) in adapter.params() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let out = p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t);
    out.square().mean(Kind::Float).backward();
    p.backbone.finish_recomputation();
    adapter
        .params()
        .iter()
        .map(|(n, t)| (n.clone(), t.grad().copy()))
        .collect()
}

#[test]
fn recomputed_blocks_give_the_same_gradients() {
    for name in ["sd3/with_t5", "flux/dev", "zimage/turbo"] {
        let p = load(name);
        let s = PeftSection {
            kind: PeftKind::Full,
            ..PeftSection::default()
        };
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &s, 0).unwrap();
        let i = inputs(&p);
        let plain = gradients(&p, &adapter, &i);
        p.backbone.set_recompute(true).unwrap();
        let recomputed = gradients(&p, &adapter, &i);
        // The reference model's no_grad pass is untouched by recomputation.
        let reference = tch::no_grad(|| p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t));
        p.backbone.set_recompute(false).unwrap();
        assert_close(&reference, &output(&p, &i), &format!("{name} no_grad"));
        assert!(plain.len() > 20, "{name}: {}", plain.len());
        for ((n, a), (_, b)) in plain.iter().zip(&recomputed) {
            assert!(a.defined() && b.defined(), "{name} {n}: no gradient");
            let diff = (b - a).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]);
            // (The last SD3 block's prompt queries feed nothing: their gradient is 0 either way.)
            assert!(
                diff <= 1e-5 * scale,
                "{name} {n}: max |Δ| {diff} of {scale}"
            );
        }
        let zero = plain
            .iter()
            .filter(|(_, g)| g.abs().max().double_value(&[]) == 0.0)
            .count();
        assert!(zero <= 2, "{name}: {zero} tensors without gradient");
    }
}

/// `pso bench learn` finishes recomputed blocks' backward too (a forgotten finish now panics).
#[test]
fn bench_learn_runs_a_flow_model_with_recomputed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = run_config(dir.path(), "sd3/with_t5", "renoise", "online_pso");
    let out = ok(&[
        "bench",
        "learn",
        "--config",
        s(&cfg),
        "--set",
        "learner.recompute_blocks=true",
        "--repeats",
        "2",
    ]);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(v["seconds_per_step"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn an_sd3_folder_without_t5_says_so() {
    assert!(load("sd3/with_t5").warnings().is_empty());
    let warnings = load("sd3/no_t5").warnings();
    assert!(
        warnings.len() == 1 && warnings[0].contains("no text_encoder_3/ (T5)"),
        "{warnings:?}"
    );
}
