//! Where the sampler's Gaussian noise comes from: a seed, or an explicit list of tensors.
//!
//! The sampler asks for all its noise in one [`NoiseSource::draw`] call, in the order diffusers
//! draws it from a pipeline's `generator`: the initial latents (unless given), then one tensor per
//! step whose `step` draws noise.

use std::collections::VecDeque;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::SamplingError;

/// A source of standard-normal fp32 CPU tensors.
pub trait NoiseSource {
    /// The next `count` tensors of shape `shape`.
    fn draw(&mut self, shape: &[i64], count: usize) -> Result<Vec<Tensor>, SamplingError>;
}

/// Serialises the seeding and drawing of libtorch's global CPU generator across threads.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Noise from libtorch's CPU generator seeded with `seed`: the same numbers as a diffusers
/// pipeline called with `generator=torch.Generator("cpu").manual_seed(seed)`.
///
/// tch exposes no per-instance generator, so each draw re-seeds the process-wide generator (under
/// a lock shared by all `SeededNoise`) and replays the draws made so far before making new ones
/// (cheap for the few draws of a few-step run). The stream therefore does not depend on what used
/// the generator before; the prices are that `manual_seed` also re-seeds the CUDA generators, and
/// that code drawing from the global generator on another thread during a draw (e.g. dropout in
/// a concurrent learner step) would interleave with it.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    drawn: Vec<Vec<i64>>,
}

impl SeededNoise {
    /// A fresh stream for `seed`.
    pub fn new(seed: u64) -> SeededNoise {
        SeededNoise {
            seed,
            drawn: Vec::new(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn draw(&mut self, shape: &[i64], count: usize) -> Result<Vec<Tensor>, SamplingError> {
        let _guard = TORCH_RNG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // torch.manual_seed takes the seed's bits as a u64; tch's signature is i64.
        tch::manual_seed(self.seed as i64);
        for past in &self.drawn {
            let _ = Tensor::f_randn(past.as_slice(), (Kind::Float, Device::Cpu))?;
        }
        let out = (0..count)
            .map(|_| Tensor::f_randn(shape, (Kind::Float, Device::Cpu)))
            .collect::<Result<Vec<_>, _>>()?;
        self.drawn
            .extend(std::iter::repeat_n(shape.to_vec(), count));
        Ok(out)
    }
}

/// Noise for a batch of images that each have their own seed: image i's rows come from
/// `SeededNoise::new(seeds[i])`, so every image gets what it would draw alone, whatever batch it
/// is generated in.
///
/// A draw of k·R rows (R images) gives each image's stream k rows, row j of image i landing at
/// j·R + i: a guided DiT draws noise for its doubled batch and keeps the first R rows, which are
/// then each image's first row, as when it is sampled alone.
#[derive(Debug, Clone)]
pub struct RowSeededNoise {
    rows: Vec<SeededNoise>,
}

impl RowSeededNoise {
    /// One stream per image, in batch order.
    pub fn new(seeds: impl IntoIterator<Item = u64>) -> RowSeededNoise {
        RowSeededNoise {
            rows: seeds.into_iter().map(SeededNoise::new).collect(),
        }
    }
}

impl NoiseSource for RowSeededNoise {
    fn draw(&mut self, shape: &[i64], count: usize) -> Result<Vec<Tensor>, SamplingError> {
        let images = self.rows.len() as i64;
        let per_image = match shape.first() {
            Some(&n) if images > 0 && n > 0 && n % images == 0 => n / images,
            _ => {
                return Err(SamplingError::Noise(format!(
                    "a draw of shape {shape:?} does not split into the {images} images' seeds"
                )))
            }
        };
        let mut row_shape = shape.to_vec();
        row_shape[0] = per_image;
        let streams = self
            .rows
            .iter_mut()
            .map(|r| r.draw(&row_shape, count))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((0..count)
            .map(|j| {
                let parts: Vec<&Tensor> = streams.iter().map(|s| &s[j]).collect();
                // [k, R, …] → [k·R, …]: row j·R + i is image i's row j.
                Tensor::stack(&parts, 1).reshape(shape)
            })
            .collect())
    }
}

/// Noise given as tensors, used in order (e.g. the same tensors handed to diffusers in a test).
#[derive(Debug, Default)]
pub struct ExplicitNoise {
    tensors: VecDeque<Tensor>,
    used: usize,
}

impl ExplicitNoise {
    /// The tensors, first to be drawn first.
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> ExplicitNoise {
        ExplicitNoise {
            tensors: tensors.into_iter().collect(),
            used: 0,
        }
    }

    /// How many tensors are left.
    pub fn remaining(&self) -> usize {
        self.tensors.len()
    }
}

impl NoiseSource for ExplicitNoise {
    fn draw(&mut self, shape: &[i64], count: usize) -> Result<Vec<Tensor>, SamplingError> {
        if self.tensors.len() < count {
            return Err(SamplingError::Noise(format!(
                "the explicit noise has {} tensor(s) left but {count} are needed (one per initial \
                 latent drawn and per step that draws noise); supply more tensors",
                self.tensors.len()
            )));
        }
        for (i, t) in self.tensors.iter().take(count).enumerate() {
            if t.size() != shape {
                return Err(SamplingError::Noise(format!(
                    "explicit noise tensor #{} has shape {:?} but the sampler needs {shape:?}",
                    self.used + i,
                    t.size()
                )));
            }
        }
        self.used += count;
        Ok(self
            .tensors
            .drain(..count)
            .map(|t| t.to_kind(Kind::Float).to_device(Device::Cpu))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_a_reproducible_stream() {
        let mut a = SeededNoise::new(7);
        let first = a.draw(&[2, 3], 2).unwrap();
        {
            // Someone else uses the global generator in between.
            let _guard = TORCH_RNG.lock().unwrap();
            tch::manual_seed(999);
            let _ = Tensor::randn([5], (Kind::Float, Device::Cpu));
        }
        let second = a.draw(&[2, 3], 1).unwrap();
        let all = SeededNoise::new(7).draw(&[2, 3], 3).unwrap();
        assert!(first[0].equal(&all[0]) && first[1].equal(&all[1]) && second[0].equal(&all[2]));
        assert!(!first[0].equal(&first[1]));
    }

    #[test]
    fn row_seeded_noise_gives_each_image_its_own_stream() {
        let mut batch = RowSeededNoise::new([3, 8]);
        let drawn = batch.draw(&[4, 2], 2).unwrap();
        for (i, seed) in [3, 8].into_iter().enumerate() {
            let alone = SeededNoise::new(seed).draw(&[2, 2], 2).unwrap();
            for (d, a) in drawn.iter().zip(&alone) {
                assert!(d.get(i as i64).equal(&a.get(0)), "image {i}, first row");
                assert!(
                    d.get(2 + i as i64).equal(&a.get(1)),
                    "image {i}, second row"
                );
            }
        }
        let e = batch.draw(&[3, 2], 1).unwrap_err().to_string();
        assert!(e.contains("[3, 2]") && e.contains("2 images"), "{e}");
    }

    #[test]
    fn explicit_noise_checks_count_and_shape() {
        let t = || Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
        let mut n = ExplicitNoise::new([t(), t()]);
        assert_eq!(n.draw(&[1, 2], 1).unwrap().len(), 1);
        assert_eq!(n.remaining(), 1);
        assert!(n
            .draw(&[1, 2], 2)
            .unwrap_err()
            .to_string()
            .contains("1 tensor(s) left but 2"));
        let e = n.draw(&[2, 2], 1).unwrap_err().to_string();
        assert!(e.contains("#1") && e.contains("[1, 2]"), "{e}");
    }
}
