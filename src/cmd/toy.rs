//! `pso toy build`: the embedded default model, trained from scratch.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::ProgressBar;
use toy::{build, BuildOptions};

use crate::progress::stage_bar;

#[derive(Subcommand)]
pub enum ToyCommand {
    /// Train the embedded default model from scratch on CPU: render a seeded dataset of
    /// captioned shapes, train a tiny SD-architecture model on it (CLIP text encoder,
    /// AutoencoderKL, UNet), distill it to 1–4 LCM steps by latent consistency distillation,
    /// train the shape/colour classifier that judges samples, and report caption accuracy of
    /// 1-, 2- and 4-step samples. Writes OUT/pipeline (a diffusers folder),
    /// OUT/classifier.safetensors and OUT/build.json. The committed data/toy was made by
    /// `pso toy build --seed 0` (about 35 minutes on 2 cores).
    Build {
        /// Output folder.
        #[arg(long, default_value = "data/toy")]
        out: PathBuf,
        /// Seed of the dataset, the initialisation and every noise draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A build in seconds with far too little training (for checking the plumbing).
        #[arg(long)]
        quick: bool,
        /// Teacher training steps (default 10000).
        #[arg(long)]
        teacher_steps: Option<usize>,
        /// Distillation steps (default 2000).
        #[arg(long)]
        distill_steps: Option<usize>,
    },
}

/// Runs a `pso toy` subcommand.
pub fn run(command: ToyCommand) -> Result<()> {
    let ToyCommand::Build {
        out,
        seed,
        quick,
        teacher_steps,
        distill_steps,
    } = command;
    let mut options = if quick {
        BuildOptions::quick(seed)
    } else {
        BuildOptions::full(seed)
    };
    options.teacher_steps = teacher_steps.unwrap_or(options.teacher_steps);
    options.distill_steps = distill_steps.unwrap_or(options.distill_steps);
    let terminal = std::io::stderr().is_terminal();
    let mut bar: Option<(String, ProgressBar)> = None;
    let mut progress = |stage: &str, step: usize, total: usize, loss: f64| {
        if bar.as_ref().is_none_or(|(s, _)| s != stage) {
            let b = stage_bar(stage, total as u64);
            if let Some((_, old)) = bar.replace((stage.to_owned(), b)) {
                old.finish();
            }
        }
        let (_, b) = bar.as_ref().expect("set above");
        b.set_position(step as u64 + 1);
        if !terminal && (step.is_multiple_of(200) || step + 1 == total) {
            tracing::info!(stage, step = step + 1, total, loss, "toy build");
        }
    };
    let report = build(&out, &options, &mut progress)
        .with_context(|| format!("building the toy model into {}", out.display()))?;
    if let Some((_, b)) = bar {
        b.finish();
    }
    println!("toy model written to {}", out.join("pipeline").display());
    println!(
        "classifier on dataset images: caption {:.3}",
        report.classifier_on_data.caption
    );
    println!(
        "{:28} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9}",
        "sampler", "steps", "caption", "shape", "colour", "size", "bg", "sharpness"
    );
    for row in &report.samples {
        let a = &row.accuracy;
        println!(
            "{:28} {:>5} {:>8.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>9.1}",
            row.sampler,
            row.steps,
            a.caption,
            a.shape,
            a.colour,
            a.size,
            a.background,
            row.sharpness
        );
    }
    println!(
        "sharpness of dataset images {:.1}, after the autoencoder {:.1}",
        report.data_sharpness, report.reconstruction_sharpness
    );
    Ok(())
}
