//! `pso eval`: evaluation of generated images (FID).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use pso::config::resolve_device;
use pso::fid::{frechet_distance, FeatureExtractor, FeatureStats};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Fréchet Inception Distance between a reference set and generated samples.
    ///
    /// Features come from the FID Inception-v3 weights you supply as TorchScript (e.g. NVIDIA's
    /// inception-2015-12-05.pt, which resizes to 299 itself), as a file or from a Hub
    /// repository through the HF cache; pso bundles no weights. Images are
    /// fed as float [N, 3, H, W] in 0..=255. The distance is pytorch-fid's: ‖μ₁ − μ₂‖² +
    /// Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) in float64. Use thousands of images (50 000 for the usual
    /// ImageNet numbers); generate them with `pso sample --per-class 50 …`.
    #[command(
        after_help = "Example:\n  pso sample --model facebook/DiT-XL-2-256 --per-class 50 --steps 250 \\\n    \
                      --sampler ddpm --guidance 1.5 --batch-size 64 --out samples\n  \
                      pso eval fid --inception inception-2015-12-05.pt \\\n    \
                      --reference imagenet_256_stats.npz --samples samples"
    )]
    Fid(FidArgs),
}

#[derive(Args)]
pub struct FidArgs {
    /// The reference: a folder of images, or pytorch-fid statistics (.npz with mu and sigma).
    #[arg(long)]
    reference: PathBuf,
    /// The folder of generated images (PNG / JPEG, one size).
    #[arg(long)]
    samples: PathBuf,
    /// The feature extractor: a TorchScript file mapping [N, 3, H, W] images in 0..=255 to
    /// features [N, D]; or a Hub model repository holding one, as owner/name/FILE or as
    /// owner/name when it has a single .pt or .torchscript file (HF cache, HF_HUB_OFFLINE as
    /// for --model).
    #[arg(long)]
    inception: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Also write the samples' statistics here (.npz), to use as a --reference later.
    #[arg(long)]
    save_stats: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Runs a `pso eval` subcommand.
pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Fid(args) => fid(args),
    }
}

/// Prints the FID between the reference and the samples.
fn fid(args: FidArgs) -> Result<()> {
    let device = resolve_device(&args.device).map_err(anyhow::Error::msg)?;
    let inception =
        hf::hub::resolve_file(&args.inception, &[".pt", ".torchscript"]).context("--inception")?;
    let extractor = FeatureExtractor::load(&inception, device)
        .with_context(|| format!("--inception {}", args.inception))?;
    let reference = if args.reference.is_dir() {
        extractor.folder_stats(&args.reference, args.batch_size)
    } else {
        FeatureStats::read_npz(&args.reference)
    }
    .with_context(|| format!("--reference {}", args.reference.display()))?;
    let samples = extractor
        .folder_stats(&args.samples, args.batch_size)
        .with_context(|| format!("--samples {}", args.samples.display()))?;
    if let Some(path) = &args.save_stats {
        samples
            .write_npz(path)
            .with_context(|| format!("--save-stats {}", path.display()))?;
    }
    println!("{}", frechet_distance(&reference, &samples)?);
    Ok(())
}
