//! PEFT on tiny random-weight pipelines (scripts/oracle/peft_oracle.py): which tensors train,
//! what the reference model is, and that exports load back — LoRA into diffusers'
//! `load_lora_weights` with the same UNet output.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use diffusion::pipeline::{LoadOptions, Pipeline};
use hf::tensor_file;
use pso::config::PeftSection;
use pso::peft::export::{apply_file, merge};
use pso::peft::{lora, Adapter, PeftKind};
use tch::{Device, Kind, Tensor};

fn oracle_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peft");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::oracle("peft_oracle.py", &["make".as_ref(), dir.as_os_str()]);
        dir
    })
}

fn load(name: &str, kind: Kind) -> Pipeline {
    let opts = LoadOptions {
        device: Device::Cpu,
        kind,
        variant: None,
        backbone_weights: None,
        max_sequence_length: None,
        text_encoder_device: None,
    };
    Pipeline::load(&oracle_dir().join(name), &opts).unwrap()
}

fn section(kind: PeftKind) -> PeftSection {
    PeftSection {
        kind,
        rank: 4,
        alpha: 8.0,
        ..PeftSection::default()
    }
}

/// Fixed UNet inputs for a batch of 2 at timesteps 999 and 499.
struct Inputs {
    x: Tensor,
    t: Tensor,
    cond: diffusion::pipeline::Conditioning,
}

fn inputs(p: &Pipeline) -> Inputs {
    tch::manual_seed(5);
    Inputs {
        x: Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
        t: Tensor::from_slice(&[999i64, 499]),
        cond: p
            .condition("a cat on the moon", None, 0.0, 16, 16, 1)
            .unwrap()
            .repeat(2),
    }
}

fn output(p: &Pipeline, i: &Inputs) -> Tensor {
    tch::no_grad(|| p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t))
}

/// Gives every LoRA B (initialised to zero) random values, so that the adapters matter.
fn randomize_up(adapter: &Adapter) {
    tch::no_grad(|| {
        for (name, t) in adapter.params() {
            if name.ends_with(lora::UP) {
                t.shallow_clone().copy_(&(t.randn_like() * 0.2));
            }
        }
    });
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    assert!(
        diff / scale < 1e-4,
        "{what}: max |Δ| = {diff} (scale {scale})"
    );
}

#[test]
fn gradients_reach_exactly_the_trainable_tensors() {
    for kind in [PeftKind::Lora, PeftKind::Difffit, PeftKind::Full] {
        let p = load("sdxl", Kind::Float);
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &section(kind), 0).unwrap();
        let i = inputs(&p);
        p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t)
            .square()
            .mean(Kind::Float)
            .backward();
        let trainable: HashMap<&str, &Tensor> = adapter
            .params()
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        for (name, t) in adapter.params() {
            let g = t.grad();
            assert!(g.defined(), "{kind}: `{name}` got no gradient");
            assert!(
                g.isfinite().all().int64_value(&[]) == 1,
                "{kind}: `{name}` has a non-finite gradient"
            );
        }
        // LoRA's B starts at zero, so A's gradient is zero at init; B's must not be.
        let nonzero = adapter
            .params()
            .iter()
            .filter(|(_, t)| t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0)
            .count();
        assert!(
            nonzero * 2 >= adapter.params().len(),
            "{kind}: {nonzero} nonzero"
        );
        for (name, t) in p.backbone_vs.variables() {
            if !trainable.contains_key(name.as_str()) {
                assert!(!t.requires_grad(), "{kind}: frozen `{name}` requires grad");
                assert!(
                    !t.grad().defined(),
                    "{kind}: frozen `{name}` got a gradient"
                );
            }
        }
        match kind {
            PeftKind::Lora => {
                assert!(adapter.params().iter().all(|(n, _)| n.contains(".lora_")));
                let blocks = p.backbone.scaled_blocks().len();
                assert_eq!(
                    adapter.params().len(),
                    blocks * 2 * 4 * 2,
                    "2 attns × 4 × A, B"
                );
            }
            PeftKind::Difffit => {
                let names: Vec<&str> = adapter.params().iter().map(|(n, _)| n.as_str()).collect();
                assert!(names.iter().any(|n| n.ends_with("gamma_ff")));
                assert!(names.iter().any(|n| n.starts_with("add_embedding.")));
                assert!(names.iter().all(|n| !n.ends_with("to_q.weight")));
                let fraction = adapter.numel() as f64
                    / p.backbone_vs
                        .variables()
                        .values()
                        .map(|t| t.numel() as f64)
                        .sum::<f64>();
                assert!(fraction < 0.2, "DiffFit trains {fraction:.3} of the UNet");
            }
            _ => assert_eq!(adapter.params().len(), p.backbone_vs.variables().len()),
        }
    }
}

#[test]
fn the_reference_model_is_the_base_model() {
    for kind in [PeftKind::Lora, PeftKind::Difffit, PeftKind::Full] {
        let p = load("sd", Kind::Float);
        let i = inputs(&p);
        let base = output(&p, &i);
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &section(kind), 0).unwrap();
        assert!(
            output(&p, &i).equal(&base),
            "{kind}: a fresh adapter changes nothing"
        );
        // Train-like change of every trainable tensor.
        randomize_up(&adapter);
        if kind != PeftKind::Lora {
            tch::no_grad(|| {
                for (_, t) in adapter.params() {
                    let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
                }
            });
        }
        let tuned = output(&p, &i);
        assert!(
            !tuned.allclose(&base, 1e-4, 1e-5, false),
            "{kind}: adapter has no effect"
        );
        let reference = adapter.reference(&p.backbone, |u| p.predict_batch(u, &i.cond, &i.x, &i.t));
        assert_close(&reference, &base, &kind.to_string());
        assert!(
            output(&p, &i).equal(&tuned),
            "{kind}: the policy is restored after the reference pass"
        );
    }
}

#[test]
fn bf16_models_keep_fp32_adapters() {
    let p = load("sd", Kind::BFloat16);
    let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &section(PeftKind::Lora), 0).unwrap();
    assert!(adapter
        .params()
        .iter()
        .all(|(_, t)| t.kind() == Kind::Float));
    let i = inputs(&p);
    let out = p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t);
    assert_eq!(out.kind(), Kind::BFloat16);
    out.to_kind(Kind::Float).mean(Kind::Float).backward();
    assert!(adapter
        .params()
        .iter()
        .all(|(_, t)| t.grad().kind() == Kind::Float));
}

#[test]
fn lora_export_loads_in_diffusers_with_the_same_unet_output() {
    let dir = oracle_dir();
    for name in ["sd", "sdxl"] {
        let p = load(name, Kind::Float);
        let base = output(&p, &inputs(&p));
        let mut s = section(PeftKind::Lora);
        s.targets.push("ff.net.2".into());
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &s, 3).unwrap();
        randomize_up(&adapter);
        let i = inputs(&p);
        let ours = output(&p, &i);
        assert!(
            !ours.allclose(&base, 1e-3, 1e-4, false),
            "{name}: the adapter matters"
        );
        let lora_file = dir.join(format!("{name}-lora.safetensors"));
        tensor_file::write(
            &lora_file,
            &lora::to_diffusers(&adapter.tensors(), s.alpha / s.rank as f64, "unet"),
            &HashMap::new(),
        )
        .unwrap();
        let mut feed = vec![
            ("sample".to_string(), i.x.shallow_clone()),
            ("timestep".to_string(), i.t.shallow_clone()),
        ];
        feed.extend(i.cond.tensors());
        let inputs_file = dir.join(format!("{name}-inputs.safetensors"));
        tensor_file::write(&inputs_file, &feed, &HashMap::new()).unwrap();
        let out_file = dir.join(format!("{name}-out.safetensors"));
        common::oracle(
            "peft_oracle.py",
            &[
                "lora".as_ref(),
                dir.join(name).as_os_str(),
                lora_file.as_os_str(),
                inputs_file.as_os_str(),
                out_file.as_os_str(),
            ],
        );
        let theirs = tensor_file::read(&out_file).unwrap().tensors.remove(0).1;
        assert_close(&ours, &theirs, name);

        // The same file through `pso sample --adapter`'s loader, on a fresh pipeline.
        let fresh = load(name, Kind::Float);
        let file = tensor_file::read(&lora_file).unwrap();
        apply_file(&fresh.backbone, &fresh.backbone_vs, file, &lora_file).unwrap();
        assert_close(&output(&fresh, &i), &ours, "reloaded");
        // Merged into the base weights: the same function without adapters.
        merge(&fresh.backbone, &fresh.backbone_vs);
        assert!(fresh
            .backbone
            .lora_candidates()
            .iter()
            .all(|l| l.lora().is_none()));
        assert_close(&output(&fresh, &i), &ours, "merged");
    }
}

#[test]
fn difffit_files_and_merges_reproduce_the_tuned_unet() {
    let p = load("sd", Kind::Float);
    let adapter =
        Adapter::new(&p.backbone, &p.backbone_vs, &section(PeftKind::Difffit), 0).unwrap();
    tch::no_grad(|| {
        for (_, t) in adapter.params() {
            let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
        }
    });
    let i = inputs(&p);
    let tuned = output(&p, &i);
    let path = oracle_dir().join("difffit.safetensors");
    let meta = HashMap::from([(
        pso::peft::export::FORMAT_KEY.to_string(),
        "difffit".to_string(),
    )]);
    tensor_file::write(&path, &adapter.tensors(), &meta).unwrap();
    let fresh = load("sd", Kind::Float);
    assert!(!output(&fresh, &i).allclose(&tuned, 1e-4, 1e-5, false));
    apply_file(
        &fresh.backbone,
        &fresh.backbone_vs,
        tensor_file::read(&path).unwrap(),
        &path,
    )
    .unwrap();
    assert_close(&output(&fresh, &i), &tuned, "difffit file");
    merge(&fresh.backbone, &fresh.backbone_vs);
    assert_close(&output(&fresh, &i), &tuned, "γ merged");
    let e = apply_file(
        &fresh.backbone,
        &fresh.backbone_vs,
        tensor_file::read(&path)
            .map(|mut f| {
                f.metadata.clear();
                f
            })
            .unwrap(),
        &path,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("neither LoRA entries"), "{e}");
}

#[test]
fn lora_targets_that_match_nothing_are_named() {
    let p = load("sd", Kind::Float);
    let mut s = section(PeftKind::Lora);
    s.targets = vec!["to_qq".into()];
    let e = Adapter::new(&p.backbone, &p.backbone_vs, &s, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`to_qq` matches no linear layer"), "{e}");
    assert!(e.contains("down_blocks.0.attentions.0"), "{e}");
    let mut s = section(PeftKind::Difffit);
    s.gamma_blocks = Some([0, 99]);
    let e = Adapter::new(&p.backbone, &p.backbone_vs, &s, 0)
        .unwrap_err()
        .to_string();
    let blocks = p.backbone.scaled_blocks().len();
    assert!(
        e.contains(&format!("has {blocks} transformer blocks")),
        "{e}"
    );
}

/// Fixed DiT inputs: a batch of 2 at timesteps 999 and 499, classes given by name.
fn dit_inputs(p: &Pipeline) -> Inputs {
    tch::manual_seed(5);
    let cat = p.condition("kitty", None, 0.0, 16, 16, 1).unwrap();
    let dog = p.condition("1", None, 0.0, 16, 16, 1).unwrap();
    Inputs {
        x: Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
        t: Tensor::from_slice(&[999i64, 499]),
        cond: diffusion::pipeline::Conditioning::cat(&[&cat, &dog]).unwrap(),
    }
}

#[test]
fn dit_peft_trains_exactly_its_tensors_and_the_reference_is_the_base() {
    for kind in [PeftKind::Lora, PeftKind::Difffit, PeftKind::Full] {
        let p = load("dit", Kind::Float);
        assert!(p.is_class_conditional());
        let i = dit_inputs(&p);
        let base = output(&p, &i);
        assert_eq!(base.size(), [2, 4, 8, 8], "the noise prediction only");
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &section(kind), 0).unwrap();
        randomize_up(&adapter);
        if kind != PeftKind::Lora {
            tch::no_grad(|| {
                for (_, t) in adapter.params() {
                    let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
                }
            });
        }
        let reference = adapter.reference(&p.backbone, |b| p.predict_batch(b, &i.cond, &i.x, &i.t));
        assert_close(&reference, &base, &kind.to_string());
        let tuned = p.predict_batch(&p.backbone, &i.cond, &i.x, &i.t);
        assert!(
            !tuned.allclose(&base, 1e-4, 1e-5, false),
            "{kind}: no effect"
        );
        tuned.square().mean(Kind::Float).backward();
        let trainable: HashMap<&str, &Tensor> = adapter
            .params()
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        for (name, t) in adapter.params() {
            assert!(t.grad().defined(), "{kind}: `{name}` got no gradient");
        }
        for (name, t) in p.backbone_vs.variables() {
            if !trainable.contains_key(name.as_str()) {
                assert!(
                    !t.grad().defined(),
                    "{kind}: frozen `{name}` got a gradient"
                );
            }
        }
        let names: Vec<&str> = trainable.keys().copied().collect();
        match kind {
            PeftKind::Lora => {
                // The default targets: attn1's four projections, × A and B, × 4 blocks.
                assert_eq!(names.len(), 4 * 4 * 2, "{names:?}");
            }
            PeftKind::Difffit => {
                let has = |n: &str| names.contains(&n);
                // γ on attn1 and ff of the first half of the 4 blocks, none on attn2.
                for b in 0..4 {
                    for g in ["gamma_attn1", "gamma_ff"] {
                        let name = format!("transformer_blocks.{b}.{g}");
                        assert_eq!(has(&name), b < 2, "{name}");
                    }
                }
                assert!(!names.iter().any(|n| n.contains("gamma_attn2")));
                // The shared class table trains once, in block 0; the copies are never read.
                let table = |b: u32| {
                    format!(
                        "transformer_blocks.{b}.norm1.emb.class_embedder.embedding_table.weight"
                    )
                };
                assert!(has(&table(0)) && !has(&table(1)), "{names:?}");
                assert!(has("transformer_blocks.2.norm3.weight"));
                assert!(has("transformer_blocks.3.ff.net.2.bias"));
                assert!(has("proj_out_2.bias") && has("pos_embed.proj.bias"));
                assert!(!has("transformer_blocks.0.norm1.linear.weight"));
                assert!(has("transformer_blocks.0.norm1.linear.bias"));
                assert!(!has("transformer_blocks.0.attn1.to_q.weight"));
                assert!(!has(
                    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"
                ));
            }
            _ => {
                // Every variable but the 3 blocks' unread embedding copies (class table and
                // the timestep MLP's two layers, weight and bias).
                let copies = 3 * (1 + 4);
                assert_eq!(names.len(), p.backbone_vs.variables().len() - copies);
            }
        }
    }
}

#[test]
fn dit_difffit_and_lora_merges_load_in_diffusers_with_the_same_output() {
    let dir = oracle_dir();
    for kind in [PeftKind::Difffit, PeftKind::Lora] {
        let p = load("dit", Kind::Float);
        let adapter = Adapter::new(&p.backbone, &p.backbone_vs, &section(kind), 0).unwrap();
        randomize_up(&adapter);
        tch::no_grad(|| {
            for (_, t) in adapter.params() {
                let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
            }
        });
        let i = dit_inputs(&p);
        let tuned =
            tch::no_grad(|| p.predict_batch_with_variance(&p.backbone, &i.cond, &i.x, &i.t));

        // A DiffFit file applies to a fresh base; then everything merges into plain weights.
        let fresh = load("dit", Kind::Float);
        if kind == PeftKind::Difffit {
            let path = dir.join("dit-difffit.safetensors");
            let meta = HashMap::from([(
                pso::peft::export::FORMAT_KEY.to_string(),
                "difffit".to_string(),
            )]);
            tensor_file::write(&path, &adapter.tensors(), &meta).unwrap();
            let file = tensor_file::read(&path).unwrap();
            apply_file(&fresh.backbone, &fresh.backbone_vs, file, &path).unwrap();
            let applied = tch::no_grad(|| {
                fresh.predict_batch_with_variance(&fresh.backbone, &i.cond, &i.x, &i.t)
            });
            assert_close(&applied, &tuned, "DiT DiffFit file");
            merge(&fresh.backbone, &fresh.backbone_vs);
        } else {
            merge(&p.backbone, &p.backbone_vs);
        }
        let merged_vs = if kind == PeftKind::Difffit {
            &fresh.backbone_vs
        } else {
            &p.backbone_vs
        };
        let folder = dir.join(format!("dit-{kind}-merged"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(
            dir.join("dit/transformer/config.json"),
            folder.join("config.json"),
        )
        .unwrap();
        merged_vs
            .save(folder.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        let mut feed = vec![
            ("sample".to_string(), i.x.shallow_clone()),
            ("timestep".to_string(), i.t.shallow_clone()),
        ];
        feed.extend(i.cond.tensors());
        let inputs_file = dir.join("dit-inputs.safetensors");
        tensor_file::write(&inputs_file, &feed, &HashMap::new()).unwrap();
        let out_file = dir.join("dit-out.safetensors");
        common::oracle(
            "peft_oracle.py",
            &[
                "transformer".as_ref(),
                folder.as_os_str(),
                inputs_file.as_os_str(),
                out_file.as_os_str(),
            ],
        );
        let theirs = tensor_file::read(&out_file).unwrap().tensors.remove(0).1;
        assert_close(&theirs, &tuned, &format!("DiT {kind} merged, in diffusers"));
    }
}
