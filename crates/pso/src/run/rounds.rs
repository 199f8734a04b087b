//! One round of the online loop's data side: the actor samples a group per prompt, each group
//! is scored while the next one is sampled, the groups become labelled pairs, and every pair goes
//! to the pair store and to the learner.
//!
//! Everything a round does derives from its number: its prompts (a position in the seeded
//! prompt order), its image seeds, and its pair ids ((round · prompts per round + slot) · pairs
//! per group + j). A round sampled again after a crash therefore reproduces the same ids, and
//! pairs already durable in the store are not written twice.
//!
//! Data-parallel, rank r of W makes the rounds r, r + W, r + 2W, … of that numbering (its
//! local round i is the global round i·W + r): the W ranks together sample exactly the rounds
//! one process would, with distinct prompts, seeds and pair ids.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use reward::ScoreItem;
use tch::Tensor;

use diffusion::pipeline::images::{png, rgb_images};
use image::codecs::png::CompressionType;

use super::label::{Pairing, PatientScorer};
use super::prompts::{PromptOrder, PromptSet};
use super::RunError;
use crate::actor::{Actor, Group};
use crate::config::RunConfig;
use pairs::writer::AsyncPairWriter;
use pairs::{ImageFormat, Label, LatentDType, Latents, PairRecord, Side, Source};

/// A labelled pair as the learner uses it.
#[derive(Debug)]
pub struct TrainingPair {
    /// Its id in the pair store.
    pub pair_id: i64,
    /// The prompt.
    pub prompt: String,
    /// The winner's trajectory, [steps + 1, C, h, w] fp32.
    pub winner: Tensor,
    /// The loser's trajectory.
    pub loser: Tensor,
    /// Whether the loss counts it (not a tie, score margin large enough).
    pub counted: bool,
    /// Winner's score minus loser's score (in the scorer's better direction).
    pub margin: f32,
}

/// What a round produced.
#[derive(Debug)]
pub struct Round {
    /// Its number.
    pub index: u64,
    /// Optimizer steps of the policy that sampled it.
    pub policy_version: u64,
    /// Its pairs, in id order.
    pub pairs: Vec<TrainingPair>,
    /// Every sample's score.
    pub scores: Vec<f32>,
    /// Seconds spent sampling and decoding.
    pub actor_seconds: f64,
    /// Seconds the round waited for scores after its last sample.
    pub reward_wait_seconds: f64,
    /// Images sampled.
    pub images: usize,
    /// A composite scorer's parts: (name, sum of raw scores, count) over the round's images.
    pub parts: Vec<(String, f64, u64)>,
}

/// Makes rounds: owns the prompt order, shares the scorer and the pair store.
pub struct RoundMaker {
    prompts: PromptSet,
    order: PromptOrder,
    scorer: Arc<PatientScorer>,
    writer: Arc<AsyncPairWriter>,
    runtime: tokio::runtime::Handle,
    /// Pair ids below this are already durable in the store (a resumed run samples them again).
    durable: i64,
    pairing: Pairing,
    settings: RecordSettings,
    per_round: u32,
    per_group: u32,
    min_margin: f32,
    /// This process's data-parallel rank and the number of ranks (0 and 1 alone).
    rank: u64,
    world: u64,
}

/// The run-constant fields of a pair record.
#[derive(Debug, Clone)]
struct RecordSettings {
    run_id: String,
    model_id: String,
    sampler: String,
    timesteps: Vec<i32>,
    height: i32,
    width: i32,
    keep_latents: bool,
    keep_trajectory: bool,
}

impl RoundMaker {
    /// A maker for `config`'s rounds; `timesteps` is the distilled schedule as sampled.
    /// `(rank, world)` places this process in a data-parallel run ((0, 1) alone).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &RunConfig,
        timesteps: &[f64],
        prompts: PromptSet,
        scorer: Arc<PatientScorer>,
        writer: Arc<AsyncPairWriter>,
        runtime: tokio::runtime::Handle,
        (rank, world): (usize, usize),
    ) -> Result<RoundMaker, RunError> {
        let pairing = config.online.pairing;
        Ok(RoundMaker {
            order: PromptOrder::new(prompts.len(), config.run.seed),
            prompts,
            durable: writer.durable_pairs(),
            scorer,
            writer,
            runtime,
            pairing,
            settings: RecordSettings {
                run_id: config.run.name.clone(),
                model_id: config.model.id.clone(),
                sampler: config.sampler.name.to_string(),
                timesteps: timesteps.iter().map(|&t| t.round() as i32).collect(),
                height: config.sampler.height as i32,
                width: config.sampler.width as i32,
                keep_latents: config.pairs.keep_latents,
                keep_trajectory: config.pairs.keep_trajectory,
            },
            per_round: config.online.prompts_per_round,
            per_group: pairing.pairs_per_group(config.sampler.samples_per_prompt),
            min_margin: config.online.min_score_margin,
            rank: rank as u64,
            world: world as u64,
        })
    }

    /// Samples, scores, stores and returns this rank's round `index` with `actor`'s policy
    /// (`version`); `Ok(None)` when `halt` was set first (nothing of the round is stored then).
    pub fn make(
        &mut self,
        actor: &Actor,
        index: u64,
        version: u64,
        halt: &Arc<AtomicBool>,
    ) -> Result<Option<Round>, RunError> {
        let started = Instant::now();
        let global = index * self.world + self.rank;
        let mut pending = Vec::new();
        let mut actor_seconds = 0.0;
        for slot in 0..self.per_round {
            if halt.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let position = global * self.per_round as u64 + slot as u64;
            let prompt_index = self.order.index_at(position);
            let t = Instant::now();
            let group = actor.sample(
                global,
                slot,
                prompt_index,
                self.prompts.get(prompt_index),
                version,
            )?;
            actor_seconds += t.elapsed().as_secs_f64();
            // Scoring runs on the runtime while the next group is sampled.
            let images = rgb_images(&group.images);
            let (scorer, halt, prompt) = (self.scorer.clone(), halt.clone(), group.prompt.clone());
            let task = self.runtime.spawn(async move {
                let items: Vec<ScoreItem> = images
                    .iter()
                    .map(|image| ScoreItem {
                        prompt: &prompt,
                        image,
                    })
                    .collect();
                let scored = scorer.score_parts(&items, &halt).await?;
                let pngs: Vec<Vec<u8>> = images
                    .iter()
                    .map(|i| png(i, CompressionType::Fast))
                    .collect();
                Ok::<_, RunError>(scored.map(|s| (s, pngs)))
            });
            pending.push((group, task));
        }
        let waited = Instant::now();
        let mut round = Round {
            index,
            policy_version: version,
            pairs: Vec::new(),
            scores: Vec::new(),
            actor_seconds,
            reward_wait_seconds: 0.0,
            images: 0,
            parts: Vec::new(),
        };
        let mut labelled: Vec<(Group, Vec<f32>, Vec<Vec<u8>>)> = Vec::new();
        for (group, task) in pending {
            let scored = self.runtime.block_on(task).map_err(|e| {
                RunError::Scorer(format!("the scoring task ended abnormally: {e}"))
            })??;
            let Some((scored, pngs)) = scored else {
                return Ok(None);
            };
            for (i, (name, raw)) in scored.parts.into_iter().enumerate() {
                if round.parts.len() <= i {
                    round.parts.push((name, 0.0, 0));
                }
                let part = &mut round.parts[i];
                part.1 += raw.iter().map(|&v| v as f64).sum::<f64>();
                part.2 += raw.len() as u64;
            }
            labelled.push((group, scored.scores, pngs));
        }
        round.reward_wait_seconds = waited.elapsed().as_secs_f64();
        for (group, scores, pngs) in labelled {
            self.add_group(&mut round, group, &scores, pngs)?;
        }
        tracing::debug!(
            round = index,
            seconds = started.elapsed().as_secs_f64(),
            "round sampled and labelled"
        );
        Ok(Some(round))
    }

    /// Labels `group`'s pairs, sends them to the store and adds them to `round`.
    fn add_group(
        &self,
        round: &mut Round,
        group: Group,
        scores: &[f32],
        pngs: Vec<Vec<u8>>,
    ) -> Result<(), RunError> {
        let info = self.scorer.info();
        let higher = info.higher_is_better;
        let first_id = (group.round as i64 * self.per_round as i64 + group.slot as i64)
            * self.per_group as i64;
        let created_at_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let steps = group.trajectories.size()[1];
        for (j, (a, b)) in self.pairing.pairs(scores, higher).into_iter().enumerate() {
            let pair_id = first_id + j as i64;
            let label = Label::from_scores(scores[a], scores[b], higher);
            let (w, l) = if label == Label::Side1 {
                (b, a)
            } else {
                (a, b)
            };
            let margin = if higher {
                scores[w] - scores[l]
            } else {
                scores[l] - scores[w]
            };
            let counted = label != Label::Tie && margin >= self.min_margin;
            let winner = group.trajectories.get(w as i64);
            let loser = group.trajectories.get(l as i64);
            if pair_id >= self.durable {
                let s = &self.settings;
                let latents = s.keep_latents.then(|| {
                    // One host copy per side; x0 is the trajectory's last latent.
                    let (ta, tb) = (
                        bytes(&group.trajectories.get(a as i64)),
                        bytes(&group.trajectories.get(b as i64)),
                    );
                    let per_latent = ta.len() / steps as usize;
                    let last = |t: &[u8]| t[t.len() - per_latent..].to_vec();
                    Latents {
                        dtype: LatentDType::F32,
                        shape: group.trajectories.size()[2..]
                            .iter()
                            .map(|&d| d as i32)
                            .collect(),
                        final_latents: [last(&ta), last(&tb)],
                        trajectories: s.keep_trajectory.then_some([ta, tb]),
                    }
                });
                let record = PairRecord {
                    run_id: s.run_id.clone(),
                    pair_id,
                    created_at_us,
                    policy_version: Some(group.policy_version as i64),
                    source: Source::Online,
                    prompt: group.prompt.clone(),
                    negative_prompt: None,
                    model_id: s.model_id.clone(),
                    sampler: s.sampler.clone(),
                    timesteps: s.timesteps.clone(),
                    guidance: Some(0.0),
                    height: s.height,
                    width: s.width,
                    image_format: ImageFormat::Png,
                    sides: [
                        Side {
                            seed: Some(group.seeds[a]),
                            image: pngs[a].clone(),
                            score: scores[a],
                        },
                        Side {
                            seed: Some(group.seeds[b]),
                            image: pngs[b].clone(),
                            score: scores[b],
                        },
                    ],
                    scorer: info.name.clone(),
                    scorer_version: info.version.clone(),
                    label,
                    latents,
                };
                self.runtime.block_on(self.writer.send(record))?;
            }
            round.pairs.push(TrainingPair {
                pair_id,
                prompt: group.prompt.clone(),
                winner,
                loser,
                counted,
                margin,
            });
        }
        round.scores.extend_from_slice(scores);
        round.images += scores.len();
        Ok(())
    }
}

/// Little-endian bytes of an fp32 tensor.
fn bytes(t: &Tensor) -> Vec<u8> {
    let values = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu).contiguous().flatten(0, -1))
        .expect("an fp32 tensor converts to Vec<f32>");
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
