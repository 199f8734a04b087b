//! Text-to-image pipelines as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionXLPipeline` run them: a diffusers folder loaded into the models of
//! [`crate::models`], prompt encoding, classifier-free guidance (or LCM's guidance embedding), the
//! few-step sampler of [`crate::sampling`], and VAE decoding to 8-bit images. The same
//! [`Pipeline`] loads diffusers' class-conditional `DiTPipeline` ([`dit`]): its "prompts" are class
//! ids or names; and the flow-matching `StableDiffusion3Pipeline`, `FluxPipeline` and
//! `ZImagePipeline` folders ([`flow`]). Everything downstream drives any of them through [`Backbone`].

mod codec;
mod conditioning;
pub mod dit;
pub mod flow;
pub mod flux_latents;
pub mod flux_prompt;
pub mod images;
mod load;
pub mod prompt;
pub mod prompt_cache;
pub mod sd3_prompt;
pub mod z_image_prompt;

pub use codec::ImageCodec;
pub use conditioning::Conditioning;
pub use load::{backbone_folder, load_backbone, LoadOptions};

use std::path::PathBuf;

use hf::load::LoadError;
use hf::HfError;
use tch::{nn, Device, Kind, Tensor};

use crate::models::backbone::{Backbone, Condition};
use crate::models::unet::{AddedCond, PerBlock};
use crate::sampling::{
    sample, InitialLatents, NoiseSource, SamplingError, Scheduler, SchedulerConfig, Timesteps,
    Trajectory,
};
use conditioning::Conditioner;
use prompt::PromptEmbeds;
use prompt_cache::PromptCache;

/// Errors of a pipeline; each names the folder, file or argument involved.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A component could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A tokenizer, a text encoder or a hub id failed.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// The scheduler config or schedule is unusable.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The folder is not a pipeline this crate runs.
    #[error("{path}: {why}")]
    Folder {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A generation request is inconsistent.
    #[error("{0}")]
    Request(String),
}

/// A loaded pipeline: text-to-image (SD, SDXL, SD3, FLUX, Z-Image) or class-conditional (DiT).
pub struct Pipeline {
    /// The denoiser.
    pub backbone: Backbone,
    /// The denoiser's parameters (what PEFT adapts).
    pub backbone_vs: nn::VarStore,
    /// The autoencoder.
    pub vae: ImageCodec,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: SchedulerConfig,
    conditioner: Conditioner,
    device: Device,
    /// Where the text encoders run.
    text_device: Device,
    prompt_cache: PromptCache,
    kind: Kind,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("backbone", &self.backbone.folder())
            .field("device", &self.device)
            .field("kind", &self.kind)
            .finish()
    }
}

/// What to generate.
#[derive(Debug)]
pub struct GenerateRequest<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// Negative prompt (used only with guidance).
    pub negative_prompt: Option<&'a str>,
    /// Steps, or an explicit timestep list.
    pub timesteps: Timesteps,
    /// Guidance scale; ≤ 1 means none (Z-Image: `ZImagePipeline`'s scale, > 0 guides).
    pub guidance: f64,
    /// Image height in pixels.
    pub height: i64,
    /// Image width in pixels.
    pub width: i64,
    /// Images to generate.
    pub num_images: i64,
    /// Initial latents, as diffusers' `latents=` ([N, C, H/f, W/f]); drawn from the noise source
    /// when absent.
    pub init_latents: Option<Tensor>,
    /// Record the trajectory (for PSO).
    pub record: bool,
}

/// What a generation returns.
#[derive(Debug)]
pub struct Generated {
    /// Images, [N, H, W, 3] uint8 on the CPU.
    pub images: Tensor,
    /// Final latents x0.
    pub latents: Tensor,
    /// The trajectory, when recorded.
    pub trajectory: Option<Trajectory>,
}

/// LCM's `get_guidance_scale_embedding` of `w` ([N]) into `dim` channels.
fn guidance_embedding(w: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let scale = 10000f64.ln() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Float, w.device())) * -scale).exp();
    let args = (w.to_kind(Kind::Float) * 1000.0).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.sin(), args.cos()], 1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

impl Pipeline {
    /// Pixels per latent pixel: 2^(VAE resolutions − 1).
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.scale_factor()
    }

    /// The image size the backbone was trained at (height, width).
    pub fn default_size(&self) -> (i64, i64) {
        let f = self.vae_scale_factor();
        match &self.backbone {
            Backbone::DiT(d) => (d.config.sample_size * f, d.config.sample_size * f),
            Backbone::UNet(u) => match &u.config.sample_size {
                Some(PerBlock::Many(hw)) if hw.len() == 2 => (hw[0] * f, hw[1] * f),
                Some(PerBlock::One(s)) => (s * f, s * f),
                _ => (64 * f, 64 * f),
            },
            Backbone::SD3(m) => {
                let side = m.config().sample_size * f;
                (side, side)
            }
            // FluxPipeline's default_sample_size; ZImagePipeline's 1024 pixels.
            Backbone::Flux(_) => (128 * f, 128 * f),
            Backbone::ZImage(_) => (1024, 1024),
        }
    }

    /// A scheduler for `timesteps` from the pipeline's scheduler config, for `height` ×
    /// `width` images (the flow models' sigma shift may depend on the size).
    pub fn scheduler(
        &self,
        timesteps: Timesteps,
        height: i64,
        width: i64,
    ) -> Result<Scheduler, SamplingError> {
        let kind = self.scheduler_config.kind;
        if kind.is_flow() != self.backbone.is_flow() {
            return Err(SamplingError::Config {
                key: "sampler.name",
                why: if self.backbone.is_flow() {
                    format!(
                        "is {kind}, but this is a flow-matching model: use flow_match_euler \
                         (and pick its kernel with sampler.flow_kernel)"
                    )
                } else {
                    "is flow_match_euler, which only flow-matching models (SD3, FLUX, Z-Image) sample \
                     with; use the folder's own scheduler or euler_ancestral, lcm, ddim"
                        .into()
                },
            });
        }
        if kind.is_flow() {
            return self.flow_scheduler(timesteps, height, width);
        }
        Scheduler::new(self.scheduler_config.clone(), timesteps)
    }

    /// Whether prompts are class ids or names (a DiT pipeline).
    pub fn is_class_conditional(&self) -> bool {
        matches!(self.conditioner, Conditioner::Classes(_))
    }

    /// Encodes `prompt` for `num_images` images, with guidance when `guidance > 1` (and the UNet
    /// has no LCM guidance embedding, which takes the scale instead; Z-Image guides when
    /// `guidance > 0`, as `ZImagePipeline` does). For a DiT pipeline the prompt is a class id or
    /// `id2label` name, and there is no negative prompt.
    pub fn condition(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        guidance: f64,
        height: i64,
        width: i64,
        num_images: i64,
    ) -> Result<Conditioning, PipelineError> {
        if self.backbone.is_flow() {
            return self.condition_joint(prompt, negative_prompt, guidance, num_images);
        }
        let _no_grad = tch::no_grad_guard();
        let (force_zeros_for_empty_prompt, unet) = match (&self.conditioner, &self.backbone) {
            (
                Conditioner::Text {
                    force_zeros_for_empty_prompt,
                    ..
                },
                Backbone::UNet(unet),
            ) => (*force_zeros_for_empty_prompt, unet),
            (Conditioner::Classes(names), _) => {
                if negative_prompt.is_some() {
                    return Err(PipelineError::Request(
                        "a class-conditional DiT has no negative prompt; guidance is \
                             against the null class"
                            .into(),
                    ));
                }
                let id = names.class_id(prompt)?;
                let ids = vec![id; num_images as usize];
                let cfg = (guidance > 1.0).then_some(guidance);
                return Ok(Conditioning {
                    inputs: Condition::Classes(names.model_labels(
                        &ids,
                        cfg.is_some(),
                        self.device,
                    )),
                    cfg,
                });
            }
            _ => unreachable!("SD / SDXL text pipelines load a UNet"),
        };
        let lcm_dim = unet.config.time_cond_proj_dim;
        let cfg = (guidance > 1.0 && lcm_dim.is_none()).then_some(guidance);
        let positive = self.encode_prompt(prompt)?;
        let repeat = |t: &Tensor| {
            let mut reps = vec![1i64; t.dim()];
            reps[0] = num_images;
            t.repeat(reps.as_slice())
        };
        let mut embeds = repeat(&positive.embeds);
        let mut pooled = positive.pooled.as_ref().map(repeat);
        if cfg.is_some() {
            let zero = negative_prompt.is_none() && force_zeros_for_empty_prompt;
            let (neg_embeds, neg_pooled) = if zero {
                (
                    positive.embeds.zeros_like(),
                    positive.pooled.as_ref().map(Tensor::zeros_like),
                )
            } else {
                let n = self.encode_prompt(negative_prompt.unwrap_or(""))?;
                (n.embeds, n.pooled)
            };
            embeds = Tensor::cat(&[repeat(&neg_embeds), embeds], 0);
            pooled = match (neg_pooled, pooled) {
                (Some(n), Some(p)) => Some(Tensor::cat(&[repeat(&n), p], 0)),
                _ => None,
            };
        }
        let rows = embeds.size()[0];
        let added = pooled.map(|text_embeds| {
            let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
            AddedCond {
                time_ids: Tensor::from_slice(&ids)
                    .to_device(self.device)
                    .to_kind(self.kind)
                    .unsqueeze(0)
                    .repeat([rows, 1]),
                text_embeds,
            }
        });
        let timestep_cond = lcm_dim.map(|dim| {
            let w = Tensor::full([num_images], guidance - 1.0, (Kind::Float, self.device));
            guidance_embedding(&w, dim).to_kind(self.kind)
        });
        Ok(Conditioning {
            inputs: Condition::Text {
                embeds: embeds.to_kind(self.kind),
                added,
                timestep_cond,
            },
            cfg,
        })
    }

    /// What the loaded folder lacks that changes its images, for the caller to log.
    pub fn warnings(&self) -> Vec<String> {
        match &self.conditioner {
            Conditioner::Sd3(encoders) if !encoders.has_t5() => vec![
                "this SD3 folder has no text_encoder_3/ (T5): prompts condition on the two CLIPs \
                 and zeros in T5's place, as diffusers does without it; add T5 for the model's \
                 full prompt following"
                    .into(),
            ],
            _ => Vec::new(),
        }
    }

    /// The device the models run on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// One prompt's text embeddings on the models' device, encoded on the text encoders'
    /// device, or from the prompt cache.
    fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeds, PipelineError> {
        let _no_grad = tch::no_grad_guard();
        let text = self.text_device;
        self.prompt_cache
            .get_or_encode(prompt, self.device, || match &self.conditioner {
                Conditioner::Text { encoders, .. } => encoders.encode(&[prompt], text),
                Conditioner::Sd3(encoders) => encoders.encode(&[prompt], text),
                Conditioner::Flux(encoders) => encoders.encode(&[prompt], text),
                Conditioner::ZImage(encoder) => encoder.encode(prompt, text),
                Conditioner::Classes(_) => Err(PipelineError::Request(
                    "a class-conditional pipeline has no text encoder; give class labels".into(),
                )),
            })
    }

    /// The (guided) model output for scaled latents `model_input` at timestep `t`: the noise
    /// prediction, followed for a learned-variance DiT by the conditional half's variance
    /// channels.
    pub fn predict(&self, cond: &Conditioning, model_input: &Tensor, t: f64) -> Tensor {
        let input = match cond.cfg {
            Some(_) => Tensor::cat(&[model_input, model_input], 0),
            None => model_input.shallow_clone(),
        }
        .to_kind(self.kind);
        let timestep = Tensor::from(t as f32).to_device(self.device);
        let out = self.backbone.forward(&input, &timestep, &cond.inputs);
        let Some(g) = cond.cfg else {
            return out;
        };
        let b = model_input.size()[0];
        let c = self.backbone.in_channels();
        let eps = out.narrow(1, 0, c);
        match &self.backbone {
            // ZImagePipeline guides in fp32.
            Backbone::ZImage(_) => {
                let eps = eps.to_kind(Kind::Float);
                let (uncond, text) = (eps.narrow(0, 0, b), eps.narrow(0, b, b));
                &uncond + (&text - &uncond) * g
            }
            Backbone::UNet(_) | Backbone::SD3(_) | Backbone::Flux(_) => {
                let (uncond, text) = (eps.narrow(0, 0, b), eps.narrow(0, b, b));
                &uncond + (&text - &uncond) * g
            }
            // DiTPipeline guides the ε channels only and keeps the class half's variance.
            Backbone::DiT(_) => {
                let (class, null) = (eps.narrow(0, 0, b), eps.narrow(0, b, b));
                let guided = &null + (&class - &null) * g;
                let variance = out.narrow(1, c, out.size()[1] - c).narrow(0, 0, b);
                Tensor::cat(&[guided, variance], 1)
            }
        }
    }

    /// The unguided noise prediction of `backbone` (the pipeline's, its frozen copy, …) for
    /// scaled latents `x` [B, C, h, w] at one timestep per sample (`timesteps` [B]), as
    /// training needs it. A learned-variance DiT's variance channels are dropped (see
    /// [`Pipeline::predict_batch_with_variance`]).
    pub fn predict_batch(
        &self,
        backbone: &Backbone,
        cond: &Conditioning,
        x: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        self.predict_batch_with_variance(backbone, cond, x, timesteps)
            .narrow(1, 0, backbone.in_channels())
    }

    /// [`Pipeline::predict_batch`] with the whole output, variance channels included.
    pub fn predict_batch_with_variance(
        &self,
        backbone: &Backbone,
        cond: &Conditioning,
        x: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        backbone.forward(&x.to_kind(self.kind), timesteps, &cond.inputs)
    }

    /// Encodes [N, H, W, 3] uint8 images to the backbone's latent space (the posterior mean,
    /// scaled as the pipelines scale), fp32.
    pub fn encode(&self, images: &Tensor) -> Tensor {
        self.vae.encode(images)
    }

    /// Decodes final latents to [N, H, W, 3] uint8 images on the CPU, as the pipelines'
    /// `output_type="pil"` does.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.vae.decode(latents)
    }

    /// Generates images for one prompt (for a DiT pipeline: one class id or name).
    pub fn generate(
        &self,
        req: GenerateRequest,
        noise: &mut dyn NoiseSource,
    ) -> Result<Generated, PipelineError> {
        let f = self.vae_scale_factor();
        if req.height % f != 0 || req.width % f != 0 || req.height <= 0 || req.width <= 0 {
            return Err(PipelineError::Request(format!(
                "height and width must be positive multiples of {f}, got {}x{}",
                req.height, req.width
            )));
        }
        if let Conditioner::Classes(names) = &self.conditioner {
            if req.negative_prompt.is_some() {
                return Err(PipelineError::Request(
                    "a class-conditional DiT has no negative prompt".into(),
                ));
            }
            if req.height != req.width {
                return Err(PipelineError::Request(format!(
                    "DiT images are square; got {}x{}",
                    req.height, req.width
                )));
            }
            let id = names.class_id(req.prompt)?;
            return self.generate_classes(
                dit::ClassRequest {
                    class_labels: vec![id; req.num_images.max(0) as usize],
                    timesteps: req.timesteps,
                    guidance: req.guidance,
                    latent_size: Some(req.height / f),
                    init_latents: req.init_latents,
                    record: req.record,
                },
                noise,
            );
        }
        self.backbone
            .check_latent_size(req.height / f, req.width / f)
            .map_err(PipelineError::Request)?;
        let shape = vec![
            req.num_images,
            self.backbone.in_channels(),
            req.height / f,
            req.width / f,
        ];
        let initial = match req.init_latents {
            Some(t) => {
                if t.size() != shape {
                    return Err(PipelineError::Request(format!(
                        "initial latents have shape {:?}, expected {shape:?} for {} images of {}x{}",
                        t.size(),
                        req.num_images,
                        req.height,
                        req.width
                    )));
                }
                InitialLatents::Given(t.to_device(self.device).to_kind(Kind::Float))
            }
            // Latents and the scheduler's step stay in fp32 whatever the model's precision (as
            // diffusers' schedulers upcast): only the UNet's input and output change kind.
            None => InitialLatents::Draw {
                shape,
                kind: Kind::Float,
                device: self.device,
            },
        };
        let scheduler = self.scheduler(req.timesteps, req.height, req.width)?;
        let cond = self.condition(
            req.prompt,
            req.negative_prompt,
            req.guidance,
            req.height,
            req.width,
            req.num_images,
        )?;
        let mut denoiser = |x: &Tensor, t: f64| self.predict(&cond, x, t);
        let out = sample(&scheduler, &mut denoiser, initial, noise, req.record)?;
        Ok(Generated {
            images: self.decode(&out.latents),
            latents: out.latents,
            trajectory: out.trajectory,
        })
    }
}
