//! Text-to-image generation as diffusers' `FluxPipeline` runs it (FLUX.1-schnell, and dev with
//! its embedded guidance): the CLIP-L pooled output and the T5 tokens as conditioning, the
//! packed 16-channel latent stepped by the FLUX transformer with the flow-matching Euler
//! scheduler over sigmas linspace(1, 1/n, n) (shifted by the image-size-dependent `mu` when the
//! config says so), then unpacked and decoded as `latents / scaling_factor + shift_factor`.

use std::path::Path;

use hf::t5::{T5EncoderModel, T5Tokenizer};
use tch::{nn, Device, Kind, Tensor};

use super::flux_latents::{image_ids, pack, text_ids, unpack};
use super::prompt::TextEncoder;
use super::{check_latents, flow_match_config, PipelineError};
use crate::models::flux::FluxTransformer2DModel;
use crate::models::vae::AutoencoderKL;
use crate::sampling::{FlowMatchConfig, FlowMatchEuler, FlowSchedule};

/// What a generation needs besides the prompts.
#[derive(Debug)]
pub struct FluxRequest<'a> {
    /// Denoising steps (schnell: 1–4).
    pub steps: usize,
    /// The embedded guidance scale of a guidance-distilled model (dev: 3.5); ignored by schnell.
    pub guidance: f64,
    /// Initial latents [B, 16, H/8, W/8], standard normal (packed here, as diffusers packs its
    /// own).
    pub latents: &'a Tensor,
}

/// A FLUX folder loaded for generation.
pub struct FluxPipeline {
    /// The transformer.
    pub transformer: FluxTransformer2DModel,
    /// The 16-channel VAE.
    pub vae: AutoencoderKL,
    clip: TextEncoder,
    t5_tokenizer: T5Tokenizer,
    t5: T5EncoderModel,
    scheduler: FlowMatchConfig,
    device: Device,
    kind: Kind,
    _vars: Vec<nn::VarStore>,
}

impl FluxPipeline {
    /// Loads `root` (transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L),
    /// text_encoder_2/ + tokenizer_2/ (T5), scheduler/) in `kind` on `device`; prompts get
    /// `max_sequence_length` T5 tokens (schnell 256, dev 512).
    pub fn load(
        root: &Path,
        max_sequence_length: usize,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<FluxPipeline, PipelineError> {
        let (transformer_vs, transformer) =
            FluxTransformer2DModel::load(&root.join("transformer"), device, kind, variant)?;
        let (vae_vs, vae) = AutoencoderKL::load(&root.join("vae"), device, kind, variant)?;
        let clip = TextEncoder::load(root, "tokenizer", "text_encoder", device, kind, variant)?;
        let t5_tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer_2"), max_sequence_length)?;
        let (t5_vs, t5) = T5EncoderModel::load(&root.join("text_encoder_2"), device, kind)
            .map_err(hf::HfError::from)?;
        let scheduler = flow_match_config(root)?;
        Ok(FluxPipeline {
            transformer,
            vae,
            clip,
            t5_tokenizer,
            t5,
            scheduler,
            device,
            kind,
            _vars: vec![transformer_vs, vae_vs, t5_vs],
        })
    }

    /// The scheduler of a `steps`-step run over `tokens` packed image tokens: the FLUX
    /// pipelines' sigmas linspace(1, 1/n, n) and `mu` of the token count.
    pub fn scheduler(&self, steps: usize, tokens: i64) -> Result<FlowMatchEuler, PipelineError> {
        if steps == 0 {
            return Err(PipelineError::Request("0 steps; use at least 1".into()));
        }
        let n = steps as f64;
        // numpy's linspace(1, 1/n, n): i·step + 1, the last value exactly 1/n.
        let sigmas = (0..steps)
            .map(|i| {
                if i + 1 == steps {
                    1.0 / n
                } else {
                    i as f64 * ((1.0 / n - 1.0) / (n - 1.0)) + 1.0
                }
            })
            .collect();
        let mu = self.scheduler.mu(tokens as u64);
        Ok(FlowMatchEuler::new(
            self.scheduler.clone(),
            FlowSchedule::Sigmas(sigmas),
            Some(mu),
        )?)
    }

    /// The shape of `n` initial latents for a `height` × `width` image.
    pub fn latent_shape(&self, n: i64, height: i64, width: i64) -> [i64; 4] {
        let f = self.vae.scale_factor();
        [
            n,
            self.transformer.config().in_channels / 4,
            height / f,
            width / f,
        ]
    }

    /// Generates one image per prompt: [B, 3, H, W] in [-1, 1], fp32.
    pub fn generate(
        &self,
        prompts: &[&str],
        request: &FluxRequest,
    ) -> Result<Tensor, PipelineError> {
        check_latents(request.latents, prompts)?;
        let size = request.latents.size();
        let _guard = tch::no_grad_guard();
        let (b, height, width) = (size[0], size[2], size[3]);
        // 1. Prompts: CLIP-L's pooled output and T5's tokens.
        let pooled = self
            .clip
            .encode(prompts, self.device)?
            .pooled_output
            .to_kind(self.kind);
        let ids = self.t5_tokenizer.encode(prompts, self.device)?;
        let context = self.t5.forward(&ids).to_kind(self.kind);
        // 2. Packed latents and the position ids of both sequences.
        let mut latents = pack(&request.latents.to_device(self.device).to_kind(Kind::Float))
            .map_err(PipelineError::Request)?;
        let img_ids = image_ids(height / 2, width / 2, self.device);
        let txt_ids = text_ids(context.size()[1], self.device);
        let guidance = self
            .transformer
            .config()
            .guidance_embeds
            .then(|| Tensor::full([b], request.guidance, (Kind::Float, self.device)));
        // 3. The Euler loop; the transformer takes σ (diffusers passes t / 1000).
        let scheduler = self.scheduler(request.steps, latents.size()[1])?;
        for i in 0..scheduler.num_steps() {
            let t = Tensor::full(
                [b],
                scheduler.timesteps[i] as f32 as f64,
                (Kind::Float, self.device),
            ) / 1000.0;
            let velocity = self
                .transformer
                .forward(
                    &latents.to_kind(self.kind),
                    &context,
                    &pooled,
                    &t,
                    &img_ids,
                    &txt_ids,
                    guidance.as_ref(),
                )
                .map_err(PipelineError::Request)?
                .to_kind(Kind::Float);
            latents = scheduler.step(i, &latents, &velocity)?;
        }
        // 4. Unpack and decode.
        let latents = unpack(&latents, height, width).map_err(PipelineError::Request)?;
        Ok(self
            .vae
            .decode_scaled(&latents.to_kind(self.kind))
            .to_kind(Kind::Float))
    }
}
