//! Prompt encoding as diffusers' `ZImagePipeline._encode_prompt`: the prompt in Qwen3's chat
//! template (one user turn, the assistant's turn opened), at most `max_sequence_length` tokens,
//! and Qwen3's hidden states before its last layer at the real (unpadded) positions. Each
//! prompt keeps its own length; the transformer pads and masks.

use std::path::Path;

use hf::qwen3::{Qwen3Model, Qwen3Tokenizer};
use tch::{nn, Device, Kind};

use super::prompt::PromptEmbeds;
use super::PipelineError;

/// The text encoder of a Z-Image folder.
pub struct ZImageTextEncoder {
    tokenizer: Qwen3Tokenizer,
    model: Qwen3Model,
    _vs: nn::VarStore,
}

impl ZImageTextEncoder {
    /// Loads `tokenizer/` and `text_encoder/` (a `Qwen3Model`) of `root`; prompts become at
    /// most `max_sequence_length` tokens (the pipeline's default is 512).
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        device: Device,
        kind: Kind,
    ) -> Result<ZImageTextEncoder, PipelineError> {
        let tokenizer = Qwen3Tokenizer::from_dir(&root.join("tokenizer"), max_sequence_length)?;
        let (vs, model) = Qwen3Model::load(&root.join("text_encoder"), device, kind)
            .map_err(hf::HfError::from)?;
        Ok(ZImageTextEncoder {
            tokenizer,
            model,
            _vs: vs,
        })
    }

    /// Width of the prompt tokens (Qwen3's hidden size).
    pub fn width(&self) -> i64 {
        self.model.config().hidden_size
    }

    /// Encodes one prompt: `embeds` [1, n, hidden_size] for its n chat-formatted tokens, no
    /// pooled embedding.
    pub fn encode(&self, prompt: &str, device: Device) -> Result<PromptEmbeds, PipelineError> {
        let ids = self.tokenizer.encode(prompt, device)?;
        Ok(PromptEmbeds {
            embeds: self.model.penultimate_hidden_states(&ids),
            pooled: None,
        })
    }
}
