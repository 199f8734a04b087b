//! `DiTTransformer2DModel` against diffusers on tiny random-weight models built by
//! scripts/oracle/make_dit.py (fp32, CPU), DiffFit's branch scales, and refused configs; the
//! `DiTPipeline` (DDIM and DDPM, with and without guidance, class names) against diffusers' on a
//! tiny pipeline folder from scripts/oracle/make_dit_pipeline.py, through the library and through
//! `pso sample`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use diffusion::models::dit::{sincos_pos_embed_2d, DiTTransformer2DConfig, DiTTransformer2DModel};
use diffusion::models::load::read_config;
use diffusion::models::transformer::{BranchScales, ScaledBlock};
use diffusion::pipeline::dit::ClassRequest;
use diffusion::pipeline::{LoadOptions, Pipeline};
use diffusion::sampling::{NoiseSource, SchedulerConfig, SeededNoise, Timesteps};
use serde::Deserialize;
use tch::{nn, Device, Kind, Tensor};

/// max |a − b| / max |b|.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
fn dit_matches_diffusers_with_learned_sigma_patch_4_and_a_larger_latent() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_dit.py", &[dir.path().as_os_str()]);
    let e: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("dit_cases.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let _guard = tch::no_grad_guard();
    for (case, pe_interpolation) in [("dit", None), ("dit_p4", Some(2.0))] {
        let folder = dir.path().join(case);
        let (_vs, model) = match pe_interpolation {
            None => DiTTransformer2DModel::load(&folder, Device::Cpu, Kind::Float, None),
            Some(scale) => {
                let mut config: DiTTransformer2DConfig = read_config(&folder).unwrap();
                assert_eq!(config.pe_interpolation, 1.0, "not read from config.json");
                config.pe_interpolation = scale;
                DiTTransformer2DModel::load_with_config(
                    &folder,
                    &config,
                    Device::Cpu,
                    Kind::Float,
                    None,
                )
            }
        }
        .unwrap();
        let out = model.forward(
            &e[&format!("{case}.sample")],
            &e[&format!("{case}.timestep")],
            &e[&format!("{case}.class_labels")],
        );
        let want = &e[&format!("{case}.output")];
        assert_eq!(out.size(), want.size(), "{case}");
        let err = relative_error(&out, want);
        eprintln!("{case}: relative error {err:e}");
        assert!(err < 1e-4, "{case}: relative error {err:e}");
    }
    // A non-square grid: which half of the channels holds which axis.
    let pos = sincos_pos_embed_2d(16, (3, 5), 4, 2.0, Device::Cpu);
    let err = relative_error(&pos, &e["pos_embed"]);
    assert!(err < 1e-6, "2-D sin-cos embedding: relative error {err:e}");
}

#[test]
fn branch_scales_multiply_each_gated_branch_per_channel() {
    let config: DiTTransformer2DConfig = serde_json::from_str(
        r#"{"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
            "sample_size": 8, "out_channels": 8, "num_embeds_ada_norm": 10}"#,
    )
    .unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DiTTransformer2DModel::new(vs.root(), &config);
    let _guard = tch::no_grad_guard();
    let sample = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let timestep = Tensor::from_slice(&[999.0f32, 10.0]);
    let labels = Tensor::from_slice(&[3i64, 10]);
    let forward = || model.forward(&sample, &timestep, &labels);
    let base = forward();

    let blocks = model.blocks();
    assert_eq!(blocks[1].name(), "transformer_blocks.1");
    assert_eq!(blocks[1].dim(), 16);
    let ones = || Tensor::ones([16], (Kind::Float, Device::Cpu));
    for b in blocks {
        b.set_branch_scales(Some(BranchScales {
            attn1: ones(),
            attn2: None,
            ff: ones(),
        }));
    }
    assert!(forward().equal(&base), "γ = 1 is the base model");

    let gammas: Vec<(Tensor, Tensor)> = blocks
        .iter()
        .map(|_| {
            (
                Tensor::rand([16], (Kind::Float, Device::Cpu)) * 2.0,
                Tensor::rand([16], (Kind::Float, Device::Cpu)) * 2.0,
            )
        })
        .collect();
    for (b, (attn1, ff)) in blocks.iter().zip(&gammas) {
        let scales = BranchScales {
            attn1: attn1.shallow_clone(),
            attn2: None,
            ff: ff.shallow_clone(),
        };
        let names: Vec<&str> = scales.named().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["gamma_attn1", "gamma_ff"]);
        b.set_branch_scales(Some(scales));
    }
    let scaled = forward();
    assert!(
        relative_error(&scaled, &base) > 1e-3,
        "γ changes the output"
    );

    // The same function: no γ, and each branch's last layer scaled per output channel (the
    // gate multiplies per channel too, so γ commutes with it).
    let vars = vs.variables();
    for (b, (attn1, ff)) in blocks.iter().zip(&gammas) {
        b.set_branch_scales(None);
        for (layer, g) in [("attn1.to_out.0", attn1), ("ff.net.2", ff)] {
            let name = |p: &str| format!("{}.{layer}.{p}", b.name());
            let _ = vars[&name("weight")]
                .shallow_clone()
                .g_mul_(&g.unsqueeze(1));
            let _ = vars[&name("bias")].shallow_clone().g_mul_(g);
        }
    }
    let err = relative_error(&forward(), &scaled);
    assert!(
        err < 1e-5,
        "γ ≠ scaled branch outputs: relative error {err:e}"
    );
}

/// Converted DiT checkpoints copy one embedder into every block; such a model computes it once,
/// with the same result as every block using its own copy.
#[test]
fn blocks_sharing_one_conditioning_embedding_compute_it_once_with_the_same_output() {
    let config: DiTTransformer2DConfig = serde_json::from_str(
        r#"{"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 3,
            "sample_size": 8, "out_channels": 8, "num_embeds_ada_norm": 10}"#,
    )
    .unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let per_block = DiTTransformer2DModel::new(vs.root(), &config);
    assert!(!per_block.shares_conditioning());
    // The per-block copies get block 0's values, as in a converted checkpoint.
    per_block.copy_shared_conditioning(&vs);
    assert!(!per_block.shares_conditioning());
    let vars = vs.variables();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&serde_json::json!({
            "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 3,
            "sample_size": 8, "out_channels": 8, "num_embeds_ada_norm": 10
        }))
        .unwrap(),
    )
    .unwrap();
    vs.save(dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let (_shared_vs, shared) =
        DiTTransformer2DModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap();
    assert!(shared.shares_conditioning());

    let _guard = tch::no_grad_guard();
    let sample = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let timestep = Tensor::from_slice(&[999.0f32, 10.0]);
    let labels = Tensor::from_slice(&[3i64, 10]);
    let want = per_block.forward(&sample, &timestep, &labels);
    let got = shared.forward(&sample, &timestep, &labels);
    let err = relative_error(&got, &want);
    assert!(err < 1e-6, "shared embedding: relative error {err:e}");

    // A model whose copies differ keeps its per-block embeddings.
    let _ = vars["transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"]
        .shallow_clone()
        .g_add_scalar_(1.0);
    vs.save(dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let (_, distinct) =
        DiTTransformer2DModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap();
    assert!(!distinct.shares_conditioning());
}

#[test]
fn unsupported_dit_configs_are_refused_with_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (config, want) in [
        (
            r#"{"norm_type": "layer_norm"}"#,
            r#"norm_type "layer_norm": DiTTransformer2DModel is built only with "ada_norm_zero""#,
        ),
        (
            r#"{"num_embeds_ada_norm": null}"#,
            "num_embeds_ada_norm null: adaLN-Zero embeds a class label, so set it",
        ),
        (r#"{"activation_fn": "geglu"}"#, r#"activation_fn "geglu""#),
        (
            r#"{"patch_size": 3}"#,
            "patch_size 3 with sample_size 32 (the sample size must be a positive multiple",
        ),
        (
            r#"{"num_attention_heads": 3, "attention_head_dim": 6}"#,
            "num_attention_heads 3 × attention_head_dim 6",
        ),
    ] {
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let msg = DiTTransformer2DModel::load(dir.path(), Device::Cpu, Kind::Float, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.json: unsupported") && msg.contains(want),
            "{msg}"
        );
    }
}

#[derive(Debug, Deserialize)]
struct PipelineCase {
    case: String,
    scheduler: String,
    class_labels: Vec<i64>,
    guidance: f64,
    steps: usize,
    seed: u64,
    global_seed: u64,
}

fn expected_images(dir: &Path, case: &str) -> Tensor {
    Tensor::read_safetensors(dir.join(format!("{case}.safetensors")))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "images")
        .unwrap()
        .1
}

#[test]
fn dit_pipeline_matches_diffusers_with_ddim_ddpm_and_guidance() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_dit_pipeline.py", &[dir.path().as_os_str()]);
    let cases: Vec<PipelineCase> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap())
            .unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        max_sequence_length: None,
        text_encoder_device: None,
    };
    let mut pipeline = Pipeline::load(&dir.path().join("pipeline"), &opts).unwrap();
    assert!(pipeline.is_class_conditional());
    let ddim = pipeline.scheduler_config.clone();
    let ddpm = SchedulerConfig::from_file(&dir.path().join("ddpm_scheduler/scheduler_config.json"))
        .unwrap();

    let classes = pipeline.classes().unwrap();
    assert_eq!(classes.class_id("golden retriever").unwrap(), 207);
    assert_eq!(classes.class_id("Galeocerdo cuvieri").unwrap(), 3);
    assert_eq!(
        classes.class_id("tiger shark, Galeocerdo cuvieri").unwrap(),
        3
    );
    assert_eq!(classes.class_id("12").unwrap(), 12);
    for bad in ["1000", "-1", "golden retriver"] {
        let err = classes.class_id(bad).unwrap_err().to_string();
        assert!(err.contains(bad), "{bad}: {err}");
    }

    for case in &cases {
        pipeline.scheduler_config = match case.scheduler.as_str() {
            "ddim" => ddim.clone(),
            "ddpm" => ddpm.clone(),
            other => panic!("unknown scheduler {other}"),
        };
        // The generator's latents, then DDPM's noise from the global generator (as DiTPipeline).
        let init = SeededNoise::new(case.seed)
            .draw(&[case.class_labels.len() as i64, 4, 8, 8], 1)
            .unwrap()
            .remove(0);
        let generated = pipeline
            .generate_classes(
                ClassRequest {
                    class_labels: case.class_labels.clone(),
                    timesteps: Timesteps::Steps(case.steps),
                    guidance: case.guidance,
                    latent_size: None,
                    init_latents: Some(init),
                    record: false,
                },
                &mut SeededNoise::new(case.global_seed),
            )
            .unwrap();
        let theirs = expected_images(dir.path(), &case.case);
        let ours = diffusion::pipeline::images::rgb_images(&generated.images);
        assert_eq!(ours.len() as i64, theirs.size()[0], "{}", case.case);
        for (i, image) in ours.iter().enumerate() {
            common::assert_image_matches(
                image,
                &theirs.get(i as i64),
                &format!("{} image {i}", case.case),
            );
        }
    }

    // The same first case through the command line, classes given by name and id.
    let first = &cases[0];
    assert_eq!(first.class_labels, [207, 3, 0]);
    let out = dir.path().join("cli");
    let status = Command::new(env!("CARGO_BIN_EXE_pso"))
        .args(["sample", "--device", "cpu", "--model"])
        .arg(dir.path().join("pipeline"))
        .args(["--class-label", "golden retriever,tiger shark,0"])
        .args(["--guidance", &first.guidance.to_string()])
        .args(["--steps", &first.steps.to_string()])
        .args(["--seed", &first.seed.to_string()])
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let theirs = expected_images(dir.path(), &first.case);
    for i in 0..3 {
        let image = image::open(out.join(format!("{i:06}.png")))
            .unwrap()
            .to_rgb8();
        common::assert_image_matches(&image, &theirs.get(i), &format!("pso sample image {i}"));
    }
}

/// `pso sample --per-class`: each image is the one its seed draws alone (DDPM with guidance, so
/// the step noise counts too), whatever the batch; a rerun fills in only what is missing and
/// refuses other settings; empty ranges are refused and repeated classes drawn once.
#[test]
fn per_class_samples_do_not_depend_on_batching_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_dit_pipeline.py", &[dir.path().as_os_str()]);
    let run = |extra: &[&str], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_pso"))
            .args(["sample", "--device", "cpu", "--model"])
            .arg(dir.path().join("pipeline"))
            .args(["--sampler", "ddpm", "--steps", "3"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let sample = |extra: &[&str], out: &Path| {
        let done = run(extra, out);
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        String::from_utf8(done.stdout).unwrap()
    };
    let out = dir.path().join("eval");
    // 207 twice (by name and by id): drawn once.
    let per_class = [
        "--class-label",
        "golden retriever,3..4,207",
        "--per-class",
        "3",
        "--seed",
        "5",
        "--guidance",
        "2",
    ];
    let said = sample(&[&per_class[..], &["--batch-size", "4"]].concat(), &out);
    assert!(
        said.contains("6 images") && said.contains("6 generated now"),
        "{said}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "class0003_00000.png",
            "class0003_00001.png",
            "class0003_00002.png",
            "class0207_00000.png",
            "class0207_00001.png",
            "class0207_00002.png",
            "per_class.json"
        ]
    );
    let read = |p: &Path| image::open(p).unwrap().to_rgb8();
    let as_tensor = |img: &image::RgbImage| {
        Tensor::from_slice(img.as_raw()).view([img.height() as i64, img.width() as i64, 3])
    };
    // Image 2 of class 207 (third in the first batch) and image 0 of class 3 (fourth, beside
    // class 207's) against their seeds sampled alone: 5·2³² + class·3 + index.
    for (class, index) in [(207u64, 2u64), (3, 0)] {
        let alone = dir.path().join(format!("alone-{class}"));
        let seed = ((5u64 << 32) + class * 3 + index).to_string();
        sample(
            &[
                "--class-label",
                &class.to_string(),
                "--seed",
                &seed,
                "--guidance",
                "2",
            ],
            &alone,
        );
        common::assert_image_matches(
            &read(&out.join(format!("class{class:04}_{index:05}.png"))),
            &as_tensor(&read(&alone.join("000000.png"))),
            &format!("class {class} image {index}"),
        );
    }
    let kept = read(&out.join("class0003_00001.png"));
    let deleted = read(&out.join("class0207_00001.png"));
    std::fs::remove_file(out.join("class0207_00001.png")).unwrap();
    let again = sample(&[&per_class[..], &["--batch-size", "1"]].concat(), &out);
    assert!(
        again.contains("1 generated now, 5 already there"),
        "{again}"
    );
    assert_eq!(read(&out.join("class0003_00001.png")), kept);
    common::assert_image_matches(
        &read(&out.join("class0207_00001.png")),
        &as_tensor(&deleted),
        "the regenerated image",
    );

    let mut other = per_class.to_vec();
    other[7] = "3";
    let refused = run(&other, &out);
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        e.contains("other settings: guidance 3.0 (the folder's: 2.0)"),
        "{e}"
    );
    let empty = run(
        &["--class-label", "5..5", "--per-class", "1"],
        &dir.path().join("empty"),
    );
    let e = String::from_utf8_lossy(&empty.stderr);
    assert!(e.contains("--class-label 5..5 is an empty range"), "{e}");
}
