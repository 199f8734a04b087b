//! BLIP's two towers as ImageReward runs them, named as the official checkpoints name them:
//! the image tower is BLIP's `vit.py` `VisionTransformer` (pre-norm blocks with a fused qkv
//! projection, every token returned), the text tower BLIP's `med.py` `BertModel` in its
//! multimodal mode (post-norm BERT layers whose self-attention is followed by a cross-attention
//! to the image tokens), and the BERT WordPiece tokenizer through its tokenizer.json.

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::padded_tokenizer::PaddedTokenizer;
use crate::HfError;

fn vision_eps() -> f64 {
    1e-6
}

fn text_eps() -> f64 {
    1e-12
}

/// The image tower's shape (BLIP ViT-L/16 at 224: 224, 16, 1024, 24, 16, 4096).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlipVisionConfig {
    /// Input side in pixels.
    pub image_size: i64,
    /// Patch side in pixels.
    pub patch_size: i64,
    /// Token width.
    pub hidden_size: i64,
    /// Blocks.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// LayerNorm epsilon (BLIP: 1e-6).
    #[serde(default = "vision_eps")]
    pub layer_norm_eps: f64,
}

/// The text tower's shape: BLIP's `med_config.json` (BERT-base, `encoder_width` the image
/// tower's width).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlipTextConfig {
    /// Vocabulary size (bert-base-uncased plus BLIP's [DEC] and [ENC]: 30524).
    pub vocab_size: i64,
    /// Token width.
    pub hidden_size: i64,
    /// Layers.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Feed-forward width.
    pub intermediate_size: i64,
    /// Positions.
    pub max_position_embeddings: i64,
    /// LayerNorm epsilon.
    #[serde(default = "text_eps")]
    pub layer_norm_eps: f64,
    /// Width of the image tokens the cross-attention reads.
    pub encoder_width: i64,
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(p, i, o, Default::default())
}

/// Softmax attention of `q` [B, Tq, D] over `k`, `v` [B, Tk, D] in `heads` heads, with an
/// additive mask broadcast to [B, heads, Tq, Tk].
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, mask: Option<&Tensor>) -> Tensor {
    let (b, tq, d) = (q.size()[0], q.size()[1], q.size()[2]);
    let split = |t: &Tensor| t.view([b, -1, heads, d / heads]).transpose(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
    let mut scores = q.matmul(&k.transpose(-1, -2)) / ((d / heads) as f64).sqrt();
    if let Some(m) = mask {
        scores += m;
    }
    scores
        .softmax(-1, scores.kind())
        .matmul(&v)
        .transpose(1, 2)
        .reshape([b, tq, d])
}

/// One pre-norm ViT block: x + attn(norm1(x)), then + mlp(norm2(x)).
#[derive(Debug)]
struct VisionBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl VisionBlock {
    fn new(p: nn::Path, c: &BlipVisionConfig) -> Self {
        let d = c.hidden_size;
        VisionBlock {
            norm1: layer_norm(&p / "norm1", d, c.layer_norm_eps),
            qkv: linear(&p / "attn" / "qkv", d, 3 * d),
            proj: linear(&p / "attn" / "proj", d, d),
            norm2: layer_norm(&p / "norm2", d, c.layer_norm_eps),
            fc1: linear(&p / "mlp" / "fc1", d, c.intermediate_size),
            fc2: linear(&p / "mlp" / "fc2", c.intermediate_size, d),
            heads: c.num_attention_heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let qkv = self.qkv.forward(&self.norm1.forward(x)).chunk(3, -1);
        let x = x + self
            .proj
            .forward(&attend(&qkv[0], &qkv[1], &qkv[2], self.heads, None));
        let h = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        &x + self.fc2.forward(&h)
    }
}

/// BLIP's `VisionTransformer`: patch embedding, class token, learned positions, the blocks and
/// a final norm; returns every token [B, 1 + patches, width].
#[derive(Debug)]
pub struct BlipVisionTransformer {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<VisionBlock>,
    norm: nn::LayerNorm,
}

impl BlipVisionTransformer {
    /// Lays out `visual_encoder.*` under `p`.
    pub fn new(p: nn::Path, c: &BlipVisionConfig) -> Self {
        let d = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        BlipVisionTransformer {
            patch_embed: nn::conv2d(
                &p / "patch_embed" / "proj",
                3,
                d,
                c.patch_size,
                nn::ConvConfig {
                    stride: c.patch_size,
                    ..Default::default()
                },
            ),
            cls_token: p.zeros("cls_token", &[1, 1, d]),
            pos_embed: p.zeros("pos_embed", &[1, patches + 1, d]),
            blocks: (0..c.num_hidden_layers)
                .map(|i| VisionBlock::new(&p / "blocks" / i, c))
                .collect(),
            norm: layer_norm(&p / "norm", d, c.layer_norm_eps),
        }
    }

    /// Image tokens [B, 1 + patches, width] of normalised pixels [B, 3, S, S].
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let x = self
            .patch_embed
            .forward(pixels)
            .flatten(2, 3)
            .transpose(1, 2);
        let b = x.size()[0];
        let cls = self.cls_token.expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[cls, x], 1) + &self.pos_embed;
        for block in &self.blocks {
            x = block.forward(&x);
        }
        self.norm.forward(&x)
    }
}

/// `BertAttention`: queries from the text, keys and values from `context` (the text itself, or
/// the image tokens), then `output.dense`, the residual and `output.LayerNorm`.
#[derive(Debug)]
struct BertAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    dense: nn::Linear,
    norm: nn::LayerNorm,
    heads: i64,
}

impl BertAttention {
    fn new(p: nn::Path, c: &BlipTextConfig, context_width: i64) -> Self {
        let d = c.hidden_size;
        BertAttention {
            query: linear(&p / "self" / "query", d, d),
            key: linear(&p / "self" / "key", context_width, d),
            value: linear(&p / "self" / "value", context_width, d),
            dense: linear(&p / "output" / "dense", d, d),
            norm: layer_norm(&p / "output" / "LayerNorm", d, c.layer_norm_eps),
            heads: c.num_attention_heads,
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let attended = attend(
            &self.query.forward(x),
            &self.key.forward(context),
            &self.value.forward(context),
            self.heads,
            mask,
        );
        self.norm.forward(&(self.dense.forward(&attended) + x))
    }
}

/// A multimodal `BertLayer`: self-attention, cross-attention to the image, feed-forward.
#[derive(Debug)]
struct BertLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: nn::LayerNorm,
}

impl BertLayer {
    fn new(p: nn::Path, c: &BlipTextConfig) -> Self {
        BertLayer {
            attention: BertAttention::new(&p / "attention", c, c.hidden_size),
            crossattention: BertAttention::new(&p / "crossattention", c, c.encoder_width),
            intermediate: linear(
                &p / "intermediate" / "dense",
                c.hidden_size,
                c.intermediate_size,
            ),
            output: linear(&p / "output" / "dense", c.intermediate_size, c.hidden_size),
            output_norm: layer_norm(&p / "output" / "LayerNorm", c.hidden_size, c.layer_norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, image: &Tensor) -> Tensor {
        let x = self.attention.forward(x, x, Some(mask));
        // Every image token is attended (ImageReward's image mask is all ones).
        let x = self.crossattention.forward(&x, image, None);
        let h = self.intermediate.forward(&x).gelu("none");
        self.output_norm.forward(&(self.output.forward(&h) + x))
    }
}

/// BLIP's `BertModel` without its pooler, run multimodally: token and position embeddings
/// (no token types), then layers that cross-attend to the image tokens.
#[derive(Debug)]
pub struct BlipTextEncoder {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    norm: nn::LayerNorm,
    layers: Vec<BertLayer>,
}

impl BlipTextEncoder {
    /// Lays out `text_encoder.*` under `p`.
    pub fn new(p: nn::Path, c: &BlipTextConfig) -> Self {
        let e = &p / "embeddings";
        BlipTextEncoder {
            word_embeddings: nn::embedding(
                &e / "word_embeddings",
                c.vocab_size,
                c.hidden_size,
                Default::default(),
            ),
            position_embeddings: nn::embedding(
                &e / "position_embeddings",
                c.max_position_embeddings,
                c.hidden_size,
                Default::default(),
            ),
            norm: layer_norm(&e / "LayerNorm", c.hidden_size, c.layer_norm_eps),
            layers: (0..c.num_hidden_layers)
                .map(|i| BertLayer::new(&p / "encoder" / "layer" / i, c))
                .collect(),
        }
    }

    /// The last hidden states [B, T, width] of `input_ids` [B, T] (`attention_mask` 1 for real
    /// tokens, 0 for padding) attending to `image` tokens [B, N, encoder_width].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, image: &Tensor) -> Tensor {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device()));
        let x = self.word_embeddings.forward(input_ids)
            + self.position_embeddings.forward(&positions).unsqueeze(0);
        let mut x = self.norm.forward(&x);
        // BERT's extended mask: 0 where attended, −10000 on padding.
        let mask =
            (attention_mask.to_kind(x.kind()) * -1.0 + 1.0).view([input_ids.size()[0], 1, 1, t])
                * -10000.0;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, image);
        }
        x
    }
}

/// The BERT WordPiece tokenizer of a tokenizer.json, padding and truncating every prompt to a
/// fixed length as `tokenizer(…, padding="max_length", truncation=True, max_length=N)`.
#[derive(Debug)]
pub struct BertTokenizer(PaddedTokenizer);

impl BertTokenizer {
    /// Reads `dir/tokenizer.json` (a `BertTokenizerFast`'s: [CLS] … [SEP], padded with [PAD]).
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self, HfError> {
        if max_length < 2 {
            return Err(HfError::Tokenizer {
                dir: dir.to_owned(),
                why: format!("max_length {max_length}: [CLS] and [SEP] need 2"),
            });
        }
        PaddedTokenizer::from_dir(dir, max_length, "[PAD]", "a BERT fast tokenizer")
            .map(BertTokenizer)
    }

    /// (ids, attention mask), both [B, max_length] int64 on `device`.
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<(Tensor, Tensor), HfError> {
        self.0.encode(prompts, device)
    }
}
