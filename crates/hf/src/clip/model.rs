//! `CLIPModel`: both towers, their projections and `logit_scale`, loaded from an HF folder.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::config::ClipConfig;
use super::text::ClipTextModel;
use super::vision::{l2_normalize, ClipVisionModelWithProjection};
use crate::load::{build_and_load, check_dir, read_json, weight_files, LoadError};
use crate::HfError;

/// `CLIPModel`.
#[derive(Debug)]
pub struct ClipModel {
    /// Text tower with `text_projection`.
    pub text: ClipTextModel,
    /// Vision tower with `visual_projection`.
    pub vision: ClipVisionModelWithProjection,
    logit_scale: Tensor,
}

impl ClipModel {
    /// Lays out the model under `p`, with transformers' parameter names.
    pub fn new(p: nn::Path, c: &ClipConfig) -> Self {
        ClipModel {
            text: ClipTextModel::new(p.clone(), &c.text_config, Some(c.projection_dim)),
            vision: ClipVisionModelWithProjection::new(
                p.clone(),
                &c.vision_config,
                c.projection_dim,
            ),
            logit_scale: p.var("logit_scale", &[], nn::Init::Const(0.0)),
        }
    }

    /// Reads `dir/config.json` (a `CLIPConfig`). As in transformers, the keys of the legacy
    /// `text_config_dict` / `vision_config_dict` override those of `text_config` /
    /// `vision_config`.
    pub fn config(dir: &Path) -> Result<ClipConfig, HfError> {
        check_dir(dir)?;
        let path = dir.join("config.json");
        let mut value: serde_json::Value = read_json(&path)?;
        if let Some(object) = value.as_object_mut() {
            for tower in ["text_config", "vision_config"] {
                let Some(serde_json::Value::Object(legacy)) =
                    object.remove(&format!("{tower}_dict"))
                else {
                    continue;
                };
                let entry = object
                    .entry(tower)
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let Some(config) = entry.as_object_mut() {
                    config.extend(legacy);
                }
            }
        }
        let config: ClipConfig =
            serde_json::from_value(value).map_err(|source| LoadError::Json {
                path: path.clone(),
                source,
            })?;
        if let Some(why) = config.problem() {
            return Err(LoadError::Unsupported { path, why }.into());
        }
        Ok(config)
    }

    /// Loads an HF `CLIPModel` folder (config.json + model.safetensors) in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Self), HfError> {
        let config = Self::config(dir)?;
        Ok(build_and_load(
            &weight_files(dir, None)?,
            device,
            kind,
            |p| ClipModel::new(p, &config),
        )?)
    }

    /// Projected text embedding `[B, projection_dim]` of token ids `[B, T]` (`get_text_features`).
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.text
            .forward(input_ids, attention_mask)
            .text_embeds
            .expect("CLIPModel's text tower has a projection")
    }

    /// Projected image embedding `[B, projection_dim]` of pixel values (`get_image_features`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Tensor {
        self.vision.forward(pixel_values).1
    }

    /// Every token's projected text state `[B, T, projection_dim]` (`text_projection` of the
    /// final-normed hidden states) and the projected end-of-text state `[B, projection_dim]`, as
    /// MPS's `get_text_features` computes them.
    pub fn text_token_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let out = self.text.forward(input_ids, attention_mask);
        let tokens = self.text.project(&out.last_hidden_state);
        let eos = out
            .text_embeds
            .expect("CLIPModel's text tower has a projection");
        (tokens, eos)
    }

    /// Every token's projected image state `[B, 1 + patches, projection_dim]`:
    /// `visual_projection` of the last layer's output (no `post_layernorm`), as MPS's
    /// `get_image_features` computes it.
    pub fn image_token_features(&self, pixel_values: &Tensor) -> Tensor {
        let out = self.vision.vision_model.forward(pixel_values);
        self.vision.project(&out.last_hidden_state)
    }

    /// `exp(logit_scale)`, the temperature of `logits_per_image`.
    pub fn logit_scale_exp(&self) -> Tensor {
        self.logit_scale.exp()
    }

    /// Cosine similarity of row i of `text_embeds` with row i of `image_embeds`, `[B]`.
    pub fn paired_cosine(text_embeds: &Tensor, image_embeds: &Tensor) -> Tensor {
        (l2_normalize(text_embeds) * l2_normalize(image_embeds)).sum_dim_intlist(
            -1,
            false,
            Kind::Float,
        )
    }

    /// transformers' `logits_per_image` `[images, texts]`: scaled cosine of every pair.
    pub fn logits_per_image(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Tensor {
        l2_normalize(image_embeds).matmul(&l2_normalize(text_embeds).tr()) * self.logit_scale_exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::Activation;

    fn config(json: &str) -> Result<ClipConfig, HfError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        ClipModel::config(dir.path())
    }

    #[test]
    fn legacy_config_dicts_override_the_tower_configs() {
        let c = config(
            r#"{"projection_dim": 1024,
                "text_config": {"hidden_act": "quick_gelu", "hidden_size": 64},
                "text_config_dict": {"hidden_act": "gelu"},
                "vision_config_dict": {"patch_size": 14}}"#,
        )
        .unwrap();
        assert_eq!(c.text_config.hidden_act, Activation::Gelu);
        assert_eq!(c.text_config.hidden_size, 64);
        assert_eq!(c.vision_config.patch_size, 14);
        assert_eq!(c.vision_config.image_size, 224);
        assert_eq!(c.projection_dim, 1024);
    }

    #[test]
    fn an_unknown_activation_names_the_file_and_the_choices() {
        let err = config(r#"{"text_config": {"hidden_act": "gelu_new"}}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("config.json") && msg.contains("quick_gelu"),
            "{msg}"
        );
    }
}
