//! `pso sample`: images from a text-to-image pipeline, or class samples from a DiT.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use diffusion::pipeline::dit::ClassRequest;
use diffusion::pipeline::images::rgb_images;
use diffusion::pipeline::{GenerateRequest, LoadOptions, Pipeline};
use diffusion::sampling::{SchedulerKind, SeededNoise, Timesteps};
use pso::config::{resolve_device, DType, FlowKernelName};
use pso::peft::export::{apply_file, open_adapter, AdapterSource};
use pso::run::class_samples::{write_class_samples, ClassSamples};
use tch::Tensor;

use super::scheduler_kind;

#[derive(Args)]
pub struct SampleArgs {
    /// Diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/; a DiT has transformer/; SD3 /
    /// SD3.5 and FLUX.1 folders have transformer/ and T5 in text_encoder_3/ or _2/), or a Hub
    /// id such as stabilityai/sd-turbo (owner/name@REVISION for a branch, tag or refs/pr/N),
    /// looked up in the Hugging Face cache (HF_HOME) and downloaded into it unless
    /// HF_HUB_OFFLINE=1. Weights are read from .safetensors files only.
    #[arg(long)]
    model: String,
    /// Text prompt (text-to-image pipelines).
    #[arg(long, required_unless_present_any = ["class_label", "per_class"])]
    prompt: Option<String>,
    /// Class-conditional (DiT) pipelines: the classes to draw, one image each, as ids, id
    /// ranges (0..101 is 0 to 100) or names from the folder's id2label: --class-label 207,360 or
    /// --class-label "golden retriever". Use --guidance 4 and --steps 50 for DiTPipeline's
    /// defaults.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    class_label: Vec<String>,
    /// Evaluation samples for `pso eval fid`: N images of every --class-label (of every class
    /// when none is given), generated --batch-size at a time across classes into
    /// classCCCC_IIIII.png. Image I of class C uses seed SEED·2³² + C·N + I, so it does not
    /// depend on the batch size and other seeds share no image; a rerun into the same --out
    /// generates only the missing files, and refuses other settings than per_class.json's.
    #[arg(long, conflicts_with_all = ["prompt", "init_noise", "num_images"])]
    per_class: Option<u32>,
    /// Images per sampler call with --per-class.
    #[arg(long, default_value_t = 16, requires = "per_class")]
    batch_size: usize,
    /// Negative prompt (used only with guidance: --guidance > 1, for Z-Image > 0).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps, spaced as the model's scheduler config says.
    #[arg(long, default_value_t = 4, conflicts_with = "timesteps")]
    steps: usize,
    /// Explicit timesteps instead of --steps, noisiest first: --timesteps 999,749,499,249.
    #[arg(long, value_delimiter = ',')]
    timesteps: Option<Vec<u32>>,
    /// Classifier-free guidance scale; ≤ 1 means none (the distilled models' default). Z-Image
    /// reads it as ZImagePipeline's guidance_scale: any value > 0 guides (Turbo samples with 0).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Seed of the initial noise and of every noise the sampler draws (as diffusers'
    /// `generator=torch.Generator("cpu").manual_seed(SEED)`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels (default: --init-noise's, else the model's training size).
    #[arg(long)]
    height: Option<i64>,
    /// Image width in pixels (default: --init-noise's, else the model's training size).
    #[arg(long)]
    width: Option<i64>,
    /// Initial latents (safetensors, one f32 tensor `latents` [N, C, H/f, W/f]), exactly as
    /// diffusers' `latents=` argument: the same file gives the same image in both.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Trained weights to apply: a diffusers LoRA file, a DiffFit file, or a merged UNet / DiT
    /// transformer folder (what `pso export` writes); keep one DiffFit file per dataset and
    /// apply whichever the images are for.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Number of images (default 1, or N of --init-noise).
    #[arg(long)]
    num_images: Option<i64>,
    /// Weight precision (default: f32 on CPU, f16 on CUDA). VAEs whose config sets
    /// force_upcast (SDXL's) always run in f32.
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight-file variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).
    #[arg(long)]
    variant: Option<String>,
    /// A safetensors file with the denoiser's weights, replacing unet/'s (e.g. DMD2's distilled
    /// UNet in an SDXL base folder) or a DiT's transformer/'s; the layout comes from the
    /// folder's config.json.
    #[arg(long)]
    unet: Option<PathBuf>,
    /// Sampler replacing the folder's scheduler (keeping its settings), as a run's sampler.name.
    /// Regenerates a stored pair's image with its seed.
    #[arg(long, value_parser = scheduler_kind())]
    sampler: Option<SchedulerKind>,
    /// Flow-matching folders (SD3, FLUX, Z-Image) only: how the sampler steps: ode (diffusers' deterministic Euler, the
    /// default), or the stochastic kernels an online run samples with, renoise or sde
    /// (regenerates a stored pair's image with its seed).
    #[arg(long, value_enum)]
    flow_kernel: Option<FlowKernelName>,
    /// --flow-kernel sde: Flow-GRPO's noise level a.
    #[arg(long, default_value_t = 0.7)]
    noise_level: f64,
    /// Where the text encoders run, when not on --device (e.g. cpu: T5-XXL's 9.5 GB or Z-Image's
    /// Qwen3-4B's 8 GB stay off the GPU).
    #[arg(long)]
    text_encoder_device: Option<String>,
    /// T5 tokens per prompt of an SD3 / FLUX folder (default 256; FLUX.1-dev, whose transformer
    /// embeds guidance, 512); the most Qwen3 tokens of a Z-Image prompt (default 512).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Output directory: 000000.png, 000001.png, …
    #[arg(long)]
    out: PathBuf,
}

/// Most images one call generates at once (they are sampled as one batch).
const MAX_IMAGES: i64 = 1024;

impl SampleArgs {
    /// Refuses values that cannot make an image, before any model is loaded.
    fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            (1..=1000).contains(&self.steps),
            "--steps {} is not in 1..=1000",
            self.steps
        );
        anyhow::ensure!(
            self.guidance.is_finite() && self.guidance >= 0.0,
            "--guidance {} is not a finite number ≥ 0 (≤ 1 means no guidance)",
            self.guidance
        );
        for (flag, value) in [("--height", self.height), ("--width", self.width)] {
            if let Some(v) = value {
                anyhow::ensure!(
                    (8..=4096).contains(&v) && v % 8 == 0,
                    "{flag} {v} is not a multiple of 8 in 8..=4096"
                );
            }
        }
        if let Some(n) = self.num_images {
            anyhow::ensure!(
                (1..=MAX_IMAGES).contains(&n),
                "--num-images {n} is not in 1..={MAX_IMAGES}; larger sets: several calls with \
                 other --seed values, or --per-class for a DiT"
            );
        }
        anyhow::ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        anyhow::ensure!(
            self.noise_level.is_finite() && self.noise_level > 0.0,
            "--noise-level {} is not a finite value > 0",
            self.noise_level
        );
        anyhow::ensure!(self.per_class != Some(0), "--per-class must be at least 1");
        Ok(())
    }
}

/// Generates images (or DiT class samples) as the arguments ask.
pub fn run(args: SampleArgs) -> Result<()> {
    args.validate()?;
    let adapter = args
        .adapter
        .as_deref()
        .map(|p| open_adapter(p).with_context(|| format!("--adapter {}", p.display())))
        .transpose()?;
    let backbone_weights = match &adapter {
        Some(AdapterSource::Merged(weights)) => {
            anyhow::ensure!(
                args.unet.is_none(),
                "--unet and a merged --adapter folder both replace the model's weights; give one"
            );
            Some(weights.clone())
        }
        _ => args.unet.clone(),
    };
    let device = resolve_device(&args.device).map_err(anyhow::Error::msg)?;
    let dtype = args.dtype.unwrap_or(if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    });
    let opts = LoadOptions {
        device,
        kind: dtype.kind(),
        variant: args.variant.clone(),
        backbone_weights,
        max_sequence_length: args.max_sequence_length,
        text_encoder_device: args
            .text_encoder_device
            .as_deref()
            .map(resolve_device)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--text-encoder-device")?,
    };
    let root = hf::hub::resolve_model(&args.model, args.variant.as_deref())?;
    let init_latents = args
        .init_noise
        .as_deref()
        .map(read_init_noise)
        .transpose()?;
    let mut pipeline =
        Pipeline::load(&root, &opts).with_context(|| format!("loading {}", root.display()))?;
    for warning in pipeline.warnings() {
        tracing::warn!("{}: {warning}", root.display());
    }
    if let Some(kind) = args.sampler {
        pipeline.scheduler_config.kind = kind;
    }
    if let Some(kernel) = args.flow_kernel {
        anyhow::ensure!(
            pipeline.backbone.is_flow(),
            "--flow-kernel is for flow-matching (SD3, FLUX, Z-Image) folders; {} samples with \
             --sampler",
            root.display()
        );
        pipeline.scheduler_config.flow_kernel = kernel.kernel(args.noise_level);
    }
    if let (Some(AdapterSource::File(file)), Some(path)) = (adapter, &args.adapter) {
        let what = apply_file(&pipeline.backbone, &pipeline.backbone_vs, file, path)
            .with_context(|| format!("--adapter {}", path.display()))?;
        tracing::info!(adapter = %path.display(), "applied {what}");
    }
    if pipeline.is_class_conditional() {
        return sample_classes(&args, &root, &pipeline, init_latents);
    }
    let Some(prompt) = args.prompt.as_deref() else {
        anyhow::bail!(
            "{} is a text-to-image pipeline: give --prompt (--class-label and --per-class are for DiT \
             pipelines)",
            root.display()
        );
    };
    let num_images = match (&init_latents, args.num_images) {
        (Some(t), Some(n)) if t.size()[0] != n => anyhow::bail!(
            "--num-images {n} disagrees with --init-noise, which holds {} latents",
            t.size()[0]
        ),
        (Some(t), _) => t.size()[0],
        (None, n) => n.unwrap_or(1),
    };
    // Given latents fix the size; otherwise the model's training size.
    let (default_h, default_w) = match &init_latents {
        Some(t) if t.dim() == 4 => {
            let f = pipeline.vae_scale_factor();
            (t.size()[2] * f, t.size()[3] * f)
        }
        _ => pipeline.default_size(),
    };
    let timesteps = match args.timesteps {
        Some(list) => Timesteps::Explicit(list),
        None => Timesteps::Steps(args.steps),
    };
    let request = GenerateRequest {
        prompt,
        negative_prompt: args.negative_prompt.as_deref(),
        timesteps,
        guidance: args.guidance,
        height: args.height.unwrap_or(default_h),
        width: args.width.unwrap_or(default_w),
        num_images,
        init_latents,
        record: false,
    };
    let generated = pipeline.generate(request, &mut SeededNoise::new(args.seed))?;
    write_images(&generated.images, &args.out)
}

/// `--init-noise`: the f32 tensor `latents` of a safetensors file.
fn read_init_noise(path: &Path) -> Result<Tensor> {
    let tensors = Tensor::read_safetensors(path)
        .with_context(|| format!("reading --init-noise {}", path.display()))?;
    let latents = tensors
        .into_iter()
        .find(|(name, _)| name == "latents")
        .map(|(_, t)| t)
        .with_context(|| format!("{} holds no tensor named `latents`", path.display()))?;
    Ok(latents.to_kind(tch::Kind::Float))
}

/// Writes [N, H, W, 3] uint8 images as OUT/000000.png, … and prints each path.
fn write_images(images: &Tensor, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (i, image) in rgb_images(images).iter().enumerate() {
        let path = out.join(format!("{i:06}.png"));
        image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `pso sample` on a DiTPipeline folder: one image per --class-label.
fn sample_classes(
    args: &SampleArgs,
    root: &Path,
    pipeline: &Pipeline,
    init_latents: Option<Tensor>,
) -> Result<()> {
    anyhow::ensure!(
        args.prompt.is_none() && args.negative_prompt.is_none(),
        "{} is a class-conditional DiT pipeline: give --class-label instead of prompts",
        root.display()
    );
    anyhow::ensure!(
        !args.class_label.is_empty() || args.per_class.is_some(),
        "{} is a class-conditional DiT pipeline: give --class-label (ids or id2label names)",
        root.display()
    );
    let classes = pipeline.classes()?;
    let mut class_labels = Vec::new();
    for label in &args.class_label {
        match label
            .split_once("..")
            .map(|(a, b)| (a.trim().parse::<i64>(), b.trim().parse::<i64>()))
        {
            Some((Ok(start), Ok(end))) => {
                anyhow::ensure!(
                    start < end,
                    "--class-label {label} is an empty range: A..B runs from A to B − 1"
                );
                for id in start..end {
                    class_labels.push(classes.class_id(&id.to_string())?);
                }
            }
            _ => class_labels.push(classes.class_id(label)?),
        }
    }
    if let Some(n) = args.num_images {
        anyhow::ensure!(
            n == class_labels.len() as i64,
            "--num-images {n} disagrees with the {} --class-label values (one image each)",
            class_labels.len()
        );
    }
    let f = pipeline.vae_scale_factor();
    let latent_size = match (args.height, args.width) {
        (None, None) => None,
        (Some(h), Some(w)) if h == w && h % f == 0 => Some(h / f),
        (h, w) => anyhow::bail!(
            "DiT images are square multiples of {f} pixels: give --height and --width equal \
             (got {h:?} × {w:?})"
        ),
    };
    let timesteps = match &args.timesteps {
        Some(list) => Timesteps::Explicit(list.clone()),
        None => Timesteps::Steps(args.steps),
    };
    if let Some(per_class) = args.per_class {
        // Each class once, in the order given (an id and its name are the same class).
        let mut seen = HashSet::new();
        class_labels.retain(|c| seen.insert(*c));
        let req = ClassSamples {
            classes: if class_labels.is_empty() {
                (0..classes.num_classes()).collect()
            } else {
                class_labels
            },
            per_class,
            batch_size: args.batch_size,
            seed: args.seed,
            timesteps,
            guidance: args.guidance,
            latent_size,
            generator: format!(
                "{} (unet {:?}, adapter {:?}, sampler {:?})",
                args.model,
                args.unet,
                args.adapter,
                args.sampler.map(SchedulerKind::name)
            ),
            progress: std::io::stderr().is_terminal(),
        };
        let report = write_class_samples(pipeline, &req, &args.out)
            .with_context(|| format!("writing samples into {}", args.out.display()))?;
        println!(
            "{} images in {} ({} generated now, {} already there)",
            report.written + report.kept,
            args.out.display(),
            report.written,
            report.kept
        );
        return Ok(());
    }
    let request = ClassRequest {
        class_labels,
        timesteps,
        guidance: args.guidance,
        latent_size,
        init_latents,
        record: false,
    };
    let generated = pipeline.generate_classes(request, &mut SeededNoise::new(args.seed))?;
    write_images(&generated.images, &args.out)
}
