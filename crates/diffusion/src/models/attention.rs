//! Diffusers' `Attention` with the default (scaled-dot-product) processor
//! (models/attention_processor.py): self- or cross-attention over tokens, or over the pixels of
//! a feature map with an optional GroupNorm and residual (the VAE's mid-block attention).

use tch::nn::{self, Module};
use tch::Tensor;

use super::linear::Linear;
use super::resnet::group_norm;

/// Construction options of [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Channels of the queries (and of the output).
    pub query_dim: i64,
    /// Channels of the keys/values' source; `None` for self-attention.
    pub cross_attention_dim: Option<i64>,
    /// Number of heads.
    pub heads: i64,
    /// Channels per head.
    pub dim_head: i64,
    /// Bias on to_q / to_k / to_v.
    pub bias: bool,
    /// GroupNorm groups applied to the input first (the VAE), if any.
    pub norm_num_groups: Option<i64>,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Add the input to the output.
    pub residual_connection: bool,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
}

/// Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`,
/// `group_norm`).
#[derive(Debug)]
pub struct Attention {
    group_norm: Option<nn::GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    residual_connection: bool,
    rescale_output_factor: f64,
}

impl Attention {
    /// Lays out the parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: AttentionConfig) -> Self {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let lin = |name: &str, i: i64, o: i64, bias: bool| Linear::new(&vs / name, i, o, bias);
        Attention {
            group_norm: cfg
                .norm_num_groups
                .map(|g| group_norm(&vs / "group_norm", g, cfg.query_dim, cfg.eps)),
            to_q: lin("to_q", cfg.query_dim, inner, cfg.bias),
            to_k: lin("to_k", kv_dim, inner, cfg.bias),
            to_v: lin("to_v", kv_dim, inner, cfg.bias),
            to_out: Linear::new(&vs / "to_out" / "0", inner, cfg.query_dim, true),
            heads: cfg.heads,
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        }
    }

    /// The projections to_q, to_k, to_v, to_out.0 (the default LoRA targets).
    pub fn linears(&self) -> [&Linear; 4] {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }

    /// Attends `x` ([B, N, C] tokens or a [B, C, H, W] map) to `context` (or to itself).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let tokens = if size.len() == 4 {
            x.view([size[0], size[1], size[2] * size[3]])
                .transpose(1, 2)
        } else {
            x.shallow_clone()
        };
        let normed = match &self.group_norm {
            Some(gn) => gn.forward(&tokens.transpose(1, 2)).transpose(1, 2),
            None => tokens.shallow_clone(),
        };
        let context = context.unwrap_or(&normed);
        let (b, n) = (normed.size()[0], normed.size()[1]);
        let split = |t: Tensor| {
            let len = t.size()[1];
            t.view([b, len, self.heads, -1]).transpose(1, 2)
        };
        let q = split(self.to_q.forward(&normed));
        let k = split(self.to_k.forward(context));
        let v = split(self.to_v.forward(context));
        let attended = sdpa(&q, &k, &v);
        let mut out = self
            .to_out
            .forward(&attended.transpose(1, 2).reshape([b, n, -1]));
        if size.len() == 4 {
            out = out.transpose(1, 2).reshape(size.as_slice());
        }
        if self.residual_connection {
            out += x;
        }
        if self.rescale_output_factor != 1.0 {
            out /= self.rescale_output_factor;
        }
        out
    }
}

/// Softmax attention of q, k, v [B, heads, tokens, head dim] with the 1/sqrt(head dim) scale,
/// no mask and no dropout: `F.scaled_dot_product_attention(q, k, v)`.
pub(crate) fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, None, false)
}
