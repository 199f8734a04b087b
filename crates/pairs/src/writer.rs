//! Durable, append-only writing of pairs into rotating Parquet shards.
//!
//! A shard is written as `NAME.parquet.tmp` and renamed to `NAME.parquet` when closed, so a
//! reader never sees a half-written file. Because a Parquet file is unreadable until its footer
//! is written, every row-group flush also fsyncs the data and then atomically replaces a sidecar
//! `NAME.parquet.tmp.footer` holding the footer of everything flushed so far. After a crash,
//! [`recover_dir`](crate::recover_dir) truncates the `.tmp` to the last flushed row group, appends that footer, and
//! renames it: every flushed pair survives, and nothing corrupt is left behind.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parquet::arrow::{add_encoded_arrow_schema_to_metadata, ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{FileMetaData, KeyValue, ParquetMetaData, ParquetMetaDataWriter};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;
use tokio::sync::{mpsc, oneshot};

use super::batch::records_to_batch;
use super::record::PairRecord;
use super::recover::recover_shards;
use super::schema::{pair_schema, BLOB_COLUMNS, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use super::shard::{
    io_err, lock_shards, next_shard_number, prefix_shards, sync_dir, write_err, FOOTER_SUFFIX,
    TMP_SUFFIX,
};
use super::PairsError;

/// When to flush row groups and rotate shards.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Directory of the shards; created if missing.
    pub dir: PathBuf,
    /// Run id written into every row.
    pub run_id: String,
    /// Shards are named `PREFIX-NNNNNN.parquet` (default: the run id; one writer per prefix).
    pub shard_prefix: String,
    /// Flush a row group after this many buffered pairs.
    pub flush_every_pairs: usize,
    /// ...or when the oldest buffered pair is this old.
    pub flush_interval: Duration,
    /// Close the shard and start the next after this many rows.
    pub max_shard_rows: usize,
    /// ...or once it holds this many bytes.
    pub max_shard_bytes: u64,
    /// Pairs the async writer's channel holds before senders wait (backpressure).
    pub channel_capacity: usize,
}

impl WriterOptions {
    /// Defaults suited to the online loop.
    pub fn new(dir: impl Into<PathBuf>, run_id: impl Into<String>) -> Self {
        let run_id = run_id.into();
        WriterOptions {
            dir: dir.into(),
            shard_prefix: run_id.clone(),
            run_id,
            flush_every_pairs: 64,
            flush_interval: Duration::from_secs(30),
            max_shard_rows: 10_000,
            max_shard_bytes: 1 << 30,
            channel_capacity: 256,
        }
    }

    /// Names the shards after data-parallel rank `rank` too (`RUN-rankNNN-NNNNNN.parquet`), so
    /// each rank writes its own files into the run's one store.
    pub fn for_rank(mut self, rank: usize) -> Self {
        self.shard_prefix = format!("{}-rank{rank:03}", self.run_id);
        self
    }
}

fn writer_properties(run_id: &str) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid level"),
        ))
        // Chunk statistics only: page indexes are written at close, and a recovered shard must
        // not point at one that never reached the disk.
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SCHEMA_VERSION_KEY.to_owned(), SCHEMA_VERSION.to_string()),
            KeyValue::new("pso.run_id".to_owned(), run_id.to_owned()),
        ]))
        .set_created_by(format!("pso {}", env!("CARGO_PKG_VERSION")));
    for name in BLOB_COLUMNS {
        let path = ColumnPath::from(name);
        // Images are compressed already and latents barely compress: spend no CPU on them.
        builder = builder
            .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    builder.build()
}

/// One shard being written.
struct ShardWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    footer_path: PathBuf,
    writer: ArrowWriter<File>,
    /// A second handle on the same open file, for fsync.
    sync_handle: File,
    props: WriterProperties,
    rows: usize,
}

impl ShardWriter {
    fn create(dir: &Path, name: &str, run_id: &str) -> Result<Self, PairsError> {
        let final_path = dir.join(format!("{name}.parquet"));
        let tmp_path = dir.join(format!("{name}{TMP_SUFFIX}"));
        let footer_path = dir.join(format!("{name}{FOOTER_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_err(&tmp_path, "create"))?;
        let sync_handle = file.try_clone().map_err(io_err(&tmp_path, "open"))?;
        let props = writer_properties(run_id);
        let writer = ArrowWriter::try_new(file, pair_schema(), Some(props.clone()))
            .map_err(write_err(&tmp_path, "start"))?;
        Ok(ShardWriter {
            final_path,
            tmp_path,
            footer_path,
            writer,
            sync_handle,
            props,
            rows: 0,
        })
    }

    /// Writes `records` as one row group and makes it durable.
    fn write_row_group(&mut self, records: &[PairRecord]) -> Result<(), PairsError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = records_to_batch(records)?;
        self.writer
            .write(&batch)
            .map_err(write_err(&self.tmp_path, "write"))?;
        self.writer
            .flush()
            .map_err(write_err(&self.tmp_path, "write"))?;
        self.writer
            .sync()
            .map_err(io_err(&self.tmp_path, "write"))?;
        self.sync_handle
            .sync_data()
            .map_err(io_err(&self.tmp_path, "fsync"))?;
        self.rows += records.len();
        self.write_footer_sidecar()
    }

    /// Atomically replaces the sidecar with the footer of the row groups flushed so far.
    fn write_footer_sidecar(&self) -> Result<(), PairsError> {
        let data_len = self.writer.bytes_written() as u64;
        let footer = footer_bytes(&self.props, self.writer.flushed_row_groups())?;
        let tmp = self.footer_path.with_extension("footer.tmp");
        let mut f = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
        f.write_all(&data_len.to_le_bytes())
            .and_then(|_| f.write_all(&footer))
            .and_then(|_| f.sync_data())
            .map_err(io_err(&tmp, "write"))?;
        fs::rename(&tmp, &self.footer_path).map_err(io_err(&self.footer_path, "rename"))
    }

    fn bytes(&self) -> u64 {
        self.writer.bytes_written() as u64
    }

    /// Writes the real footer, then renames the shard into place.
    fn close(self) -> Result<PathBuf, PairsError> {
        let ShardWriter {
            final_path,
            tmp_path,
            footer_path,
            writer,
            sync_handle,
            ..
        } = self;
        writer.close().map_err(write_err(&tmp_path, "close"))?;
        sync_handle.sync_all().map_err(io_err(&tmp_path, "fsync"))?;
        fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path, "rename"))?;
        if let Err(e) = fs::remove_file(&footer_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io_err(&footer_path, "remove")(e));
            }
        }
        if let Some(dir) = final_path.parent() {
            sync_dir(dir)?;
        }
        Ok(final_path)
    }
}

/// Footer bytes (thrift metadata, its length, `PAR1`) for a file holding `row_groups`.
fn footer_bytes(
    props: &WriterProperties,
    row_groups: &[parquet::file::metadata::RowGroupMetaData],
) -> Result<Vec<u8>, PairsError> {
    let schema = pair_schema();
    let descr = Arc::new(ArrowSchemaConverter::new().convert(&schema)?);
    let mut props = props.clone();
    add_encoded_arrow_schema_to_metadata(&schema, &mut props);
    let num_rows = row_groups.iter().map(|rg| rg.num_rows()).sum();
    let file_meta = FileMetaData::new(
        1,
        num_rows,
        Some(props.created_by().to_owned()),
        props.key_value_metadata().cloned(),
        descr,
        None,
    );
    let meta = ParquetMetaData::new(file_meta, row_groups.to_vec());
    let mut out = Vec::new();
    ParquetMetaDataWriter::new(&mut out, &meta)
        .with_preserve_page_index_locations(false)
        .finish()?;
    Ok(out)
}

/// Counts of what a writer made durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Pairs flushed to disk.
    pub pairs: u64,
    /// Row groups flushed.
    pub row_groups: u64,
    /// Shards closed (renamed to `.parquet`).
    pub shards_closed: u64,
}

/// Writes pairs into rotating shards of one directory (synchronous; see [`AsyncPairWriter`]).
pub struct PairStoreWriter {
    opts: WriterOptions,
    current: Option<ShardWriter>,
    next_shard: u64,
    buffer: Vec<PairRecord>,
    oldest: Option<Instant>,
    next_pair_id: i64,
    stats: WriterStats,
    /// Held while open: recovery must never touch a shard another live writer is writing.
    _lock: File,
}

/// The lock file a writer holds per shard-name prefix.
pub use super::shard::lock_file;

impl PairStoreWriter {
    /// Opens the store directory: recovers any shard of its prefix left open by a crash, and
    /// continues that prefix's shard numbering.
    pub fn open(opts: WriterOptions) -> Result<Self, PairsError> {
        for (what, name) in [
            ("run id", &opts.run_id),
            ("shard prefix", &opts.shard_prefix),
        ] {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(PairsError::BadOption(format!(
                    "{what} `{name}` must be non-empty ASCII letters, digits, '-', '_' or '.'"
                )));
            }
        }
        if opts.flush_every_pairs == 0 || opts.max_shard_rows == 0 || opts.channel_capacity == 0 {
            return Err(PairsError::BadOption(
                "flush_every_pairs, max_shard_rows and channel_capacity must be at least 1".into(),
            ));
        }
        fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir, "create directory"))?;
        let lock = lock_shards(&opts.dir, &opts.shard_prefix)?;
        let report = recover_shards(&opts.dir, Some(&opts.shard_prefix))?;
        for line in report.lines() {
            tracing::warn!("{line}");
        }
        let next_shard = next_shard_number(&opts.dir, &opts.shard_prefix)?;
        let next_pair_id = next_pair_id(&opts.dir, &opts.shard_prefix, &opts.run_id)?;
        Ok(PairStoreWriter {
            opts,
            current: None,
            next_shard,
            buffer: Vec::new(),
            oldest: None,
            next_pair_id,
            stats: WriterStats::default(),
            _lock: lock,
        })
    }

    /// One more than the largest pair id of this run already durable in this writer's shards
    /// (0 when none): where a resumed run or a second import continues.
    pub fn next_pair_id(&self) -> i64 {
        self.next_pair_id
    }

    /// Buffers a pair; flushes or rotates when a limit is reached.
    pub fn append(&mut self, record: PairRecord) -> Result<(), PairsError> {
        record
            .check()
            .map_err(|why| PairsError::InvalidRecord { row: 0, why })?;
        if record.run_id != self.opts.run_id {
            return Err(PairsError::BadOption(format!(
                "pair {} has run id `{}`, but this writer writes run `{}`",
                record.pair_id, record.run_id, self.opts.run_id
            )));
        }
        self.next_pair_id = self.next_pair_id.max(record.pair_id + 1);
        self.buffer.push(record);
        self.oldest.get_or_insert_with(Instant::now);
        if self.buffer.len() >= self.opts.flush_every_pairs || self.flush_due() {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether the oldest buffered pair has waited a whole flush interval.
    pub fn flush_due(&self) -> bool {
        self.oldest
            .is_some_and(|t| t.elapsed() >= self.opts.flush_interval)
    }

    /// When the buffered pairs must be flushed by (`None` when nothing is buffered).
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.opts.flush_interval)
    }

    /// Pairs buffered and not yet durable.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Makes every buffered pair durable (one row group), rotating the shard if it is full.
    pub fn flush(&mut self) -> Result<(), PairsError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            let name = format!("{}-{:06}", self.opts.shard_prefix, self.next_shard);
            self.next_shard += 1;
            self.current = Some(ShardWriter::create(
                &self.opts.dir,
                &name,
                &self.opts.run_id,
            )?);
        }
        let shard = self.current.as_mut().expect("opened above");
        shard.write_row_group(&self.buffer)?;
        self.stats.pairs += self.buffer.len() as u64;
        self.stats.row_groups += 1;
        self.buffer.clear();
        self.oldest = None;
        if shard.rows >= self.opts.max_shard_rows || shard.bytes() >= self.opts.max_shard_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Closes the open shard (if any); the next flush starts a new one.
    pub fn rotate(&mut self) -> Result<(), PairsError> {
        if let Some(shard) = self.current.take() {
            let path = shard.close()?;
            tracing::debug!(path = %path.display(), "closed pair shard");
            self.stats.shards_closed += 1;
        }
        Ok(())
    }

    /// Flushes and closes; every appended pair is then in a `.parquet` shard.
    pub fn close(mut self) -> Result<WriterStats, PairsError> {
        self.flush()?;
        self.rotate()?;
        Ok(self.stats.clone())
    }

    /// What has been made durable so far.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

/// One more than the largest pair id of `run_id` in the shards named `prefix-NNNNNN`.
fn next_pair_id(dir: &Path, prefix: &str, run_id: &str) -> Result<i64, PairsError> {
    let shards: Vec<PathBuf> = prefix_shards(dir, prefix)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let opts = super::reader::ReadOptions {
        columns: Some(vec![super::col::RUN_ID.into(), super::col::PAIR_ID.into()]),
        batch_size: 8192,
        ..Default::default()
    };
    let mut next = 0;
    for batch in super::reader::PairReader::open(&shards, opts)? {
        let batch = batch?;
        let c = super::batch::Columns::new(&batch)?;
        for row in 0..batch.num_rows() {
            if c.str(super::col::RUN_ID, row).ok().flatten() == Some(run_id) {
                if let Ok(Some(id)) = c.i64(super::col::PAIR_ID, row) {
                    next = next.max(id + 1);
                }
            }
        }
    }
    Ok(next)
}

enum Command {
    Pair(Box<PairRecord>),
    Flush(oneshot::Sender<Result<(), PairsError>>),
}

/// The pair store's writer as a tokio task fed by a bounded channel: a slow disk makes
/// [`AsyncPairWriter::send`] wait instead of growing memory.
pub struct AsyncPairWriter {
    durable: i64,
    tx: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<Result<WriterStats, PairsError>>,
}

impl AsyncPairWriter {
    /// Opens (and recovers) the store and starts the writer task on the current runtime.
    pub fn spawn(opts: WriterOptions) -> Result<Self, PairsError> {
        let capacity = opts.channel_capacity;
        let writer = PairStoreWriter::open(opts)?;
        let durable = writer.next_pair_id();
        let (tx, rx) = mpsc::channel(capacity);
        let task = tokio::spawn(run_writer(writer, rx));
        Ok(AsyncPairWriter { durable, tx, task })
    }

    /// [`PairStoreWriter::next_pair_id`] when the store was opened: pairs of this run with a
    /// smaller id were already durable.
    pub fn durable_pairs(&self) -> i64 {
        self.durable
    }

    /// Queues a pair; waits while the channel is full.
    pub async fn send(&self, record: PairRecord) -> Result<(), PairsError> {
        self.tx
            .send(Command::Pair(Box::new(record)))
            .await
            .map_err(|_| PairsError::WriterStopped)
    }

    /// Returns once every pair sent before this call is durable.
    pub async fn flush(&self) -> Result<(), PairsError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| PairsError::WriterStopped)?;
        wait.await.map_err(|_| PairsError::WriterStopped)?
    }

    /// Flushes, closes the open shard and stops the task.
    pub async fn close(self) -> Result<WriterStats, PairsError> {
        drop(self.tx);
        self.task
            .await
            .map_err(|e| PairsError::WriterFailed(format!("writer task ended abnormally: {e}")))?
    }
}

async fn run_writer(
    mut writer: PairStoreWriter,
    mut rx: mpsc::Receiver<Command>,
) -> Result<WriterStats, PairsError> {
    // File I/O blocks, so each flush runs on the blocking pool; the writer moves there and back.
    async fn blocking<T: Send + 'static>(
        writer: PairStoreWriter,
        f: impl FnOnce(&mut PairStoreWriter) -> Result<T, PairsError> + Send + 'static,
    ) -> (PairStoreWriter, Result<T, PairsError>) {
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let out = f(&mut writer);
            (writer, out)
        })
        .await
        .expect("pair writer flush panicked")
    }

    loop {
        let deadline = writer.flush_deadline();
        let command = match deadline {
            Some(at) => tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(at.into()) => {
                    let (w, r) = blocking(writer, |w| w.flush()).await;
                    writer = w;
                    r?;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match command {
            Some(Command::Pair(record)) => {
                let full = writer.buffered() + 1 >= writer.opts.flush_every_pairs;
                if full || writer.flush_due() {
                    let (w, r) = blocking(writer, move |w| w.append(*record)).await;
                    writer = w;
                    r?;
                } else {
                    writer.append(*record)?;
                }
            }
            Some(Command::Flush(done)) => {
                let (w, r) = blocking(writer, |w| w.flush()).await;
                writer = w;
                let failed = r.as_ref().err().map(|e| e.to_string());
                let _ = done.send(r);
                if let Some(why) = failed {
                    return Err(PairsError::WriterFailed(why));
                }
            }
            None => {
                let (_, r) = blocking(writer, |w| {
                    w.flush()?;
                    w.rotate()?;
                    Ok(w.stats().clone())
                })
                .await;
                return r;
            }
        }
    }
}
