//! SD3's prompt encoding against diffusers' `StableDiffusion3Pipeline.encode_prompt` on tiny
//! random SD3 folders built by the oracle (scripts/oracle/make_sd3_text.py): CLIP-L and CLIP-G
//! penultimate states zero-padded to T5's width and followed by T5's tokens, both CLIPs' pooled
//! projections side by side; and zeros in T5's place for a folder without `text_encoder_3`. Then
//! whole generations from given latents, unguided (the Turbo way) and with guidance 3, against
//! `StableDiffusion3Pipeline.__call__`, through pso's one `Pipeline` and `pso sample`.

mod common;

use diffusion::pipeline::sd3_prompt::Sd3TextEncoders;
use tch::{Device, Kind, Tensor};

#[test]
fn sd3_prompts_and_generations_match_diffusers_with_and_without_t5() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_sd3_text.py", &[dir.path().as_os_str()]);
    let prompts = [
        "a red cat",
        "a photo of a dog on the grass",
        "a cat and a dog",
    ];
    for variant in ["with_t5", "no_t5"] {
        let folder = dir.path().join(variant);
        let encoders = Sd3TextEncoders::load(&folder, 12, 80, Device::Cpu, Kind::Float, None)
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        let ours = tch::no_grad(|| encoders.encode(&prompts, Device::Cpu)).unwrap();
        let io: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(folder.join("io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        for (name, a, b) in [
            ("embeds", &ours.embeds, &io["embeds"]),
            ("pooled", ours.pooled.as_ref().unwrap(), &io["pooled"]),
        ] {
            assert_eq!(a.size(), b.size(), "{variant} {name}");
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-4 * scale,
                "{variant} {name}: max |Δ| {diff} of {scale}"
            );
        }
        let guidance = if variant == "with_t5" { 0.0 } else { 3.0 };
        let images = common::generate_each(&folder, &prompts, &io["latents"], 2, guidance);
        let theirs = &io["images"];
        assert_eq!(images.size(), theirs.size(), "{variant}");
        let diff = (&images - theirs).abs().max().double_value(&[]);
        assert!(diff <= 1e-4, "{variant} images: max |Δ| {diff}");
        // The same through `pso sample --init-noise`.
        let guidance = if variant == "with_t5" { "0" } else { "3" };
        common::sample_matches(
            &folder,
            &prompts,
            &io["latents"],
            theirs,
            &[
                "--steps",
                "2",
                "--guidance",
                guidance,
                "--max-sequence-length",
                "12",
            ],
        );
    }
}
