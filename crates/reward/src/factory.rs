//! The one place a scorer is built from its kind and model, for `pso score`, `pso reward serve`,
//! a run's training and eval scorers and `--relabel-with`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::http::{load_token, HttpPool, HttpScorer, HttpScorerOptions, JudgeConfig, OpenAiJudge};
use crate::scorers::composite::{Composite, CompositeConfig};
use crate::scorers::pixel::PixelScorer;
#[cfg(feature = "local")]
use crate::scorers::{load_local, LocalScorerKind};
use crate::{RewardError, Scorer};

/// Every kind of scorer pso builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScorerKind {
    /// CLIPScore, `100 * max(cos, 0)`, with any CLIPModel folder.
    Clip,
    /// `logit_scale.exp() * cos`, with PickScore or any CLIPModel folder.
    Pickscore,
    /// LAION's aesthetic predictor on CLIP ViT-L/14 image embeddings.
    Aesthetic,
    /// HPSv2 / HPSv2.1 (cosine on an OpenCLIP ViT-H/14 converted by scripts/convert_hpsv2.py).
    Hpsv2,
    /// ImageReward (BLIP and its MLP head; a folder made by scripts/convert_imagereward.py).
    Imagereward,
    /// MPS's overall score (CLIP-H and its cross model; a folder made by scripts/convert_mps.py).
    Mps,
    /// A pixel statistic, no model: `centered`, `redness` or `size`.
    Pixel,
    /// A remote scorer speaking the HTTP reward protocol; the model is its URL.
    Http,
    /// A VLM judge behind an OpenAI-compatible chat endpoint; the model is its TOML file.
    Openai,
    /// A weighted sum of normalised scorers; the model is its TOML file of `[[parts]]`.
    Composite,
}

impl ScorerKind {
    /// Every kind, in the order `--help` lists them.
    pub const ALL: [ScorerKind; 10] = [
        ScorerKind::Clip,
        ScorerKind::Pickscore,
        ScorerKind::Aesthetic,
        ScorerKind::Hpsv2,
        ScorerKind::Imagereward,
        ScorerKind::Mps,
        ScorerKind::Pixel,
        ScorerKind::Http,
        ScorerKind::Openai,
        ScorerKind::Composite,
    ];

    /// The name configs and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            ScorerKind::Clip => "clip",
            ScorerKind::Pickscore => "pickscore",
            ScorerKind::Aesthetic => "aesthetic",
            ScorerKind::Hpsv2 => "hpsv2",
            ScorerKind::Imagereward => "imagereward",
            ScorerKind::Mps => "mps",
            ScorerKind::Pixel => "pixel",
            ScorerKind::Http => "http",
            ScorerKind::Openai => "openai",
            ScorerKind::Composite => "composite",
        }
    }

    /// The CLIP-based model this kind loads from a folder, if it loads one.
    #[cfg(feature = "local")]
    pub fn local_model(self) -> Option<LocalScorerKind> {
        match self {
            ScorerKind::Clip => Some(LocalScorerKind::Clip),
            ScorerKind::Pickscore => Some(LocalScorerKind::Pickscore),
            ScorerKind::Aesthetic => Some(LocalScorerKind::Aesthetic),
            ScorerKind::Hpsv2 => Some(LocalScorerKind::Hpsv2),
            ScorerKind::Imagereward => Some(LocalScorerKind::Imagereward),
            ScorerKind::Mps => Some(LocalScorerKind::Mps),
            ScorerKind::Pixel | ScorerKind::Http | ScorerKind::Openai | ScorerKind::Composite => {
                None
            }
        }
    }

    /// Whether this kind scores in this process (everything but `http` and `openai`), so it can
    /// be served.
    pub fn is_local(self) -> bool {
        !matches!(self, ScorerKind::Http | ScorerKind::Openai)
    }
}

impl fmt::Display for ScorerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScorerKind {
    type Err = RewardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScorerKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = ScorerKind::ALL.iter().map(|k| k.name()).collect();
                RewardError::Config(format!(
                    "`{s}` is not a scorer; use one of: {}",
                    names.join(", ")
                ))
            })
    }
}

/// A scorer named as `KIND:MODEL` (eval scorers, `--relabel-with`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScorerSpec {
    /// Which scorer.
    pub kind: ScorerKind,
    /// Model folder or hub id, pixel metric, or URL for `http`.
    pub model: String,
}

impl FromStr for ScorerSpec {
    type Err = RewardError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (kind, model) = spec.split_once(':').ok_or_else(|| {
            RewardError::Config(format!(
                "`{spec}`: expected SCORER:MODEL, e.g. pickscore:models/PickScore_v1"
            ))
        })?;
        Ok(ScorerSpec {
            kind: kind.parse()?,
            model: model.to_owned(),
        })
    }
}

impl fmt::Display for ScorerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.model)
    }
}

/// Builds a scorer: a local model (a folder or hub id, on CUDA when there is one), a pixel
/// metric, or a connection to a reward server (checked with its health endpoint), whose bearer
/// token comes from `token_file` or `PSO_REWARD_TOKEN`.
pub fn build_scorer(
    kind: ScorerKind,
    model: &str,
    token_file: Option<&Path>,
) -> Result<Box<dyn Scorer>, RewardError> {
    match kind {
        ScorerKind::Clip
        | ScorerKind::Pickscore
        | ScorerKind::Aesthetic
        | ScorerKind::Hpsv2
        | ScorerKind::Imagereward
        | ScorerKind::Mps => local_model(kind, model),
        ScorerKind::Pixel => Ok(Box::new(PixelScorer::new(model)?)),
        ScorerKind::Http => {
            let options = HttpScorerOptions {
                token: load_token(token_file)?,
                ..Default::default()
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| RewardError::Config(format!("cannot start a tokio runtime: {e}")))?;
            // Several comma-separated URLs: replicas of one scorer, each batch spread over them.
            let urls: Vec<&str> = model.split(',').map(str::trim).collect();
            if urls.len() > 1 {
                return Ok(Box::new(
                    runtime.block_on(HttpPool::connect(&urls, options))?,
                ));
            }
            Ok(Box::new(
                runtime.block_on(HttpScorer::connect(model, options))?,
            ))
        }
        ScorerKind::Openai => {
            let config = JudgeConfig::load(Path::new(model))?;
            Ok(Box::new(OpenAiJudge::new(config, load_token(token_file)?)?))
        }
        ScorerKind::Composite => {
            let config = CompositeConfig::load(Path::new(model))?;
            let composite =
                Composite::from_config(&config, |kind, part| build_scorer(kind, part, token_file))
                    .map_err(|e| RewardError::Config(format!("{model}: {e}")))?;
            Ok(Box::new(composite))
        }
    }
}

/// A CLIP-based scorer from a model folder or hub id, on CUDA when there is one.
#[cfg(feature = "local")]
fn local_model(kind: ScorerKind, model: &str) -> Result<Box<dyn Scorer>, RewardError> {
    let local = kind.local_model().expect("called for the CLIP-based kinds");
    let root = hf::hub::resolve_model_folder(model)?;
    load_local(local, &root, tch::Device::cuda_if_available())
}

/// Without libtorch there is no CLIP model to run.
#[cfg(not(feature = "local"))]
fn local_model(kind: ScorerKind, _model: &str) -> Result<Box<dyn Scorer>, RewardError> {
    Err(RewardError::Config(format!(
        "scorer {kind} runs a CLIP model in libtorch, which this build of the reward crate \
         leaves out; build it with its `local` feature"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in ScorerKind::ALL {
            assert_eq!(kind.name().parse::<ScorerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
        }
        let err = "clips".parse::<ScorerKind>().unwrap_err().to_string();
        assert!(
            err.contains(
                "clip, pickscore, aesthetic, hpsv2, imagereward, mps, pixel, http, openai, composite"
            ),
            "{err}"
        );
    }

    #[test]
    fn specs_split_at_the_first_colon() {
        let spec: ScorerSpec = "http:http://127.0.0.1:8000".parse().unwrap();
        assert_eq!(spec.kind, ScorerKind::Http);
        assert_eq!(spec.model, "http://127.0.0.1:8000");
        assert_eq!(spec.to_string(), "http:http://127.0.0.1:8000");
        assert!("pickscore".parse::<ScorerSpec>().is_err());
    }

    #[test]
    fn pixel_scorers_are_built_without_a_server() {
        let scorer = build_scorer(ScorerKind::Pixel, "centered", None).unwrap();
        assert_eq!(scorer.info().name, "pixel");
        assert!(build_scorer(ScorerKind::Pixel, "http://127.0.0.1:1", None).is_err());
    }
}
