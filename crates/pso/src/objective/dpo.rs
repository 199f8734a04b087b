//! Diffusion-DPO (Wallace et al.; github.com/SalesforceAIResearch/DiffusionDPO `train.py`
//! l. 1121–1145), and the pairwise loss it shares with offline PSO ([`super::offline_pso`]):
//!
//! L^θ, L^ref = per-sample MSE (mean over C·H·W) of the policy's and the frozen reference's
//! predictions against the regression target, for winner and loser noised with a shared ε at a
//! shared timestep; L = −log σ(−s·β·[(L^θ_w − λ·L^θ_l) − (L^ref_w − λ·L^ref_l)]), with s = ½ and
//! λ = 1 for Diffusion-DPO, s = 1 and λ = 0.1 (by default) for offline PSO.
//!
//! The reference's predictions are treated as constants (detached), as under `no_grad` there.
//! Tied pairs can be masked out (Diffusion-DPO drops Pick-a-Pic's 0.5/0.5 labels from its data).

use rand::Rng;
use tch::{Kind, Tensor};

use super::noising::per_sample_mse;
use super::{
    check_alike, check_positive, counted_indices, host_values, masked_mean, select, Diagnostics,
    Loss, ObjectiveError,
};

/// Diffusion-DPO's β (its launchers, the SDXL-Turbo one included).
pub const BETA: f64 = 5000.0;

/// The predictions for a batch of pairs (row i of each tensor: pair i).
#[derive(Debug, Clone, Copy)]
pub struct PairPredictions<'a> {
    /// The policy's prediction for the noised winners (differentiable).
    pub policy_winner: &'a Tensor,
    /// The policy's prediction for the noised losers (differentiable).
    pub policy_loser: &'a Tensor,
    /// The frozen reference's prediction for the noised winners.
    pub reference_winner: &'a Tensor,
    /// The frozen reference's prediction for the noised losers.
    pub reference_loser: &'a Tensor,
    /// The winners' regression target (ε, v or x0: see [`super::regression_target`]).
    pub target_winner: &'a Tensor,
    /// The losers' regression target.
    pub target_loser: &'a Tensor,
}

/// Which timesteps a pair may be noised at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimestepPolicy {
    /// Any training timestep 0..n (Diffusion-DPO).
    Uniform {
        /// Length of the training schedule.
        num_train_timesteps: usize,
    },
    /// Only these timesteps: the model's distilled schedule (offline PSO).
    Distilled(Vec<u32>),
}

impl TimestepPolicy {
    /// Draws one timestep per pair, uniformly from the allowed set.
    pub fn draw(&self, rng: &mut impl Rng, pairs: usize) -> Vec<u32> {
        (0..pairs)
            .map(|_| match self {
                TimestepPolicy::Uniform {
                    num_train_timesteps,
                } => rng.random_range(0..*num_train_timesteps) as u32,
                TimestepPolicy::Distilled(list) => list[rng.random_range(0..list.len())],
            })
            .collect()
    }

    /// Refuses a timestep the policy does not allow.
    pub fn check(&self, objective: &'static str, timesteps: &[u32]) -> Result<(), ObjectiveError> {
        let bad = timesteps.iter().find(|&&t| match self {
            TimestepPolicy::Uniform {
                num_train_timesteps,
            } => t as usize >= *num_train_timesteps,
            TimestepPolicy::Distilled(list) => !list.contains(&t),
        });
        match (bad, self) {
            (None, _) => Ok(()),
            (
                Some(t),
                TimestepPolicy::Uniform {
                    num_train_timesteps,
                },
            ) => Err(ObjectiveError::Input {
                objective,
                why: format!(
                    "timestep {t} is outside the training schedule 0..{num_train_timesteps}"
                ),
            }),
            (Some(t), TimestepPolicy::Distilled(list)) => Err(ObjectiveError::Input {
                objective,
                why: format!(
                    "timestep {t} is not one of the distilled timesteps {list:?}; offline PSO \
                     trains only at the model's few-step schedule (draw with TimestepPolicy::draw)"
                ),
            }),
        }
    }
}

/// The pairwise loss of Diffusion-DPO and of offline PSO ([`super::offline_pso::offline_pso`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Dpo {
    /// β of the sigmoid.
    pub beta: f64,
    /// s: the factor of β inside the sigmoid (½ in Diffusion-DPO, 1 in offline PSO).
    pub beta_scale: f64,
    /// λ: the weight of each loser's MSE against its winner's (1 in Diffusion-DPO).
    pub loser_weight: f64,
    /// The timesteps pairs may be noised at.
    pub timesteps: TimestepPolicy,
}

impl Dpo {
    /// Diffusion-DPO proper: any of the `num_train_timesteps` training timesteps.
    pub fn diffusion_dpo(num_train_timesteps: usize, beta: f64) -> Result<Dpo, ObjectiveError> {
        check_positive("dpo", "beta", beta)?;
        if num_train_timesteps == 0 {
            return Err(ObjectiveError::Input {
                objective: "dpo",
                why: "the training schedule is empty; pass the scheduler's num_train_timesteps"
                    .into(),
            });
        }
        Ok(Dpo {
            beta,
            beta_scale: 0.5,
            loser_weight: 1.0,
            timesteps: TimestepPolicy::Uniform {
                num_train_timesteps,
            },
        })
    }

    fn name(&self) -> &'static str {
        match self.timesteps {
            TimestepPolicy::Uniform { .. } => "dpo",
            TimestepPolicy::Distilled(_) => "offline_pso",
        }
    }

    /// The loss of a batch of pairs noised at `timesteps` (one per pair, checked against the
    /// policy); `counted[i] == false` skips pair i (a tie).
    pub fn loss(
        &self,
        p: &PairPredictions,
        timesteps: &[u32],
        counted: Option<&[bool]>,
    ) -> Result<Loss, ObjectiveError> {
        let name = self.name();
        let batch = check_alike(
            name,
            &[
                ("policy_winner", p.policy_winner),
                ("policy_loser", p.policy_loser),
                ("reference_winner", p.reference_winner),
                ("reference_loser", p.reference_loser),
                ("target_winner", p.target_winner),
                ("target_loser", p.target_loser),
            ],
        )?;
        if timesteps.len() != batch {
            return Err(ObjectiveError::Input {
                objective: name,
                why: format!(
                    "{} timesteps for {batch} pairs; give the shared timestep of each pair",
                    timesteps.len()
                ),
            });
        }
        self.timesteps.check(name, timesteps)?;
        let index = counted_indices(name, counted, batch)?;

        let target_w = p.target_winner.detach();
        let target_l = p.target_loser.detach();
        let model_w = per_sample_mse(p.policy_winner, &target_w);
        let model_l = per_sample_mse(p.policy_loser, &target_l);
        let ref_w = per_sample_mse(&p.reference_winner.detach(), &target_w);
        let ref_l = per_sample_mse(&p.reference_loser.detach(), &target_l);
        let model_diff = &model_w - &model_l * self.loser_weight;
        let ref_diff = &ref_w - &ref_l * self.loser_weight;
        let inside = (model_diff - ref_diff) * (-self.beta_scale * self.beta);
        let loss = masked_mean(&inside.log_sigmoid().neg(), &index);

        let n = index.len();
        let stats = if n == 0 {
            vec![0.0; 5]
        } else {
            let m = select(&inside, &index);
            let both = |w: &Tensor, l: &Tensor| {
                (select(w, &index).mean(Kind::Float) + select(l, &index).mean(Kind::Float)) * 0.5
            };
            host_values(&[
                loss.shallow_clone(),
                m.mean(Kind::Float),
                m.gt(0.0).to_kind(Kind::Float).mean(Kind::Float),
                both(&model_w, &model_l),
                both(&ref_w, &ref_l),
            ])
        };
        Ok(Loss {
            loss,
            diagnostics: Diagnostics {
                loss: stats[0],
                counted: n,
                skipped: batch - n,
                margin: (n > 0).then_some(stats[1]),
                accuracy: (n > 0).then_some(stats[2]),
                mse_policy: (n > 0).then_some(stats[3]),
                mse_reference: (n > 0).then_some(stats[4]),
                ..Diagnostics::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::offline_pso::{offline_pso, LAMBDA};
    use rand::SeedableRng;
    use tch::Device;

    #[test]
    fn offline_pso_draws_and_accepts_only_distilled_timesteps() {
        let o = offline_pso(&[999, 749, 499, 249], BETA, LAMBDA).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let drawn = o.timesteps.draw(&mut rng, 64);
        assert!(drawn.iter().all(|t| [999, 749, 499, 249].contains(t)));
        assert!([999, 749, 499, 249].iter().all(|t| drawn.contains(t)));
        let e = o
            .timesteps
            .check("offline_pso", &[999, 500])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("offline_pso: timestep 500 is not one of the distilled timesteps"),
            "{e}"
        );
        let d = Dpo::diffusion_dpo(1000, BETA).unwrap();
        assert!(d.timesteps.check("dpo", &[0, 500, 999]).is_ok());
        assert!(d.timesteps.check("dpo", &[1000]).is_err());
        assert!(d.timesteps.draw(&mut rng, 64).iter().all(|&t| t < 1000));
        assert!(offline_pso(&[], BETA, LAMBDA).is_err() && Dpo::diffusion_dpo(1000, -1.0).is_err());
    }

    #[test]
    fn timesteps_must_match_the_batch_and_shapes_must_agree() {
        let a = Tensor::zeros([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3, 4, 2, 2], (Kind::Float, Device::Cpu));
        let p = PairPredictions {
            policy_winner: &a,
            policy_loser: &a,
            reference_winner: &a,
            reference_loser: &a,
            target_winner: &a,
            target_loser: &a,
        };
        let dpo = Dpo::diffusion_dpo(1000, BETA).unwrap();
        let e = dpo.loss(&p, &[5], None).unwrap_err().to_string();
        assert!(e.contains("1 timesteps for 2 pairs"), "{e}");
        let q = PairPredictions {
            reference_loser: &b,
            ..p
        };
        let e = dpo.loss(&q, &[5, 6], None).unwrap_err().to_string();
        assert!(
            e.starts_with("dpo: `reference_loser` has shape [3, 4, 2, 2]"),
            "{e}"
        );
    }

    #[test]
    fn a_policy_equal_to_the_reference_gives_log_2_and_the_gradient_prefers_the_winner() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let target = Tensor::randn([2, 4, 2, 2], opts);
        let ref_w = Tensor::randn([2, 4, 2, 2], opts);
        let ref_l = Tensor::randn([2, 4, 2, 2], opts);
        let pol_w = ref_w.copy().set_requires_grad(true);
        let pol_l = ref_l.copy().set_requires_grad(true);
        let p = PairPredictions {
            policy_winner: &pol_w,
            policy_loser: &pol_l,
            reference_winner: &ref_w,
            reference_loser: &ref_l,
            target_winner: &target,
            target_loser: &target,
        };
        let out = Dpo::diffusion_dpo(1000, BETA)
            .unwrap()
            .loss(&p, &[3, 900], None)
            .unwrap();
        assert!((out.diagnostics.loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.diagnostics.accuracy, Some(0.0));
        out.loss.backward();
        // Descending the loss moves the winner's prediction towards its target, the loser's away.
        let step = |pred: &Tensor| {
            let moved = pred.detach() - pred.grad() * 1e-6;
            (per_sample_mse(&moved, &target) - per_sample_mse(&pred.detach(), &target))
                .sum(Kind::Float)
                .double_value(&[])
        };
        assert!(step(&pol_w) < 0.0 && step(&pol_l) > 0.0);
    }
}
