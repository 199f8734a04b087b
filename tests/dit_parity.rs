//! `DiTTransformer2DModel` against diffusers on tiny random-weight models built by
//! scripts/oracle/make_dit.py (fp32, CPU), DiffFit's branch scales, and refused configs.

mod common;

use std::collections::HashMap;

use pso::models::dit::{
    sincos_pos_embed_2d, DiTBranchScales, DiTTransformer2DConfig, DiTTransformer2DModel,
};
use pso::models::load::read_config;
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
        b.set_branch_scales(Some(DiTBranchScales {
            attn1: ones(),
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
        let scales = DiTBranchScales {
            attn1: attn1.shallow_clone(),
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
