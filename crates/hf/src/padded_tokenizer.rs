//! A fast tokenizer (`tokenizer.json`) that pads and truncates every text to one length, as
//! `tokenizer(…, padding="max_length", truncation=True, max_length=N)` does: T5's for SD3 / FLUX
//! and BERT's for ImageReward.

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::HfError;

/// A tokenizer.json tokenizer with fixed-length padding and truncation.
pub struct PaddedTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for PaddedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaddedTokenizer")
            .field("dir", &self.dir)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl PaddedTokenizer {
    /// Reads `dir/tokenizer.json` (`what` names the tokenizer in errors); every text becomes
    /// exactly `max_length` ids, padded with `pad_token`.
    pub fn from_dir(
        dir: &Path,
        max_length: usize,
        pad_token: &str,
        what: &str,
    ) -> Result<Self, HfError> {
        let err = |why: String| HfError::Tokenizer {
            dir: dir.to_owned(),
            why,
        };
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| err(format!("{}: {e} ({what}'s tokenizer.json)", path.display())))?;
        let pad_id = tokenizer
            .token_to_id(pad_token)
            .ok_or_else(|| err(format!("the vocabulary has no {pad_token} token")))?;
        if max_length == 0 {
            return Err(err("max_length 0".into()));
        }
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: pad_token.into(),
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        Ok(PaddedTokenizer {
            tokenizer,
            max_length,
            dir: dir.to_owned(),
        })
    }

    /// (ids, attention mask), both [B, max_length] int64 on `device`.
    pub fn encode(&self, texts: &[&str], device: Device) -> Result<(Tensor, Tensor), HfError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| HfError::Tokenizer {
                dir: self.dir.clone(),
                why: e.to_string(),
            })?;
        let gather = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<i64>| {
            let flat: Vec<i64> = encodings.iter().flat_map(f).collect();
            Tensor::from_slice(&flat)
                .view([texts.len() as i64, self.max_length as i64])
                .to_device(device)
        };
        Ok((
            gather(&|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()),
            gather(&|e| {
                e.get_attention_mask()
                    .iter()
                    .map(|&m| i64::from(m))
                    .collect()
            }),
        ))
    }
}
