//! Diffusers' `ZImageTransformer2DModel` (models/transformers/transformer_z_image.py): Z-Image's
//! single-stream DiT (S3-DiT). The latent's 2 × 2 patches and the Qwen3 prompt tokens are each
//! padded to a multiple of 32 tokens with a learned pad token and refined apart (the image by
//! timestep-modulated `noise_refiner` blocks, the prompt by unmodulated `context_refiner` blocks),
//! then run as one sequence, image first, through the main blocks. Every block: RMS-normed
//! attention with RMS-normed heads and 3-axis rotary positions (caption index, row, column), and a
//! SiLU-gated feed-forward, each branch RMS-normed again before its tanh gate.
//!
//! The model's timestep runs the other way from the scheduler's: t = 1 − σ, and it predicts the
//! negated velocity; [`crate::models::backbone::Backbone`] converts both.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::dit::plain_layer_norm;
use super::embeddings::Timesteps;
use super::linear::Linear;
use super::recompute::{self, Recompute};
use super::transformer::{BranchScales, GammaSlot, ScaledBlock};
use hf::load::{load_model, load_model_with_weights, LoadError};
use hf::t5::RmsNorm;

/// Width of the timestep embedding the blocks are modulated by (`ADALN_EMBED_DIM`).
const ADALN_EMBED_DIM: i64 = 256;
/// Image and caption tokens are padded to a multiple of this (`SEQ_MULTI_OF`).
const SEQ_MULTI_OF: i64 = 32;
/// The latent patch the pipeline runs with (`patch_size=2, f_patch_size=1`).
const PATCH: i64 = 2;

/// `transformer/config.json` of a Z-Image pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ZImageTransformer2DConfig {
    /// Spatial patch sizes with an embedder each (the pipeline uses 2).
    pub all_patch_size: Vec<i64>,
    /// Temporal patch sizes, paired with `all_patch_size` (the pipeline uses 1).
    pub all_f_patch_size: Vec<i64>,
    /// Latent channels.
    pub in_channels: i64,
    /// Token width.
    pub dim: i64,
    /// Main blocks.
    pub n_layers: i64,
    /// Blocks of each refiner.
    pub n_refiner_layers: i64,
    /// Attention heads.
    pub n_heads: i64,
    /// Key / value heads (diffusers builds every attention with `n_heads`).
    pub n_kv_heads: i64,
    /// Epsilon of the blocks' RMS norms.
    pub norm_eps: f64,
    /// RMS norms on queries and keys.
    pub qk_norm: bool,
    /// Width of the Qwen3 prompt tokens.
    pub cap_feat_dim: i64,
    /// SigLIP image features of the Omni variant (not used by `ZImagePipeline`).
    pub siglip_feat_dim: Option<i64>,
    /// Rotary base.
    pub rope_theta: f64,
    /// The model's timestep (1 − σ) is multiplied by this before embedding.
    pub t_scale: f64,
    /// Rotary widths per position axis (they sum to the head dim).
    pub axes_dims: Vec<i64>,
    /// Positions each axis's rotary table covers.
    pub axes_lens: Vec<i64>,
}

impl Default for ZImageTransformer2DConfig {
    fn default() -> Self {
        ZImageTransformer2DConfig {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            siglip_feat_dim: None,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1024, 512, 512],
        }
    }
}

impl ZImageTransformer2DConfig {
    /// Channels per head.
    pub fn head_dim(&self) -> i64 {
        self.dim / self.n_heads.max(1)
    }

    /// The feed-forward's hidden width, `int(dim / 3 * 8)`.
    pub fn ff_dim(&self) -> i64 {
        (self.dim as f64 / 3.0 * 8.0) as i64
    }

    /// Width of the timestep embedding.
    fn adaln_dim(&self) -> i64 {
        self.dim.min(ADALN_EMBED_DIM)
    }

    fn check(&self) -> Result<(), String> {
        let sizes = [
            ("in_channels", self.in_channels),
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("cap_feat_dim", self.cap_feat_dim),
        ];
        if let Some((key, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{key} {v}: it must be at least 1"));
        }
        if self.n_layers < 0 || self.n_refiner_layers < 0 {
            return Err(format!(
                "n_layers {} / n_refiner_layers {}: block counts cannot be negative",
                self.n_layers, self.n_refiner_layers
            ));
        }
        if self.dim % self.n_heads != 0 {
            return Err(format!(
                "dim {} is not a multiple of n_heads {}",
                self.dim, self.n_heads
            ));
        }
        let sum: i64 = self.axes_dims.iter().sum();
        if self.axes_dims.len() != 3
            || self.axes_lens.len() != 3
            || sum != self.head_dim()
            || self.axes_dims.iter().any(|d| d % 2 != 0)
        {
            return Err(format!(
                "axes_dims {:?} / axes_lens {:?}: three axes, even widths summing to the head \
                 dim {}",
                self.axes_dims,
                self.axes_lens,
                self.head_dim()
            ));
        }
        if self.all_patch_size.len() != self.all_f_patch_size.len()
            || !self
                .all_patch_size
                .iter()
                .zip(&self.all_f_patch_size)
                .any(|(&p, &f)| p == PATCH && f == 1)
        {
            return Err(format!(
                "all_patch_size {:?} / all_f_patch_size {:?}: ZImagePipeline runs with patch \
                 size 2 and frame patch 1, so the pair (2, 1) must be among them",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        if !self.qk_norm {
            return Err("qk_norm false: only Z-Image's RMS-normed queries and keys".into());
        }
        Ok(())
    }
}

/// Rotary cos and sin [B, S, head_dim] of position ids [B, S, 3]: per axis, the position times
/// θ^(−2k/d) (angles in fp64, rounded to fp32 as diffusers' complex table holds them), each
/// repeated for its (real, imaginary) pair, concatenated over the axes.
fn rotary(ids: &Tensor, axes: &[i64], theta: f64) -> (Tensor, Tensor) {
    let pos = ids.to_kind(Kind::Double);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for (i, &d) in axes.iter().enumerate() {
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Double, ids.device())) / d as f64;
        let freqs = Tensor::from(theta)
            .to_kind(Kind::Double)
            .to_device(ids.device())
            .pow(&exponent)
            .reciprocal();
        let angles = (pos.select(-1, i as i64).unsqueeze(-1) * freqs).to_kind(Kind::Float);
        cos.push(angles.cos().repeat_interleave_self_int(2, -1, None));
        sin.push(angles.sin().repeat_interleave_self_int(2, -1, None));
    }
    (Tensor::cat(&cos, -1), Tensor::cat(&sin, -1))
}

/// Rotates x [B, S, H, D] by (cos, sin) [B, S, D] over interleaved (real, imaginary) pairs, in
/// fp32, back in x's dtype.
fn apply_rotary(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
    let size = x.size();
    let pairs = x
        .to_kind(Kind::Float)
        .reshape([size[0], size[1], size[2], -1, 2]);
    let (real, imag) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let rotated = Tensor::stack(&[-imag, real], -1).flatten(3, 4);
    let (cos, sin) = (cos.unsqueeze(2), sin.unsqueeze(2));
    (x.to_kind(Kind::Float) * cos + rotated * sin).to_kind(x.kind())
}

/// What the blocks of one sequence share: rotary tables and the key mask ([B, 1, 1, S] bool,
/// `None` when every row is whole).
#[derive(Debug)]
struct SequenceContext {
    rope: (Tensor, Tensor),
    mask: Option<Tensor>,
}

/// Diffusers' `Attention` with `ZSingleStreamAttnProcessor`: self-attention with RMS-normed
/// heads and rotary positions, no biases.
#[derive(Debug)]
struct ZImageAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: i64,
}

impl ZImageAttention {
    fn new(vs: nn::Path, cfg: &ZImageTransformer2DConfig) -> Self {
        let (dim, head) = (cfg.dim, cfg.head_dim());
        let lin = |name: &str| Linear::new(&vs / name, dim, dim, false);
        ZImageAttention {
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: Linear::new(&vs / "to_out" / 0, dim, dim, false),
            norm_q: RmsNorm::new(&vs / "norm_q", head, 1e-5),
            norm_k: RmsNorm::new(&vs / "norm_k", head, 1e-5),
            heads: cfg.n_heads,
        }
    }

    fn forward(&self, x: &Tensor, seq: &SequenceContext) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor| t.view([b, n, self.heads, -1]);
        let q = apply_rotary(
            &self.norm_q.forward(&heads(self.to_q.forward(x))),
            &seq.rope,
        );
        let k = apply_rotary(
            &self.norm_k.forward(&heads(self.to_k.forward(x))),
            &seq.rope,
        );
        let v = heads(self.to_v.forward(x));
        let attended = Tensor::scaled_dot_product_attention(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            seq.mask.as_ref(),
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2)
        .flatten(2, 3)
        .to_kind(x.kind());
        self.to_out.forward(&attended)
    }
}

/// `ZImageTransformerBlock`: attention then a SiLU-gated feed-forward (w2(silu(w1 x) · w3 x)),
/// each branch pre- and post-normed; with modulation, the timestep embedding scales each
/// branch's input by (1 + scale) and gates its output by tanh(gate).
#[derive(Debug)]
struct ZImageTransformerBlock {
    name: String,
    dim: i64,
    /// DiffFit's γ of the attention and feed-forward branches.
    gamma: GammaSlot,
    attention: ZImageAttention,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    attention_norm1: RmsNorm,
    ffn_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm2: RmsNorm,
    /// `adaLN_modulation.0` (no activation before it), in modulated blocks.
    ada_ln_modulation: Option<Linear>,
}

impl ZImageTransformerBlock {
    fn new(vs: nn::Path, cfg: &ZImageTransformer2DConfig, modulation: bool) -> Self {
        let (dim, hidden, eps) = (cfg.dim, cfg.ff_dim(), cfg.norm_eps);
        let ff = &vs / "feed_forward";
        ZImageTransformerBlock {
            name: vs.components().collect::<Vec<_>>().join("."),
            dim,
            gamma: GammaSlot::default(),
            attention: ZImageAttention::new(&vs / "attention", cfg),
            w1: Linear::new(&ff / "w1", dim, hidden, false),
            w2: Linear::new(&ff / "w2", hidden, dim, false),
            w3: Linear::new(&ff / "w3", dim, hidden, false),
            attention_norm1: RmsNorm::new(&vs / "attention_norm1", dim, eps),
            ffn_norm1: RmsNorm::new(&vs / "ffn_norm1", dim, eps),
            attention_norm2: RmsNorm::new(&vs / "attention_norm2", dim, eps),
            ffn_norm2: RmsNorm::new(&vs / "ffn_norm2", dim, eps),
            ada_ln_modulation: modulation
                .then(|| Linear::new(&vs / "adaLN_modulation" / 0, cfg.adaln_dim(), 4 * dim, true)),
        }
    }

    /// Every linear layer LoRA may target, in module order: the attention's to_q, to_k, to_v,
    /// to_out.0, then feed_forward.w1, w2, w3.
    fn linears(&self) -> Vec<&Linear> {
        let a = &self.attention;
        vec![
            &a.to_q, &a.to_k, &a.to_v, &a.to_out, &self.w1, &self.w2, &self.w3,
        ]
    }

    fn forward(&self, x: &Tensor, seq: &SequenceContext, adaln: Option<&Tensor>) -> Tensor {
        let gamma = self.gamma.get();
        let feed_forward = |h: &Tensor| {
            self.w2
                .forward(&(self.w1.forward(h).silu() * self.w3.forward(h)))
        };
        // 1. (1 + scale, tanh(gate)) of attention and feed-forward from the timestep, if
        //    modulated.
        let modulation = match (&self.ada_ln_modulation, adaln) {
            (Some(m), Some(c)) => {
                let chunks = m.forward(c).unsqueeze(1).chunk(4, 2);
                Some([
                    &chunks[0] + 1.0,
                    chunks[1].tanh(),
                    &chunks[2] + 1.0,
                    chunks[3].tanh(),
                ])
            }
            _ => None,
        };
        let scaled = |h: Tensor, i: usize| match &modulation {
            Some(m) => h * &m[i],
            None => h,
        };
        // 2. Attention branch: normed, scaled, attended, normed again, gated.
        let attn = self
            .attention
            .forward(&scaled(self.attention_norm1.forward(x), 0), seq);
        let attn = BranchScales::apply(&gamma, self.attention_norm2.forward(&attn), |g| {
            Some(&g.attn1)
        });
        let x = x + scaled(attn, 1);
        // 3. Feed-forward branch, the same way.
        let ff = feed_forward(&scaled(self.ffn_norm1.forward(&x), 2));
        let ff = BranchScales::apply(&gamma, self.ffn_norm2.forward(&ff), |g| Some(&g.ff));
        &x + scaled(ff, 3)
    }
}

impl ScaledBlock for ZImageTransformerBlock {
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
        self.w2.weight().device()
    }

    fn gamma_slot(&self) -> &GammaSlot {
        &self.gamma
    }

    /// γ multiplies each branch after its post-norm, so it folds into that norm's weight.
    fn merge_branch_scales(&self) {
        if let Some(g) = self.gamma.take() {
            self.attention_norm2.scale_weight(&g.attn1);
            self.ffn_norm2.scale_weight(&g.ff);
        }
    }
}

/// `FinalLayer`: LayerNorm without affine, scaled by 1 + linear(silu(timestep embedding)), then
/// projected to the patch values.
#[derive(Debug)]
struct FinalLayer {
    norm_final: nn::LayerNorm,
    linear: Linear,
    ada_ln_modulation: Linear,
}

impl FinalLayer {
    fn new(vs: nn::Path, dim: i64, adaln_dim: i64, out: i64) -> Self {
        FinalLayer {
            norm_final: plain_layer_norm(&vs / "norm_final", dim, 1e-6),
            linear: Linear::new(&vs / "linear", dim, out, true),
            ada_ln_modulation: Linear::new(&vs / "adaLN_modulation" / 1, adaln_dim, dim, true),
        }
    }

    fn forward(&self, x: &Tensor, c: &Tensor) -> Tensor {
        let scale = self.ada_ln_modulation.forward(&c.silu()).unsqueeze(1) + 1.0;
        self.linear.forward(&(self.norm_final.forward(x) * scale))
    }
}

/// `TimestepEmbedder`: sinusoidal embedding (cosines first) through linear, SiLU, linear.
#[derive(Debug)]
struct TimestepEmbedder {
    proj: Timesteps,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedder {
    fn new(vs: nn::Path, out: i64) -> Self {
        const FREQUENCIES: i64 = 256;
        const MID: i64 = 1024;
        TimestepEmbedder {
            proj: Timesteps {
                dim: FREQUENCIES,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
            },
            linear_1: Linear::new(&vs / "mlp" / 0, FREQUENCIES, MID, true),
            linear_2: Linear::new(&vs / "mlp" / 2, MID, out, true),
        }
    }

    fn forward(&self, t: &Tensor) -> Tensor {
        let freqs = self.proj.forward(t).to_kind(self.linear_1.weight().kind());
        self.linear_2.forward(&self.linear_1.forward(&freqs).silu())
    }
}

/// Z-Image's transformer.
#[derive(Debug)]
pub struct ZImageTransformer2DModel {
    config: ZImageTransformer2DConfig,
    x_embedder: Linear,
    final_layer: FinalLayer,
    noise_refiner: Vec<ZImageTransformerBlock>,
    context_refiner: Vec<ZImageTransformerBlock>,
    t_embedder: TimestepEmbedder,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    layers: Vec<ZImageTransformerBlock>,
    recompute: Recompute<ZImagePass>,
}

/// A forward pass kept for recomputation: the main blocks' input sequence and the timestep
/// embedding (still in the refiners' and embedders' graph), the sequence's rotary tables and
/// mask, each main block's input, and the last block's output leaf.
#[derive(Debug)]
struct ZImagePass {
    unified: Tensor,
    adaln: Tensor,
    /// The final layer's leaf copy of `adaln`.
    adaln_post: Tensor,
    seq: SequenceContext,
    inputs: Vec<Tensor>,
    out: Tensor,
}

/// `n` image or prompt tokens rounded up to a multiple of 32, as the model pads them.
pub fn padded(n: i64) -> i64 {
    n + (-n).rem_euclid(SEQ_MULTI_OF)
}

/// The key mask [B, 1, 1, total] letting row i attend to its first `valid[i]` tokens; `None`
/// when every row is whole.
fn key_mask(valid: &[i64], total: i64, device: Device) -> Option<Tensor> {
    if valid.iter().all(|&v| v == total) {
        return None;
    }
    let lens = Tensor::from_slice(valid).to_device(device);
    let positions = Tensor::arange(total, (Kind::Int64, device));
    Some(positions.unsqueeze(0).lt_tensor(&lens.unsqueeze(1)).view([
        valid.len() as i64,
        1,
        1,
        total,
    ]))
}

impl ZImageTransformer2DModel {
    /// Lays out the parameters under `vs` with diffusers' names.
    pub fn new(vs: nn::Path, config: &ZImageTransformer2DConfig) -> Self {
        let (dim, c) = (config.dim, config.in_channels);
        let patch_values = PATCH * PATCH * c;
        let key = format!("{PATCH}-1");
        let blocks = |list: &str, n: i64, modulation: bool| {
            (0..n)
                .map(|i| ZImageTransformerBlock::new(&vs / list / i, config, modulation))
                .collect()
        };
        // Embedders of other patch sizes exist in some folders; only (2, 1) runs, so only it
        // is built (the others' weights are skipped at load).
        ZImageTransformer2DModel {
            config: config.clone(),
            x_embedder: Linear::new(&vs / "all_x_embedder" / &key, patch_values, dim, true),
            final_layer: FinalLayer::new(
                &vs / "all_final_layer" / &key,
                dim,
                config.adaln_dim(),
                patch_values,
            ),
            noise_refiner: blocks("noise_refiner", config.n_refiner_layers, true),
            context_refiner: blocks("context_refiner", config.n_refiner_layers, false),
            t_embedder: TimestepEmbedder::new(&vs / "t_embedder", config.adaln_dim()),
            cap_norm: RmsNorm::new(
                &vs / "cap_embedder" / 0,
                config.cap_feat_dim,
                config.norm_eps,
            ),
            cap_linear: Linear::new(&vs / "cap_embedder" / 1, config.cap_feat_dim, dim, true),
            x_pad_token: vs.zeros("x_pad_token", &[1, dim]),
            cap_pad_token: vs.zeros("cap_pad_token", &[1, dim]),
            layers: blocks("layers", config.n_layers, true),
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
            ZImageTransformer2DConfig::check,
            ZImageTransformer2DModel::new,
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
            ZImageTransformer2DConfig::check,
            ZImageTransformer2DModel::new,
        )
    }

    /// The config.
    pub fn config(&self) -> &ZImageTransformer2DConfig {
        &self.config
    }

    /// Every block, in module order: noise_refiner, context_refiner, layers.
    fn blocks(&self) -> impl Iterator<Item = &ZImageTransformerBlock> {
        self.noise_refiner
            .iter()
            .chain(&self.context_refiner)
            .chain(&self.layers)
    }

    /// Every linear layer of the blocks LoRA may target, in module order.
    pub fn lora_candidates(&self) -> Vec<&Linear> {
        self.blocks().flat_map(|b| b.linears()).collect()
    }

    /// Every block, as DiffFit scales them.
    pub fn scaled_blocks(&self) -> Vec<&dyn ScaledBlock> {
        self.blocks().map(|b| b as &dyn ScaledBlock).collect()
    }

    /// Turns activation recomputation of the main blocks on or off (see
    /// [`crate::models::recompute`]; the refiners run plainly); with it on, a forward pass in
    /// grad mode must be followed, after its loss's backward, by
    /// [`ZImageTransformer2DModel::finish_recomputation`].
    pub fn set_recompute(&self, on: bool) {
        self.recompute.set(on);
    }

    /// Refuses a latent of `height` × `width` the model cannot take, saying why.
    pub fn check_latent_size(&self, height: i64, width: i64) -> Result<(), String> {
        if height % PATCH != 0 || width % PATCH != 0 {
            return Err(format!(
                "a {height}x{width} latent: Z-Image embeds 2 × 2 patches, so both sides must \
                 be even"
            ));
        }
        let (rows, cols) = (height / PATCH, width / PATCH);
        let lens = &self.config.axes_lens;
        if rows > lens[1] || cols > lens[2] {
            return Err(format!(
                "a {height}x{width} latent is {rows}x{cols} patches; the rotary tables cover \
                 {}x{} (axes_lens)",
                lens[1], lens[2]
            ));
        }
        Ok(())
    }

    /// Refuses prompts of `tokens` Qwen3 tokens when the caption axis's rotary table cannot place
    /// them and the image after them (positions 1..=padded length + 1), saying why.
    pub fn check_caption_length(&self, tokens: i64) -> Result<(), String> {
        let last = padded(tokens) + 1;
        let table = self.config.axes_lens[0];
        if last >= table {
            return Err(format!(
                "{tokens} prompt tokens are {} once padded, and the image after them sits at \
                 position {last}; the caption axis's rotary table covers 0..{table} (axes_lens[0]): \
                 use fewer tokens (max_sequence_length)",
                padded(tokens)
            ));
        }
        Ok(())
    }

    /// The model output [B, C, H, W] (the negated velocity) for latents `x` [B, C, H, W] at
    /// `t` [B] (1 − σ), given prompt tokens `captions` [B, L, cap_feat_dim] of which row i's
    /// first `caption_lens[i]` are real.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        captions: &Tensor,
        caption_lens: &[i64],
    ) -> Result<Tensor, String> {
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        self.check_latent_size(h, w)?;
        if caption_lens.len() as i64 != b || captions.size()[0] != b {
            return Err(format!(
                "{b} latents but {} caption rows ({} lengths)",
                captions.size()[0],
                caption_lens.len()
            ));
        }
        let longest = captions.size()[1];
        if let Some(bad) = caption_lens.iter().find(|&&l| l < 1 || l > longest) {
            return Err(format!(
                "a caption length of {bad}: each row needs 1..={longest} prompt tokens"
            ));
        }
        for &l in caption_lens {
            self.check_caption_length(l)?;
        }
        let cap_padded: Vec<i64> = caption_lens.iter().map(|&l| padded(l)).collect();
        let (device, kind, dim) = (x.device(), x.kind(), self.config.dim);
        let cap_max = *cap_padded.iter().max().expect("at least one row");
        let (rows, cols) = (h / PATCH, w / PATCH);
        let n = rows * cols;
        let n_padded = padded(n);

        // 1. Timestep embedding of t · t_scale.
        let adaln = self
            .t_embedder
            .forward(&(t.to_kind(Kind::Float) * self.config.t_scale))
            .to_kind(kind);

        // 2. Image: 2 × 2 patches (row-major, each (dy, dx, channel)), embedded, padded with
        //    the pad token; positions (caption length + 1, row, column), the padding at 0.
        let patches = x
            .view([b, c, rows, PATCH, cols, PATCH])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([b, n, PATCH * PATCH * c]);
        let mut image = self.x_embedder.forward(&patches);
        if n_padded > n {
            let pad = self
                .x_pad_token
                .to_kind(kind)
                .unsqueeze(0)
                .expand([b, n_padded - n, dim], false);
            image = Tensor::cat(&[image, pad], 1);
        }
        let grid = Tensor::stack(
            &Tensor::meshgrid_indexing(
                &[
                    Tensor::arange(rows, (Kind::Int64, device)),
                    Tensor::arange(cols, (Kind::Int64, device)),
                ],
                "ij",
            ),
            -1,
        )
        .view([n, 2]);
        let image_ids: Vec<Tensor> = cap_padded
            .iter()
            .map(|&p| {
                let frame = Tensor::full([n, 1], p + 1, (Kind::Int64, device));
                let ids = Tensor::cat(&[frame, grid.shallow_clone()], 1);
                let pad = Tensor::zeros([n_padded - n, 3], (Kind::Int64, device));
                Tensor::cat(&[ids, pad], 0)
            })
            .collect();
        let image_seq = SequenceContext {
            rope: rotary(
                &Tensor::stack(&image_ids, 0),
                &self.config.axes_dims,
                self.config.rope_theta,
            ),
            mask: None,
        };
        for block in &self.noise_refiner {
            image = block.forward(&image, &image_seq, Some(&adaln));
        }

        // 3. Prompt: RMS-normed and embedded, padded with the pad token to a multiple of 32
        //    per row, rows batched to the longest (masked); positions (1 + index, 0, 0).
        let captions = if longest < cap_max {
            captions.constant_pad_nd([0, 0, 0, cap_max - longest])
        } else {
            captions.narrow(1, 0, cap_max)
        };
        let embedded = self
            .cap_linear
            .forward(&self.cap_norm.forward(&captions.to_kind(kind)));
        let positions = Tensor::arange(cap_max, (Kind::Int64, device)).unsqueeze(0);
        let per_row = |v: &[i64]| Tensor::from_slice(v).to_device(device).unsqueeze(1);
        let real = positions.lt_tensor(&per_row(caption_lens)).unsqueeze(-1);
        let in_row = positions.lt_tensor(&per_row(&cap_padded)).unsqueeze(-1);
        let pad_token = self.cap_pad_token.to_kind(kind).unsqueeze(0);
        let mut caption = embedded
            .where_self(&real, &pad_token)
            .where_self(&in_row, &Tensor::zeros([], (kind, device)));
        let cap_ids = Tensor::stack(
            &[
                &positions.expand([b, cap_max], false) + 1,
                Tensor::zeros([b, cap_max], (Kind::Int64, device)),
                Tensor::zeros([b, cap_max], (Kind::Int64, device)),
            ],
            -1,
        );
        let cap_seq = SequenceContext {
            rope: rotary(&cap_ids, &self.config.axes_dims, self.config.rope_theta),
            mask: key_mask(&cap_padded, cap_max, device),
        };
        for block in &self.context_refiner {
            caption = block.forward(&caption, &cap_seq, None);
        }

        // 4. One sequence, image first; each row attends to its image and its own prompt.
        let unified = Tensor::cat(&[image, caption], 1);
        let total: Vec<i64> = cap_padded.iter().map(|p| n_padded + p).collect();
        let seq = SequenceContext {
            rope: (
                Tensor::cat(&[&image_seq.rope.0, &cap_seq.rope.0], 1),
                Tensor::cat(&[&image_seq.rope.1, &cap_seq.rope.1], 1),
            ),
            mask: key_mask(&total, n_padded + cap_max, device),
        };
        let (out, adaln) = if self.recompute.applies() {
            self.layers_kept_for_recompute(unified, adaln, seq)
        } else {
            let mut out = unified;
            for block in &self.layers {
                out = block.forward(&out, &seq, Some(&adaln));
            }
            (out, adaln)
        };

        // 5. Output norm and projection; the image tokens back to a latent.
        let values = self.final_layer.forward(&out.narrow(1, 0, n), &adaln);
        Ok(values
            .view([b, rows, cols, PATCH, PATCH, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c, h, w]))
    }

    /// The main blocks without autograd, keeping each block's input; returns the output as a
    /// leaf the loss's backward stops at, and a leaf copy of `adaln` for the final layer.
    fn layers_kept_for_recompute(
        &self,
        unified: Tensor,
        adaln: Tensor,
        seq: SequenceContext,
    ) -> (Tensor, Tensor) {
        let mut inputs = Vec::with_capacity(self.layers.len());
        let out = tch::no_grad(|| {
            let (mut x, c) = (unified.detach(), adaln.detach());
            for block in &self.layers {
                inputs.push(x.shallow_clone());
                x = block.forward(&x, &seq, Some(&c));
            }
            x
        });
        let (out, adaln_post) = (recompute::leaf(&out), recompute::leaf(&adaln));
        self.recompute.push(
            ZImagePass {
                unified,
                adaln,
                adaln_post: adaln_post.shallow_clone(),
                seq,
                inputs,
                out: out.shallow_clone(),
            },
            |pass| &pass.out,
        );
        (out, adaln_post)
    }

    /// Runs the backward of the main blocks of every pass kept since the last call, by
    /// recomputing them, after the loss's backward has reached their outputs.
    pub fn finish_recomputation(&self) {
        for pass in self.recompute.take() {
            let Some(mut g) = recompute::grad_of(&pass.out) else {
                continue;
            };
            let adaln = recompute::leaf(&pass.adaln);
            for (block, input) in self.layers.iter().zip(&pass.inputs).rev() {
                let input = recompute::leaf(input);
                let out = block.forward(&input, &pass.seq, Some(&adaln));
                recompute::backward(&[(&out, Some(&g))]);
                g = recompute::grad_of(&input).expect("a block's output depends on its input");
            }
            let g_adaln = recompute::summed_grad(&adaln, &pass.adaln_post);
            recompute::backward(&[(&pass.unified, Some(&g)), (&pass.adaln, g_adaln.as_ref())]);
        }
    }
}
