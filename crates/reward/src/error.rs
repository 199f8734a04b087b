//! The errors of the reward crate: each names the file, key or tensor involved and what to do.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a scorer.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// A model folder, its weights or its tokenizer could not be found or loaded.
    #[cfg(feature = "local")]
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    /// An image could not be read or decoded.
    #[error("cannot decode image {path}: {why}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        why: String,
    },
    /// A scorer returned another number of scores than it was given items.
    #[error("scorer {scorer} returned {got} scores for {expected} items; refusing to pair images with the wrong scores")]
    Count {
        /// Scorer name and version.
        scorer: String,
        /// Items sent.
        expected: usize,
        /// Scores received.
        got: usize,
    },
    /// A scorer returned NaN or an infinity.
    #[error("scorer {scorer} returned a non-finite score {value} for item {index} (prompt {prompt:?}); check the model weights and dtype")]
    NotFinite {
        /// Scorer name and version.
        scorer: String,
        /// Position in the batch.
        index: usize,
        /// The prompt of that item.
        prompt: String,
        /// The value.
        value: f32,
    },
    /// The HTTP reward protocol failed: server unreachable, rejected request, bad reply.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// A scorer configuration is invalid.
    #[error("scorer config: {0}")]
    Config(String),
    #[cfg(feature = "local")]
    /// libtorch reported an error while running a model.
    #[error("{what}: {source}")]
    Torch {
        /// What was being done.
        what: String,
        /// libtorch's message.
        source: tch::TchError,
    },
}

#[cfg(feature = "local")]
impl From<hf::load::LoadError> for RewardError {
    fn from(e: hf::load::LoadError) -> Self {
        RewardError::Hf(e.into())
    }
}
