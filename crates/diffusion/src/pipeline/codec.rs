//! The VAE between 8-bit images and scaled latents.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::PipelineError;
use crate::models::vae::AutoencoderKL;

/// A pipeline's VAE between 8-bit images and scaled latents.
pub struct ImageCodec {
    model: AutoencoderKL,
    vs: nn::VarStore,
    kind: Kind,
}

impl std::fmt::Debug for ImageCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCodec")
            .field("kind", &self.kind)
            .finish()
    }
}

impl ImageCodec {
    /// Loads a `vae/` folder in `kind`, or in f32 where its config sets `force_upcast`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<ImageCodec, PipelineError> {
        let config: crate::models::vae::AutoencoderKLConfig = hf::load::read_config(dir)?;
        // The model card of some VAEs (SDXL's) says they overflow in half precision.
        let kind = if config.force_upcast {
            Kind::Float
        } else {
            kind
        };
        let (vs, model) = AutoencoderKL::load(dir, device, kind, variant)?;
        Ok(ImageCodec { model, vs, kind })
    }

    /// Pixels per latent pixel: 2^(VAE resolutions − 1).
    pub fn scale_factor(&self) -> i64 {
        self.model.scale_factor()
    }

    /// Encodes [N, H, W, 3] uint8 images to the posterior mean, scaled as the pipelines scale
    /// latents, fp32.
    pub fn encode(&self, images: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let device = self.model_device();
        let x = images
            .to_device(device)
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 127.5
            - 1.0;
        let posterior = self.model.encode(&x.to_kind(self.kind));
        self.model
            .scale_latents(&posterior.mean)
            .to_kind(Kind::Float)
    }

    /// Decodes scaled latents to [N, H, W, 3] uint8 images on the CPU, as the pipelines'
    /// `output_type="pil"` does.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        super::images::pil_uint8(&self.decode_raw(latents))
    }

    /// Decodes scaled latents to the VAE's output [N, 3, H, W] (about [−1, 1]) before the
    /// pipelines' post-processing, in the VAE's dtype.
    pub fn decode_raw(&self, latents: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        self.model
            .decode_scaled(&latents.to_device(self.model_device()).to_kind(self.kind))
    }

    fn model_device(&self) -> Device {
        self.vs.device()
    }
}
