//! `pso online` and `pso offline`: training runs from a run config.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use pso::config::RunConfig;
use pso::run::offline::OfflineOptions;
use pso::run::online::{OnlineOptions, Scorers};
use pso::run::{offline, online, run_path};
use reward::{build_scorer, Scorer, ScorerSpec};

#[derive(Args)]
pub struct ConfigArgs {
    /// Run config (TOML); see docs/configuration.md.
    #[arg(long)]
    config: PathBuf,
    /// Override a key: --set optim.lr=2e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Also log to TensorBoard event files in RUN/tensorboard/ (run.tensorboard = true):
    /// `tensorboard --logdir runs/`, or `wandb sync --sync-tensorboard RUN/tensorboard`.
    #[arg(long)]
    tensorboard: bool,
}

impl ConfigArgs {
    /// The config file with its `--set` overrides applied and every key checked.
    pub fn load(&self) -> Result<RunConfig> {
        let mut config = RunConfig::load(&self.config, &self.set)?;
        config.run.tensorboard |= self.tensorboard;
        Ok(config)
    }
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
pub struct OnlineArgs {
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
pub struct OfflineArgs {
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
    /// With --train-images and objective.kind = pso_db or offline_pso: the prompt of the fixed
    /// pool of reference images sampled once from the initial model, the subject's class ("a
    /// photo of a dog", as the official DreamBooth script's class prompt); sets
    /// objective.class_prompt.
    #[arg(long, requires = "train_images")]
    class_prompt: Option<String>,
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
    /// aesthetic, hpsv2, imagereward, mps, pixel, http, openai or composite; MODEL a model folder or
    /// hub id, a pixel metric, a URL, or a TOML file),
    /// e.g. aesthetic:models/aesthetic.
    #[arg(long, value_name = "SCORER:MODEL")]
    relabel_with: Option<String>,
    /// Bearer-token file of an http --relabel-with scorer.
    #[arg(long)]
    relabel_token_file: Option<PathBuf>,
}

/// Runs online PSO with the run's training and eval scorers, and prints where it ended.
pub fn online(args: OnlineArgs) -> Result<()> {
    let mut config = args.config.load()?;
    online::check(&config)?;
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
    let group = data_parallel(&mut config)?;
    let out = run_path(&config, args.out.as_deref());
    let r = &config.reward;
    let train: Arc<dyn Scorer> = build_scorer(r.scorer, &r.model, r.token_file.as_deref())
        .with_context(|| {
            format!(
                "the training scorer (reward.scorer = {}, reward.model = {})",
                r.scorer, r.model
            )
        })?
        .into();
    let eval = if config.eval.scorers.is_empty() {
        vec![(r.scorer.to_string(), train.clone())]
    } else {
        config
            .eval
            .scorers
            .iter()
            .map(|spec| {
                let scorer = scorer_from_spec(spec, r.token_file.as_deref())
                    .with_context(|| format!("eval scorer {spec}"))?;
                Ok((spec.clone(), scorer.into()))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let summary = online::run(
        &config,
        OnlineOptions {
            out: out.clone(),
            resume: args.resume,
            progress: std::io::stderr().is_terminal(),
            max_hours: args.max_hours,
            group: group.clone(),
        },
        Scorers { train, eval },
    )
    .with_context(|| format!("online run {}", out.display()))?;
    if group.is_some_and(|g| g.rank() != 0) {
        return Ok(());
    }
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

/// Joins the data-parallel group when torchrun (or Slurm) launched this process as one of
/// several, and puts the model on this rank's GPU (cuda:LOCAL_RANK) when the config asks for
/// CUDA. The group is NCCL on GPUs and Gloo on the CPU (`PSO_DIST_BACKEND=nccl|gloo` chooses);
/// `PSO_DIST_TIMEOUT` (seconds, default 300) bounds the rendezvous and every collective.
fn data_parallel(config: &mut RunConfig) -> Result<Option<Arc<dist::ProcessGroup>>> {
    let Some(launch) = dist::Launch::from_env()? else {
        return Ok(None);
    };
    if launch.world_size == 1 {
        return Ok(None);
    }
    let device = config.model.device.as_str();
    if device.starts_with("cuda") || (device == "auto" && tch::Cuda::is_available()) {
        config.model.device = format!("cuda:{}", launch.local_rank);
    }
    let seconds = match std::env::var("PSO_DIST_TIMEOUT") {
        Ok(v) => v.parse::<u64>().ok().filter(|&s| s > 0).with_context(|| {
            format!("PSO_DIST_TIMEOUT={v:?} is not a positive number of seconds")
        })?,
        Err(_) => 300,
    };
    let on_gpu = config.model.device.starts_with("cuda");
    let nccl = match std::env::var("PSO_DIST_BACKEND").as_deref() {
        Err(_) => on_gpu,
        Ok("nccl") => true,
        Ok("gloo") => false,
        Ok(other) => anyhow::bail!("PSO_DIST_BACKEND={other:?}: use nccl or gloo"),
    };
    if nccl && !on_gpu {
        anyhow::bail!(
            "PSO_DIST_BACKEND=nccl, but model.device = {:?}: NCCL reduces on GPUs; set \
             model.device = \"cuda\" or PSO_DIST_BACKEND=gloo",
            config.model.device
        );
    }
    tracing::info!(
        rank = launch.rank,
        world_size = launch.world_size,
        master = %format!("{}:{}", launch.master_addr, launch.master_port),
        backend = if nccl { "nccl" } else { "gloo" },
        "joining the data-parallel group"
    );
    let timeout = std::time::Duration::from_secs(seconds);
    let group = if nccl {
        dist::ProcessGroup::nccl(&launch, timeout)?
    } else {
        dist::ProcessGroup::gloo(&launch, timeout)?
    };
    Ok(Some(Arc::new(group)))
}

/// Trains on logged pairs or training images, and prints where the run ended.
pub fn offline(args: OfflineArgs) -> Result<()> {
    let mut config = args.config.load()?;
    if let Some(n) = args.max_steps {
        anyhow::ensure!(n >= 1, "--max-steps must be at least 1");
        config.learner.max_steps = n;
    }
    if let Some(prompt) = args.class_prompt {
        config.objective.class_prompt = Some(prompt);
    }
    let group = data_parallel(&mut config)?;
    let out = run_path(&config, args.out.as_deref());
    let relabel_with = match &args.relabel_with {
        None => None,
        Some(spec) => {
            let scorer = scorer_from_spec(spec, args.relabel_token_file.as_deref())
                .with_context(|| format!("--relabel-with {spec}"))?;
            Some(pso::run::relabel::Relabeler::new(scorer)?)
        }
    };
    let summary = offline::run(
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
            group: group.clone(),
        },
    )
    .with_context(|| format!("offline run {}", out.display()))?;
    if group.is_some_and(|g| g.rank() != 0) {
        return Ok(());
    }
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

/// A scorer from `KIND:MODEL` (eval scorers, `--relabel-with`).
fn scorer_from_spec(spec: &str, token_file: Option<&Path>) -> Result<Box<dyn Scorer>> {
    let spec: ScorerSpec = spec.parse()?;
    build_scorer(spec.kind, &spec.model, token_file)
        .with_context(|| format!("loading scorer model {}", spec.model))
}
