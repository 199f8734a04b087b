//! The training objectives of docs/method.md §2–3 as pure functions of tensors: no model is called
//! here. The learner runs the policy and the frozen reference, then hands their outputs (kernel
//! means, ε/v predictions) to one of these functions, which returns a differentiable loss and the
//! diagnostics it logs.
//!
//! - [`online_pso`]: per-transition likelihood ratios of sampled trajectory pairs (§2).
//! - [`dpo`]: Diffusion-DPO, and offline PSO = Diffusion-DPO at the distilled timesteps (§3).
//! - [`pso_db`]: the customization variant of offline PSO (§3, official `pso_db`).
//! - [`sft`]: plain ε/v regression (the baseline).
//! - [`noising`]: the forward process and regression targets shared by the offline objectives.
//!
//! Every loss is an fp32 scalar (inputs of other float dtypes are upcast); its [`Diagnostics`] are
//! copied to the host in one transfer per call. Tied pairs are masked out with a per-pair
//! `counted` slice and the loss is the mean over the counted pairs (0, with a zero gradient, when
//! none is counted).

pub mod dpo;
pub mod noising;
pub mod offline_pso;
pub mod online_pso;
pub mod pso_db;
pub mod sft;

use tch::{Device, Kind, Tensor};

use serde::{Deserialize, Serialize};

use crate::problems::{failing, Problems};

pub use dpo::{Dpo, PairPredictions, TimestepPolicy};
pub use noising::{
    add_noise, noise_pair, regression_target, training_alphas_cumprod, NoisedPair, TrainingSchedule,
};
pub use online_pso::{OnlinePso, Transitions};
pub use pso_db::PsoDb;
pub use sft::{hybrid_loss, sft_loss};

/// Errors of the objectives; each says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// An input tensor or slice does not fit the others.
    #[error("{objective}: {why}")]
    Input {
        /// The objective (`online_pso`, `dpo`, …) or helper that refused the input.
        objective: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// A transition with kernel std s = 0 (or not a positive finite number) was given to online
    /// PSO: it has no likelihood.
    #[error(
        "online_pso: pair {pair} ({side}) has kernel std s = {std}; a deterministic step (such as \
         the final step to x0) has no likelihood, and s must be a positive finite number: drop \
         these transitions before calling the objective"
    )]
    DeterministicStep {
        /// Index of the pair in the batch.
        pair: usize,
        /// `winner` or `loser`.
        side: &'static str,
        /// The offending std.
        std: f64,
    },
    /// A parameter (β, ε, λ, …) is out of range.
    #[error("{objective}: {name} = {value} {why}")]
    Parameter {
        /// The objective.
        objective: &'static str,
        /// The parameter's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        why: &'static str,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A differentiable loss and what the learner logs about it.
#[derive(Debug)]
pub struct Loss {
    /// The scalar loss (fp32), differentiable in the policy's inputs.
    pub loss: Tensor,
    /// Detached scalars for logging.
    pub diagnostics: Diagnostics,
}

/// What an objective reports besides its loss; `None` where an objective has no such quantity.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diagnostics {
    /// The loss value.
    pub loss: f64,
    /// Pairs (SFT: samples) that contributed to the loss.
    pub counted: usize,
    /// Pairs masked out as ties.
    pub skipped: usize,
    /// Mean implicit reward margin over the counted pairs: the argument of the sigmoid (hinge for
    /// `pso_db`); positive means the policy already prefers the winner.
    pub margin: Option<f64>,
    /// Implicit accuracy: fraction of the counted pairs whose margin is > 0.
    pub accuracy: Option<f64>,
    /// Online PSO: mean unclamped log ρ of the winners.
    pub log_ratio_winner: Option<f64>,
    /// Online PSO: mean unclamped log ρ of the losers.
    pub log_ratio_loser: Option<f64>,
    /// Online PSO: fraction of the counted ratios (both sides) strictly outside [1 − ε, 1 + ε],
    /// whose gradient is zero.
    pub clamped_fraction: Option<f64>,
    /// Mean per-sample regression MSE of the policy (winners and losers alike).
    pub mse_policy: Option<f64>,
    /// Mean per-sample regression MSE of the frozen reference.
    pub mse_reference: Option<f64>,
}

impl Diagnostics {
    /// The values that are present, as (name, value) for a metrics logger.
    pub fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![
            ("loss", self.loss),
            ("counted", self.counted as f64),
            ("skipped", self.skipped as f64),
        ];
        let optional = [
            ("margin", self.margin),
            ("accuracy", self.accuracy),
            ("log_ratio_winner", self.log_ratio_winner),
            ("log_ratio_loser", self.log_ratio_loser),
            ("clamped_fraction", self.clamped_fraction),
            ("mse_policy", self.mse_policy),
            ("mse_reference", self.mse_reference),
        ];
        out.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        out
    }
}

/// The objective a run trains with, from `objective.kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// `online_pso` (method.md §2).
    OnlinePso(OnlinePso),
    /// `offline_pso`: Diffusion-DPO restricted to the distilled timesteps (method.md §3).
    OfflinePso(Dpo),
    /// `pso_db`: the customization variant (method.md §3).
    PsoDb(PsoDb),
    /// `dpo`: Diffusion-DPO at any training timestep.
    Dpo(Dpo),
    /// `sft`: plain ε/v regression on the training images, noised where `objective.sft_timesteps`
    /// says.
    Sft(SftTimesteps),
}

impl Objective {
    /// The objective of a run config. An unset `objective.beta` takes the kind's official value
    /// ([`online_pso::BETA`], [`offline_pso::BETA`], [`dpo::BETA`], [`pso_db::BETA`]) and an
    /// unset `objective.lambda` the official λ; `distilled` is the model's few-step schedule
    /// (offline PSO trains only there) and `num_train_timesteps` the training schedule's length
    /// (DPO draws from all of it).
    pub fn from_section(
        section: &ObjectiveSection,
        distilled: &[u32],
        num_train_timesteps: usize,
    ) -> Result<Objective, ObjectiveError> {
        let beta = section.beta.unwrap_or(match section.kind {
            ObjectiveKind::OnlinePso => online_pso::BETA,
            ObjectiveKind::OfflinePso => offline_pso::BETA,
            ObjectiveKind::PsoDb => pso_db::BETA,
            ObjectiveKind::Dpo | ObjectiveKind::Sft => dpo::BETA,
        });
        Ok(match section.kind {
            ObjectiveKind::OnlinePso => {
                Objective::OnlinePso(OnlinePso::new(beta, section.epsilon)?)
            }
            ObjectiveKind::OfflinePso => Objective::OfflinePso(offline_pso::offline_pso(
                distilled,
                beta,
                section.lambda.unwrap_or(offline_pso::LAMBDA),
            )?),
            ObjectiveKind::PsoDb => Objective::PsoDb(PsoDb {
                beta,
                lambda: section.lambda.unwrap_or(pso_db::LAMBDA),
                ..PsoDb::default()
            }),
            ObjectiveKind::Dpo => Objective::Dpo(Dpo::diffusion_dpo(num_train_timesteps, beta)?),
            ObjectiveKind::Sft => Objective::Sft(section.sft_timesteps),
        })
    }

    /// The `objective.kind` string of this objective.
    pub fn kind(&self) -> &'static str {
        match self {
            Objective::OnlinePso(_) => "online_pso",
            Objective::OfflinePso(_) => "offline_pso",
            Objective::PsoDb(_) => "pso_db",
            Objective::Dpo(_) => "dpo",
            Objective::Sft(_) => "sft",
        }
    }
}

/// The training objective (method.md §2–3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSection {
    /// `online_pso`, `offline_pso`, `pso_db`, `dpo` or `sft`.
    pub kind: ObjectiveKind,
    /// β of the loss; unset means the kind's official default (50 for online_pso, 200 for
    /// offline_pso, 5000 for dpo, 5 for pso_db).
    pub beta: Option<f64>,
    /// Clamp of the likelihood ratio to [1 − ε, 1 + ε].
    pub epsilon: f64,
    /// λ, the weight of the loser's (reference image's) MSE in offline_pso and pso_db; unset
    /// means the official 0.1 (`--neg_defactor`).
    pub lambda: Option<f64>,
    /// Noise the offline objectives' training images on a schedule rescaled to zero terminal
    /// SNR (ᾱ_999 = 0), as Diffusion-DPO trains Turbo models.
    pub zero_terminal_snr: bool,
    /// SFT on a class-conditional model (DiT): the probability that a training image's label is
    /// replaced by the null class, as DiT's and DiffFit's training do (0.1), so the null
    /// embedding that guidance pushes from keeps training.
    pub label_dropout: f64,
    /// Training images (pso_db, offline_pso) are paired against a fixed pool of this many
    /// reference images, sampled once from the initial model with `class_prompt` (the official
    /// DreamBooth script's 20); 0 samples a fresh reference from the current model each step
    /// with the image's own prompt instead.
    pub reference_pool: u32,
    /// The prompt of the reference pool: the subject's class, e.g. "a photo of a dog"
    /// (`pso offline --class-prompt`).
    pub class_prompt: Option<String>,
    /// Where `sft` noises its training images: `uniform` over the training schedule (standard
    /// fine-tuning) or `distilled`, only at the few-step schedule's timesteps, where PSO trains.
    pub sft_timesteps: SftTimesteps,
}

/// Where the SFT baseline noises its training images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftTimesteps {
    /// Any timestep of the training schedule, as standard diffusion fine-tuning does.
    #[default]
    Uniform,
    /// Only the distilled schedule's timesteps: SFT on the footing PSO trains on.
    Distilled,
}

impl Default for ObjectiveSection {
    fn default() -> Self {
        ObjectiveSection {
            kind: ObjectiveKind::OnlinePso,
            beta: None,
            epsilon: 0.1,
            lambda: None,
            zero_terminal_snr: false,
            label_dropout: 0.1,
            reference_pool: 20,
            class_prompt: None,
            sft_timesteps: SftTimesteps::Uniform,
        }
    }
}

impl ObjectiveSection {
    /// `objective.*` values serde cannot check.
    pub fn problems(&self) -> Problems {
        failing([
            (
                self.beta.is_none_or(|beta| beta.is_finite() && beta > 0.0),
                "objective.beta",
                format!("{} is not a positive number", self.beta.unwrap_or_default()),
            ),
            (
                self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon < 1.0,
                "objective.epsilon",
                format!("{} is not in (0, 1)", self.epsilon),
            ),
            (
                self.lambda.is_none_or(|l| l.is_finite() && l >= 0.0),
                "objective.lambda",
                format!("{} is not a number ≥ 0", self.lambda.unwrap_or_default()),
            ),
            (
                (0.0..1.0).contains(&self.label_dropout),
                "objective.label_dropout",
                format!("{} is not in [0, 1)", self.label_dropout),
            ),
            (
                !(self.zero_terminal_snr && self.kind == ObjectiveKind::OnlinePso),
                "objective.zero_terminal_snr",
                "does not apply to online_pso, whose likelihoods come from the sampler's own \
                 schedule; remove it"
                    .into(),
            ),
            (
                self.class_prompt.is_none()
                    || matches!(self.kind, ObjectiveKind::OfflinePso | ObjectiveKind::PsoDb),
                "objective.class_prompt",
                format!(
                    "applies to offline_pso and pso_db on training images only, not to {}; \
                     remove it",
                    self.kind
                ),
            ),
            (
                self.sft_timesteps == SftTimesteps::Uniform || self.kind == ObjectiveKind::Sft,
                "objective.sft_timesteps",
                format!("applies to sft only, not to {}; remove it", self.kind),
            ),
            (
                self.lambda.is_none()
                    || matches!(self.kind, ObjectiveKind::OfflinePso | ObjectiveKind::PsoDb),
                "objective.lambda",
                format!(
                    "applies to offline_pso and pso_db only, not to {}; remove it",
                    self.kind
                ),
            ),
        ])
    }
}

/// The training objectives, as a run config's `objective.kind` names them (method.md §2–3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// Online PSO over the actor's recorded trajectories.
    OnlinePso,
    /// PSO on stored pairs at the distilled timesteps.
    OfflinePso,
    /// PSO against fresh reference samples (DreamBooth-style subject or style tuning).
    PsoDb,
    /// Diffusion-DPO.
    Dpo,
    /// Supervised fine-tuning (diffusion loss).
    Sft,
}

impl std::fmt::Display for ObjectiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectiveKind::OnlinePso => "online_pso",
            ObjectiveKind::OfflinePso => "offline_pso",
            ObjectiveKind::PsoDb => "pso_db",
            ObjectiveKind::Dpo => "dpo",
            ObjectiveKind::Sft => "sft",
        })
    }
}

/// Refuses a β (or other scale) that is not a positive finite number.
fn check_positive(
    objective: &'static str,
    name: &'static str,
    value: f64,
) -> Result<(), ObjectiveError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ObjectiveError::Parameter {
            objective,
            name,
            value,
            why: "must be a positive finite number",
        })
    }
}

/// Checks that every named tensor is floating point, batched (rank ≥ 2, batch ≥ 1), on one device,
/// and shaped like the first; returns the batch size.
fn check_alike(
    objective: &'static str,
    tensors: &[(&str, &Tensor)],
) -> Result<usize, ObjectiveError> {
    let err = |why: String| ObjectiveError::Input { objective, why };
    let (first_name, first) = tensors[0];
    let shape = first.size();
    if shape.len() < 2 || shape[0] < 1 {
        return Err(err(format!(
            "`{first_name}` has shape {shape:?}; expected a batch [B, C, H, W] (rank ≥ 2, B ≥ 1)"
        )));
    }
    let device = first.device();
    for &(name, t) in tensors {
        if t.size() != shape {
            return Err(err(format!(
                "`{name}` has shape {:?} but `{first_name}` has {shape:?}; all inputs of one call \
                 must have the same [B, C, H, W] shape",
                t.size()
            )));
        }
        if !t.is_floating_point() {
            return Err(err(format!(
                "`{name}` has dtype {:?}; expected a floating-point tensor",
                t.kind()
            )));
        }
        if t.device() != device {
            return Err(err(format!(
                "`{name}` is on {:?} but `{first_name}` is on {device:?}; move them to one device",
                t.device()
            )));
        }
    }
    Ok(shape[0] as usize)
}

/// Checks a per-pair tie mask against the batch size; returns the indices of the counted pairs.
fn counted_indices(
    objective: &'static str,
    counted: Option<&[bool]>,
    batch: usize,
) -> Result<Vec<i64>, ObjectiveError> {
    match counted {
        None => Ok((0..batch as i64).collect()),
        Some(mask) if mask.len() == batch => Ok(mask
            .iter()
            .enumerate()
            .filter(|(_, &c)| c)
            .map(|(i, _)| i as i64)
            .collect()),
        Some(mask) => Err(ObjectiveError::Input {
            objective,
            why: format!(
                "the tie mask has {} entries but the batch has {batch} pairs; give one bool per \
                 pair (false = tied, skipped)",
                mask.len()
            ),
        }),
    }
}

/// Mean over every dimension but the batch, in fp32: one value per sample.
fn per_sample_mean(x: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    x.mean_dim(dims.as_slice(), false, None::<Kind>)
}

/// The rows `index` of a per-pair vector (on its device).
fn select(x: &Tensor, index: &[i64]) -> Tensor {
    x.index_select(0, &Tensor::from_slice(index).to_device(x.device()))
}

/// Mean of the counted rows of a per-pair loss; 0 (still attached to the graph, zero gradient)
/// when every pair is tied, so the learner can backpropagate unconditionally.
fn masked_mean(per_pair: &Tensor, index: &[i64]) -> Tensor {
    select(per_pair, index).sum(Kind::Float) / (index.len().max(1) as f64)
}

/// Copies detached 0-dim tensors to the host in one transfer.
fn host_values(values: &[Tensor]) -> Vec<f64> {
    let stacked = Tensor::stack(
        &values
            .iter()
            .map(|v| v.detach().to_kind(Kind::Double))
            .collect::<Vec<_>>(),
        0,
    )
    .to_device(Device::Cpu);
    Vec::<f64>::try_from(&stacked).expect("a 1-D double tensor converts to Vec<f64>")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind a run config names `name`.
    fn kind(name: &str) -> ObjectiveKind {
        serde_json::from_value(name.into()).unwrap()
    }

    #[test]
    fn kinds_round_trip_through_the_config_strings() {
        for name in ["online_pso", "offline_pso", "pso_db", "dpo", "sft"] {
            let section = ObjectiveSection {
                kind: kind(name),
                ..ObjectiveSection::default()
            };
            let o = Objective::from_section(&section, &[999, 749, 499, 249], 1000).unwrap();
            assert_eq!(o.kind(), name);
            assert_eq!(section.kind.to_string(), name);
        }
        let e = serde_json::from_value::<ObjectiveKind>("ppo".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ppo`") && e.contains("online_pso"), "{e}");
    }

    #[test]
    fn config_beta_and_epsilon_reach_the_objective() {
        let section = ObjectiveSection {
            kind: kind("online_pso"),
            beta: Some(7.0),
            ..ObjectiveSection::default()
        };
        let o = Objective::from_section(&section, &[999], 1000).unwrap();
        let want = OnlinePso::new(7.0, ObjectiveSection::default().epsilon).unwrap();
        assert_eq!(o, Objective::OnlinePso(want));
        let section = ObjectiveSection {
            kind: kind("pso_db"),
            beta: Some(3.0),
            ..ObjectiveSection::default()
        };
        match Objective::from_section(&section, &[999], 1000).unwrap() {
            Objective::PsoDb(p) => assert_eq!((p.beta, p.lambda), (3.0, pso_db::LAMBDA)),
            other => panic!("{other:?}"),
        }
        for (name, beta) in [
            ("pso_db", pso_db::BETA),
            ("dpo", dpo::BETA),
            ("online_pso", online_pso::BETA),
        ] {
            let section = ObjectiveSection {
                kind: kind(name),
                ..ObjectiveSection::default()
            };
            let o = Objective::from_section(&section, &[999], 1000).unwrap();
            let got = match o {
                Objective::PsoDb(p) => p.beta,
                Objective::OnlinePso(p) => p.beta,
                Objective::Dpo(d) => d.beta,
                other => panic!("{other:?}"),
            };
            assert_eq!(got, beta, "{name}");
        }
    }

    #[test]
    fn sft_timesteps_reach_sft_and_are_refused_elsewhere() {
        let section = ObjectiveSection {
            kind: kind("sft"),
            sft_timesteps: SftTimesteps::Distilled,
            ..ObjectiveSection::default()
        };
        assert!(section.problems().is_empty());
        assert_eq!(
            Objective::from_section(&section, &[999], 1000).unwrap(),
            Objective::Sft(SftTimesteps::Distilled)
        );
        let wrong = ObjectiveSection {
            kind: kind("online_pso"),
            ..section
        };
        let problems = format!("{:?}", wrong.problems());
        assert!(problems.contains("objective.sft_timesteps"), "{problems}");
    }

    #[test]
    fn mismatched_shapes_devices_and_dtypes_are_named() {
        let a = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2, 3, 5], (Kind::Float, Device::Cpu));
        let e = check_alike("sft", &[("prediction", &a), ("target", &b)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("sft: `target` has shape [2, 3, 5] but `prediction` has [2, 3, 4]"),
            "{e}"
        );
        let i = Tensor::zeros([2, 3, 4], (Kind::Int64, Device::Cpu));
        let e = check_alike("sft", &[("prediction", &a), ("target", &i)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`target` has dtype Int64"), "{e}");
        let v = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let e = check_alike("sft", &[("prediction", &v)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a batch"), "{e}");
    }

    #[test]
    fn tie_masks_must_have_one_entry_per_pair() {
        assert_eq!(
            counted_indices("dpo", Some(&[true, false, true]), 3).unwrap(),
            vec![0, 2]
        );
        let e = counted_indices("dpo", Some(&[true]), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 entries but the batch has 3 pairs"), "{e}");
    }

    #[test]
    fn diagnostics_list_only_present_fields() {
        let d = Diagnostics {
            loss: 1.5,
            counted: 2,
            accuracy: Some(0.5),
            ..Diagnostics::default()
        };
        assert_eq!(
            d.fields(),
            vec![
                ("loss", 1.5),
                ("counted", 2.0),
                ("skipped", 0.0),
                ("accuracy", 0.5)
            ]
        );
    }
}
