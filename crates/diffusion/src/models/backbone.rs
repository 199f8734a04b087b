//! The denoiser a pipeline drives, behind one interface: the text-conditioned UNet of SD / SDXL
//! or the class-conditional DiT. Samplers, PEFT, the objectives and the loop see only this.

use tch::{nn, Tensor};

use super::dit::DiTTransformer2DModel;
use super::linear::Linear;
use super::transformer::ScaledBlock;
use super::unet::{AddedCond, UNet2DConditionModel};

/// What a backbone is conditioned on, one row per sample.
#[derive(Debug)]
pub enum Condition {
    /// A UNet's text conditioning: `encoder_hidden_states`, SDXL's added text and time
    /// embeddings, LCM's guidance embedding.
    Text {
        /// Text embeddings [B, tokens, dim].
        embeds: Tensor,
        /// SDXL's pooled text embeddings and time ids.
        added: Option<AddedCond>,
        /// LCM's `timestep_cond`.
        timestep_cond: Option<Tensor>,
    },
    /// DiT's class ids [B] (i64; the null class is the number of classes).
    Classes(Tensor),
}

impl Condition {
    /// The batch rows.
    pub fn rows(&self) -> i64 {
        match self {
            Condition::Text { embeds, .. } => embeds.size()[0],
            Condition::Classes(labels) => labels.size()[0],
        }
    }
}

/// A denoiser: UNet or DiT.
#[derive(Debug)]
pub enum Backbone {
    /// diffusers' `UNet2DConditionModel`.
    UNet(Box<UNet2DConditionModel>),
    /// diffusers' `DiTTransformer2DModel`.
    DiT(Box<DiTTransformer2DModel>),
}

impl Backbone {
    /// The component folder of a diffusers pipeline that holds it.
    pub fn folder(&self) -> &'static str {
        match self {
            Backbone::UNet(_) => "unet",
            Backbone::DiT(_) => "transformer",
        }
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> i64 {
        match self {
            Backbone::UNet(u) => u.config.in_channels,
            Backbone::DiT(d) => d.config.in_channels,
        }
    }

    /// Whether the output carries learned-variance channels after the noise prediction (DiT
    /// with learned sigma).
    pub fn learns_variance(&self) -> bool {
        match self {
            Backbone::UNet(_) => false,
            Backbone::DiT(d) => d.config.out_channels() == 2 * d.config.in_channels,
        }
    }

    /// Whether the forward pass reads the variable `name` (a DiT sharing block 0's embedding
    /// never reads the other blocks' copies, so they neither train nor get gradients).
    pub fn reads(&self, name: &str) -> bool {
        match self {
            Backbone::UNet(_) => true,
            Backbone::DiT(d) => d.reads(name),
        }
    }

    /// The whole output [B, C_out, h, w] for latents `x` at `timestep` (a scalar or [B]).
    ///
    /// Panics when `cond` is of the other backbone's kind: pipelines build the one that fits.
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, cond: &Condition) -> Tensor {
        match (self, cond) {
            (
                Backbone::UNet(u),
                Condition::Text {
                    embeds,
                    added,
                    timestep_cond,
                },
            ) => u.forward(x, timestep, embeds, added.as_ref(), timestep_cond.as_ref()),
            (Backbone::DiT(d), Condition::Classes(labels)) => d.forward(x, timestep, labels),
            _ => panic!("a UNet takes text conditioning and a DiT class labels"),
        }
    }

    /// The same architecture with fresh parameters under `vs` (a frozen copy's skeleton).
    pub fn new_like(&self, vs: nn::Path) -> Backbone {
        match self {
            Backbone::UNet(u) => Backbone::UNet(Box::new(UNet2DConditionModel::new(vs, &u.config))),
            Backbone::DiT(d) => Backbone::DiT(Box::new(d.clone_layout(vs))),
        }
    }

    /// Every linear layer LoRA may target (the attention and feed-forward layers of the
    /// transformer blocks), in module order.
    pub fn lora_candidates(&self) -> Vec<&Linear> {
        match self {
            Backbone::UNet(u) => u
                .transformers()
                .into_iter()
                .flat_map(|t| t.linears())
                .collect(),
            Backbone::DiT(d) => d.blocks().iter().flat_map(|b| b.linears()).collect(),
        }
    }

    /// Every transformer block, in module order (the index `peft.gamma_blocks` counts).
    pub fn scaled_blocks(&self) -> Vec<&dyn ScaledBlock> {
        match self {
            Backbone::UNet(u) => u
                .transformers()
                .into_iter()
                .flat_map(|t| t.blocks())
                .map(|b| b as &dyn ScaledBlock)
                .collect(),
            Backbone::DiT(d) => d.blocks().iter().map(|b| b as &dyn ScaledBlock).collect(),
        }
    }

    /// Folds every attached LoRA adapter and γ into the base weights.
    pub fn merge_adapters(&self) {
        for layer in self.lora_candidates() {
            layer.merge_lora();
        }
        for block in self.scaled_blocks() {
            block.merge_branch_scales();
        }
    }
}
