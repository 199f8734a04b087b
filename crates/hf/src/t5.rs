//! transformers' `T5EncoderModel` (models/t5/modeling_t5.py) and its fast tokenizer: the T5
//! text encoder of SD3 / SD3.5 (`text_encoder_3`) and FLUX (`text_encoder_2`). RMS layer norms
//! without a mean, unscaled attention with a learned relative-position bias computed by the first
//! block and shared by all, and a gated-GELU (T5 v1.1) or ReLU feed-forward.
//!
//! The diffusers pipelines pad every prompt to `max_sequence_length` (SD3 256, FLUX 512) and run
//! the encoder without an attention mask, so the padding tokens take part; [`T5Tokenizer::encode`]
//! and [`T5EncoderModel::forward`] do the same.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::load::{build_and_load, read_config, weight_files, LoadError};
use crate::padded_tokenizer::PaddedTokenizer;
use crate::HfError;

/// `text_encoder_3/config.json` (a transformers `T5Config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct T5Config {
    /// Vocabulary rows of the embedding.
    pub vocab_size: i64,
    /// Token width.
    pub d_model: i64,
    /// Width per head.
    pub d_kv: i64,
    /// Feed-forward width.
    pub d_ff: i64,
    /// Encoder blocks.
    pub num_layers: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Buckets of the relative-position bias.
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which positions share the last bucket.
    pub relative_attention_max_distance: i64,
    /// Epsilon of the RMS layer norms.
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, what SD3 and FLUX use) or `relu` (the original T5).
    pub feed_forward_proj: String,
}

impl Default for T5Config {
    fn default() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    fn gated(&self) -> Result<bool, String> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(true),
            "relu" => Ok(false),
            other => Err(format!(
                "feed_forward_proj {other:?}: only \"gated-gelu\" (T5 v1.1, SD3's and FLUX's \
                 T5-XXL) and \"relu\""
            )),
        }
    }

    fn check(&self) -> Result<(), String> {
        self.gated()?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ];
        match sizes.iter().find(|(_, v)| *v < 1) {
            Some((key, v)) => Err(format!("{key} {v}: it must be at least 1")),
            None if self.relative_attention_max_distance
                <= self.relative_attention_num_buckets / 4 =>
            {
                Err(format!(
                    "relative_attention_max_distance {} must exceed a quarter of the buckets",
                    self.relative_attention_max_distance
                ))
            }
            None => Ok(()),
        }
    }
}

/// An RMS norm with a weight: x · rsqrt(mean(x²) + ε) · w (no mean subtracted, no bias),
/// statistics in fp32; half-precision weights take the normed values in their precision first.
/// transformers' `T5LayerNorm`, and diffusers' `RMSNorm` (SD3's and FLUX's query / key norms).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Lays out `weight` [dim] under `vs`.
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: vs.ones("weight", &[dim]),
            eps,
        }
    }

    /// Multiplies the weight by `by` in place (folding a per-channel scale into the norm).
    pub fn scale_weight(&self, by: &Tensor) {
        tch::no_grad(|| {
            let mut w = self.weight.shallow_clone();
            let _ = w.g_mul_(&by.to_kind(w.kind()));
        });
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x
            .to_kind(Kind::Float)
            .square()
            .mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        match self.weight.kind() {
            Kind::Half | Kind::BFloat16 => &self.weight * normed.to_kind(self.weight.kind()),
            _ => &self.weight * normed,
        }
    }
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        vs,
        i,
        o,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

/// One encoder block: self-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug)]
struct T5Block {
    attn_norm: RmsNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    ff_norm: RmsNorm,
    wi: nn::Linear,
    /// The gate's second input projection (gated-GELU only).
    wi_1: Option<nn::Linear>,
    wo: nn::Linear,
    heads: i64,
}

impl T5Block {
    fn new(vs: nn::Path, cfg: &T5Config, gated: bool) -> Self {
        let inner = cfg.num_heads * cfg.d_kv;
        let attn = &vs / "layer" / 0;
        let ff = &vs / "layer" / 1;
        let dense = &ff / "DenseReluDense";
        T5Block {
            attn_norm: RmsNorm::new(&attn / "layer_norm", cfg.d_model, cfg.layer_norm_epsilon),
            q: linear(&attn / "SelfAttention" / "q", cfg.d_model, inner),
            k: linear(&attn / "SelfAttention" / "k", cfg.d_model, inner),
            v: linear(&attn / "SelfAttention" / "v", cfg.d_model, inner),
            o: linear(&attn / "SelfAttention" / "o", inner, cfg.d_model),
            ff_norm: RmsNorm::new(&ff / "layer_norm", cfg.d_model, cfg.layer_norm_epsilon),
            wi: linear(
                &dense / if gated { "wi_0" } else { "wi" },
                cfg.d_model,
                cfg.d_ff,
            ),
            wi_1: gated.then(|| linear(&dense / "wi_1", cfg.d_model, cfg.d_ff)),
            wo: linear(&dense / "wo", cfg.d_ff, cfg.d_model),
            heads: cfg.num_heads,
        }
    }

    fn forward(&self, x: &Tensor, position_bias: &Tensor) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let normed = self.attn_norm.forward(x);
        let split = |t: Tensor| t.view([b, n, self.heads, -1]).transpose(1, 2);
        let (q, k, v) = (
            split(self.q.forward(&normed)),
            split(self.k.forward(&normed)),
            split(self.v.forward(&normed)),
        );
        // T5 folds 1/sqrt(d) into its weights: the scores are not scaled.
        let scores = q.matmul(&k.transpose(-1, -2)) + position_bias;
        let weights = scores
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .to_kind(scores.kind());
        let attended = weights.matmul(&v).transpose(1, 2).reshape([b, n, -1]);
        let x = clamp_half(x + self.o.forward(&attended));
        let normed = self.ff_norm.forward(&x);
        let hidden = match &self.wi_1 {
            Some(wi_1) => self.wi.forward(&normed).gelu("tanh") * wi_1.forward(&normed),
            None => self.wi.forward(&normed).relu(),
        };
        clamp_half(&x + self.wo.forward(&hidden))
    }
}

/// T5's fp16 guard, as `T5Block` does it: infinities clamped into the fp16 range (1000 inside
/// it when any occurred).
fn clamp_half(x: Tensor) -> Tensor {
    if x.kind() != Kind::Half {
        return x;
    }
    const F16_MAX: f64 = 65504.0;
    let any_inf = x.isinf().any().int64_value(&[]) != 0;
    let max = if any_inf { F16_MAX - 1000.0 } else { F16_MAX };
    x.clamp(-max, max)
}

/// T5's bidirectional relative-position bucket of `relative` (memory − query position).
fn bucket(relative: i64, num_buckets: i64, max_distance: i64) -> i64 {
    let half = num_buckets / 2;
    let mut out = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    if distance < max_exact {
        out += distance;
    } else {
        // fp32 as transformers computes it, then truncated toward zero.
        let large = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32;
        out += (max_exact + large as i64).min(half - 1);
    }
    out
}

/// transformers' `T5EncoderModel`.
#[derive(Debug)]
pub struct T5EncoderModel {
    config: T5Config,
    shared: nn::Embedding,
    relative_attention_bias: nn::Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: RmsNorm,
}

impl T5EncoderModel {
    /// Lays out the parameters under `vs` with transformers' names.
    pub fn new(vs: nn::Path, config: &T5Config) -> Result<Self, String> {
        config.check()?;
        let gated = config.gated()?;
        let encoder = &vs / "encoder";
        Ok(T5EncoderModel {
            config: config.clone(),
            shared: nn::embedding(
                &vs / "shared",
                config.vocab_size,
                config.d_model,
                Default::default(),
            ),
            relative_attention_bias: nn::embedding(
                &encoder / "block" / 0 / "layer" / 0 / "SelfAttention" / "relative_attention_bias",
                config.relative_attention_num_buckets,
                config.num_heads,
                Default::default(),
            ),
            blocks: (0..config.num_layers)
                .map(|i| T5Block::new(&encoder / "block" / i, config, gated))
                .collect(),
            final_layer_norm: RmsNorm::new(
                &encoder / "final_layer_norm",
                config.d_model,
                config.layer_norm_epsilon,
            ),
        })
    }

    /// Loads a transformers folder (config.json + model.safetensors, sharded or not).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Self), LoadError> {
        let config: T5Config = read_config(dir)?;
        let unsupported = |why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        };
        config.check().map_err(unsupported)?;
        let (vs, model) = build_and_load(&weight_files(dir, None)?, device, kind, |vs| {
            T5EncoderModel::new(vs, &config)
        })?;
        Ok((vs, model.map_err(unsupported)?))
    }

    /// The config.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The relative-position bias [1, heads, n, n] of an n-token sequence.
    fn position_bias(&self, n: i64, device: Device) -> Tensor {
        let c = &self.config;
        let buckets: Vec<i64> = (0..n)
            .flat_map(|q| {
                (0..n).map(move |m| {
                    bucket(
                        m - q,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let ids = Tensor::from_slice(&buckets).view([n, n]).to_device(device);
        self.relative_attention_bias
            .forward(&ids)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    /// The last hidden state [B, n, d_model] of token ids [B, n] (no attention mask, as the
    /// diffusers pipelines call it).
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let n = input_ids.size()[1];
        let mut x = self.shared.forward(input_ids);
        let bias = self.position_bias(n, x.device()).to_kind(x.kind());
        for block in &self.blocks {
            x = block.forward(&x, &bias);
        }
        self.final_layer_norm.forward(&x)
    }
}

/// A T5 fast tokenizer (`tokenizer.json`), padding and truncating every prompt to one length
/// and ending it with `</s>`, as the diffusers pipelines call it.
#[derive(Debug)]
pub struct T5Tokenizer(PaddedTokenizer);

impl T5Tokenizer {
    /// Reads `dir/tokenizer.json`; every prompt becomes exactly `max_length` ids (SD3: 256,
    /// FLUX.1-schnell: 256, FLUX.1-dev: 512), padded with `<pad>`.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self, HfError> {
        PaddedTokenizer::from_dir(dir, max_length, "<pad>", "a T5 fast tokenizer").map(T5Tokenizer)
    }

    /// Ids [B, max_length] (int64) of `prompts` on `device` (the pipelines pass no mask).
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<Tensor, HfError> {
        Ok(self.0.encode(prompts, device)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets of transformers' `_relative_position_bucket` (32 buckets, distance 128).
    #[test]
    fn relative_position_buckets_match_transformers() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (20, 26),
            (-20, 10),
            (127, 31),
            (-500, 15),
        ];
        for (relative, want) in cases {
            assert_eq!(bucket(relative, 32, 128), want, "relative {relative}");
        }
    }

    #[test]
    fn an_unsupported_feed_forward_is_named() {
        let config = T5Config {
            feed_forward_proj: "gated-silu".into(),
            ..Default::default()
        };
        assert!(config.check().unwrap_err().contains("gated-silu"));
    }
}
