//! Completing the shards a crash left open: each `.parquet.tmp` is truncated to its last flushed
//! row group and closed with the sidecar footer written at that flush.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};

use super::shard::{io_err, lock_shards, shard_prefix, sync_dir, FOOTER_SUFFIX, TMP_SUFFIX};
use super::PairsError;

/// What [`recover_dir`] did to shards left open by a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Shards completed from their last flushed row group: (path, pairs kept, bytes dropped).
    pub recovered: Vec<(PathBuf, u64, u64)>,
    /// Open shards with no flushed row group, removed: (path, bytes dropped).
    pub removed_empty: Vec<(PathBuf, u64)>,
}

impl RecoveryReport {
    /// One human-readable line per action.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (path, pairs, dropped) in &self.recovered {
            out.push(format!(
                "recovered {} with {pairs} flushed pairs; dropped {dropped} bytes written after the last flush",
                path.display()
            ));
        }
        for (path, dropped) in &self.removed_empty {
            out.push(format!(
                "removed {} : it had no flushed pairs ({dropped} bytes of unflushed data dropped)",
                path.display()
            ));
        }
        out
    }
}

/// Completes every shard in `dir` that a crash left as `.parquet.tmp`.
///
/// Only safe while no writer is open on `dir`: [`recover_store`] takes each writer's lock first.
pub fn recover_dir(dir: &Path) -> Result<RecoveryReport, PairsError> {
    recover_shards(dir, None)
}

/// Completes the open shards of one shard-name prefix (all of them with `None`): a writer
/// opening its prefix, which holds that prefix's lock, recovers only its own shards, since the
/// other ranks of a data-parallel run may be writing theirs beside them.
pub(crate) fn recover_shards(
    dir: &Path,
    prefix: Option<&str>,
) -> Result<RecoveryReport, PairsError> {
    let mine = |path: &Path| {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        prefix.is_none_or(|p| shard_prefix(&name) == Some(p))
    };
    let mut report = RecoveryReport::default();
    let mut tmps: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir, "list"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(TMP_SUFFIX) && mine(p))
        .collect();
    tmps.sort();
    for tmp in tmps {
        let stem = tmp.to_string_lossy();
        let base = &stem[..stem.len() - TMP_SUFFIX.len()];
        let final_path = PathBuf::from(format!("{base}.parquet"));
        let footer_path = PathBuf::from(format!("{base}{FOOTER_SUFFIX}"));
        let tmp_len = fs::metadata(&tmp).map_err(io_err(&tmp, "stat"))?.len();
        let sidecar = match fs::read(&footer_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&footer_path, "read")(e)),
        };
        let Some(sidecar) = sidecar else {
            fs::remove_file(&tmp).map_err(io_err(&tmp, "remove"))?;
            report.removed_empty.push((tmp, tmp_len));
            continue;
        };
        if sidecar.len() < 8 + 8 {
            return Err(PairsError::Corrupt {
                path: footer_path,
                why: format!("{} bytes is too short for a footer sidecar", sidecar.len()),
            });
        }
        let data_len = u64::from_le_bytes(sidecar[..8].try_into().expect("8 bytes"));
        if data_len > tmp_len {
            return Err(PairsError::Corrupt {
                path: tmp.clone(),
                why: format!(
                    "the sidecar footer covers {data_len} bytes but the file has only {tmp_len}; \
                     the data was lost after its fsync (disk or filesystem fault). Move the file away to continue"
                ),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "open"))?;
        file.set_len(data_len).map_err(io_err(&tmp, "truncate"))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io_err(&tmp, "seek"))?;
        file.write_all(&sidecar[8..])
            .and_then(|_| file.sync_all())
            .map_err(io_err(&tmp, "write footer"))?;
        drop(file);
        let pairs = {
            let reader = SerializedFileReader::new(File::open(&tmp).map_err(io_err(&tmp, "open"))?)
                .map_err(|e| PairsError::Corrupt {
                    path: tmp.clone(),
                    why: format!("still unreadable after appending the sidecar footer: {e}"),
                })?;
            reader.metadata().file_metadata().num_rows() as u64
        };
        fs::rename(&tmp, &final_path).map_err(io_err(&final_path, "rename"))?;
        fs::remove_file(&footer_path).map_err(io_err(&footer_path, "remove"))?;
        sync_dir(dir)?;
        report
            .recovered
            .push((final_path, pairs, tmp_len.saturating_sub(data_len)));
    }
    // A sidecar replacement interrupted before its rename leaves a stray temporary file.
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list"))? {
        let path = entry.map_err(io_err(dir, "list"))?.path();
        if path.to_string_lossy().ends_with(".footer.tmp") && mine(&path) {
            fs::remove_file(&path).map_err(io_err(&path, "remove"))?;
        }
    }
    Ok(report)
}

/// `pso pairs recover`: completes the shards crashed writers left in `dir`, holding the lock of
/// every writer that left one (a store with a live writer of such a shard is refused, not
/// touched).
pub fn recover_store(dir: &Path) -> Result<RecoveryReport, PairsError> {
    let mut prefixes: Vec<String> = fs::read_dir(dir)
        .map_err(io_err(dir, "list"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let open = name.ends_with(TMP_SUFFIX) || name.ends_with(FOOTER_SUFFIX);
            open.then(|| shard_prefix(&name).map(str::to_owned))
                .flatten()
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    let _locks = prefixes
        .iter()
        .map(|p| lock_shards(dir, p))
        .collect::<Result<Vec<_>, _>>()?;
    recover_dir(dir)
}
