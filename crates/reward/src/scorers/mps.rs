//! MPS (Zhang et al. 2024, "Learning Multi-dimensional Human Preference for Text-to-Image
//! Generation"), its overall score, as the official `infer_one_sample` computes it: CLIP-H's
//! projected prompt tokens and image tokens; the condition prompt (the overall preference
//! dimensions) keeps only the prompt tokens similar enough to it; a cross model (four CoCa-style
//! rounds of cross-attention from the image tokens to the kept prompt tokens with a parallel
//! SwiGLU, then parallel self-attention with rotary positions and SwiGLU) whose first token is
//! the image feature; and `logit_scale.exp() · cos(prompt feature, image feature)`.
//!
//! The folder (scripts/convert_mps.py writes it from the official `MPS_overall_checkpoint.pth`):
//! the CLIP-H `CLIPModel` folder (config.json, model.safetensors, tokenizer, preprocessor), plus
//! `mps.safetensors` (the cross model's tensors, `cross_model.*`) and `mps.json`
//! ([`MpsConfig`]).

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};
use hf::clip::{ClipImageProcessor, ClipModel, ClipTokenizer};

/// `mps.json`: the cross model's shape and the condition.
#[derive(Debug, Clone, Deserialize)]
pub struct MpsConfig {
    /// Token width (CLIP-H's projection: 1024).
    pub dim: i64,
    /// Rounds of cross-attention and self-attention (4).
    pub layers: i64,
    /// Attention heads (16).
    pub heads: i64,
    /// Width per head (64).
    pub dim_head: i64,
    /// SwiGLU width as a multiple of `dim` (4).
    pub ff_mult: i64,
    /// Prompt tokens whose normalised similarity to the condition is at most this are masked
    /// (the official inference: 0.3).
    pub threshold: f64,
    /// The condition prompt (the overall dimensions: "light, color, clarity, …").
    pub condition: String,
}

fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], Default::default())
}

/// SwiGLU: the first half of the channels times SiLU of the second.
fn swiglu(x: &Tensor) -> Tensor {
    let halves = x.chunk(2, -1);
    halves[1].silu() * &halves[0]
}

/// Multi-query attention: scaled queries [B, h, n, d] over one key / value head [B, m, d], with
/// an additive mask [B, n, m]; the softmax after subtracting the row maximum, as the cross
/// model writes it. Returns [B, n, h·d].
fn multi_query(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let (b, h, n, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let mut sim = q.matmul(&k.unsqueeze(1).transpose(-1, -2));
    if let Some(m) = mask {
        sim += m.unsqueeze(1);
    }
    let shifted = &sim - sim.amax([-1], true);
    shifted
        .softmax(-1, shifted.kind())
        .matmul(&v.unsqueeze(1))
        .transpose(1, 2)
        .reshape([b, n, h * d])
}

/// Multi-query cross-attention (one key / value head) with a parallel SwiGLU feed-forward.
#[derive(Debug)]
struct CrossAttention {
    norm: nn::LayerNorm,
    to_q: nn::Linear,
    to_kv: nn::Linear,
    to_out: nn::Linear,
    ff_in: nn::Linear,
    ff_out: nn::Linear,
    heads: i64,
    dim_head: i64,
}

impl CrossAttention {
    fn new(p: nn::Path, c: &MpsConfig) -> Self {
        let inner = c.heads * c.dim_head;
        let ff = c.ff_mult * c.dim;
        CrossAttention {
            norm: layer_norm(&p / "norm", c.dim),
            to_q: linear(&p / "to_q", c.dim, inner),
            to_kv: linear(&p / "to_kv", c.dim, 2 * c.dim_head),
            to_out: linear(&p / "to_out", inner, c.dim),
            ff_in: linear(&p / "ff" / 0, c.dim, 2 * ff),
            ff_out: linear(&p / "ff" / 2, ff, c.dim),
            heads: c.heads,
            dim_head: c.dim_head,
        }
    }

    /// `x` [B, n, dim] attending to `context` [B, m, dim] under the additive `mask` [B, n, m].
    fn forward(&self, x: &Tensor, context: &Tensor, mask: &Tensor) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let normed = self.norm.forward(x);
        let q = self
            .to_q
            .forward(&normed)
            .view([b, n, self.heads, self.dim_head])
            .transpose(1, 2)
            * (self.dim_head as f64).powf(-0.5);
        let kv = self.to_kv.forward(context).chunk(2, -1);
        let out = multi_query(&q, &kv[0], &kv[1], Some(mask));
        let out =
            self.to_out.forward(&out) + self.ff_out.forward(&swiglu(&self.ff_in.forward(&normed)));
        x + out
    }
}

/// PaLM's parallel block: one fused projection to multi-query attention (rotary positions on
/// queries and the key) and a SwiGLU feed-forward, summed.
#[derive(Debug)]
struct ParallelBlock {
    norm: nn::LayerNorm,
    fused: nn::Linear,
    attn_out: nn::Linear,
    ff_out: nn::Linear,
    heads: i64,
    dim_head: i64,
    ff: i64,
}

impl ParallelBlock {
    fn new(p: nn::Path, c: &MpsConfig) -> Self {
        let inner = c.heads * c.dim_head;
        let ff = c.ff_mult * c.dim;
        ParallelBlock {
            norm: layer_norm(&p / "norm", c.dim),
            fused: linear(
                &p / "fused_attn_ff_proj",
                c.dim,
                inner + 2 * c.dim_head + 2 * ff,
            ),
            attn_out: linear(&p / "attn_out", inner, c.dim),
            ff_out: linear(&p / "ff_out" / 1, ff, c.dim),
            heads: c.heads,
            dim_head: c.dim_head,
            ff,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        let (h, dh) = (self.heads, self.dim_head);
        let parts = self
            .fused
            .forward(&self.norm.forward(x))
            .split_with_sizes([h * dh, dh, dh, 2 * self.ff], -1);
        let q = parts[0].view([b, n, h, dh]).transpose(1, 2);
        let (cos, sin) = rotary(n, dh, x.device(), x.kind());
        let rotate = |t: &Tensor| t * &cos + rotate_half(t) * &sin;
        let q = rotate(&q) * (dh as f64).powf(-0.5);
        let k = rotate(&parts[1]);
        let out = multi_query(&q, &k, &parts[2], None);
        x + self.attn_out.forward(&out) + self.ff_out.forward(&swiglu(&parts[3]))
    }
}

/// cos and sin [n, dim_head] of rotary positions 0..n (frequencies 10000^(−2i/d), repeated).
fn rotary(n: i64, dim_head: i64, device: Device, kind: Kind) -> (Tensor, Tensor) {
    let inv_freq = (Tensor::arange_start_step(0, dim_head, 2, (Kind::Float, device))
        / dim_head as f64
        * -(10000f64.ln()))
    .exp();
    let freqs = Tensor::arange(n, (Kind::Float, device)).outer(&inv_freq);
    let pos = Tensor::cat(&[&freqs, &freqs], -1);
    (pos.cos().to_kind(kind), pos.sin().to_kind(kind))
}

/// (x1, x2) → (−x2, x1) over the two halves of the last axis.
fn rotate_half(t: &Tensor) -> Tensor {
    let halves = t.chunk(2, -1);
    Tensor::cat(&[halves[1].neg(), halves[0].shallow_clone()], -1)
}

/// The cross model: `layers` rounds of [`CrossAttention`] then [`ParallelBlock`].
#[derive(Debug)]
struct CrossModel {
    layers: Vec<(CrossAttention, ParallelBlock)>,
}

impl CrossModel {
    fn new(p: nn::Path, c: &MpsConfig) -> Self {
        CrossModel {
            layers: (0..c.layers)
                .map(|i| {
                    let l = &p / "layers" / i;
                    (
                        CrossAttention::new(&l / 0 / "fn", c),
                        ParallelBlock::new(&l / 1 / "fn", c),
                    )
                })
                .collect(),
        }
    }

    fn forward(&self, image: &Tensor, text: &Tensor, mask: &Tensor) -> Tensor {
        self.layers
            .iter()
            .fold(image.shallow_clone(), |x, (cross, block)| {
                block.forward(&cross.forward(&x, text, mask))
            })
    }
}

/// The models and the condition prompt's projected tokens [1, T, dim], encoded once.
#[derive(Debug)]
struct MpsModels {
    clip: ClipModel,
    cross: CrossModel,
    condition: Tensor,
}

/// The MPS scorer.
#[derive(Debug)]
pub struct MpsScorer {
    // tch tensors are Send but not Sync; the lock also serialises use of the device.
    models: Mutex<MpsModels>,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    config: MpsConfig,
    device: Device,
    info: ScorerInfo,
}

impl MpsScorer {
    /// Loads an MPS folder (see the module documentation).
    pub fn load(dir: &Path, device: Device) -> Result<Self, RewardError> {
        let clip_config = ClipModel::config(dir)?;
        let config: MpsConfig = hf::load::read_json(&dir.join("mps.json"))?;
        if config.dim != clip_config.projection_dim {
            return Err(hf::load::LoadError::Unsupported {
                path: dir.join("mps.json"),
                why: format!(
                    "dim {} must be the CLIP model's projection_dim {}",
                    config.dim, clip_config.projection_dim
                ),
            }
            .into());
        }
        let processor = ClipImageProcessor::from_dir(dir)?;
        super::clip_score::check_image_size(dir, &processor, clip_config.vision_config.image_size)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let (_clip_vs, clip) = ClipModel::load(dir, device, Kind::Float)?;
        let (_cross_vs, cross) =
            hf::load::build_and_load(&[dir.join("mps.safetensors")], device, Kind::Float, |p| {
                CrossModel::new(&p / "cross_model", &config)
            })?;
        let condition_ids = tokenizer.encode_batch(&[config.condition.as_str()], device)?;
        let condition = tch::no_grad(|| clip.text_token_features(&condition_ids.input_ids, None).0);
        Ok(MpsScorer {
            models: Mutex::new(MpsModels {
                clip,
                cross,
                condition,
            }),
            tokenizer,
            processor,
            config,
            device,
            info: ScorerInfo {
                name: "mps".into(),
                version: dir.display().to_string(),
                higher_is_better: true,
            },
        })
    }
}

#[async_trait]
impl Scorer for MpsScorer {
    fn info(&self) -> ScorerInfo {
        self.info.clone()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (unique, rows) = super::local::prompt_rows(items);
        let rows = Tensor::from_slice(&rows).to_device(self.device);
        let prompts = self.tokenizer.encode_batch(&unique, self.device)?;
        let pixels = self
            .processor
            .preprocess(items.iter().map(|it| it.image))
            .to_device(self.device);
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let (clip, cross, condition) = (&models.clip, &models.cross, &models.condition);
        let _guard = tch::no_grad_guard();
        // 1. Prompt tokens, as the official code encodes them (no attention mask).
        let (text, eos) = clip.text_token_features(&prompts.input_ids, None);
        // 2. Each prompt token's best similarity to a condition token, over the prompt's
        //    largest; tokens at or below the threshold are masked.
        let sim = text
            .matmul(&condition.transpose(-1, -2))
            .amax([-1], false)
            .unsqueeze(1);
        let sim = &sim / sim.amax([-1], true);
        let mask = sim
            .zeros_like()
            .where_scalarother(&sim.gt(self.config.threshold), f64::NEG_INFINITY);
        // 3. The image tokens through the cross model; its first token is the image feature.
        let image = clip.image_token_features(&pixels);
        let tokens = image.size()[1];
        let mask = mask.index_select(0, &rows).repeat([1, tokens, 1]);
        let feature = cross
            .forward(&image, &text.index_select(0, &rows), &mask)
            .select(1, 0);
        let scores = ClipModel::paired_cosine(&eos.index_select(0, &rows), &feature)
            * clip.logit_scale_exp();
        Vec::<f32>::try_from(scores.to_kind(Kind::Float).to_device(Device::Cpu)).map_err(|source| {
            RewardError::Torch {
                what: "reading mps scores".into(),
                source,
            }
        })
    }
}
