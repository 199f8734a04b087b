//! T5 (SD3's `text_encoder_3`, FLUX's `text_encoder_2`) against transformers on a tiny random
//! T5 v1.1 encoder and a tiny T5-style `tokenizer.json` built by the oracle
//! (scripts/oracle/make_t5.py): the ids as the SD3 pipeline tokenizes (padded to the length,
//! `</s>` kept when a long prompt is cut) and the last hidden state without an attention mask.

mod common;

use hf::t5::{T5EncoderModel, T5Tokenizer};
use tch::{Device, Kind, Tensor};

#[test]
fn t5_tokenizer_and_encoder_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    common::oracle("make_t5.py", &[dir.path().as_os_str()]);
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let tokenizer = T5Tokenizer::from_dir(&dir.path().join("tokenizer_3"), 12).unwrap();
    let prompts = [
        "a red cat",
        "A  photo of a dog on the grass",
        "a cat and a dog and a red bird on a tree at night",
    ];
    let ids = tokenizer.encode(&prompts, Device::Cpu).unwrap();
    assert!(ids.equal(&io["ids"]), "ids {ids} vs {}", io["ids"]);

    let (_vs, model) =
        T5EncoderModel::load(&dir.path().join("text_encoder_3"), Device::Cpu, Kind::Float).unwrap();
    let hidden = tch::no_grad(|| model.forward(&ids));
    let theirs = &io["hidden"];
    assert_eq!(hidden.size(), theirs.size());
    let diff = (&hidden - theirs).abs().max().double_value(&[]);
    let scale = theirs.abs().max().double_value(&[]);
    assert!(diff <= 1e-4 * scale, "max |Δ| {diff} of {scale}");
}
