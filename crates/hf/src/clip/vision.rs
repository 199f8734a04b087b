//! The CLIP vision tower: `CLIPVisionEmbeddings`, `CLIPVisionTransformer` (transformers'
//! `CLIPVisionModel.vision_model`, with its pre-LayerNorm `pre_layrnorm`) and
//! `CLIPVisionModelWithProjection`.

use tch::{nn, nn::Module, Kind, Tensor};

use super::config::ClipVisionConfig;
use super::encoder::{ClipEncoder, EncoderSpec, Mask};

/// `CLIPVisionEmbeddings`: a class token, non-overlapping patch embeddings and learned positions.
#[derive(Debug)]
pub struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
}

impl ClipVisionEmbeddings {
    fn new(p: nn::Path, c: &ClipVisionConfig) -> Self {
        let conv = nn::ConvConfig {
            stride: c.patch_size,
            bias: false,
            ..Default::default()
        };
        let num_positions = (c.image_size / c.patch_size).pow(2) + 1;
        ClipVisionEmbeddings {
            class_embedding: p.var("class_embedding", &[c.hidden_size], nn::Init::Const(0.0)),
            patch_embedding: nn::conv2d(
                &p / "patch_embedding",
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                conv,
            ),
            position_embedding: nn::embedding(
                &p / "position_embedding",
                num_positions,
                c.hidden_size,
                Default::default(),
            ),
        }
    }

    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let b = pixel_values.size()[0];
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(self.class_embedding.kind()))
            .flatten(2, -1)
            .transpose(1, 2);
        let d = self.class_embedding.size()[0];
        let class = self.class_embedding.expand([b, 1, d], false);
        Tensor::cat(&[class, patches], 1) + self.position_embedding.ws.unsqueeze(0)
    }
}

/// What the vision tower computes for a batch of images.
#[derive(Debug)]
pub struct ClipVisionOutput {
    /// Final hidden states `[B, 1 + patches, hidden]` (no LayerNorm after the last layer).
    pub last_hidden_state: Tensor,
    /// The embeddings after `pre_layrnorm` and each layer's output, `num_hidden_layers + 1`.
    pub hidden_states: Vec<Tensor>,
    /// `post_layernorm` of the class token, `[B, hidden]`.
    pub pooled_output: Tensor,
}

/// `CLIPVisionTransformer`.
#[derive(Debug)]
pub struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: nn::LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: nn::LayerNorm,
}

impl ClipVisionTransformer {
    /// Lays out the tower under `p` (`vision_model` in HF checkpoints).
    pub fn new(p: nn::Path, c: &ClipVisionConfig) -> Self {
        let spec = EncoderSpec {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            num_hidden_layers: c.num_hidden_layers,
            hidden_act: c.hidden_act,
            layer_norm_eps: c.layer_norm_eps,
        };
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        ClipVisionTransformer {
            embeddings: ClipVisionEmbeddings::new(&p / "embeddings", c),
            // Sic: transformers' name for the pre-encoder LayerNorm.
            pre_layrnorm: nn::layer_norm(&p / "pre_layrnorm", vec![c.hidden_size], ln),
            encoder: ClipEncoder::new(&p / "encoder", &spec),
            post_layernorm: nn::layer_norm(&p / "post_layernorm", vec![c.hidden_size], ln),
        }
    }

    /// Encodes `pixel_values` `[B, C, image_size, image_size]`.
    pub fn forward(&self, pixel_values: &Tensor) -> ClipVisionOutput {
        let xs = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values));
        let hidden_states = self.encoder.forward(&xs, Mask::None);
        let last_hidden_state = hidden_states
            .last()
            .expect("the encoder returns its input")
            .shallow_clone();
        let pooled_output = self.post_layernorm.forward(&last_hidden_state.select(1, 0));
        ClipVisionOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
        }
    }
}

/// `CLIPVisionModelWithProjection`: the tower under `vision_model` and a bias-free
/// `visual_projection` (the layout inside a `CLIPModel` checkpoint too).
#[derive(Debug)]
pub struct ClipVisionModelWithProjection {
    /// The transformer.
    pub vision_model: ClipVisionTransformer,
    visual_projection: nn::Linear,
}

impl ClipVisionModelWithProjection {
    /// Lays out the model under `p`.
    pub fn new(p: nn::Path, c: &ClipVisionConfig, projection_dim: i64) -> Self {
        let cfg = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        ClipVisionModelWithProjection {
            vision_model: ClipVisionTransformer::new(&p / "vision_model", c),
            visual_projection: nn::linear(
                &p / "visual_projection",
                c.hidden_size,
                projection_dim,
                cfg,
            ),
        }
    }

    /// `visual_projection` of `states` (the last dimension the tower's width).
    pub fn project(&self, states: &Tensor) -> Tensor {
        self.visual_projection.forward(states)
    }

    /// The tower's outputs and the projected image embedding `[B, projection_dim]`.
    pub fn forward(&self, pixel_values: &Tensor) -> (ClipVisionOutput, Tensor) {
        let out = self.vision_model.forward(pixel_values);
        let embeds = self.visual_projection.forward(&out.pooled_output);
        (out, embeds)
    }
}

/// Divides each row by its L2 norm (transformers' `_get_vector_norm`, without an epsilon).
pub fn l2_normalize(xs: &Tensor) -> Tensor {
    xs / xs
        .square()
        .sum_dim_intlist(-1, true, Kind::Float)
        .sqrt()
        .to_kind(xs.kind())
}
