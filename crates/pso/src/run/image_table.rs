//! Image datasets stored as Parquet, in the layout of Hugging Face `datasets` (`data/*.parquet`
//! of a dataset repository): one row per image, an image column (`datasets`' Image feature, a
//! struct of `bytes` and `path`, or plain binary) and a label column (a ClassLabel integer, whose
//! names the file's `huggingface` metadata lists, or text).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::Value;

use super::RunError;

/// Image column names tried, in order, when the file's metadata names no Image feature.
const IMAGE_COLUMNS: [&str; 6] = ["image", "img", "jpg", "png", "jpeg", "webp"];
/// Label column names tried, in order, when the file's metadata names no ClassLabel feature.
const LABEL_COLUMNS: [&str; 6] = ["label", "labels", "class", "text", "caption", "prompt"];

/// Which columns to read (automatic when `None`).
#[derive(Debug, Clone, Default)]
pub struct TableColumns {
    /// The image column.
    pub image: Option<String>,
    /// The label column.
    pub label: Option<String>,
}

/// The label of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableLabel {
    /// A class id, with its ClassLabel name when the file lists the names.
    Class {
        /// The id.
        id: i64,
        /// Its name.
        name: Option<String>,
    },
    /// A text label (a caption or a class name).
    Text(String),
}

/// One image of a table.
#[derive(Debug)]
pub struct TableRow {
    /// `FILE, row N`, for messages.
    pub source: String,
    /// The encoded image (PNG, JPEG, …).
    pub bytes: Vec<u8>,
    /// Its label.
    pub label: TableLabel,
}

fn data_err(path: &Path, why: impl std::fmt::Display) -> RunError {
    RunError::Data(format!("{}: {why}", path.display()))
}

/// Whether `file` (relative to a dataset folder) belongs to `split`: named `SPLIT.parquet` or
/// `SPLIT-…` (`data/train-00000-of-00002.parquet`), or under a folder named `SPLIT`
/// (`default/train/0000.parquet`).
fn in_split(file: &Path, split: &str) -> bool {
    let named = file
        .file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|stem| {
            stem == split || stem.strip_prefix(split).is_some_and(|r| r.starts_with('-'))
        });
    named
        || file
            .parent()
            .is_some_and(|dir| dir.iter().any(|c| c == split))
}

/// The Parquet files of `path`: the file itself, or the `*.parquet` files under the folder
/// (sorted) of `split`, by default of the `train` split when any file is named for it, else all.
pub fn parquet_files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>, RunError> {
    if path.is_file() {
        return match split {
            None => Ok(vec![path.to_owned()]),
            Some(split) => Err(data_err(
                path,
                format!("--split {split} picks files of a dataset folder; give the folder"),
            )),
        };
    }
    let mut all = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(super::io(&dir))?;
        for entry in entries.filter_map(Result::ok) {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "parquet") {
                all.push(p);
            }
        }
    }
    all.sort();
    let relative = |p: &PathBuf| p.strip_prefix(path).unwrap_or(p).to_owned();
    let of = |split: &str| -> Vec<PathBuf> {
        all.iter()
            .filter(|p| in_split(&relative(p), split))
            .cloned()
            .collect()
    };
    match split {
        Some(split) => {
            let chosen = of(split);
            if chosen.is_empty() && !all.is_empty() {
                let names: Vec<String> = all
                    .iter()
                    .take(8)
                    .map(|p| relative(p).display().to_string())
                    .collect();
                return Err(data_err(
                    path,
                    format!(
                        "no .parquet file of split `{split}` (named {split}-*.parquet or under \
                         {split}/); the folder holds {}{}",
                        names.join(", "),
                        if all.len() > 8 { ", …" } else { "" }
                    ),
                ));
            }
            Ok(chosen)
        }
        None => {
            let train = of("train");
            Ok(if train.is_empty() { all } else { train })
        }
    }
}

/// `datasets`' feature descriptions from the `huggingface` key of the file's metadata.
fn hf_features(builder: &ParquetRecordBatchReaderBuilder<File>) -> serde_json::Map<String, Value> {
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == "huggingface"))
        .and_then(|e| e.value.as_deref())
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
        .and_then(|json| json.pointer("/info/features")?.as_object().cloned())
        .unwrap_or_default()
}

fn feature_type<'a>(features: &'a serde_json::Map<String, Value>, column: &str) -> Option<&'a str> {
    features.get(column)?.get("_type")?.as_str()
}

/// The column to read: the one asked for, else the metadata's feature of type `hf_type`, else
/// the first of `names` the schema has.
fn choose(
    path: &Path,
    schema: &Schema,
    features: &serde_json::Map<String, Value>,
    asked: Option<&str>,
    hf_type: &str,
    names: &[&str],
    flag: &str,
) -> Result<String, RunError> {
    let has = |c: &str| schema.field_with_name(c).is_ok();
    let columns = || {
        let all: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        all.join(", ")
    };
    if let Some(c) = asked {
        return if has(c) {
            Ok(c.to_owned())
        } else {
            Err(data_err(
                path,
                format!(
                    "has no column `{c}` ({flag}); its columns are {}",
                    columns()
                ),
            ))
        };
    }
    let typed = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .find(|c| feature_type(features, c) == Some(hf_type));
    typed
        .or_else(|| names.iter().copied().find(|c| has(c)))
        .map(str::to_owned)
        .ok_or_else(|| {
            data_err(
                path,
                format!(
                    "no column looks like the {} (tried {}); its columns are {}: name it with \
                     {flag}",
                    if hf_type == "Image" { "image" } else { "label" },
                    names.join(", "),
                    columns()
                ),
            )
        })
}

/// The encoded images of an image column: `bytes` of a struct, or the binary column itself.
fn image_bytes(
    path: &Path,
    array: &Arc<dyn Array>,
    column: &str,
) -> Result<Arc<dyn Array>, RunError> {
    let binary = match array.data_type() {
        DataType::Struct(_) => array
            .as_struct()
            .column_by_name("bytes")
            .cloned()
            .ok_or_else(|| {
                data_err(
                    path,
                    format!("the struct column `{column}` has no `bytes` field"),
                )
            })?,
        _ => array.clone(),
    };
    let not_images = |why: String| {
        data_err(
            path,
            format!(
                "column `{column}` holds {}, not encoded images{why}; name the image column \
                 with --image-column",
                array.data_type()
            ),
        )
    };
    match binary.data_type() {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            cast(&binary, &DataType::LargeBinary).map_err(|e| not_images(format!(" ({e})")))
        }
        _ => Err(not_images(String::new())),
    }
}

/// Reads every row of `files`, handing each record batch's rows to `visit`.
pub fn read_image_table(
    files: &[PathBuf],
    columns: &TableColumns,
    mut visit: impl FnMut(Vec<TableRow>) -> Result<(), RunError>,
) -> Result<(), RunError> {
    for path in files {
        let file = File::open(path).map_err(super::io(path))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| data_err(path, format!("is not a readable Parquet file: {e}")))?;
        let features = hf_features(&builder);
        let schema = builder.schema().clone();
        let image_column = choose(
            path,
            &schema,
            &features,
            columns.image.as_deref(),
            "Image",
            &IMAGE_COLUMNS,
            "--image-column",
        )?;
        let label_column = choose(
            path,
            &schema,
            &features,
            columns.label.as_deref(),
            "ClassLabel",
            &LABEL_COLUMNS,
            "--label-column",
        )?;
        tracing::info!(
            table = %path.display(),
            rows = builder.metadata().file_metadata().num_rows(),
            image = %image_column,
            label = %label_column,
            "reading training images"
        );
        let names: Option<Vec<String>> = features
            .get(&label_column)
            .and_then(|f| f.get("names"))
            .and_then(|n| serde_json::from_value(n.clone()).ok());
        let indices =
            [&image_column, &label_column].map(|c| schema.index_of(c).expect("chosen from it"));
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(256)
            .build()
            .map_err(|e| data_err(path, e))?;
        let mut row0 = 0usize;
        for batch in reader {
            let batch: RecordBatch = batch.map_err(|e| data_err(path, e))?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .expect("the projection keeps the chosen columns")
            };
            let images = image_bytes(path, &column(&image_column), &image_column)?;
            let images = images.as_binary::<i64>();
            let labels = column(&label_column);
            let labels = Labels::of(path, &labels, &label_column)?;
            let mut rows = Vec::with_capacity(batch.num_rows());
            for i in 0..batch.num_rows() {
                let row = row0 + i;
                let bad = |why: String| data_err(path, format!("row {row}: {why}"));
                if images.is_null(i) {
                    return Err(bad(format!(
                        "`{image_column}` holds no image bytes (a dataset saved with images by \
                         path only); save it with the images embedded (datasets' \
                         `embed_external_files`)"
                    )));
                }
                let label = labels.get(i, names.as_deref()).map_err(bad)?;
                rows.push(TableRow {
                    source: format!("{}, row {row}", path.display()),
                    bytes: images.value(i).to_vec(),
                    label,
                });
            }
            row0 += batch.num_rows();
            visit(rows)?;
        }
    }
    Ok(())
}

/// A label column as class ids or as text.
enum Labels {
    Ids(Arc<dyn Array>),
    Text(Arc<dyn Array>),
}

impl Labels {
    fn of(path: &Path, array: &Arc<dyn Array>, column: &str) -> Result<Labels, RunError> {
        let to = |kind: &DataType| {
            cast(array, kind).map_err(|e| {
                data_err(
                    path,
                    format!(
                        "the label column `{column}` holds {}: {e}; labels are integers or text",
                        array.data_type()
                    ),
                )
            })
        };
        match array.data_type() {
            t if t.is_integer() => Ok(Labels::Ids(to(&DataType::Int64)?)),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                Ok(Labels::Text(to(&DataType::LargeUtf8)?))
            }
            other => Err(data_err(
                path,
                format!(
                    "the label column `{column}` holds {other}; labels are integers (class ids) \
                     or text: name another with --label-column"
                ),
            )),
        }
    }

    fn get(&self, i: usize, names: Option<&[String]>) -> Result<TableLabel, String> {
        let array = match self {
            Labels::Ids(a) | Labels::Text(a) => a,
        };
        if array.is_null(i) {
            return Err("the label is null".into());
        }
        match self {
            Labels::Ids(a) => {
                let id = a.as_primitive::<Int64Type>().value(i);
                if id < 0 {
                    return Err(format!(
                        "label {id} (datasets' mark of an unlabelled image, as in test splits); \
                         train on a labelled split"
                    ));
                }
                let name = match names {
                    Some(names) => Some(names.get(id as usize).cloned().ok_or_else(|| {
                        format!(
                            "label {id} is beyond the {} ClassLabel names of the file's metadata",
                            names.len()
                        )
                    })?),
                    None => None,
                };
                Ok(TableLabel::Class { id, name })
            }
            Labels::Text(a) => Ok(TableLabel::Text(a.as_string::<i64>().value(i).to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Int32Array, StringArray};
    use arrow::datatypes::Field;
    use parquet::arrow::ArrowWriter;

    /// A table without `datasets` metadata: plain binary images, int32 labels, a caption.
    fn write_plain(path: &Path, images: Vec<Option<&[u8]>>) {
        let n = images.len();
        let schema = Arc::new(Schema::new(vec![
            Field::new("caption", DataType::Utf8, false),
            Field::new("jpg", DataType::Binary, true),
            Field::new("class", DataType::Int32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("c{i}")),
                )),
                Arc::new(BinaryArray::from(images)),
                Arc::new(Int32Array::from_iter_values((0..n as i32).map(|i| i * 7))),
            ],
        )
        .unwrap();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    fn read(path: &Path, columns: &TableColumns) -> Result<Vec<TableRow>, RunError> {
        let mut rows = Vec::new();
        read_image_table(&parquet_files(path, None)?, columns, |batch| {
            rows.extend(batch);
            Ok(())
        })?;
        Ok(rows)
    }

    #[test]
    fn plain_tables_are_read_by_column_name_or_as_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_plain(&path, vec![Some(b"one"), Some(b"two")]);
        let rows = read(dir.path(), &TableColumns::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].bytes, b"two");
        assert_eq!(rows[1].label, TableLabel::Class { id: 7, name: None });
        assert!(rows[1].source.ends_with("t.parquet, row 1"));
        let captions = TableColumns {
            image: Some("jpg".into()),
            label: Some("caption".into()),
        };
        let rows = read(&path, &captions).unwrap();
        assert_eq!(rows[0].label, TableLabel::Text("c0".into()));
        let as_names = crate::run::images::ImageSetOptions {
            default_prompt: None,
            columns: TableColumns::default(),
            split: None,
            label_as: crate::run::images::LabelAs::Name,
            height: 8,
            width: 8,
            seed: 0,
        };
        let e = crate::run::images::TrainingImages::open(&path, &as_names)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is a class id, and the file's metadata lists no ClassLabel names"),
            "{e}"
        );

        let e = read(
            &path,
            &TableColumns {
                label: Some("prompt".into()),
                ..TableColumns::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no column `prompt` (--label-column); its columns are caption, jpg, class"),
            "{e}"
        );
        let e = read(
            &path,
            &TableColumns {
                image: Some("class".into()),
                ..TableColumns::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("column `class` holds Int32, not encoded images"),
            "{e}"
        );

        write_plain(&path, vec![Some(b"one"), None]);
        let e = read(&path, &TableColumns::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1: `jpg` holds no image bytes"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert!(read(dir.path(), &TableColumns::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn dataset_folders_read_the_train_split_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/trainval-00000-of-00001.parquet",
            "data/validation-00000-of-00001.parquet",
            "default/validation/0000.parquet",
        ];
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        let names = |split: Option<&str>| -> Vec<String> {
            parquet_files(dir.path(), split)
                .unwrap()
                .iter()
                .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(names(None), files[1..3]);
        assert_eq!(names(Some("validation")), [files[4], files[5]]);
        assert_eq!(names(Some("trainval")), [files[3]]);
        let e = parquet_files(dir.path(), Some("dev"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no .parquet file of split `dev`") && e.contains(files[0]),
            "{e}"
        );
        let plain = tempfile::tempdir().unwrap();
        std::fs::write(plain.path().join("shard-0.parquet"), b"").unwrap();
        assert_eq!(parquet_files(plain.path(), None).unwrap().len(), 1);
        let file = plain.path().join("shard-0.parquet");
        assert!(parquet_files(&file, Some("train")).is_err());
    }
}
