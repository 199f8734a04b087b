//! Text-image agreement with a CLIPModel: PickScore (`logit_scale.exp() * cos`), CLIPScore
//! (`100 * max(cos, 0)`) and HPSv2 / HPSv2.1 (`cos`, on the OpenCLIP ViT-H/14 that
//! scripts/convert_hpsv2.py turns into a CLIPModel folder).

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use tch::{Device, Kind};

use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};
use hf::clip::{ClipImageProcessor, ClipModel, ClipTokenizer};
use hf::load::LoadError;

/// Which function of the cosine similarity is the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipMetric {
    /// `logit_scale.exp() * cos(text_embed, image_embed)`: PickScore's and any CLIPModel's logit.
    PickScore,
    /// CLIPScore (Hessel et al. 2021): `100 * max(cos, 0)`.
    ClipScore,
    /// HPSv2's score: the cosine itself (its img_score.py takes the diagonal of
    /// image_features @ text_features.T, both normalised, without the logit scale).
    Hpsv2,
}

/// A CLIPModel scorer.
#[derive(Debug)]
pub struct ClipScorer {
    // tch tensors are Send but not Sync; the lock also serialises use of the device.
    model: Mutex<ClipModel>,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
    metric: ClipMetric,
    info: ScorerInfo,
}

impl ClipScorer {
    /// Loads an HF CLIPModel folder: config.json, model.safetensors, preprocessor_config.json
    /// and the tokenizer (tokenizer.json, or vocab.json + merges.txt).
    pub fn load(dir: &Path, metric: ClipMetric, device: Device) -> Result<Self, RewardError> {
        let config = ClipModel::config(dir)?;
        let processor = ClipImageProcessor::from_dir(dir)?;
        check_image_size(dir, &processor, config.vision_config.image_size)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        if tokenizer.max_length() as i64 > config.text_config.max_position_embeddings {
            return Err(LoadError::Unsupported {
                path: dir.join("tokenizer_config.json"),
                why: format!(
                    "model_max_length {}: the text tower has {} positions \
                     (config.json text_config.max_position_embeddings)",
                    tokenizer.max_length(),
                    config.text_config.max_position_embeddings
                ),
            }
            .into());
        }
        let (_vs, model) = ClipModel::load(dir, device, Kind::Float)?;
        let name = match metric {
            ClipMetric::PickScore => "pickscore",
            ClipMetric::ClipScore => "clip",
            ClipMetric::Hpsv2 => "hpsv2",
        };
        Ok(ClipScorer {
            model: Mutex::new(model),
            tokenizer,
            processor,
            device,
            metric,
            info: ScorerInfo {
                name: name.into(),
                version: dir.display().to_string(),
                higher_is_better: true,
            },
        })
    }
}

/// The crop of the image processor must be the vision tower's input size.
pub(crate) fn check_image_size(
    dir: &Path,
    processor: &ClipImageProcessor,
    image_size: i64,
) -> Result<(), RewardError> {
    let side = image_size as u32;
    if processor.fixed_output_size() != Some((side, side)) {
        return Err(LoadError::Unsupported {
            path: dir.join("preprocessor_config.json"),
            why: format!(
                "output size {:?}: the vision tower takes {side}x{side} images (config.json \
                 vision_config.image_size); set do_center_crop and crop_size to match",
                processor.fixed_output_size()
            ),
        }
        .into());
    }
    Ok(())
}

#[async_trait]
impl Scorer for ClipScorer {
    fn info(&self) -> ScorerInfo {
        self.info.clone()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (unique, rows) = super::local::prompt_rows(items);
        let tokens = self.tokenizer.encode_batch(&unique, self.device)?;
        let pixels = self
            .processor
            .preprocess(items.iter().map(|it| it.image))
            .to_device(self.device);
        let model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let _guard = tch::no_grad_guard();
        let text = model
            .text_features(&tokens.input_ids, Some(&tokens.attention_mask))
            .index_select(0, &tch::Tensor::from_slice(&rows).to_device(self.device));
        let image = model.image_features(&pixels);
        let cos = ClipModel::paired_cosine(&text, &image);
        let scores = match self.metric {
            ClipMetric::PickScore => cos * model.logit_scale_exp(),
            ClipMetric::ClipScore => cos.clamp_min(0.0) * 100.0,
            ClipMetric::Hpsv2 => cos,
        };
        Vec::<f32>::try_from(scores.to_kind(Kind::Float).to_device(Device::Cpu)).map_err(|source| {
            RewardError::Torch {
                what: format!("reading {} scores", self.info.name),
                source,
            }
        })
    }
}
