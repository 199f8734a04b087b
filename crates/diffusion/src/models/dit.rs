//! Diffusers' `DiTTransformer2DModel` (models/transformers/dit_transformer_2d.py): DiT, the
//! class-conditional latent transformer that DiffFit fine-tunes. A `PatchEmbed` turns the latent
//! into tokens with a fixed 2-D sin-cos position, adaLN-Zero `BasicTransformerBlock`s
//! (models/attention.py with `norm_type = "ada_norm_zero"`, models/normalization.py
//! `AdaLayerNormZero`) modulate self-attention and a feed-forward layer by the timestep and class
//! embedding, and a modulated output layer predicts per-patch values that are put back into an
//! image (with learned sigma: the noise in the first half of the channels, the variance
//! interpolation in the second).

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::attention::{Attention, AttentionConfig};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::linear::Linear;
use super::resnet::conv;
use super::transformer::{BranchScales, GammaSlot, ScaledBlock};
use hf::load::{build_and_load, read_config, weight_files, LoadError};

/// `transformer/config.json` of a DiT pipeline. Also reads the legacy `Transformer2DModel`
/// configs of the original DiT checkpoints (their extra keys are ignored, as diffusers remaps
/// them to this model).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DiTTransformer2DConfig {
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Channels per head; the token width is heads × this.
    pub attention_head_dim: i64,
    /// Latent channels in.
    pub in_channels: i64,
    /// Channels out; `None` means `in_channels`. Twice `in_channels` is DiT's learned sigma.
    pub out_channels: Option<i64>,
    /// Transformer blocks.
    pub num_layers: i64,
    /// Dropout of attention and feed-forward; not applied (inference, and DiffFit trains
    /// without dropout).
    pub dropout: f64,
    /// Unused by DiT (it has no GroupNorm); kept because diffusers writes it.
    pub norm_num_groups: i64,
    /// Bias on to_q / to_k / to_v.
    pub attention_bias: bool,
    /// Latent size the positional embedding is laid out for.
    pub sample_size: i64,
    /// Side of the square patches that become tokens.
    pub patch_size: i64,
    /// Feed-forward activation: `gelu-approximate` (DiT's tanh GELU) or `gelu`.
    pub activation_fn: String,
    /// Number of classes. Class id `num_embeds_ada_norm` is the null class that
    /// classifier-free guidance conditions on (the label embedding has one more row).
    pub num_embeds_ada_norm: Option<i64>,
    /// Changes nothing: diffusers only reads it in attention processors other than the
    /// scaled-dot-product one that it, and this crate, runs.
    pub upcast_attention: bool,
    /// Only `ada_norm_zero`.
    pub norm_type: String,
    /// Affine parameters on the feed-forward's LayerNorm (`norm3`).
    pub norm_elementwise_affine: bool,
    /// Epsilon of `norm3` (the adaLN and output norms use 1e-6, as in diffusers).
    pub norm_eps: f64,
    /// Divides the positions of the 2-D sin-cos embedding (diffusers' `PatchEmbed`
    /// `interpolation_scale`, PixArt's `pe_interpolation`). Not a key of config.json: diffusers
    /// builds DiT with 1, so set it in code after reading the config.
    ///
    /// Positions are already scaled to the configured grid: on a latent larger than
    /// `sample_size`, token (i, j) sits at (i, j) · configured grid / actual grid, so a 256 model
    /// (sample_size 32) run on 512 latents sees DiffFit's (i/2, j/2) with the default 1. Set 2
    /// for the same positions in a model whose config says sample_size 64.
    #[serde(skip, default = "one")]
    pub pe_interpolation: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for DiTTransformer2DConfig {
    fn default() -> Self {
        DiTTransformer2DConfig {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: None,
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
            pe_interpolation: 1.0,
        }
    }
}

impl DiTTransformer2DConfig {
    /// Channels of the prediction.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Width of the tokens.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The number of classes, or what this implementation cannot build.
    fn check(&self) -> Result<i64, String> {
        if self.norm_type != "ada_norm_zero" {
            return Err(format!(
                "norm_type {:?}: DiTTransformer2DModel is built only with \"ada_norm_zero\" \
                 (diffusers refuses the others too); point at a DiT `transformer/` folder",
                self.norm_type
            ));
        }
        let classes = match self.num_embeds_ada_norm {
            Some(n) if n > 0 => n,
            other => {
                let value = other.map_or("null".into(), |n| n.to_string());
                return Err(format!(
                    "num_embeds_ada_norm {value}: adaLN-Zero embeds a class label, so set it to \
                     the number of classes (1000 for ImageNet DiT)"
                ));
            }
        };
        if !matches!(self.activation_fn.as_str(), "gelu-approximate" | "gelu") {
            return Err(format!(
                "activation_fn {:?}: only \"gelu-approximate\" (DiT's) and \"gelu\"",
                self.activation_fn
            ));
        }
        if self.patch_size < 1 || self.sample_size < 1 || self.sample_size % self.patch_size != 0 {
            return Err(format!(
                "patch_size {} with sample_size {} (the sample size must be a positive multiple \
                 of the patch size)",
                self.patch_size, self.sample_size
            ));
        }
        if self.num_attention_heads < 1 || self.attention_head_dim < 1 || self.inner_dim() % 4 != 0
        {
            return Err(format!(
                "num_attention_heads {} × attention_head_dim {} (their product is the token \
                 width, which the 2-D sin-cos positional embedding needs as a positive multiple \
                 of 4)",
                self.num_attention_heads, self.attention_head_dim
            ));
        }
        if self.num_layers < 1 || self.in_channels < 1 || self.out_channels() < 1 {
            return Err(format!(
                "num_layers {}, in_channels {}, out_channels {} (all must be at least 1: the \
                 output layer is conditioned through block 0's embedding)",
                self.num_layers,
                self.in_channels,
                self.out_channels()
            ));
        }
        Ok(classes)
    }
}

/// `get_2d_sincos_pos_embed`: the fixed position of each token of a `grid` = (rows, columns)
/// token grid, [rows · columns, dim] f32 in row-major token order.
///
/// Positions are scaled so the grid spans `base_size` tokens on each axis, then divided by
/// `interpolation_scale`. The first half of the channels encodes the column, the second the
/// row (diffusers' meshgrid puts w first); each half is [sin, cos] of the position times
/// 10000^(-k / (dim/4)), k < dim/4.
pub fn sincos_pos_embed_2d(
    dim: i64,
    grid: (i64, i64),
    base_size: i64,
    interpolation_scale: f64,
    device: Device,
) -> Tensor {
    let (rows, cols) = grid;
    // Positions in f32 and frequencies in f64, as diffusers computes them.
    let axis = |n: i64| {
        Tensor::arange(n, (Kind::Float, device))
            / (n as f64 / base_size as f64)
            / interpolation_scale
    };
    let quarter = dim / 4;
    let omega = (Tensor::arange(quarter, (Kind::Double, device))
        * (-(10000f64.ln()) / quarter as f64))
        .exp();
    let embed_1d = |pos: Tensor| {
        let angles = pos.to_kind(Kind::Double).outer(&omega);
        Tensor::cat(&[angles.sin(), angles.cos()], 1)
    };
    let col = axis(cols)
        .unsqueeze(0)
        .expand([rows, cols], false)
        .reshape([-1]);
    let row = axis(rows)
        .unsqueeze(1)
        .expand([rows, cols], false)
        .reshape([-1]);
    Tensor::cat(&[embed_1d(col), embed_1d(row)], 1).to_kind(Kind::Float)
}

/// `PatchEmbed`: a patch_size-strided convolution to tokens plus the 2-D sin-cos position.
#[derive(Debug)]
struct PatchEmbed {
    proj: nn::Conv2D,
    dim: i64,
    patch_size: i64,
    /// Tokens per side of the configured grid; positions on other grids are scaled to it.
    base_size: i64,
    interpolation_scale: f64,
}

impl PatchEmbed {
    fn new(vs: nn::Path, cfg: &DiTTransformer2DConfig) -> Self {
        let (dim, p) = (cfg.inner_dim(), cfg.patch_size);
        PatchEmbed {
            proj: conv(&vs / "proj", cfg.in_channels, dim, p, p, 0),
            dim,
            patch_size: p,
            base_size: cfg.sample_size / p,
            interpolation_scale: cfg.pe_interpolation,
        }
    }

    /// Tokens [B, H/p · W/p, dim] of a latent [B, C, H, W].
    fn forward(&self, latent: &Tensor) -> Tensor {
        let (_, _, h, w) = latent.size4().expect("a [B, C, H, W] latent");
        let tokens = self.proj.forward(latent).flatten(2, -1).transpose(1, 2);
        // The position is not a weight (diffusers does not save it): computed per call for this
        // grid on the latent's device, a handful of small kernels next to the blocks' work.
        let pos = sincos_pos_embed_2d(
            self.dim,
            (h / self.patch_size, w / self.patch_size),
            self.base_size,
            self.interpolation_scale,
            latent.device(),
        );
        // Added in fp32 (diffusers keeps the embedding fp32) and cast back.
        (tokens.to_kind(Kind::Float) + pos.unsqueeze(0)).to_kind(tokens.kind())
    }
}

/// Width of the timestep sinusoid, fixed by diffusers (DiT's frequency embedding size).
const TIME_PROJ_DIM: i64 = 256;

/// `CombinedTimestepLabelEmbeddings`: the timestep's sinusoid through an MLP plus the class
/// label's embedding (`class_embedder.embedding_table`, one row more than classes: the null
/// class). Label dropout for classifier-free training is the caller's: pass the null class.
#[derive(Debug)]
struct CombinedTimestepLabelEmbeddings {
    time_proj: Timesteps,
    timestep_embedder: TimestepEmbedding,
    class_embedder: nn::Embedding,
}

impl CombinedTimestepLabelEmbeddings {
    fn new(vs: nn::Path, classes: i64, dim: i64) -> Self {
        CombinedTimestepLabelEmbeddings {
            time_proj: Timesteps {
                dim: TIME_PROJ_DIM,
                flip_sin_to_cos: true,
                freq_shift: 1.0,
            },
            timestep_embedder: TimestepEmbedding::new(
                &vs / "timestep_embedder",
                TIME_PROJ_DIM,
                dim,
                None,
            ),
            class_embedder: nn::embedding(
                &vs / "class_embedder" / "embedding_table",
                classes + 1,
                dim,
                Default::default(),
            ),
        }
    }

    /// The conditioning [B, dim] of timesteps [B] and class ids [B] (i64), in `kind`.
    fn forward(&self, timestep: &Tensor, class_labels: &Tensor, kind: Kind) -> Tensor {
        let t = self.time_proj.forward(timestep).to_kind(kind);
        self.timestep_embedder.forward(&t, None) + self.class_embedder.forward(class_labels)
    }
}

/// `x · (1 + scale) + shift` with per-sample [B, dim] scale and shift over tokens [B, N, dim].
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// A LayerNorm without affine parameters (adaLN's modulation replaces them).
pub(super) fn plain_layer_norm(vs: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps,
        elementwise_affine: false,
        ..Default::default()
    };
    nn::layer_norm(vs, vec![dim], cfg)
}

/// `AdaLayerNormZero`: the block's own conditioning embedding, SiLU and a linear layer give six
/// modulations; the first two shift and scale the attention's input here.
#[derive(Debug)]
struct AdaLayerNormZero {
    emb: CombinedTimestepLabelEmbeddings,
    linear: nn::Linear,
    norm: nn::LayerNorm,
}

impl AdaLayerNormZero {
    fn new(vs: nn::Path, classes: i64, dim: i64) -> Self {
        AdaLayerNormZero {
            emb: CombinedTimestepLabelEmbeddings::new(&vs / "emb", classes, dim),
            linear: nn::linear(&vs / "linear", dim, 6 * dim, Default::default()),
            norm: plain_layer_norm(&vs / "norm", dim, 1e-6),
        }
    }

    /// The modulated input and (gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, dim], from
    /// the conditioning embedding `emb` [B, dim].
    fn forward(&self, x: &Tensor, emb: &Tensor) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp]: [Tensor; 6] = self
            .linear
            .forward(&emb.silu())
            .chunk(6, 1)
            .try_into()
            .expect("6·dim splits into six chunks");
        let x = modulate(&self.norm.forward(x), &shift_msa, &scale_msa);
        (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    }
}

/// `FeedForward` with a GELU input projection (`ff.net.0.proj`, `ff.net.2`), 4× wide.
#[derive(Debug)]
pub(super) struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    /// tch's name of the GELU: "tanh" (`gelu-approximate`) or "none".
    approximate: &'static str,
}

impl FeedForward {
    pub(super) fn new(vs: nn::Path, dim: i64, activation_fn: &str) -> Self {
        FeedForward {
            proj_in: Linear::new(&vs / "net" / 0 / "proj", dim, 4 * dim, true),
            proj_out: Linear::new(&vs / "net" / 2, 4 * dim, dim, true),
            approximate: if activation_fn == "gelu-approximate" {
                "tanh"
            } else {
                "none"
            },
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out
            .forward(&self.proj_in.forward(x).gelu(self.approximate))
    }

    /// `net.0.proj` and `net.2`.
    pub(super) fn linears(&self) -> [&Linear; 2] {
        [&self.proj_in, &self.proj_out]
    }
}

/// `BasicTransformerBlock` with `norm_type = "ada_norm_zero"`: adaLN-modulated self-attention
/// and feed-forward, each scaled by its gate before it is added back; no cross-attention.
#[derive(Debug)]
pub struct DiTBlock {
    name: String,
    dim: i64,
    gamma: GammaSlot,
    norm1: AdaLayerNormZero,
    attn1: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl DiTBlock {
    fn new(vs: nn::Path, cfg: &DiTTransformer2DConfig, classes: i64) -> Self {
        let dim = cfg.inner_dim();
        let norm3 = nn::LayerNormConfig {
            eps: cfg.norm_eps,
            elementwise_affine: cfg.norm_elementwise_affine,
            ..Default::default()
        };
        DiTBlock {
            name: vs.components().collect::<Vec<_>>().join("."),
            dim,
            gamma: GammaSlot::default(),
            norm1: AdaLayerNormZero::new(&vs / "norm1", classes, dim),
            attn1: Attention::new(
                &vs / "attn1",
                AttentionConfig {
                    query_dim: dim,
                    cross_attention_dim: None,
                    heads: cfg.num_attention_heads,
                    dim_head: cfg.attention_head_dim,
                    bias: cfg.attention_bias,
                    norm_num_groups: None,
                    eps: 1e-5,
                    residual_connection: false,
                    rescale_output_factor: 1.0,
                },
            ),
            norm3: nn::layer_norm(&vs / "norm3", vec![dim], norm3),
            ff: FeedForward::new(&vs / "ff", dim, &cfg.activation_fn),
        }
    }

    /// Every linear layer LoRA may target: attn1's projections, then ff.net.0.proj and ff.net.2
    /// (adaLN's modulation stays out, as in peft's usual DiT targets).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.attn1.linears().into();
        out.extend([&self.ff.proj_in, &self.ff.proj_out]);
        out
    }

    /// The block's conditioning embedding [B, dim] (its own copy of the timestep and class
    /// embedders).
    fn embed(&self, timestep: &Tensor, class_labels: &Tensor, kind: Kind) -> Tensor {
        self.norm1.emb.forward(timestep, class_labels, kind)
    }

    /// The block on tokens `x` conditioned on `emb` (see [`DiTBlock::embed`]).
    fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let gamma = self.gamma.get();
        let scale = |branch, pick| BranchScales::apply(&gamma, branch, pick);
        let (h, gate_msa, shift_mlp, scale_mlp, gate_mlp) = self.norm1.forward(x, emb);
        let attn = self.attn1.forward(&h, None) * gate_msa.unsqueeze(1);
        let x = scale(attn, |g| Some(&g.attn1)) + x;
        let h = modulate(&self.norm3.forward(&x), &shift_mlp, &scale_mlp);
        let ff = self.ff.forward(&h) * gate_mlp.unsqueeze(1);
        scale(ff, |g| Some(&g.ff)) + x
    }
}

impl ScaledBlock for DiTBlock {
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
        self.ff.proj_out.weight().device()
    }

    fn gamma_slot(&self) -> &GammaSlot {
        &self.gamma
    }

    fn merge_branch_scales(&self) {
        if let Some(g) = self.gamma.take() {
            self.attn1.linears()[3].scale_outputs(&g.attn1);
            self.ff.proj_out.scale_outputs(&g.ff);
        }
    }
}

/// `DiTTransformer2DModel`: patch embedding, adaLN-Zero blocks, and the modulated output layer
/// (`norm_out` without affine, `proj_out_1` giving shift and scale from the conditioning,
/// `proj_out_2` giving each token's patch), unpatchified to an image.
#[derive(Debug)]
pub struct DiTTransformer2DModel {
    pos_embed: PatchEmbed,
    transformer_blocks: Vec<DiTBlock>,
    norm_out: nn::LayerNorm,
    proj_out_1: nn::Linear,
    proj_out_2: nn::Linear,
    /// Every block holds the same embedding weights as block 0 (converted DiT checkpoints copy
    /// DiT's one embedder into each block), so block 0's embedding serves all of them.
    shared_conditioning: bool,
    /// The config it was built from.
    pub config: DiTTransformer2DConfig,
}

impl DiTTransformer2DModel {
    /// Lays out the parameters under `vs`. Panics on a config that
    /// [`DiTTransformer2DModel::load`] would reject as unsupported.
    pub fn new(vs: nn::Path, cfg: &DiTTransformer2DConfig) -> Self {
        let classes = cfg
            .check()
            .unwrap_or_else(|why| panic!("unsupported DiT config: {why}"));
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        DiTTransformer2DModel {
            pos_embed: PatchEmbed::new(&vs / "pos_embed", cfg),
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| DiTBlock::new(&vs / "transformer_blocks" / i, cfg, classes))
                .collect(),
            norm_out: plain_layer_norm(&vs / "norm_out", dim, 1e-6),
            proj_out_1: nn::linear(&vs / "proj_out_1", dim, 2 * dim, Default::default()),
            proj_out_2: nn::linear(
                &vs / "proj_out_2",
                dim,
                p * p * cfg.out_channels(),
                Default::default(),
            ),
            shared_conditioning: false,
            config: cfg.clone(),
        }
    }

    /// Loads a `transformer/` folder (config.json + safetensors) with weights in `kind` on
    /// `device`. When every block's conditioning embedding is a copy of block 0's, as in
    /// converted DiT checkpoints, it is computed once per forward pass instead of per block.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        let config: DiTTransformer2DConfig = read_config(dir)?;
        Self::load_with_config(dir, &config, device, kind, variant)
    }

    /// [`DiTTransformer2DModel::load`] with a config read from `dir` and then adjusted, e.g.
    /// its `pe_interpolation`.
    pub fn load_with_config(
        dir: &Path,
        config: &DiTTransformer2DConfig,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        // An unsupported config is the more useful error when the weights are missing too.
        config.check().map_err(|why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        })?;
        Self::load_with_weights(dir, config, &weight_files(dir, variant)?, device, kind)
    }

    /// [`DiTTransformer2DModel::load_with_config`] with the weights read from `files` (e.g. a
    /// merged export) instead of the folder's.
    pub fn load_with_weights(
        dir: &Path,
        config: &DiTTransformer2DConfig,
        files: &[std::path::PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        config.check().map_err(|why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        })?;
        let (vs, mut model) = build_and_load(files, device, kind, |vs| {
            DiTTransformer2DModel::new(vs, config)
        })?;
        model.shared_conditioning = Self::embeddings_are_copies(&vs, config.num_layers);
        Ok((vs, model))
    }

    /// Whether every block's `norm1.emb` weights equal block 0's.
    fn embeddings_are_copies(vs: &nn::VarStore, layers: i64) -> bool {
        let vars = vs.variables();
        let prefix = |i: i64| format!("transformer_blocks.{i}.norm1.emb.");
        let first: Vec<(&str, &Tensor)> = vars
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&prefix(0)).map(|rest| (rest, t)))
            .collect();
        (1..layers).all(|i| {
            first.iter().all(|(rest, t)| {
                vars.get(&format!("{}{rest}", prefix(i)))
                    .is_some_and(|other| other.equal(t))
            })
        })
    }

    /// The same layout with fresh parameters under `vs`, sharing the conditioning as this
    /// model does (the skeleton of a frozen copy).
    pub fn clone_layout(&self, vs: nn::Path) -> Self {
        let mut model = DiTTransformer2DModel::new(vs, &self.config);
        model.shared_conditioning = self.shared_conditioning;
        model
    }

    /// Makes every block use block 0's conditioning embedding, as DiT's one embedder (copies its
    /// values into the other blocks' copies, so a diffusers export stays consistent).
    pub fn share_conditioning(&mut self, vs: &nn::VarStore) {
        self.copy_shared_conditioning(vs);
        self.shared_conditioning = true;
    }

    /// Copies block 0's conditioning embedding (what trains when it is shared) into the other
    /// blocks' copies, which diffusers reads.
    pub fn copy_shared_conditioning(&self, vs: &nn::VarStore) {
        let vars = vs.variables();
        let first = "transformer_blocks.0.norm1.emb.";
        tch::no_grad(|| {
            for (name, t) in &vars {
                if let Some(rest) = name.strip_prefix(first) {
                    for i in 1..self.transformer_blocks.len() {
                        let copy = &vars[&format!("transformer_blocks.{i}.norm1.emb.{rest}")];
                        copy.shallow_clone().copy_(t);
                    }
                }
            }
        });
    }

    /// Whether the forward pass reads the variable `name`: all but the blocks' embedding copies
    /// that block 0's shared embedding stands in for.
    pub fn reads(&self, name: &str) -> bool {
        if !self.shared_conditioning {
            return true;
        }
        match name
            .strip_prefix("transformer_blocks.")
            .and_then(|rest| rest.split_once('.'))
        {
            Some((block, inner)) => block == "0" || !inner.starts_with("norm1.emb."),
            None => true,
        }
    }

    /// Whether block 0's conditioning embedding serves every block (see
    /// [`DiTTransformer2DModel::load`]): then the other blocks' copies are never read, and only
    /// block 0's need training.
    pub fn shares_conditioning(&self) -> bool {
        self.shared_conditioning
    }

    /// The transformer blocks, in order.
    pub fn blocks(&self) -> &[DiTBlock] {
        &self.transformer_blocks
    }

    /// Predicts the model output [B, out_channels, H, W] for `sample` [B, C, H, W] (H and W
    /// multiples of the patch size) at `timestep` (a scalar or [B], float) for `class_labels`
    /// [B] (i64 in 0..=num_embeds_ada_norm; the last is the null class).
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, class_labels: &Tensor) -> Tensor {
        let (b, _, h, w) = sample.size4().expect("a [B, C, H, W] latent");
        let p = self.config.patch_size;
        assert!(
            h % p == 0 && w % p == 0,
            "a {h}×{w} latent does not split into {p}×{p} patches"
        );
        let timesteps = if timestep.dim() == 0 {
            timestep.unsqueeze(0)
        } else {
            timestep.shallow_clone()
        }
        .expand([b], false);

        let mut x = self.pos_embed.forward(sample);
        let kind = x.kind();
        // Diffusers conditions the output layer on block 0's embedding.
        let cond = self.transformer_blocks[0].embed(&timesteps, class_labels, kind);
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            x = if self.shared_conditioning || i == 0 {
                block.forward(&x, &cond)
            } else {
                block.forward(&x, &block.embed(&timesteps, class_labels, kind))
            };
        }

        let [shift, scale]: [Tensor; 2] = self
            .proj_out_1
            .forward(&cond.silu())
            .chunk(2, 1)
            .try_into()
            .expect("2·dim splits into two chunks");
        let x = self
            .proj_out_2
            .forward(&modulate(&self.norm_out.forward(&x), &shift, &scale));

        // Unpatchify: token (i, j) holds a p×p×C patch in (p, q, c) order. Diffusers assumes a
        // square token grid here; the grid's own rows and columns also serve other shapes.
        let (rows, cols, c) = (h / p, w / p, self.config.out_channels());
        x.reshape([b, rows, cols, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c, h, w])
    }
}
