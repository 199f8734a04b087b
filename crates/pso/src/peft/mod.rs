//! Which tensors of the backbone (UNet or DiT) train, and how the frozen reference model of PSO
//! is obtained.
//!
//! - [`lora`]: adapters on linear layers picked by name; the reference is the same model with
//!   the adapters switched off (no second copy).
//! - [`difffit`]: biases, norm affines, conditioning embeddings and per-channel γ on the
//!   transformer blocks' branches; the reference swaps in the original values (γ = 1), a copy of
//!   well under 1% of the model.
//! - `full`: every parameter the forward pass reads, against a frozen copy of the whole backbone.
//!
//! Trainable tensors are named as in the exported files: LoRA `MODULE.lora_A.weight` /
//! `MODULE.lora_B.weight`, DiffFit and full fine-tuning the backbone's own variable names, γ
//! `BLOCK.gamma_attn1` / `gamma_attn2` (UNet only) / `gamma_ff`.

pub mod difffit;
pub mod export;
pub mod lora;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{nn, Kind, Tensor};

use serde::{Deserialize, Serialize};

use crate::problems::{failing, Problems};
use diffusion::models::backbone::Backbone;

/// Errors choosing or attaching trainable tensors.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A LoRA target pattern matched no linear layer.
    #[error(
        "peft.targets: `{pattern}` matches no linear layer of the model's transformer blocks; \
         layers are named like {examples}; fix peft.targets"
    )]
    NoMatch {
        /// The pattern.
        pattern: String,
        /// A few layer names, to show the naming.
        examples: String,
    },
    /// The config asks for something this model cannot do.
    #[error("{0}")]
    Config(String),
    /// A tensor file does not fit the model.
    #[error("{what}: {why}")]
    Tensors {
        /// The file or source.
        what: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// How the reference model is obtained.
enum Reference {
    /// Switch the LoRA adapters off.
    AdaptersOff(Arc<AtomicBool>),
    /// Copy these original values into the trainable tensors (same order), then back.
    Originals(Vec<Tensor>),
    /// A frozen copy of the whole backbone.
    Frozen(Box<(nn::VarStore, Backbone)>),
}

/// The trainable tensors of a backbone and its reference model.
pub struct Adapter {
    kind: &'static str,
    params: Vec<(String, Tensor)>,
    reference: Reference,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("kind", &self.kind)
            .field("params", &self.params.len())
            .finish()
    }
}

/// Which parameters train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftSection {
    /// `lora`, `difffit` or `full`.
    pub kind: PeftKind,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Names of the linear layers that get LoRA adapters: a layer matches a pattern equal to its
    /// dotted name or to a suffix of it after a dot (as peft's `target_modules`).
    pub targets: Vec<String>,
    /// LoRA A initialisation: `gaussian` (std 1/rank, diffusers' training scripts) or `kaiming`
    /// (peft's default); B starts at zero either way.
    pub init: LoraInit,
    /// DiffFit: transformer blocks [first, last) that get γ, counted in module order over the
    /// whole model; unset means every block of a UNet and the first half of a DiT's.
    pub gamma_blocks: Option<[u32; 2]>,
}

impl Default for PeftSection {
    fn default() -> Self {
        PeftSection {
            kind: PeftKind::Lora,
            rank: 32,
            alpha: 32.0,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            init: LoraInit::Gaussian,
            gamma_blocks: None,
        }
    }
}

impl PeftSection {
    /// `peft.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        let [first, last] = self.gamma_blocks.unwrap_or([0, 1]);
        failing([
            (
                (1..=1024).contains(&self.rank),
                "peft.rank",
                format!("{} is not in 1..=1024", self.rank),
            ),
            (
                self.alpha.is_finite() && self.alpha > 0.0,
                "peft.alpha",
                format!("{} is not a positive number", self.alpha),
            ),
            (
                first < last,
                "peft.gamma_blocks",
                format!("[{first}, {last}] is not a range [first, last) with first < last"),
            ),
        ])
    }
}

/// Which parameters train, as a run config's `peft.kind` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftKind {
    /// Low-rank adapters on the targeted linear layers.
    Lora,
    /// Biases, norms, conditioning embeddings and per-block scales γ.
    Difffit,
    /// Every weight of the denoiser.
    Full,
}

impl std::fmt::Display for PeftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeftKind::Lora => "lora",
            PeftKind::Difffit => "difffit",
            PeftKind::Full => "full",
        })
    }
}

/// How LoRA's A starts (B starts at zero either way), as `peft.init` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// N(0, 1/rank²), as diffusers' training scripts.
    Gaussian,
    /// kaiming_uniform_(a = √5), peft's default.
    Kaiming,
}

impl Adapter {
    /// Makes the tensors `section` names trainable on `backbone` (whose variables live in
    /// `vs`); LoRA's initial A is drawn from `seed`.
    pub fn new(
        backbone: &Backbone,
        vs: &nn::VarStore,
        section: &PeftSection,
        seed: u64,
    ) -> Result<Adapter, PeftError> {
        match section.kind {
            PeftKind::Lora => {
                let switch = Arc::new(AtomicBool::new(true));
                let params = lora::attach_new(backbone, section, seed, &switch)?;
                Ok(Adapter {
                    kind: "lora",
                    params,
                    reference: Reference::AdaptersOff(switch),
                })
            }
            PeftKind::Difffit => {
                let params = difffit::select(backbone, vs, section.gamma_blocks)?;
                let originals = tch::no_grad(|| params.iter().map(|(_, t)| t.copy()).collect());
                Ok(Adapter {
                    kind: "difffit",
                    params,
                    reference: Reference::Originals(originals),
                })
            }
            PeftKind::Full => {
                let mut frozen_vs = nn::VarStore::new(vs.device());
                let frozen = backbone.new_like(frozen_vs.root());
                frozen_vs.set_kind(vs.kind());
                frozen_vs.copy(vs)?;
                frozen_vs.freeze();
                let mut params: Vec<(String, Tensor)> = vs
                    .variables()
                    .into_iter()
                    .filter(|(name, _)| backbone.reads(name))
                    .collect();
                params.sort_by(|a, b| a.0.cmp(&b.0));
                for (_, t) in &mut params {
                    let _ = t.set_requires_grad(true);
                }
                Ok(Adapter {
                    kind: "full",
                    params,
                    reference: Reference::Frozen(Box::new((frozen_vs, frozen))),
                })
            }
        }
    }

    /// The trainable tensors, by name (they require grad).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The trainable tensors (sharing storage), for an optimizer.
    pub fn params_shallow(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Runs `f` on the frozen reference model: `policy` with adapters off or original values
    /// swapped in, or the frozen copy. Nothing is recorded for autograd.
    ///
    /// Call it before the policy's forward pass of the same step: swapping values in place
    /// would invalidate a policy graph that is still waiting for its backward pass.
    pub fn reference<T>(&self, policy: &Backbone, f: impl FnOnce(&Backbone) -> T) -> T {
        let _guard = tch::no_grad_guard();
        match &self.reference {
            Reference::AdaptersOff(switch) => {
                switch.store(false, Ordering::Relaxed);
                let out = f(policy);
                switch.store(true, Ordering::Relaxed);
                out
            }
            Reference::Originals(originals) => {
                let current: Vec<Tensor> = self.params.iter().map(|(_, t)| t.copy()).collect();
                for ((_, t), o) in self.params.iter().zip(originals) {
                    t.shallow_clone().copy_(o);
                }
                let out = f(policy);
                for ((_, t), c) in self.params.iter().zip(&current) {
                    t.shallow_clone().copy_(c);
                }
                out
            }
            Reference::Frozen(frozen) => f(&frozen.1),
        }
    }

    /// Copies `values` (by name, any device and float kind) into the trainable tensors: how a
    /// concurrent actor takes the learner's update.
    pub fn set_values(&self, values: &[(String, Tensor)]) -> Result<(), PeftError> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            values.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let _guard = tch::no_grad_guard();
        for (name, t) in &self.params {
            let v = by_name.get(name.as_str()).ok_or_else(|| {
                PeftError::Config(format!(
                    "the update has no tensor `{name}`; actor and learner must use the same \
                     peft section"
                ))
            })?;
            t.shallow_clone().copy_(v);
        }
        Ok(())
    }

    /// Detached fp32 CPU copies of the trainable tensors, by name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.detach()
                        .to_kind(Kind::Float)
                        .to_device(tch::Device::Cpu)
                        .contiguous(),
                )
            })
            .collect()
    }
}
