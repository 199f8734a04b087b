//! `FluxTransformer2DModel` against diffusers on tiny random FLUX.1-schnell- and dev-like models
//! built by the oracle (scripts/oracle/make_flux.py): double- and single-stream blocks, 3-axis
//! rotary positions from the pipeline's image ids, and dev's guidance embedding; and the
//! pipeline's latent packing and ids.

mod common;

use diffusion::models::flux::FluxTransformer2DModel;
use diffusion::pipeline::flux_latents;
use tch::{Device, Kind, Tensor};

#[test]
fn flux_schnell_and_dev_transformers_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_flux.py", &[dir.path().as_os_str()]);
    for variant in ["schnell", "dev"] {
        let folder = dir.path().join(variant);
        let (_vs, model) = FluxTransformer2DModel::load(&folder, Device::Cpu, Kind::Float, None)
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        let io: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(folder.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let out = tch::no_grad(|| {
            model.forward(
                &io["tokens"],
                &io["context"],
                &io["pooled"],
                &io["timestep"],
                &io["img_ids"],
                &io["txt_ids"],
                io.get("guidance"),
            )
        })
        .unwrap();
        let theirs = &io["sample"];
        assert_eq!(out.size(), theirs.size(), "{variant}");
        // The pipeline's ids and packing.
        assert!(flux_latents::image_ids(4, 6, Device::Cpu).equal(&io["img_ids"]));
        let packed = flux_latents::pack(&io["latent"]).unwrap();
        assert!(packed.equal(&io["packed"]));
        assert!(flux_latents::unpack(&packed, 8, 12)
            .unwrap()
            .equal(&io["latent"]));
        let diff = (&out - theirs).abs().max().double_value(&[]);
        let scale = theirs.abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "{variant}: max |Δ| {diff} of {scale}");
        // Guidance is refused by schnell and required by dev.
        let wrong = if variant == "schnell" {
            Some(&io["timestep"])
        } else {
            None
        };
        let e = model
            .forward(
                &io["tokens"],
                &io["context"],
                &io["pooled"],
                &io["timestep"],
                &io["img_ids"],
                &io["txt_ids"],
                wrong,
            )
            .unwrap_err();
        assert!(e.contains("guidance"), "{e}");
    }
}
