//! The CLIP text tower: `CLIPTextEmbeddings`, `CLIPTextTransformer` (transformers'
//! `CLIPTextModel.text_model`) and `CLIPTextModel` / `CLIPTextModelWithProjection`, as found in
//! a diffusers `text_encoder/` folder.

use std::path::Path;

use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::config::{ClipTextConfig, ConfigFile};
use super::encoder::{ClipEncoder, EncoderSpec, Mask};
use crate::load::{build_and_load_with_prefix, check_dir, read_json, weight_files, LoadError};
use crate::HfError;

/// The `eos_token_id` of configs saved before transformers PR #24773; with it the pooled token is
/// the one with the largest id (CLIP's `<|endoftext|>` is the last of its vocabulary).
const LEGACY_EOS_TOKEN_ID: i64 = 2;

/// `CLIPTextEmbeddings`: token plus learned position embeddings.
#[derive(Debug)]
pub struct ClipTextEmbeddings {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
}

impl ClipTextEmbeddings {
    fn new(p: nn::Path, c: &ClipTextConfig) -> Self {
        let e = Default::default();
        ClipTextEmbeddings {
            token_embedding: nn::embedding(&p / "token_embedding", c.vocab_size, c.hidden_size, e),
            position_embedding: nn::embedding(
                &p / "position_embedding",
                c.max_position_embeddings,
                c.hidden_size,
                e,
            ),
        }
    }

    fn forward(&self, input_ids: &Tensor) -> Tensor {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device()));
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions)
    }
}

/// What the text transformer computes for a batch of token ids.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// Final hidden states after `final_layer_norm`, `[B, T, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embeddings and each layer's output, `num_hidden_layers + 1` tensors `[B, T, hidden]`,
    /// without the final LayerNorm (`hidden_states[-2]` is SDXL's penultimate layer).
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each sequence's end-of-text token, `[B, hidden]`.
    pub pooled_output: Tensor,
    /// `text_projection(pooled_output)`, `[B, projection_dim]`, when the model has a projection.
    pub text_embeds: Option<Tensor>,
}

/// `CLIPTextTransformer`: embeddings, causal encoder, final LayerNorm and EOS pooling.
#[derive(Debug)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: i64,
}

impl ClipTextTransformer {
    /// Lays out the tower under `p` (`text_model` in HF checkpoints).
    pub fn new(p: nn::Path, c: &ClipTextConfig) -> Self {
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
        ClipTextTransformer {
            embeddings: ClipTextEmbeddings::new(&p / "embeddings", c),
            encoder: ClipEncoder::new(&p / "encoder", &spec),
            final_layer_norm: nn::layer_norm(&p / "final_layer_norm", vec![c.hidden_size], ln),
            eos_token_id: c.eos_token_id,
        }
    }

    /// Encodes `input_ids` `[B, T]` (int64). `attention_mask` `[B, T]` (1 = token, 0 = padding)
    /// additionally hides padding keys, as transformers does when it is passed; diffusers'
    /// pipelines pass none. The pooled output is the same either way.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> ClipTextOutput {
        let xs = self.embeddings.forward(input_ids);
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        let explicit = attention_mask.map(|m| {
            let causal = Tensor::ones([t, t], (Kind::Bool, xs.device())).tril(0);
            let keys = m.to_kind(Kind::Bool).view([b, 1, 1, t]);
            causal.logical_and(&keys)
        });
        let mask = match &explicit {
            Some(m) => Mask::Explicit(m),
            None => Mask::Causal,
        };
        let hidden_states = self.encoder.forward(&xs, mask);
        let last_hidden_state = self
            .final_layer_norm
            .forward(hidden_states.last().expect("the encoder returns its input"));
        let eos_positions = if self.eos_token_id == LEGACY_EOS_TOKEN_ID {
            input_ids.to_kind(Kind::Int).argmax(-1, false)
        } else {
            // The first end-of-text token: padding may use the same id.
            input_ids
                .eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(b, (Kind::Int64, xs.device()));
        let pooled_output = last_hidden_state.index(&[Some(rows), Some(eos_positions)]);
        ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
            text_embeds: None,
        }
    }
}

/// `CLIPTextModel` (no projection) or `CLIPTextModelWithProjection`: the text transformer under
/// `text_model` and an optional bias-free `text_projection`.
#[derive(Debug)]
pub struct ClipTextModel {
    /// The transformer.
    pub text_model: ClipTextTransformer,
    text_projection: Option<nn::Linear>,
}

impl ClipTextModel {
    /// Lays out the model under `p`; `projection_dim` adds `text_projection`.
    pub fn new(p: nn::Path, c: &ClipTextConfig, projection_dim: Option<i64>) -> Self {
        let text_projection = projection_dim.map(|d| {
            let cfg = nn::LinearConfig {
                bias: false,
                ..Default::default()
            };
            nn::linear(&p / "text_projection", c.hidden_size, d, cfg)
        });
        ClipTextModel {
            text_model: ClipTextTransformer::new(&p / "text_model", c),
            text_projection,
        }
    }

    /// Loads a transformers `CLIPTextModel` or `CLIPTextModelWithProjection` folder (config.json
    /// plus safetensors, e.g. diffusers' `text_encoder/` and `text_encoder_2/`) in `kind` on
    /// `device`; `variant` (e.g. `fp16`) reads `model.VARIANT.safetensors`. The projection is
    /// built when `architectures` names the projection model.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(nn::VarStore, Self), HfError> {
        check_dir(dir)?;
        let path = dir.join("config.json");
        let file: ConfigFile<ClipTextConfig> = read_json(&path)?;
        if let Some(why) = file.config.problem() {
            return Err(LoadError::Unsupported { path, why }.into());
        }
        let projection = file
            .architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
            .then_some(file.config.projection_dim);
        Ok(build_and_load_with_prefix(
            &weight_files(dir, variant)?,
            device,
            kind,
            Some("text_model"),
            |p| ClipTextModel::new(p, &file.config, projection),
        )?)
    }

    /// `text_projection` of `states` (the last dimension the tower's width).
    ///
    /// Panics without a projection ([`ClipTextModel::has_projection`]).
    pub fn project(&self, states: &Tensor) -> Tensor {
        self.text_projection
            .as_ref()
            .expect("a projected text model")
            .forward(states)
    }

    /// Whether `forward` fills `text_embeds`.
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Encodes token ids; see [`ClipTextTransformer::forward`].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> ClipTextOutput {
        let mut out = self.text_model.forward(input_ids, attention_mask);
        out.text_embeds = self
            .text_projection
            .as_ref()
            .map(|proj| proj.forward(&out.pooled_output));
        out
    }
}
