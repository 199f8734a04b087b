//! `pso export`: a run's trained tensors as a diffusers LoRA, a DiffFit file or merged weights.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pso::checkpoint;
use pso::config::RunConfig;

/// Writes a run's trained tensors (latest checkpoint unless --checkpoint) as a diffusers LoRA
/// file, a DiffFit file, or a merged diffusers UNet folder; `pso sample --adapter` loads each.
#[derive(Args)]
pub struct ExportArgs {
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
    /// What to write.
    #[arg(long, value_enum)]
    format: pso::peft::export::ExportFormat,
    /// Output file (diffusers-lora, difffit) or folder (merged).
    #[arg(long)]
    out: PathBuf,
    /// A checkpoint directory of the run (default: the one RUN/checkpoints/latest names).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Export the EMA of the trainable tensors (runs with learner.ema_decay > 0).
    #[arg(long)]
    ema: bool,
}

/// Writes the run's trained tensors in the asked format and prints the path.
pub fn run(args: ExportArgs) -> Result<()> {
    let config_path = args.run.join("config.toml");
    let config = RunConfig::load(&config_path, &[])
        .with_context(|| format!("{} is not a run directory", args.run.display()))?;
    let dir = match args.checkpoint {
        Some(dir) => dir,
        None => checkpoint::latest(&args.run.join("checkpoints"))?.with_context(|| {
            format!(
                "{} has no checkpoint yet; train first (pso offline / pso online)",
                args.run.display()
            )
        })?,
    };
    let state = checkpoint::load(&dir)?.state;
    let tensors = checkpoint::load_trainable(&dir, args.ema)?;
    let written = pso::peft::export::export(
        &config,
        tensors,
        state.counters.step,
        args.format,
        &args.out,
    )?;
    println!("{}", written.display());
    Ok(())
}
