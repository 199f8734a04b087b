//! Training the toy model's three parts from scratch: the autoencoder on images, then the text
//! encoder and the teacher UNet together on the autoencoder's latents (ε-prediction, uniform
//! timesteps, captions dropped 10 % of the time so that classifier-free guidance works).

use hf::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use image::RgbImage;
use rand::Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::classifier::pixels;
use super::shapes;
use super::ToyError;
use diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion::models::vae::{AutoencoderKL, AutoencoderKLConfig};

/// Reports training progress: stage, step, steps in the stage, loss.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize, f64);

/// Linear warm-up over the first `warmup` steps, then constant.
fn lr_at(step: usize, peak: f64, warmup: usize) -> f64 {
    peak * ((step + 1) as f64 / warmup as f64).min(1.0)
}

/// Trains the autoencoder on fresh dataset images: L1 + MSE reconstruction of a posterior
/// sample plus a small KL term (as SD's VAE, without the adversarial and perceptual losses,
/// which flat-coloured shapes do not need).
pub fn autoencoder(
    config: &AutoencoderKLConfig,
    rng: &mut impl Rng,
    side: u32,
    steps: usize,
    batch: usize,
    device: Device,
    progress: Progress,
) -> Result<(nn::VarStore, AutoencoderKL), ToyError> {
    let vs = nn::VarStore::new(device);
    let vae = AutoencoderKL::new(vs.root(), config);
    let mut opt = nn::AdamW::default().build(&vs, 1e-3)?;
    for step in 0..steps {
        opt.set_lr(lr_at(step, 1e-3, 100));
        let images: Vec<RgbImage> = (0..batch)
            .map(|_| shapes::example(rng, side).image)
            .collect();
        let x = pixels(&images, device);
        let posterior = vae.encode(&x);
        let z = posterior.sample_with(&posterior.mean.randn_like());
        let y = vae.decode(&z);
        let rec = (&y - &x).abs().mean(Kind::Float) + (&y - &x).square().mean(Kind::Float);
        let kl = 0.5
            * (posterior.mean.square() + posterior.logvar.exp() - 1.0 - &posterior.logvar)
                .mean(Kind::Float);
        let loss = rec + kl * 1e-4;
        opt.backward_step_clip_norm(&loss, 1.0);
        progress("autoencoder", step, steps, loss.double_value(&[]));
    }
    Ok((vs, vae))
}

/// A pool of training examples encoded once: scaled latents and captions.
pub struct LatentPool {
    /// Scaled posterior means, [N, C, h, w].
    pub latents: Tensor,
    /// Captions, one per latent.
    pub captions: Vec<String>,
}

impl LatentPool {
    /// Encodes `size` fresh examples; the scaling factor makes the latents unit-variance, as
    /// SD's 0.18215 does for its VAE.
    pub fn encode(
        vae: &AutoencoderKL,
        rng: &mut impl Rng,
        side: u32,
        size: usize,
        device: Device,
    ) -> (LatentPool, f64) {
        let _no_grad = tch::no_grad_guard();
        let mut means = Vec::new();
        let mut captions = Vec::with_capacity(size);
        for start in (0..size).step_by(256) {
            let n = 256.min(size - start);
            let examples: Vec<_> = (0..n).map(|_| shapes::example(rng, side)).collect();
            captions.extend(examples.iter().map(|e| e.attributes.caption()));
            let images: Vec<RgbImage> = examples.into_iter().map(|e| e.image).collect();
            means.push(vae.encode(&pixels(&images, device)).mean);
        }
        let latents = Tensor::cat(&means, 0);
        let scale = 1.0 / latents.std(true).double_value(&[]);
        (
            LatentPool {
                latents: latents * scale,
                captions,
            },
            scale,
        )
    }

    /// A random batch of latents and captions; each caption is replaced by "" with
    /// probability `drop` (the unconditional half of classifier-free guidance).
    pub fn batch(&self, rng: &mut impl Rng, size: usize, drop: f64) -> (Tensor, Vec<String>) {
        let n = self.captions.len();
        let index: Vec<i64> = (0..size).map(|_| rng.random_range(0..n) as i64).collect();
        let captions = index
            .iter()
            .map(|&i| {
                if rng.random_bool(drop) {
                    String::new()
                } else {
                    self.captions[i as usize].clone()
                }
            })
            .collect();
        let index = Tensor::from_slice(&index).to_device(self.latents.device());
        (self.latents.index_select(0, &index), captions)
    }
}

/// The text encoder and the UNet, under one variable store (one optimizer trains both).
pub struct Denoiser {
    /// Both models' parameters: `text_encoder.*` and `unet.*`.
    pub vs: nn::VarStore,
    /// The CLIP text encoder.
    pub text: ClipTextModel,
    /// The UNet.
    pub unet: UNet2DConditionModel,
    /// The tokenizer of the text encoder.
    pub tokenizer: ClipTokenizer,
}

impl Denoiser {
    /// Fresh models.
    pub fn new(
        text: &ClipTextConfig,
        unet: &UNet2DConditionConfig,
        tokenizer: ClipTokenizer,
        device: Device,
    ) -> Denoiser {
        let vs = nn::VarStore::new(device);
        Denoiser {
            text: ClipTextModel::new(vs.root() / "text_encoder", text, None),
            unet: UNet2DConditionModel::new(vs.root() / "unet", unet),
            vs,
            tokenizer,
        }
    }

    /// The text encoder's last hidden state for each caption.
    pub fn embed(&self, captions: &[String]) -> Result<Tensor, ToyError> {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let ids = self
            .tokenizer
            .encode_batch(&refs, self.vs.device())?
            .input_ids;
        Ok(self.text.forward(&ids, None).last_hidden_state)
    }

    /// The tensors of one part (`text_encoder` or `unet`), named as in its diffusers file.
    pub fn part(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let prefix = format!("{prefix}.");
        self.vs
            .variables()
            .into_iter()
            .filter_map(|(name, t)| name.strip_prefix(&prefix).map(|n| (n.to_owned(), t)))
            .collect()
    }
}

/// x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε for per-row timesteps.
pub fn noised(x0: &Tensor, noise: &Tensor, alphas_cumprod: &Tensor, t: &Tensor) -> Tensor {
    let a = alphas_cumprod.index_select(0, t).view([-1, 1, 1, 1]);
    &a.sqrt() * x0 + (-&a + 1.0).sqrt() * noise
}

/// Trains text encoder and UNet together on the pool: ε-prediction MSE at uniform timesteps.
pub fn teacher(
    model: &Denoiser,
    pool: &LatentPool,
    alphas_cumprod: &Tensor,
    rng: &mut impl Rng,
    steps: usize,
    batch: usize,
    progress: Progress,
) -> Result<(), ToyError> {
    let device = model.vs.device();
    let mut opt = nn::AdamW::default().build(&model.vs, 5e-4)?;
    let train_steps = alphas_cumprod.size()[0];
    for step in 0..steps {
        opt.set_lr(lr_at(step, 5e-4, 200));
        let (x0, captions) = pool.batch(rng, batch, 0.1);
        let emb = model.embed(&captions)?;
        let t: Vec<i64> = (0..batch)
            .map(|_| rng.random_range(0..train_steps))
            .collect();
        let t = Tensor::from_slice(&t).to_device(device);
        let noise = x0.randn_like();
        let x = noised(&x0, &noise, alphas_cumprod, &t);
        let pred = model
            .unet
            .forward(&x, &t.to_kind(Kind::Float), &emb, None, None);
        let loss = (pred - noise).square().mean(Kind::Float);
        opt.backward_step_clip_norm(&loss, 1.0);
        progress("teacher", step, steps, loss.double_value(&[]));
    }
    Ok(())
}
