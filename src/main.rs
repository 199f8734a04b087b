//! The `pso` command line: parses arguments, loads configs, calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pso::config::RunConfig;
use pso::logging::{self, LogFormat};
use pso::pairs::import::{import_pickapic, ImportOptions};
use pso::pairs::inspect;

/// Tune timestep-distilled text-to-image models toward human preference with Pairwise Sample
/// Optimization (PSO), online or from logged pairs.
#[derive(Parser)]
#[command(name = "pso", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Start with `pso doctor`, then `scripts/demo.sh`. Docs: README.md and docs/."
)]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    quiet: u8,
    /// Shape of log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the libtorch this binary runs on, CUDA devices, bf16 support and threads.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate images with a (distilled) diffusion model.
    Sample(SampleArgs),
    /// Score images against a prompt with a reward model.
    Score(ScoreArgs),
    /// Inspect, validate and import pair stores (Parquet).
    #[command(subcommand)]
    Pairs(PairsCommand),
    /// Run online PSO: sample pairs from the current model, score them, learn from them.
    Online(OnlineArgs),
    /// Run PSO (or DPO / SFT) on logged or imported pairs.
    Offline(OfflineArgs),
    /// Export a run's trained weights.
    Export(ExportArgs),
    /// Serve a reward model over HTTP.
    #[command(subcommand)]
    Reward(RewardCommand),
    /// Work with run configs.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Args)]
struct SampleArgs {
    /// Diffusers folder or hub id.
    #[arg(long)]
    model: String,
    /// Text prompt.
    #[arg(long)]
    prompt: String,
    /// Negative prompt (used only with --guidance > 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale; ≤ 1 means none (the distilled models' default).
    #[arg(long)]
    guidance: Option<f32>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels.
    #[arg(long)]
    height: Option<u32>,
    /// Image width in pixels.
    #[arg(long)]
    width: Option<u32>,
    /// Initial latents (safetensors, one f32 tensor `latents` [N, C, H/f, W/f]), as diffusers'
    /// `latents=` argument.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Adapter to apply (LoRA, DiffFit).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Output directory: 000000.png, 000001.png, …
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScorerKind {
    Clip,
    Pickscore,
    Aesthetic,
    Http,
}

#[derive(Args)]
struct ScoreArgs {
    /// Which scorer.
    #[arg(long, value_enum)]
    scorer: ScorerKind,
    /// Model folder, or URL (http). clip, pickscore: an HF CLIPModel folder (config.json,
    /// model.safetensors, preprocessor_config.json, and tokenizer.json or vocab.json +
    /// merges.txt). aesthetic: a CLIP ViT-L/14 CLIPModel folder (the tokenizer is not needed)
    /// plus aesthetic.safetensors, made by scripts/convert_aesthetic.py from the LAION .pth.
    #[arg(long)]
    model: String,
    /// Prompt the images are scored against.
    #[arg(long)]
    prompt: String,
    /// Bearer token file for an http scorer (or PSO_REWARD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print {"scores": [...]} as JSON.
    #[arg(long)]
    json: bool,
    /// Images to score.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum PairsCommand {
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
enum ImportFormat {
    /// Pick-a-Pic v2: caption, jpg_0, jpg_1, label_0, label_1.
    Pickapic,
}

#[derive(Args)]
struct ConfigArgs {
    /// Run config (TOML); see docs/configuration.md.
    #[arg(long)]
    config: PathBuf,
    /// Override a key: --set optim.lr=2e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct OnlineArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run directory (default: run.out/run.name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct OfflineArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Pair shards or store directories.
    #[arg(long, required = true)]
    pairs: Vec<PathBuf>,
    /// Run directory (default: run.out/run.name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    DiffusersLora,
    Difffit,
    Merged,
}

#[derive(Args)]
struct ExportArgs {
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
    /// What to write.
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output file or folder.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum RewardCommand {
    /// Serve a local scorer over the HTTP reward protocol.
    Serve {
        /// Which scorer.
        #[arg(long, value_enum)]
        scorer: ScorerKind,
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        bind: String,
        /// File holding the bearer token clients must send.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the fully resolved config (defaults filled in, overrides applied).
    Show(ConfigArgs),
}

/// A command the CLI knows but the library cannot run yet: exit 2, as for a usage error.
fn not_implemented(what: &str) -> Result<ExitCode> {
    eprintln!("error: `pso {what}` is not implemented yet");
    Ok(ExitCode::from(2))
}

fn load_config(args: &ConfigArgs) -> Result<RunConfig> {
    Ok(RunConfig::load(&args.config, &args.set)?)
}

fn progress_bar(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json } => {
            let report = pso::doctor::report();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Pairs(PairsCommand::Inspect { paths, json }) => {
            let summary = inspect::summarize(&paths)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.to_text());
            }
        }
        Command::Pairs(PairsCommand::Validate { paths }) => {
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
        Command::Pairs(PairsCommand::Import {
            format: ImportFormat::Pickapic,
            inputs,
            out,
            run_id,
            keep_ties,
            png,
        }) => {
            let bar = progress_bar("importing");
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
        Command::Config(ConfigCommand::Show(args)) => {
            print!("{}", load_config(&args)?.to_toml());
        }
        Command::Online(args) => {
            load_config(&args.config)?;
            return not_implemented("online");
        }
        Command::Offline(args) => {
            load_config(&args.config)?;
            return not_implemented("offline");
        }
        Command::Sample(_) => return not_implemented("sample"),
        Command::Score(args) => {
            let kind = match args.scorer {
                ScorerKind::Clip => reward::LocalScorerKind::Clip,
                ScorerKind::Pickscore => reward::LocalScorerKind::Pickscore,
                ScorerKind::Aesthetic => reward::LocalScorerKind::Aesthetic,
                ScorerKind::Http => return not_implemented("score --scorer http"),
            };
            let images = args
                .images
                .iter()
                .map(|p| reward::open_image(p))
                .collect::<Result<Vec<_>, _>>()?;
            let device = tch::Device::cuda_if_available();
            let scorer = reward::load_local(kind, std::path::Path::new(&args.model), device)
                .with_context(|| format!("loading scorer model {}", args.model))?;
            let items: Vec<reward::ScoreItem> = images
                .iter()
                .map(|image| reward::ScoreItem {
                    prompt: &args.prompt,
                    image,
                })
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread().build()?;
            let mut scores = Vec::with_capacity(items.len());
            // Bounded batches keep memory flat for long image lists.
            for batch in items.chunks(16) {
                scores.extend(runtime.block_on(reward::score_checked(scorer.as_ref(), batch))?);
            }
            if args.json {
                println!("{}", serde_json::json!({ "scores": scores }));
            } else {
                for (score, path) in scores.iter().zip(&args.images) {
                    println!("{score}\t{}", path.display());
                }
            }
        }
        Command::Export(_) => return not_implemented("export"),
        Command::Reward(RewardCommand::Serve { .. }) => return not_implemented("reward serve"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose as i8 - cli.quiet as i8, cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Library errors already quote their source; print each cause only once.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}
