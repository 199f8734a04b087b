//! Importing human-preference datasets into the pair store.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};
use indicatif::ProgressBar;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rayon::prelude::*;

use super::record::{ImageFormat, Label, PairRecord, Side, Source};
use super::writer::{PairStoreWriter, WriterOptions};
use super::PairsError;

/// Columns of the Pick-a-Pic v2 layout that the import reads; others are ignored.
pub const PICKAPIC_COLUMNS: [&str; 5] = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"];

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Output store directory.
    pub out: PathBuf,
    /// Run id of the imported pairs.
    pub run_id: String,
    /// Keep ties (label 0.5/0.5) instead of skipping them.
    pub keep_ties: bool,
    /// Re-encode every image as PNG instead of keeping its bytes.
    pub reencode_png: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// Input files read.
    pub files: usize,
    /// Input rows read.
    pub rows: u64,
    /// Pairs written.
    pub imported: u64,
    /// Ties skipped.
    pub ties_skipped: u64,
}

fn label_of(label_0: f64, label_1: f64) -> Option<Label> {
    match (label_0, label_1) {
        (a, b) if a == 1.0 && b == 0.0 => Some(Label::Side0),
        (a, b) if a == 0.0 && b == 1.0 => Some(Label::Side1),
        (a, b) if a == 0.5 && b == 0.5 => Some(Label::Tie),
        _ => None,
    }
}

fn detect_format(bytes: &[u8]) -> Option<ImageFormat> {
    ImageFormat::ALL.iter().copied().find(|f| f.matches(bytes))
}

/// Decodes an image's size, and re-encodes it as PNG when asked.
fn prepare_image(bytes: &[u8], to_png: bool) -> Result<(ImageFormat, Vec<u8>, u32, u32), String> {
    let format = detect_format(bytes)
        .ok_or_else(|| format!("{} bytes that are neither PNG nor JPEG", bytes.len()))?;
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if !to_png || format == ImageFormat::Png {
        let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
        return Ok((format, bytes.to_vec(), w, h));
    }
    let img = reader.decode().map_err(|e| e.to_string())?;
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok((ImageFormat::Png, png, img.width(), img.height()))
}

fn column<'a>(
    path: &Path,
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a std::sync::Arc<dyn Array>, PairsError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| PairsError::WrongSchema {
            path: path.to_owned(),
            why: format!("column `{name}` is missing"),
        })
}

fn cast_to(
    path: &Path,
    batch: &RecordBatch,
    name: &str,
    to: &DataType,
) -> Result<std::sync::Arc<dyn Array>, PairsError> {
    cast(column(path, batch, name)?, to).map_err(|e| PairsError::WrongSchema {
        path: path.to_owned(),
        why: format!("column `{name}` cannot be read as {to}: {e}"),
    })
}

/// Imports Pick-a-Pic v2 Parquet files (`caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`).
///
/// Ties are skipped unless `keep_ties`; the winner is recorded in `label`; scores are the
/// human labels (1 / 0, or 0.5 / 0.5), scorer `human`.
pub fn import_pickapic(
    inputs: &[PathBuf],
    opts: &ImportOptions,
    progress: &ProgressBar,
) -> Result<ImportReport, PairsError> {
    let mut writer = PairStoreWriter::open(WriterOptions {
        flush_every_pairs: 512,
        ..WriterOptions::new(&opts.out, &opts.run_id)
    })?;
    let mut next_id = writer.next_pair_id();
    let mut report = ImportReport::default();
    let total: u64 = inputs
        .iter()
        .map(|p| -> Result<u64, PairsError> {
            let f = File::open(p).map_err(|source| PairsError::Io {
                path: p.clone(),
                action: "open",
                source,
            })?;
            let b =
                ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| PairsError::Corrupt {
                    path: p.clone(),
                    why: e.to_string(),
                })?;
            Ok(b.metadata().file_metadata().num_rows() as u64)
        })
        .sum::<Result<_, _>>()?;
    progress.set_length(total);
    let created_at_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);

    for path in inputs {
        report.files += 1;
        let file = File::open(path).map_err(|source| PairsError::Io {
            path: path.clone(),
            action: "open",
            source,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| PairsError::from(e).in_file(path))?;
        let schema = builder.schema().clone();
        let mut indices = Vec::new();
        for name in PICKAPIC_COLUMNS {
            indices.push(schema.index_of(name).map_err(|_| PairsError::WrongSchema {
                path: path.clone(),
                why: format!(
                    "column `{name}` is missing; a Pick-a-Pic v2 file has {}",
                    PICKAPIC_COLUMNS.join(", ")
                ),
            })?);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(256)
            .build()
            .map_err(|e| PairsError::from(e).in_file(path))?;
        let mut row0 = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| PairsError::from(e).in_file(path))?;
            let caption = column(path, &batch, "caption")?;
            if !matches!(
                caption.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) {
                // Numbers would become prompts like "42": surely the wrong column or file.
                return Err(PairsError::WrongSchema {
                    path: path.clone(),
                    why: format!(
                        "column `caption` holds {}, not text; a Pick-a-Pic caption is the \
                         prompt (cast the column to string first if these really are prompts)",
                        caption.data_type()
                    ),
                });
            }
            let caption = cast_to(path, &batch, "caption", &DataType::Utf8)?;
            let caption = caption.as_string::<i32>();
            let jpg = ["jpg_0", "jpg_1"].map(|c| cast_to(path, &batch, c, &DataType::LargeBinary));
            let [jpg_0, jpg_1] = jpg;
            let (jpg_0, jpg_1) = (jpg_0?, jpg_1?);
            let images = [jpg_0.as_binary::<i64>(), jpg_1.as_binary::<i64>()];
            let l0 = cast_to(path, &batch, "label_0", &DataType::Float64)?;
            let l1 = cast_to(path, &batch, "label_1", &DataType::Float64)?;
            let labels = [
                l0.as_primitive::<Float64Type>(),
                l1.as_primitive::<Float64Type>(),
            ];

            let bad = |row: usize, why: String| PairsError::Corrupt {
                path: path.clone(),
                why: format!("row {row}: {why}"),
            };
            // Pick rows first (cheap), then decode / re-encode their images in parallel.
            let mut keep = Vec::new();
            for i in 0..batch.num_rows() {
                let row = row0 + i;
                for (name, arr) in [
                    ("caption", caption as &dyn Array),
                    ("label_0", labels[0]),
                    ("label_1", labels[1]),
                    ("jpg_0", images[0]),
                    ("jpg_1", images[1]),
                ] {
                    if arr.is_null(i) {
                        return Err(bad(row, format!("`{name}` is null")));
                    }
                }
                let (a, b) = (labels[0].value(i), labels[1].value(i));
                let label = label_of(a, b).ok_or_else(|| {
                    bad(
                        row,
                        format!("label_0={a}, label_1={b} is not a preference (expected 1/0, 0/1 or 0.5/0.5)"),
                    )
                })?;
                if label == Label::Tie && !opts.keep_ties {
                    report.ties_skipped += 1;
                    continue;
                }
                keep.push((i, label, a as f32, b as f32));
            }
            let prepared: Vec<_> = keep
                .par_iter()
                .map(|&(i, ..)| {
                    let one = |s: usize| {
                        prepare_image(images[s].value(i), opts.reencode_png)
                            .map_err(|why| bad(row0 + i, format!("jpg_{s}: {why}")))
                    };
                    Ok::<_, PairsError>((one(0)?, one(1)?))
                })
                .collect::<Result<_, _>>()?;
            for ((i, label, s0, s1), (side0, side1)) in keep.into_iter().zip(prepared) {
                let (mut f0, mut img0, w, h) = side0;
                let (mut f1, mut img1, ..) = side1;
                if f0 != f1 {
                    // Both sides share one format column: bring the odd one to PNG.
                    (f0, img0, ..) =
                        prepare_image(&img0, true).map_err(|why| bad(row0 + i, why))?;
                    (f1, img1, ..) =
                        prepare_image(&img1, true).map_err(|why| bad(row0 + i, why))?;
                }
                debug_assert_eq!(f0, f1);
                writer.append(PairRecord {
                    run_id: opts.run_id.clone(),
                    pair_id: next_id,
                    created_at_us,
                    policy_version: None,
                    source: Source::Imported,
                    prompt: caption.value(i).to_owned(),
                    negative_prompt: None,
                    model_id: "pickapic-v2".into(),
                    sampler: "unknown".into(),
                    timesteps: Vec::new(),
                    guidance: None,
                    height: h as i32,
                    width: w as i32,
                    image_format: f0,
                    sides: [
                        Side {
                            seed: None,
                            image: img0,
                            score: s0,
                        },
                        Side {
                            seed: None,
                            image: img1,
                            score: s1,
                        },
                    ],
                    scorer: "human".into(),
                    scorer_version: "pickapic-v2".into(),
                    label,
                    latents: None,
                })?;
                next_id += 1;
                report.imported += 1;
            }
            report.rows += batch.num_rows() as u64;
            row0 += batch.num_rows();
            progress.set_position(report.rows);
        }
    }
    writer.close()?;
    Ok(report)
}
