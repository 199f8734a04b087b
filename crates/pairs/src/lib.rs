//! The Parquet pair store: every sampled (or imported) preference pair, durable and replayable.
//!
//! Layout and columns: docs/pairs.md, [`schema`]; rows as Rust values: [`record`]; their Arrow
//! batches: [`batch`]. Writing: [`writer`]. Reading with projection, filters and seeded
//! shuffling: [`reader`]. Summaries and checks: [`inspect`]. Imports: [`import`].

pub mod batch;
pub mod import;
pub mod inspect;
pub mod reader;
pub mod record;
pub mod recover;
pub mod schema;
pub mod shard;
pub mod writer;

use std::path::PathBuf;

pub use batch::{batch_to_records, records_to_batch, Columns};
pub use reader::{PairFilter, PairReader, ReadOptions};
pub use record::{ImageFormat, Label, LatentDType, Latents, PairRecord, Side, Source};
pub use recover::{recover_dir, recover_store, RecoveryReport};
pub use schema::{col, pair_schema, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
pub use writer::{AsyncPairWriter, PairStoreWriter, WriterOptions, WriterStats};

/// Errors of the pair store; each names the file (and row) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PairsError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not a readable Parquet file.
    #[error("{path} is not a readable pair shard: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file is Parquet but not in the pair schema.
    #[error("{path} is not a pair-store file: {why}")]
    WrongSchema {
        /// The file.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// A row breaks an invariant of the schema.
    #[error("row {row}: {why}")]
    InvalidRecord {
        /// Row index (in its batch or file).
        row: usize,
        /// The column and what is wrong with it.
        why: String,
    },
    /// A record batch does not follow the pair schema.
    #[error("batch does not follow the pair schema: {0}")]
    Schema(String),
    /// An option given to the store is invalid.
    #[error("{0}")]
    BadOption(String),
    /// The async writer task has stopped (after an error it reported).
    #[error("the pair-store writer has stopped; see the error it logged before")]
    WriterStopped,
    /// The async writer failed to make pairs durable.
    #[error("pair-store writer failed: {0}")]
    WriterFailed(String),
    /// Parquet encoding or decoding failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Arrow failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl PairsError {
    /// Attaches a file path to an error that lacks one.
    pub fn in_file(self, path: &std::path::Path) -> PairsError {
        match self {
            PairsError::InvalidRecord { row, why } => PairsError::Corrupt {
                path: path.to_owned(),
                why: format!("row {row}: {why}"),
            },
            PairsError::Parquet(e) => PairsError::Corrupt {
                path: path.to_owned(),
                why: e.to_string(),
            },
            PairsError::Arrow(e) => PairsError::Corrupt {
                path: path.to_owned(),
                why: e.to_string(),
            },
            PairsError::Schema(why) => PairsError::WrongSchema {
                path: path.to_owned(),
                why,
            },
            other => other,
        }
    }
}
