//! The model-based scorers this crate runs in libtorch, by kind.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Device;

use super::{aesthetic, clip_score, image_reward, mps};
use crate::{RewardError, ScoreItem, Scorer};

/// The scorers this crate runs locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalScorerKind {
    /// CLIPScore, `100 * max(cos, 0)`, with any CLIPModel.
    Clip,
    /// `logit_scale.exp() * cos`, with PickScore or any CLIPModel.
    Pickscore,
    /// LAION's aesthetic predictor on CLIP ViT-L/14 image embeddings.
    Aesthetic,
    /// HPSv2 / HPSv2.1: `cos` on a converted OpenCLIP ViT-H/14 (scripts/convert_hpsv2.py).
    Hpsv2,
    /// ImageReward: BLIP and its reward head (scripts/convert_imagereward.py).
    Imagereward,
    /// MPS's overall score: CLIP-H and its cross model (scripts/convert_mps.py).
    Mps,
}

/// The distinct prompts of `items` in first-seen order, and each item's row among them: a
/// batch usually holds a few prompts with several images each, and each prompt is encoded once.
pub(crate) fn prompt_rows<'a>(items: &[ScoreItem<'a>]) -> (Vec<&'a str>, Vec<i64>) {
    let mut unique: Vec<&str> = Vec::new();
    let mut slot: HashMap<&str, i64> = HashMap::new();
    let rows = items
        .iter()
        .map(|it| {
            *slot.entry(it.prompt).or_insert_with(|| {
                unique.push(it.prompt);
                unique.len() as i64 - 1
            })
        })
        .collect();
    (unique, rows)
}

/// Loads a local scorer from a model folder (layouts: see each scorer's `load`).
pub fn load_local(
    kind: LocalScorerKind,
    dir: &Path,
    device: Device,
) -> Result<Box<dyn Scorer>, RewardError> {
    Ok(match kind {
        LocalScorerKind::Clip => Box::new(clip_score::ClipScorer::load(
            dir,
            clip_score::ClipMetric::ClipScore,
            device,
        )?),
        LocalScorerKind::Pickscore => Box::new(clip_score::ClipScorer::load(
            dir,
            clip_score::ClipMetric::PickScore,
            device,
        )?),
        LocalScorerKind::Aesthetic => Box::new(aesthetic::AestheticScorer::load(dir, device)?),
        LocalScorerKind::Hpsv2 => Box::new(clip_score::ClipScorer::load(
            dir,
            clip_score::ClipMetric::Hpsv2,
            device,
        )?),
        LocalScorerKind::Imagereward => {
            Box::new(image_reward::ImageRewardScorer::load(dir, device)?)
        }
        LocalScorerKind::Mps => Box::new(mps::MpsScorer::load(dir, device)?),
    })
}
