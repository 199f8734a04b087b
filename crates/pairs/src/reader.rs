//! Streaming pairs back out of the store: in order or shuffled with a seed, filtered, and
//! reading only the columns asked for.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{Float32Type, Int64Type, Int8Type};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::record::{Label, Source};
use super::schema::{
    col, conform_column, pair_schema, same_layout, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
use super::shard::{has_parquet_magic, TMP_SUFFIX};
use super::PairsError;

/// Which pairs to keep.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairFilter {
    /// Keep pairs whose `policy_version` lies in this inclusive range (drops imported pairs).
    pub policy_version: Option<(i64, i64)>,
    /// Keep pairs whose |score_0 − score_1| is at least this.
    pub min_score_margin: Option<f32>,
    /// Drop ties.
    pub skip_ties: bool,
    /// Keep only these sources.
    pub sources: Option<Vec<Source>>,
}

impl PairFilter {
    fn is_empty(&self) -> bool {
        *self == PairFilter::default()
    }

    fn columns(&self) -> Vec<&'static str> {
        let mut cols = Vec::new();
        if self.policy_version.is_some() {
            cols.push(col::POLICY_VERSION);
        }
        if self.min_score_margin.is_some() {
            cols.extend([col::SCORE_0, col::SCORE_1]);
        }
        if self.skip_ties {
            cols.push(col::LABEL);
        }
        if self.sources.is_some() {
            cols.push(col::SOURCE);
        }
        cols
    }

    fn mask(&self, batch: &RecordBatch) -> BooleanArray {
        let n = batch.num_rows();
        let get = |name: &str| batch.column_by_name(name).expect("filter column projected");
        (0..n)
            .map(|i| {
                if let Some((lo, hi)) = self.policy_version {
                    let v = get(col::POLICY_VERSION).as_primitive::<Int64Type>();
                    if v.is_null(i) || v.value(i) < lo || v.value(i) > hi {
                        return Some(false);
                    }
                }
                if let Some(m) = self.min_score_margin {
                    let a = get(col::SCORE_0).as_primitive::<Float32Type>().value(i);
                    let b = get(col::SCORE_1).as_primitive::<Float32Type>().value(i);
                    if (a - b).abs() < m {
                        return Some(false);
                    }
                }
                if self.skip_ties {
                    let l = get(col::LABEL).as_primitive::<Int8Type>().value(i);
                    if l == Label::Tie.code() {
                        return Some(false);
                    }
                }
                if let Some(sources) = &self.sources {
                    let s = get(col::SOURCE).as_string::<i32>().value(i);
                    if !sources.iter().any(|src| src.as_str() == s) {
                        return Some(false);
                    }
                }
                Some(true)
            })
            .collect()
    }
}

/// How to read.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Columns to return, in this order; `None` for all of them.
    pub columns: Option<Vec<String>>,
    /// `None`: shards, row groups and rows in stored order. `Some(seed)`: shards and row groups
    /// in a seeded random order, and rows shuffled within each batch.
    pub shuffle_seed: Option<u64>,
    /// Rows to keep.
    pub filter: PairFilter,
    /// Rows per batch read from disk (before filtering).
    pub batch_size: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            columns: None,
            shuffle_seed: None,
            filter: PairFilter::default(),
            batch_size: 256,
        }
    }
}

/// Expands files and directories into the list of closed shards, in name order.
///
/// Directories contribute their `*.parquet` files; shards still open (`.parquet.tmp`) are
/// skipped with a warning, since they have no footer yet.
pub fn shard_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PairsError> {
    let (finished, open) = list_shards(paths)?;
    for p in open {
        tracing::warn!(
            "skipping {}: the shard is still being written, or its writer crashed (`pso pairs \
             recover DIR` closes it at its last flushed row group)",
            p.display()
        );
    }
    Ok(finished)
}

/// The shards under `paths` still open (`.parquet.tmp`): being written, or left by a crash.
pub fn open_shard_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PairsError> {
    Ok(list_shards(paths)?.1)
}

/// (finished shards, open shards) under `paths`: files as given, directories listed.
fn list_shards(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>), PairsError> {
    let (mut out, mut open) = (Vec::new(), Vec::new());
    for path in paths {
        let meta = fs::metadata(path).map_err(|source| PairsError::Io {
            path: path.clone(),
            action: "open",
            source,
        })?;
        if !meta.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(path).map_err(|source| PairsError::Io {
            path: path.clone(),
            action: "list",
            source,
        })? {
            let p = entry
                .map_err(|source| PairsError::Io {
                    path: path.clone(),
                    action: "list",
                    source,
                })?
                .path();
            let name = p.to_string_lossy();
            if name.ends_with(".parquet") {
                found.push(p);
            } else if name.ends_with(TMP_SUFFIX) {
                open.push(p);
            }
        }
        found.sort();
        out.extend(found);
    }
    open.sort();
    Ok((out, open))
}

/// Opens one shard after checking that it is a complete pair-store file of a known version.
pub fn open_shard(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, PairsError> {
    if !has_parquet_magic(path)? {
        return Err(PairsError::Corrupt {
            path: path.to_owned(),
            why: "no Parquet magic at both ends: truncated, still being written, or not Parquet"
                .into(),
        });
    }
    let file = File::open(path).map_err(|source| PairsError::Io {
        path: path.to_owned(),
        action: "open",
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| PairsError::Corrupt {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    check_schema(path, &builder)?;
    Ok(builder)
}

/// The schema version a shard declares.
pub fn schema_version(
    path: &Path,
    builder: &ParquetRecordBatchReaderBuilder<File>,
) -> Result<u32, PairsError> {
    let kv = builder.metadata().file_metadata().key_value_metadata();
    let value = kv
        .and_then(|kv| kv.iter().find(|e| e.key == SCHEMA_VERSION_KEY))
        .and_then(|e| e.value.clone())
        .ok_or_else(|| PairsError::WrongSchema {
            path: path.to_owned(),
            why: format!("no `{SCHEMA_VERSION_KEY}` in the file metadata (not written by pso)"),
        })?;
    value.parse().map_err(|_| PairsError::WrongSchema {
        path: path.to_owned(),
        why: format!("`{SCHEMA_VERSION_KEY}` is `{value}`, not a number"),
    })
}

fn check_schema(
    path: &Path,
    builder: &ParquetRecordBatchReaderBuilder<File>,
) -> Result<(), PairsError> {
    let version = schema_version(path, builder)?;
    if version > SCHEMA_VERSION {
        return Err(PairsError::WrongSchema {
            path: path.to_owned(),
            why: format!(
                "schema version {version} is newer than this pso reads ({SCHEMA_VERSION}); upgrade pso"
            ),
        });
    }
    let found = builder.schema();
    for field in pair_schema().fields() {
        match found.field_with_name(field.name()) {
            Err(_) => {
                return Err(PairsError::WrongSchema {
                    path: path.to_owned(),
                    why: format!("column `{}` is missing", field.name()),
                })
            }
            Ok(f) if !same_layout(f.data_type(), field.data_type()) => {
                return Err(PairsError::WrongSchema {
                    path: path.to_owned(),
                    why: format!(
                        "column `{}` has type {}, expected {}",
                        field.name(),
                        f.data_type(),
                        field.data_type()
                    ),
                })
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Streams record batches of pairs from a list of shards.
pub struct PairReader {
    shards: Vec<PathBuf>,
    next_shard: usize,
    opts: ReadOptions,
    /// Names read from disk: the requested columns, then those only the filter needs.
    read_columns: Vec<String>,
    requested: usize,
    rng: Option<ChaCha8Rng>,
    current: Option<(PathBuf, ParquetRecordBatchReader)>,
}

impl PairReader {
    /// Prepares to read `paths` (files or directories of shards).
    pub fn open(paths: &[PathBuf], opts: ReadOptions) -> Result<Self, PairsError> {
        let mut shards = shard_paths(paths)?;
        let schema = pair_schema();
        let mut read_columns: Vec<String> = match &opts.columns {
            Some(cols) => {
                for c in cols {
                    if schema.field_with_name(c).is_err() {
                        let all: Vec<_> =
                            schema.fields().iter().map(|f| f.name().as_str()).collect();
                        return Err(PairsError::BadOption(format!(
                            "unknown pair column `{c}`; columns are: {}",
                            all.join(", ")
                        )));
                    }
                }
                cols.clone()
            }
            None => schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        let requested = read_columns.len();
        for c in opts.filter.columns() {
            if !read_columns.iter().any(|r| r == c) {
                read_columns.push(c.to_owned());
            }
        }
        if opts.batch_size == 0 {
            return Err(PairsError::BadOption(
                "batch_size must be at least 1".into(),
            ));
        }
        let mut rng = opts.shuffle_seed.map(ChaCha8Rng::seed_from_u64);
        if let Some(rng) = rng.as_mut() {
            shards.shuffle(rng);
        }
        Ok(PairReader {
            shards,
            next_shard: 0,
            opts,
            read_columns,
            requested,
            rng,
            current: None,
        })
    }

    /// The shards this reader goes through, in reading order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    fn open_next(&mut self) -> Result<bool, PairsError> {
        let Some(path) = self.shards.get(self.next_shard).cloned() else {
            return Ok(false);
        };
        self.next_shard += 1;
        let builder = open_shard(&path)?;
        let file_schema = builder.schema().clone();
        let indices: Vec<usize> = self
            .read_columns
            .iter()
            .map(|c| file_schema.index_of(c).expect("checked by open_shard"))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let mut row_groups: Vec<usize> = (0..builder.metadata().num_row_groups()).collect();
        if let Some(rng) = self.rng.as_mut() {
            row_groups.shuffle(rng);
        }
        let reader = builder
            .with_projection(mask)
            .with_row_groups(row_groups)
            .with_batch_size(self.opts.batch_size)
            .build()
            .map_err(|e| PairsError::from(e).in_file(&path))?;
        self.current = Some((path, reader));
        Ok(true)
    }

    fn finish_batch(&mut self, batch: RecordBatch) -> Result<RecordBatch, PairsError> {
        // Parquet returns projected columns in file order; put them in the requested order.
        let order: Vec<usize> = self.read_columns[..self.requested]
            .iter()
            .map(|c| batch.schema().index_of(c).expect("projected"))
            .collect();
        let batch = if self.opts.filter.is_empty() {
            batch
        } else {
            let mask = self.opts.filter.mask(&batch);
            filter_record_batch(&batch, &mask)?
        };
        let mut batch = conform_batch(batch.project(&order)?)?;
        if let Some(rng) = self.rng.as_mut() {
            let mut perm: Vec<u32> = (0..batch.num_rows() as u32).collect();
            perm.shuffle(rng);
            batch = take_record_batch(&batch, &UInt32Array::from(perm))?;
        }
        Ok(batch)
    }
}

/// The batch with every column in the pair schema's exact type (see [`conform_column`]).
fn conform_batch(batch: RecordBatch) -> Result<RecordBatch, PairsError> {
    let schema = batch.schema();
    if schema.fields().iter().all(|f| {
        pair_schema()
            .field_with_name(f.name())
            .is_ok_and(|w| w.data_type() == f.data_type())
    }) {
        return Ok(batch);
    }
    let canonical = pair_schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let want = canonical
            .field_with_name(field.name())
            .map_err(|_| PairsError::Schema(format!("unexpected column `{}`", field.name())))?;
        columns.push(conform_column(column.clone(), want).map_err(PairsError::Schema)?);
        fields.push(want.clone());
    }
    let schema = arrow::datatypes::Schema::new_with_metadata(fields, schema.metadata().clone());
    Ok(RecordBatch::try_new(std::sync::Arc::new(schema), columns)?)
}

impl Iterator for PairReader {
    type Item = Result<RecordBatch, PairsError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            let (path, reader) = self.current.as_mut().expect("opened above");
            match reader.next() {
                None => self.current = None,
                Some(Err(e)) => {
                    let path = path.clone();
                    self.current = None;
                    return Some(Err(PairsError::from(e).in_file(&path)));
                }
                Some(Ok(batch)) => {
                    let path = path.clone();
                    let out = self.finish_batch(batch).map_err(|e| e.in_file(&path));
                    match out {
                        Ok(b) if b.num_rows() == 0 => continue,
                        other => return Some(other),
                    }
                }
            }
        }
    }
}
