//! Text-to-image generation as diffusers' `StableDiffusion3Pipeline` runs it (SD3, SD3.5 and
//! SD3.5-Large-Turbo folders): prompts encoded by CLIP-L + CLIP-G + T5, the MMDiT stepping a
//! 16-channel latent with the flow-matching Euler scheduler (classifier-free guidance with an
//! empty negative prompt when the scale exceeds 1), and the VAE decoding
//! `latents / scaling_factor + shift_factor`.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::sd3_prompt::Sd3TextEncoders;
use super::{check_latents, flow_match_config, PipelineError};
use crate::models::sd3::SD3Transformer2DModel;
use crate::models::vae::AutoencoderKL;
use crate::sampling::{FlowMatchConfig, FlowMatchEuler, FlowSchedule};

/// What a generation needs besides the prompts.
#[derive(Debug)]
pub struct Sd3Request<'a> {
    /// Denoising steps (SD3.5-Large-Turbo: 4).
    pub steps: usize,
    /// Classifier-free guidance scale; at most 1 means none (the Turbo model's 0).
    pub guidance: f64,
    /// Initial latents [B, 16, H/8, W/8], standard normal (diffusers' `latents=`).
    pub latents: &'a Tensor,
}

/// An SD3 / SD3.5 folder loaded for generation.
pub struct Sd3Pipeline {
    /// The MMDiT.
    pub transformer: SD3Transformer2DModel,
    /// The 16-channel VAE.
    pub vae: AutoencoderKL,
    text: Sd3TextEncoders,
    scheduler: FlowMatchConfig,
    device: Device,
    /// The weights' precision (inputs are cast to it, the scheduler steps in fp32).
    kind: Kind,
    _vars: Vec<nn::VarStore>,
}

impl Sd3Pipeline {
    /// Loads `root` (transformer/, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, scheduler/)
    /// in `kind` on `device`; prompts get `max_sequence_length` T5 tokens.
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<Sd3Pipeline, PipelineError> {
        let (transformer_vs, transformer) =
            SD3Transformer2DModel::load(&root.join("transformer"), device, kind, variant)?;
        let (vae_vs, vae) = AutoencoderKL::load(&root.join("vae"), device, kind, variant)?;
        let text = Sd3TextEncoders::load(
            root,
            max_sequence_length,
            transformer.config().joint_attention_dim,
            device,
            kind,
            variant,
        )?;
        let scheduler = flow_match_config(root)?;
        Ok(Sd3Pipeline {
            transformer,
            vae,
            text,
            scheduler,
            device,
            kind,
            _vars: vec![transformer_vs, vae_vs],
        })
    }

    /// The scheduler of a `steps`-step run on a `height` × `width` latent (the image-size
    /// dependent `mu` when the config shifts dynamically).
    pub fn scheduler(
        &self,
        steps: usize,
        height: i64,
        width: i64,
    ) -> Result<FlowMatchEuler, PipelineError> {
        let p = self.transformer.config().patch_size;
        let mu = self
            .scheduler
            .use_dynamic_shifting
            .then(|| self.scheduler.mu(((height / p) * (width / p)) as u64));
        Ok(FlowMatchEuler::new(
            self.scheduler.clone(),
            FlowSchedule::Steps(steps),
            mu,
        )?)
    }

    /// The shape of `n` initial latents for a `height` × `width` image.
    pub fn latent_shape(&self, n: i64, height: i64, width: i64) -> [i64; 4] {
        let f = self.vae.scale_factor();
        [
            n,
            self.transformer.config().in_channels,
            height / f,
            width / f,
        ]
    }

    /// Generates one image per prompt: [B, 3, H, W] in [-1, 1] (before diffusers'
    /// post-processing), fp32.
    pub fn generate(
        &self,
        prompts: &[&str],
        request: &Sd3Request,
    ) -> Result<Tensor, PipelineError> {
        check_latents(request.latents, prompts)?;
        let size = request.latents.size();
        let _guard = tch::no_grad_guard();
        let kind = self.kind;
        let guided = request.guidance > 1.0;
        // 1. Prompts (and the empty negative prompt under guidance).
        let encode = |prompts: &[&str]| -> Result<(Tensor, Tensor), PipelineError> {
            let text = self.text.encode(prompts, self.device)?;
            let pooled = text.pooled.ok_or_else(|| {
                PipelineError::Request("SD3's text encoders returned no pooled embedding".into())
            })?;
            Ok((text.embeds, pooled))
        };
        let (embeds, pooled) = encode(prompts)?;
        let (context, pooled) = if guided {
            let (negative, negative_pooled) = encode(&vec![""; prompts.len()])?;
            (
                Tensor::cat(&[negative, embeds], 0),
                Tensor::cat(&[negative_pooled, pooled], 0),
            )
        } else {
            (embeds, pooled)
        };
        let (context, pooled) = (context.to_kind(kind), pooled.to_kind(kind));
        // 2. The schedule and the Euler loop.
        let scheduler = self.scheduler(request.steps, size[2], size[3])?;
        let mut latents = request.latents.to_device(self.device).to_kind(Kind::Float);
        for i in 0..scheduler.num_steps() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let t = Tensor::full(
                [input.size()[0]],
                scheduler.timesteps[i],
                (Kind::Float, self.device),
            );
            let velocity = self
                .transformer
                .forward(&input.to_kind(kind), &context, &pooled, &t)
                .map_err(PipelineError::Request)?
                .to_kind(Kind::Float);
            let velocity = if guided {
                let halves = velocity.chunk(2, 0);
                &halves[0] + (&halves[1] - &halves[0]) * request.guidance
            } else {
                velocity
            };
            latents = scheduler.step(i, &latents, &velocity)?;
        }
        // 3. Decode.
        Ok(self
            .vae
            .decode_scaled(&latents.to_kind(kind))
            .to_kind(Kind::Float))
    }
}
