//! Loading a diffusers pipeline folder: options, `model_index.json`, the denoiser and the rest.

use std::path::{Path, PathBuf};

use hf::load::read_json;
use serde::Deserialize;
use tch::{nn, Device, Kind};

use super::prompt::TextEncoders;
use super::prompt_cache::{self, PromptCache};
use super::{dit, flow, Conditioner, ImageCodec, Pipeline, PipelineError};
use crate::models::backbone::Backbone;
use crate::models::dit::DiTTransformer2DModel;
use crate::models::flux::FluxTransformer2DModel;
use crate::models::sd3::SD3Transformer2DModel;
use crate::models::unet::UNet2DConditionModel;
use crate::models::z_image::ZImageTransformer2DModel;
use crate::sampling::SchedulerConfig;

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the models run.
    pub device: Device,
    /// Weight and activation precision of the UNet and text encoders.
    pub kind: Kind,
    /// Weight-file variant (e.g. `fp16`).
    pub variant: Option<String>,
    /// A safetensors file replacing the denoiser's weights (e.g. DMD2's UNet in an SDXL folder,
    /// or a merged export); the layout comes from the folder's unet/ or transformer/ config.
    pub backbone_weights: Option<PathBuf>,
    /// T5 tokens per prompt of an SD3 / FLUX folder (default: 256; FLUX.1-dev 512); for a
    /// Z-Image folder, the most Qwen3 tokens per prompt (default 512).
    pub max_sequence_length: Option<usize>,
    /// Where the text encoders run, when not on `device` (e.g. T5-XXL on the CPU to leave
    /// the GPU to the denoiser); their outputs move to `device`.
    pub text_encoder_device: Option<Device>,
}

impl LoadOptions {
    /// The text encoders' device.
    pub fn text_device(&self) -> Device {
        self.text_encoder_device.unwrap_or(self.device)
    }
}

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    force_zeros_for_empty_prompt: bool,
}

/// The component folder that holds the denoiser of the pipeline folder `root`: `transformer`
/// for DiT, SD3 and FLUX pipelines, else `unet` (diffusers' LoRA files name entries by it).
pub fn backbone_folder(root: &Path) -> &'static str {
    let class = read_json::<ModelIndex>(&root.join("model_index.json"))
        .map(|index| index.class_name)
        .unwrap_or_default();
    if class == "DiTPipeline" || flow::CLASSES.contains(&class.as_str()) {
        "transformer"
    } else {
        "unet"
    }
}

/// Loads the denoiser of the pipeline folder `root`: `transformer/` of a DiT, SD3, FLUX or Z-Image
/// pipeline, else `unet/`, with `opts.backbone_weights` in place of the folder's weights when
/// given.
pub fn load_backbone(
    root: &Path,
    opts: &LoadOptions,
) -> Result<(nn::VarStore, Backbone), PipelineError> {
    let variant = opts.variant.as_deref();
    let files = opts.backbone_weights.as_ref().map(std::slice::from_ref);
    let class = read_json::<ModelIndex>(&root.join("model_index.json"))
        .map(|index| index.class_name)
        .unwrap_or_default();
    if flow::CLASSES.contains(&class.as_str()) {
        let dir = root.join("transformer");
        let (device, kind) = (opts.device, opts.kind);
        if class == "ZImagePipeline" {
            let (vs, m) = match files {
                None => ZImageTransformer2DModel::load(&dir, device, kind, variant)?,
                Some(files) => {
                    ZImageTransformer2DModel::load_with_weights(&dir, files, device, kind)?
                }
            };
            return Ok((vs, Backbone::ZImage(Box::new(m))));
        }
        let sd3 = class == "StableDiffusion3Pipeline";
        return Ok(match (sd3, files) {
            (true, None) => {
                let (vs, m) = SD3Transformer2DModel::load(&dir, device, kind, variant)?;
                (vs, Backbone::SD3(Box::new(m)))
            }
            (true, Some(files)) => {
                let (vs, m) = SD3Transformer2DModel::load_with_weights(&dir, files, device, kind)?;
                (vs, Backbone::SD3(Box::new(m)))
            }
            (false, None) => {
                let (vs, m) = FluxTransformer2DModel::load(&dir, device, kind, variant)?;
                (vs, Backbone::Flux(Box::new(m)))
            }
            (false, Some(files)) => {
                let (vs, m) = FluxTransformer2DModel::load_with_weights(&dir, files, device, kind)?;
                (vs, Backbone::Flux(Box::new(m)))
            }
        });
    }
    if dit::is_dit_folder(root) {
        let dir = root.join("transformer");
        let config = hf::load::read_config(&dir)?;
        let (vs, model) = match files {
            None => DiTTransformer2DModel::load_with_config(
                &dir,
                &config,
                opts.device,
                opts.kind,
                variant,
            )?,
            Some(files) => DiTTransformer2DModel::load_with_weights(
                &dir,
                &config,
                files,
                opts.device,
                opts.kind,
            )?,
        };
        return Ok((vs, Backbone::DiT(Box::new(model))));
    }
    let dir = root.join("unet");
    let (vs, model) = match files {
        None => UNet2DConditionModel::load(&dir, opts.device, opts.kind, variant)?,
        Some(files) => {
            let config = hf::load::read_config(&dir)?;
            UNet2DConditionModel::load_with_weights(&dir, &config, files, opts.device, opts.kind)?
        }
    };
    Ok((vs, Backbone::UNet(Box::new(model))))
}

impl Pipeline {
    /// Loads a local diffusers folder: a `StableDiffusionPipeline` or `StableDiffusionXLPipeline`
    /// (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, and for SDXL
    /// text_encoder_2/, tokenizer_2/), a `DiTPipeline` (transformer/, vae/, scheduler/), or a
    /// `StableDiffusion3Pipeline` / `FluxPipeline` (see [`flow`]).
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Pipeline, PipelineError> {
        if !root.is_dir() {
            return Err(PipelineError::Folder {
                path: root.to_owned(),
                why: "not a folder; expected a diffusers pipeline folder with model_index.json"
                    .into(),
            });
        }
        let index: ModelIndex = read_json(&root.join("model_index.json"))?;
        let dual = match index.class_name.as_str() {
            "StableDiffusionPipeline" => false,
            "StableDiffusionXLPipeline" => true,
            "DiTPipeline" => return dit::load(root, opts),
            class if flow::CLASSES.contains(&class) => return flow::load(root, opts, class),
            other => {
                return Err(PipelineError::Folder {
                    path: root.join("model_index.json"),
                    why: format!(
                        "pipeline `{other}` is not supported; use a StableDiffusionPipeline, \
                         StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline or \
                         DiTPipeline folder"
                    ),
                })
            }
        };
        let variant = opts.variant.as_deref();
        let (unet_vs, backbone) = load_backbone(root, opts)?;
        let Backbone::UNet(unet) = &backbone else {
            return Err(PipelineError::Folder {
                path: root.join("model_index.json"),
                why: "a text-to-image pipeline needs a unet/ folder".into(),
            });
        };
        let vae = ImageCodec::load(&root.join("vae"), opts.device, opts.kind, variant)?;
        let encoders = TextEncoders::load(root, dual, opts.text_device(), opts.kind, variant)?;
        let scheduler_config =
            SchedulerConfig::from_file(&root.join("scheduler").join("scheduler_config.json"))?;
        if unet.needs_added_cond() != dual {
            return Err(PipelineError::Folder {
                path: root.join("unet/config.json"),
                why: "the UNet's addition_embed_type does not fit the pipeline (SDXL needs text_time)".into(),
            });
        }
        Ok(Pipeline {
            backbone,
            backbone_vs: unet_vs,
            vae,
            scheduler_config,
            conditioner: Conditioner::Text {
                encoders: Box::new(encoders),
                force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            },
            device: opts.device,
            text_device: opts.text_device(),
            prompt_cache: PromptCache::new(prompt_cache::DEFAULT_BUDGET_BYTES),
            kind: opts.kind,
        })
    }
}
