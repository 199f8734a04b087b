//! The judge of toy samples: a small CNN that reads shape, colour, size and background off an
//! image, trained on the procedural dataset. Caption accuracy of generated images = how often
//! it reads back what the prompt asked for.

use std::path::Path;

use image::RgbImage;
use rand::Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::shapes::{self, Attributes, COLOURS, SHAPES, SIZES};
use super::ToyError;

/// Logits per attribute, in the order of [`Attributes`]' fields.
const HEADS: [usize; 4] = [SHAPES.len(), COLOURS.len(), SIZES.len(), COLOURS.len()];

/// Images as a [B, 3, H, W] float tensor in [-1, 1], as the diffusion models see them.
pub fn pixels(images: &[RgbImage], device: Device) -> Tensor {
    let planes: Vec<Tensor> = images
        .iter()
        .map(|img| {
            let (w, h) = img.dimensions();
            Tensor::from_data_size(img.as_raw(), &[h as i64, w as i64, 3], Kind::Uint8)
        })
        .collect();
    (Tensor::stack(&planes, 0)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0)
        .to_device(device)
}

/// Four stride-2 convolutions, global average pooling, one linear layer for all heads.
#[derive(Debug)]
pub struct Classifier {
    convs: Vec<nn::Conv2D>,
    head: nn::Linear,
}

impl Classifier {
    /// Lays out the parameters under `p`.
    pub fn new(p: nn::Path) -> Classifier {
        let widths = [3, 32, 64, 64, 128];
        let convs = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let cfg = nn::ConvConfig {
                    stride: if i == 0 { 1 } else { 2 },
                    padding: 1,
                    ..Default::default()
                };
                nn::conv2d(&p / format!("conv{i}"), w[0], w[1], 3, cfg)
            })
            .collect();
        let head = nn::linear(
            &p / "head",
            128,
            HEADS.iter().sum::<usize>() as i64,
            Default::default(),
        );
        Classifier { convs, head }
    }

    /// Logits [B, 17] of images in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> Tensor {
        let h = self
            .convs
            .iter()
            .fold(images.shallow_clone(), |h, c| c.forward(&h).silu());
        self.head
            .forward(&h.mean_dim([2i64, 3].as_slice(), false, Kind::Float))
    }

    /// Per-head logits.
    fn heads(&self, images: &Tensor) -> Vec<Tensor> {
        let sizes: Vec<i64> = HEADS.iter().map(|&n| n as i64).collect();
        self.forward(images).split_with_sizes(sizes.as_slice(), 1)
    }

    /// What the classifier reads off each image.
    pub fn predict(&self, images: &[RgbImage]) -> Vec<Attributes> {
        let _no_grad = tch::no_grad_guard();
        let device = self.head.ws.device();
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(256) {
            let argmax: Vec<Vec<i64>> = self
                .heads(&pixels(chunk, device))
                .iter()
                .map(|l| Vec::<i64>::try_from(&l.argmax(1, false).to_device(Device::Cpu)).unwrap())
                .collect();
            out.extend((0..chunk.len()).map(|i| Attributes {
                shape: argmax[0][i] as usize,
                colour: argmax[1][i] as usize,
                size: argmax[2][i] as usize,
                background: argmax[3][i] as usize,
            }));
        }
        out
    }

    /// Summed cross-entropy of the four heads against `truth`.
    fn loss(&self, images: &Tensor, truth: &[Attributes]) -> Tensor {
        let fields: [fn(&Attributes) -> usize; 4] =
            [|a| a.shape, |a| a.colour, |a| a.size, |a| a.background];
        self.heads(images)
            .iter()
            .zip(fields)
            .map(|(logits, field)| {
                let labels: Vec<i64> = truth.iter().map(|a| field(a) as i64).collect();
                let labels = Tensor::from_slice(&labels).to_device(logits.device());
                logits.cross_entropy_for_logits(&labels)
            })
            .fold(Tensor::zeros([], (Kind::Float, images.device())), |a, b| {
                a + b
            })
    }

    /// Trains a classifier on fresh dataset images (`steps` batches of `batch`).
    pub fn train(
        rng: &mut impl Rng,
        side: u32,
        steps: usize,
        batch: usize,
        device: Device,
        mut progress: impl FnMut(usize, f64),
    ) -> Result<(nn::VarStore, Classifier), ToyError> {
        let vs = nn::VarStore::new(device);
        let model = Classifier::new(vs.root());
        let mut opt = nn::AdamW::default().build(&vs, 2e-3)?;
        for step in 0..steps {
            let examples: Vec<_> = (0..batch).map(|_| shapes::example(rng, side)).collect();
            let images: Vec<RgbImage> = examples.iter().map(|e| e.image.clone()).collect();
            let truth: Vec<Attributes> = examples.iter().map(|e| e.attributes).collect();
            let loss = model.loss(&pixels(&images, device), &truth);
            opt.backward_step(&loss);
            progress(step, loss.double_value(&[]));
        }
        Ok((vs, model))
    }

    /// Loads `classifier.safetensors`.
    pub fn load(path: &Path, device: Device) -> Result<(nn::VarStore, Classifier), ToyError> {
        let mut vs = nn::VarStore::new(device);
        let model = Classifier::new(vs.root());
        vs.load(path).map_err(|e| ToyError::Load {
            path: path.to_owned(),
            why: format!("{e}; rebuild it with `pso toy build`"),
        })?;
        // Stored in f16 to keep data/toy small; computed in f32.
        vs.float();
        Ok((vs, model))
    }
}

/// How often a reading matches the caption, per attribute and all four at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Accuracy {
    /// Shape right.
    pub shape: f64,
    /// Shape colour right.
    pub colour: f64,
    /// Size right.
    pub size: f64,
    /// Background colour right.
    pub background: f64,
    /// Everything right.
    pub caption: f64,
}

impl Accuracy {
    /// Compares readings with the captions' attributes (same order).
    pub fn of(read: &[Attributes], truth: &[Attributes]) -> Accuracy {
        assert_eq!(read.len(), truth.len(), "one reading per caption");
        let n = truth.len().max(1) as f64;
        let rate = |f: &dyn Fn(&Attributes, &Attributes) -> bool| {
            read.iter().zip(truth).filter(|(r, t)| f(r, t)).count() as f64 / n
        };
        Accuracy {
            shape: rate(&|r, t| r.shape == t.shape),
            colour: rate(&|r, t| r.colour == t.colour),
            size: rate(&|r, t| r.size == t.size),
            background: rate(&|r, t| r.background == t.background),
            caption: rate(&|r, t| r == t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn learns_the_dataset_quickly_and_round_trips_through_a_file() {
        tch::manual_seed(0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (vs, model) = Classifier::train(&mut rng, 32, 250, 32, Device::Cpu, |_, _| ()).unwrap();
        let held_out: Vec<_> = (0..200).map(|_| shapes::example(&mut rng, 32)).collect();
        let images: Vec<RgbImage> = held_out.iter().map(|e| e.image.clone()).collect();
        let truth: Vec<Attributes> = held_out.iter().map(|e| e.attributes).collect();
        let read = model.predict(&images);
        let accuracy = Accuracy::of(&read, &truth);
        // Chance is 1/3, 1/6, 1/2, 1/6; colours are the easy part.
        assert!(
            accuracy.colour > 0.9 && accuracy.background > 0.9,
            "{accuracy:?}"
        );
        assert!(accuracy.shape > 0.4 && accuracy.size > 0.8, "{accuracy:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("classifier.safetensors");
        vs.save(&path).unwrap();
        let (_, again) = Classifier::load(&path, Device::Cpu).unwrap();
        assert_eq!(again.predict(&images), read);
        let e = Classifier::load(&dir.path().join("missing"), Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("pso toy build"), "{e}");
    }

    #[test]
    fn accuracy_counts_each_attribute_and_the_whole_caption() {
        let t = Attributes {
            shape: 0,
            colour: 0,
            size: 0,
            background: 1,
        };
        let wrong_shape = Attributes { shape: 1, ..t };
        let a = Accuracy::of(&[t, wrong_shape], &[t, t]);
        assert_eq!((a.shape, a.colour, a.caption), (0.5, 1.0, 0.5));
    }
}
