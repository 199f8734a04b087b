//! `pso pairs`: inspect, validate and import pair stores.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use pairs::import::{import_pickapic, ImportOptions};
use pairs::inspect;

use crate::progress::rows_bar;

#[derive(Subcommand)]
pub enum PairsCommand {
    /// Counts, ties, score statistics, schema versions and runs of pair shards.
    Inspect {
        /// Shard files or store directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read every row and name each bad file and row, and why. Exits 1 if any.
    Validate {
        /// Shard files or store directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Close the shards a crashed writer left open (`.parquet.tmp`) at their last flushed row
    /// group, as reopening the store with a writer would. Refuses a store whose writer runs.
    Recover {
        /// Store directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Import a human-preference dataset into a pair store.
    Import {
        /// Dataset layout.
        #[arg(long, value_enum)]
        format: ImportFormat,
        /// Input Parquet files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output store directory.
        #[arg(long)]
        out: PathBuf,
        /// Run id of the imported pairs.
        #[arg(long, default_value = "import-pickapic")]
        run_id: String,
        /// Keep ties (label 0.5) instead of skipping them.
        #[arg(long)]
        keep_ties: bool,
        /// Re-encode images as PNG instead of keeping their JPEG bytes.
        #[arg(long)]
        png: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ImportFormat {
    /// Pick-a-Pic v2: caption, jpg_0, jpg_1, label_0, label_1.
    Pickapic,
}

/// Runs a `pso pairs` subcommand; exits 1 when `validate` finds problems.
pub fn run(command: PairsCommand) -> Result<ExitCode> {
    match command {
        PairsCommand::Inspect { paths, json } => {
            let summary = inspect::summarize(&paths)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.to_text());
            }
        }
        PairsCommand::Validate { paths } => {
            let (files, rows, problems) = inspect::validate(&paths)?;
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("ok: {files} files, {rows} pairs, no problems");
            } else {
                println!(
                    "{} problems in {files} files ({rows} rows read)",
                    problems.len()
                );
                return Ok(ExitCode::from(1));
            }
        }
        PairsCommand::Recover { dirs } => {
            for dir in &dirs {
                let report = pairs::recover_store(dir)
                    .with_context(|| format!("recovering {}", dir.display()))?;
                let lines = report.lines();
                if lines.is_empty() {
                    println!("{}: no open shard, nothing to recover", dir.display());
                }
                for line in lines {
                    println!("{line}");
                }
            }
        }
        PairsCommand::Import {
            format: ImportFormat::Pickapic,
            inputs,
            out,
            run_id,
            keep_ties,
            png,
        } => {
            let bar = rows_bar("importing");
            let opts = ImportOptions {
                out: out.clone(),
                run_id,
                keep_ties,
                reencode_png: png,
            };
            let report = import_pickapic(&inputs, &opts, &bar)
                .with_context(|| format!("importing into {}", out.display()))?;
            bar.finish_and_clear();
            println!(
                "imported {} pairs from {} rows of {} files into {} ({} ties skipped{})",
                report.imported,
                report.rows,
                report.files,
                out.display(),
                report.ties_skipped,
                if keep_ties {
                    ""
                } else {
                    "; --keep-ties keeps them"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
