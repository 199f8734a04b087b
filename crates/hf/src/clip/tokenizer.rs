//! The CLIP tokenizer (transformers' `CLIPTokenizer`): byte-level BPE with `</w>` word ends, NFC +
//! whitespace collapsing + lowercasing, `<|startoftext|> … <|endoftext|>`, truncated and padded to
//! the context length with the pad token of `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationParams,
};

use crate::load::read_json;
use crate::HfError;

/// CLIP's context length, used when `tokenizer_config.json` gives no usable `model_max_length`.
const CONTEXT_LENGTH: usize = 77;

/// transformers' CLIP pre-tokenization pattern: special tokens, English contractions, letter
/// runs, single digits, and runs of other non-space characters.
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token in `tokenizer_config.json`: a string, or an AddedToken object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) | TokenSpec::Added { content: s } => s,
        }
    }
}

/// The keys of `tokenizer_config.json` (or `special_tokens_map.json`) the tokenizer uses;
/// transformers' defaults otherwise.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
}

/// Token ids and attention mask of a batch of prompts, each `[B, max_length]` int64.
#[derive(Debug)]
pub struct TokenizedBatch {
    /// Token ids.
    pub input_ids: Tensor,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// One encoded prompt, `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
}

/// A CLIP tokenizer read from an HF tokenizer folder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dir", &self.dir)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads `dir/tokenizer.json` if present, else builds the tokenizer from `vocab.json` and
    /// `merges.txt`; `tokenizer_config.json` and `special_tokens_map.json` (both optional) name
    /// the special tokens, `tokenizer_config.json` the length.
    pub fn from_dir(dir: &Path) -> Result<Self, HfError> {
        let err = |why: String| HfError::Tokenizer {
            dir: dir.to_owned(),
            why,
        };
        let read = |name: &str| -> Result<TokenizerConfig, HfError> {
            let path = dir.join(name);
            if path.exists() {
                Ok(read_json(&path)?)
            } else {
                Ok(TokenizerConfig::default())
            }
        };
        let config = read("tokenizer_config.json")?;
        // Older folders name some special tokens only in special_tokens_map.json.
        let map = read("special_tokens_map.json")?;
        let token = |own: &Option<TokenSpec>, other: &Option<TokenSpec>, default: &str| {
            own.as_ref()
                .or(other.as_ref())
                .map_or(default, TokenSpec::content)
                .to_owned()
        };
        let bos = token(&config.bos_token, &map.bos_token, "<|startoftext|>");
        let eos = token(&config.eos_token, &map.eos_token, "<|endoftext|>");
        let unk = token(&config.unk_token, &map.unk_token, "<|endoftext|>");
        let pad = token(&config.pad_token, &map.pad_token, "<|endoftext|>");
        // Configs without a real limit store a huge sentinel (1e30).
        let max_length = config
            .model_max_length
            .filter(|n| (2.0..=1e6).contains(n))
            .map_or(CONTEXT_LENGTH, |n| n as usize);

        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| err(format!("{}: {e}", json.display())))?
        } else {
            Tokenizer::new(Self::bpe_from_vocab_merges(dir, &unk).map_err(err)?)
        };
        Self::clip_pipeline(&mut tokenizer, [&bos, &eos, &unk, &pad]).map_err(err)?;
        let pad_id = tokenizer.token_to_id(&pad).ok_or_else(|| {
            err(format!(
                "pad token {pad:?} of tokenizer_config.json is not in the vocabulary"
            ))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_id,
            pad_token: pad,
            ..Default::default()
        }));
        Ok(ClipTokenizer {
            tokenizer,
            max_length,
            dir: dir.to_owned(),
        })
    }

    /// The BPE model of `vocab.json` + `merges.txt`, as transformers' `CLIPTokenizer` builds it.
    fn bpe_from_vocab_merges(dir: &Path, unk: &str) -> Result<BPE, String> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab.exists() || !merges.exists() {
            return Err(
                "neither tokenizer.json nor vocab.json + merges.txt found; copy the tokenizer \
                 files of the model (or its processor repository) into this folder"
                    .into(),
            );
        }
        let path = |p: &Path| p.to_str().map(str::to_owned).ok_or("non-UTF-8 path");
        BPE::from_file(&path(&vocab)?, &path(&merges)?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk.into())
            .build()
            .map_err(|e| format!("{} / {}: {e}", vocab.display(), merges.display()))
    }

    /// Installs the normalizer, pre-tokenizer, post-processor and special tokens of
    /// transformers' `CLIPTokenizer`. transformers 5 does this even when it reads a
    /// tokenizer.json (it keeps only the vocabulary, merges and added tokens of the file), so
    /// files written by older converters encode the same way.
    fn clip_pipeline(
        tokenizer: &mut Tokenizer,
        [bos, eos, unk, pad]: [&str; 4],
    ) -> Result<(), String> {
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| e.to_string())?;
        tokenizer.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| e.to_string())?;
        tokenizer.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| format!("special token {t:?} is not in the vocabulary"))
        };
        let processor = RobertaProcessing::new((eos.into(), id(eos)?), (bos.into(), id(bos)?))
            .trim_offsets(false)
            .add_prefix_space(false);
        tokenizer.with_post_processor(Some(processor));
        let specials: Vec<AddedToken> = [bos, eos, unk, pad]
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        tokenizer.add_special_tokens(&specials);
        Ok(())
    }

    /// The padded length of every sequence.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of each prompt: `<|startoftext|>`, at most `max_length - 2` tokens,
    /// `<|endoftext|>`, then padding to `max_length`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Encoded>, HfError> {
        let encodings = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| HfError::Tokenizer {
                dir: self.dir.clone(),
                why: e.to_string(),
            })?;
        Ok(encodings
            .into_iter()
            .map(|e| Encoded {
                ids: e.get_ids().to_vec(),
                attention_mask: e.get_attention_mask().to_vec(),
            })
            .collect())
    }

    /// [`encode`](Self::encode) as int64 tensors on `device`.
    pub fn encode_batch(
        &self,
        prompts: &[&str],
        device: Device,
    ) -> Result<TokenizedBatch, HfError> {
        let encoded = self.encode(prompts)?;
        let rows = encoded.len() as i64;
        let flat = |pick: fn(&Encoded) -> &Vec<u32>| {
            let v: Vec<i64> = encoded
                .iter()
                .flat_map(|e| pick(e).iter().map(|&x| x as i64))
                .collect();
            Tensor::from_slice(&v)
                .view([rows, self.max_length as i64])
                .to_kind(Kind::Int64)
                .to_device(device)
        };
        Ok(TokenizedBatch {
            input_ids: flat(|e| &e.ids),
            attention_mask: flat(|e| &e.attention_mask),
        })
    }
}
