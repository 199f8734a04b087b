//! Diffusers' `FluxTransformer2DModel` (models/transformers/transformer_flux.py): FLUX.1's
//! rectified-flow transformer (schnell, and dev with its guidance embedding). The packed latent
//! (2×2 patches of the 16-channel latent, 64 values per token) and the T5 tokens run through
//! double-stream `FluxTransformerBlock`s (each stream adaLN-modulated, one joint attention with
//! RMS-normed queries and keys and 3-axis rotary positions), then as one sequence through
//! single-stream `FluxSingleTransformerBlock`s (attention and MLP side by side); the output stays
//! packed, as the pipeline unpacks it.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::attention::sdpa;
use super::dit::{plain_layer_norm, FeedForward};
use super::linear::Linear;
use super::recompute::{self, Recompute};
use super::sd3::{modulate, AdaNormContinuous, AdaNormZero, TimeTextEmbed};
use super::transformer::{BranchScales, GammaSlot, ScaledBlock};
use hf::load::{load_model, load_model_with_weights, LoadError};
use hf::t5::RmsNorm;

/// `transformer/config.json` of a FLUX pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FluxTransformer2DConfig {
    /// Side of the patches the model itself makes of its input tokens (1: the pipeline packs).
    pub patch_size: i64,
    /// Values per input token (64: 16 latent channels × 2 × 2).
    pub in_channels: i64,
    /// Values per output token; `None` means `in_channels`.
    pub out_channels: Option<i64>,
    /// Double-stream blocks.
    pub num_layers: i64,
    /// Single-stream blocks.
    pub num_single_layers: i64,
    /// Channels per head.
    pub attention_head_dim: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Width of the T5 tokens.
    pub joint_attention_dim: i64,
    /// Width of the pooled CLIP embedding.
    pub pooled_projection_dim: i64,
    /// Embed a guidance scale too (FLUX.1-dev's guidance distillation).
    pub guidance_embeds: bool,
    /// Rotary widths per position axis (they sum to the head dim).
    pub axes_dims_rope: Vec<i64>,
}

impl Default for FluxTransformer2DConfig {
    fn default() -> Self {
        FluxTransformer2DConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxTransformer2DConfig {
    /// Width of the tokens.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Values per output token.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    fn check(&self) -> Result<(), String> {
        let sum: i64 = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope {:?}: even widths summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        let sizes = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ];
        if let Some((key, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{key} {v}: it must be at least 1"));
        }
        if self.num_layers < 0 || self.num_single_layers < 0 {
            return Err(format!(
                "num_layers {} / num_single_layers {}: block counts cannot be negative",
                self.num_layers, self.num_single_layers
            ));
        }
        Ok(())
    }
}

/// `FluxPosEmbed`: per position axis, cos and sin of the position times θ^(−2k/d) (fp64, as
/// diffusers computes them for FLUX), each repeated twice, concatenated over the axes: [S, D].
fn rotary(ids: &Tensor, axes: &[i64], theta: f64) -> (Tensor, Tensor) {
    let pos = ids.to_kind(Kind::Float).to_kind(Kind::Double);
    let mut cos = Vec::with_capacity(axes.len());
    let mut sin = Vec::with_capacity(axes.len());
    for (i, &d) in axes.iter().enumerate() {
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Double, ids.device())) / d as f64;
        let freqs = Tensor::from(theta)
            .to_kind(Kind::Double)
            .pow(&exponent)
            .reciprocal();
        let angles = pos.select(1, i as i64).outer(&freqs);
        cos.push(
            angles
                .cos()
                .repeat_interleave_self_int(2, 1, None)
                .to_kind(Kind::Float),
        );
        sin.push(
            angles
                .sin()
                .repeat_interleave_self_int(2, 1, None)
                .to_kind(Kind::Float),
        );
    }
    (Tensor::cat(&cos, -1), Tensor::cat(&sin, -1))
}

/// `apply_rotary_emb` on x [B, S, H, D] with interleaved (real, imaginary) pairs.
fn apply_rotary(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
    let size = x.size();
    let pairs = x.reshape([size[0], size[1], size[2], -1, 2]);
    let (real, imag) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let rotated = Tensor::stack(&[-imag, real], -1).flatten(3, 4);
    let (cos, sin) = (cos.unsqueeze(0).unsqueeze(2), sin.unsqueeze(0).unsqueeze(2));
    (x.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(x.kind())
}

/// `FluxAttention` with `FluxAttnProcessor`: RMS-normed queries and keys, the prompt tokens
/// first in the joint sequence, rotary positions on both; double-stream blocks project both
/// outputs back, single-stream ones (`pre_only`) return the attended values as they are.
#[derive(Debug)]
struct FluxAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// to_out.0 (not in single-stream blocks).
    to_out: Option<Linear>,
    /// The prompt stream's projections and norms (double-stream blocks).
    added: Option<AddedStream>,
    heads: i64,
}

#[derive(Debug)]
struct AddedStream {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_add_out: Linear,
}

impl FluxAttention {
    fn new(vs: nn::Path, cfg: &FluxTransformer2DConfig, joint: bool) -> Self {
        let (dim, head) = (cfg.inner_dim(), cfg.attention_head_dim);
        let lin = |name: &str| Linear::new(&vs / name, dim, dim, true);
        FluxAttention {
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            norm_q: RmsNorm::new(&vs / "norm_q", head, 1e-6),
            norm_k: RmsNorm::new(&vs / "norm_k", head, 1e-6),
            to_out: joint.then(|| Linear::new(&vs / "to_out" / 0, dim, dim, true)),
            added: joint.then(|| AddedStream {
                add_q_proj: lin("add_q_proj"),
                add_k_proj: lin("add_k_proj"),
                add_v_proj: lin("add_v_proj"),
                norm_added_q: RmsNorm::new(&vs / "norm_added_q", head, 1e-6),
                norm_added_k: RmsNorm::new(&vs / "norm_added_k", head, 1e-6),
                to_add_out: lin("to_add_out"),
            }),
            heads: cfg.num_attention_heads,
        }
    }

    /// Joint: (image, prompt) outputs; single-stream: the attended sequence and None.
    /// The projections in module order: to_q, to_k, to_v, to_out.0, then the prompt stream's.
    fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.to_q, &self.to_k, &self.to_v];
        out.extend(self.to_out.as_ref());
        if let Some(a) = &self.added {
            out.extend([&a.add_q_proj, &a.add_k_proj, &a.add_v_proj, &a.to_add_out]);
        }
        out
    }

    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: &(Tensor, Tensor),
    ) -> (Tensor, Option<Tensor>) {
        let b = x.size()[0];
        let heads = |t: Tensor| {
            let width = t.size()[2];
            t.view([b, -1, self.heads, width / self.heads])
        };
        let mut q = self.norm_q.forward(&heads(self.to_q.forward(x)));
        let mut k = self.norm_k.forward(&heads(self.to_k.forward(x)));
        let mut v = heads(self.to_v.forward(x));
        let prompt_len = context.map_or(0, |c| c.size()[1]);
        if let (Some(a), Some(c)) = (&self.added, context) {
            let cq = a.norm_added_q.forward(&heads(a.add_q_proj.forward(c)));
            let ck = a.norm_added_k.forward(&heads(a.add_k_proj.forward(c)));
            let cv = heads(a.add_v_proj.forward(c));
            q = Tensor::cat(&[cq, q], 1);
            k = Tensor::cat(&[ck, k], 1);
            v = Tensor::cat(&[cv, v], 1);
        }
        let q = apply_rotary(&q, rope);
        let k = apply_rotary(&k, rope);
        let attended = sdpa(&q.transpose(1, 2), &k.transpose(1, 2), &v.transpose(1, 2))
            .transpose(1, 2)
            .flatten(2, 3)
            .to_kind(q.kind());
        match (&self.added, &self.to_out) {
            (Some(a), Some(out)) => {
                let total = attended.size()[1];
                let prompt = attended.narrow(1, 0, prompt_len);
                let image = attended.narrow(1, prompt_len, total - prompt_len);
                (out.forward(&image), Some(a.to_add_out.forward(&prompt)))
            }
            _ => (attended, None),
        }
    }
}

/// fp16 outputs clipped to its range, as the FLUX blocks do.
fn clip_half(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        x.clamp(-65504.0, 65504.0)
    } else {
        x
    }
}

/// `FluxTransformerBlock`: the double-stream block (SD3's joint block, with FLUX's attention).
#[derive(Debug)]
struct FluxTransformerBlock {
    name: String,
    dim: i64,
    /// DiffFit's γ of the image stream's attention and feed-forward branches.
    gamma: GammaSlot,
    norm1: AdaNormZero,
    norm1_context: AdaNormZero,
    attn: FluxAttention,
    norm2: nn::LayerNorm,
    ff: FeedForward,
    norm2_context: nn::LayerNorm,
    ff_context: FeedForward,
}

impl FluxTransformerBlock {
    fn new(vs: nn::Path, cfg: &FluxTransformer2DConfig) -> Self {
        let dim = cfg.inner_dim();
        FluxTransformerBlock {
            name: vs.components().collect::<Vec<_>>().join("."),
            dim,
            gamma: GammaSlot::default(),
            norm1: AdaNormZero::new(&vs / "norm1", dim, 6),
            norm1_context: AdaNormZero::new(&vs / "norm1_context", dim, 6),
            attn: FluxAttention::new(&vs / "attn", cfg, true),
            norm2: plain_layer_norm(&vs / "norm2", dim, 1e-6),
            ff: FeedForward::new(&vs / "ff", dim, "gelu-approximate"),
            norm2_context: plain_layer_norm(&vs / "norm2_context", dim, 1e-6),
            ff_context: FeedForward::new(&vs / "ff_context", dim, "gelu-approximate"),
        }
    }

    /// Every linear layer LoRA may target, in module order: attn, ff, ff_context.
    fn linears(&self) -> Vec<&Linear> {
        let mut out = self.attn.linears();
        out.extend(self.ff.linears());
        out.extend(self.ff_context.linears());
        out
    }

    /// (image tokens, prompt tokens).
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        let gamma = self.gamma.get();
        // 1. Both streams modulated: shift, scale, gate of attention and of the MLP.
        let (normed, m) = self.norm1.forward(x, temb);
        let (c_normed, cm) = self.norm1_context.forward(context, temb);
        // 2. Joint attention, gated into each stream.
        let (attn, c_attn) = self.attn.forward(
            &modulate(&normed, &m[0], &m[1]),
            Some(&modulate(&c_normed, &cm[0], &cm[1])),
            rope,
        );
        let c_attn = c_attn.expect("a joint attention returns the prompt stream");
        let attn = BranchScales::apply(&gamma, attn, |g| Some(&g.attn1));
        let x = x + m[2].unsqueeze(1) * attn;
        // 3. Each stream's own feed-forward.
        let ff_in = modulate(&self.norm2.forward(&x), &m[3], &m[4]);
        let ff = BranchScales::apply(&gamma, self.ff.forward(&ff_in), |g| Some(&g.ff));
        let x = &x + m[5].unsqueeze(1) * ff;
        let c = context + cm[2].unsqueeze(1) * c_attn;
        let c_in = modulate(&self.norm2_context.forward(&c), &cm[3], &cm[4]);
        let c = &c + cm[5].unsqueeze(1) * self.ff_context.forward(&c_in);
        (x, clip_half(c))
    }
}

/// `FluxSingleTransformerBlock`: one sequence (prompt then image), attention and a GELU MLP in
/// parallel from one modulated norm, concatenated and projected back, gated.
/// DiffFit scales the image stream's attention and feed-forward branches (the prompt stream
/// keeps its own unscaled, as the single-stream blocks do).
impl ScaledBlock for FluxTransformerBlock {
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
        self.ff.linears()[1].weight().device()
    }

    fn gamma_slot(&self) -> &GammaSlot {
        &self.gamma
    }

    fn merge_branch_scales(&self) {
        if let Some(g) = self.gamma.take() {
            if let Some(out) = &self.attn.to_out {
                out.scale_outputs(&g.attn1);
            }
            self.ff.linears()[1].scale_outputs(&g.ff);
        }
    }
}

#[derive(Debug)]
struct FluxSingleTransformerBlock {
    norm: AdaNormZero,
    proj_mlp: Linear,
    attn: FluxAttention,
    proj_out: Linear,
}

impl FluxSingleTransformerBlock {
    fn new(vs: nn::Path, cfg: &FluxTransformer2DConfig) -> Self {
        let dim = cfg.inner_dim();
        let mlp = 4 * dim;
        FluxSingleTransformerBlock {
            norm: AdaNormZero::new(&vs / "norm", dim, 3),
            proj_mlp: Linear::new(&vs / "proj_mlp", dim, mlp, true),
            attn: FluxAttention::new(&vs / "attn", cfg, false),
            proj_out: Linear::new(&vs / "proj_out", dim + mlp, dim, true),
        }
    }

    /// Every linear layer LoRA may target: attn.to_q/to_k/to_v, proj_mlp, proj_out.
    fn linears(&self) -> Vec<&Linear> {
        let mut out = self.attn.linears();
        out.extend([&self.proj_mlp, &self.proj_out]);
        out
    }

    fn forward(&self, sequence: &Tensor, temb: &Tensor, rope: &(Tensor, Tensor)) -> Tensor {
        let (normed, m) = self.norm.forward(sequence, temb);
        let normed = modulate(&normed, &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&normed).gelu("tanh");
        let (attn, _) = self.attn.forward(&normed, None, rope);
        let out = self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2));
        clip_half(sequence + m[2].unsqueeze(1) * out)
    }
}

/// FLUX.1's transformer.
#[derive(Debug)]
pub struct FluxTransformer2DModel {
    config: FluxTransformer2DConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbed,
    blocks: Vec<FluxTransformerBlock>,
    single_blocks: Vec<FluxSingleTransformerBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    recompute: Recompute<FluxPass>,
}

/// A forward pass kept for recomputation: the input stage's outputs (still in its graph), the
/// rotary tables, each block's inputs, and the last block's output leaf.
#[derive(Debug)]
struct FluxPass {
    x: Tensor,
    c: Tensor,
    temb: Tensor,
    /// The output stage's leaf copy of `temb`.
    temb_post: Tensor,
    rope: (Tensor, Tensor),
    double_inputs: Vec<(Tensor, Tensor)>,
    single_inputs: Vec<Tensor>,
    out: Tensor,
}

impl FluxTransformer2DModel {
    /// Turns activation recomputation per block on or off (see
    /// [`crate::models::recompute`]); with it on, a forward pass in grad mode must be followed,
    /// after its loss's backward, by [`FluxTransformer2DModel::finish_recomputation`].
    pub fn set_recompute(&self, on: bool) {
        self.recompute.set(on);
    }

    /// The joint sequence (prompt first) after every block.
    fn blocks_forward(
        &self,
        mut x: Tensor,
        mut c: Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Tensor {
        for block in &self.blocks {
            (x, c) = block.forward(&x, &c, temb, rope);
        }
        let mut sequence = Tensor::cat(&[c, x], 1);
        for block in &self.single_blocks {
            sequence = block.forward(&sequence, temb, rope);
        }
        sequence
    }

    /// [`Self::blocks_forward`] without autograd, keeping each block's inputs; returns the
    /// output as a leaf the loss's backward stops at, and a leaf copy of `temb` for the output
    /// stage (so that the input stage's graph is walked once, by the recomputation).
    fn blocks_kept_for_recompute(
        &self,
        x: Tensor,
        c: Tensor,
        temb: Tensor,
        rope: (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        let mut double_inputs = Vec::with_capacity(self.blocks.len());
        let mut single_inputs = Vec::with_capacity(self.single_blocks.len());
        let out = tch::no_grad(|| {
            let (mut x, mut c, t) = (x.detach(), c.detach(), temb.detach());
            for block in &self.blocks {
                double_inputs.push((x.shallow_clone(), c.shallow_clone()));
                (x, c) = block.forward(&x, &c, &t, &rope);
            }
            let mut sequence = Tensor::cat(&[c, x], 1);
            for block in &self.single_blocks {
                single_inputs.push(sequence.shallow_clone());
                sequence = block.forward(&sequence, &t, &rope);
            }
            sequence
        });
        let (out, temb_post) = (recompute::leaf(&out), recompute::leaf(&temb));
        self.recompute.push(
            FluxPass {
                x,
                c,
                temb,
                temb_post: temb_post.shallow_clone(),
                rope,
                double_inputs,
                single_inputs,
                out: out.shallow_clone(),
            },
            |pass| &pass.out,
        );
        (out, temb_post)
    }

    /// Runs the backward of the blocks of every pass kept since the last call, by recomputing
    /// them, after the loss's backward has reached their outputs.
    pub fn finish_recomputation(&self) {
        for pass in self.recompute.take() {
            let Some(mut g_sequence) = recompute::grad_of(&pass.out) else {
                continue;
            };
            let temb = recompute::leaf(&pass.temb);
            for (block, input) in self.single_blocks.iter().zip(&pass.single_inputs).rev() {
                let input = recompute::leaf(input);
                let out = block.forward(&input, &temb, &pass.rope);
                recompute::backward(&[(&out, Some(&g_sequence))]);
                g_sequence =
                    recompute::grad_of(&input).expect("a block's output depends on its input");
            }
            let prompt_len = pass.c.size()[1];
            let total = g_sequence.size()[1];
            let mut gc = g_sequence.narrow(1, 0, prompt_len);
            let mut gx = g_sequence.narrow(1, prompt_len, total - prompt_len);
            for (block, (x, c)) in self.blocks.iter().zip(&pass.double_inputs).rev() {
                let (x, c) = (recompute::leaf(x), recompute::leaf(c));
                let (x_out, c_out) = block.forward(&x, &c, &temb, &pass.rope);
                recompute::backward(&[(&x_out, Some(&gx)), (&c_out, Some(&gc))]);
                gx = recompute::grad_of(&x).expect("a block's output depends on its input");
                gc = recompute::grad_of(&c).expect("a block's output depends on its input");
            }
            let g_temb = recompute::summed_grad(&temb, &pass.temb_post);
            recompute::backward(&[
                (&pass.x, Some(&gx)),
                (&pass.c, Some(&gc)),
                (&pass.temb, g_temb.as_ref()),
            ]);
        }
    }

    /// Lays out the parameters under `vs` with diffusers' names.
    pub fn new(vs: nn::Path, config: &FluxTransformer2DConfig) -> Self {
        let dim = config.inner_dim();
        let p = config.patch_size;
        FluxTransformer2DModel {
            config: config.clone(),
            x_embedder: Linear::new(&vs / "x_embedder", config.in_channels, dim, true),
            context_embedder: Linear::new(
                &vs / "context_embedder",
                config.joint_attention_dim,
                dim,
                true,
            ),
            time_text_embed: TimeTextEmbed::new(
                &vs / "time_text_embed",
                dim,
                config.pooled_projection_dim,
                config.guidance_embeds,
            ),
            blocks: (0..config.num_layers)
                .map(|i| FluxTransformerBlock::new(&vs / "transformer_blocks" / i, config))
                .collect(),
            single_blocks: (0..config.num_single_layers)
                .map(|i| {
                    FluxSingleTransformerBlock::new(&vs / "single_transformer_blocks" / i, config)
                })
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
            FluxTransformer2DConfig::check,
            FluxTransformer2DModel::new,
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
            FluxTransformer2DConfig::check,
            FluxTransformer2DModel::new,
        )
    }

    /// The config.
    pub fn config(&self) -> &FluxTransformer2DConfig {
        &self.config
    }

    /// Every linear layer of the double- then single-stream blocks LoRA may target.
    pub fn lora_candidates(&self) -> Vec<&Linear> {
        let double = self.blocks.iter().flat_map(|b| b.linears());
        double
            .chain(self.single_blocks.iter().flat_map(|b| b.linears()))
            .collect()
    }

    /// The double-stream blocks, as DiffFit scales them (a single-stream block's one
    /// projection mixes attention and MLP, so it has no separate branches to scale).
    pub fn scaled_blocks(&self) -> Vec<&dyn ScaledBlock> {
        self.blocks.iter().map(|b| b as &dyn ScaledBlock).collect()
    }

    /// The packed velocity [B, N, out] for packed latent tokens `tokens` [B, N, in] at
    /// `timestep` [B] (σ, in [0, 1]; scaled by 1000 here as diffusers does), given the T5
    /// tokens `context` [B, L, joint_attention_dim], the pooled CLIP embedding `pooled`
    /// [B, pooled_projection_dim], the position ids `txt_ids` [L, 3] and `img_ids` [N, 3], and,
    /// for a guidance-distilled model, `guidance` [B].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        tokens: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor, String> {
        if self.config.guidance_embeds != guidance.is_some() {
            return Err(if self.config.guidance_embeds {
                "this FLUX model embeds a guidance scale (guidance_embeds): give one".into()
            } else {
                "this FLUX model has no guidance embedding (FLUX.1-schnell): give no guidance"
                    .into()
            });
        }
        let kind = tokens.kind();
        // 1. Tokens and prompt to the model width; timestep (and guidance) × 1000 plus pooled.
        let x = self.x_embedder.forward(tokens);
        let timestep = timestep.to_kind(kind) * 1000.0;
        let guidance = guidance.map(|g| g.to_kind(kind) * 1000.0);
        let temb = self
            .time_text_embed
            .forward(&timestep, guidance.as_ref(), pooled);
        let c = self.context_embedder.forward(context);
        // 2. Rotary positions of the joint sequence, prompt first.
        let ids = Tensor::cat(&[txt_ids, img_ids], 0);
        let rope = rotary(&ids, &self.config.axes_dims_rope, 10000.0);
        // 3. Double-stream blocks, then one sequence (prompt first) through the single-stream
        //    blocks; only the blocks' inputs kept when recomputing.
        let prompt_len = c.size()[1];
        let (sequence, temb) = if self.recompute.applies() {
            self.blocks_kept_for_recompute(x, c, temb, rope)
        } else {
            (self.blocks_forward(x, c, &temb, &rope), temb)
        };
        let total = sequence.size()[1];
        let x = sequence.narrow(1, prompt_len, total - prompt_len);
        // 4. Modulated output norm and projection, still packed.
        Ok(self.proj_out.forward(&self.norm_out.forward(&x, &temb)))
    }
}
