//! Prompt encoding as diffusers' `FluxPipeline.encode_prompt`: CLIP-L's pooled output
//! (`text_encoder`, `tokenizer`) conditions the timestep embedding, T5's last hidden states
//! (`text_encoder_2`, `tokenizer_2`, `max_sequence_length` tokens, no attention mask) are the
//! prompt tokens.

use std::path::Path;

use hf::t5::{T5EncoderModel, T5Tokenizer};
use tch::{nn, Device, Kind};

use super::prompt::{PromptEmbeds, TextEncoder};
use super::PipelineError;

/// The two text encoders of a FLUX folder.
pub struct FluxTextEncoders {
    clip: TextEncoder,
    t5_tokenizer: T5Tokenizer,
    t5: T5EncoderModel,
    _t5_vs: nn::VarStore,
}

impl FluxTextEncoders {
    /// Loads `tokenizer/` + `text_encoder/` (CLIP-L) and `tokenizer_2/` + `text_encoder_2/`
    /// (T5) of `root`; prompts become `max_sequence_length` T5 tokens (schnell 256, dev 512).
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<FluxTextEncoders, PipelineError> {
        let clip = TextEncoder::load(root, "tokenizer", "text_encoder", device, kind, variant)?;
        let t5_tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer_2"), max_sequence_length)?;
        let (t5_vs, t5) = T5EncoderModel::load(&root.join("text_encoder_2"), device, kind)
            .map_err(hf::HfError::from)?;
        Ok(FluxTextEncoders {
            clip,
            t5_tokenizer,
            t5,
            _t5_vs: t5_vs,
        })
    }

    /// Encodes prompts: `embeds` = T5's tokens [B, max_sequence_length, d_model], `pooled` =
    /// CLIP-L's pooled output [B, 768].
    pub fn encode(&self, prompts: &[&str], device: Device) -> Result<PromptEmbeds, PipelineError> {
        let pooled = self.clip.encode(prompts, device)?.pooled_output;
        let ids = self.t5_tokenizer.encode(prompts, device)?;
        Ok(PromptEmbeds {
            embeds: self.t5.forward(&ids),
            pooled: Some(pooled),
        })
    }
}
