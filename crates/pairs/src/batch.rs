//! Conversion between [`PairRecord`]s and Arrow record batches in the pair schema.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Int32Builder, Int64Builder, Int8Builder,
    LargeBinaryBuilder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
    UInt64Builder,
};
use arrow::datatypes::{
    DataType, Field, Float32Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    UInt64Type,
};

use super::record::{Label, Latents, PairRecord, Side};
use super::schema::{col, pair_schema, same_layout};
use super::PairsError;

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
            if !same_layout(field.data_type(), want.data_type()) {
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
