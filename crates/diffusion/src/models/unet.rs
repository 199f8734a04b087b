//! Diffusers' `UNet2DConditionModel` (models/unets/unet_2d_condition.py and unet_2d_blocks.py)
//! for SD 1.x / 2.x and SDXL, including their distilled variants (SD-Turbo, SDXL-Turbo, DMD2,
//! SDXL-Lightning, LCM): config-driven block layout, per-block heads and transformer depths,
//! linear or conv projections, and SDXL's `text_time` added conditioning.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::resnet::{
    conv, group_norm, Downsample2D, ResnetBlock2D, ResnetConfig, TimeEmbeddingNorm, Upsample2D,
};
use super::transformer::{Transformer2DConfig, Transformer2DModel};
use hf::load::{build_and_load, read_config, weight_files, LoadError};

/// A config value given once for every block, or once per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same for every block.
    One(T),
    /// One per block, in down-block order.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone(); n],
            PerBlock::Many(v) => v.clone(),
        }
    }
}

/// `unet/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent size it was trained at (one value, or [height, width]).
    pub sample_size: Option<PerBlock<i64>>,
    /// Latent channels in.
    pub in_channels: i64,
    /// Channels out (the model's prediction).
    pub out_channels: i64,
    /// Maps the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Cosines first in the timestep embedding.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// Only `UNetMidBlock2DCrossAttn` is built.
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Not supported when true.
    pub only_cross_attention: PerBlock<bool>,
    /// Channels per resolution.
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<i64>,
    /// Padding of the downsampling convs.
    pub downsample_padding: i64,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Activation; only `silu`.
    pub act_fn: String,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// GroupNorm epsilon of resnets and the output norm.
    pub norm_eps: f64,
    /// Channels of the text embeddings.
    pub cross_attention_dim: PerBlock<i64>,
    /// Transformer blocks per attention block.
    pub transformer_layers_per_block: PerBlock<i64>,
    /// Attention heads per block when `num_attention_heads` is absent (a diffusers naming quirk:
    /// SD configs store head counts here).
    pub attention_head_dim: PerBlock<i64>,
    /// Attention heads per block.
    pub num_attention_heads: Option<PerBlock<i64>>,
    /// Not supported when true.
    pub dual_cross_attention: bool,
    /// Linear instead of 1×1-conv projections in the transformers (SD 2, SDXL).
    pub use_linear_projection: bool,
    /// Not supported when set.
    pub class_embed_type: Option<String>,
    /// `text_time` (SDXL) or none.
    pub addition_embed_type: Option<String>,
    /// Width of each embedded `time_ids` entry (SDXL: 256).
    pub addition_time_embed_dim: Option<i64>,
    /// Input width of the added embedding (pooled text + time ids).
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// Not supported when set.
    pub encoder_hid_dim: Option<i64>,
    /// Only `default`.
    pub resnet_time_scale_shift: String,
    /// Only `positional`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default 4 × block_out_channels[0]).
    pub time_embedding_dim: Option<i64>,
    /// LCM's guidance-embedding input width.
    pub time_cond_proj_dim: Option<i64>,
    /// Only 3.
    pub conv_in_kernel: i64,
    /// Only 3.
    pub conv_out_kernel: i64,
    /// Only `default`.
    pub attention_type: String,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        UNet2DConditionConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            encoder_hid_dim: None,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
        }
    }
}

/// The per-block values of a config, expanded and checked.
#[derive(Debug, Clone)]
struct Layout {
    cross_attn: Vec<bool>,
    layers: Vec<i64>,
    heads: Vec<i64>,
    cross_dim: Vec<i64>,
    transformer_layers: Vec<i64>,
}

impl UNet2DConditionConfig {
    /// The expanded per-block layout, or what this implementation cannot build.
    fn layout(&self) -> Result<Layout, String> {
        let n = self.block_out_channels.len();
        let unsupported = |what: String| Err(what);
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(format!(
                "{} down blocks, {} up blocks and {} block_out_channels (must be equal and non-zero)",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            ));
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
                "layers_per_block (each ≥ 1)",
                self.layers_per_block.expand(n).iter().all(|&l| l >= 1),
                format!("{:?}", self.layers_per_block.expand(n)),
            ),
        ];
        if let Some((key, _, value)) = sizes.into_iter().find(|(_, ok, _)| !ok) {
            return unsupported(format!("{key} = {value}"));
        }
        let checks: [(&str, bool, String); 10] = [
            ("act_fn", self.act_fn == "silu", self.act_fn.clone()),
            (
                "mid_block_type",
                self.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
                format!("{:?}", self.mid_block_type),
            ),
            (
                "only_cross_attention",
                !self.only_cross_attention.expand(n).iter().any(|&b| b),
                "true".into(),
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                "true".into(),
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_none(),
                format!("{:?}", self.class_embed_type),
            ),
            (
                "addition_embed_type",
                matches!(
                    self.addition_embed_type.as_deref(),
                    None | Some("text_time")
                ),
                format!("{:?}", self.addition_embed_type),
            ),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.is_none(),
                format!("{:?}", self.encoder_hid_dim),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                self.resnet_time_scale_shift.clone(),
            ),
            (
                "time_embedding_type / attention_type",
                self.time_embedding_type == "positional" && self.attention_type == "default",
                format!("{} / {}", self.time_embedding_type, self.attention_type),
            ),
            (
                "conv_in_kernel / conv_out_kernel",
                self.conv_in_kernel == 3 && self.conv_out_kernel == 3,
                format!("{} / {}", self.conv_in_kernel, self.conv_out_kernel),
            ),
        ];
        if let Some((key, _, value)) = checks.into_iter().find(|(_, ok, _)| !ok) {
            return unsupported(format!("{key} = {value}"));
        }
        let mut cross_attn = Vec::with_capacity(n);
        for (down, up) in self
            .down_block_types
            .iter()
            .zip(self.up_block_types.iter().rev())
        {
            let d = match down.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return unsupported(format!("down block `{other}`")),
            };
            let u = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return unsupported(format!("up block `{other}`")),
            };
            if d != u {
                return unsupported(format!(
                    "down block `{down}` mirrored by up block `{up}` (attention must match)"
                ));
            }
            cross_attn.push(d);
        }
        if self.addition_embed_type.is_some()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return unsupported(
                "text_time without addition_time_embed_dim and projection_class_embeddings_input_dim"
                    .into(),
            );
        }
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n);
        let layout = Layout {
            cross_attn,
            layers: self.layers_per_block.expand(n),
            heads,
            cross_dim: self.cross_attention_dim.expand(n),
            transformer_layers: self.transformer_layers_per_block.expand(n),
        };
        for (key, len) in [
            ("layers_per_block", layout.layers.len()),
            (
                "attention_head_dim / num_attention_heads",
                layout.heads.len(),
            ),
            ("cross_attention_dim", layout.cross_dim.len()),
            (
                "transformer_layers_per_block",
                layout.transformer_layers.len(),
            ),
        ] {
            if len != n {
                return unsupported(format!("{key} has {len} entries for {n} blocks"));
            }
        }
        if let Some((c, h)) = self
            .block_out_channels
            .iter()
            .zip(&layout.heads)
            .find(|(c, h)| **h <= 0 || *c % *h != 0)
        {
            return unsupported(format!("{c} channels are not divisible into {h} heads"));
        }
        Ok(layout)
    }
}

fn check_layout(dir: &Path, config: &UNet2DConditionConfig) -> Result<(), LoadError> {
    config
        .layout()
        .map(drop)
        .map_err(|why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        })
}

/// The SDXL added conditioning: pooled text embeddings and the six size/crop `time_ids`.
#[derive(Debug)]
pub struct AddedCond {
    /// Pooled (projected) text embedding of the second text encoder, [B, D].
    pub text_embeds: Tensor,
    /// (original h, original w, crop top, crop left, target h, target w) per image, [B, 6].
    pub time_ids: Tensor,
}

/// One down block: resnets, each optionally followed by a transformer, then a downsampler.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// One up block: resnets over the concatenated skip connections, optional transformers, then
/// an upsampler.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock2D,
    rest: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

/// `UNet2DConditionModel`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Option<Timesteps>,
    add_embedding: Option<TimestepEmbedding>,
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    /// The config it was built from.
    pub config: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    /// Lays out the parameters under `vs`. Panics on a config that [`UNet2DConditionModel::load`]
    /// would reject as unsupported.
    pub fn new(vs: nn::Path, cfg: &UNet2DConditionConfig) -> Self {
        let layout = cfg.layout().expect("unsupported UNet config");
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb_dim = cfg.time_embedding_dim.unwrap_or(4 * ch[0]);
        let resnet = |vs: nn::Path, c_in: i64, c_out: i64, scale: f64| {
            ResnetBlock2D::new(
                vs,
                c_in,
                ResnetConfig {
                    out_channels: c_out,
                    temb_channels: Some(temb_dim),
                    groups: cfg.norm_num_groups,
                    eps: cfg.norm_eps,
                    output_scale_factor: scale,
                    time_embedding_norm: TimeEmbeddingNorm::Default,
                },
            )
        };
        let transformer = |vs: nn::Path, channels: i64, block: usize| {
            let heads = layout.heads[block];
            Transformer2DModel::new(
                vs,
                Transformer2DConfig {
                    in_channels: channels,
                    heads,
                    dim_head: channels / heads,
                    num_layers: layout.transformer_layers[block],
                    cross_attention_dim: layout.cross_dim[block],
                    norm_num_groups: cfg.norm_num_groups,
                    use_linear_projection: cfg.use_linear_projection,
                },
            )
        };

        let downs = &vs / "down_blocks";
        let down_blocks = (0..n)
            .map(|i| {
                let b = &downs / i;
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                let layers = layout.layers[i];
                DownBlock {
                    resnets: (0..layers)
                        .map(|j| {
                            resnet(
                                &b / "resnets" / j,
                                if j == 0 { c_in } else { ch[i] },
                                ch[i],
                                1.0,
                            )
                        })
                        .collect(),
                    attentions: if layout.cross_attn[i] {
                        (0..layers)
                            .map(|j| transformer(&b / "attentions" / j, ch[i], i))
                            .collect()
                    } else {
                        Vec::new()
                    },
                    downsampler: (i + 1 < n).then(|| {
                        Downsample2D::new(
                            &b / "downsamplers" / 0,
                            ch[i],
                            ch[i],
                            cfg.downsample_padding,
                        )
                    }),
                }
            })
            .collect();

        let top = ch[n - 1];
        let mid = &vs / "mid_block";
        let scale = cfg.mid_block_scale_factor;
        let mid_block = MidBlock {
            first: resnet(&mid / "resnets" / 0, top, top, scale),
            rest: (0..1)
                .map(|k| {
                    (
                        transformer(&mid / "attentions" / k, top, n - 1),
                        resnet(&mid / "resnets" / (k + 1), top, top, scale),
                    )
                })
                .collect(),
        };

        let ups = &vs / "up_blocks";
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let up_blocks = (0..n)
            .map(|i| {
                let b = &ups / i;
                let block = n - 1 - i; // the down block this up block mirrors
                let prev_out = if i == 0 { rev[0] } else { rev[i - 1] };
                let out = rev[i];
                let skip_in = rev[(i + 1).min(n - 1)];
                let layers = layout.layers[block] + 1;
                UpBlock {
                    resnets: (0..layers)
                        .map(|j| {
                            let skip = if j == layers - 1 { skip_in } else { out };
                            let res_in = if j == 0 { prev_out } else { out };
                            resnet(&b / "resnets" / j, res_in + skip, out, 1.0)
                        })
                        .collect(),
                    attentions: if layout.cross_attn[block] {
                        (0..layers)
                            .map(|j| transformer(&b / "attentions" / j, out, block))
                            .collect()
                    } else {
                        Vec::new()
                    },
                    upsampler: (i + 1 < n)
                        .then(|| Upsample2D::new(&b / "upsamplers" / 0, out, out)),
                }
            })
            .collect();

        let text_time = cfg.addition_embed_type.is_some();
        UNet2DConditionModel {
            time_proj: Timesteps {
                dim: ch[0],
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            },
            time_embedding: TimestepEmbedding::new(
                &vs / "time_embedding",
                ch[0],
                temb_dim,
                cfg.time_cond_proj_dim,
            ),
            add_time_proj: text_time.then(|| Timesteps {
                dim: cfg.addition_time_embed_dim.expect("checked by layout"),
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                freq_shift: cfg.freq_shift,
            }),
            add_embedding: text_time.then(|| {
                TimestepEmbedding::new(
                    &vs / "add_embedding",
                    cfg.projection_class_embeddings_input_dim
                        .expect("checked by layout"),
                    temb_dim,
                    None,
                )
            }),
            conv_in: conv(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                &vs / "conv_norm_out",
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
            ),
            conv_out: conv(&vs / "conv_out", ch[0], cfg.out_channels, 3, 1, 1),
            config: cfg.clone(),
        }
    }

    /// Loads a `unet/` folder (config.json + safetensors) with weights in `kind` on `device`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        let config: UNet2DConditionConfig = read_config(dir)?;
        // An unsupported config is the more useful error when the weights are missing too.
        check_layout(dir, &config)?;
        Self::load_with_weights(dir, &config, &weight_files(dir, variant)?, device, kind)
    }

    /// Builds the UNet of `config` (read from `dir`) with weights from `files`, e.g. a
    /// distilled UNet (DMD2) shipped as one safetensors file for a base pipeline's config.
    pub fn load_with_weights(
        dir: &Path,
        config: &UNet2DConditionConfig,
        files: &[std::path::PathBuf],
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self), LoadError> {
        config.layout().map_err(|why| LoadError::Unsupported {
            path: dir.join("config.json"),
            why,
        })?;
        build_and_load(files, device, kind, |vs| {
            UNet2DConditionModel::new(vs, config)
        })
    }

    /// Whether the model needs [`AddedCond`] (SDXL's `text_time`).
    pub fn needs_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// Every transformer in diffusers' module order: down blocks, mid block, up blocks.
    pub fn transformers(&self) -> Vec<&Transformer2DModel> {
        let down = self.down_blocks.iter().flat_map(|b| &b.attentions);
        let mid = self.mid_block.rest.iter().map(|(t, _)| t);
        let up = self.up_blocks.iter().flat_map(|b| &b.attentions);
        down.chain(mid).chain(up).collect()
    }

    /// Predicts the model output for `sample` [B, C, H, W] at `timestep` (a scalar or [B]),
    /// conditioned on the text embeddings [B, T, D] (and SDXL's added conditioning).
    ///
    /// `timestep_cond` is LCM's guidance embedding, for UNets with `time_cond_proj_dim`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        timestep_cond: Option<&Tensor>,
    ) -> Tensor {
        let batch = sample.size()[0];
        let timesteps = if timestep.dim() == 0 {
            timestep.unsqueeze(0)
        } else {
            timestep.shallow_clone()
        }
        .expand([batch], false);
        let t_emb = self.time_proj.forward(&timesteps).to_kind(sample.kind());
        let mut emb = self.time_embedding.forward(&t_emb, timestep_cond);
        if let (Some(proj), Some(embedding)) = (&self.add_time_proj, &self.add_embedding) {
            let added =
                added.expect("this UNet needs SDXL's added conditioning (text_embeds, time_ids)");
            let time_embeds = proj
                .forward(&added.time_ids.flatten(0, -1))
                .reshape([batch, -1]);
            let add = Tensor::cat(
                &[
                    &added.text_embeds,
                    &time_embeds.to_kind(added.text_embeds.kind()),
                ],
                -1,
            )
            .to_kind(emb.kind());
            emb += embedding.forward(&add, None);
        }

        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            for (k, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, Some(&emb));
                if let Some(attn) = block.attentions.get(k) {
                    h = attn.forward(&h, encoder_hidden_states);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
                skips.push(h.shallow_clone());
            }
        }

        h = self.mid_block.first.forward(&h, Some(&emb));
        for (attn, resnet) in &self.mid_block.rest {
            h = resnet.forward(&attn.forward(&h, encoder_hidden_states), Some(&emb));
        }

        for block in &self.up_blocks {
            for (k, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1), Some(&emb));
                if let Some(attn) = block.attentions.get(k) {
                    h = attn.forward(&h, encoder_hidden_states);
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size, so latents that are not a multiple of
                // 2^(blocks-1) still line up (diffusers' forward_upsample_size).
                let size = skips.last().map(|s| [s.size()[2], s.size()[3]]);
                h = up.forward(&h, size);
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_a_model_cannot_be_built_with_are_refused_by_name() {
        let config = UNet2DConditionConfig::default();
        assert!(config.layout().is_ok(), "{:?}", config.layout().err());
        let mut bad = config.clone();
        bad.in_channels = 0;
        assert_eq!(bad.layout().unwrap_err(), "in_channels = 0");
        let mut bad = config.clone();
        bad.norm_num_groups = 0;
        assert!(bad.layout().unwrap_err().contains("norm_num_groups 0"));
        let mut bad = config;
        bad.block_out_channels[1] = 100;
        assert!(bad.layout().unwrap_err().contains("[320, 100, 1280, 1280]"));
    }
}
