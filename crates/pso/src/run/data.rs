//! Training data of offline runs: labelled pairs streamed from the store (or an import) epoch
//! after epoch in a seeded order, with a cursor that a checkpoint records.

use std::collections::VecDeque;
use std::path::PathBuf;

use tch::{Kind, Tensor};

use super::relabel::Relabeler;
use super::{step_seed, RunError};
use pairs::reader::{PairFilter, PairReader, ReadOptions};
use pairs::{batch_to_records, Label, LatentDType, PairRecord};

/// Labelled, untied pairs in a reproducible order: epoch e is the store shuffled with a seed
/// derived from (run seed, e). With a relabeler, every pair is scored again as it is read and
/// pairs tied under the new scorer are passed over. Sharded over data-parallel ranks, every
/// rank walks the same order and takes the positions p with p mod world = rank (PyTorch's
/// DistributedSampler, over an endless stream of epochs).
pub struct PairStream {
    paths: Vec<PathBuf>,
    seed: u64,
    relabel: Option<Relabeler>,
    epoch: u64,
    reader: PairReader,
    queue: VecDeque<PairRecord>,
    in_epoch: u64,
    consumed: u64,
    /// (rank, world size).
    shard: (u64, u64),
}

impl PairStream {
    /// Opens `paths` (shards or directories of shards).
    pub fn open(
        paths: &[PathBuf],
        seed: u64,
        relabel: Option<Relabeler>,
    ) -> Result<PairStream, RunError> {
        let skip_ties = relabel.is_none();
        Ok(PairStream {
            paths: paths.to_vec(),
            seed,
            relabel,
            epoch: 0,
            reader: Self::reader(paths, seed, 0, skip_ties)?,
            queue: VecDeque::new(),
            in_epoch: 0,
            consumed: 0,
            shard: (0, 1),
        })
    }

    /// Takes only rank `rank`'s share of every `world` positions of the stream.
    pub fn shard(mut self, rank: usize, world: usize) -> PairStream {
        self.shard = (rank as u64, world.max(1) as u64);
        self
    }

    fn reader(
        paths: &[PathBuf],
        seed: u64,
        epoch: u64,
        skip_ties: bool,
    ) -> Result<PairReader, RunError> {
        Ok(PairReader::open(
            paths,
            ReadOptions {
                shuffle_seed: Some(step_seed(seed, epoch, u32::MAX)),
                filter: PairFilter {
                    skip_ties,
                    ..PairFilter::default()
                },
                batch_size: 64,
                ..ReadOptions::default()
            },
        )?)
    }

    /// Positions of the stream passed so far, relabelled ties included (the checkpoint's data
    /// cursor). Sharded, it counts whole rounds of `world` positions: after each rank took k
    /// pairs that is k·world on every rank, and skipping it puts rank r at position k·world + r.
    pub fn consumed(&self) -> u64 {
        let world = self.shard.1;
        self.consumed.div_ceil(world) * world
    }

    /// Skips `n` positions (to the cursor of a checkpoint) without scoring them.
    pub fn skip(&mut self, n: u64) -> Result<(), RunError> {
        for _ in 0..n {
            self.next_raw()?;
        }
        Ok(())
    }

    /// The next pair, relabelled when asked, starting a new epoch when the data runs out.
    pub fn next_pair(&mut self) -> Result<PairRecord, RunError> {
        // Bounded, so that a scorer that ties everything stops the run with a message.
        for _ in 0..10_000 {
            let mut record = self.next_own()?;
            match &self.relabel {
                None => return Ok(record),
                Some(r) => {
                    r.relabel(&mut record)?;
                    if record.label != Label::Tie {
                        return Ok(record);
                    }
                }
            }
        }
        Err(RunError::Data(
            "the relabelling scorer tied 10000 pairs in a row; check --relabel-with".into(),
        ))
    }

    /// The next pair at one of this rank's positions.
    fn next_own(&mut self) -> Result<PairRecord, RunError> {
        let (rank, world) = self.shard;
        loop {
            let record = self.next_raw()?;
            if (self.consumed - 1) % world == rank {
                return Ok(record);
            }
        }
    }

    fn next_raw(&mut self) -> Result<PairRecord, RunError> {
        loop {
            if let Some(record) = self.queue.pop_front() {
                self.in_epoch += 1;
                self.consumed += 1;
                return Ok(record);
            }
            match self.reader.next() {
                Some(batch) => {
                    self.queue.extend(batch_to_records(&batch?, 0)?);
                }
                None if self.in_epoch == 0 => {
                    return Err(RunError::Data(format!(
                        "no untied pair in {}; `pso pairs inspect` shows what the files hold",
                        self.paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                None => {
                    self.epoch += 1;
                    self.in_epoch = 0;
                    let skip_ties = self.relabel.is_none();
                    self.reader = Self::reader(&self.paths, self.seed, self.epoch, skip_ties)?;
                }
            }
        }
    }
}

/// The stored final latent of `side` as an fp32 [C, H, W] tensor, when the pair kept latents.
pub fn stored_latent(record: &PairRecord, side: usize) -> Option<Tensor> {
    let l = record.latents.as_ref()?;
    let kind = match l.dtype {
        LatentDType::F32 => Kind::Float,
        LatentDType::F16 => Kind::Half,
        LatentDType::Bf16 => Kind::BFloat16,
    };
    let shape: Vec<i64> = l.shape.iter().map(|&d| d as i64).collect();
    Some(Tensor::from_data_size(&l.final_latents[side], &shape, kind).to_kind(Kind::Float))
}

/// Decodes an encoded image, resizes its short side to cover `height`×`width` and crops the
/// centre, as Diffusion-DPO's training transform does (without the random crop and flip);
/// returns [H, W, 3] uint8.
pub fn image_tensor(bytes: &[u8], height: u32, width: u32, what: &str) -> Result<Tensor, RunError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| RunError::Data(format!("{what}: the image does not decode: {e}")))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let img = if (w, h) == (width, height) {
        img
    } else {
        let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(width),
            ((h as f64 * scale).round() as u32).max(height),
        );
        let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        image::imageops::crop_imm(&resized, (nw - width) / 2, (nh - height) / 2, width, height)
            .to_image()
    };
    Ok(Tensor::from_data_size(
        img.as_raw(),
        &[height as i64, width as i64, 3],
        Kind::Uint8,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_resized_to_cover_and_centre_cropped() {
        let mut img = image::RgbImage::new(40, 20);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 6) as u8, 0, 0]);
        }
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let t = image_tensor(&png, 16, 16, "pair 0").unwrap();
        assert_eq!(t.size(), [16, 16, 3]);
        // 40×20 → 32×16, centre 16 columns: red rises from the left edge to the right.
        assert!(t.int64_value(&[0, 0, 0]) < t.int64_value(&[0, 15, 0]));
        let e = image_tensor(b"nope", 16, 16, "pair 3 side 1").unwrap_err();
        assert!(e.to_string().starts_with("pair 3 side 1: "), "{e}");
    }
}
