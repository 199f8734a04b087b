//! Diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (models/resnet.py,
//! downsampling.py, upsampling.py), shared by the VAE and the UNet.

use tch::nn::{self, Module};
use tch::Tensor;

/// How a resnet block's time embedding enters (diffusers `time_embedding_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Added to the hidden state after conv1.
    Default,
    /// Split into scale and shift applied after norm2.
    ScaleShift,
}

/// `ResnetBlock2D`: two GroupNorm–SiLU–conv stages with an optional time embedding and a 1×1
/// shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    time_embedding_norm: TimeEmbeddingNorm,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

/// Construction options of [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Output channels.
    pub out_channels: i64,
    /// Time-embedding channels; `None` for the VAE.
    pub temb_channels: Option<i64>,
    /// GroupNorm groups.
    pub groups: i64,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// How the time embedding enters.
    pub time_embedding_norm: TimeEmbeddingNorm,
}

/// A k×k convolution with bias, as `nn.Conv2d(c_in, c_out, k, stride, padding)`.
pub fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

/// A GroupNorm with an affine transform, as diffusers builds them.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(
        vs,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
}

impl ResnetBlock2D {
    /// Lays out the block's parameters under `vs`.
    pub fn new(vs: nn::Path, in_channels: i64, cfg: ResnetConfig) -> Self {
        let out = cfg.out_channels;
        let temb_out = match cfg.time_embedding_norm {
            TimeEmbeddingNorm::Default => out,
            TimeEmbeddingNorm::ScaleShift => 2 * out,
        };
        ResnetBlock2D {
            norm1: group_norm(&vs / "norm1", cfg.groups, in_channels, cfg.eps),
            conv1: conv(&vs / "conv1", in_channels, out, 3, 1, 1),
            time_emb_proj: cfg
                .temb_channels
                .map(|t| nn::linear(&vs / "time_emb_proj", t, temb_out, Default::default())),
            time_embedding_norm: cfg.time_embedding_norm,
            norm2: group_norm(&vs / "norm2", cfg.groups, out, cfg.eps),
            conv2: conv(&vs / "conv2", out, out, 3, 1, 1),
            conv_shortcut: (in_channels != out)
                .then(|| conv(&vs / "conv_shortcut", in_channels, out, 1, 1, 0)),
            output_scale_factor: cfg.output_scale_factor,
        }
    }

    /// Applies the block; `temb` is the (already SiLU-free) time embedding, if the block has one.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        let mut scale_shift = None;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
            match self.time_embedding_norm {
                TimeEmbeddingNorm::Default => h += t,
                TimeEmbeddingNorm::ScaleShift => scale_shift = Some(t.chunk(2, 1)),
            }
        }
        h = self.norm2.forward(&h);
        if let Some(parts) = scale_shift {
            h = h * (parts[0].shallow_clone() + 1.0) + &parts[1];
        }
        let h = self.conv2.forward(&h.silu());
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a strided 3×3 convolution.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    /// Diffusers' `padding=0` case pads right and bottom by one before the conv (the VAE).
    pad_right_bottom: bool,
}

impl Downsample2D {
    /// Lays out the conv under `vs/conv`; `padding` is the conv padding diffusers was given.
    pub fn new(vs: nn::Path, channels: i64, out_channels: i64, padding: i64) -> Self {
        Downsample2D {
            conv: conv(&vs / "conv", channels, out_channels, 3, 2, padding),
            pad_right_bottom: padding == 0,
        }
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour ×2 (or to an explicit size), then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    /// Lays out the conv under `vs/conv`.
    pub fn new(vs: nn::Path, channels: i64, out_channels: i64) -> Self {
        Upsample2D {
            conv: conv(&vs / "conv", channels, out_channels, 3, 1, 1),
        }
    }

    /// Upsamples to `size` (height, width), or ×2 when `None`.
    pub fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        let size = size.unwrap_or([2 * h, 2 * w]);
        self.conv
            .forward(&x.upsample_nearest2d(size, None::<f64>, None::<f64>))
    }
}
