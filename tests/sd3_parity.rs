//! `SD3Transformer2DModel` against diffusers on tiny random models built by the oracle
//! (scripts/oracle/make_sd3.py): SD3's MMDiT, and SD3.5's with RMS-normed queries and keys and a
//! dual-attention block, on a non-square latent that crops the stored positional grid.

mod common;

use diffusion::models::sd3::SD3Transformer2DModel;
use tch::{Device, Kind, Tensor};

#[test]
fn sd3_and_sd35_transformers_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_sd3.py", &[dir.path().as_os_str()]);
    for variant in ["sd3", "sd35"] {
        let folder = dir.path().join(variant);
        let (_vs, model) = SD3Transformer2DModel::load(&folder, Device::Cpu, Kind::Float, None)
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        let io: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(folder.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let out = tch::no_grad(|| {
            model.forward(
                &io["latents"],
                &io["context"],
                &io["pooled"],
                &io["timestep"],
            )
        })
        .unwrap();
        let theirs = &io["sample"];
        assert_eq!(out.size(), theirs.size(), "{variant}");
        let diff = (&out - theirs).abs().max().double_value(&[]);
        let scale = theirs.abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "{variant}: max |Δ| {diff} of {scale}");
    }
}

#[test]
fn an_unbuildable_sd3_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"num_attention_heads": 2, "attention_head_dim": 8, "caption_projection_dim": 24}"#,
    )
    .unwrap();
    let e = SD3Transformer2DModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert!(e.to_string().contains("caption_projection_dim 24"), "{e}");
}
