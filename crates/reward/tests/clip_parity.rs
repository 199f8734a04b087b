//! CLIP against transformers on tiny random-weight models built by scripts/oracle/make_clip.py
//! (fp32, CPU): tokenizer ids, image preprocessing, every hidden state, pooled outputs,
//! projections, logits, and the PickScore / CLIPScore / aesthetic scorers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hf::clip::{ClipImageProcessor, ClipModel, ClipTextModel, ClipTokenizer};
use image::RgbImage;
use reward::{load_local, score_checked, LocalScorerKind, ScoreItem};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Manifest {
    prompts: Vec<String>,
    images: Vec<String>,
    cases: Vec<String>,
    layers: usize,
    preprocess: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the oracle into a fresh temporary folder.
fn oracle() -> tempfile::TempDir {
    let python = std::env::var_os("PSO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let script = workspace().join("scripts/oracle/make_clip.py");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (run scripts/setup.sh): {e}",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "{} {} failed:\n{}",
        python.display(),
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Largest |a − b| relative to the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor) {
    let err = rel_err(&ours.to_kind(Kind::Float), &theirs.to_kind(Kind::Float));
    assert!(err < TOL, "{what}: relative error {err:e} ≥ {TOL:e}");
}

fn images(dir: &Path, m: &Manifest) -> Vec<RgbImage> {
    m.images
        .iter()
        .map(|n| image::open(dir.join("images").join(n)).unwrap().to_rgb8())
        .collect()
}

fn ids_of(tokenizer: &ClipTokenizer, prompts: &[&str]) -> Tensor {
    tokenizer
        .encode_batch(prompts, Device::Cpu)
        .unwrap()
        .input_ids
}

#[test]
fn clip_matches_transformers() {
    let dir = oracle();
    let root = dir.path();
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap())
            .unwrap();
    let e: HashMap<String, Tensor> = Tensor::read_safetensors(root.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let prompts: Vec<&str> = m.prompts.iter().map(String::as_str).collect();
    let imgs = images(root, &m);
    let _guard = tch::no_grad_guard();

    for (name, expected) in m
        .preprocess
        .iter()
        .map(|n| (n, &e[&format!("preprocess.{n}")]))
    {
        let processor = ClipImageProcessor::from_dir(&root.join("preprocess").join(name)).unwrap();
        let ours = processor.preprocess(&imgs);
        let diff = (&ours - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "preprocess {name}: max difference {diff}");
    }

    for case in &m.cases {
        let folder = root.join(case);
        let x = |k: &str| &e[&format!("{case}.{k}")];

        // Tokenizer: from tokenizer.json, and rebuilt from vocab.json + merges.txt.
        let tokenizer = ClipTokenizer::from_dir(&folder).unwrap();
        let tok = tokenizer.encode_batch(&prompts, Device::Cpu).unwrap();
        assert!(
            tok.input_ids.equal(x("input_ids")),
            "{case}: token ids differ:\n{}\nvs\n{}",
            tok.input_ids,
            x("input_ids")
        );
        assert!(
            tok.attention_mask.equal(x("attention_mask")),
            "{case}: attention masks differ"
        );
        let bpe_only = tempfile::tempdir().unwrap();
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(folder.join(f), bpe_only.path().join(f)).unwrap();
        }
        let rebuilt = ClipTokenizer::from_dir(bpe_only.path()).unwrap();
        assert!(
            ids_of(&rebuilt, &prompts).equal(x("input_ids")),
            "{case}: vocab.json + merges.txt tokenizer differs from tokenizer.json"
        );

        // Preprocessing.
        let processor = ClipImageProcessor::from_dir(&folder).unwrap();
        let pixels = processor.preprocess(&imgs);
        let diff = (&pixels - x("pixel_values")).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{case}: pixel_values differ by {diff}");

        // The model, fed the oracle's own inputs.
        let (_vs, model) = ClipModel::load(&folder, Device::Cpu, Kind::Float).unwrap();
        let ids = x("input_ids");
        let text = model.text.forward(ids, None);
        assert_eq!(text.hidden_states.len(), m.layers + 1);
        assert_close(
            &format!("{case} text last_hidden_state"),
            &text.last_hidden_state,
            x("text_last_hidden"),
        );
        assert_close(
            &format!("{case} text hidden_states"),
            &Tensor::stack(&text.hidden_states, 0),
            x("text_hidden_states"),
        );
        assert_close(
            &format!("{case} text pooled"),
            &text.pooled_output,
            x("text_pooled"),
        );
        let text_embeds = text.text_embeds.unwrap();
        assert_close(
            &format!("{case} text_embeds"),
            &text_embeds,
            x("text_embeds"),
        );
        assert_close(
            &format!("{case} pooled output of ids that tell the EOS rules apart"),
            &model.text.forward(x("synthetic_ids"), None).pooled_output,
            x("synthetic_pooled"),
        );
        let masked = model.text.forward(ids, Some(x("attention_mask")));
        assert_close(
            &format!("{case} text last_hidden_state with attention mask"),
            &masked.last_hidden_state,
            x("text_last_hidden_masked"),
        );

        let (vision, image_embeds) = model.vision.forward(x("pixel_values"));
        assert_close(
            &format!("{case} vision last_hidden_state"),
            &vision.last_hidden_state,
            x("image_last_hidden"),
        );
        assert_close(
            &format!("{case} vision hidden_states"),
            &Tensor::stack(&vision.hidden_states, 0),
            x("image_hidden_states"),
        );
        assert_close(
            &format!("{case} vision pooled"),
            &vision.pooled_output,
            x("image_pooled"),
        );
        assert_close(
            &format!("{case} image_embeds"),
            &image_embeds,
            x("image_embeds"),
        );
        assert_close(
            &format!("{case} logits_per_image"),
            &model.logits_per_image(&text_embeds, &image_embeds),
            x("logits_per_image"),
        );

        // The text tower alone (diffusers' text_encoder_2 layout).
        let (_vs, text_encoder) = ClipTextModel::load(
            &root.join(format!("{case}_text_encoder")),
            Device::Cpu,
            Kind::Float,
            None,
        )
        .unwrap();
        assert!(text_encoder.has_projection());
        let alone = text_encoder.forward(ids, None);
        assert_close(
            &format!("{case} text encoder pooled"),
            &alone.pooled_output,
            x("text_pooled"),
        );
        assert_close(
            &format!("{case} text encoder text_embeds"),
            &alone.text_embeds.unwrap(),
            x("text_embeds"),
        );
        // Its fp16 variant, loaded into f32: equal up to the weights' rounding.
        let (_vs, half) = ClipTextModel::load(
            &root.join(format!("{case}_text_encoder")),
            Device::Cpu,
            Kind::Float,
            Some("fp16"),
        )
        .unwrap();
        let err = rel_err(&half.forward(ids, None).pooled_output, x("text_pooled"));
        assert!(
            err < 2e-2,
            "{case} fp16 text encoder: relative error {err:e}"
        );

        // Scorers, on every (image, prompt) pair: from files, through tokenizer and processor.
        let mut items = Vec::new();
        let mut rows = Vec::new();
        let mut cols = Vec::new();
        for (i, image) in imgs.iter().enumerate() {
            for (j, prompt) in prompts.iter().enumerate() {
                items.push(ScoreItem { prompt, image });
                rows.push(i as i64);
                cols.push(j as i64);
            }
        }
        let (rows, cols) = (Tensor::from_slice(&rows), Tensor::from_slice(&cols));
        for (kind, key) in [
            (LocalScorerKind::Pickscore, "pickscore"),
            (LocalScorerKind::Clip, "clipscore"),
        ] {
            let scorer = load_local(kind, &folder, Device::Cpu).unwrap();
            let ours = futures::executor::block_on(score_checked(scorer.as_ref(), &items)).unwrap();
            let theirs = x(key).index(&[Some(&rows), Some(&cols)]);
            assert_close(
                &format!("{case} {key}"),
                &Tensor::from_slice(&ours),
                &theirs,
            );
        }
        let scorer = load_local(LocalScorerKind::Aesthetic, &folder, Device::Cpu).unwrap();
        let per_image: Vec<ScoreItem> = imgs
            .iter()
            .map(|image| ScoreItem { prompt: "", image })
            .collect();
        let ours = futures::executor::block_on(score_checked(scorer.as_ref(), &per_image)).unwrap();
        assert_close(
            &format!("{case} aesthetic"),
            &Tensor::from_slice(&ours),
            x("aesthetic"),
        );
    }
}
