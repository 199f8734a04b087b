//! CLIP configs, deserialized straight from an HF `config.json` (`CLIPConfig`, or a bare
//! `CLIPTextConfig` in a diffusers `text_encoder/` folder). Missing keys take transformers'
//! defaults; keys this implementation does not need are ignored.

use serde::Deserialize;
use tch::Tensor;

/// The MLP nonlinearity (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's.
    QuickGelu,
    /// Exact (erf) GELU, e.g. OpenCLIP ViT-H (PickScore).
    Gelu,
}

impl Activation {
    /// Applies the nonlinearity.
    pub fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Activation::Gelu => xs.gelu("none"),
        }
    }
}

/// `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: i64,
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of each MLP.
    pub intermediate_size: i64,
    /// Output size of `text_projection` (CLIPTextModelWithProjection).
    pub projection_dim: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Context length (77 for CLIP).
    pub max_position_embeddings: i64,
    /// MLP nonlinearity.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// End-of-text id; 2 selects the legacy pooling rule (the position of the largest id).
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// A size this implementation cannot build a model with (libtorch or an integer division
    /// would panic on it), if any.
    pub fn problem(&self) -> Option<String> {
        tower_problem(
            "text_config",
            &[
                ("vocab_size", self.vocab_size),
                ("intermediate_size", self.intermediate_size),
                ("projection_dim", self.projection_dim),
                ("num_hidden_layers", self.num_hidden_layers),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
            self.hidden_size,
            self.num_attention_heads,
        )
    }
}

/// `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of each MLP.
    pub intermediate_size: i64,
    /// Output size of `visual_projection` (CLIPVisionModelWithProjection).
    pub projection_dim: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Input channels.
    pub num_channels: i64,
    /// Side of the (square) input image in pixels.
    pub image_size: i64,
    /// Side of a patch in pixels.
    pub patch_size: i64,
    /// MLP nonlinearity.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// A size this implementation cannot build a model with, if any.
    pub fn problem(&self) -> Option<String> {
        if self.patch_size >= 1 && self.image_size % self.patch_size != 0 {
            return Some(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        tower_problem(
            "vision_config",
            &[
                ("intermediate_size", self.intermediate_size),
                ("projection_dim", self.projection_dim),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_channels", self.num_channels),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
            ],
            self.hidden_size,
            self.num_attention_heads,
        )
    }
}

/// The first size of a tower that is not positive, or a width its heads do not divide.
fn tower_problem(
    tower: &str,
    sizes: &[(&str, i64)],
    hidden_size: i64,
    heads: i64,
) -> Option<String> {
    if let Some((key, value)) = sizes
        .iter()
        .chain(&[("hidden_size", hidden_size), ("num_attention_heads", heads)])
        .find(|(_, v)| *v < 1)
    {
        return Some(format!("{tower}.{key} = {value} (must be at least 1)"));
    }
    (hidden_size % heads != 0).then(|| {
        format!("{tower}: hidden_size {hidden_size} is not divisible into {heads} attention heads")
    })
}

/// `CLIPConfig`: both towers and the shared embedding size.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    /// The text tower.
    pub text_config: ClipTextConfig,
    /// The vision tower.
    pub vision_config: ClipVisionConfig,
    /// Size of the joint text-image embedding.
    pub projection_dim: i64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
        }
    }
}

impl ClipConfig {
    /// A size this implementation cannot build a model with, if any.
    pub fn problem(&self) -> Option<String> {
        if self.projection_dim < 1 {
            return Some(format!(
                "projection_dim = {} (must be at least 1)",
                self.projection_dim
            ));
        }
        self.text_config
            .problem()
            .or_else(|| self.vision_config.problem())
    }
}

/// A component's `config.json` as saved by transformers: its config and the `architectures` it
/// was saved from.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile<C> {
    /// The model config.
    #[serde(flatten)]
    pub config: C,
    /// Model classes, e.g. `["CLIPTextModelWithProjection"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_a_tower_cannot_be_built_with_are_refused_by_name() {
        assert_eq!(ClipConfig::default().problem(), None);
        let mut bad = ClipConfig::default();
        bad.text_config.num_attention_heads = 0;
        assert_eq!(
            bad.problem().unwrap(),
            "text_config.num_attention_heads = 0 (must be at least 1)"
        );
        let mut bad = ClipConfig::default();
        bad.vision_config.hidden_size = 100;
        assert!(bad.problem().unwrap().contains("hidden_size 100"));
        let mut bad = ClipConfig::default();
        bad.vision_config.patch_size = 30;
        assert!(bad.problem().unwrap().contains("patch_size 30"));
    }
}
