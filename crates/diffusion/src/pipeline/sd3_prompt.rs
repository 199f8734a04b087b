//! Prompt encoding as diffusers' `StableDiffusion3Pipeline.encode_prompt`: the penultimate
//! hidden states of CLIP-L and CLIP-G (`text_encoder`, `text_encoder_2`, both with projection)
//! side by side, zero-padded to T5's width, then T5's tokens after them (`text_encoder_3`,
//! `max_sequence_length` of them; zeros when the folder has no T5, as SD3 allows); the pooled
//! embedding is both CLIPs' projections side by side.

use std::path::Path;

use hf::t5::{T5EncoderModel, T5Tokenizer};
use tch::{nn, Device, Kind, Tensor};

use super::prompt::{penultimate, PromptEmbeds, TextEncoder};
use super::PipelineError;

/// T5 with its tokenizer.
struct T5 {
    tokenizer: T5Tokenizer,
    model: T5EncoderModel,
    _vs: nn::VarStore,
}

/// The three text encoders of an SD3 / SD3.5 folder.
pub struct Sd3TextEncoders {
    clip_l: TextEncoder,
    clip_g: TextEncoder,
    t5: Option<T5>,
    max_sequence_length: usize,
    /// The transformer's `joint_attention_dim`: the width of the zeros that stand in for T5.
    joint_attention_dim: i64,
}

impl Sd3TextEncoders {
    /// Loads `tokenizer{,_2,_3}/` and `text_encoder{,_2,_3}/` of `root` (the `_3` pair only if
    /// `text_encoder_3/` exists); T5 prompts become `max_sequence_length` tokens (SD3's 256).
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        joint_attention_dim: i64,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<Sd3TextEncoders, PipelineError> {
        let clip_l = TextEncoder::load(root, "tokenizer", "text_encoder", device, kind, variant)?;
        let clip_g =
            TextEncoder::load(root, "tokenizer_2", "text_encoder_2", device, kind, variant)?;
        for (name, encoder) in [("text_encoder", &clip_l), ("text_encoder_2", &clip_g)] {
            if !encoder.has_projection() {
                return Err(PipelineError::Folder {
                    path: root.join(name),
                    why: "SD3's CLIP text encoders must be CLIPTextModelWithProjection (their \
                          pooled projections condition the transformer)"
                        .into(),
                });
            }
        }
        let t5 = if root.join("text_encoder_3").is_dir() {
            let tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer_3"), max_sequence_length)?;
            let (vs, model) = T5EncoderModel::load(&root.join("text_encoder_3"), device, kind)
                .map_err(hf::HfError::from)?;
            Some(T5 {
                tokenizer,
                model,
                _vs: vs,
            })
        } else {
            None
        };
        Ok(Sd3TextEncoders {
            clip_l,
            clip_g,
            t5,
            max_sequence_length,
            joint_attention_dim,
        })
    }

    /// Whether the folder has T5 (`text_encoder_3/`); without it its tokens are zeros.
    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    /// Encodes prompts: `embeds` [B, 77 + max_sequence_length, width of T5] and `pooled`
    /// [B, projection L + projection G].
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<PromptEmbeds, PipelineError> {
        let l = self.clip_l.encode(prompts, device)?;
        let g = self.clip_g.encode(prompts, device)?;
        let clip = Tensor::cat(
            &[penultimate(&l.hidden_states), penultimate(&g.hidden_states)],
            -1,
        );
        let t5 = match &self.t5 {
            Some(t5) => {
                let ids = t5.tokenizer.encode(prompts, device)?;
                t5.model.forward(&ids).to_kind(clip.kind())
            }
            None => Tensor::zeros(
                [
                    prompts.len() as i64,
                    self.max_sequence_length as i64,
                    self.joint_attention_dim,
                ],
                (clip.kind(), device),
            ),
        };
        let width = t5.size()[2];
        let pad = width - clip.size()[2];
        if pad < 0 {
            return Err(PipelineError::Folder {
                path: "text_encoder_3".into(),
                why: format!(
                    "T5's width {width} is narrower than the two CLIPs' {} together",
                    clip.size()[2]
                ),
            });
        }
        let clip = clip.constant_pad_nd([0, pad]);
        let (Some(pooled_l), Some(pooled_g)) = (l.text_embeds, g.text_embeds) else {
            return Err(PipelineError::Folder {
                path: "text_encoder".into(),
                why: "a CLIP text encoder returned no pooled projection".into(),
            });
        };
        let pooled = Tensor::cat(&[pooled_l, pooled_g], -1);
        Ok(PromptEmbeds {
            embeds: Tensor::cat(&[clip, t5], -2),
            pooled: Some(pooled),
        })
    }
}
