//! `UNet2DConditionModel` against diffusers on tiny random-weight SD 1.x / SD 2.x / SDXL / LCM
//! layouts built by scripts/oracle/make_unet.py (fp32, CPU).

mod common;

use std::collections::HashMap;

use diffusion::models::unet::{AddedCond, UNet2DConditionModel};
use tch::{Device, Kind, Tensor};

#[test]
fn unet_matches_diffusers_on_sd1_sd2_sdxl_and_lcm_layouts() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_unet.py", &[dir.path().as_os_str()]);
    for case in ["sd1", "sd2", "sdxl", "lcm"] {
        let folder = dir.path().join(case);
        let (_vs, unet) =
            UNet2DConditionModel::load(&folder, Device::Cpu, Kind::Float, None).unwrap();
        let e: HashMap<String, Tensor> =
            Tensor::read_safetensors(folder.join("expected.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let added = e.get("text_embeds").map(|t| AddedCond {
            text_embeds: t.shallow_clone(),
            time_ids: e["time_ids"].shallow_clone(),
        });
        assert_eq!(unet.needs_added_cond(), added.is_some(), "{case}");
        let _guard = tch::no_grad_guard();
        let out = unet.forward(
            &e["sample"],
            &e["timestep"],
            &e["encoder_hidden_states"],
            added.as_ref(),
            e.get("timestep_cond"),
        );
        let want = &e["output"];
        assert_eq!(out.size(), want.size(), "{case}");
        let err = (&out - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(err < 1e-4, "{case}: relative error {err:e}");
    }
}

#[test]
fn unsupported_unet_configs_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (config, want) in [
        (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
        (
            r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
            "SimpleCrossAttnDownBlock2D",
        ),
        (
            r#"{"block_out_channels": [320, 640]}"#,
            "2 block_out_channels",
        ),
        (
            r#"{"attention_head_dim": [5, 10]}"#,
            "attention_head_dim / num_attention_heads has 2 entries",
        ),
        (
            r#"{"attention_head_dim": 7}"#,
            "320 channels are not divisible into 7 heads",
        ),
    ] {
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let msg = UNet2DConditionModel::load(dir.path(), Device::Cpu, Kind::Float, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.json: unsupported") && msg.contains(want),
            "{msg}"
        );
    }
}
