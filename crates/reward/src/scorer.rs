//! The `Scorer` interface: a batch of (prompt, image) in, one finite score per item out, and the
//! check that keeps a bad reply from mislabelling a pair.

use async_trait::async_trait;
use image::RgbImage;
use serde::Serialize;

use crate::RewardError;

/// What a scorer is, as recorded next to every pair it labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScorerInfo {
    /// Scorer kind, e.g. `pickscore`.
    pub name: String,
    /// Model identity, e.g. the model folder or hub id and revision.
    pub version: String,
    /// Whether larger scores mean better images.
    pub higher_is_better: bool,
}

impl std::fmt::Display for ScorerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.version)
    }
}

/// One image and the prompt it was generated from.
#[derive(Debug, Clone, Copy)]
pub struct ScoreItem<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// The image.
    pub image: &'a RgbImage,
}

/// A reward model. Implementations return one score per item, in order; callers go through
/// [`score_checked`], which rejects a wrong count or a non-finite value.
#[async_trait]
pub trait Scorer: Send + Sync {
    /// Name, version and direction.
    fn info(&self) -> ScorerInfo;

    /// Scores a batch. Local models compute on the calling thread.
    async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError>;

    /// Scores a batch and, for a scorer made of parts (the composite), every part's own raw
    /// scores, so that runs can log each component; a plain scorer has no parts.
    async fn score_parts(&self, items: &[ScoreItem<'_>]) -> Result<Scored, RewardError> {
        Ok(Scored {
            scores: self.score(items).await?,
            parts: Vec::new(),
        })
    }
}

/// Scores of a batch, with each part's raw scores when the scorer has parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// One score per item.
    pub scores: Vec<f32>,
    /// (part name, its raw score per item), in the scorer's order of parts.
    pub parts: Vec<(String, Vec<f32>)>,
}

/// Checks a scorer's reply: exactly one finite score per item.
pub fn check_scores(
    info: &ScorerInfo,
    items: &[ScoreItem<'_>],
    scores: Vec<f32>,
) -> Result<Vec<f32>, RewardError> {
    if scores.len() != items.len() {
        return Err(RewardError::Count {
            scorer: info.to_string(),
            expected: items.len(),
            got: scores.len(),
        });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(RewardError::NotFinite {
            scorer: info.to_string(),
            index,
            prompt: items[index].prompt.to_owned(),
            value,
        });
    }
    Ok(scores)
}

/// Scores a batch and checks the reply (see [`check_scores`]).
pub async fn score_checked(
    scorer: &dyn Scorer,
    items: &[ScoreItem<'_>],
) -> Result<Vec<f32>, RewardError> {
    let scores = scorer.score(items).await?;
    check_scores(&scorer.info(), items, scores)
}

/// [`Scorer::score_parts`], with the scores checked as by [`score_checked`].
pub async fn score_parts_checked(
    scorer: &dyn Scorer,
    items: &[ScoreItem<'_>],
) -> Result<Scored, RewardError> {
    let Scored { scores, parts } = scorer.score_parts(items).await?;
    Ok(Scored {
        scores: check_scores(&scorer.info(), items, scores)?,
        parts,
    })
}

/// Reads an image file (PNG or JPEG) as 8-bit RGB.
pub fn open_image(path: &std::path::Path) -> Result<RgbImage, RewardError> {
    image::open(path)
        .map(|im| im.to_rgb8())
        .map_err(|e| RewardError::Image {
            path: path.to_owned(),
            why: e.to_string(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scorer that returns fixed numbers, whatever it is given.
    pub(crate) struct Fixed {
        pub(crate) scores: Vec<f32>,
        pub(crate) higher_is_better: bool,
    }

    #[async_trait]
    impl Scorer for Fixed {
        fn info(&self) -> ScorerInfo {
            ScorerInfo {
                name: "fixed".into(),
                version: "test".into(),
                higher_is_better: self.higher_is_better,
            }
        }

        async fn score(&self, _items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
            Ok(self.scores.clone())
        }
    }

    pub(crate) fn run(scorer: &dyn Scorer, n: usize) -> Result<Vec<f32>, RewardError> {
        let image = RgbImage::new(2, 2);
        let items: Vec<ScoreItem> = (0..n)
            .map(|_| ScoreItem {
                prompt: "a cat",
                image: &image,
            })
            .collect();
        futures::executor::block_on(score_checked(scorer, &items))
    }

    #[test]
    fn checked_scores_pass_through() {
        let scorer = Fixed {
            scores: vec![1.0, -2.5],
            higher_is_better: true,
        };
        assert_eq!(run(&scorer, 2).unwrap(), vec![1.0, -2.5]);
    }

    #[test]
    fn wrong_count_is_an_error() {
        let scorer = Fixed {
            scores: vec![1.0],
            higher_is_better: true,
        };
        let err = run(&scorer, 2).unwrap_err();
        assert!(
            matches!(
                err,
                RewardError::Count {
                    expected: 2,
                    got: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("fixed (test)"), "{err}");
    }

    #[test]
    fn nan_and_infinities_are_errors() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let scorer = Fixed {
                scores: vec![0.5, bad],
                higher_is_better: true,
            };
            let err = run(&scorer, 2).unwrap_err();
            assert!(
                matches!(err, RewardError::NotFinite { index: 1, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("\"a cat\""), "{err}");
        }
    }
}
