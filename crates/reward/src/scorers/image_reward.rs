//! ImageReward (Xu et al. 2023): BLIP reads the prompt while cross-attending to the image, and
//! an MLP maps the [CLS] state to a reward, normalised by the training set's mean and std, as
//! `ImageReward.score` / `inference_rank` compute it (prompts padded to 35 tokens, images
//! resized and centre-cropped to 224 with bicubic resampling, CLIP's normalisation).
//!
//! The folder (scripts/convert_imagereward.py writes it from the official `ImageReward.pt` and
//! `med_config.json`): `config.json` ([`ImageRewardConfig`]), `model.safetensors` with the
//! checkpoint's own names (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`),
//! `tokenizer.json` (bert-base-uncased with BLIP's [DEC] and [ENC]) and
//! `preprocessor_config.json`.

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};
use hf::blip::{
    BertTokenizer, BlipTextConfig, BlipTextEncoder, BlipVisionConfig, BlipVisionTransformer,
};
use hf::clip::ClipImageProcessor;
use hf::load::LoadError;

/// The widths of ImageReward's MLP after the text width (its `nn.Sequential` of linear layers,
/// dropout between them, no activation).
const MLP_WIDTHS: [i64; 5] = [1024, 128, 64, 16, 1];
/// The positions of the linear layers in that `nn.Sequential`.
const MLP_INDICES: [i64; 5] = [0, 2, 4, 6, 7];

/// `config.json` of an ImageReward folder.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageRewardConfig {
    /// The image tower.
    pub vision: BlipVisionConfig,
    /// The text tower (BLIP's med_config.json).
    pub text: BlipTextConfig,
    /// Prompt length in tokens (35).
    pub max_length: usize,
    /// Mean of the raw reward (0.16717362830052426).
    pub mean: f64,
    /// Its standard deviation (1.0333394966054072).
    pub std: f64,
}

/// BLIP and the reward head.
#[derive(Debug)]
struct ImageRewardModel {
    vision: BlipVisionTransformer,
    text: BlipTextEncoder,
    mlp: Vec<nn::Linear>,
}

impl ImageRewardModel {
    fn new(p: nn::Path, c: &ImageRewardConfig) -> Self {
        let blip = &p / "blip";
        let mut width = c.text.hidden_size;
        let mlp = MLP_WIDTHS
            .iter()
            .zip(MLP_INDICES)
            .map(|(&out, i)| {
                let layer = nn::linear(&p / "mlp" / "layers" / i, width, out, Default::default());
                width = out;
                layer
            })
            .collect();
        ImageRewardModel {
            vision: BlipVisionTransformer::new(&blip / "visual_encoder", &c.vision),
            text: BlipTextEncoder::new(&blip / "text_encoder", &c.text),
            mlp,
        }
    }

    /// The raw reward [B] of prompt tokens (one row per image) and normalised pixels.
    fn forward(&self, ids: &Tensor, mask: &Tensor, pixels: &Tensor) -> Tensor {
        let image = self.vision.forward(pixels);
        let cls = self.text.forward(ids, mask, &image).select(1, 0);
        self.mlp
            .iter()
            .fold(cls.to_kind(Kind::Float), |x, layer| layer.forward(&x))
            .squeeze_dim(-1)
    }
}

/// The ImageReward scorer.
#[derive(Debug)]
pub struct ImageRewardScorer {
    // tch tensors are Send but not Sync; the lock also serialises use of the device.
    model: Mutex<ImageRewardModel>,
    tokenizer: BertTokenizer,
    processor: ClipImageProcessor,
    config: ImageRewardConfig,
    device: Device,
    info: ScorerInfo,
}

impl ImageRewardScorer {
    /// Loads an ImageReward folder (see the module documentation).
    pub fn load(dir: &Path, device: Device) -> Result<Self, RewardError> {
        let config: ImageRewardConfig = hf::load::read_config(dir)?;
        if !(config.std.is_finite() && config.std > 0.0 && config.mean.is_finite()) {
            return Err(LoadError::Unsupported {
                path: dir.join("config.json"),
                why: format!(
                    "mean {} and std {}: std must be positive and both finite (ImageReward's: \
                     0.16717362830052426, 1.0333394966054072)",
                    config.mean, config.std
                ),
            }
            .into());
        }
        if config.text.encoder_width != config.vision.hidden_size {
            return Err(LoadError::Unsupported {
                path: dir.join("config.json"),
                why: format!(
                    "text.encoder_width {} must be the image tower's vision.hidden_size {}",
                    config.text.encoder_width, config.vision.hidden_size
                ),
            }
            .into());
        }
        let processor = ClipImageProcessor::from_dir(dir)?;
        super::clip_score::check_image_size(dir, &processor, config.vision.image_size)?;
        let tokenizer = BertTokenizer::from_dir(dir, config.max_length)?;
        let files = hf::load::weight_files(dir, None)?;
        let (_vs, model) = hf::load::build_and_load(&files, device, Kind::Float, |p| {
            ImageRewardModel::new(p, &config)
        })?;
        Ok(ImageRewardScorer {
            model: Mutex::new(model),
            tokenizer,
            processor,
            config,
            device,
            info: ScorerInfo {
                name: "imagereward".into(),
                version: dir.display().to_string(),
                higher_is_better: true,
            },
        })
    }
}

#[async_trait]
impl Scorer for ImageRewardScorer {
    fn info(&self) -> ScorerInfo {
        self.info.clone()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (unique, rows) = super::local::prompt_rows(items);
        let (ids, mask) = self.tokenizer.encode(&unique, self.device)?;
        let rows = Tensor::from_slice(&rows).to_device(self.device);
        let pixels = self
            .processor
            .preprocess(items.iter().map(|it| it.image))
            .to_device(self.device);
        let model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let _guard = tch::no_grad_guard();
        let raw = model.forward(
            &ids.index_select(0, &rows),
            &mask.index_select(0, &rows),
            &pixels,
        );
        let scores = (raw - self.config.mean) / self.config.std;
        Vec::<f32>::try_from(scores.to_device(Device::Cpu)).map_err(|source| RewardError::Torch {
            what: "reading imagereward scores".into(),
            source,
        })
    }
}
