//! diffusers' `DiTPipeline`: a class-conditional [`DiTTransformer2DModel`] sampled with its
//! folder's DDIM or DDPM scheduler, classifier-free guidance on the ε channels only, and the VAE.
//!
//! With guidance the model sees the batch twice, conditioned on the classes and on the null class
//! (id `num_embeds_ada_norm`; diffusers hard-codes 1000, the same for ImageNet-1k models), and
//! ε = ε_null + g·(ε_class − ε_null). diffusers then steps both halves and keeps the first, so its
//! ancestral noise is drawn for 2B rows; the first B rows of each draw are used here, so the same
//! numbers give the same images. (DiTPipeline draws that noise from torch's global generator, not
//! from its `generator`; here the initial latents and the noise come from one source.)

use std::collections::BTreeMap;
use std::path::Path;

use reward::load::read_json;
use serde::Deserialize;
use tch::{nn, Device, Kind, Tensor};

use super::{Generated, ImageCodec, LoadOptions, PipelineError};
use crate::models::dit::{DiTTransformer2DConfig, DiTTransformer2DModel};
use crate::sampling::{
    sample, InitialLatents, NoiseSource, SamplingError, Scheduler, SchedulerConfig, Timesteps,
};

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    id2label: BTreeMap<String, String>,
}

/// Whether the diffusers folder `root` holds a `DiTPipeline`.
pub fn is_dit_folder(root: &Path) -> bool {
    read_json::<ModelIndex>(&root.join("model_index.json"))
        .is_ok_and(|index| index.class_name == "DiTPipeline")
}

/// What to generate: one image per class label.
#[derive(Debug)]
pub struct ClassRequest {
    /// Class ids, one per image (see [`DiTPipeline::class_id`]).
    pub class_labels: Vec<i64>,
    /// Steps, or an explicit timestep list.
    pub timesteps: Timesteps,
    /// Guidance scale; ≤ 1 means none (DiTPipeline's default is 4).
    pub guidance: f64,
    /// Latent side (default: the transformer's `sample_size`).
    pub latent_size: Option<i64>,
    /// Initial latents [N, C, s, s] as DiTPipeline draws them; from the noise source when absent.
    pub init_latents: Option<Tensor>,
    /// Record the trajectory.
    pub record: bool,
}

/// A loaded `DiTPipeline` folder: `transformer/`, `vae/`, `scheduler/`, and the class names of
/// `model_index.json`'s `id2label`.
pub struct DiTPipeline {
    /// The denoiser.
    pub transformer: DiTTransformer2DModel,
    /// The transformer's parameters.
    pub transformer_vs: nn::VarStore,
    /// The autoencoder.
    pub vae: ImageCodec,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: SchedulerConfig,
    labels: BTreeMap<String, i64>,
    device: Device,
    kind: Kind,
}

impl std::fmt::Debug for DiTPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiTPipeline")
            .field("transformer", &self.transformer.config)
            .field("labels", &self.labels.len())
            .finish()
    }
}

impl DiTPipeline {
    /// Loads a local `DiTPipeline` folder; `opts.unet_override` is refused (a DiT has no UNet).
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<DiTPipeline, PipelineError> {
        let index_path = root.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        if index.class_name != "DiTPipeline" {
            return Err(PipelineError::Folder {
                path: index_path,
                why: format!("is a `{}`, not a DiTPipeline", index.class_name),
            });
        }
        if opts.unet_override.is_some() {
            return Err(PipelineError::Request(
                "a DiT pipeline has no UNet to replace; drop the UNet override".into(),
            ));
        }
        let variant = opts.variant.as_deref();
        let (transformer_vs, transformer) = DiTTransformer2DModel::load(
            &root.join("transformer"),
            opts.device,
            opts.kind,
            variant,
        )?;
        let vae = ImageCodec::load(&root.join("vae"), opts.device, opts.kind, variant)?;
        let scheduler_config =
            SchedulerConfig::from_file(&root.join("scheduler").join("scheduler_config.json"))?;
        let mut labels = BTreeMap::new();
        for (id, names) in &index.id2label {
            let id: i64 = id.parse().map_err(|_| PipelineError::Folder {
                path: root.join("model_index.json"),
                why: format!("id2label key `{id}` is not a class id (an integer)"),
            })?;
            // As DiTPipeline: every comma-separated synonym names the class.
            for name in names.split(',') {
                labels.insert(name.trim().to_owned(), id);
            }
        }
        Ok(DiTPipeline {
            transformer,
            transformer_vs,
            vae,
            scheduler_config,
            labels,
            device: opts.device,
            kind: opts.kind,
        })
    }

    /// Number of classes (the null class's id).
    pub fn num_classes(&self) -> i64 {
        self.transformer
            .config
            .num_embeds_ada_norm
            .expect("a loaded DiT is class-conditional")
    }

    /// The class names of `id2label`, each with its id.
    pub fn labels(&self) -> &BTreeMap<String, i64> {
        &self.labels
    }

    /// The class id of `label`: an integer in 0..num_classes, or a name from `id2label`
    /// (DiTPipeline's `get_label_ids`).
    pub fn class_id(&self, label: &str) -> Result<i64, PipelineError> {
        let n = self.num_classes();
        if let Ok(id) = label.trim().parse::<i64>() {
            return if (0..n).contains(&id) {
                Ok(id)
            } else {
                Err(PipelineError::Request(format!(
                    "class {id} is out of range: the model has classes 0..{n} ({n} is the null \
                     class of guidance)"
                )))
            };
        }
        self.labels.get(label.trim()).copied().ok_or_else(|| {
            let known = if self.labels.is_empty() {
                "the folder's model_index.json has no id2label, so give class ids".to_owned()
            } else {
                let some: Vec<&str> = self.labels.keys().take(5).map(String::as_str).collect();
                format!("names are like {}", some.join(", "))
            };
            PipelineError::Request(format!("`{label}` is not a class name; {known}"))
        })
    }

    /// The transformer's training-size latent side.
    pub fn default_latent_size(&self) -> i64 {
        self.transformer.config.sample_size
    }

    /// A scheduler for `timesteps` from the pipeline's scheduler config.
    pub fn scheduler(&self, timesteps: Timesteps) -> Result<Scheduler, SamplingError> {
        Scheduler::new(self.scheduler_config.clone(), timesteps)
    }

    /// The model's class labels for `class_labels` [B]: followed by B null classes when guided.
    pub fn model_labels(&self, class_labels: &[i64], guided: bool) -> Tensor {
        let null = guided.then(|| vec![self.num_classes(); class_labels.len()]);
        let all: Vec<i64> = class_labels
            .iter()
            .chain(null.iter().flatten())
            .copied()
            .collect();
        Tensor::from_slice(&all).to_device(self.device)
    }

    /// The model output the scheduler steps with, for latents `x` [B, …] and the
    /// [`DiTPipeline::model_labels`] of their classes: guided ε, followed by the class half's
    /// variance channels when `keep_variance` (a learned-variance DDPM) and the model has them.
    pub fn predict(
        &self,
        model_labels: &Tensor,
        guidance: Option<f64>,
        x: &Tensor,
        t: f64,
        keep_variance: bool,
    ) -> Tensor {
        let b = x.size()[0];
        let input = match guidance {
            Some(_) => Tensor::cat(&[x, x], 0),
            None => x.shallow_clone(),
        };
        let timestep = Tensor::from(t as f32).to_device(self.device);
        let out = self
            .transformer
            .forward(&input.to_kind(self.kind), &timestep, model_labels);
        let c = self.transformer.config.in_channels;
        let eps = out.narrow(1, 0, c);
        let variance = out.narrow(1, c, out.size()[1] - c);
        let (eps, variance) = match guidance {
            Some(g) => {
                let (cond, null) = (eps.narrow(0, 0, b), eps.narrow(0, b, b));
                (&null + (&cond - &null) * g, variance.narrow(0, 0, b))
            }
            None => (eps, variance),
        };
        if keep_variance && variance.size()[1] > 0 {
            Tensor::cat(&[eps, variance], 1)
        } else {
            eps
        }
    }

    /// Generates one image per requested class.
    pub fn generate(
        &self,
        req: ClassRequest,
        noise: &mut dyn NoiseSource,
    ) -> Result<Generated, PipelineError> {
        if req.class_labels.is_empty() {
            return Err(PipelineError::Request(
                "no class labels given; ask for at least one image".into(),
            ));
        }
        let n = self.num_classes();
        if let Some(bad) = req.class_labels.iter().find(|&&c| !(0..n).contains(&c)) {
            return Err(PipelineError::Request(format!(
                "class {bad} is out of range 0..{n}"
            )));
        }
        let scheduler = self.scheduler(req.timesteps)?;
        let learned = scheduler.learns_variance();
        let config: &DiTTransformer2DConfig = &self.transformer.config;
        if learned && config.out_channels() != 2 * config.in_channels {
            return Err(PipelineError::Request(format!(
                "the scheduler's variance_type is learned_range but the transformer predicts no \
                 variance (out_channels {} = in_channels); use variance_type fixed_small",
                config.out_channels()
            )));
        }
        let side = req.latent_size.unwrap_or(config.sample_size);
        if side <= 0 || side % config.patch_size != 0 {
            return Err(PipelineError::Request(format!(
                "latent size {side} must be a positive multiple of the patch size {}",
                config.patch_size
            )));
        }
        let b = req.class_labels.len() as i64;
        let shape = vec![b, config.in_channels, side, side];
        let initial = match req.init_latents {
            Some(t) if t.size() != shape => {
                return Err(PipelineError::Request(format!(
                    "initial latents have shape {:?}, expected {shape:?}",
                    t.size()
                )))
            }
            Some(t) => t,
            None => noise.draw(&shape, 1)?.remove(0),
        }
        .to_device(self.device)
        .to_kind(Kind::Float);
        let guidance = (req.guidance > 1.0).then_some(req.guidance);
        let labels = self.model_labels(&req.class_labels, guidance.is_some());
        let mut denoiser = |x: &Tensor, t: f64| self.predict(&labels, guidance, x, t, learned);
        let mut first_rows;
        let noise: &mut dyn NoiseSource = match guidance {
            Some(_) => {
                first_rows = FirstRows(noise);
                &mut first_rows
            }
            None => noise,
        };
        let out = sample(
            &scheduler,
            &mut denoiser,
            InitialLatents::Given(initial),
            noise,
            req.record,
        )?;
        Ok(Generated {
            images: self.vae.decode(&out.latents),
            latents: out.latents,
            trajectory: out.trajectory,
        })
    }
}

/// Draws noise for twice the batch and keeps the first rows, as DiTPipeline's guided loop uses
/// the noise of its doubled batch.
struct FirstRows<'a>(&'a mut dyn NoiseSource);

impl NoiseSource for FirstRows<'_> {
    fn draw(&mut self, shape: &[i64], count: usize) -> Result<Vec<Tensor>, SamplingError> {
        let mut doubled = shape.to_vec();
        doubled[0] *= 2;
        Ok(self
            .0
            .draw(&doubled, count)?
            .into_iter()
            .map(|t| t.narrow(0, 0, shape[0]))
            .collect())
    }
}
