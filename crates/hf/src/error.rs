//! The errors of model-file handling: each names the file or folder and what to do.

use std::path::PathBuf;

use crate::load::LoadError;

/// Everything that can go wrong finding, reading or tokenizing with model files.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A model folder, config or weight file could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The tokenizer files could not be loaded or a prompt could not be encoded.
    #[error("tokenizer in {dir}: {why}")]
    Tokenizer {
        /// The tokenizer folder.
        dir: PathBuf,
        /// The tokenizers library's message.
        why: String,
    },
    /// A hub id or model path could not be resolved to files on disk.
    #[error("{path}: {why}")]
    Hub {
        /// The folder, file or hub id.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
}
