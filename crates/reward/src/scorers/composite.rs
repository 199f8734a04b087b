//! A weighted sum of scorers (`reward.scorer = "composite"`, `reward.model` = its TOML file):
//! each part normalised — with a fixed mean and standard deviation, or with the running mean
//! and standard deviation of every score it has given so far — and sign-flipped when lower is
//! better for it. The parts' raw scores come back too ([`Scorer::score_parts`]), so runs log
//! each component.

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::factory::ScorerKind;
use crate::scorer::score_checked;
use crate::{RewardError, ScoreItem, Scored, Scorer, ScorerInfo};

/// A composite scorer's config (TOML: `[[parts]]` tables).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeConfig {
    /// The parts, in order.
    pub parts: Vec<PartConfig>,
}

impl CompositeConfig {
    /// Reads the TOML file `path`.
    pub fn load(path: &Path) -> Result<CompositeConfig, RewardError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RewardError::Config(format!(
                "cannot read the composite scorer's file {}: {e}",
                path.display()
            ))
        })?;
        toml::from_str(&text).map_err(|e| {
            RewardError::Config(format!(
                "{}: {e}(expected [[parts]] tables with scorer, model, and optionally weight \
                 and normalize)",
                path.display()
            ))
        })
    }
}

/// One part of a composite scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// Which scorer (any kind but `composite`).
    pub scorer: ScorerKind,
    /// Its model, as `reward.model` names it for that kind.
    pub model: String,
    /// Weight of its normalised, sign-corrected score.
    #[serde(default = "one")]
    pub weight: f32,
    /// How its raw score is normalised first (default: not at all).
    #[serde(default, alias = "standardize")]
    pub normalize: Option<Normalize>,
    /// Its name in metrics (`reward/NAME`; default: the scorer's name, numbered when repeated).
    #[serde(default)]
    pub name: Option<String>,
}

fn one() -> f32 {
    1.0
}

/// How a part's raw score is normalised before it is weighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Normalize {
    /// `(score - mean) / std` with fixed values, e.g. measured on the base model's samples.
    Fixed {
        /// Subtracted from the raw score.
        mean: f32,
        /// Divides the centred score; must be positive.
        std: f32,
    },
    /// `"running"`: the mean and standard deviation of every score of this part so far, the
    /// batch being scored included (std 1 until two scores differ).
    Running(Running),
}

/// The word `running` in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Running {
    /// Running statistics.
    Running,
}

/// A part of a built composite.
pub struct Part {
    /// The scorer.
    pub scorer: Box<dyn Scorer>,
    /// Its weight.
    pub weight: f32,
    /// Its normalisation, if any.
    pub normalize: Option<Normalize>,
    /// Its name in metrics (default: the scorer's name).
    pub name: Option<String>,
}

/// Welford's running mean and variance.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    count: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// (mean, sample std), std 1 while it is not yet positive.
    fn mean_std(&self) -> (f64, f64) {
        let var = if self.count > 1 {
            self.m2 / (self.count - 1) as f64
        } else {
            0.0
        };
        let std = var.sqrt();
        (self.mean, if std > 0.0 { std } else { 1.0 })
    }
}

/// Σ weight × sign × normalise(score) over the parts; higher is better.
pub struct Composite {
    parts: Vec<Part>,
    /// Unique names of the parts (their scorer's name, numbered when repeated).
    names: Vec<String>,
    /// Running statistics per part (used by the `running` ones).
    moments: Mutex<Vec<Moments>>,
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
        let mut names: Vec<String> = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let name = p.scorer.info().name;
            if !p.weight.is_finite() {
                return Err(RewardError::Config(format!(
                    "parts[{i}] ({name}): weight {} is not a finite number",
                    p.weight
                )));
            }
            if let Some(Normalize::Fixed { mean, std }) = p.normalize {
                if !(mean.is_finite() && std.is_finite() && std > 0.0) {
                    return Err(RewardError::Config(format!(
                        "parts[{i}] ({name}): normalize needs a finite mean and a positive \
                         std, got mean {mean} std {std}"
                    )));
                }
            }
            let base = p.name.clone().unwrap_or(name);
            let repeats = names
                .iter()
                .filter(|n| n.split('#').next() == Some(base.as_str()))
                .count();
            names.push(match repeats {
                0 => base,
                n => format!("{base}#{}", n + 1),
            });
        }
        let moments = Mutex::new(vec![Moments::default(); parts.len()]);
        Ok(Composite {
            parts,
            names,
            moments,
        })
    }

    /// Builds the parts of `config` with `build` (the scorer factory), refusing a composite
    /// inside a composite.
    pub fn from_config(
        config: &CompositeConfig,
        build: impl Fn(ScorerKind, &str) -> Result<Box<dyn Scorer>, RewardError>,
    ) -> Result<Self, RewardError> {
        let parts = config
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if p.scorer == ScorerKind::Composite {
                    return Err(RewardError::Config(format!(
                        "parts[{i}]: a composite cannot be a part of a composite; list its \
                         parts here instead"
                    )));
                }
                let scorer = build(p.scorer, &p.model).map_err(|e| {
                    RewardError::Config(format!("parts[{i}] ({} {}): {e}", p.scorer, p.model))
                })?;
                Ok(Part {
                    scorer,
                    weight: p.weight,
                    normalize: p.normalize,
                    name: p.name.clone(),
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
            .map(|p| {
                let norm = match p.normalize {
                    None => String::new(),
                    Some(Normalize::Fixed { mean, std }) => format!("[z {mean}±{std}]"),
                    Some(Normalize::Running(_)) => "[z running]".into(),
                };
                format!("{}*{}{norm}", p.weight, p.scorer.info())
            })
            .collect::<Vec<_>>()
            .join(" + ");
        ScorerInfo {
            name: "composite".into(),
            version,
            higher_is_better: true,
        }
    }

    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
        Ok(self.score_parts(items).await?.scores)
    }

    async fn score_parts(&self, items: &[ScoreItem<'_>]) -> Result<Scored, RewardError> {
        let mut raw = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            raw.push(score_checked(part.scorer.as_ref(), items).await?);
        }
        // Every part answered: only now do the running statistics see the batch.
        let mut moments = self.moments.lock().expect("composite statistics lock");
        let mut total = vec![0f32; items.len()];
        for ((part, scores), stats) in self.parts.iter().zip(&raw).zip(moments.iter_mut()) {
            let sign = if part.scorer.info().higher_is_better {
                1.0
            } else {
                -1.0
            };
            let (mean, std) = match part.normalize {
                None => (0.0, 1.0),
                Some(Normalize::Fixed { mean, std }) => (mean as f64, std as f64),
                Some(Normalize::Running(_)) => {
                    for &s in scores {
                        stats.add(s as f64);
                    }
                    stats.mean_std()
                }
            };
            for (t, &s) in total.iter_mut().zip(scores) {
                *t += part.weight * sign * ((s as f64 - mean) / std) as f32;
            }
        }
        Ok(Scored {
            scores: total,
            parts: self.names.iter().cloned().zip(raw).collect(),
        })
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
            normalize: z.map(|(mean, std)| Normalize::Fixed { mean, std }),
            name: None,
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

    /// Running normalisation divides by the standard deviation of all scores so far (the
    /// batch included), so a part on a large scale weighs what a part on a small one does; the
    /// parts' raw scores come back under unique names.
    #[test]
    fn running_normalisation_puts_parts_on_one_scale_and_reports_raw_parts() {
        let running = |scores: &[f32]| Part {
            scorer: Box::new(Fixed {
                scores: scores.to_vec(),
                higher_is_better: true,
            }),
            weight: 1.0,
            normalize: Some(Normalize::Running(Running::Running)),
            name: None,
        };
        let composite =
            Composite::new(vec![running(&[100.0, 300.0]), running(&[0.1, 0.2])]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let image = image::RgbImage::new(1, 1);
        let items = vec![
            ScoreItem {
                prompt: "p",
                image: &image,
            };
            2
        ];
        let close = |got: &[f32], want: [f64; 2]| {
            for (a, b) in got.iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        };
        // Scales 100 and 0.05 apart, each part is ±1/√2 of its own std: they count alike.
        let scored = rt.block_on(composite.score_parts(&items)).unwrap();
        let z = std::f64::consts::SQRT_2;
        close(&scored.scores, [-z, z]);
        assert_eq!(
            scored.parts,
            vec![
                ("fixed".to_string(), vec![100.0, 300.0]),
                ("fixed#2".to_string(), vec![0.1, 0.2]),
            ]
        );
        // The second batch moves the statistics: 4 scores each, n − 1 = 3, so ±√3/2 per part.
        let again = rt.block_on(composite.score_parts(&items)).unwrap();
        let z = 3f64.sqrt();
        close(&again.scores, [-z, z]);
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
        let nested = CompositeConfig {
            parts: vec![PartConfig {
                scorer: ScorerKind::Composite,
                model: "other.toml".into(),
                weight: 1.0,
                normalize: None,
                name: None,
            }],
        };
        let err = Composite::from_config(&nested, |_, _| unreachable!()).unwrap_err();
        assert!(err.to_string().contains("cannot be a part"), "{err}");
    }

    #[test]
    fn config_reads_from_toml_and_rejects_unknown_keys() {
        let text = r#"
            [[parts]]
            scorer = "pickscore"
            model = "models/PickScore_v1"
            normalize = { mean = 21.0, std = 0.8 }

            [[parts]]
            scorer = "aesthetic"
            model = "models/clip-l14"
            weight = 0.25
            normalize = "running"

            [[parts]]
            scorer = "http"
            model = "http://127.0.0.1:8000"
            standardize = { mean = 0.0, std = 2.0 }
        "#;
        let config: CompositeConfig = toml::from_str(text).unwrap();
        assert_eq!(config.parts.len(), 3);
        assert_eq!(config.parts[0].scorer, ScorerKind::Pickscore);
        assert_eq!(config.parts[0].weight, 1.0);
        assert_eq!(
            config.parts[0].normalize,
            Some(Normalize::Fixed {
                mean: 21.0,
                std: 0.8
            })
        );
        assert_eq!(config.parts[1].weight, 0.25);
        assert_eq!(
            config.parts[1].normalize,
            Some(Normalize::Running(Running::Running))
        );
        assert_eq!(config.parts[2].scorer, ScorerKind::Http);
        let typo = "[[parts]]\nscorer = \"clip\"\nmodel = \"m\"\nweigth = 2.0\n";
        let err = toml::from_str::<CompositeConfig>(typo).unwrap_err();
        assert!(err.to_string().contains("weigth"), "{err}");
        let word = "[[parts]]\nscorer = \"clip\"\nmodel = \"m\"\nnormalize = \"runing\"\n";
        assert!(toml::from_str::<CompositeConfig>(word).is_err());
    }
}
