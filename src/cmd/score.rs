//! `pso score`: scores of images against a prompt, from any scorer kind.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use reward::{build_scorer, ScoreItem, ScorerKind};

use super::scorer_kind;

#[derive(Args)]
pub struct ScoreArgs {
    /// Which scorer.
    #[arg(long, value_parser = scorer_kind(ScorerKind::ALL))]
    scorer: ScorerKind,
    /// Model folder or hub id, pixel metric (pixel: centered, redness or size), URL (http),
    /// the judge's TOML file (openai: url, model, template; docs/reward-protocol.md), or the
    /// composite's TOML file ([[parts]] with scorer, model, weight, normalize; docs/configuration.md).
    /// clip, pickscore: an HF CLIPModel folder (config.json,
    /// model.safetensors, preprocessor_config.json, and tokenizer.json or vocab.json +
    /// merges.txt). aesthetic: a CLIP ViT-L/14 CLIPModel folder (the tokenizer is not needed)
    /// plus aesthetic.safetensors, made by scripts/convert_aesthetic.py from the LAION .pth.
    /// hpsv2: the CLIPModel folder scripts/convert_hpsv2.py makes from HPS_v2.1_compressed.pt.
    /// imagereward: the folder scripts/convert_imagereward.py makes from ImageReward.pt and
    /// med_config.json. mps: the folder scripts/convert_mps.py makes from
    /// MPS_overall_checkpoint.pth.
    #[arg(long)]
    model: String,
    /// Prompt the images are scored against.
    #[arg(long)]
    prompt: String,
    /// Bearer token file for an http scorer (or PSO_REWARD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print {"scores": [...]} as JSON (a composite adds "parts": each part's raw scores).
    #[arg(long)]
    json: bool,
    /// Images to score.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Scores every image and prints the scores in image order.
pub fn run(args: ScoreArgs) -> Result<()> {
    let images = args
        .images
        .iter()
        .map(|p| reward::open_image(p))
        .collect::<Result<Vec<_>, _>>()?;
    let scorer = build_scorer(args.scorer, &args.model, args.token_file.as_deref())
        .with_context(|| format!("loading scorer {}:{}", args.scorer, args.model))?;
    let items: Vec<ScoreItem> = images
        .iter()
        .map(|image| ScoreItem {
            prompt: &args.prompt,
            image,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut scores = Vec::with_capacity(items.len());
    let mut parts: Vec<(String, Vec<f32>)> = Vec::new();
    // Bounded batches keep memory flat for long image lists.
    for batch in items.chunks(16) {
        let scored = runtime.block_on(reward::score_parts_checked(scorer.as_ref(), batch))?;
        scores.extend(scored.scores);
        for (i, (name, raw)) in scored.parts.into_iter().enumerate() {
            match parts.get_mut(i) {
                Some((_, all)) => all.extend(raw),
                None => parts.push((name, raw)),
            }
        }
    }
    if args.json {
        let mut out = serde_json::json!({ "scores": scores });
        if !parts.is_empty() {
            out["parts"] = parts
                .into_iter()
                .map(|(name, raw)| (name, serde_json::json!(raw)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        println!("{out}");
    } else {
        for (score, path) in scores.iter().zip(&args.images) {
            println!("{score}\t{}", path.display());
        }
    }
    Ok(())
}
