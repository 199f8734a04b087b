//! Diffusers' `SD3Transformer2DModel` (models/transformers/transformer_sd3.py): the MMDiT of
//! Stable Diffusion 3 / 3.5, Large-Turbo included. Latent patches and the prompt's T5 + CLIP
//! tokens run as two streams through `JointTransformerBlock`s (models/attention.py) that attend
//! jointly over both (`JointAttnProcessor2_0`), each stream modulated by adaLN-Zero from the
//! timestep plus the pooled CLIP embedding; SD3.5 adds RMS-normed queries and keys and, in its
//! first blocks, a second self-attention over the image stream alone (`SD35AdaLayerNormZeroX`).
//! The last block updates only the image stream (`context_pre_only`).

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::attention::sdpa;
use super::dit::{plain_layer_norm, FeedForward};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::linear::Linear;
use super::recompute::{self, Recompute};
use super::resnet::conv;
use super::transformer::{BranchScales, GammaSlot, ScaledBlock};
use hf::load::{load_model, load_model_with_weights, LoadError};
use hf::t5::RmsNorm;

/// `transformer/config.json` of an SD3 / SD3.5 pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SD3Transformer2DConfig {
    /// Latent size the positional embedding's base grid is laid out for.
    pub sample_size: i64,
    /// Side of the square patches that become tokens.
    pub patch_size: i64,
    /// Latent channels in (16).
    pub in_channels: i64,
    /// Joint transformer blocks.
    pub num_layers: i64,
    /// Channels per head.
    pub attention_head_dim: i64,
    /// Attention heads; the token width is heads × head dim.
    pub num_attention_heads: i64,
    /// Width of the prompt tokens (T5 and CLIP hidden states, padded to one width).
    pub joint_attention_dim: i64,
    /// Width the prompt tokens are projected to (the token width).
    pub caption_projection_dim: i64,
    /// Width of the pooled CLIP-L + CLIP-G embedding.
    pub pooled_projection_dim: i64,
    /// Latent channels out.
    pub out_channels: Option<i64>,
    /// Side of the stored positional-embedding grid, cropped to the latent's.
    pub pos_embed_max_size: i64,
    /// Blocks with the second, image-only self-attention (SD3.5 Medium).
    pub dual_attention_layers: Vec<i64>,
    /// `rms_norm` on queries and keys (SD3.5), or none.
    pub qk_norm: Option<String>,
}

impl Default for SD3Transformer2DConfig {
    fn default() -> Self {
        SD3Transformer2DConfig {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: 96,
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }
}

impl SD3Transformer2DConfig {
    /// Width of the tokens.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of the prediction.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// What this implementation cannot build, by key.
    fn check(&self) -> Result<(), String> {
        if let Some(norm) = &self.qk_norm {
            if norm != "rms_norm" {
                return Err(format!(
                    "qk_norm {norm:?}: SD3 / SD3.5 use \"rms_norm\" or none (null)"
                ));
            }
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(format!(
                "caption_projection_dim {} must equal num_attention_heads × attention_head_dim \
                 = {} (the two streams attend jointly)",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        let sizes = [
            ("num_layers", self.num_layers),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
            ("out_channels", self.out_channels()),
        ];
        if let Some((key, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{key} {v}: it must be at least 1"));
        }
        if let Some(i) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i < 0 || i >= self.num_layers)
        {
            return Err(format!(
                "dual_attention_layers names block {i}, but there are {} blocks",
                self.num_layers
            ));
        }
        Ok(())
    }
}

/// `Attention` with `JointAttnProcessor2_0`: the image tokens' to_q/to_k/to_v and, when the
/// block has a prompt stream, add_q/add_k/add_v_proj for its tokens; one softmax over both,
/// split back, to_out.0 for the image part and to_add_out for the prompt part (not in the last
/// block).
#[derive(Debug)]
struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    added: Option<AddedProjections>,
    heads: i64,
}

/// The prompt stream's projections of a joint attention.
#[derive(Debug)]
struct AddedProjections {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_add_out: Option<Linear>,
    norm_added_q: Option<RmsNorm>,
    norm_added_k: Option<RmsNorm>,
}

impl JointAttention {
    /// `joint`: with a prompt stream; `context_pre_only`: its output is not used (no
    /// to_add_out).
    fn new(
        vs: nn::Path,
        cfg: &SD3Transformer2DConfig,
        joint: bool,
        context_pre_only: bool,
    ) -> Self {
        let (dim, head) = (cfg.inner_dim(), cfg.attention_head_dim);
        let lin = |name: &str| Linear::new(&vs / name, dim, dim, true);
        let norm = |name: &str| {
            cfg.qk_norm
                .is_some()
                .then(|| RmsNorm::new(&vs / name, head, 1e-6))
        };
        JointAttention {
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: Linear::new(&vs / "to_out" / 0, dim, dim, true),
            norm_q: norm("norm_q"),
            norm_k: norm("norm_k"),
            added: joint.then(|| AddedProjections {
                add_q_proj: lin("add_q_proj"),
                add_k_proj: lin("add_k_proj"),
                add_v_proj: lin("add_v_proj"),
                to_add_out: (!context_pre_only).then(|| lin("to_add_out")),
                norm_added_q: norm("norm_added_q"),
                norm_added_k: norm("norm_added_k"),
            }),
            heads: cfg.num_attention_heads,
        }
    }

    /// The projections in module order: to_q, to_k, to_v, to_out.0, then the prompt stream's.
    fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.to_q, &self.to_k, &self.to_v, &self.to_out];
        if let Some(a) = &self.added {
            out.extend([&a.add_q_proj, &a.add_k_proj, &a.add_v_proj]);
            out.extend(a.to_add_out.as_ref());
        }
        out
    }

    /// The attention's output for the image tokens and (joint, not pre-only) the prompt tokens.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let b = x.size()[0];
        let split = |t: Tensor| {
            t.view([b, -1, self.heads, t.size()[2] / self.heads])
                .transpose(1, 2)
        };
        let normed = |t: Tensor, norm: &Option<RmsNorm>| match norm {
            Some(n) => n.forward(&t),
            None => t,
        };
        let mut q = normed(split(self.to_q.forward(x)), &self.norm_q);
        let mut k = normed(split(self.to_k.forward(x)), &self.norm_k);
        let mut v = split(self.to_v.forward(x));
        let tokens = x.size()[1];
        if let (Some(a), Some(c)) = (&self.added, context) {
            let cq = normed(split(a.add_q_proj.forward(c)), &a.norm_added_q);
            let ck = normed(split(a.add_k_proj.forward(c)), &a.norm_added_k);
            let cv = split(a.add_v_proj.forward(c));
            q = Tensor::cat(&[q, cq], 2);
            k = Tensor::cat(&[k, ck], 2);
            v = Tensor::cat(&[v, cv], 2);
        }
        let attended = sdpa(&q, &k, &v);
        let all = attended
            .transpose(1, 2)
            .reshape([b, -1, q.size()[1] * q.size()[3]]);
        let image = self.to_out.forward(&all.narrow(1, 0, tokens));
        let prompt = match (&self.added, context) {
            (Some(a), Some(_)) => a.to_add_out.as_ref().map(|out| {
                let rest = all.size()[1] - tokens;
                out.forward(&all.narrow(1, tokens, rest))
            }),
            _ => None,
        };
        (image, prompt)
    }
}

/// adaLN-Zero without its own embedding: SiLU, one linear layer to `chunks` modulations of the
/// conditioning embedding (6: `AdaLayerNormZero`; 9: SD3.5's `SD35AdaLayerNormZeroX`).
#[derive(Debug)]
pub(super) struct AdaNormZero {
    linear: nn::Linear,
    norm: nn::LayerNorm,
    chunks: i64,
}

impl AdaNormZero {
    pub(super) fn new(vs: nn::Path, dim: i64, chunks: i64) -> Self {
        AdaNormZero {
            linear: nn::linear(&vs / "linear", dim, chunks * dim, Default::default()),
            norm: plain_layer_norm(&vs / "norm", dim, 1e-6),
            chunks,
        }
    }

    /// The normed x and the modulations (shift, scale, gate, …) each [B, dim].
    pub(super) fn forward(&self, x: &Tensor, emb: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mods = self.linear.forward(&emb.silu()).chunk(self.chunks, 1);
        (self.norm.forward(x), mods)
    }
}

/// `AdaLayerNormContinuous`: LayerNorm modulated by (scale, shift) from the embedding.
#[derive(Debug)]
pub(super) struct AdaNormContinuous {
    linear: nn::Linear,
    norm: nn::LayerNorm,
}

impl AdaNormContinuous {
    pub(super) fn new(vs: nn::Path, dim: i64) -> Self {
        AdaNormContinuous {
            linear: nn::linear(&vs / "linear", dim, 2 * dim, Default::default()),
            norm: plain_layer_norm(&vs / "norm", dim, 1e-6),
        }
    }

    pub(super) fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let mods = self
            .linear
            .forward(&emb.silu().to_kind(x.kind()))
            .chunk(2, 1);
        modulate(&self.norm.forward(x), &mods[1], &mods[0])
    }
}

/// x · (1 + scale) + shift, the modulations broadcast over the tokens.
pub(super) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// `JointTransformerBlock`: both streams adaLN-modulated into one joint attention, then each
/// through its own gated feed-forward (the last block: the image stream only).
#[derive(Debug)]
struct JointTransformerBlock {
    name: String,
    dim: i64,
    /// DiffFit's γ of the image stream's attention and feed-forward branches.
    gamma: GammaSlot,
    norm1: AdaNormZero,
    norm1_context: ContextNorm,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    norm2: nn::LayerNorm,
    ff: FeedForward,
    context_ff: Option<(nn::LayerNorm, FeedForward)>,
}

/// The prompt stream's norm: adaLN-Zero, or (last block) `AdaLayerNormContinuous`.
#[derive(Debug)]
enum ContextNorm {
    Zero(AdaNormZero),
    Continuous(AdaNormContinuous),
}

impl JointTransformerBlock {
    fn new(vs: nn::Path, cfg: &SD3Transformer2DConfig, index: i64) -> Self {
        let dim = cfg.inner_dim();
        let last = index == cfg.num_layers - 1;
        let dual = cfg.dual_attention_layers.contains(&index);
        JointTransformerBlock {
            name: vs.components().collect::<Vec<_>>().join("."),
            dim,
            gamma: GammaSlot::default(),
            norm1: AdaNormZero::new(&vs / "norm1", dim, if dual { 9 } else { 6 }),
            norm1_context: if last {
                ContextNorm::Continuous(AdaNormContinuous::new(&vs / "norm1_context", dim))
            } else {
                ContextNorm::Zero(AdaNormZero::new(&vs / "norm1_context", dim, 6))
            },
            attn: JointAttention::new(&vs / "attn", cfg, true, last),
            attn2: dual.then(|| JointAttention::new(&vs / "attn2", cfg, false, false)),
            norm2: plain_layer_norm(&vs / "norm2", dim, 1e-6),
            ff: FeedForward::new(&vs / "ff", dim, "gelu-approximate"),
            context_ff: (!last).then(|| {
                (
                    plain_layer_norm(&vs / "norm2_context", dim, 1e-6),
                    FeedForward::new(&vs / "ff_context", dim, "gelu-approximate"),
                )
            }),
        }
    }

    /// Every linear layer LoRA may target, in module order: attn, attn2, ff, ff_context.
    fn linears(&self) -> Vec<&Linear> {
        let mut out = self.attn.linears();
        if let Some(a) = &self.attn2 {
            out.extend(a.linears());
        }
        out.extend(self.ff.linears());
        if let Some((_, ff)) = &self.context_ff {
            out.extend(ff.linears());
        }
        out
    }

    /// (image tokens, prompt tokens — None after the last block).
    fn forward(&self, x: &Tensor, context: &Tensor, temb: &Tensor) -> (Tensor, Option<Tensor>) {
        let gamma = self.gamma.get();
        // 1. Modulations: shift, scale, gate of attention; shift, scale, gate of the MLP
        //    (dual: shift, scale, gate of the second attention).
        let (normed, m) = self.norm1.forward(x, temb);
        let attn_in = modulate(&normed, &m[0], &m[1]);
        let (context_in, cm) = match &self.norm1_context {
            ContextNorm::Zero(n) => {
                let (c, cm) = n.forward(context, temb);
                (modulate(&c, &cm[0], &cm[1]), Some(cm))
            }
            ContextNorm::Continuous(n) => (n.forward(context, temb), None),
        };
        // 2. Joint attention, gated into the image stream.
        let (attn, context_attn) = self.attn.forward(&attn_in, Some(&context_in));
        let attn = BranchScales::apply(&gamma, attn, |g| Some(&g.attn1));
        let mut x = x + m[2].unsqueeze(1) * attn;
        // 3. SD3.5's second, image-only attention.
        if let Some(attn2) = &self.attn2 {
            let (out, _) = attn2.forward(&modulate(&normed, &m[6], &m[7]), None);
            x = &x + m[8].unsqueeze(1) * out;
        }
        // 4. The image stream's feed-forward.
        let ff_in = modulate(&self.norm2.forward(&x), &m[3], &m[4]);
        let ff = BranchScales::apply(&gamma, self.ff.forward(&ff_in), |g| Some(&g.ff));
        x = &x + m[5].unsqueeze(1) * ff;
        // 5. The prompt stream's residuals (not after the last block).
        let context = match (&self.context_ff, cm, context_attn) {
            (Some((norm, ff)), Some(cm), Some(attn)) => {
                let c = context + cm[2].unsqueeze(1) * attn;
                let ff_in = modulate(&norm.forward(&c), &cm[3], &cm[4]);
                Some(&c + cm[5].unsqueeze(1) * ff.forward(&ff_in))
            }
            _ => None,
        };
        (x, context)
    }
}

/// DiffFit scales the image stream's joint-attention and feed-forward branches (the prompt
/// stream and SD3.5's second attention keep theirs unscaled).
impl ScaledBlock for JointTransformerBlock {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> i64 {
        self.dim
    }

    fn has_cross_attention(&self) -> bool {
        false
    }

    fn device(&self) -> Device {
        self.attn.to_out.weight().device()
    }

    fn gamma_slot(&self) -> &GammaSlot {
        &self.gamma
    }

    fn merge_branch_scales(&self) {
        if let Some(g) = self.gamma.take() {
            self.attn.to_out.scale_outputs(&g.attn1);
            self.ff.linears()[1].scale_outputs(&g.ff);
        }
    }
}

/// `CombinedTimestepTextProjEmbeddings`: the timestep's sinusoidal embedding through an MLP plus
/// the pooled text embedding through `PixArtAlphaTextProjection` (linear, SiLU, linear); with a
/// guidance embedder (FLUX.1-dev's `CombinedTimestepGuidanceTextProjEmbeddings`) the embedded
/// guidance scale is added too.
#[derive(Debug)]
pub(super) struct TimeTextEmbed {
    time_proj: Timesteps,
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    text_linear_1: nn::Linear,
    text_linear_2: nn::Linear,
}

impl TimeTextEmbed {
    pub(super) fn new(vs: nn::Path, dim: i64, pooled_dim: i64, guidance: bool) -> Self {
        TimeTextEmbed {
            time_proj: Timesteps {
                dim: 256,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
            },
            timestep_embedder: TimestepEmbedding::new(&vs / "timestep_embedder", 256, dim, None),
            guidance_embedder: guidance
                .then(|| TimestepEmbedding::new(&vs / "guidance_embedder", 256, dim, None)),
            text_linear_1: nn::linear(
                &vs / "text_embedder" / "linear_1",
                pooled_dim,
                dim,
                Default::default(),
            ),
            text_linear_2: nn::linear(
                &vs / "text_embedder" / "linear_2",
                dim,
                dim,
                Default::default(),
            ),
        }
    }

    /// The conditioning embedding [B, dim]; `guidance` only with a guidance embedder.
    pub(super) fn forward(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Tensor {
        let embed = |embedder: &TimestepEmbedding, t: &Tensor| {
            embedder.forward(&self.time_proj.forward(t).to_kind(pooled.kind()), None)
        };
        let mut t = embed(&self.timestep_embedder, timestep);
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            t += embed(embedder, g);
        }
        let text = self
            .text_linear_2
            .forward(&self.text_linear_1.forward(pooled).silu());
        t + text
    }
}

/// The MMDiT of SD3 / SD3.5.
#[derive(Debug)]
pub struct SD3Transformer2DModel {
    config: SD3Transformer2DConfig,
    patch_proj: nn::Conv2D,
    /// The stored 2-D sin-cos grid [1, max · max, dim] (`pos_embed.pos_embed`).
    pos_embed: Tensor,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointTransformerBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    recompute: Recompute<Sd3Pass>,
}

/// A forward pass kept for recomputation: the input stage's outputs (still in its graph), each
/// joint block's inputs, and the last block's output leaf.
#[derive(Debug)]
struct Sd3Pass {
    x: Tensor,
    c: Tensor,
    temb: Tensor,
    /// The output stage's leaf copy of `temb`.
    temb_post: Tensor,
    inputs: Vec<(Tensor, Tensor)>,
    out: Tensor,
}

impl SD3Transformer2DModel {
    /// Lays out the parameters under `vs` with diffusers' names.
    pub fn new(vs: nn::Path, config: &SD3Transformer2DConfig) -> Self {
        let (dim, p) = (config.inner_dim(), config.patch_size);
        let max = config.pos_embed_max_size;
        SD3Transformer2DModel {
            config: config.clone(),
            patch_proj: conv(&vs / "pos_embed" / "proj", config.in_channels, dim, p, p, 0),
            pos_embed: (&vs / "pos_embed").zeros_no_train("pos_embed", &[1, max * max, dim]),
            time_text_embed: TimeTextEmbed::new(
                &vs / "time_text_embed",
                dim,
                config.pooled_projection_dim,
                false,
            ),
            context_embedder: Linear::new(
                &vs / "context_embedder",
                config.joint_attention_dim,
                config.caption_projection_dim,
                true,
            ),
            blocks: (0..config.num_layers)
                .map(|i| JointTransformerBlock::new(&vs / "transformer_blocks" / i, config, i))
                .collect(),
            norm_out: AdaNormContinuous::new(&vs / "norm_out", dim),
            proj_out: Linear::new(&vs / "proj_out", dim, p * p * config.out_channels(), true),
            recompute: Recompute::default(),
        }
    }

    /// Loads a `transformer/` folder (config.json + safetensors) in `kind` on `device`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        load_model(
            dir,
            device,
            kind,
            variant,
            SD3Transformer2DConfig::check,
            SD3Transformer2DModel::new,
        )
    }

    /// Loads a `transformer/` folder's config with the weights of `files` instead of its own.
    pub fn load_with_weights(
        dir: &Path,
        files: &[std::path::PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        load_model_with_weights(
            dir,
            files,
            device,
            kind,
            SD3Transformer2DConfig::check,
            SD3Transformer2DModel::new,
        )
    }

    /// The config.
    pub fn config(&self) -> &SD3Transformer2DConfig {
        &self.config
    }

    /// Every linear layer of the joint blocks LoRA may target, in module order.
    pub fn lora_candidates(&self) -> Vec<&Linear> {
        self.blocks.iter().flat_map(|b| b.linears()).collect()
    }

    /// The joint blocks, in module order, as DiffFit scales them.
    pub fn scaled_blocks(&self) -> Vec<&dyn ScaledBlock> {
        self.blocks.iter().map(|b| b as &dyn ScaledBlock).collect()
    }

    /// Turns activation recomputation per joint block on or off (see
    /// [`crate::models::recompute`]); with it on, a forward pass in grad mode must be followed,
    /// after its loss's backward, by [`SD3Transformer2DModel::finish_recomputation`].
    pub fn set_recompute(&self, on: bool) {
        self.recompute.set(on);
    }

    /// The image tokens after the joint blocks.
    fn blocks_forward(&self, mut x: Tensor, mut c: Tensor, temb: &Tensor) -> Tensor {
        for block in &self.blocks {
            let (next, context) = block.forward(&x, &c, temb);
            x = next;
            if let Some(context) = context {
                c = context;
            }
        }
        x
    }

    /// [`Self::blocks_forward`] without autograd, keeping each block's inputs; returns the
    /// output as a leaf the loss's backward stops at, and a leaf copy of `temb` for the output
    /// stage (so that the input stage's graph is walked once, by the recomputation).
    fn blocks_kept_for_recompute(&self, x: Tensor, c: Tensor, temb: Tensor) -> (Tensor, Tensor) {
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let out = tch::no_grad(|| {
            let (mut x, mut c, temb) = (x.detach(), c.detach(), temb.detach());
            for block in &self.blocks {
                inputs.push((x.shallow_clone(), c.shallow_clone()));
                let (next, context) = block.forward(&x, &c, &temb);
                x = next;
                if let Some(context) = context {
                    c = context;
                }
            }
            x
        });
        let (out, temb_post) = (recompute::leaf(&out), recompute::leaf(&temb));
        self.recompute.push(
            Sd3Pass {
                x,
                c,
                temb,
                temb_post: temb_post.shallow_clone(),
                inputs,
                out: out.shallow_clone(),
            },
            |pass| &pass.out,
        );
        (out, temb_post)
    }

    /// Runs the backward of the joint blocks of every pass kept since the last call, by
    /// recomputing them, after the loss's backward has reached their outputs.
    pub fn finish_recomputation(&self) {
        for pass in self.recompute.take() {
            let Some(mut gx) = recompute::grad_of(&pass.out) else {
                continue;
            };
            let mut gc: Option<Tensor> = None;
            let temb = recompute::leaf(&pass.temb);
            for (block, (x, c)) in self.blocks.iter().zip(&pass.inputs).rev() {
                let (x, c) = (recompute::leaf(x), recompute::leaf(c));
                let (x_out, c_out) = block.forward(&x, &c, &temb);
                let mut outputs = vec![(&x_out, Some(&gx))];
                if let Some(c_out) = &c_out {
                    outputs.push((c_out, gc.as_ref()));
                }
                recompute::backward(&outputs);
                gx = recompute::grad_of(&x).expect("a block's output depends on its input");
                gc = recompute::grad_of(&c);
            }
            let g_temb = recompute::summed_grad(&temb, &pass.temb_post);
            recompute::backward(&[
                (&pass.x, Some(&gx)),
                (&pass.c, gc.as_ref()),
                (&pass.temb, g_temb.as_ref()),
            ]);
        }
    }

    /// Refuses a latent of `height` × `width` the patches and stored positions cannot cover.
    pub fn check_latent_size(&self, height: i64, width: i64) -> Result<(), String> {
        let (p, max) = (self.config.patch_size, self.config.pos_embed_max_size);
        if height % p != 0 || width % p != 0 || height > max * p || width > max * p {
            return Err(format!(
                "a {height}x{width} latent: SD3 needs sides that are multiples of patch_size {p} \
                 and at most pos_embed_max_size × patch_size = {}",
                max * p
            ));
        }
        Ok(())
    }

    /// The positional embedding of an h × w token grid: the centre crop of the stored grid
    /// (`PatchEmbed.cropped_pos_embed`).
    fn cropped_pos_embed(&self, h: i64, w: i64) -> Tensor {
        let max = self.config.pos_embed_max_size;
        let top = (max - h) / 2;
        let left = (max - w) / 2;
        self.pos_embed
            .view([1, max, max, -1])
            .narrow(1, top, h)
            .narrow(2, left, w)
            .reshape([1, h * w, -1])
    }

    /// The velocity for `latents` [B, C, H, W] at `timestep` [B] (σ · 1000) given the prompt
    /// tokens `context` [B, L, joint_attention_dim] and the pooled embedding `pooled`
    /// [B, pooled_projection_dim].
    pub fn forward(
        &self,
        latents: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor, String> {
        let size = latents.size();
        let (b, height, width) = (size[0], size[2], size[3]);
        self.check_latent_size(height, width)?;
        let p = self.config.patch_size;
        let (h, w) = (height / p, width / p);
        // 1. Patches to tokens, plus the cropped positions.
        let tokens = self
            .patch_proj
            .forward(latents)
            .flatten(2, 3)
            .transpose(1, 2);
        let mut x = tokens + self.cropped_pos_embed(h, w).to_kind(latents.kind());
        // 2. Conditioning: timestep + pooled text; prompt tokens to the token width.
        let temb = self.time_text_embed.forward(timestep, None, pooled);
        let c = self.context_embedder.forward(context);
        // 3. The joint blocks (only their inputs kept when recomputing).
        let temb = if self.recompute.applies() {
            let (out, temb_post) = self.blocks_kept_for_recompute(x, c, temb);
            x = out;
            temb_post
        } else {
            x = self.blocks_forward(x, c, &temb);
            temb
        };
        // 4. Modulated output norm, per-patch projection, and back to an image.
        let out = self.proj_out.forward(&self.norm_out.forward(&x, &temb));
        let oc = self.config.out_channels();
        Ok(out
            .reshape([b, h, w, p, p, oc])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, oc, h * p, w * p]))
    }
}
