//! A shard's life on disk, shared by the writer, the reader and recovery: its file names
//! (`RUN-NNNNNN.parquet`, `.parquet.tmp` while written, `.parquet.tmp.footer` beside it), the
//! Parquet magic of a complete file, and the fsync of the folder after a rename.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::PairsError;

/// The lock file a writer holds while it writes the shards named `PREFIX-NNNNNN` in a store:
/// one writer per prefix, so the ranks of a data-parallel run share one directory.
pub fn lock_file(prefix: &str) -> String {
    format!(".pso-writer.{prefix}.lock")
}

/// Takes the writer lock of `prefix`'s shards in `dir`, or says who holds it.
pub(crate) fn lock_shards(dir: &Path, prefix: &str) -> Result<File, PairsError> {
    let lock_path = dir.join(lock_file(prefix));
    let lock = File::create(&lock_path).map_err(io_err(&lock_path, "create"))?;
    if let Err(e) = lock.try_lock() {
        return Err(PairsError::BadOption(format!(
            "another process is writing pairs to {} as {prefix}-NNNNNN.parquet (it holds {}: \
             {e}); stop it or write elsewhere",
            dir.display(),
            lock_path.display()
        )));
    }
    Ok(lock)
}

/// The shard-name prefix of a shard file (`PREFIX-NNNNNN.parquet`, `.parquet.tmp`, …).
pub(crate) fn shard_prefix(file_name: &str) -> Option<&str> {
    let stem = file_name.split(".parquet").next()?;
    let (prefix, number) = stem.rsplit_once('-')?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then_some(prefix)
}

/// Suffix of a shard being written.
pub const TMP_SUFFIX: &str = ".parquet.tmp";
/// Suffix of the sidecar footer of a shard being written.
pub const FOOTER_SUFFIX: &str = ".parquet.tmp.footer";

/// An [`PairsError::Io`] maker for `map_err`, naming the file and the action.
/// A [`PairsError::Io`] maker for the Parquet writer's errors: a full disk surfaces as an I/O
/// error wrapped in a Parquet one, and the message must name the shard.
pub(crate) fn write_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(parquet::errors::ParquetError) -> PairsError + 'a {
    move |error| {
        let source = match error {
            parquet::errors::ParquetError::External(inner) => {
                match inner.downcast::<std::io::Error>() {
                    Ok(io) => *io,
                    Err(other) => std::io::Error::other(other.to_string()),
                }
            }
            other => std::io::Error::other(other.to_string()),
        };
        PairsError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    }
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> PairsError + 'a {
    move |source| PairsError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Makes a rename or removal in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PairsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

/// The finished shards named `prefix-NNNNNN.parquet` in `dir`, by shard number.
pub(crate) fn prefix_shards(dir: &Path, prefix: &str) -> Result<Vec<(u64, PathBuf)>, PairsError> {
    let prefix = format!("{prefix}-");
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list"))? {
        let path = entry.map_err(io_err(dir, "list"))?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..] == *".parquet" {
            if let Ok(n) = digits.parse::<u64>() {
                out.push((n, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The number of the next shard named `prefix-NNNNNN` in `dir`.
pub(crate) fn next_shard_number(dir: &Path, prefix: &str) -> Result<u64, PairsError> {
    Ok(prefix_shards(dir, prefix)?.last().map_or(0, |(n, _)| n + 1))
}

/// Whether a file starts with the Parquet magic and is a complete file (magic at both ends).
pub fn has_parquet_magic(path: &Path) -> Result<bool, PairsError> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    if len < 12 {
        return Ok(false);
    }
    let mut head = [0u8; 4];
    f.read_exact(&mut head).map_err(io_err(path, "read"))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(-4)).map_err(io_err(path, "seek"))?;
    let mut tail = [0u8; 4];
    f.read_exact(&mut tail).map_err(io_err(path, "read"))?;
    Ok(&head == b"PAR1" && &tail == b"PAR1")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk reaches the writer as an I/O error inside a Parquet one; the message names
    /// the shard and keeps the OS error.
    #[test]
    fn a_full_disk_names_the_shard() {
        let full = std::io::Error::from_raw_os_error(28);
        let wrapped = parquet::errors::ParquetError::External(Box::new(full));
        let path = Path::new("/store/run-000003.parquet.tmp");
        let error = write_err(path, "write")(wrapped);
        let PairsError::Io { source, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(source.raw_os_error(), Some(28));
        let text = error.to_string();
        assert!(
            text.starts_with("write /store/run-000003.parquet.tmp: No space left on device"),
            "{text}"
        );
    }

    #[test]
    fn shard_prefixes_come_from_file_names() {
        assert_eq!(shard_prefix("run-000003.parquet"), Some("run"));
        assert_eq!(
            shard_prefix("my-run-rank001-000012.parquet.tmp"),
            Some("my-run-rank001")
        );
        assert_eq!(shard_prefix("run-000003.parquet.tmp.footer"), Some("run"));
        assert_eq!(shard_prefix("run.parquet"), None);
        assert_eq!(shard_prefix("run-x.parquet"), None);
    }
}
