//! Orchestration of training runs: the run directory contract (docs/design.md), metrics,
//! checkpoints and resume, shared by `pso offline` and `pso online`.

pub mod class_samples;
pub mod data;
mod dir;
mod error;
pub mod eval;
pub mod image_table;
pub mod images;
pub mod label;
pub mod offline;
pub mod online;
mod progress;
pub mod prompts;
pub mod reference_pool;
pub mod relabel;
mod resume;
pub mod rounds;
mod stop;

use std::path::PathBuf;

use diffusion::pipeline::{LoadOptions, Pipeline};
use diffusion::sampling::SchedulerKind;

use crate::config::{resolve_device, RunConfig};
pub use crate::seed::step_seed;
pub use dir::{run_path, Metrics, RunDir};
pub(crate) use error::io;
pub use error::RunError;
pub use progress::{progress, progress_of};
pub(crate) use resume::latest_or_none;
pub use resume::{resume, save, start_learner};
pub(crate) use stop::any_rank;
pub use stop::stop_flag;

/// Loads `config.model` on `device`, with the scheduler of the model folder turned into
/// `sampler.name` (as diffusers' `Scheduler.from_config(pipe.scheduler.config)`): SD-Turbo's
/// folder names Euler, its PSO recipe samples with Euler ancestral.
pub fn load_pipeline(config: &RunConfig, device: tch::Device) -> Result<Pipeline, RunError> {
    if let Some(why) = unpinned_dmd2(config) {
        tracing::warn!("{why}");
    }
    let root = hf::hub::resolve_model(&config.model.id, None)?;
    let mut pipeline = Pipeline::load(
        &root,
        &LoadOptions {
            device,
            kind: config.model.dtype.kind(),
            variant: None,
            backbone_weights: config.model.unet.clone(),
            max_sequence_length: config.model.max_sequence_length,
            text_encoder_device: config
                .model
                .text_encoder_device
                .as_deref()
                .map(resolve_device)
                .transpose()
                .map_err(|e| RunError::Config(format!("model.text_encoder_device: {e}")))?,
        },
    )?;
    if let diffusion::models::backbone::Backbone::Flux(m) = &pipeline.backbone {
        if m.config().guidance_embeds {
            return Err(RunError::Config(format!(
                "{}: this FLUX transformer embeds a guidance scale (FLUX.1-dev, a many-step \
                 model); pso trains few-step models and runs without guidance, so use \
                 FLUX.1-schnell (`pso sample` runs dev with --guidance)",
                config.model.id
            )));
        }
    }
    if matches!(
        pipeline.backbone,
        diffusion::models::backbone::Backbone::ZImage(_)
    ) && config.sampler.guidance > 0.0
    {
        return Err(RunError::Config(format!(
            "sampler.guidance = {}: Z-Image reads it as ZImagePipeline's guidance_scale, where \
             any value above 0 guides, and pso trains on unguided samples; set it to 0 \
             (Z-Image-Turbo's own setting)",
            config.sampler.guidance
        )));
    }
    for warning in pipeline.warnings() {
        tracing::warn!("{}: {warning}", root.display());
    }
    pipeline
        .backbone
        .set_recompute(config.learner.recompute_blocks)
        .map_err(|e| RunError::Config(format!("learner.recompute_blocks = true: {e}")))?;
    pipeline.scheduler_config.kind = config.sampler.name;
    pipeline.scheduler_config.flow_kernel = config.sampler.flow_kernel();
    Ok(pipeline)
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The run directory.
    pub run: PathBuf,
    /// Optimizer steps done in total.
    pub steps: u64,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Whether a stop request ended it early.
    pub stopped: bool,
}

/// DMD2's 4-step UNet was distilled at timesteps 999, 749, 499, 249, but LCM's spacing of 4
/// steps gives 999, 759, 499, 259: a DMD2 model (by its `model.id` or `model.unet` name) with an
/// LCM sampler and no `sampler.timesteps` samples off its schedule. Says so, with the fix.
fn unpinned_dmd2(config: &RunConfig) -> Option<String> {
    let names_dmd2 = |s: &str| s.to_ascii_lowercase().contains("dmd2");
    let dmd2 = names_dmd2(&config.model.id)
        || config
            .model
            .unet
            .as_ref()
            .is_some_and(|p| names_dmd2(&p.to_string_lossy()));
    let unpinned = config.sampler.name == SchedulerKind::Lcm && config.sampler.timesteps.is_empty();
    (dmd2 && unpinned).then(|| {
        "this looks like a DMD2 model, which was distilled at timesteps [999, 749, 499, 249]; \
         the LCM sampler's own spacing differs (4 steps: [999, 759, 499, 259]). Set \
         sampler.timesteps = [999, 749, 499, 249], as configs/dmd2-pickscore.toml does"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmd2_with_lcm_spacing_is_named_and_pinned_timesteps_are_not() {
        let mut config = RunConfig::default();
        config.sampler.name = SchedulerKind::Lcm;
        config.model.unet = Some("dmd2/dmd2_sdxl_4step_unet_fp16.bin.safetensors".into());
        let why = unpinned_dmd2(&config).unwrap();
        assert!(why.contains("[999, 749, 499, 249]"), "{why}");
        config.sampler.timesteps = vec![999, 749, 499, 249];
        assert!(unpinned_dmd2(&config).is_none());
        config.sampler.timesteps.clear();
        config.model.unet = None;
        assert!(unpinned_dmd2(&config).is_none());
        config.model.id = "tianweiy/DMD2".into();
        assert!(unpinned_dmd2(&config).is_some());
    }
}
