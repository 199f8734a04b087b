//! The denoiser a pipeline drives, behind one interface: the text-conditioned UNet of SD / SDXL,
//! the class-conditional DiT, or the flow-matching transformers of SD3 / SD3.5 (MMDiT), FLUX and
//! Z-Image.
//! Samplers, PEFT, the objectives and the loop see only this, and always latents
//! [B, C, h, w] (FLUX's 2 × 2 packing happens inside), and every flow model as predicting the
//! velocity at the scheduler's timestep σ·1000 (Z-Image's own convention is converted inside).

use tch::{nn, Tensor};

use crate::pipeline::flux_latents;

use super::dit::DiTTransformer2DModel;
use super::flux::FluxTransformer2DModel;
use super::linear::Linear;
use super::sd3::SD3Transformer2DModel;
use super::transformer::ScaledBlock;
use super::unet::{AddedCond, UNet2DConditionModel};
use super::z_image::ZImageTransformer2DModel;

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
    /// A flow transformer's prompt: the token sequence both streams attend over and the pooled
    /// embedding added to the timestep's.
    Joint {
        /// Prompt tokens [B, L, joint_attention_dim] (SD3: CLIP-L/G and T5; FLUX: T5).
        context: Tensor,
        /// Pooled text embedding [B, pooled_projection_dim].
        pooled: Tensor,
        /// A guidance-distilled FLUX model's embedded guidance scale [B].
        guidance: Option<Tensor>,
    },
    /// Z-Image's prompt: each row's own number of Qwen3 tokens, batched to the longest.
    Captions {
        /// Prompt tokens [B, L, cap_feat_dim], zeros after each row's length.
        tokens: Tensor,
        /// The real tokens of each row.
        lengths: Vec<i64>,
    },
}

impl Condition {
    /// The batch rows.
    pub fn rows(&self) -> i64 {
        match self {
            Condition::Text { embeds, .. } => embeds.size()[0],
            Condition::Classes(labels) => labels.size()[0],
            Condition::Joint { context, .. } => context.size()[0],
            Condition::Captions { tokens, .. } => tokens.size()[0],
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
    /// diffusers' `SD3Transformer2DModel`.
    SD3(Box<SD3Transformer2DModel>),
    /// diffusers' `FluxTransformer2DModel`.
    Flux(Box<FluxTransformer2DModel>),
    /// diffusers' `ZImageTransformer2DModel`.
    ZImage(Box<ZImageTransformer2DModel>),
}

impl Backbone {
    /// The component folder of a diffusers pipeline that holds it.
    pub fn folder(&self) -> &'static str {
        match self {
            Backbone::UNet(_) => "unet",
            Backbone::DiT(_) | Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_) => {
                "transformer"
            }
        }
    }

    /// Whether it is a rectified-flow model (predicts a velocity, samples with flow matching).
    pub fn is_flow(&self) -> bool {
        matches!(
            self,
            Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_)
        )
    }

    /// Refuses a latent of `height` × `width` the model cannot take, saying why.
    pub fn check_latent_size(&self, height: i64, width: i64) -> Result<(), String> {
        match self {
            Backbone::SD3(m) => m.check_latent_size(height, width),
            Backbone::ZImage(m) => m.check_latent_size(height, width),
            Backbone::Flux(_) if height % 2 != 0 || width % 2 != 0 => Err(format!(
                "a {height}x{width} latent: FLUX packs 2 × 2 patches, so both sides must be even"
            )),
            _ => Ok(()),
        }
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> i64 {
        match self {
            Backbone::UNet(u) => u.config.in_channels,
            Backbone::DiT(d) => d.config.in_channels,
            Backbone::SD3(m) => m.config().in_channels,
            Backbone::Flux(m) => m.config().in_channels / 4,
            Backbone::ZImage(m) => m.config().in_channels,
        }
    }

    /// Whether the output carries learned-variance channels after the noise prediction (DiT
    /// with learned sigma).
    pub fn learns_variance(&self) -> bool {
        match self {
            Backbone::UNet(_) | Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_) => false,
            Backbone::DiT(d) => d.config.out_channels() == 2 * d.config.in_channels,
        }
    }

    /// Whether the forward pass reads the variable `name` (a DiT sharing block 0's embedding
    /// never reads the other blocks' copies, so they neither train nor get gradients).
    pub fn reads(&self, name: &str) -> bool {
        match self {
            Backbone::UNet(_) | Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_) => true,
            Backbone::DiT(d) => d.reads(name),
        }
    }

    /// The whole output [B, C_out, h, w] for latents `x` at `timestep` (a scalar or [B]; for
    /// the flow models the scheduler's σ·1000).
    ///
    /// Panics when `cond` is of another backbone's kind, or the latent size fails
    /// [`Backbone::check_latent_size`]: pipelines build and check what fits.
    pub fn forward(&self, x: &Tensor, timestep: &Tensor, cond: &Condition) -> Tensor {
        let rows = x.size()[0];
        let per_row = || {
            if timestep.dim() == 0 {
                timestep.expand([rows], false)
            } else {
                timestep.shallow_clone()
            }
        };
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
            (
                Backbone::SD3(m),
                Condition::Joint {
                    context, pooled, ..
                },
            ) => m
                .forward(x, context, pooled, &per_row())
                .unwrap_or_else(|e| panic!("SD3 transformer: {e}")),
            (
                Backbone::Flux(m),
                Condition::Joint {
                    context,
                    pooled,
                    guidance,
                },
            ) => {
                let size = x.size();
                let (height, width) = (size[2], size[3]);
                let device = x.device();
                let run = || -> Result<Tensor, String> {
                    let tokens = flux_latents::pack(x)?;
                    let img_ids = flux_latents::image_ids(height / 2, width / 2, device);
                    let txt_ids = flux_latents::text_ids(context.size()[1], device);
                    let sigma = per_row().to_kind(tch::Kind::Float) / 1000.0;
                    let out = m.forward(
                        &tokens,
                        context,
                        pooled,
                        &sigma,
                        &img_ids,
                        &txt_ids,
                        guidance.as_ref(),
                    )?;
                    flux_latents::unpack(&out, height, width)
                };
                run().unwrap_or_else(|e| panic!("FLUX transformer: {e}"))
            }
            (Backbone::ZImage(m), Condition::Captions { tokens, lengths }) => {
                // Z-Image's t runs from 0 (noise) to 1 and its output is the negated velocity.
                let t = (1000.0 - per_row().to_kind(tch::Kind::Float)) / 1000.0;
                -m.forward(x, &t, tokens, lengths)
                    .unwrap_or_else(|e| panic!("Z-Image transformer: {e}"))
            }
            _ => panic!(
                "a UNet takes text conditioning, a DiT class labels, SD3 / FLUX joint prompt \
                 conditioning, and Z-Image its captions"
            ),
        }
    }

    /// The same architecture with fresh parameters under `vs` (a frozen copy's skeleton).
    pub fn new_like(&self, vs: nn::Path) -> Backbone {
        match self {
            Backbone::UNet(u) => Backbone::UNet(Box::new(UNet2DConditionModel::new(vs, &u.config))),
            Backbone::DiT(d) => Backbone::DiT(Box::new(d.clone_layout(vs))),
            Backbone::SD3(m) => Backbone::SD3(Box::new(SD3Transformer2DModel::new(vs, m.config()))),
            Backbone::Flux(m) => {
                Backbone::Flux(Box::new(FluxTransformer2DModel::new(vs, m.config())))
            }
            Backbone::ZImage(m) => {
                Backbone::ZImage(Box::new(ZImageTransformer2DModel::new(vs, m.config())))
            }
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
            Backbone::SD3(m) => m.lora_candidates(),
            Backbone::Flux(m) => m.lora_candidates(),
            Backbone::ZImage(m) => m.lora_candidates(),
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
            Backbone::SD3(m) => m.scaled_blocks(),
            Backbone::Flux(m) => m.scaled_blocks(),
            Backbone::ZImage(m) => m.scaled_blocks(),
        }
    }

    /// Turns activation recomputation per transformer block on or off (SD3 / FLUX / Z-Image; see
    /// [`crate::models::recompute`]); an error naming the backbone for the others.
    pub fn set_recompute(&self, on: bool) -> Result<(), String> {
        match self {
            Backbone::SD3(m) => m.set_recompute(on),
            Backbone::Flux(m) => m.set_recompute(on),
            Backbone::ZImage(m) => m.set_recompute(on),
            Backbone::UNet(_) | Backbone::DiT(_) if on => {
                return Err(
                    "activation recomputation is implemented for the SD3, FLUX and Z-Image \
                     transformers, not for UNets or DiT"
                        .into(),
                )
            }
            Backbone::UNet(_) | Backbone::DiT(_) => {}
        }
        Ok(())
    }

    /// Completes the backward of every forward pass that kept only block inputs: call after
    /// each loss's backward (nothing to do without recomputation).
    pub fn finish_recomputation(&self) {
        match self {
            Backbone::SD3(m) => m.finish_recomputation(),
            Backbone::Flux(m) => m.finish_recomputation(),
            Backbone::ZImage(m) => m.finish_recomputation(),
            Backbone::UNet(_) | Backbone::DiT(_) => {}
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
