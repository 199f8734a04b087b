//! `AutoencoderKL` against diffusers on tiny random-weight models built by
//! scripts/oracle/make_vae.py (fp32, CPU): encoder moments and decoder output.

mod common;

use std::path::Path;

use diffusion::models::load::LoadError;
use diffusion::models::vae::AutoencoderKL;
use tch::{Device, Kind, Tensor};

fn expected(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest |a − b| relative to the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn oracle_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_vae.py", &[dir.path().as_os_str()]);
    dir
}

#[test]
fn vae_matches_diffusers_for_several_layouts_and_weight_files() {
    let dir = oracle_dir();
    for (case, variant, tol) in [
        ("two_level", None, 1e-4),
        ("sharded", None, 1e-4),
        // SD3 / FLUX: 16 channels, no quant convs, shift_factor.
        ("sd3_flux", None, 1e-4),
        // fp16 weights loaded into an fp32 model: equal up to the weights' rounding.
        ("two_level", Some("fp16"), 2e-2),
    ] {
        let folder = dir.path().join(case);
        let (_vs, vae) = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, variant).unwrap();
        let e = expected(&folder);
        let _guard = tch::no_grad_guard();
        let post = vae.encode(&e["x"]);
        let decoded = vae.decode(&e["z"]);
        let decoded_scaled = vae.decode_scaled(&e["z"]);
        for (name, ours, theirs) in [
            ("mean", &post.mean, &e["mean"]),
            ("logvar", &post.logvar, &e["logvar"]),
            ("decoded", &decoded, &e["decoded"]),
            ("decoded_scaled", &decoded_scaled, &e["decoded_scaled"]),
        ] {
            let err = rel_err(ours, theirs);
            assert!(
                err < tol,
                "{case} {variant:?} {name}: relative error {err:e} ≥ {tol:e}"
            );
        }
    }
}

#[test]
fn missing_and_misshapen_tensors_are_named_with_their_file() {
    let dir = oracle_dir();
    let folder = dir.path().join("two_level");
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    let tensors = Tensor::read_safetensors(&weights).unwrap();

    let without: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "decoder.conv_out.weight")
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&without, &weights).unwrap();
    let err = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, None).unwrap_err();
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`decoder.conv_out.weight`")
            && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );

    let reshaped: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = if n == "quant_conv.bias" {
                Tensor::zeros([3], (t.kind(), Device::Cpu))
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    Tensor::write_safetensors(&reshaped, &weights).unwrap();
    let msg = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`quant_conv.bias`") && msg.contains("shape [3]") && msg.contains("[8]"),
        "{msg}"
    );

    std::fs::remove_file(&weights).unwrap();
    std::fs::remove_file(folder.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let msg = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("two_level not found") && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );

    std::fs::write(folder.join("config.json"), r#"{"act_fn": "gelu"}"#).unwrap();
    let msg = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json: unsupported act_fn `gelu`"),
        "{msg}"
    );
    std::fs::write(folder.join("config.json"), r#"{"latent_channels": "four"}"#).unwrap();
    let msg = AutoencoderKL::load(&folder, Device::Cpu, Kind::Float, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("invalid type"),
        "{msg}"
    );
}
