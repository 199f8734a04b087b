//! Diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py and vae.py): the image ↔
//! latent autoencoder of SD and SDXL.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::attention::{Attention, AttentionConfig};
use super::resnet::{
    conv, group_norm, Downsample2D, ResnetBlock2D, ResnetConfig, TimeEmbeddingNorm, Upsample2D,
};
use hf::load::{build_and_load, read_config, weight_files, LoadError};

/// `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: i64,
    /// Image channels out.
    pub out_channels: i64,
    /// One `DownEncoderBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: i64,
    /// Activation; only `silu` exists in released VAEs.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: i64,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// Latents are divided by this before decoding (multiplied after encoding).
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3-style VAEs).
    pub shift_factor: Option<f64>,
    /// The model card says to run this VAE in fp32 (SDXL's).
    pub force_upcast: bool,
    /// A 1×1 conv after the encoder.
    pub use_quant_conv: bool,
    /// A 1×1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// Attention in the mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        AutoencoderKLConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// What this implementation cannot build, if anything.
    pub fn unsupported(&self) -> Option<String> {
        if self.act_fn != "silu" {
            return Some(format!("act_fn `{}` (only silu)", self.act_fn));
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Some(format!(
                "{} down blocks, {} up blocks and {} block_out_channels (must be equal and non-zero)",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Some(format!("down block `{t}`"));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Some(format!("up block `{t}`"));
        }
        // Sizes a model cannot be built with (libtorch would panic on them).
        let groups = self.norm_num_groups;
        let sizes = [
            (
                "in_channels",
                self.in_channels >= 1,
                self.in_channels.to_string(),
            ),
            (
                "out_channels",
                self.out_channels >= 1,
                self.out_channels.to_string(),
            ),
            (
                "latent_channels",
                self.latent_channels >= 1,
                self.latent_channels.to_string(),
            ),
            (
                "block_out_channels (each ≥ 1 and a multiple of norm_num_groups ≥ 1)",
                groups >= 1
                    && self
                        .block_out_channels
                        .iter()
                        .all(|&c| c >= 1 && c % groups == 0),
                format!(
                    "{:?} with norm_num_groups {groups}",
                    self.block_out_channels
                ),
            ),
            (
                "layers_per_block (≥ 1)",
                self.layers_per_block >= 1,
                self.layers_per_block.to_string(),
            ),
            (
                "scaling_factor (finite, not 0)",
                self.scaling_factor.is_finite() && self.scaling_factor != 0.0,
                self.scaling_factor.to_string(),
            ),
            (
                "shift_factor (finite)",
                self.shift_factor.is_none_or(f64::is_finite),
                format!("{:?}", self.shift_factor),
            ),
        ];
        sizes
            .into_iter()
            .find(|(_, ok, _)| !ok)
            .map(|(key, _, value)| format!("{key} = {value}"))
    }
}

const EPS: f64 = 1e-6;

fn resnet(vs: nn::Path, c_in: i64, c_out: i64, groups: i64) -> ResnetBlock2D {
    ResnetBlock2D::new(
        vs,
        c_in,
        ResnetConfig {
            out_channels: c_out,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
            time_embedding_norm: TimeEmbeddingNorm::Default,
        },
    )
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<Attention>,
}

impl MidBlock {
    fn new(vs: nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let r = &vs / "resnets";
        MidBlock {
            resnets: [
                resnet(&r / 0, channels, channels, groups),
                resnet(&r / 1, channels, channels, groups),
            ],
            attention: add_attention.then(|| {
                Attention::new(
                    &vs / "attentions" / 0,
                    AttentionConfig {
                        query_dim: channels,
                        cross_attention_dim: None,
                        heads: 1,
                        dim_head: channels,
                        bias: true,
                        norm_num_groups: Some(groups),
                        eps: EPS,
                        residual_connection: true,
                        rescale_output_factor: 1.0,
                    },
                )
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h, None);
        }
        self.resnets[1].forward(&h, None)
    }
}

/// What follows a stage's resnets.
#[derive(Debug)]
enum Resample {
    None,
    Down(Downsample2D),
    Up(Upsample2D),
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional resampler.
#[derive(Debug)]
struct Stage {
    resnets: Vec<ResnetBlock2D>,
    resample: Resample,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None);
        }
        match &self.resample {
            Resample::None => h,
            Resample::Down(d) => d.forward(&h),
            Resample::Up(u) => u.forward(&h, None),
        }
    }
}

/// Image → latent moments (mean and log-variance stacked on channels).
#[derive(Debug)]
pub struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<Stage>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let blocks = &vs / "down_blocks";
        let down_blocks = (0..ch.len())
            .map(|i| {
                let b = &blocks / i;
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                let last = i + 1 == ch.len();
                Stage {
                    resnets: (0..cfg.layers_per_block)
                        .map(|j| {
                            resnet(
                                &b / "resnets" / j,
                                if j == 0 { c_in } else { ch[i] },
                                ch[i],
                                g,
                            )
                        })
                        .collect(),
                    resample: if last {
                        Resample::None
                    } else {
                        Resample::Down(Downsample2D::new(&b / "downsamplers" / 0, ch[i], ch[i], 0))
                    },
                }
            })
            .collect();
        let top = *ch.last().expect("checked non-empty");
        Encoder {
            conv_in: conv(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&vs / "mid_block", top, g, cfg.mid_block_add_attention),
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, top, EPS),
            conv_out: conv(&vs / "conv_out", top, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for b in &self.down_blocks {
            h = b.forward(&h);
        }
        let h = self.mid_block.forward(&h);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// Latent → image.
#[derive(Debug)]
pub struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<Stage>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let blocks = &vs / "up_blocks";
        let up_blocks = (0..rev.len())
            .map(|i| {
                let b = &blocks / i;
                let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
                let last = i + 1 == rev.len();
                Stage {
                    resnets: (0..cfg.layers_per_block + 1)
                        .map(|j| {
                            resnet(
                                &b / "resnets" / j,
                                if j == 0 { c_in } else { rev[i] },
                                rev[i],
                                g,
                            )
                        })
                        .collect(),
                    resample: if last {
                        Resample::None
                    } else {
                        Resample::Up(Upsample2D::new(&b / "upsamplers" / 0, rev[i], rev[i]))
                    },
                }
            })
            .collect();
        Decoder {
            conv_in: conv(&vs / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(&vs / "mid_block", rev[0], g, cfg.mid_block_add_attention),
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, cfg.block_out_channels[0], EPS),
            conv_out: conv(
                &vs / "conv_out",
                cfg.block_out_channels[0],
                cfg.out_channels,
                3,
                1,
                1,
            ),
        }
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        for b in &self.up_blocks {
            h = b.forward(&h);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The encoder's posterior: a diagonal Gaussian over latents.
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// Mean (the mode).
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// A sample `mean + std · noise` for standard-normal `noise` of the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + (&self.logvar * 0.5).exp() * noise
    }
}

/// `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    /// The config it was built from.
    pub config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Lays out the parameters under `vs` (panics on a config [`AutoencoderKLConfig::unsupported`]
    /// reports; [`AutoencoderKL::load`] checks first).
    pub fn new(vs: nn::Path, config: &AutoencoderKLConfig) -> Self {
        assert!(config.unsupported().is_none(), "unsupported VAE config");
        let l2 = 2 * config.latent_channels;
        let one = |vs: nn::Path, c: i64| conv(vs, c, c, 1, 1, 0);
        AutoencoderKL {
            encoder: Encoder::new(&vs / "encoder", config),
            decoder: Decoder::new(&vs / "decoder", config),
            quant_conv: config.use_quant_conv.then(|| one(&vs / "quant_conv", l2)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| one(&vs / "post_quant_conv", config.latent_channels)),
            config: config.clone(),
        }
    }

    /// Loads a `vae/` folder (config.json + safetensors) with weights in `kind` on `device`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        let config: AutoencoderKLConfig = read_config(dir)?;
        if let Some(why) = config.unsupported() {
            return Err(LoadError::Unsupported {
                path: dir.join("config.json"),
                why,
            });
        }
        build_and_load(&weight_files(dir, variant)?, device, kind, |vs| {
            AutoencoderKL::new(vs, &config)
        })
    }

    /// Pixels per latent pixel: 2^(resolutions − 1).
    pub fn scale_factor(&self) -> i64 {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Encodes images in [-1, 1] ([B, 3, H, W]) to the latent posterior (unscaled).
    pub fn encode(&self, images: &Tensor) -> DiagonalGaussian {
        let mut moments = self.encoder.forward(images);
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments);
        }
        let parts = moments.chunk(2, 1);
        DiagonalGaussian {
            mean: parts[0].shallow_clone(),
            logvar: parts[1].clamp(-30.0, 20.0),
        }
    }

    /// Decodes unscaled latents to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    /// Decodes the diffusion model's (scaled, shifted) latents, as a pipeline does.
    pub fn decode_scaled(&self, latents: &Tensor) -> Tensor {
        let z = latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0);
        self.decode(&z)
    }

    /// Scales and shifts encoder latents into the diffusion model's latent space.
    pub fn scale_latents(&self, latents: &Tensor) -> Tensor {
        (latents - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_a_model_cannot_be_built_with_are_refused_by_name() {
        let config = AutoencoderKLConfig::default();
        assert_eq!(config.unsupported(), None);
        let mut bad = config.clone();
        bad.latent_channels = 0;
        assert_eq!(bad.unsupported().unwrap(), "latent_channels = 0");
        let mut bad = config.clone();
        bad.norm_num_groups = 0;
        assert!(bad.unsupported().unwrap().contains("norm_num_groups 0"));
        let mut bad = config.clone();
        bad.block_out_channels = vec![48];
        assert!(bad
            .unsupported()
            .unwrap()
            .contains("[48] with norm_num_groups 32"));
        let mut bad = config;
        bad.scaling_factor = 0.0;
        assert!(bad.unsupported().unwrap().starts_with("scaling_factor"));
    }
}
