//! A weighted sum of scorers: each part optionally standardised with a configured mean and
//! standard deviation, and sign-flipped when lower is better for it.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{load_local, LocalScorerKind};
use crate::scorer::score_checked;
use crate::{RewardError, ScoreItem, Scorer, ScorerInfo};

/// A composite scorer's config (TOML: `[[parts]]` tables).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeConfig {
    /// The parts, in order.
    pub parts: Vec<PartConfig>,
}

/// One part of a composite scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// Which scorer.
    pub scorer: LocalScorerKind,
    /// Its model folder.
    pub model: PathBuf,
    /// Weight of its (standardised, sign-corrected) score.
    #[serde(default = "one")]
    pub weight: f32,
    /// Standardise its raw score as `(score - mean) / std` first.
    #[serde(default)]
    pub standardize: Option<Standardize>,
}

fn one() -> f32 {
    1.0
}

/// A fixed standardisation, e.g. measured on the scorer's scores of the base model's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standardize {
    /// Subtracted from the raw score.
    pub mean: f32,
    /// Divides the centred score; must be positive.
    pub std: f32,
}

/// A part of a built composite.
pub struct Part {
    /// The scorer.
    pub scorer: Box<dyn Scorer>,
    /// Its weight.
    pub weight: f32,
    /// Its standardisation, if any.
    pub standardize: Option<Standardize>,
}

/// Σ weight × sign × standardise(score) over the parts; higher is better.
pub struct Composite {
    parts: Vec<Part>,
}

impl std::fmt::Debug for Composite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Composite")
            .field("info", &self.info())
            .finish()
    }
}

impl Composite {
    /// Combines parts; rejects an empty list, a non-finite weight or a non-positive std.
    pub fn new(parts: Vec<Part>) -> Result<Self, RewardError> {
        if parts.is_empty() {
            return Err(RewardError::Config(
                "a composite scorer needs at least one part ([[parts]])".into(),
            ));
        }
        for (i, p) in parts.iter().enumerate() {
            let name = p.scorer.info().name;
            if !p.weight.is_finite() {
                return Err(RewardError::Config(format!(
                    "parts[{i}] ({name}): weight {} is not a finite number",
                    p.weight
                )));
            }
            if let Some(s) = p.standardize {
                if !(s.mean.is_finite() && s.std.is_finite() && s.std > 0.0) {
                    return Err(RewardError::Config(format!(
                        "parts[{i}] ({name}): standardize needs a finite mean and a positive \
                         std, got mean {} std {}",
                        s.mean, s.std
                    )));
                }
            }
        }
        Ok(Composite { parts })
    }

    /// Loads every part of `config` on `device`.
    pub fn from_config(config: &CompositeConfig, device: Device) -> Result<Self, RewardError> {
        let parts = config
            .parts
            .iter()
            .map(|p| {
                Ok(Part {
                    scorer: load_local(p.scorer, &p.model, device)?,
                    weight: p.weight,
                    standardize: p.standardize,
                })
            })
            .collect::<Result<Vec<_>, RewardError>>()?;
        Composite::new(parts)
    }
}

#[async_trait]
impl Scorer for Composite {
    fn info(&self) -> ScorerInfo {
        let version = self
            .parts
            .iter()
            .map(|p| format!("{}*{}", p.weight, p.scorer.info()))
            .collect::<Vec<_>>()
            .join(" + ");
        ScorerInfo {
            name: "composite".into(),
            version,
            higher_is_better: true,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        let mut total = vec![0f32; items.len()];
        for part in &self.parts {
            let scores = score_checked(part.scorer.as_ref(), items).await?;
            let sign = if part.scorer.info().higher_is_better {
                1.0
            } else {
                -1.0
            };
            for (t, s) in total.iter_mut().zip(scores) {
                let s = match part.standardize {
                    Some(z) => (s - z.mean) / z.std,
                    None => s,
                };
                *t += part.weight * sign * s;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scorer::tests::{run, Fixed};

    fn part(scores: &[f32], higher_is_better: bool, weight: f32, z: Option<(f32, f32)>) -> Part {
        Part {
            scorer: Box::new(Fixed {
                scores: scores.to_vec(),
                higher_is_better,
            }),
            weight,
            standardize: z.map(|(mean, std)| Standardize { mean, std }),
        }
    }

    #[test]
    fn weights_standardises_and_flips_lower_is_better_parts() {
        let composite = Composite::new(vec![
            part(&[22.0, 20.0], true, 1.0, Some((21.0, 0.5))),
            part(&[1.0, 3.0], false, 0.5, None),
            part(&[6.0, 4.0], true, 2.0, Some((5.0, 2.0))),
        ])
        .unwrap();
        let scores = run(&composite, 2).unwrap();
        // (22-21)/0.5 - 0.5*1 + 2*(6-5)/2 and (20-21)/0.5 - 0.5*3 + 2*(4-5)/2.
        assert_eq!(scores, vec![2.0 - 0.5 + 1.0, -2.0 - 1.5 - 1.0]);
        assert!(composite.info().higher_is_better);
    }

    #[test]
    fn a_bad_part_reply_is_an_error() {
        let composite = Composite::new(vec![
            part(&[1.0, 2.0], true, 1.0, None),
            part(&[1.0], true, 1.0, None),
        ])
        .unwrap();
        assert!(matches!(
            run(&composite, 2).unwrap_err(),
            RewardError::Count { .. }
        ));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        assert!(Composite::new(vec![]).is_err());
        let err = Composite::new(vec![part(&[1.0], true, 1.0, Some((0.0, 0.0)))]).unwrap_err();
        assert!(err.to_string().contains("positive std"), "{err}");
        let err = Composite::new(vec![part(&[1.0], true, f32::NAN, None)]).unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn config_reads_from_toml_and_rejects_unknown_keys() {
        let text = r#"
            [[parts]]
            scorer = "pickscore"
            model = "models/PickScore_v1"
            standardize = { mean = 21.0, std = 0.8 }

            [[parts]]
            scorer = "aesthetic"
            model = "models/clip-l14"
            weight = 0.25
        "#;
        let config: CompositeConfig = toml::from_str(text).unwrap();
        assert_eq!(config.parts.len(), 2);
        assert_eq!(config.parts[0].scorer, LocalScorerKind::Pickscore);
        assert_eq!(config.parts[0].weight, 1.0);
        assert_eq!(
            config.parts[0].standardize,
            Some(Standardize {
                mean: 21.0,
                std: 0.8
            })
        );
        assert_eq!(config.parts[1].weight, 0.25);
        let typo = "[[parts]]\nscorer = \"clip\"\nmodel = \"m\"\nweigth = 2.0\n";
        let err = toml::from_str::<CompositeConfig>(typo).unwrap_err();
        assert!(err.to_string().contains("weigth"), "{err}");
    }
}
