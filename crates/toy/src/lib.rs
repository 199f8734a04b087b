//! The embedded default model. `pso toy build` renders a procedural dataset of captioned shapes
//! ([`shapes`]), trains a tiny latent diffusion model of SD's architecture on it (CLIP text
//! encoder, AutoencoderKL, UNet2DConditionModel: [`train`]), distills it to 1–4 steps by latent
//! consistency distillation ([`distill`]), trains a classifier that judges samples
//! ([`classifier`]) and writes a diffusers folder that this crate and diffusers both load.

pub mod classifier;
pub mod distill;
pub mod shapes;
pub mod train;
pub mod vocab;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use classifier::{Accuracy, Classifier};
use diffusion::pipeline::images::rgb_images;
use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline, PipelineError};
use diffusion::sampling::{lcm::Lcm, SchedulerConfig, SchedulerKind, SeededNoise, Timesteps};
use shapes::Attributes;

/// Errors of the toy model's build and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum ToyError {
    /// libtorch failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Tokenizing failed.
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    /// Loading or sampling the written pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be read as the toy model's.
    #[error("{path}: {why}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
}

/// How much training each stage gets.
#[derive(Debug, Clone, Serialize)]
pub struct BuildOptions {
    /// Seed of every draw (dataset, initialisation, noise).
    pub seed: u64,
    /// Image side in pixels.
    pub side: u32,
    /// Autoencoder steps (batch 32).
    pub autoencoder_steps: usize,
    /// Encoded examples the diffusion model trains on.
    pub pool: usize,
    /// Teacher steps.
    pub teacher_steps: usize,
    /// Distillation steps.
    pub distill_steps: usize,
    /// Latents per teacher and distillation step.
    pub batch: usize,
    /// Classifier steps (batch 64).
    pub classifier_steps: usize,
    /// Captions sampled to measure accuracy.
    pub eval_samples: usize,
}

impl BuildOptions {
    /// The recipe of the committed model (data/toy).
    pub fn full(seed: u64) -> BuildOptions {
        BuildOptions {
            seed,
            side: 32,
            autoencoder_steps: 2000,
            pool: 16384,
            teacher_steps: 10000,
            distill_steps: 2000,
            batch: 32,
            classifier_steps: 600,
            eval_samples: 256,
        }
    }

    /// A build in seconds, for tests: the same code, far too little training to draw shapes.
    pub fn quick(seed: u64) -> BuildOptions {
        BuildOptions {
            seed,
            side: 32,
            autoencoder_steps: 3,
            pool: 64,
            teacher_steps: 3,
            distill_steps: 3,
            batch: 4,
            classifier_steps: 3,
            eval_samples: 4,
        }
    }
}

/// Caption accuracy of samples by sampler and step count.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyRow {
    /// Which model and sampler.
    pub sampler: String,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier readings vs the caption.
    pub accuracy: Accuracy,
    /// Mean Laplacian variance (see [`sharpness`]).
    pub sharpness: f64,
}

/// What a build did, written to OUT/build.json.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The options.
    pub options: BuildOptions,
    /// Final loss of each stage (mean of its last 50 steps).
    pub final_loss: HashMap<String, f64>,
    /// Seconds per stage.
    pub seconds: HashMap<String, f64>,
    /// The autoencoder's scaling factor.
    pub scaling_factor: f64,
    /// Classifier accuracy on fresh dataset images (its ceiling).
    pub classifier_on_data: Accuracy,
    /// Sharpness of dataset images (the reference for samples').
    pub data_sharpness: f64,
    /// Sharpness of the same images after the autoencoder (the ceiling for samples').
    pub reconstruction_sharpness: f64,
    /// Accuracy of the teacher (DDIM) and the distilled model (LCM) by step count.
    pub samples: Vec<AccuracyRow>,
}

/// Channels of the autoencoder levels: 32² images ↔ 4×8² latents.
const VAE_WIDTHS: [i64; 3] = [16, 32, 32];
/// Channels of the UNet levels (8² and 4²).
const UNET_WIDTHS: [i64; 2] = [32, 64];
/// Width of the text encoder.
const TEXT_WIDTH: i64 = 64;

/// `text_encoder/config.json` (a transformers CLIPTextModel).
fn text_config(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "projection_dim": TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": vocab::MAX_LENGTH,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "torch_dtype": "float16",
    })
}

/// `vae/config.json` (a diffusers AutoencoderKL, 32² → 4×8²).
fn vae_config(side: u32, scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": VAE_WIDTHS,
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": side,
        "scaling_factor": scaling_factor,
        "force_upcast": false,
    })
}

/// `unet/config.json` (a diffusers UNet2DConditionModel; cross-attention at the coarse level
/// and in the middle only, where it is cheap).
fn unet_config(side: u32) -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": side / 4,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": UNET_WIDTHS,
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": TEXT_WIDTH,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "use_linear_projection": true,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "act_fn": "silu",
    })
}

/// `scheduler/scheduler_config.json`: SD's noise schedule; LCM for the distilled model, DDIM
/// for the teacher.
fn scheduler_config(class: &str) -> Value {
    json!({
        "_class_name": class,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": false,
        "set_alpha_to_one": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "original_inference_steps": 50,
        "timestep_scaling": 10.0,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ToyError + '_ {
    move |source| ToyError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), ToyError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Writes `tensors` as f16 safetensors (diffusers and transformers read `format: pt`); the
/// file's order does not depend on theirs (safetensors sorts by dtype and name).
fn write_weights(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ToyError> {
    let half: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_kind(Kind::Half)))
        .collect();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    hf::tensor_file::write(path, &half, &metadata).map_err(|e| ToyError::Load {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// The parts of a pipeline folder.
struct Parts<'a> {
    text: (&'a Value, &'a [(String, Tensor)]),
    vae: (&'a Value, &'a [(String, Tensor)]),
    unet: (&'a Value, &'a [(String, Tensor)]),
    scheduler: &'a Value,
}

/// Writes a StableDiffusionPipeline folder.
fn write_pipeline(dir: &Path, parts: Parts) -> Result<(), ToyError> {
    let scheduler_class = parts.scheduler["_class_name"].clone();
    for sub in ["text_encoder", "tokenizer", "vae", "unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io(dir))?;
    }
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )?;
    let words = Attributes::words();
    let tokenizer_dir = dir.join("tokenizer");
    vocab::write(&tokenizer_dir, &words).map_err(io(&tokenizer_dir))?;
    write_json(&dir.join("text_encoder/config.json"), parts.text.0)?;
    write_weights(&dir.join("text_encoder/model.safetensors"), parts.text.1)?;
    write_json(&dir.join("vae/config.json"), parts.vae.0)?;
    write_weights(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        parts.vae.1,
    )?;
    write_json(&dir.join("unet/config.json"), parts.unet.0)?;
    write_weights(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        parts.unet.1,
    )?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        parts.scheduler,
    )
}

/// Mean over images of the variance of the luma's 4-neighbour Laplacian: blur lowers it.
pub fn sharpness(images: &[RgbImage]) -> f64 {
    let per_image = |img: &RgbImage| {
        let (w, h) = img.dimensions();
        let luma = |x: u32, y: u32| {
            let p = img.get_pixel(x, y).0;
            0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64
        };
        let values: Vec<f64> = (1..h - 1)
            .flat_map(|y| (1..w - 1).map(move |x| (x, y)))
            .map(|(x, y)| {
                luma(x - 1, y) + luma(x + 1, y) + luma(x, y - 1) + luma(x, y + 1) - 4.0 * luma(x, y)
            })
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64
    };
    images.iter().map(per_image).sum::<f64>() / images.len().max(1) as f64
}

/// Held-out captions for evaluation (a stream no training draw uses).
pub fn eval_captions(seed: u64, count: usize) -> Vec<Attributes> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xe7a1_0000);
    (0..count).map(|_| Attributes::random(&mut rng)).collect()
}

/// Samples one image per caption (seed = its index) from a pipeline folder.
pub fn sample_captions(
    pipeline: &Pipeline,
    captions: &[Attributes],
    timesteps: Timesteps,
    guidance: f64,
    side: u32,
) -> Result<Vec<RgbImage>, ToyError> {
    let mut images = Vec::with_capacity(captions.len());
    for (i, caption) in captions.iter().enumerate() {
        let generated = pipeline.generate(
            GenerateRequest {
                prompt: &caption.caption(),
                negative_prompt: None,
                timesteps: timesteps.clone(),
                guidance,
                height: side as i64,
                width: side as i64,
                num_images: 1,
                init_latents: None,
                record: false,
            },
            &mut SeededNoise::new(i as u64),
        )?;
        images.extend(rgb_images(&generated.images));
    }
    Ok(images)
}

/// Builds the toy model into `out` (pipeline/, classifier.safetensors, build.json).
pub fn build(
    out: &Path,
    options: &BuildOptions,
    progress: train::Progress,
) -> Result<BuildReport, ToyError> {
    let device = Device::Cpu;
    tch::manual_seed(options.seed as i64);
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut seconds = HashMap::new();
    let mut final_loss = HashMap::new();
    let mut last_losses: HashMap<String, Vec<f64>> = HashMap::new();
    let mut record = |stage: &str, step: usize, total: usize, loss: f64| {
        let recent = last_losses.entry(stage.to_owned()).or_default();
        recent.push(loss);
        if recent.len() > 50 {
            recent.remove(0);
        }
        progress(stage, step, total, loss);
    };
    std::fs::create_dir_all(out).map_err(io(out))?;

    let clock = Instant::now();
    let (classifier_vs, classifier) = Classifier::train(
        &mut rng,
        options.side,
        options.classifier_steps,
        64,
        device,
        |step, loss| record("classifier", step, options.classifier_steps, loss),
    )?;
    let classifier_path = out.join("classifier.safetensors");
    let classifier_tensors: Vec<_> = classifier_vs.variables().into_iter().collect();
    write_weights(&classifier_path, &classifier_tensors)?;
    seconds.insert("classifier".to_owned(), clock.elapsed().as_secs_f64());

    let clock = Instant::now();
    let vae_json = vae_config(options.side, 1.0);
    let vae_cfg = serde_json::from_value(vae_json.clone()).expect("a valid VAE config");
    let (vae_vs, vae) = train::autoencoder(
        &vae_cfg,
        &mut rng,
        options.side,
        options.autoencoder_steps,
        32,
        device,
        &mut record,
    )?;
    let (pool, scaling_factor) =
        train::LatentPool::encode(&vae, &mut rng, options.side, options.pool, device);
    seconds.insert("autoencoder".to_owned(), clock.elapsed().as_secs_f64());

    let clock = Instant::now();
    let work = out.join(".build");
    let tokenizer_dir = work.join("tokenizer");
    let vocab_size =
        vocab::write(&tokenizer_dir, &Attributes::words()).map_err(io(&tokenizer_dir))?;
    let text_json = text_config(vocab_size);
    let unet_json = unet_config(options.side);
    let unet_cfg = serde_json::from_value(unet_json.clone()).expect("a valid UNet config");
    let teacher = train::Denoiser::new(
        &serde_json::from_value(text_json.clone()).expect("a valid text config"),
        &unet_cfg,
        hf::clip::ClipTokenizer::from_dir(&tokenizer_dir)?,
        device,
    );
    let lcm_json = scheduler_config("LCMScheduler");
    let scheduler =
        SchedulerConfig::from_json(&lcm_json.to_string()).map_err(PipelineError::from)?;
    let alphas: Vec<f32> = diffusion::sampling::betas::alphas_cumprod(&scheduler)
        .into_iter()
        .map(|a| a as f32)
        .collect();
    let alphas = Tensor::from_slice(&alphas).to_device(device);
    train::teacher(
        &teacher,
        &pool,
        &alphas,
        &mut rng,
        options.teacher_steps,
        options.batch,
        &mut record,
    )?;
    seconds.insert("teacher".to_owned(), clock.elapsed().as_secs_f64());

    let clock = Instant::now();
    let schedule = distill::Schedule {
        alphas_cumprod: alphas.shallow_clone(),
        lcm: Lcm::new(&scheduler, Vec::new()),
    };
    let student = distill::distill(
        &teacher,
        &unet_cfg,
        &schedule,
        &pool,
        &mut rng,
        distill::DistillSettings {
            steps: options.distill_steps,
            batch: options.batch,
            guidance: 2.0,
            lr: 2e-4,
        },
        &mut record,
    )?;
    seconds.insert("distill".to_owned(), clock.elapsed().as_secs_f64());
    for (stage, losses) in &last_losses {
        final_loss.insert(
            stage.clone(),
            losses.iter().sum::<f64>() / losses.len().max(1) as f64,
        );
    }

    let vae_tensors: Vec<_> = vae_vs.variables().into_iter().collect();
    let vae_json = vae_config(options.side, scaling_factor);
    let text_tensors = teacher.part("text_encoder");
    let pipeline_dir = out.join("pipeline");
    write_pipeline(
        &pipeline_dir,
        Parts {
            text: (&text_json, &text_tensors),
            vae: (&vae_json, &vae_tensors),
            unet: (&unet_json, &student),
            scheduler: &lcm_json,
        },
    )?;
    let teacher_dir = work.join("teacher");
    write_pipeline(
        &teacher_dir,
        Parts {
            text: (&text_json, &text_tensors),
            vae: (&vae_json, &vae_tensors),
            unet: (&unet_json, &teacher.part("unet")),
            scheduler: &scheduler_config("DDIMScheduler"),
        },
    )?;

    let clock = Instant::now();
    let captions = eval_captions(options.seed, options.eval_samples);
    let mut data_rng = ChaCha8Rng::seed_from_u64(options.seed ^ 0xda7a);
    let data: Vec<_> = (0..options.eval_samples.max(64))
        .map(|_| shapes::example(&mut data_rng, options.side))
        .collect();
    let data_images: Vec<RgbImage> = data.iter().map(|e| e.image.clone()).collect();
    let data_truth: Vec<Attributes> = data.iter().map(|e| e.attributes).collect();
    let classifier_on_data = Accuracy::of(&classifier.predict(&data_images), &data_truth);
    let reconstructed = tch::no_grad(|| {
        let x = classifier::pixels(&data_images, device);
        let y = vae.decode(&vae.encode(&x).mean);
        let bytes = ((y / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([0, 2, 3, 1]);
        rgb_images(&bytes)
    });
    let load = |dir: &Path| {
        Pipeline::load(
            dir,
            &LoadOptions {
                device,
                kind: Kind::Float,
                variant: None,
                backbone_weights: None,
                max_sequence_length: None,
                text_encoder_device: None,
            },
        )
    };
    let mut samples = Vec::new();
    let mut judge = |name: &str, steps: usize, images: Vec<RgbImage>| {
        samples.push(AccuracyRow {
            sampler: name.to_owned(),
            steps,
            accuracy: Accuracy::of(&classifier.predict(&images), &captions),
            sharpness: sharpness(&images),
        });
    };
    let teacher_pipeline = load(&teacher_dir)?;
    let images = sample_captions(
        &teacher_pipeline,
        &captions,
        Timesteps::Steps(25),
        3.0,
        options.side,
    )?;
    judge("teacher, DDIM, guidance 3", 25, images);
    let mut distilled = load(&pipeline_dir)?;
    distilled.scheduler_config.kind = SchedulerKind::Lcm;
    for steps in [1, 2, 4] {
        let images = sample_captions(
            &distilled,
            &captions,
            Timesteps::Steps(steps),
            0.0,
            options.side,
        )?;
        judge("distilled, LCM", steps, images);
    }
    std::fs::remove_dir_all(&work).map_err(io(&work))?;
    seconds.insert("evaluate".to_owned(), clock.elapsed().as_secs_f64());

    let report = BuildReport {
        options: options.clone(),
        final_loss,
        seconds,
        scaling_factor,
        classifier_on_data,
        data_sharpness: sharpness(&data_images),
        reconstruction_sharpness: sharpness(&reconstructed),
        samples,
    };
    let path = out.join("build.json");
    write_json(
        &path,
        &serde_json::to_value(&report).expect("the report serializes"),
    )?;
    Ok(report)
}
