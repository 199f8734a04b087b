//! The reference images that training images are paired against (pso_db, and offline PSO on
//! `--train-images`), as the official DreamBooth script makes them
//! (`personalization/train_pso_sdxl_turbo_dreambooth.py` l. 97–128, 1660–1686): a fixed pool of
//! `objective.reference_pool` images sampled once, before the first update, from the initial
//! model with the class prompt ("a photo of a dog"); every step draws distinct pool images for
//! its batch. The pool's latents are stored in `RUN/reference_pool.safetensors`, so a resumed
//! run pairs against the same images.

use std::collections::HashMap;
use std::path::PathBuf;

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use super::dir::RunDir;
use super::error::RunError;
use hf::tensor_file;

/// The pool's file in the run directory.
pub const FILE: &str = "reference_pool.safetensors";
const PROMPT_KEY: &str = "pso.class_prompt";

/// A fixed pool of reference latents [N, C, h, w].
#[derive(Debug)]
pub struct ReferencePool {
    latents: Tensor,
}

impl ReferencePool {
    /// The run's pool: read from `dir` when a previous invocation stored it (checked against
    /// `class_prompt` and `size`), else built with `sample(k)` (the latent [1, C, h, w] of pool
    /// image k, drawn from the initial model) and stored before training starts.
    pub fn open_or_build(
        dir: &RunDir,
        class_prompt: &str,
        size: usize,
        mut sample: impl FnMut(usize) -> Result<Tensor, RunError>,
    ) -> Result<ReferencePool, RunError> {
        let path = dir.path.join(FILE);
        if path.exists() {
            return Self::read(path, class_prompt, size);
        }
        tracing::info!(
            size,
            class_prompt,
            "sampling the reference pool from the initial model"
        );
        let latents = (0..size).map(&mut sample).collect::<Result<Vec<_>, _>>()?;
        let latents = Tensor::cat(&latents, 0);
        let metadata = HashMap::from([(PROMPT_KEY.to_owned(), class_prompt.to_owned())]);
        tensor_file::write(
            &path,
            &[("latents".to_owned(), latents.shallow_clone())],
            &metadata,
        )
        .map_err(|e| RunError::Data(e.to_string()))?;
        Ok(ReferencePool { latents })
    }

    fn read(path: PathBuf, class_prompt: &str, size: usize) -> Result<ReferencePool, RunError> {
        let file = tensor_file::read(&path).map_err(|e| RunError::Data(e.to_string()))?;
        let latents = file
            .tensors
            .into_iter()
            .find(|(name, _)| name == "latents")
            .map(|(_, t)| t);
        let stored_prompt = file.metadata.get(PROMPT_KEY).map(String::as_str);
        match latents {
            Some(latents)
                if stored_prompt == Some(class_prompt) && latents.size()[0] == size as i64 =>
            {
                Ok(ReferencePool { latents })
            }
            _ => Err(RunError::RunDir {
                path,
                why: format!(
                    "holds another reference pool than this config asks for ({size} images of \
                     {class_prompt:?}); resume with the run's own config.toml, or start a new run"
                ),
            }),
        }
    }

    /// Latents of `n` distinct pool images for one micro-batch, drawn from `seed`, on `device`.
    pub fn draw(&self, n: usize, seed: u64, device: tch::Device) -> Result<Tensor, RunError> {
        let size = self.latents.size()[0] as usize;
        if n > size {
            return Err(RunError::Config(format!(
                "a micro-batch of {n} training images needs {n} distinct reference images, but \
                 objective.reference_pool is {size}; raise it or lower learner.batch_size"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e1f);
        let rows: Vec<i64> = sample(&mut rng, size, n)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        Ok(self
            .latents
            .index_select(0, &Tensor::from_slice(&rows))
            .to_device(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn run_dir() -> (tempfile::TempDir, RunDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir {
            path: tmp.path().to_owned(),
        };
        (tmp, dir)
    }

    #[test]
    fn the_pool_is_sampled_once_and_reread_on_resume() {
        let (_tmp, dir) = run_dir();
        let mut calls = 0;
        let sample = |k: usize| -> Result<Tensor, RunError> {
            Ok(Tensor::full(
                [1, 2, 3, 3],
                k as f64,
                (Kind::Float, Device::Cpu),
            ))
        };
        let first = ReferencePool::open_or_build(&dir, "a photo of a dog", 5, |k| {
            calls += 1;
            sample(k)
        })
        .unwrap();
        assert_eq!(calls, 5);
        let again = ReferencePool::open_or_build(&dir, "a photo of a dog", 5, |_| {
            panic!("a stored pool is not sampled again")
        })
        .unwrap();
        assert!(first.latents.equal(&again.latents));
        let e = ReferencePool::open_or_build(&dir, "a photo of a cat", 5, sample)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another reference pool"), "{e}");
    }

    #[test]
    fn draws_are_distinct_seeded_and_bounded_by_the_pool() {
        let (_tmp, dir) = run_dir();
        let pool = ReferencePool::open_or_build(&dir, "p", 6, |k| {
            Ok(Tensor::full(
                [1, 1, 1, 1],
                k as f64,
                (Kind::Float, Device::Cpu),
            ))
        })
        .unwrap();
        let ids = |t: Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let a = ids(pool.draw(6, 3, Device::Cpu).unwrap());
        let mut sorted = a.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(a, ids(pool.draw(6, 3, Device::Cpu).unwrap()));
        let e = pool.draw(7, 3, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("objective.reference_pool is 6"), "{e}");
    }
}
