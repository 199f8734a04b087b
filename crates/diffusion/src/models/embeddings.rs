//! Diffusers' timestep embeddings (models/embeddings.py): the sinusoidal `Timesteps`
//! projection and the `TimestepEmbedding` MLP.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sinusoidal embedding of (possibly fractional) timesteps, `get_timestep_embedding`.
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    /// Embedding width.
    pub dim: i64,
    /// Put the cosines first.
    pub flip_sin_to_cos: bool,
    /// Diffusers' `downscale_freq_shift`.
    pub freq_shift: f64,
}

impl Timesteps {
    /// Embeds a 1-D tensor of timesteps as [N, dim] float32.
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        let half = self.dim / 2;
        let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64.ln()))
            / (half as f64 - self.freq_shift);
        let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
        let (sin, cos) = (args.sin(), args.cos());
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], -1)
        } else {
            Tensor::cat(&[sin, cos], -1)
        };
        if self.dim % 2 == 1 {
            emb.constant_pad_nd([0, 1, 0, 0])
        } else {
            emb
        }
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear (plus an optional condition projection).
#[derive(Debug)]
pub struct TimestepEmbedding {
    cond_proj: Option<nn::Linear>,
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    /// Lays out the MLP under `vs`; `cond_proj_dim` adds LCM's guidance-condition projection.
    pub fn new(vs: nn::Path, in_dim: i64, embed_dim: i64, cond_proj_dim: Option<i64>) -> Self {
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        TimestepEmbedding {
            cond_proj: cond_proj_dim.map(|c| nn::linear(&vs / "cond_proj", c, in_dim, no_bias)),
            linear_1: nn::linear(&vs / "linear_1", in_dim, embed_dim, Default::default()),
            linear_2: nn::linear(&vs / "linear_2", embed_dim, embed_dim, Default::default()),
        }
    }

    /// Embeds `sample` ([N, in_dim]), adding the projected `condition` first when given.
    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Tensor {
        let sample = match (&self.cond_proj, condition) {
            (Some(p), Some(c)) => sample + p.forward(c),
            _ => sample.shallow_clone(),
        };
        self.linear_2
            .forward(&self.linear_1.forward(&sample).silu())
    }
}
