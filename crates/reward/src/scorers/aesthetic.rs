//! LAION's improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image
//! embedding. The prompt is not used.

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::clip_score::check_image_size;
use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};
use hf::clip::vision::l2_normalize;
use hf::clip::{ClipImageProcessor, ClipModel, ClipVisionModelWithProjection};
use hf::load::{build_and_load, weight_files, LoadError};

/// The MLP's weights, next to the CLIP model files (convert the published .pth with
/// scripts/convert_aesthetic.py).
pub const MLP_FILE: &str = "aesthetic.safetensors";

/// Widths after each linear layer of the published predictor (its input is the CLIP embedding).
const WIDTHS: [i64; 5] = [1024, 128, 64, 16, 1];
/// Their indices in the original `nn.Sequential` (dropouts sit between, and are identities at
/// inference); they name the weights `layers.N.weight`.
const INDICES: [usize; 5] = [0, 2, 4, 6, 7];

/// The predictor's MLP: five linear layers, no activations.
#[derive(Debug)]
pub struct AestheticMlp {
    layers: Vec<nn::Linear>,
}

impl AestheticMlp {
    /// Lays out the MLP under `p/layers/N` for `input`-wide embeddings.
    pub fn new(p: nn::Path, input: i64) -> Self {
        let mut width = input;
        let layers = WIDTHS
            .iter()
            .zip(INDICES)
            .map(|(&out, i)| {
                let layer = nn::linear(&p / "layers" / i, width, out, Default::default());
                width = out;
                layer
            })
            .collect();
        AestheticMlp { layers }
    }

    /// Scores `[B, input]` embeddings (already L2-normalised) into `[B]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.layers
            .iter()
            .fold(xs.shallow_clone(), |h, l| l.forward(&h))
            .squeeze_dim(-1)
    }
}

/// The aesthetic scorer.
#[derive(Debug)]
pub struct AestheticScorer {
    // tch tensors are Send but not Sync; the lock also serialises use of the device.
    model: Mutex<(ClipVisionModelWithProjection, AestheticMlp)>,
    processor: ClipImageProcessor,
    device: Device,
    info: ScorerInfo,
}

impl AestheticScorer {
    /// Loads `dir`: an HF CLIPModel folder of CLIP ViT-L/14 (config.json, model.safetensors,
    /// preprocessor_config.json; the text tower is not used) plus [`MLP_FILE`].
    pub fn load(dir: &Path, device: Device) -> Result<Self, RewardError> {
        let config = ClipModel::config(dir)?;
        let processor = ClipImageProcessor::from_dir(dir)?;
        check_image_size(dir, &processor, config.vision_config.image_size)?;
        let mlp_path = dir.join(MLP_FILE);
        if !mlp_path.exists() {
            return Err(LoadError::NotFound {
                path: mlp_path,
                what: "the aesthetic MLP; convert sac+logos+ava1-l14-linearMSE.pth with \
                       scripts/convert_aesthetic.py IN.pth DIR/aesthetic.safetensors"
                    .into(),
            }
            .into());
        }
        let (_vs, vision) = build_and_load(&weight_files(dir, None)?, device, Kind::Float, |p| {
            ClipVisionModelWithProjection::new(p, &config.vision_config, config.projection_dim)
        })?;
        let (_vs, mlp) = build_and_load(&[mlp_path], device, Kind::Float, |p| {
            AestheticMlp::new(p, config.projection_dim)
        })?;
        Ok(AestheticScorer {
            model: Mutex::new((vision, mlp)),
            processor,
            device,
            info: ScorerInfo {
                name: "aesthetic".into(),
                version: dir.display().to_string(),
                higher_is_better: true,
            },
        })
    }
}

#[async_trait]
impl Scorer for AestheticScorer {
    fn info(&self) -> ScorerInfo {
        self.info.clone()
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = self
            .processor
            .preprocess(items.iter().map(|it| it.image))
            .to_device(self.device);
        let model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let _guard = tch::no_grad_guard();
        let (vision, mlp) = &*model;
        let scores = mlp.forward(&l2_normalize(&vision.forward(&pixels).1));
        Vec::<f32>::try_from(scores.to_kind(Kind::Float).to_device(Device::Cpu)).map_err(|source| {
            RewardError::Torch {
                what: "reading aesthetic scores".into(),
                source,
            }
        })
    }
}
