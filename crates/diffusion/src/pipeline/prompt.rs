//! Prompt encoding as diffusers' `StableDiffusionPipeline.encode_prompt` (one CLIP text encoder,
//! last hidden state) and `StableDiffusionXLPipeline.encode_prompt` (two encoders, penultimate
//! hidden states concatenated, pooled projection of the second); SD3's is in sd3_prompt.rs.

use std::path::Path;

use hf::clip::{ClipTextModel, ClipTextOutput, ClipTokenizer};
use tch::{nn, Device, Kind, Tensor};

use super::PipelineError;

/// Text embeddings of a batch of prompts.
#[derive(Debug)]
pub struct PromptEmbeds {
    /// Per-token embeddings the UNet attends to, [B, 77, D].
    pub embeds: Tensor,
    /// SDXL's pooled, projected embedding of the second encoder, [B, P].
    pub pooled: Option<Tensor>,
}

/// One tokenizer and its text encoder.
pub(super) struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
    _vs: nn::VarStore,
}

impl TextEncoder {
    pub(super) fn load(
        root: &Path,
        tokenizer: &str,
        encoder: &str,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<TextEncoder, PipelineError> {
        let tokenizer = ClipTokenizer::from_dir(&root.join(tokenizer))?;
        let (vs, model) = ClipTextModel::load(&root.join(encoder), device, kind, variant)?;
        Ok(TextEncoder {
            tokenizer,
            model,
            _vs: vs,
        })
    }

    pub(super) fn encode(
        &self,
        prompts: &[&str],
        device: Device,
    ) -> Result<ClipTextOutput, PipelineError> {
        let ids = self.tokenizer.encode_batch(prompts, device)?.input_ids;
        // The pipelines pass no attention mask: CLIP reads all 77 positions, padding included.
        Ok(self.model.forward(&ids, None))
    }

    /// Whether the encoder is a CLIPTextModelWithProjection.
    pub(super) fn has_projection(&self) -> bool {
        self.model.has_projection()
    }
}

/// The text side of a pipeline: SD 1.x / 2.x have `tokenizer/` + `text_encoder/`; SDXL adds
/// `tokenizer_2/` + `text_encoder_2/` (with projection).
pub struct TextEncoders {
    first: TextEncoder,
    second: Option<TextEncoder>,
}

impl TextEncoders {
    /// Loads `tokenizer/` + `text_encoder/`, and the `_2` pair when `dual`.
    pub fn load(
        root: &Path,
        dual: bool,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<TextEncoders, PipelineError> {
        let first = TextEncoder::load(root, "tokenizer", "text_encoder", device, kind, variant)?;
        let second = if dual {
            let second =
                TextEncoder::load(root, "tokenizer_2", "text_encoder_2", device, kind, variant)?;
            if !second.has_projection() {
                return Err(PipelineError::Folder {
                    path: root.join("text_encoder_2"),
                    why: "SDXL's second text encoder must be a CLIPTextModelWithProjection (its \
                          pooled projection conditions the UNet)"
                        .into(),
                });
            }
            Some(second)
        } else {
            None
        };
        Ok(TextEncoders { first, second })
    }

    /// Encodes prompts as the matching diffusers pipeline does.
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<PromptEmbeds, PipelineError> {
        let first = self.first.encode(prompts, device)?;
        let Some(second) = &self.second else {
            return Ok(PromptEmbeds {
                embeds: first.last_hidden_state,
                pooled: None,
            });
        };
        let second = second.encode(prompts, device)?;
        Ok(PromptEmbeds {
            embeds: Tensor::cat(
                &[
                    penultimate(&first.hidden_states),
                    penultimate(&second.hidden_states),
                ],
                -1,
            ),
            pooled: second.text_embeds,
        })
    }
}

/// The penultimate hidden state, which SDXL and SD3 condition on.
pub(super) fn penultimate(hidden_states: &[Tensor]) -> Tensor {
    hidden_states[hidden_states.len() - 2].shallow_clone()
}
