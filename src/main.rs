//! The `pso` command line: parses arguments, loads configs, calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pso::config::{resolve_device, DType, RunConfig};
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
    Sample(Box<SampleArgs>),
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
    /// Evaluate generated images.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Plot a run's metrics, evals and sample grids into one self-contained HTML page.
    ///
    /// Reads RUN/metrics.jsonl, RUN/eval.jsonl, RUN/samples/step-N.png and RUN/config.toml, and
    /// writes PNG plots (reward mean ± std and max, eval scores, loss, margin and accuracy,
    /// gradient norm and learning rate, throughput and time split: those the run logged) and
    /// index.html into OUT. The page inlines the plots, the first and the newest sample grids, a
    /// summary table and the config, so the one file can be mailed. Only reads RUN, so it is safe
    /// while the run trains; a last line cut short by a killed run is skipped with a warning.
    Report(ReportArgs),
    /// Serve a reward model over HTTP.
    #[command(subcommand)]
    Reward(RewardCommand),
    /// Work with run configs.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Build and check the embedded tiny model (data/toy).
    #[command(subcommand)]
    Toy(ToyCommand),
}

#[derive(Subcommand)]
enum ToyCommand {
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

#[derive(Args)]
struct SampleArgs {
    /// Diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/; a DiT has transformer/), or a Hub
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
    /// Negative prompt (used only with --guidance > 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps, spaced as the model's scheduler config says.
    #[arg(long, default_value_t = 4, conflicts_with = "timesteps")]
    steps: usize,
    /// Explicit timesteps instead of --steps, noisiest first: --timesteps 999,749,499,249.
    #[arg(long, value_delimiter = ',')]
    timesteps: Option<Vec<u32>>,
    /// Classifier-free guidance scale; ≤ 1 means none (the distilled models' default).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Seed of the initial noise and of every noise the sampler draws (as diffusers'
    /// `generator=torch.Generator("cpu").manual_seed(SEED)`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels (default: the UNet's training size).
    #[arg(long)]
    height: Option<i64>,
    /// Image width in pixels (default: the UNet's training size).
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
    /// Sampler replacing the folder's scheduler (keeping its settings), as a run's sampler.name:
    /// euler, euler_ancestral, lcm, ddim or ddpm. Regenerates a stored pair's image with its seed.
    #[arg(long, value_parser = ["euler", "euler_ancestral", "lcm", "ddim", "ddpm"])]
    sampler: Option<String>,
    /// Output directory: 000000.png, 000001.png, …
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScorerKind {
    Clip,
    Pickscore,
    Aesthetic,
    /// A pixel statistic, no model: --model centered, redness or size.
    Pixel,
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

/// Samples K images per prompt from the current model (sampler section), scores them
/// (reward section), stores every pair in RUN/pairs/*.parquet and trains on them with online
/// PSO (objective.kind = online_pso). Writes RUN/config.toml, RUN/metrics.jsonl (one line per
/// step), RUN/eval.jsonl and RUN/samples/step-N.png (fixed-seed evaluation), and
/// RUN/checkpoints/step-N/. Ctrl-C or SIGTERM ends the step, flushes the pairs and checkpoints;
/// --resume continues, also after a crash.
#[derive(Args)]
#[command(
    after_help = "Example: pso online --config configs/sd-turbo-pickscore.toml \\\n  \
                  --set online.prompts_per_round=8 --max-hours 24\n\nThen: pso report RUN, \
                  pso export --run RUN --format diffusers-lora --out lora.safetensors"
)]
struct OnlineArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run directory (default: run.out/run.name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this many optimizer steps (overrides learner.max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Stop, with a checkpoint, after this many hours of this invocation.
    #[arg(long)]
    max_hours: Option<f64>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
}

/// Replays pairs with objective.kind = offline_pso (default β 5000), dpo or sft; LoRA, DiffFit
/// or full fine-tuning as peft.kind says. Writes RUN/config.toml, RUN/metrics.jsonl (one JSON
/// object per step) and RUN/checkpoints/step-N/; Ctrl-C finishes the step and checkpoints.
#[derive(Args)]
#[command(
    after_help = "Example: pso offline --config configs/sd-turbo-pickscore.toml \\\n  --set \
                  objective.kind=offline_pso --pairs runs/a/pairs --out runs/b --max-steps 500"
)]
struct OfflineArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Pair shards or store directories (a run's pairs/, or `pso pairs import` output).
    #[arg(long, num_args = 1.., required_unless_present = "train_images")]
    pairs: Vec<PathBuf>,
    /// Instead of --pairs: a folder of training images (style or subject; prompt in NAME.txt
    /// beside each, or --prompt), each paired against a fresh sample of the current model
    /// (objective.kind = pso_db or offline_pso). With objective.kind = sft (DiffFit's dataset
    /// fine-tuning): a folder with one sub-folder per class, named by a class id or an id2label
    /// name of a DiT (or a prompt of a text-to-image model); latents are encoded once, and a
    /// learned-variance DiT trains with iDDPM's hybrid loss. Either may also be a Parquet table
    /// of image + label: a .parquet file, or a folder of them such as a Hugging Face dataset
    /// (data/train-*.parquet with an Image and a ClassLabel or text column).
    #[arg(long, conflicts_with_all = ["pairs", "relabel_with"])]
    train_images: Option<PathBuf>,
    /// Prompt of training images that have no NAME.txt.
    #[arg(long, requires = "train_images")]
    prompt: Option<String>,
    /// The image column of a --train-images table (default: the Image feature of its metadata,
    /// else image, img, jpg, png, …).
    #[arg(long, requires = "train_images")]
    image_column: Option<String>,
    /// The split of a --train-images dataset folder: its files named SPLIT-*.parquet or under
    /// SPLIT/ (default: train, when the folder's files name a train split; else every file).
    #[arg(long, requires = "train_images")]
    split: Option<String>,
    /// The label column of a --train-images table (default: the ClassLabel feature of its
    /// metadata, else label, labels, class, text, caption, prompt).
    #[arg(long, requires = "train_images")]
    label_column: Option<String>,
    /// What a table's integer labels are: class ids of a DiT (the default for class-conditional
    /// models; a new dataset's classes 0..K train rows 0..K of the class table) or their
    /// ClassLabel names (the default for text-to-image models, as prompts; for a DiT, names
    /// looked up in its id2label).
    #[arg(long, value_enum, requires = "train_images")]
    label_as: Option<pso::run::images::LabelAs>,
    /// With --train-images and objective.kind = sft: draw each image's class (sub-folder or
    /// prompt) uniformly, then an image of it, so that rare classes are seen as often as common
    /// ones.
    #[arg(long, requires = "train_images")]
    class_balanced: bool,
    /// With --train-images and objective.kind = sft: mirror each drawn image left-right with
    /// probability 1/2 (both latents are encoded once and cached).
    #[arg(long, requires = "train_images")]
    random_flip: bool,
    /// Run directory (default: run.out/run.name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Train this many optimizer steps in total (sets learner.max_steps).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue from the run directory's latest checkpoint (same config required).
    #[arg(long)]
    resume: bool,
    /// Label every pair again as it is read, with SCORER:MODEL (scorer clip, pickscore,
    /// aesthetic or http; MODEL a model folder or URL), e.g. aesthetic:models/aesthetic.
    #[arg(long, value_name = "SCORER:MODEL")]
    relabel_with: Option<String>,
    /// Bearer-token file of an http --relabel-with scorer.
    #[arg(long)]
    relabel_token_file: Option<PathBuf>,
}

/// Writes a run's trained tensors (latest checkpoint unless --checkpoint) as a diffusers LoRA
/// file, a DiffFit file, or a merged diffusers UNet folder; `pso sample --adapter` loads each.
#[derive(Args)]
struct ExportArgs {
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

#[derive(Subcommand)]
enum EvalCommand {
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
struct FidArgs {
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

fn eval_fid(args: FidArgs) -> Result<()> {
    use pso::fid::{frechet_distance, FeatureExtractor, FeatureStats};
    let device = resolve_device(&args.device).map_err(anyhow::Error::msg)?;
    let inception = pso::pipeline::hub::resolve_file(&args.inception, &[".pt", ".torchscript"])
        .context("--inception")?;
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

/// Arguments of `pso report` (its help text is on `Command::Report`, where clap shows it).
#[derive(Args)]
#[command(after_help = "Example: pso report runs/sd-turbo-pickscore\nThen open \
                  runs/sd-turbo-pickscore/report/index.html in a browser, or mail it.")]
struct ReportArgs {
    /// Run directory: what `pso online` or `pso offline` wrote (their --out).
    run: PathBuf,
    /// Folder for index.html and the plots (default: RUN/report).
    #[arg(long)]
    out: Option<PathBuf>,
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
        /// Most items in one scorer call; requests from concurrent clients are batched up to it.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the fully resolved config (defaults filled in, overrides applied).
    Show(ConfigArgs),
}

/// The local model behind a scorer kind; `None` for `http`.
fn local_scorer_kind(kind: ScorerKind) -> Option<reward::LocalScorerKind> {
    match kind {
        ScorerKind::Clip => Some(reward::LocalScorerKind::Clip),
        ScorerKind::Pickscore => Some(reward::LocalScorerKind::Pickscore),
        ScorerKind::Aesthetic => Some(reward::LocalScorerKind::Aesthetic),
        ScorerKind::Pixel | ScorerKind::Http => None,
    }
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

fn offline(args: OfflineArgs) -> Result<()> {
    use pso::run::offline::{run, OfflineOptions};
    use pso::run::run_path;
    let mut config = load_config(&args.config)?;
    if let Some(n) = args.max_steps {
        anyhow::ensure!(n >= 1, "--max-steps must be at least 1");
        config.learner.max_steps = n;
    }
    let out = run_path(&config, args.out.as_deref());
    let relabel_with = match &args.relabel_with {
        None => None,
        Some(spec) => {
            let scorer = load_scorer(spec, args.relabel_token_file.as_deref())
                .with_context(|| format!("--relabel-with {spec}"))?;
            Some(pso::run::relabel::Relabeler::new(scorer)?)
        }
    };
    let summary = run(
        &config,
        OfflineOptions {
            pairs: args.pairs,
            train_images: args.train_images,
            prompt: args.prompt,
            columns: pso::run::image_table::TableColumns {
                image: args.image_column,
                label: args.label_column,
            },
            split: args.split,
            label_as: args.label_as,
            class_balanced: args.class_balanced,
            random_flip: args.random_flip,
            relabel_with,
            out: out.clone(),
            resume: args.resume,
            progress: std::io::stderr().is_terminal(),
        },
    )
    .with_context(|| format!("offline run {}", out.display()))?;
    let checkpoint = summary
        .checkpoint
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "{} after {} steps (last loss {}); checkpoint {checkpoint}",
        if summary.stopped { "stopped" } else { "done" },
        summary.steps,
        summary
            .last_loss
            .map_or("n/a".to_string(), |l| format!("{l:.5}")),
    );
    Ok(())
}

fn online(args: OnlineArgs) -> Result<()> {
    use pso::run::online::{check, run, OnlineOptions, Scorers};
    use pso::run::run_path;
    let mut config = load_config(&args.config)?;
    check(&config)?;
    if let Some(n) = args.max_steps {
        anyhow::ensure!(n >= 1, "--max-steps must be at least 1");
        config.learner.max_steps = n;
    }
    if let Some(h) = args.max_hours {
        anyhow::ensure!(
            h > 0.0 && h.is_finite(),
            "--max-hours must be a positive number"
        );
    }
    let out = run_path(&config, args.out.as_deref());
    let r = &config.reward;
    let train_spec = format!("{}:{}", r.scorer, r.model);
    let train: std::sync::Arc<dyn reward::Scorer> =
        load_scorer(&train_spec, r.token_file.as_deref())
            .with_context(|| {
                format!(
                    "the training scorer (reward.scorer = {}, reward.model = {})",
                    r.scorer, r.model
                )
            })?
            .into();
    let eval = if config.eval.scorers.is_empty() {
        vec![(r.scorer.clone(), train.clone())]
    } else {
        config
            .eval
            .scorers
            .iter()
            .map(|spec| {
                let scorer = load_scorer(spec, r.token_file.as_deref())
                    .with_context(|| format!("eval scorer {spec}"))?;
                Ok((spec.clone(), scorer.into()))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let summary = run(
        &config,
        OnlineOptions {
            out: out.clone(),
            resume: args.resume,
            progress: std::io::stderr().is_terminal(),
            max_hours: args.max_hours,
        },
        Scorers { train, eval },
    )
    .with_context(|| format!("online run {}", out.display()))?;
    println!(
        "{} after {} steps (last loss {})\n  run:         {}\n  pairs:       {}\n  samples:     {}\n  checkpoint:  {}",
        if summary.stopped { "stopped" } else { "done" },
        summary.steps,
        summary
            .last_loss
            .map_or("n/a".to_string(), |l| format!("{l:.5}")),
        out.display(),
        out.join("pairs").display(),
        out.join("samples").display(),
        summary
            .checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    Ok(())
}

/// A scorer from `KIND:MODEL` (a model folder, or a URL for `http`).
fn load_scorer(
    spec: &str,
    token_file: Option<&std::path::Path>,
) -> Result<Box<dyn reward::Scorer>> {
    let (kind, model) = spec
        .split_once(':')
        .context("expected SCORER:MODEL, e.g. pickscore:models/PickScore_v1")?;
    let kind =
        ScorerKind::from_str(kind, true).map_err(|e| anyhow::anyhow!("scorer {kind}: {e}"))?;
    if let ScorerKind::Pixel = kind {
        return Ok(Box::new(reward::scorers::pixel::PixelScorer::new(model)?));
    }
    Ok(match local_scorer_kind(kind) {
        Some(local) => {
            let root = pso::pipeline::hub::resolve_model(model, None)?;
            reward::load_local(local, &root, tch::Device::cuda_if_available())
                .with_context(|| format!("loading scorer model {model}"))?
        }
        None => {
            let options = reward::http::HttpScorerOptions {
                token: reward::http::load_token(token_file)?,
                ..Default::default()
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Box::new(runtime.block_on(reward::http::HttpScorer::connect(model, options))?)
        }
    })
}

fn export(args: ExportArgs) -> Result<()> {
    use pso::checkpoint;
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

fn report(args: ReportArgs) -> Result<()> {
    let out = args.out.unwrap_or_else(|| args.run.join("report"));
    let summary = pso::report::write_report(&args.run, &out).context("cannot write the report")?;
    println!("{}", summary.html.display());
    Ok(())
}

fn sample(args: SampleArgs) -> Result<()> {
    use pso::pipeline::{GenerateRequest, LoadOptions, Pipeline};
    use pso::sampling::{SeededNoise, Timesteps};

    use pso::peft::export::{apply_file, open_adapter, AdapterSource};
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
    };
    let root = pso::pipeline::hub::resolve_model(&args.model, args.variant.as_deref())?;
    let init_latents = args
        .init_noise
        .as_deref()
        .map(read_init_noise)
        .transpose()?;
    let mut pipeline =
        Pipeline::load(&root, &opts).with_context(|| format!("loading {}", root.display()))?;
    if let Some(name) = &args.sampler {
        pipeline.scheduler_config.kind = pso::sampling::SchedulerKind::from_name(name)?;
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
    let (default_h, default_w) = pipeline.default_size();
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
fn read_init_noise(path: &std::path::Path) -> Result<tch::Tensor> {
    let tensors = tch::Tensor::read_safetensors(path)
        .with_context(|| format!("reading --init-noise {}", path.display()))?;
    let latents = tensors
        .into_iter()
        .find(|(name, _)| name == "latents")
        .map(|(_, t)| t)
        .with_context(|| format!("{} holds no tensor named `latents`", path.display()))?;
    Ok(latents.to_kind(tch::Kind::Float))
}

/// Writes [N, H, W, 3] uint8 images as OUT/000000.png, … and prints each path.
fn write_images(images: &tch::Tensor, out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (i, image) in pso::run::label::rgb_images(images).iter().enumerate() {
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
    root: &std::path::Path,
    pipeline: &pso::pipeline::Pipeline,
    init_latents: Option<tch::Tensor>,
) -> Result<()> {
    use pso::pipeline::dit::ClassRequest;
    use pso::sampling::{SeededNoise, Timesteps};

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
        use pso::run::class_samples::{write_class_samples, ClassSamples};
        // Each class once, in the order given (an id and its name are the same class).
        let mut seen = std::collections::HashSet::new();
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
                args.model, args.unet, args.adapter, args.sampler
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
        Command::Toy(ToyCommand::Build {
            out,
            seed,
            quick,
            teacher_steps,
            distill_steps,
        }) => toy_build(&out, seed, quick, teacher_steps, distill_steps)?,
        Command::Config(ConfigCommand::Show(args)) => {
            print!("{}", load_config(&args)?.to_toml());
        }
        Command::Online(args) => online(args)?,
        Command::Offline(args) => offline(args)?,
        Command::Sample(args) => sample(*args)?,
        Command::Score(args) => {
            let images = args
                .images
                .iter()
                .map(|p| reward::open_image(p))
                .collect::<Result<Vec<_>, _>>()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let scorer: Box<dyn reward::Scorer> = match local_scorer_kind(args.scorer) {
                Some(kind) => {
                    let device = tch::Device::cuda_if_available();
                    reward::load_local(kind, std::path::Path::new(&args.model), device)
                        .with_context(|| format!("loading scorer model {}", args.model))?
                }
                None => {
                    let options = reward::http::HttpScorerOptions {
                        token: reward::http::load_token(args.token_file.as_deref())?,
                        ..Default::default()
                    };
                    Box::new(
                        runtime
                            .block_on(reward::http::HttpScorer::connect(&args.model, options))?,
                    )
                }
            };
            let items: Vec<reward::ScoreItem> = images
                .iter()
                .map(|image| reward::ScoreItem {
                    prompt: &args.prompt,
                    image,
                })
                .collect();
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
        Command::Export(args) => export(args)?,
        Command::Eval(EvalCommand::Fid(args)) => eval_fid(args)?,
        Command::Report(args) => report(args)?,
        Command::Reward(RewardCommand::Serve {
            scorer,
            model,
            bind,
            token_file,
            max_batch,
        }) => {
            let Some(kind) = local_scorer_kind(scorer) else {
                anyhow::bail!(
                    "`pso reward serve` serves a local model: \
                     use --scorer clip, pickscore or aesthetic"
                );
            };
            // Read the token before loading the model: a bad token file fails fast.
            let token = match &token_file {
                Some(file) => reward::http::load_token(Some(file))?,
                None => None,
            };
            let device = tch::Device::cuda_if_available();
            let scorer = reward::load_local(kind, std::path::Path::new(&model), device)
                .with_context(|| format!("loading scorer model {model}"))?;
            let options = reward::http::ServerOptions {
                token,
                max_batch,
                ..Default::default()
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (listener, addr) = reward::http::bind(&bind).await?;
                // Scripts and tests read this line to find the port when --bind asks for port 0.
                println!("listening on http://{addr}");
                std::io::Write::flush(&mut std::io::stdout())?;
                tracing::info!(scorer = %scorer.info(), %addr, max_batch, "serving protocol v1");
                reward::http::serve(listener, scorer, options, reward::http::shutdown_signal())
                    .await?;
                tracing::info!("reward server stopped");
                anyhow::Ok(())
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn toy_build(
    out: &std::path::Path,
    seed: u64,
    quick: bool,
    teacher_steps: Option<usize>,
    distill_steps: Option<usize>,
) -> Result<()> {
    use pso::toy::{build, BuildOptions};
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
            let b = if terminal {
                ProgressBar::new(total as u64)
            } else {
                ProgressBar::hidden()
            };
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(stage.to_owned());
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
    let report = build(out, &options, &mut progress)
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
