//! Diffusers' `Transformer2DModel` with `BasicTransformerBlock`s (models/transformers/
//! transformer_2d.py, models/attention.py): the attention blocks of SD and SDXL UNets.

use std::sync::Mutex;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::attention::{Attention, AttentionConfig};
use super::linear::Linear;
use super::resnet::group_norm;

/// `FeedForward` with a GEGLU input projection (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vs: nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        FeedForward {
            proj_in: Linear::new(&vs / "net" / 0 / "proj", dim, 2 * inner, true),
            proj_out: Linear::new(&vs / "net" / 2, inner, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let parts = self.proj_in.forward(x).chunk(2, -1);
        self.proj_out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

/// DiffFit's per-channel scale factors of a block's residual branches (init 1.0), applied to each
/// branch's output before it is added back (after DiT's adaLN-Zero gate, which also acts per
/// channel).
#[derive(Debug)]
pub struct BranchScales {
    /// γ of the self-attention branch, [dim].
    pub attn1: Tensor,
    /// γ of the cross-attention branch, [dim]; `None` in blocks without one (DiT's).
    pub attn2: Option<Tensor>,
    /// γ of the feed-forward branch, [dim].
    pub ff: Tensor,
}

impl BranchScales {
    /// γ = 1 for every branch of `block`, fp32, trainable.
    pub fn ones(block: &dyn ScaledBlock) -> BranchScales {
        let ones =
            || Tensor::ones([block.dim()], (Kind::Float, block.device())).set_requires_grad(true);
        BranchScales {
            attn1: ones(),
            attn2: block.has_cross_attention().then(ones),
            ff: ones(),
        }
    }

    /// The γ with their names relative to the block (`gamma_attn1`, …).
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("gamma_attn1", &self.attn1)];
        if let Some(a2) = &self.attn2 {
            out.push(("gamma_attn2", a2));
        }
        out.push(("gamma_ff", &self.ff));
        out
    }

    fn shallow_clone(&self) -> BranchScales {
        BranchScales {
            attn1: self.attn1.shallow_clone(),
            attn2: self.attn2.as_ref().map(Tensor::shallow_clone),
            ff: self.ff.shallow_clone(),
        }
    }

    /// `branch` times the γ `pick` selects, in the branch's dtype (γ may be fp32 while the block
    /// runs in bf16/fp16); `branch` itself without scales.
    pub fn apply(
        scales: &Option<BranchScales>,
        branch: Tensor,
        pick: fn(&BranchScales) -> Option<&Tensor>,
    ) -> Tensor {
        match scales.as_ref().and_then(pick) {
            Some(g) => {
                let kind = branch.kind();
                branch * g.to_kind(kind)
            }
            None => branch,
        }
    }
}

/// A transformer block whose residual branches DiffFit scales: the UNet's
/// [`BasicTransformerBlock`] and DiT's block.
pub trait ScaledBlock {
    /// The block's dotted name, e.g. `mid_block.attentions.0.transformer_blocks.0`.
    fn name(&self) -> &str;
    /// Channels of the block's tokens (the length of each γ).
    fn dim(&self) -> i64;
    /// Whether the block has a cross-attention branch (`attn2`).
    fn has_cross_attention(&self) -> bool;
    /// Where the block's weights live.
    fn device(&self) -> Device;
    /// The block's γ slot.
    fn gamma_slot(&self) -> &GammaSlot;
    /// Attaches (or with `None` removes) the branch scales.
    fn set_branch_scales(&self, gamma: Option<BranchScales>) {
        self.gamma_slot().set(gamma);
    }
    /// The attached branch scales (sharing their tensors), if any.
    fn branch_scales(&self) -> Option<BranchScales> {
        self.gamma_slot().get()
    }
    /// Folds attached scales into the layers that end each branch (attention's to_out.0,
    /// ff.net.2) and removes them; the block computes the same function after.
    fn merge_branch_scales(&self);
}

/// The γ slot every [`ScaledBlock`] keeps.
#[derive(Debug, Default)]
pub struct GammaSlot(Mutex<Option<BranchScales>>);

impl GammaSlot {
    /// Replaces the slot's content.
    pub fn set(&self, gamma: Option<BranchScales>) {
        *self.0.lock().expect("the γ slot lock is never poisoned") = gamma;
    }

    /// The content, sharing its tensors.
    pub fn get(&self) -> Option<BranchScales> {
        self.0
            .lock()
            .expect("the γ slot lock is never poisoned")
            .as_ref()
            .map(BranchScales::shallow_clone)
    }

    /// Takes the content out.
    pub fn take(&self) -> Option<BranchScales> {
        self.0
            .lock()
            .expect("the γ slot lock is never poisoned")
            .take()
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention and a feed-forward layer, each
/// pre-normed with LayerNorm and added back.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    name: String,
    dim: i64,
    gamma: GammaSlot,
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vs: nn::Path, dim: i64, heads: i64, dim_head: i64, cross_attention_dim: i64) -> Self {
        let ln = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default());
        let attn = |name: &str, cross: Option<i64>| {
            Attention::new(
                &vs / name,
                AttentionConfig {
                    query_dim: dim,
                    cross_attention_dim: cross,
                    heads,
                    dim_head,
                    bias: false,
                    norm_num_groups: None,
                    eps: 1e-5,
                    residual_connection: false,
                    rescale_output_factor: 1.0,
                },
            )
        };
        BasicTransformerBlock {
            name: vs.components().collect::<Vec<_>>().join("."),
            dim,
            gamma: GammaSlot::default(),
            norm1: ln("norm1"),
            attn1: attn("attn1", None),
            norm2: ln("norm2"),
            attn2: attn("attn2", Some(cross_attention_dim)),
            norm3: ln("norm3"),
            ff: FeedForward::new(&vs / "ff", dim),
        }
    }

    /// Every linear layer: attn1's and attn2's projections, then ff.net.0.proj and ff.net.2.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.attn1.linears().into();
        out.extend(self.attn2.linears());
        out.extend([&self.ff.proj_in, &self.ff.proj_out]);
        out
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let gamma = self.gamma.get();
        let scale = |branch, pick| BranchScales::apply(&gamma, branch, pick);
        let x = scale(self.attn1.forward(&self.norm1.forward(x), None), |g| {
            Some(&g.attn1)
        }) + x;
        let x = scale(
            self.attn2.forward(&self.norm2.forward(&x), Some(context)),
            |g| g.attn2.as_ref(),
        ) + x;
        scale(self.ff.forward(&self.norm3.forward(&x)), |g| Some(&g.ff)) + x
    }
}

impl ScaledBlock for BasicTransformerBlock {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> i64 {
        self.dim
    }

    fn has_cross_attention(&self) -> bool {
        true
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
            if let Some(a2) = &g.attn2 {
                self.attn2.linears()[3].scale_outputs(a2);
            }
            self.ff.proj_out.scale_outputs(&g.ff);
        }
    }
}

/// Construction options of [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    /// Channels of the feature map.
    pub in_channels: i64,
    /// Attention heads.
    pub heads: i64,
    /// Channels per head.
    pub dim_head: i64,
    /// Transformer blocks.
    pub num_layers: i64,
    /// Channels of the text embeddings.
    pub cross_attention_dim: i64,
    /// GroupNorm groups of the input norm.
    pub norm_num_groups: i64,
    /// Linear (SD 2 / SDXL) rather than 1×1-conv (SD 1) input and output projections.
    pub use_linear_projection: bool,
}

#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(nn::Conv2D),
}

/// `Transformer2DModel` over a feature map: GroupNorm, projection to tokens, transformer
/// blocks, projection back, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Lays out the parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: Transformer2DConfig) -> Self {
        let inner = cfg.heads * cfg.dim_head;
        let proj = |name: &str, i: i64, o: i64| {
            if cfg.use_linear_projection {
                Projection::Linear(Linear::new(&vs / name, i, o, true))
            } else {
                Projection::Conv(nn::conv2d(&vs / name, i, o, 1, Default::default()))
            }
        };
        Transformer2DModel {
            norm: group_norm(&vs / "norm", cfg.norm_num_groups, cfg.in_channels, 1e-6),
            proj_in: proj("proj_in", cfg.in_channels, inner),
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &vs / "transformer_blocks" / i,
                        inner,
                        cfg.heads,
                        cfg.dim_head,
                        cfg.cross_attention_dim,
                    )
                })
                .collect(),
            proj_out: proj("proj_out", inner, cfg.in_channels),
        }
    }

    /// The transformer blocks, in order.
    pub fn blocks(&self) -> &[BasicTransformerBlock] {
        &self.transformer_blocks
    }

    /// Every linear layer: proj_in (when linear), the blocks' layers, proj_out (when linear).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        if let Projection::Linear(l) = &self.proj_in {
            out.push(l);
        }
        out.extend(self.transformer_blocks.iter().flat_map(|b| b.linears()));
        if let Projection::Linear(l) = &self.proj_out {
            out.push(l);
        }
        out
    }

    /// Applies the blocks to `x` [B, C, H, W] attending to `context` [B, T, D].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("a [B, C, H, W] feature map");
        let normed = self.norm.forward(x);
        let to_tokens = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let from_tokens = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(normed)),
            Projection::Conv(c) => to_tokens(c.forward(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => from_tokens(l.forward(&tokens)),
            Projection::Conv(c) => c.forward(&from_tokens(tokens)),
        };
        out + x
    }
}
