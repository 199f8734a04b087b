//! `pso offline` and `pso export` end to end on a tiny random-weight pipeline and a tiny pair
//! store: exact resume, a loss that goes down, and exports that `pso sample --adapter` loads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use diffusion::pipeline::GenerateRequest;
use diffusion::sampling::{SeededNoise, Timesteps};
use pairs::writer::{PairStoreWriter, WriterOptions};
use pairs::PairRecord;
use pso::config::RunConfig;
use pso::learner::Learner;
use pso::run::offline::Trainer;
use pso::seed::step_seed;
use serde_json::Value;
use tch::Device;

/// The tiny pipelines (scripts/oracle/peft_oracle.py make), once per test binary.
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("offline-models");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::oracle("peft_oracle.py", &["make".as_ref(), dir.as_os_str()]);
        dir
    })
}

/// Pairs without stored latents (images are encoded by the VAE), none tied.
fn records(ids: impl Iterator<Item = i64>) -> Vec<PairRecord> {
    ids.filter(|id| id % 5 != 0)
        .map(|id| {
            let mut r = common::record("src", id);
            r.latents = None;
            r
        })
        .collect()
}

fn store(dir: &Path, records: Vec<PairRecord>) -> PathBuf {
    let path = dir.join("pairs");
    let mut w = PairStoreWriter::open(WriterOptions::new(&path, "src")).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.close().unwrap();
    path
}

/// A run config for the tiny SD pipeline, with `--set`-style overrides applied.
fn config(dir: &Path, peft: &str, sets: &[&str]) -> PathBuf {
    let path = dir.join(format!("{peft}.toml"));
    let text = format!(
        r#"
[run]
name = "t"
seed = 3
[model]
id = "{}"
device = "cpu"
[sampler]
name = "euler"
steps = 4
height = 16
width = 16
[objective]
kind = "offline_pso"
[peft]
kind = "{peft}"
rank = 4
alpha = 4.0
[optim]
lr = 1e-3
[learner]
batch_size = 2
grad_accumulation = 2
max_steps = 6
checkpoint_every = 3
"#,
        models().join("sd").display()
    );
    std::fs::write(&path, text).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let resolved = RunConfig::load(&path, &sets).unwrap();
    std::fs::write(&path, resolved.to_toml()).unwrap();
    path
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

/// (step, loss) of each metrics line.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn six_steps_equal_three_then_three_more_after_resume() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = store(dir.path(), records(1..12));
    let cfg = config(dir.path(), "lora", &[]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let common_args = ["offline", "--config", s(&cfg), "--pairs", s(&pairs)];
    let run = |out: &Path, extra: &[&str]| {
        let mut args = common_args.to_vec();
        args.extend(["--out", s(out)]);
        args.extend(extra);
        ok(&args)
    };
    run(&a, &[]);
    let printed = run(&b, &["--max-steps", "3"]);
    assert!(printed.contains("after 3 steps"), "{printed}");
    // A second start without --resume must not overwrite the run.
    let mut args = common_args.to_vec();
    args.extend(["--out", s(&b)]);
    let refused = pso(&args);
    assert_eq!(refused.status.code(), Some(1));
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(e.contains("--resume"), "{e}");
    run(&b, &["--resume"]);

    for file in [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        let read = |run: &Path| std::fs::read(run.join("checkpoints/step-00000006").join(file));
        assert!(
            read(&a).unwrap() == read(&b).unwrap(),
            "{file} differs between 6 steps and 3 + 3 resumed"
        );
    }
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "metrics of the resumed run differ");
    assert!(la.iter().all(|(_, l)| l.is_finite()));
    // keep_checkpoints = 3 by default; checkpoints at 3 and 6, `latest` at 6.
    let latest = std::fs::read_to_string(b.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000006");
    // A different training config refuses to resume.
    let mut args = common_args.to_vec();
    args.extend(["--out", s(&b), "--resume", "--set", "optim.lr=0.5"]);
    let refused = pso(&args);
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(e.contains("different config"), "{e}");
}

#[test]
fn offline_pso_lowers_its_own_loss_on_a_fixed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let batch = records(1..3);
    let cfg = config(
        dir.path(),
        "lora",
        &["learner.grad_accumulation=1", "optim.lr=1e-3"],
    );
    let config = RunConfig::load(&cfg, &[]).unwrap();
    let trainer = Trainer::load(&config).unwrap();
    let mut learner = Learner::new(
        trainer.adapter.params_shallow(),
        &config.optim,
        &config.learner,
    );
    // The same pairs, noise and timesteps at every step.
    let mut losses = Vec::new();
    for _ in 0..8 {
        let r = learner
            .step(|_| Ok(trainer.loss(&batch, 42).unwrap()))
            .unwrap();
        losses.push(r.diagnostics.loss);
    }
    let last = trainer.loss(&batch, 42).unwrap().diagnostics;
    // At the start the policy is the reference: margin 0, loss log 2.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{losses:?}"
    );
    assert!(
        last.loss < losses[0] - 0.1 && last.margin.unwrap() > 0.0 && last.accuracy == Some(1.0),
        "{losses:?} then {last:?}"
    );
}

#[test]
fn exports_load_back_into_pso_sample() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = store(dir.path(), records(1..8));
    let model = models().join("sd");
    let sample = |out: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "sample",
            "--model",
            s(&model),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--device",
            "cpu",
            "--out",
            s(out),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        ok(&args);
        image::open(out.join("000000.png")).unwrap().to_rgb8()
    };
    let base = sample(&dir.path().join("base"), None);
    for (peft, file_format) in [("lora", "diffusers-lora"), ("difffit", "difffit")] {
        let cfg = config(dir.path(), peft, &["learner.max_steps=2"]);
        let run = dir.path().join(format!("run-{peft}"));
        ok(&[
            "offline",
            "--config",
            s(&cfg),
            "--pairs",
            s(&pairs),
            "--out",
            s(&run),
            "--set",
            "optim.lr=0.05",
        ]);
        let file = dir.path().join(format!("{peft}.safetensors"));
        let merged = dir.path().join(format!("{peft}-merged"));
        for (format, out) in [(file_format, &file), ("merged", &merged)] {
            ok(&[
                "export",
                "--run",
                s(&run),
                "--format",
                format,
                "--out",
                s(out),
            ]);
        }
        let wrong = if peft == "lora" {
            "difffit"
        } else {
            "diffusers-lora"
        };
        let refused = pso(&["export", "--run", s(&run), "--format", wrong, "--out", "x"]);
        assert!(!refused.status.success());
        let from_file = sample(&dir.path().join(format!("{peft}-file")), Some(&file));
        let from_merged = sample(&dir.path().join(format!("{peft}-m")), Some(&merged));
        let max_diff = |a: &image::RgbImage, b: &image::RgbImage| {
            a.as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap()
        };
        assert!(
            max_diff(&from_file, &from_merged) <= 1,
            "{peft}: file vs merged"
        );
        assert!(
            max_diff(&from_file, &base) > 1,
            "{peft}: training changed nothing"
        );
    }
}

#[test]
fn relabel_with_scores_the_pairs_again() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = store(dir.path(), records(1..8));
    let clip = dir.path().join("clip");
    common::oracle("make_clip.py", &[clip.as_os_str()]);
    let cfg = config(dir.path(), "lora", &["learner.max_steps=1"]);
    let reward_mean = |run: &Path, relabel: Option<&str>| {
        let mut args = vec![
            "offline",
            "--config",
            s(&cfg),
            "--pairs",
            s(&pairs),
            "--out",
            s(run),
        ];
        if let Some(r) = relabel {
            args.extend(["--relabel-with", r]);
        }
        ok(&args);
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        v["reward_mean"].as_f64().unwrap()
    };
    let stored = reward_mean(&dir.path().join("stored"), None);
    let spec = format!("pickscore:{}", clip.join("quick").display());
    let relabelled = reward_mean(&dir.path().join("relabelled"), Some(&spec));
    // The stored scores of common::record lie in [-3, 1.5]; PickScore-style scores are
    // logit_scale · cos, far from their mean here.
    assert!(
        (stored - relabelled).abs() > 1e-3,
        "{stored} vs {relabelled}"
    );
    let bad = pso(&[
        "offline",
        "--config",
        s(&cfg),
        "--pairs",
        s(&pairs),
        "--out",
        "x",
        "--relabel-with",
        "nope",
    ]);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("SCORER:MODEL"), "{e}");
}

#[test]
fn training_images_against_fresh_samples_train_pso_db() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("subject");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..3u64 {
        std::fs::write(images.join(format!("{i}.png")), common::png(i, 20, 20)).unwrap();
    }
    std::fs::write(images.join("0.txt"), "a photo of sks circle").unwrap();
    let cfg = config(
        dir.path(),
        "lora",
        &[
            "objective.kind=pso_db",
            "objective.reference_pool=3",
            "learner.max_steps=2",
        ],
    );
    let run = dir.path().join("run");
    let args = [
        "offline",
        "--config",
        s(&cfg),
        "--train-images",
        s(&images),
        "--prompt",
        "a photo of a circle",
        "--class-prompt",
        "a photo of a shape",
        "--out",
        s(&run),
    ];
    ok(&args);
    let l = losses(&run);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|(_, x)| x.is_finite() && *x > 0.0), "{l:?}");
    assert!(run
        .join("checkpoints/step-00000002/trainable.safetensors")
        .exists());
    // The reference pool: 3 images sampled once, before training, from the base model with the
    // class prompt, each from its own seed.
    let pool_path = run.join("reference_pool.safetensors");
    let pool = hf::tensor_file::read(&pool_path).unwrap();
    let latents = &pool.tensors[0].1;
    assert_eq!(latents.size()[0], 3);
    let resolved = RunConfig::load(&run.join("config.toml"), &[]).unwrap();
    let base = pso::run::load_pipeline(&resolved, Device::Cpu).unwrap();
    for k in 0..3 {
        let want = base
            .generate(
                GenerateRequest {
                    prompt: "a photo of a shape",
                    negative_prompt: None,
                    timesteps: Timesteps::Steps(4),
                    guidance: 0.0,
                    height: 16,
                    width: 16,
                    num_images: 1,
                    init_latents: None,
                    record: false,
                },
                &mut SeededNoise::new(step_seed(3, k, u32::MAX - 1)),
            )
            .unwrap()
            .latents;
        assert!(
            latents
                .get(k as i64)
                .allclose(&want.get(0), 1e-5, 1e-6, false),
            "pool image {k} is not the base model's sample"
        );
    }
    // A resumed run trains on against the same pool, not a resampled one.
    let before = std::fs::read(&pool_path).unwrap();
    let mut resume = args.to_vec();
    resume.extend(["--resume", "--max-steps", "4"]);
    ok(&resume);
    assert_eq!(losses(&run).len(), 4);
    assert!(
        std::fs::read(&pool_path).unwrap() == before,
        "the pool was rewritten"
    );
    // The pool needs its class prompt.
    let out = pso(&[
        "offline",
        "--config",
        s(&cfg),
        "--train-images",
        s(&images),
        "--prompt",
        "a photo of a circle",
        "--out",
        s(&dir.path().join("no-class")),
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--class-prompt"), "{e}");
    // pso_db needs training images, not pairs.
    let pairs = store(dir.path(), records(1..4));
    let out = pso(&[
        "offline",
        "--config",
        s(&cfg),
        "--pairs",
        s(&pairs),
        "--out",
        s(&dir.path().join("x")),
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--train-images"), "{e}");
}

/// Offline PSO on a class-conditional DiT: the pairs' prompts are class names or ids, and the
/// DiffFit export (a file of a few tensors, or a merged transformer folder) samples again.
#[test]
fn dit_offline_pso_on_class_prompts_exports_what_pso_sample_loads() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ["kitty", "dog", "0"];
    let labelled: Vec<PairRecord> = records(1..8)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.prompt = classes[i % 3].to_owned();
            r.negative_prompt = None;
            r
        })
        .collect();
    let pairs = store(dir.path(), labelled);
    let model = models().join("dit");
    let model_set = format!("model.id={}", s(&model));
    let sets = [
        model_set.as_str(),
        "sampler.name=ddim",
        "learner.max_steps=2",
    ];
    let cfg = config(dir.path(), "difffit", &sets);
    let run = dir.path().join("run");
    ok(&[
        "offline",
        "--config",
        s(&cfg),
        "--pairs",
        s(&pairs),
        "--out",
        s(&run),
        "--set",
        "optim.lr=0.05",
    ]);
    let file = dir.path().join("dit.safetensors");
    let merged = dir.path().join("dit-merged");
    for (format, out) in [("difffit", &file), ("merged", &merged)] {
        ok(&[
            "export",
            "--run",
            s(&run),
            "--format",
            format,
            "--out",
            s(out),
        ]);
    }
    // The file holds the few DiffFit tensors, far below the model's size.
    let exported = std::fs::metadata(&file).unwrap().len();
    let full = std::fs::metadata(model.join("transformer/diffusion_pytorch_model.safetensors"))
        .unwrap()
        .len();
    assert!(exported * 4 < full, "{exported} bytes vs {full}");

    let sample = |out: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "sample",
            "--model",
            s(&model),
            "--class-label",
            "dog",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            s(out),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        ok(&args);
        image::open(out.join("000000.png")).unwrap().to_rgb8()
    };
    let max_diff = |a: &image::RgbImage, b: &image::RgbImage| {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap()
    };
    let base = sample(&dir.path().join("base"), None);
    let from_file = sample(&dir.path().join("file"), Some(&file));
    let from_merged = sample(&dir.path().join("merged-out"), Some(&merged));
    assert!(max_diff(&from_file, &from_merged) <= 1, "file vs merged");
    assert!(max_diff(&from_file, &base) > 1, "training changed nothing");

    // A prompt that names no class is refused with the names the model knows.
    let pairs = store(&dir.path().join("bad"), records(1..3));
    let out = pso(&[
        "offline",
        "--config",
        s(&cfg),
        "--pairs",
        s(&pairs),
        "--out",
        s(&dir.path().join("bad-run")),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("is not a class name") && e.contains("kitty"),
        "{e}"
    );
}

/// DiffFit's dataset fine-tuning on a DiT: SFT with the hybrid loss on a class-per-folder image
/// set, class-balanced with random flips; 3 + 3 resumed steps equal 6, and a folder that names
/// no class is refused before training.
#[test]
fn dit_sft_on_class_folders_resumes_exactly_and_refuses_unknown_classes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for (class, count) in [("dog", 3), ("0", 1)] {
        let sub = images.join(class);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..count {
            image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([(x * 16) as u8, (y * 16) as u8, (i * 80) as u8])
            })
            .save(sub.join(format!("{i}.png")))
            .unwrap();
        }
    }
    let model_set = format!("model.id={}", s(&models().join("dit")));
    let sets = [
        model_set.as_str(),
        "sampler.name=ddpm",
        "objective.kind=sft",
        "learner.grad_accumulation=1",
    ];
    let cfg = config(dir.path(), "difffit", &sets);
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "offline",
            "--config",
            s(&cfg),
            "--train-images",
            s(&images),
            "--class-balanced",
            "--random-flip",
            "--out",
            s(out),
        ];
        args.extend(extra);
        ok(&args)
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train(&a, &[]);
    train(&b, &["--max-steps", "3"]);
    train(&b, &["--resume"]);
    let read = |run: &Path| {
        std::fs::read(run.join("checkpoints/step-00000006/trainable.safetensors")).unwrap()
    };
    assert!(read(&a) == read(&b), "6 steps differ from 3 + 3 resumed");
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb);
    assert!(la.iter().all(|(_, l)| l.is_finite() && *l > 0.0), "{la:?}");

    std::fs::create_dir_all(images.join("zebra")).unwrap();
    image::RgbImage::new(16, 16)
        .save(images.join("zebra/0.png"))
        .unwrap();
    let out = pso(&[
        "offline",
        "--config",
        s(&cfg),
        "--train-images",
        s(&images),
        "--out",
        s(&dir.path().join("c")),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("`zebra` is not a class name"), "{e}");
}

/// SFT data as a Parquet table, written by Hugging Face `datasets`
/// (scripts/oracle/make_image_table.py): every row's pixels and label in order (class ids,
/// ClassLabel names or a text column), unlabelled rows refused with their row; then a DiT
/// trained through the CLI on the sharded dataset folder, its integer labels as class ids or as
/// names through id2label.
#[test]
fn dit_sft_reads_hugging_face_image_tables() {
    use pso::run::images::{ImageSetOptions, LabelAs, TrainingImages};
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_image_table.py", &[dir.path().as_os_str()]);
    let pixels: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir.path().join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let labels: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let opts = |label_as| ImageSetOptions {
        default_prompt: None,
        columns: Default::default(),
        split: None,
        label_as,
        height: 16,
        width: 16,
        seed: 0,
    };
    let prompts = |set: &TrainingImages, table: &str| -> Vec<String> {
        assert_eq!(set.len() as i64, pixels[table].size()[0], "{table}");
        (0..set.len())
            .map(|i| {
                let image = set.get(i);
                assert!(
                    image.pixels.equal(&pixels[table].get(i as i64)),
                    "{table} row {i}"
                );
                image.prompt.clone()
            })
            .collect()
    };
    let classes = dir.path().join("classes");
    let by_id = TrainingImages::open(&classes, &opts(LabelAs::Id)).unwrap();
    let ids: Vec<String> = labels["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(prompts(&by_id, "classes"), ids);
    assert!(by_id
        .get(4)
        .source
        .ends_with("train-00001-of-00002.parquet, row 1"));
    let by_name = TrainingImages::open(&classes, &opts(LabelAs::Name)).unwrap();
    assert_eq!(
        prompts(&by_name, "classes"),
        ["dog", "cat, kitty", "dog", "dog", "cat, kitty"]
    );
    let captions =
        TrainingImages::open(&dir.path().join("captions.parquet"), &opts(LabelAs::Id)).unwrap();
    assert_eq!(
        serde_json::to_value(prompts(&captions, "captions")).unwrap(),
        labels["captions"]
    );
    let e = TrainingImages::open(&dir.path().join("unlabelled.parquet"), &opts(LabelAs::Id))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unlabelled.parquet: row 0: label -1"), "{e}");
    let mut bad_column = opts(LabelAs::Id);
    bad_column.columns.image = Some("jpg".into());
    let e = TrainingImages::open(&classes, &bad_column)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no column `jpg` (--image-column); its columns are image, label"),
        "{e}"
    );

    let model_set = format!("model.id={}", s(&models().join("dit")));
    let sets = [
        model_set.as_str(),
        "sampler.name=ddpm",
        "objective.kind=sft",
        "learner.grad_accumulation=1",
        "learner.max_steps=2",
    ];
    let cfg = config(dir.path(), "difffit", &sets);
    for (label_as, out) in [("id", "by-id"), ("name", "by-name")] {
        let out = dir.path().join(out);
        ok(&[
            "offline",
            "--config",
            s(&cfg),
            "--train-images",
            s(&classes),
            "--label-as",
            label_as,
            "--out",
            s(&out),
        ]);
        assert_eq!(losses(&out).len(), 2, "--label-as {label_as}");
    }
    // Both name the same classes (id2label: 0 "cat, kitty", 1 "dog"), so they train alike.
    assert_eq!(
        losses(&dir.path().join("by-id")),
        losses(&dir.path().join("by-name"))
    );
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn trainable(run: &Path, step: &str) -> Vec<(String, tch::Tensor)> {
    tch::Tensor::read_safetensors(
        run.join("checkpoints")
            .join(step)
            .join("trainable.safetensors"),
    )
    .unwrap()
}

/// Data-parallel under torchrun's contract: two ranks with one pair per micro-batch take the
/// steps one process takes accumulating two micro-batches (rank r's pairs are the positions
/// r, r + 2, … of the same seeded order, its noise that of micro-batch r), rank 0 alone writes
/// the run, and both ranks resume from its checkpoint to the same weights.
#[test]
fn two_ranks_train_as_one_process_accumulating_their_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = store(dir.path(), records(1..12));
    let steps = ["learner.max_steps=4", "learner.checkpoint_every=2"];
    let single = dir.path().join("single.toml");
    let cfg = config(
        dir.path(),
        "lora",
        &[
            &steps[..],
            &["learner.batch_size=1", "learner.grad_accumulation=2"],
        ]
        .concat(),
    );
    std::fs::rename(&cfg, &single).unwrap();
    let parallel = config(
        dir.path(),
        "lora",
        &[
            &steps[..],
            &["learner.batch_size=1", "learner.grad_accumulation=1"],
        ]
        .concat(),
    );
    let (one, two, resumed) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("resumed"),
    );
    let args = |cfg: &Path, out: &Path| -> Vec<String> {
        [
            "offline",
            "--config",
            s(cfg),
            "--pairs",
            s(&pairs),
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    ok(&refs(&args(&single, &one)));
    let outs = common::run_ranks(2, &refs(&args(&parallel, &two)));
    assert!(outs[0].contains("after 4 steps"), "{outs:?}");
    assert!(outs[1].is_empty(), "only rank 0 reports: {outs:?}");

    let theirs: std::collections::HashMap<String, tch::Tensor> =
        trainable(&two, "step-00000004").into_iter().collect();
    let ours = trainable(&one, "step-00000004");
    assert_eq!(ours.len(), theirs.len());
    for (name, a) in &ours {
        let b = &theirs[name];
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * (1.0 + scale), "{name}: max |Δ| {diff}");
    }
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 4);
    for ((s1, a), (s2, b)) in l1.iter().zip(&l2) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
            "step {s1}: {a} vs {b}"
        );
    }
    let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().all(|l| l.contains("\"world_size\":2")),
        "{metrics}"
    );

    // Two steps, then both ranks resume from rank 0's checkpoint: the same weights as straight.
    let mut first = args(&parallel, &resumed);
    first.extend(["--max-steps", "2"].map(String::from));
    common::run_ranks(2, &refs(&first));
    let mut again = args(&parallel, &resumed);
    again.push("--resume".into());
    common::run_ranks(2, &refs(&again));
    let read = |run: &Path| {
        std::fs::read(run.join("checkpoints/step-00000004/trainable.safetensors")).unwrap()
    };
    assert!(
        read(&two) == read(&resumed),
        "the resumed data-parallel run differs"
    );
}
