//! SD3 / SD3.5 (`StableDiffusion3Pipeline`), FLUX (`FluxPipeline`) and Z-Image
//! (`ZImagePipeline`) folders as a [`Pipeline`]: the flow transformer as the backbone, the
//! prompt conditioning (`encode_prompt` of each pipeline), and the sigma schedule each pipeline
//! asks its `FlowMatchEulerDiscreteScheduler` for. Sampling and decoding are the shared ones:
//! the scheduler's default kernel is diffusers' deterministic Euler step, and the VAE decodes
//! `latents / scaling_factor + shift_factor`.

use std::path::Path;

use tch::{Kind, Tensor};

use super::conditioning::captions_cat;
use super::flux_prompt::FluxTextEncoders;
use super::prompt_cache::{self, PromptCache};
use super::sd3_prompt::Sd3TextEncoders;
use super::z_image_prompt::ZImageTextEncoder;
use super::{
    load_backbone, Conditioner, Conditioning, ImageCodec, LoadOptions, Pipeline, PipelineError,
};
use crate::models::backbone::{Backbone, Condition};
use crate::sampling::scheduler::flow_steps;
use crate::sampling::{FlowSchedule, SamplingError, Scheduler, SchedulerConfig, Timesteps};

/// The diffusers pipeline classes of flow-matching folders.
pub const CLASSES: [&str; 3] = ["StableDiffusion3Pipeline", "FluxPipeline", "ZImagePipeline"];

/// SD3's default T5 length (`max_sequence_length=256`).
const SD3_MAX_SEQUENCE_LENGTH: usize = 256;
/// FLUX.1-schnell's T5 length (its model card; the pipeline's own default of 512 is dev's).
const FLUX_SCHNELL_MAX_SEQUENCE_LENGTH: usize = 256;
/// FLUX.1-dev's T5 length.
const FLUX_DEV_MAX_SEQUENCE_LENGTH: usize = 512;
/// ZImagePipeline's most Qwen3 tokens per prompt.
const Z_IMAGE_MAX_SEQUENCE_LENGTH: usize = 512;

/// Loads an SD3 / SD3.5, FLUX or Z-Image folder (transformer/, vae/, scheduler/, the text encoders and
/// tokenizers) as `opts` say; `class` is its model_index.json `_class_name`.
pub(super) fn load(
    root: &Path,
    opts: &LoadOptions,
    class: &str,
) -> Result<Pipeline, PipelineError> {
    let variant = opts.variant.as_deref();
    let (backbone_vs, backbone) = load_backbone(root, opts)?;
    let vae = ImageCodec::load(&root.join("vae"), opts.device, opts.kind, variant)?;
    let scheduler_path = root.join("scheduler").join("scheduler_config.json");
    let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
    if !scheduler_config.kind.is_flow() {
        return Err(PipelineError::Folder {
            path: scheduler_path,
            why: format!(
                "_class_name is {}; {class} folders sample with \
                 FlowMatchEulerDiscreteScheduler",
                scheduler_config.kind.class_name()
            ),
        });
    }
    let conditioner = match &backbone {
        Backbone::SD3(m) => Conditioner::Sd3(Box::new(Sd3TextEncoders::load(
            root,
            opts.max_sequence_length.unwrap_or(SD3_MAX_SEQUENCE_LENGTH),
            m.config().joint_attention_dim,
            opts.text_device(),
            opts.kind,
            variant,
        )?)),
        Backbone::Flux(m) => {
            let default = if m.config().guidance_embeds {
                FLUX_DEV_MAX_SEQUENCE_LENGTH
            } else {
                FLUX_SCHNELL_MAX_SEQUENCE_LENGTH
            };
            Conditioner::Flux(Box::new(FluxTextEncoders::load(
                root,
                opts.max_sequence_length.unwrap_or(default),
                opts.text_device(),
                opts.kind,
                variant,
            )?))
        }
        Backbone::ZImage(m) => {
            let max_tokens = opts
                .max_sequence_length
                .unwrap_or(Z_IMAGE_MAX_SEQUENCE_LENGTH);
            let folder =
                |path: std::path::PathBuf, why: String| PipelineError::Folder { path, why };
            m.check_caption_length(max_tokens as i64)
                .map_err(|why| folder(root.join("transformer/config.json"), why))?;
            let encoder = ZImageTextEncoder::load(root, max_tokens, opts.text_device(), opts.kind)?;
            if encoder.width() != m.config().cap_feat_dim {
                return Err(folder(
                    root.join("text_encoder/config.json"),
                    format!(
                        "hidden_size {} but the transformer's cap_feat_dim is {}: the text \
                         encoder is not the one this transformer was trained with",
                        encoder.width(),
                        m.config().cap_feat_dim
                    ),
                ));
            }
            Conditioner::ZImage(Box::new(encoder))
        }
        Backbone::UNet(_) | Backbone::DiT(_) => {
            return Err(PipelineError::Folder {
                path: root.join("transformer"),
                why: format!("a {class} folder needs its flow transformer in transformer/"),
            })
        }
    };
    Ok(Pipeline {
        backbone,
        backbone_vs,
        vae,
        scheduler_config,
        conditioner,
        device: opts.device,
        text_device: opts.text_device(),
        prompt_cache: PromptCache::new(prompt_cache::DEFAULT_BUDGET_BYTES),
        kind: opts.kind,
    })
}

impl Pipeline {
    /// The prompt conditioning of `num_images` images: SD3 with classifier-free guidance
    /// against `negative_prompt` (default empty) when `guidance > 1`, the unconditional half
    /// first; FLUX with `guidance` embedded when the model is guidance-distilled (dev), no
    /// negative prompt; Z-Image with guidance as `ZImagePipeline` scales it (`guidance > 0`
    /// guides, the prediction pos + guidance · (pos − neg); Turbo samples with 0).
    pub(super) fn condition_joint(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        guidance: f64,
        num_images: i64,
    ) -> Result<Conditioning, PipelineError> {
        let _no_grad = tch::no_grad_guard();
        let repeat = |t: &Tensor| {
            let mut reps = vec![1i64; t.dim()];
            reps[0] = num_images;
            t.repeat(reps.as_slice())
        };
        let pooled_of = |p: Option<Tensor>| {
            p.ok_or_else(|| {
                PipelineError::Request("the text encoders returned no pooled embedding".into())
            })
        };
        let (context, pooled, cfg, embedded) = match (&self.conditioner, &self.backbone) {
            (Conditioner::Sd3(_), _) => {
                let positive = self.encode_prompt(prompt)?;
                let (mut context, mut pooled) = (
                    repeat(&positive.embeds),
                    repeat(&pooled_of(positive.pooled)?),
                );
                let cfg = (guidance > 1.0).then_some(guidance);
                if cfg.is_some() {
                    let negative = self.encode_prompt(negative_prompt.unwrap_or(""))?;
                    context = Tensor::cat(&[repeat(&negative.embeds), context], 0);
                    pooled = Tensor::cat(&[repeat(&pooled_of(negative.pooled)?), pooled], 0);
                }
                (context, pooled, cfg, None)
            }
            (Conditioner::ZImage(_), _) => {
                let caption = |text: &str| -> Result<(Tensor, Vec<i64>), PipelineError> {
                    let embeds = self.encode_prompt(text)?.embeds;
                    let len = embeds.size()[1];
                    Ok((repeat(&embeds), vec![len; num_images as usize]))
                };
                let positive = caption(prompt)?;
                // pos + g (pos − neg) is the usual neg + (g + 1)(pos − neg).
                let cfg = (guidance > 0.0).then_some(guidance + 1.0);
                let (tokens, lengths) = if cfg.is_some() {
                    let negative = caption(negative_prompt.unwrap_or(""))?;
                    captions_cat(&[
                        (&negative.0, negative.1.as_slice()),
                        (&positive.0, positive.1.as_slice()),
                    ])
                } else {
                    positive
                };
                return Ok(Conditioning {
                    inputs: Condition::Captions {
                        tokens: tokens.to_kind(self.kind),
                        lengths,
                    },
                    cfg,
                });
            }
            (Conditioner::Flux(_), Backbone::Flux(m)) => {
                if negative_prompt.is_some() {
                    return Err(PipelineError::Request(
                        "FLUX runs without classifier-free guidance here, so it takes no \
                         negative prompt"
                            .into(),
                    ));
                }
                let text = self.encode_prompt(prompt)?;
                let embedded = m
                    .config()
                    .guidance_embeds
                    .then(|| Tensor::full([num_images], guidance, (Kind::Float, self.device)));
                (
                    repeat(&text.embeds),
                    repeat(&pooled_of(text.pooled)?),
                    None,
                    embedded,
                )
            }
            _ => unreachable!("flow pipelines pair their encoders with their transformer"),
        };
        Ok(Conditioning {
            inputs: Condition::Joint {
                context: context.to_kind(self.kind),
                pooled: pooled.to_kind(self.kind),
                guidance: embedded,
            },
            cfg,
        })
    }

    /// The flow-matching scheduler for a `height` × `width` image (pixels): SD3 spaces
    /// `num_inference_steps`, FLUX and Z-Image pass sigmas linspace(1, 1/n, n); under dynamic
    /// shifting each shifts by the `mu` of the image's token count.
    pub(super) fn flow_scheduler(
        &self,
        timesteps: Timesteps,
        height: i64,
        width: i64,
    ) -> Result<Scheduler, SamplingError> {
        let config = self.scheduler_config.clone();
        let steps = flow_steps(&timesteps)?;
        let f = self.vae_scale_factor();
        let (h, w) = (height / f, width / f);
        let (schedule, tokens) = match &self.backbone {
            Backbone::Flux(_) | Backbone::ZImage(_) => {
                let n = steps as f64;
                // numpy's linspace(1, 1/n, n): i·step + 1, the last value exactly 1/n (FLUX;
                // ZImagePipeline's fp32 torch.linspace agrees to an fp32 rounding).
                let sigmas = (0..steps)
                    .map(|i| {
                        if i + 1 == steps {
                            1.0 / n
                        } else {
                            i as f64 * ((1.0 / n - 1.0) / (n - 1.0)) + 1.0
                        }
                    })
                    .collect();
                (FlowSchedule::Sigmas(sigmas), (h / 2) * (w / 2))
            }
            Backbone::SD3(m) => {
                let p = m.config().patch_size;
                (FlowSchedule::Steps(steps), (h / p) * (w / p))
            }
            Backbone::UNet(_) | Backbone::DiT(_) => {
                unreachable!("only flow backbones carry a flow scheduler")
            }
        };
        let mu = config
            .flow
            .use_dynamic_shifting
            .then(|| config.flow.mu(tokens as u64));
        Scheduler::flow(config, schedule, mu)
    }
}
