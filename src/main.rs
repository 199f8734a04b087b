//! The `pso` command line: `main` → `try_main` → one handler per command (src/cmd/), each
//! parsing and checking its flags, then calling the library crates.

mod cmd;
mod doctor;
mod logging;
mod progress;

use std::process::ExitCode;

use anyhow::Result;
use clap::{ArgAction, Parser, Subcommand};
use logging::LogFormat;

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
    /// Show the libtorch this binary runs on, CUDA devices, bf16 support and threads; with
    /// --config, what the run needs in GPU memory.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// A run config whose memory needs to estimate (from the model folder's configs and
        /// safetensors headers; the model must be local or in the Hugging Face cache).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Override config keys: --set sampler.height=1024 (with --config).
        #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
        sets: Vec<String>,
    },
    /// Generate images with a (distilled) diffusion model.
    Sample(Box<cmd::sample::SampleArgs>),
    /// Score images against a prompt with a reward model.
    Score(cmd::score::ScoreArgs),
    /// Inspect, validate and import pair stores (Parquet).
    #[command(subcommand)]
    Pairs(cmd::pairs::PairsCommand),
    /// Run online PSO: sample pairs from the current model, score them, learn from them.
    Online(cmd::train::OnlineArgs),
    /// Run PSO (or DPO / SFT) on logged or imported pairs.
    Offline(cmd::train::OfflineArgs),
    /// Export a run's trained weights.
    Export(cmd::export::ExportArgs),
    /// Evaluate generated images.
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// Plot a run's metrics, evals and sample grids into one self-contained HTML page.
    ///
    /// Reads RUN/metrics.jsonl, RUN/eval.jsonl, RUN/samples/step-N.png and RUN/config.toml, and
    /// writes PNG plots (reward mean ± std and max, eval scores, loss, margin and accuracy,
    /// gradient norm and learning rate, throughput and time split: those the run logged) and
    /// index.html into OUT. The page inlines the plots, the first and the newest sample grids, a
    /// summary table and the config, so the one file can be mailed. Only reads RUN, so it is safe
    /// while the run trains; a last line cut short by a killed run is skipped with a warning.
    Report(cmd::report::ReportArgs),
    /// Serve a reward model over HTTP.
    #[command(subcommand)]
    Reward(cmd::reward::RewardCommand),
    /// Work with run configs.
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// Measure sampling, scoring and learner-step speed on this machine (JSON on stdout).
    ///
    /// Each case runs once to warm up, then the best (sample, score) or median (learn) of the
    /// timed runs counts. scripts/gpu-check.sh compares these with diffusers, transformers and
    /// PyTorch on the same models; bench/RESULTS.md holds the numbers.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Build and check the embedded tiny model (data/toy).
    #[command(subcommand)]
    Toy(cmd::toy::ToyCommand),
}

fn try_main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json, config, sets } => doctor::run(json, config.as_deref(), &sets)?,
        Command::Sample(args) => cmd::sample::run(*args)?,
        Command::Score(args) => cmd::score::run(args)?,
        Command::Pairs(command) => return cmd::pairs::run(command),
        Command::Online(args) => cmd::train::online(args)?,
        Command::Offline(args) => cmd::train::offline(args)?,
        Command::Export(args) => cmd::export::run(args)?,
        Command::Eval(command) => cmd::eval::run(command)?,
        Command::Report(args) => cmd::report::run(args)?,
        Command::Reward(command) => cmd::reward::run(command)?,
        Command::Config(command) => cmd::config::run(command)?,
        Command::Bench(command) => cmd::bench::run(command)?,
        Command::Toy(command) => cmd::toy::run(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose as i8 - cli.quiet as i8, cli.log_format);
    match try_main(cli) {
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
