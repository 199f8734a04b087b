//! `pso offline --relabel-with`: labels stored pairs again with another scorer as they are read
//! (method.md §3, source a), e.g. online pairs scored by PickScore relabelled by an aesthetic
//! model, or imported pairs scored by a reward model instead of humans.

use reward::{score_checked, ScoreItem, Scorer, ScorerInfo};

use super::RunError;
use pairs::{Label, PairRecord, Source};

/// A scorer and the runtime its (async) interface runs on.
pub struct Relabeler {
    runtime: tokio::runtime::Runtime,
    scorer: Box<dyn Scorer>,
    info: ScorerInfo,
}

impl Relabeler {
    /// Wraps a loaded scorer.
    pub fn new(scorer: Box<dyn Scorer>) -> Result<Relabeler, RunError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RunError::Config(format!("cannot start the scorer's runtime: {e}")))?;
        let info = scorer.info();
        Ok(Relabeler {
            runtime,
            scorer,
            info,
        })
    }

    /// Scores both images of `record` and replaces its scores, label, scorer and source.
    pub fn relabel(&self, record: &mut PairRecord) -> Result<(), RunError> {
        let images = record
            .sides
            .iter()
            .enumerate()
            .map(|(i, side)| {
                image::load_from_memory(&side.image)
                    .map(|img| img.to_rgb8())
                    .map_err(|e| {
                        RunError::Data(format!(
                            "pair {} of run `{}`, side {i}: the image does not decode: {e}",
                            record.pair_id, record.run_id
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let items: Vec<ScoreItem> = images
            .iter()
            .map(|image| ScoreItem {
                prompt: &record.prompt,
                image,
            })
            .collect();
        let scores = self
            .runtime
            .block_on(score_checked(self.scorer.as_ref(), &items))
            .map_err(|e| {
                RunError::Data(format!(
                    "relabelling pair {} of run `{}` with {}: {e}",
                    record.pair_id, record.run_id, self.info
                ))
            })?;
        for (side, score) in record.sides.iter_mut().zip(&scores) {
            side.score = *score;
        }
        record.label = Label::from_scores(scores[0], scores[1], self.info.higher_is_better);
        record.scorer = self.info.name.clone();
        record.scorer_version = self.info.version.clone();
        record.source = Source::Relabelled;
        Ok(())
    }
}
