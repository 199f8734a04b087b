//! The transformer shared by both CLIP towers: `CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer`
//! and `CLIPEncoder` (pre-LayerNorm residual blocks).

use tch::{nn, nn::Module, Tensor};

use super::config::Activation;

/// The sizes one encoder is built with (the text and vision configs both carry them).
#[derive(Debug, Clone, Copy)]
pub struct EncoderSpec {
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of each MLP.
    pub intermediate_size: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Number of layers.
    pub num_hidden_layers: i64,
    /// MLP nonlinearity.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

/// How self-attention is restricted.
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    /// Every position sees every position (vision tower).
    None,
    /// Each position sees itself and earlier positions (text tower without padding mask).
    Causal,
    /// A boolean `[B, 1, T, T]` mask, true where attention is allowed.
    Explicit(&'a Tensor),
}

/// `CLIPAttention`: multi-head self-attention.
#[derive(Debug)]
pub struct ClipAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    num_heads: i64,
}

impl ClipAttention {
    fn new(p: nn::Path, spec: &EncoderSpec) -> Self {
        let d = spec.hidden_size;
        let c = Default::default();
        ClipAttention {
            q_proj: nn::linear(&p / "q_proj", d, d, c),
            k_proj: nn::linear(&p / "k_proj", d, d, c),
            v_proj: nn::linear(&p / "v_proj", d, d, c),
            out_proj: nn::linear(&p / "out_proj", d, d, c),
            num_heads: spec.num_attention_heads,
        }
    }

    fn forward(&self, xs: &Tensor, mask: Mask) -> Tensor {
        let (b, t, d) = xs
            .size3()
            .expect("hidden states are [batch, tokens, width]");
        let heads = |proj: &nn::Linear| {
            proj.forward(xs)
                .view([b, t, self.num_heads, d / self.num_heads])
                .transpose(1, 2)
        };
        let (q, k, v) = (
            heads(&self.q_proj),
            heads(&self.k_proj),
            heads(&self.v_proj),
        );
        // The default scale of scaled_dot_product_attention is head_dim^-0.5, as in CLIP.
        let out = match mask {
            Mask::None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, false,
            ),
            Mask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, false,
            ),
            Mask::Explicit(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false)
            }
        };
        self.out_proj
            .forward(&out.transpose(1, 2).contiguous().view([b, t, d]))
    }
}

/// `CLIPMLP`: fc1, activation, fc2.
#[derive(Debug)]
pub struct ClipMlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    act: Activation,
}

impl ClipMlp {
    fn new(p: nn::Path, spec: &EncoderSpec) -> Self {
        let c = Default::default();
        ClipMlp {
            fc1: nn::linear(&p / "fc1", spec.hidden_size, spec.intermediate_size, c),
            fc2: nn::linear(&p / "fc2", spec.intermediate_size, spec.hidden_size, c),
            act: spec.hidden_act,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)))
    }
}

/// `CLIPEncoderLayer`: pre-LayerNorm attention and MLP, each with a residual connection.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: nn::LayerNorm,
    mlp: ClipMlp,
    layer_norm2: nn::LayerNorm,
}

impl ClipEncoderLayer {
    fn new(p: nn::Path, spec: &EncoderSpec) -> Self {
        let ln = nn::LayerNormConfig {
            eps: spec.layer_norm_eps,
            ..Default::default()
        };
        ClipEncoderLayer {
            self_attn: ClipAttention::new(&p / "self_attn", spec),
            layer_norm1: nn::layer_norm(&p / "layer_norm1", vec![spec.hidden_size], ln),
            mlp: ClipMlp::new(&p / "mlp", spec),
            layer_norm2: nn::layer_norm(&p / "layer_norm2", vec![spec.hidden_size], ln),
        }
    }

    fn forward(&self, xs: &Tensor, mask: Mask) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs), mask);
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs))
    }
}

/// `CLIPEncoder`: the stack of layers.
#[derive(Debug)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// Lays out `spec.num_hidden_layers` layers under `p/layers/N`.
    pub fn new(p: nn::Path, spec: &EncoderSpec) -> Self {
        let layers = (0..spec.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&p / "layers" / i, spec))
            .collect();
        ClipEncoder { layers }
    }

    /// Runs every layer; returns the input followed by each layer's output (as transformers'
    /// `hidden_states`, the last one before any final LayerNorm).
    pub fn forward(&self, xs: &Tensor, mask: Mask) -> Vec<Tensor> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(xs.shallow_clone());
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("starts non-empty"), mask);
            states.push(next);
        }
        states
    }
}
