//! Z-Image against diffusers and transformers on tiny random models built by the oracle
//! (scripts/oracle/make_z_image.py): the `ZImageTransformer2DModel` on a padded, masked batch
//! (image and captions each padded to 32 tokens, captions of different lengths), Qwen3's
//! chat-formatted tokens and `hidden_states[-2]`, and `ZImagePipeline` generations (Turbo's
//! unguided sampling with a static shift; classifier-free guidance with a dynamic shift) through
//! pso's one `Pipeline` and `pso sample`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use diffusion::models::z_image::ZImageTransformer2DModel;
use diffusion::pipeline::z_image_prompt::ZImageTextEncoder;
use diffusion::pipeline::{LoadOptions, Pipeline};
use hf::qwen3::Qwen3Tokenizer;
use tch::{Device, Kind, Tensor};

const PROMPTS: [&str; 3] = [
    "a red cat",
    "a photo of a dog on the grass at night",
    "a cat and a dog",
];

fn folders() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("z-image");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::oracle("make_z_image.py", &[dir.as_os_str()]);
        dir
    })
}

fn io(folder: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(folder.join("io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.size(), theirs.size(), "{what}");
    let diff = (ours - theirs).abs().max().double_value(&[]);
    let scale = theirs.abs().max().double_value(&[]);
    assert!(diff <= 1e-4 * scale, "{what}: max |Δ| {diff} of {scale}");
}

#[test]
fn the_transformer_matches_diffusers_on_a_padded_masked_batch() {
    let folder = folders().join("transformer");
    let (_vs, model) =
        ZImageTransformer2DModel::load(&folder, Device::Cpu, Kind::Float, None).unwrap();
    let io = io(&folder);
    let lens: Vec<i64> = Vec::try_from(&io["cap_lens"]).unwrap();
    let out = tch::no_grad(|| model.forward(&io["x"], &io["t"], &io["cap_feats"], &lens)).unwrap();
    assert_close(&out, &io["sample"], "transformer output");
    // Each row alone gives its batched output: padding and masks keep the rows apart.
    for row in 0..2 {
        let alone = tch::no_grad(|| {
            model.forward(
                &io["x"].narrow(0, row, 1),
                &io["t"].narrow(0, row, 1),
                &io["cap_feats"].narrow(0, row, 1),
                &lens[row as usize..=row as usize],
            )
        })
        .unwrap();
        assert_close(
            &alone,
            &io["sample"].narrow(0, row, 1),
            &format!("row {row} alone"),
        );
    }
    // What it cannot take is refused with the reason.
    let odd = model.forward(&io["x"].narrow(2, 0, 9), &io["t"], &io["cap_feats"], &lens);
    assert!(odd.unwrap_err().contains("even"));
    let long = model.forward(&io["x"], &io["t"], &io["cap_feats"], &[5, 38]);
    assert!(long.unwrap_err().contains("1..=37"));
    // axes_lens[0] = 96 places captions up to 64 tokens (padded 64, the image at 65), not 65.
    assert!(model.check_caption_length(64).is_ok());
    let e = model.check_caption_length(65).unwrap_err();
    assert!(
        e.contains("0..96") && e.contains("max_sequence_length"),
        "{e}"
    );
}

#[test]
fn a_prompt_length_the_transformer_cannot_place_is_refused_at_load() {
    let opts = LoadOptions {
        device: Device::Cpu,
        kind: Kind::Float,
        variant: None,
        backbone_weights: None,
        // Padded to 64, the image at 65: beyond this transformer's axes_lens[0] = 64.
        max_sequence_length: Some(40),
        text_encoder_device: None,
    };
    let e = Pipeline::load(&folders().join("turbo"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("transformer/config.json") && e.contains("axes_lens"),
        "{e}"
    );
}

#[test]
fn qwen3_prompts_match_transformers() {
    let folder = folders().join("turbo");
    let io = io(&folder);
    let tokenizer = Qwen3Tokenizer::from_dir(&folder.join("tokenizer"), 12).unwrap();
    let encoder = ZImageTextEncoder::load(&folder, 12, Device::Cpu, Kind::Float).unwrap();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer.encode(prompt, Device::Cpu).unwrap();
        assert!(ids.equal(&io[&format!("ids_{i}")]), "ids of {prompt:?}");
        let embeds = tch::no_grad(|| encoder.encode(prompt, Device::Cpu))
            .unwrap()
            .embeds;
        assert_close(
            &embeds.squeeze_dim(0),
            &io[&format!("embeds_{i}")],
            &format!("hidden states of {prompt:?}"),
        );
    }
    // Not a Qwen tokenizer: said so.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("tokenizer.json"),
        r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": null, "truncation": null, "padding": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1}, "unk_token": "<unk>"}}"#,
    )
    .unwrap();
    let e = Qwen3Tokenizer::from_dir(other.path(), 12).unwrap_err();
    assert!(e.to_string().contains("<|im_start|>"), "{e}");
}

#[test]
fn turbo_and_guided_generations_match_diffusers() {
    for (variant, guidance) in [("turbo", "0"), ("cfg", "2")] {
        let folder = folders().join(variant);
        let io = io(&folder);
        let g: f64 = guidance.parse().unwrap();
        let images = common::generate_each(&folder, &PROMPTS, &io["latents"], 2, g);
        assert_close(&images, &io["images"], &format!("{variant} images"));
        common::sample_matches(
            &folder,
            &PROMPTS,
            &io["latents"],
            &io["images"],
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
