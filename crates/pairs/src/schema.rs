//! The pair-store schema: one Parquet row per labelled pair, documented in docs/pairs.md.
//!
//! Sides are numbered 0 and 1 (as in Pick-a-Pic); `label` says which side won, or that it was a
//! tie. Everything a learner needs to replay a pair offline is in the row: the prompt, the
//! sampler settings, and the final latents (and, optionally, the whole trajectory) of both sides.

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray, ListArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Version of the row layout below; written to every file's key-value metadata.
pub const SCHEMA_VERSION: u32 = 1;
/// Parquet key-value metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "pso.pairs.schema_version";

/// Column names, in file order.
pub mod col {
    pub const RUN_ID: &str = "run_id";
    pub const PAIR_ID: &str = "pair_id";
    pub const CREATED_AT: &str = "created_at";
    pub const POLICY_VERSION: &str = "policy_version";
    pub const SOURCE: &str = "source";
    pub const PROMPT: &str = "prompt";
    pub const NEGATIVE_PROMPT: &str = "negative_prompt";
    pub const MODEL_ID: &str = "model_id";
    pub const SAMPLER: &str = "sampler";
    pub const TIMESTEPS: &str = "timesteps";
    pub const GUIDANCE: &str = "guidance";
    pub const HEIGHT: &str = "height";
    pub const WIDTH: &str = "width";
    pub const IMAGE_FORMAT: &str = "image_format";
    pub const SEED_0: &str = "seed_0";
    pub const SEED_1: &str = "seed_1";
    pub const IMAGE_0: &str = "image_0";
    pub const IMAGE_1: &str = "image_1";
    pub const SCORER: &str = "scorer";
    pub const SCORER_VERSION: &str = "scorer_version";
    pub const SCORE_0: &str = "score_0";
    pub const SCORE_1: &str = "score_1";
    pub const LABEL: &str = "label";
    pub const LATENT_DTYPE: &str = "latent_dtype";
    pub const LATENT_SHAPE: &str = "latent_shape";
    pub const LATENTS_0: &str = "latents_0";
    pub const LATENTS_1: &str = "latents_1";
    pub const TRAJECTORY_0: &str = "trajectory_0";
    pub const TRAJECTORY_1: &str = "trajectory_1";
}

/// Columns holding large opaque bytes: stored uncompressed, without dictionary or statistics.
pub const BLOB_COLUMNS: [&str; 6] = [
    col::IMAGE_0,
    col::IMAGE_1,
    col::LATENTS_0,
    col::LATENTS_1,
    col::TRAJECTORY_0,
    col::TRAJECTORY_1,
];

fn int32_list() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false)))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    use DataType::*;
    let f = Field::new;
    // The version travels in the Arrow schema too (the file's embedded `ARROW:schema`): pyarrow
    // restores a table's metadata from there, so a store rewritten by pyarrow keeps it.
    let metadata: std::collections::HashMap<String, String> =
        [(SCHEMA_VERSION_KEY.to_owned(), SCHEMA_VERSION.to_string())].into();
    let fields = vec![
        f(col::RUN_ID, Utf8, false),
        f(col::PAIR_ID, Int64, false),
        f(
            col::CREATED_AT,
            Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        f(col::POLICY_VERSION, Int64, true),
        f(col::SOURCE, Utf8, false),
        f(col::PROMPT, Utf8, false),
        f(col::NEGATIVE_PROMPT, Utf8, true),
        f(col::MODEL_ID, Utf8, false),
        f(col::SAMPLER, Utf8, false),
        f(col::TIMESTEPS, int32_list(), false),
        f(col::GUIDANCE, Float32, true),
        f(col::HEIGHT, Int32, false),
        f(col::WIDTH, Int32, false),
        f(col::IMAGE_FORMAT, Utf8, false),
        f(col::SEED_0, UInt64, true),
        f(col::SEED_1, UInt64, true),
        f(col::IMAGE_0, LargeBinary, false),
        f(col::IMAGE_1, LargeBinary, false),
        f(col::SCORER, Utf8, false),
        f(col::SCORER_VERSION, Utf8, false),
        f(col::SCORE_0, Float32, false),
        f(col::SCORE_1, Float32, false),
        f(col::LABEL, Int8, false),
        f(col::LATENT_DTYPE, Utf8, true),
        f(col::LATENT_SHAPE, int32_list(), true),
        f(col::LATENTS_0, LargeBinary, true),
        f(col::LATENTS_1, LargeBinary, true),
        f(col::TRAJECTORY_0, LargeBinary, true),
        f(col::TRAJECTORY_1, LargeBinary, true),
    ];
    Arc::new(Schema::new_with_metadata(fields, metadata))
});

/// The Arrow schema of a pair-store file.
pub fn pair_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Whether a column of type `found` reads as `want`: the same type, or lists that differ only in
/// their element field's name or nullability (pyarrow writes `element`, nullable; arrow-rs
/// `item`), so that a store rewritten by pyarrow with its defaults is still a store.
pub fn same_layout(found: &DataType, want: &DataType) -> bool {
    match (found, want) {
        (DataType::List(a), DataType::List(b)) => same_layout(a.data_type(), b.data_type()),
        _ => found == want,
    }
}

/// Brings a column read from a file to `want`'s exact type when the two have the same layout
/// but differ in a list's element field; refuses null list elements, which the schema forbids.
pub(crate) fn conform_column(array: ArrayRef, want: &Field) -> Result<ArrayRef, String> {
    match (array.data_type(), want.data_type()) {
        (found, target) if found == target => Ok(array),
        (DataType::List(_), DataType::List(element)) => {
            let list = array.as_list::<i32>();
            let values = conform_column(list.values().clone(), element)?;
            if !element.is_nullable() && values.null_count() > 0 {
                return Err(format!(
                    "column `{}` holds a null inside a list; the pair schema allows none",
                    want.name()
                ));
            }
            let rebuilt = ListArray::try_new(
                element.clone(),
                list.offsets().clone(),
                values,
                list.nulls().cloned(),
            )
            .map_err(|e| format!("column `{}`: {e}", want.name()))?;
            Ok(Arc::new(rebuilt))
        }
        (found, target) => Err(format!(
            "column `{}` has type {found}, expected {target}",
            want.name()
        )),
    }
}
