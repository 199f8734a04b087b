//! The pair-store schema: one Parquet row per labelled pair, documented in docs/pairs.md.
//!
//! Sides are numbered 0 and 1 (as in Pick-a-Pic); `label` says which side won, or that it was a
//! tie. Everything a learner needs to replay a pair offline is in the row: the prompt, the
//! sampler settings, and the final latents (and, optionally, the whole trajectory) of both sides.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Int32Builder, Int64Builder, Int8Builder,
    LargeBinaryBuilder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
    UInt64Builder,
};
use arrow::datatypes::{
    DataType, Field, Float32Type, Int32Type, Int64Type, Int8Type, Schema, SchemaRef, TimeUnit,
    TimestampMicrosecondType, UInt64Type,
};

use super::PairsError;

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
    Arc::new(Schema::new(vec![
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
    ]))
});

/// The Arrow schema of a pair-store file.
pub fn pair_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Which side won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// Side 0 is preferred.
    Side0,
    /// Side 1 is preferred.
    Side1,
    /// Neither is preferred (equal scores, or a human tie).
    Tie,
}

impl Label {
    /// The stored value: 0, 1, or -1 for a tie.
    pub fn code(self) -> i8 {
        match self {
            Label::Side0 => 0,
            Label::Side1 => 1,
            Label::Tie => -1,
        }
    }

    /// Parses a stored value.
    pub fn from_code(code: i8) -> Option<Label> {
        match code {
            0 => Some(Label::Side0),
            1 => Some(Label::Side1),
            -1 => Some(Label::Tie),
            _ => None,
        }
    }

    /// The label that prefers the higher score (or the lower one when lower is better).
    pub fn from_scores(score_0: f32, score_1: f32, higher_is_better: bool) -> Label {
        let (a, b) = if higher_is_better {
            (score_0, score_1)
        } else {
            (score_1, score_0)
        };
        if a > b {
            Label::Side0
        } else if b > a {
            Label::Side1
        } else {
            Label::Tie
        }
    }
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "`{s}` is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// Where a pair came from.
    Source {
        /// Sampled by the policy during an online run.
        Online => "online",
        /// Imported from a human-preference dataset.
        Imported => "imported",
        /// Copied from another store and labelled again by another scorer.
        Relabelled => "relabelled",
    }
}

string_enum! {
    /// Encoding of the image bytes of both sides.
    ImageFormat {
        /// PNG (lossless; what the online loop writes).
        Png => "png",
        /// JPEG, kept as imported.
        Jpeg => "jpeg",
    }
}

string_enum! {
    /// Element type of stored latents (little-endian, row-major).
    LatentDType {
        /// IEEE half precision.
        F16 => "f16",
        /// bfloat16.
        Bf16 => "bf16",
        /// IEEE single precision.
        F32 => "f32",
    }
}

impl LatentDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            LatentDType::F16 | LatentDType::Bf16 => 2,
            LatentDType::F32 => 4,
        }
    }
}

impl ImageFormat {
    /// Whether `bytes` start with this format's signature.
    pub fn matches(self, bytes: &[u8]) -> bool {
        match self {
            ImageFormat::Png => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            ImageFormat::Jpeg => bytes.starts_with(&[0xFF, 0xD8, 0xFF]),
        }
    }
}

/// Latents of both sides: the final latent, and optionally the whole sampling trajectory.
#[derive(Debug, Clone, PartialEq)]
pub struct Latents {
    /// Element type of every latent buffer.
    pub dtype: LatentDType,
    /// Shape of one latent, `[C, H, W]`.
    pub shape: Vec<i32>,
    /// Final latent (x0) of each side.
    pub final_latents: [Vec<u8>; 2],
    /// Every latent of each side's trajectory, x_T first and x0 last:
    /// `timesteps.len() + 1` latents of `shape`, stacked.
    pub trajectories: Option<[Vec<u8>; 2]>,
}

impl Latents {
    /// Bytes of one latent.
    pub fn latent_bytes(&self) -> usize {
        self.dtype.size()
            * self
                .shape
                .iter()
                .map(|&d| d.max(0) as usize)
                .product::<usize>()
    }
}

/// What is stored of one side of a pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// Seed of the initial noise (unknown for imported pairs).
    pub seed: Option<u64>,
    /// Encoded image ([`PairRecord::image_format`]).
    pub image: Vec<u8>,
    /// Reward of this side.
    pub score: f32,
}

/// One labelled pair: a row of the store.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    /// Run that produced (or imported) the pair.
    pub run_id: String,
    /// Sequence number within the run, from 0.
    pub pair_id: i64,
    /// Microseconds since the Unix epoch, UTC.
    pub created_at_us: i64,
    /// Learner step whose policy sampled the pair; `None` when imported.
    pub policy_version: Option<i64>,
    /// Where the pair came from.
    pub source: Source,
    /// Text prompt (or class name for class-conditional models).
    pub prompt: String,
    /// Negative prompt, when guidance used one.
    pub negative_prompt: Option<String>,
    /// Model folder or hub id that sampled the images.
    pub model_id: String,
    /// Sampler name (e.g. `euler_ancestral`); `unknown` when imported.
    pub sampler: String,
    /// Timesteps of the sampling schedule, first to last; empty when unknown.
    pub timesteps: Vec<i32>,
    /// Classifier-free guidance scale; `None` when unknown.
    pub guidance: Option<f32>,
    /// Image height in pixels.
    pub height: i32,
    /// Image width in pixels.
    pub width: i32,
    /// Encoding of both images.
    pub image_format: ImageFormat,
    /// Side 0 and side 1.
    pub sides: [Side; 2],
    /// Scorer that labelled the pair (`human` for imported preferences).
    pub scorer: String,
    /// Version of that scorer (model revision, protocol version, dataset name).
    pub scorer_version: String,
    /// Which side won.
    pub label: Label,
    /// Latents of both sides, when kept.
    pub latents: Option<Latents>,
}

impl PairRecord {
    /// Checks the invariants the schema cannot express; the message names the column.
    pub fn check(&self) -> Result<(), String> {
        if self.run_id.is_empty() {
            return Err(format!("{}: empty", col::RUN_ID));
        }
        if self.pair_id < 0 {
            return Err(format!("{}: {} is negative", col::PAIR_ID, self.pair_id));
        }
        if self.height <= 0 || self.width <= 0 {
            return Err(format!(
                "{}/{}: {}x{} is not a positive size",
                col::HEIGHT,
                col::WIDTH,
                self.height,
                self.width
            ));
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() {
                return Err(format!("{}: {g} is not finite", col::GUIDANCE));
            }
        }
        for (i, side) in self.sides.iter().enumerate() {
            if !side.score.is_finite() {
                return Err(format!("score_{i}: {} is not finite", side.score));
            }
            if !self.image_format.matches(&side.image) {
                return Err(format!(
                    "image_{i}: {} bytes that do not start with a {} signature",
                    side.image.len(),
                    self.image_format
                ));
            }
        }
        if let Some(lat) = &self.latents {
            if lat.shape.is_empty() || lat.shape.iter().any(|&d| d <= 0) {
                return Err(format!(
                    "{}: {:?} is not a shape of positive sizes",
                    col::LATENT_SHAPE,
                    lat.shape
                ));
            }
            let one = lat.latent_bytes();
            for (i, buf) in lat.final_latents.iter().enumerate() {
                if buf.len() != one {
                    return Err(format!(
                        "latents_{i}: {} bytes, expected {one} ({} {:?})",
                        buf.len(),
                        lat.dtype,
                        lat.shape
                    ));
                }
            }
            if let Some(trajectories) = &lat.trajectories {
                let want = one * (self.timesteps.len() + 1);
                for (i, buf) in trajectories.iter().enumerate() {
                    if buf.len() != want {
                        return Err(format!(
                            "trajectory_{i}: {} bytes, expected {want} ({} latents of {} {:?}: one per timestep plus x0)",
                            buf.len(),
                            self.timesteps.len() + 1,
                            lat.dtype,
                            lat.shape
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds a record batch of `records` in the pair schema.
pub fn records_to_batch(records: &[PairRecord]) -> Result<RecordBatch, PairsError> {
    let n = records.len();
    let mut run_id = StringBuilder::new();
    let mut pair_id = Int64Builder::with_capacity(n);
    let mut created_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut policy_version = Int64Builder::with_capacity(n);
    let mut source = StringBuilder::new();
    let mut prompt = StringBuilder::new();
    let mut negative_prompt = StringBuilder::new();
    let mut model_id = StringBuilder::new();
    let mut sampler = StringBuilder::new();
    let mut timesteps = ListBuilder::new(Int32Builder::new())
        .with_field(Arc::new(Field::new_list_field(DataType::Int32, false)));
    let mut guidance = Float32Builder::with_capacity(n);
    let mut height = Int32Builder::with_capacity(n);
    let mut width = Int32Builder::with_capacity(n);
    let mut image_format = StringBuilder::new();
    let mut seeds = [
        UInt64Builder::with_capacity(n),
        UInt64Builder::with_capacity(n),
    ];
    let mut images = [LargeBinaryBuilder::new(), LargeBinaryBuilder::new()];
    let mut scorer = StringBuilder::new();
    let mut scorer_version = StringBuilder::new();
    let mut scores = [
        Float32Builder::with_capacity(n),
        Float32Builder::with_capacity(n),
    ];
    let mut label = Int8Builder::with_capacity(n);
    let mut latent_dtype = StringBuilder::new();
    let mut latent_shape = ListBuilder::new(Int32Builder::new())
        .with_field(Arc::new(Field::new_list_field(DataType::Int32, false)));
    let mut latents = [LargeBinaryBuilder::new(), LargeBinaryBuilder::new()];
    let mut trajectories = [LargeBinaryBuilder::new(), LargeBinaryBuilder::new()];

    for (row, r) in records.iter().enumerate() {
        r.check()
            .map_err(|why| PairsError::InvalidRecord { row, why })?;
        run_id.append_value(&r.run_id);
        pair_id.append_value(r.pair_id);
        created_at.append_value(r.created_at_us);
        policy_version.append_option(r.policy_version);
        source.append_value(r.source.as_str());
        prompt.append_value(&r.prompt);
        negative_prompt.append_option(r.negative_prompt.as_deref());
        model_id.append_value(&r.model_id);
        sampler.append_value(&r.sampler);
        timesteps.values().append_slice(&r.timesteps);
        timesteps.append(true);
        guidance.append_option(r.guidance);
        height.append_value(r.height);
        width.append_value(r.width);
        image_format.append_value(r.image_format.as_str());
        scorer.append_value(&r.scorer);
        scorer_version.append_value(&r.scorer_version);
        label.append_value(r.label.code());
        for (i, side) in r.sides.iter().enumerate() {
            seeds[i].append_option(side.seed);
            images[i].append_value(&side.image);
            scores[i].append_value(side.score);
        }
        match &r.latents {
            Some(lat) => {
                latent_dtype.append_value(lat.dtype.as_str());
                latent_shape.values().append_slice(&lat.shape);
                latent_shape.append(true);
                for i in 0..2 {
                    latents[i].append_value(&lat.final_latents[i]);
                    match &lat.trajectories {
                        Some(t) => trajectories[i].append_value(&t[i]),
                        None => trajectories[i].append_null(),
                    }
                }
            }
            None => {
                latent_dtype.append_null();
                latent_shape.append(false);
                for i in 0..2 {
                    latents[i].append_null();
                    trajectories[i].append_null();
                }
            }
        }
    }

    let [seed_0, seed_1] = seeds.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let [image_0, image_1] = images.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let [score_0, score_1] = scores.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let [latents_0, latents_1] = latents.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let [trajectory_0, trajectory_1] = trajectories.map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(run_id.finish()),
        Arc::new(pair_id.finish()),
        Arc::new(created_at.finish()),
        Arc::new(policy_version.finish()),
        Arc::new(source.finish()),
        Arc::new(prompt.finish()),
        Arc::new(negative_prompt.finish()),
        Arc::new(model_id.finish()),
        Arc::new(sampler.finish()),
        Arc::new(timesteps.finish()),
        Arc::new(guidance.finish()),
        Arc::new(height.finish()),
        Arc::new(width.finish()),
        Arc::new(image_format.finish()),
        seed_0,
        seed_1,
        image_0,
        image_1,
        Arc::new(scorer.finish()),
        Arc::new(scorer_version.finish()),
        score_0,
        score_1,
        Arc::new(label.finish()),
        Arc::new(latent_dtype.finish()),
        Arc::new(latent_shape.finish()),
        latents_0,
        latents_1,
        trajectory_0,
        trajectory_1,
    ];
    Ok(RecordBatch::try_new(pair_schema(), columns)?)
}

/// Reads every row of a batch holding all pair columns back into records.
///
/// `first_row` is the batch's offset in its file, so errors name the file's row.
pub fn batch_to_records(
    batch: &RecordBatch,
    first_row: usize,
) -> Result<Vec<PairRecord>, PairsError> {
    let c = Columns::new(batch)?;
    (0..batch.num_rows())
        .map(|i| {
            c.record(i).map_err(|why| PairsError::InvalidRecord {
                row: first_row + i,
                why,
            })
        })
        .collect()
}

/// Typed access to the columns of a (possibly projected) pair batch.
pub struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    /// Wraps a batch whose columns follow the pair schema (any subset of them).
    pub fn new(batch: &'a RecordBatch) -> Result<Self, PairsError> {
        let expected = pair_schema();
        for field in batch.schema().fields() {
            let want = expected
                .field_with_name(field.name())
                .map_err(|_| PairsError::Schema(format!("unexpected column `{}`", field.name())))?;
            if want.data_type() != field.data_type() {
                return Err(PairsError::Schema(format!(
                    "column `{}` has type {}, expected {}",
                    field.name(),
                    field.data_type(),
                    want.data_type()
                )));
            }
        }
        Ok(Columns { batch })
    }

    fn column(&self, name: &str) -> Result<&'a ArrayRef, String> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| format!("column `{name}` was not read (add it to the projection)"))
    }

    /// Text column value (`None` when null).
    pub fn str(&self, name: &str, row: usize) -> Result<Option<&'a str>, String> {
        let a = self.column(name)?.as_string::<i32>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// Required text value.
    pub fn req_str(&self, name: &str, row: usize) -> Result<&'a str, String> {
        self.str(name, row)?.ok_or_else(|| format!("{name}: null"))
    }

    /// Bytes column value (`None` when null).
    pub fn bytes(&self, name: &str, row: usize) -> Result<Option<&'a [u8]>, String> {
        let a = self.column(name)?.as_binary::<i64>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// Int64 value (`None` when null).
    pub fn i64(&self, name: &str, row: usize) -> Result<Option<i64>, String> {
        let a = self.column(name)?.as_primitive::<Int64Type>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// Int32 value (`None` when null).
    pub fn i32(&self, name: &str, row: usize) -> Result<Option<i32>, String> {
        let a = self.column(name)?.as_primitive::<Int32Type>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// Float32 value (`None` when null).
    pub fn f32(&self, name: &str, row: usize) -> Result<Option<f32>, String> {
        let a = self.column(name)?.as_primitive::<Float32Type>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// UInt64 value (`None` when null).
    pub fn u64(&self, name: &str, row: usize) -> Result<Option<u64>, String> {
        let a = self.column(name)?.as_primitive::<UInt64Type>();
        Ok((!a.is_null(row)).then(|| a.value(row)))
    }

    /// Int32 list value (`None` when null).
    pub fn i32_list(&self, name: &str, row: usize) -> Result<Option<Vec<i32>>, String> {
        let a = self.column(name)?.as_list::<i32>();
        Ok((!a.is_null(row)).then(|| a.value(row).as_primitive::<Int32Type>().values().to_vec()))
    }

    /// The label of a row.
    pub fn label(&self, row: usize) -> Result<Label, String> {
        let a = self.column(col::LABEL)?.as_primitive::<Int8Type>();
        let code = a.value(row);
        Label::from_code(code).ok_or_else(|| format!("{}: {code} is not 0, 1 or -1", col::LABEL))
    }

    /// Creation time of a row, microseconds since the epoch.
    pub fn created_at_us(&self, row: usize) -> Result<i64, String> {
        Ok(self
            .column(col::CREATED_AT)?
            .as_primitive::<TimestampMicrosecondType>()
            .value(row))
    }

    /// A parsed text enum column.
    pub fn parsed<T: std::str::FromStr<Err = String>>(
        &self,
        name: &str,
        row: usize,
    ) -> Result<T, String> {
        self.req_str(name, row)?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    }

    /// A whole record; every column must have been read.
    pub fn record(&self, row: usize) -> Result<PairRecord, String> {
        let side = |i: usize| -> Result<Side, String> {
            Ok(Side {
                seed: self.u64([col::SEED_0, col::SEED_1][i], row)?,
                image: self
                    .bytes([col::IMAGE_0, col::IMAGE_1][i], row)?
                    .ok_or_else(|| format!("image_{i}: null"))?
                    .to_vec(),
                score: self
                    .f32([col::SCORE_0, col::SCORE_1][i], row)?
                    .ok_or_else(|| format!("score_{i}: null"))?,
            })
        };
        let latents = match self.str(col::LATENT_DTYPE, row)? {
            None => None,
            Some(dtype) => {
                let dtype = dtype
                    .parse()
                    .map_err(|e| format!("{}: {e}", col::LATENT_DTYPE))?;
                let shape = self.i32_list(col::LATENT_SHAPE, row)?.ok_or_else(|| {
                    format!("{}: null while latent_dtype is set", col::LATENT_SHAPE)
                })?;
                let final_of = |name: &str| -> Result<Vec<u8>, String> {
                    Ok(self
                        .bytes(name, row)?
                        .ok_or_else(|| format!("{name}: null while latent_dtype is set"))?
                        .to_vec())
                };
                let t0 = self.bytes(col::TRAJECTORY_0, row)?;
                let t1 = self.bytes(col::TRAJECTORY_1, row)?;
                let trajectories = match (t0, t1) {
                    (Some(a), Some(b)) => Some([a.to_vec(), b.to_vec()]),
                    (None, None) => None,
                    _ => return Err("trajectory_0/trajectory_1: only one side is set".into()),
                };
                Some(Latents {
                    dtype,
                    shape,
                    final_latents: [final_of(col::LATENTS_0)?, final_of(col::LATENTS_1)?],
                    trajectories,
                })
            }
        };
        let record = PairRecord {
            run_id: self.req_str(col::RUN_ID, row)?.to_owned(),
            pair_id: self
                .i64(col::PAIR_ID, row)?
                .ok_or_else(|| format!("{}: null", col::PAIR_ID))?,
            created_at_us: self.created_at_us(row)?,
            policy_version: self.i64(col::POLICY_VERSION, row)?,
            source: self.parsed(col::SOURCE, row)?,
            prompt: self.req_str(col::PROMPT, row)?.to_owned(),
            negative_prompt: self.str(col::NEGATIVE_PROMPT, row)?.map(str::to_owned),
            model_id: self.req_str(col::MODEL_ID, row)?.to_owned(),
            sampler: self.req_str(col::SAMPLER, row)?.to_owned(),
            timesteps: self
                .i32_list(col::TIMESTEPS, row)?
                .ok_or_else(|| format!("{}: null", col::TIMESTEPS))?,
            guidance: self.f32(col::GUIDANCE, row)?,
            height: self
                .i32(col::HEIGHT, row)?
                .ok_or_else(|| format!("{}: null", col::HEIGHT))?,
            width: self
                .i32(col::WIDTH, row)?
                .ok_or_else(|| format!("{}: null", col::WIDTH))?,
            image_format: self.parsed(col::IMAGE_FORMAT, row)?,
            sides: [side(0)?, side(1)?],
            scorer: self.req_str(col::SCORER, row)?.to_owned(),
            scorer_version: self.req_str(col::SCORER_VERSION, row)?.to_owned(),
            label: self.label(row)?,
            latents,
        };
        record.check()?;
        Ok(record)
    }
}
