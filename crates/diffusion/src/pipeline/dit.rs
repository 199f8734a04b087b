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

use hf::load::read_json;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::{
    Conditioner, Conditioning, Generated, ImageCodec, LoadOptions, Pipeline, PipelineError,
};
use crate::models::backbone::{Backbone, Condition};
use crate::models::dit::DiTTransformer2DModel;
use crate::sampling::{
    sample, InitialLatents, NoiseSource, SamplingError, SchedulerConfig, Timesteps,
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
    /// Class ids, one per image (see [`ClassNames::class_id`]).
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

/// A DiT's classes: how many, and the names `model_index.json`'s `id2label` gives them.
#[derive(Debug)]
pub struct ClassNames {
    labels: BTreeMap<String, i64>,
    num_classes: i64,
}

impl ClassNames {
    /// Number of classes (the null class's id).
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// The class names of `id2label`, each with its id.
    pub fn labels(&self) -> &BTreeMap<String, i64> {
        &self.labels
    }

    /// The class id of `label`: an integer in 0..num_classes, or a name from `id2label`
    /// (DiTPipeline's `get_label_ids`).
    pub fn class_id(&self, label: &str) -> Result<i64, PipelineError> {
        let n = self.num_classes;
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

    /// The model's class labels for `class_labels` [B]: followed by B null classes when guided.
    pub fn model_labels(&self, class_labels: &[i64], guided: bool, device: Device) -> Tensor {
        let null = guided.then(|| vec![self.num_classes; class_labels.len()]);
        let all: Vec<i64> = class_labels
            .iter()
            .chain(null.iter().flatten())
            .copied()
            .collect();
        Tensor::from_slice(&all).to_device(device)
    }
}

/// Loads a local `DiTPipeline` folder (`transformer/`, `vae/`, `scheduler/`, `id2label`).
pub(super) fn load(root: &Path, opts: &LoadOptions) -> Result<Pipeline, PipelineError> {
    let index_path = root.join("model_index.json");
    let index: ModelIndex = read_json(&index_path)?;
    let variant = opts.variant.as_deref();
    let (transformer_vs, backbone) = super::load_backbone(root, opts)?;
    let Backbone::DiT(transformer) = backbone else {
        unreachable!("a DiTPipeline folder loads a DiT")
    };
    let vae = ImageCodec::load(&root.join("vae"), opts.device, opts.kind, variant)?;
    let scheduler_config =
        SchedulerConfig::from_file(&root.join("scheduler").join("scheduler_config.json"))?;
    let mut labels = BTreeMap::new();
    for (id, names) in &index.id2label {
        let id: i64 = id.parse().map_err(|_| PipelineError::Folder {
            path: index_path.clone(),
            why: format!("id2label key `{id}` is not a class id (an integer)"),
        })?;
        // As DiTPipeline: every comma-separated synonym names the class; so does the whole
        // entry, as datasets' ImageNet ClassLabel names spell it.
        for name in names.split(',') {
            labels.insert(name.trim().to_owned(), id);
        }
        labels.insert(names.trim().to_owned(), id);
    }
    let num_classes = transformer
        .config
        .num_embeds_ada_norm
        .expect("a loaded DiT is class-conditional");
    Ok(Pipeline {
        backbone: Backbone::DiT(transformer),
        backbone_vs: transformer_vs,
        vae,
        scheduler_config,
        conditioner: Conditioner::Classes(ClassNames {
            labels,
            num_classes,
        }),
        device: opts.device,
        text_device: opts.text_device(),
        prompt_cache: super::PromptCache::new(0),
        kind: opts.kind,
    })
}

impl Pipeline {
    /// The classes of a DiT pipeline; an error naming the fix for a text-to-image one.
    pub fn classes(&self) -> Result<&ClassNames, PipelineError> {
        match &self.conditioner {
            Conditioner::Classes(names) => Ok(names),
            Conditioner::Text { .. }
            | Conditioner::Sd3(_)
            | Conditioner::Flux(_)
            | Conditioner::ZImage(_) => Err(PipelineError::Request(
                "this is a text-to-image pipeline: give prompts, not class labels".into(),
            )),
        }
    }

    /// The conditioning of `n` images on the null class: DiT's training drops a label to it
    /// (`LabelEmbedder.token_drop`) so that guidance has an unconditional model to push from.
    pub fn null_class_condition(&self, n: usize) -> Result<Conditioning, PipelineError> {
        let names = self.classes()?;
        Ok(Conditioning {
            inputs: Condition::Classes(names.model_labels(
                &vec![names.num_classes; n],
                false,
                self.device,
            )),
            cfg: None,
        })
    }

    fn dit(&self) -> Result<&DiTTransformer2DModel, PipelineError> {
        match &self.backbone {
            Backbone::DiT(d) => Ok(d),
            Backbone::UNet(_) | Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_) => {
                Err(PipelineError::Request(
                    "this is a text-to-image pipeline: give prompts, not class labels".into(),
                ))
            }
        }
    }

    /// Generates one image per requested class, batched, as DiTPipeline does.
    pub fn generate_classes(
        &self,
        req: ClassRequest,
        noise: &mut dyn NoiseSource,
    ) -> Result<Generated, PipelineError> {
        let (names, config) = (self.classes()?, &self.dit()?.config);
        if req.class_labels.is_empty() {
            return Err(PipelineError::Request(
                "no class labels given; ask for at least one image".into(),
            ));
        }
        let n = names.num_classes();
        if let Some(bad) = req.class_labels.iter().find(|&&c| !(0..n).contains(&c)) {
            return Err(PipelineError::Request(format!(
                "class {bad} is out of range 0..{n}"
            )));
        }
        let side = req.latent_size.unwrap_or(config.sample_size) * self.vae_scale_factor();
        let scheduler = self.scheduler(req.timesteps, side, side)?;
        let learned = scheduler.learns_variance();
        if learned && !self.backbone.learns_variance() {
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
        let cond = Conditioning {
            inputs: Condition::Classes(names.model_labels(
                &req.class_labels,
                guidance.is_some(),
                self.device,
            )),
            cfg: guidance,
        };
        let c = config.in_channels;
        let mut denoiser = |x: &Tensor, t: f64| {
            let out = self.predict(&cond, x, t);
            if learned {
                out
            } else {
                out.narrow(1, 0, c)
            }
        };
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
