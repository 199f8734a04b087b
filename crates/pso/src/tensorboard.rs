//! TensorBoard event files, so that `tensorboard --logdir runs/` shows a run and
//! `wandb sync --sync-tensorboard` uploads it; metrics.jsonl stays the source of truth.
//!
//! An event file is a sequence of TFRecords (length, masked CRC-32C of the length, the bytes,
//! their masked CRC-32C), each an `Event` protocol buffer (tensorflow/core/util/event.proto):
//! the first holds the file version, the rest a `Summary` of scalar or image values. The few
//! messages needed are encoded here by hand rather than through a protobuf code generator.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One event file shared by the writers of a run invocation (metrics, evals): TensorBoard reads
/// a folder's files as one stream, so a second file's restart marker would purge the first's.
pub type SharedEvents = Arc<Mutex<EventWriter>>;

/// Writes one event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Starts `dir/events.out.tfevents.<seconds>.<µs>.<host>.<suffix>` (TensorBoard reads every
    /// such file of a folder, in name order). `first_step` is the first step it will log:
    /// TensorBoard drops what earlier files logged from that step on, as a resumed run trains
    /// those steps again.
    pub fn create(dir: &Path, suffix: &str, first_step: u64) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{:06}.{host}.{suffix}",
            now as u64,
            (now.fract() * 1e6) as u64
        ));
        let mut writer = EventWriter {
            file: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut version = Vec::new();
        put_f64(&mut version, 1, now);
        put_bytes(&mut version, 3, b"brain.Event:2");
        writer.record(&version)?;
        // SessionLog { status: START }: TensorBoard purges earlier events of this step and after.
        let mut start = Vec::new();
        put_f64(&mut start, 1, now);
        put_varint_field(&mut start, 2, first_step);
        put_bytes(&mut start, 7, &[0x08, 0x01]);
        writer.record(&start)?;
        writer.file.flush()?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`EventWriter::create`], shared.
    pub fn shared(dir: &Path, suffix: &str, first_step: u64) -> std::io::Result<SharedEvents> {
        Ok(Arc::new(Mutex::new(EventWriter::create(
            dir, suffix, first_step,
        )?)))
    }

    /// Logs scalars (tag, value) at `step`; non-finite values are left out.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values.iter().filter(|(_, v)| v.is_finite()) {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, tag.as_bytes());
            entry.push(2 << 3 | 5);
            entry.extend_from_slice(&(*value as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &entry);
        }
        self.summary(step, &summary)
    }

    /// Logs a PNG image of `width`×`height` RGB pixels under `tag` at `step`.
    pub fn image(
        &mut self,
        step: u64,
        tag: &str,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> std::io::Result<()> {
        let mut image = Vec::new();
        put_varint_field(&mut image, 1, height.into());
        put_varint_field(&mut image, 2, width.into());
        put_varint_field(&mut image, 3, 3);
        put_bytes(&mut image, 4, png);
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, tag.as_bytes());
        put_bytes(&mut entry, 4, &image);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &entry);
        self.summary(step, &summary)
    }

    fn summary(&mut self, step: u64, summary: &[u8]) -> std::io::Result<()> {
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, summary);
        self.record(&event)?;
        // Flushed per event: a run may be killed at any moment, and TensorBoard tails the file.
        self.file.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        self.file.write_all(&length)?;
        self.file.write_all(&masked_crc(&length).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's CRC: CRC-32C, rotated right by 15 and offset, so that a CRC of data that itself
/// holds CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

fn put_f64(out: &mut Vec<u8>, field: u64, value: f64) {
    put_varint(out, field << 3 | 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_crcs_follow_the_formats() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }
}
