//! Labelling of the actor's samples (method.md §2.2): a scorer that is retried with back-off
//! while it fails (labelling pauses, nothing is labelled from a failed call), and the pairs a
//! group of K scored samples makes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reward::{score_parts_checked, ScoreItem, Scored, Scorer, ScorerInfo};

use super::RunError;

/// The longest wait between two retries.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// A scorer retried with exponential back-off until it has failed for `patience`.
pub struct PatientScorer {
    scorer: Arc<dyn Scorer>,
    info: ScorerInfo,
    first_retry: Duration,
    patience: Duration,
    failures: AtomicU64,
}

impl PatientScorer {
    /// Wraps `scorer`: the first retry after `first_retry`, each next one twice as late (at
    /// most a minute); giving up once calls have failed for `patience` in a row.
    pub fn new(scorer: Arc<dyn Scorer>, first_retry: Duration, patience: Duration) -> Self {
        PatientScorer {
            info: scorer.info(),
            scorer,
            first_retry,
            patience,
            failures: AtomicU64::new(0),
        }
    }

    /// Name, version and direction of the scores.
    pub fn info(&self) -> &ScorerInfo {
        &self.info
    }

    /// Failed calls so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Scores `items`, retrying failed calls; `Ok(None)` when `halt` was set while waiting.
    pub async fn score(
        &self,
        items: &[ScoreItem<'_>],
        halt: &AtomicBool,
    ) -> Result<Option<Vec<f32>>, RunError> {
        Ok(self.score_parts(items, halt).await?.map(|s| s.scores))
    }

    /// [`PatientScorer::score`], with each part's raw scores of a composite scorer.
    pub async fn score_parts(
        &self,
        items: &[ScoreItem<'_>],
        halt: &AtomicBool,
    ) -> Result<Option<Scored>, RunError> {
        let started = Instant::now();
        let mut wait = self.first_retry;
        let mut attempt = 0u32;
        loop {
            let error = match score_parts_checked(self.scorer.as_ref(), items).await {
                Ok(scores) => {
                    if attempt > 0 {
                        tracing::info!(scorer = %self.info, "the scorer answers again; labelling resumes");
                    }
                    return Ok(Some(scores));
                }
                Err(e) => e,
            };
            attempt += 1;
            self.failures.fetch_add(1, Ordering::Relaxed);
            let failing_for = started.elapsed();
            if failing_for >= self.patience {
                return Err(RunError::Scorer(format!(
                    "{} failed for {:.0} s ({attempt} attempts; reward.patience_seconds = {}): \
                     {error}. Fix the scorer (or raise the patience) and resume with --resume",
                    self.info,
                    failing_for.as_secs_f64(),
                    self.patience.as_secs_f64()
                )));
            }
            let wait_now = wait.min(self.patience - failing_for);
            tracing::warn!(
                scorer = %self.info,
                attempt,
                "scoring failed: {error}; labelling paused, retrying in {:.1} s",
                wait_now.as_secs_f64()
            );
            let until = Instant::now() + wait_now;
            while Instant::now() < until {
                if halt.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(100))).await;
            }
            wait = (wait * 2).min(MAX_RETRY);
        }
    }
}

/// How a group of K scored samples becomes pairs, as `online.pairing` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// The best against the worst sample.
    BestWorst,
    /// Every two samples.
    AllPairs,
}

impl Pairing {
    /// Pairs a group of `k` samples makes (the same for every group, so pair ids are fixed).
    pub fn pairs_per_group(self, k: u32) -> u32 {
        match self {
            Pairing::BestWorst => 1,
            Pairing::AllPairs => k * (k - 1) / 2,
        }
    }

    /// The pairs (a, b), a < b, of samples with `scores`.
    pub fn pairs(self, scores: &[f32], higher_is_better: bool) -> Vec<(usize, usize)> {
        match self {
            Pairing::AllPairs => (0..scores.len())
                .flat_map(|a| (a + 1..scores.len()).map(move |b| (a, b)))
                .collect(),
            Pairing::BestWorst => {
                let better = |x: f32, y: f32| if higher_is_better { x > y } else { x < y };
                let (mut best, mut worst) = (0, 0);
                for (i, &s) in scores.iter().enumerate() {
                    if better(s, scores[best]) {
                        best = i;
                    }
                    if better(scores[worst], s) {
                        worst = i;
                    }
                }
                if best == worst {
                    // Every score equal: any two samples make the (tied) pair.
                    worst = usize::from(best == 0);
                }
                vec![(best.min(worst), best.max(worst))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use image::RgbImage;
    use reward::RewardError;

    #[test]
    fn best_worst_pairs_the_extremes_in_sample_order() {
        let p = Pairing::BestWorst;
        assert_eq!(p.pairs(&[0.1, 0.9, 0.5], true), [(0, 1)]);
        assert_eq!(p.pairs(&[0.3, 0.9, 0.1], true), [(1, 2)]);
        assert_eq!(p.pairs(&[0.3, 0.9, 0.1], false), [(1, 2)]);
        assert_eq!(p.pairs(&[0.5, 0.5], true), [(0, 1)]);
        assert_eq!(p.pairs_per_group(4), 1);
        let all = Pairing::AllPairs.pairs(&[1.0, 2.0, 3.0], true);
        assert_eq!(all, [(0, 1), (0, 2), (1, 2)]);
        assert_eq!(Pairing::AllPairs.pairs_per_group(3), 3);
    }

    /// Fails every other call.
    struct Flaky(AtomicU64);

    #[async_trait]
    impl Scorer for Flaky {
        fn info(&self) -> ScorerInfo {
            ScorerInfo {
                name: "flaky".into(),
                version: "1".into(),
                higher_is_better: true,
            }
        }

        async fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
            if self.0.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                return Err(RewardError::Config("503 from the test".into()));
            }
            Ok(items.iter().map(|i| i.prompt.len() as f32).collect())
        }
    }

    fn items(image: &RgbImage) -> Vec<ScoreItem<'_>> {
        vec![ScoreItem {
            prompt: "abc",
            image,
        }]
    }

    #[tokio::test]
    async fn failed_calls_are_retried_and_counted() {
        let s = PatientScorer::new(
            Arc::new(Flaky(AtomicU64::new(0))),
            Duration::from_millis(5),
            Duration::from_secs(10),
        );
        let image = RgbImage::new(2, 2);
        let halt = AtomicBool::new(false);
        let scores = s.score(&items(&image), &halt).await.unwrap();
        assert_eq!(scores, Some(vec![3.0]));
        assert_eq!(s.failures(), 1);
    }

    #[tokio::test]
    async fn patience_runs_out_with_a_message_and_halting_stops_the_wait() {
        let never = Flaky(AtomicU64::new(0));
        struct Down(Flaky);
        #[async_trait]
        impl Scorer for Down {
            fn info(&self) -> ScorerInfo {
                self.0.info()
            }
            async fn score(&self, _: &[ScoreItem<'_>]) -> Result<Vec<f32>, RewardError> {
                Err(RewardError::Config("connection refused".into()))
            }
        }
        let image = RgbImage::new(2, 2);
        let s = PatientScorer::new(
            Arc::new(Down(never)),
            Duration::from_millis(5),
            Duration::from_millis(50),
        );
        let halt = AtomicBool::new(false);
        let e = s
            .score(&items(&image), &halt)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("connection refused") && e.contains("--resume"),
            "{e}"
        );
        assert!(s.failures() >= 2);
        let halt = AtomicBool::new(true);
        let slow = PatientScorer::new(
            Arc::new(Down(Flaky(AtomicU64::new(0)))),
            Duration::from_secs(30),
            Duration::from_secs(600),
        );
        let t = Instant::now();
        assert_eq!(slow.score(&items(&image), &halt).await.unwrap(), None);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
