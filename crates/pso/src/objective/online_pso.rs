//! Online PSO (method.md §2.3): for one stochastic transition x_t → x_{t'} of each trajectory of a
//! pair, the likelihood ratio ρ = π_θ(x_{t'} | x_t) / π_ref(x_{t'} | x_t) of the stored next latent
//! under the policy's and the frozen reference's Gaussian kernels, clamped to a trust region, and
//! L = −log σ(β·[log ρ̃_winner − log ρ̃_loser]).
//!
//! This follows the official code (`human_preference_tuning/train_online_pso_sdxl_dmd2.py`
//! l. 848–854 and `pso_pytorch/diffusers_patch/distilled_inference_with_logprob.py` l. 129–135):
//! - ℓ = mean over C·H·W of [−(x_{t'} − μ)²/(2s²) − log s − log √(2π)], computed term by term in
//!   fp32 in that order (so that a ratio lands on the same side of a clamp edge as there);
//! - the clamp is on ρ = exp(ℓ_θ − ℓ_ref), not on log ρ, and each side is clamped on its own
//!   before the difference: ρ̃ = clamp(ρ, 1 − ε, 1 + ε);
//! - `torch.clamp` passes the gradient where 1 − ε ≤ ρ ≤ 1 + ε, edges included, and gives exactly
//!   zero strictly outside; libtorch's clamp here behaves the same;
//! - x_{t'} is detached (it is data) and so is μ_ref (computed under `no_grad`).
//!
//! Differences from the official code, on purpose: tied pairs are masked out and the loss is the
//! mean over the counted pairs (the DMD2 script labels ties (0, 0), which adds the constant log 2
//! to its batch mean; the Turbo script counts a tie as a win of the second sample), and
//! −log σ(z) is computed as `−log_sigmoid(z)` (equal values, no overflow for a large β).

use tch::{Kind, Tensor};

use super::{
    check_alike, check_positive, counted_indices, host_values, masked_mean, per_sample_mean,
    select, Diagnostics, Loss, ObjectiveError,
};

/// The official β.
pub const BETA: f64 = 50.0;
/// The official trust-region half-width ε of the ratio clamp.
pub const EPSILON: f64 = 0.1;

/// One side (all winners, or all losers) of a batch of recorded transitions x_t → x_{t'}.
#[derive(Debug, Clone, Copy)]
pub struct Transitions<'a> {
    /// The stored next latents x_{t'}, [B, C, H, W].
    pub next: &'a Tensor,
    /// The policy's kernel means μ_θ (differentiable), shaped like `next`.
    pub mean_policy: &'a Tensor,
    /// The frozen reference's kernel means μ_ref, shaped like `next` (treated as constants).
    pub mean_reference: &'a Tensor,
    /// The kernel std s of each transition (one per pair), shared by policy and reference.
    pub std: &'a [f64],
}

/// The online PSO objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlinePso {
    /// β of the sigmoid.
    pub beta: f64,
    /// The ratio is clamped to [1 − ε, 1 + ε].
    pub epsilon: f64,
}

impl Default for OnlinePso {
    fn default() -> Self {
        OnlinePso {
            beta: BETA,
            epsilon: EPSILON,
        }
    }
}

/// Per-sample log N(x; μ, s²I) averaged over C·H·W, term by term as the official code writes it;
/// `std` is [B, 1, …, 1] in fp32 and `next` is detached.
pub fn mean_log_likelihood(next: &Tensor, mean: &Tensor, std: &Tensor) -> Tensor {
    let log_sqrt_2pi = Tensor::from(std::f32::consts::PI * 2.0).sqrt().log();
    let log_prob = (next - mean).square().neg() / (std.square() * 2.0) - std.log() - log_sqrt_2pi;
    per_sample_mean(&log_prob)
}

impl OnlinePso {
    /// An objective with this β and ε; refuses β ≤ 0 and ε outside (0, 1).
    pub fn new(beta: f64, epsilon: f64) -> Result<OnlinePso, ObjectiveError> {
        check_positive("online_pso", "beta", beta)?;
        if !(epsilon > 0.0 && epsilon < 1.0) {
            return Err(ObjectiveError::Parameter {
                objective: "online_pso",
                name: "epsilon",
                value: epsilon,
                why: "must be in (0, 1)",
            });
        }
        Ok(OnlinePso { beta, epsilon })
    }

    /// log ρ = ℓ_θ − ℓ_ref per pair (unclamped, fp32), differentiable in `mean_policy`; `name`
    /// (`winner`/`loser`) is for the error messages.
    fn log_ratio(side: &Transitions, name: &'static str) -> Result<Tensor, ObjectiveError> {
        let batch = check_alike(
            "online_pso",
            &[
                ("next", side.next),
                ("mean_policy", side.mean_policy),
                ("mean_reference", side.mean_reference),
            ],
        )?;
        if side.std.len() != batch {
            return Err(ObjectiveError::Input {
                objective: "online_pso",
                why: format!(
                    "the {name} side has {} kernel stds for {batch} transitions; give one s per \
                     pair",
                    side.std.len()
                ),
            });
        }
        if let Some((pair, &std)) = side
            .std
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return Err(ObjectiveError::DeterministicStep {
                pair,
                side: name,
                std,
            });
        }
        // The official code holds s in fp32 (ᾱ and σ are fp32 scheduler tensors).
        let std: Vec<f32> = side.std.iter().map(|&s| s as f32).collect();
        let mut shape = vec![1i64; side.next.dim()];
        shape[0] = batch as i64;
        let std = Tensor::from_slice(&std)
            .to_device(side.next.device())
            .view(shape.as_slice());
        let next = side.next.detach().to_kind(Kind::Float);
        let policy = mean_log_likelihood(&next, &side.mean_policy.to_kind(Kind::Float), &std);
        let reference = mean_log_likelihood(
            &next,
            &side.mean_reference.detach().to_kind(Kind::Float),
            &std,
        );
        Ok(policy - reference)
    }

    /// The loss of a batch of pairs: `winner` and `loser` hold the same number of transitions,
    /// pair i being (winner row i, loser row i); `counted[i] == false` skips pair i (a tie).
    pub fn loss(
        &self,
        winner: &Transitions,
        loser: &Transitions,
        counted: Option<&[bool]>,
    ) -> Result<Loss, ObjectiveError> {
        let log_ratio_w = Self::log_ratio(winner, "winner")?;
        let log_ratio_l = Self::log_ratio(loser, "loser")?;
        let (bw, bl) = (log_ratio_w.size()[0], log_ratio_l.size()[0]);
        if bw != bl {
            return Err(ObjectiveError::Input {
                objective: "online_pso",
                why: format!(
                    "{bw} winner transitions but {bl} loser transitions; pass one of each per pair"
                ),
            });
        }
        if winner.next.device() != loser.next.device() {
            return Err(ObjectiveError::Input {
                objective: "online_pso",
                why: format!(
                    "the winners are on {:?} but the losers on {:?}; move them to one device",
                    winner.next.device(),
                    loser.next.device()
                ),
            });
        }
        let index = counted_indices("online_pso", counted, bw as usize)?;
        let (lo, hi) = (1.0 - self.epsilon, 1.0 + self.epsilon);
        let clamped_log = |log_ratio: &Tensor| log_ratio.exp().clamp(lo, hi).log();
        // β·log ρ̃_w − β·log ρ̃_l rounds exactly like the official β·log ρ̃_0·h_0 + β·log ρ̃_1·h_1.
        let margin = clamped_log(&log_ratio_w) * self.beta - clamped_log(&log_ratio_l) * self.beta;
        let loss = masked_mean(&margin.log_sigmoid().neg(), &index);

        let n = index.len();
        let stats = if n == 0 {
            vec![0.0; 6]
        } else {
            let (m, w, l) = (
                select(&margin, &index),
                select(&log_ratio_w, &index),
                select(&log_ratio_l, &index),
            );
            let outside = |r: &Tensor| {
                let ratio = r.exp();
                (ratio.lt(lo).logical_or(&ratio.gt(hi)))
                    .to_kind(Kind::Float)
                    .sum(Kind::Float)
            };
            host_values(&[
                loss.shallow_clone(),
                m.mean(Kind::Float),
                m.gt(0.0).to_kind(Kind::Float).mean(Kind::Float),
                w.mean(Kind::Float),
                l.mean(Kind::Float),
                (outside(&w) + outside(&l)) / (2 * n) as f64,
            ])
        };
        Ok(Loss {
            loss,
            diagnostics: Diagnostics {
                loss: stats[0],
                counted: n,
                skipped: bw as usize - n,
                margin: (n > 0).then_some(stats[1]),
                accuracy: (n > 0).then_some(stats[2]),
                log_ratio_winner: (n > 0).then_some(stats[3]),
                log_ratio_loser: (n > 0).then_some(stats[4]),
                clamped_fraction: (n > 0).then_some(stats[5]),
                ..Diagnostics::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// A side whose policy mean is `offset` away from a reference mean that the next latent was
    /// drawn around.
    struct Side {
        next: Tensor,
        policy: Tensor,
        reference: Tensor,
        std: Vec<f64>,
    }

    impl Side {
        fn new(seed: i64, offset: f64, std: f64) -> Side {
            let reference = randn(&[2, 4, 3, 3], seed);
            let next = &reference + randn(&[2, 4, 3, 3], seed + 1) * std;
            let policy = (&reference + offset).set_requires_grad(true);
            Side {
                next,
                policy,
                reference,
                std: vec![std; 2],
            }
        }

        fn transitions(&self) -> Transitions<'_> {
            Transitions {
                next: &self.next,
                mean_policy: &self.policy,
                mean_reference: &self.reference,
                std: &self.std,
            }
        }
    }

    #[test]
    fn log_ratio_is_the_scaled_difference_of_squared_errors() {
        let s = Side::new(1, 0.01, 0.7);
        let got = OnlinePso::log_ratio(&s.transitions(), "winner").unwrap();
        let d = (&s.next - &s.reference).square() - (&s.next - &s.policy).square();
        let want = per_sample_mean(&d) / (2.0 * 0.7 * 0.7);
        assert!(got.allclose(&want, 1e-4, 1e-6, false));
    }

    #[test]
    fn deterministic_steps_are_refused() {
        let w = Side::new(1, 0.0, 0.5);
        let mut l = Side::new(3, 0.0, 0.5);
        for bad in [0.0, -0.1, f64::NAN] {
            l.std[1] = bad;
            let e = OnlinePso::default()
                .loss(&w.transitions(), &l.transitions(), None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("pair 1 (loser)") && e.contains("has no likelihood"),
                "{e}"
            );
        }
    }

    #[test]
    fn inputs_that_do_not_fit_are_refused() {
        let w = Side::new(1, 0.0, 0.5);
        let l = Side::new(3, 0.0, 0.5);
        let short = vec![0.5];
        let e = OnlinePso::default()
            .loss(
                &w.transitions(),
                &Transitions {
                    std: &short,
                    ..l.transitions()
                },
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("the loser side has 1 kernel stds for 2"), "{e}");
        let wide = Tensor::zeros([2, 4, 3, 4], (Kind::Float, Device::Cpu));
        let e = OnlinePso::default()
            .loss(
                &Transitions {
                    mean_policy: &wide,
                    ..w.transitions()
                },
                &l.transitions(),
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mean_policy` has shape [2, 4, 3, 4] but `next` has [2, 4, 3, 3]"),
            "{e}"
        );
        let e = OnlinePso::default()
            .loss(&w.transitions(), &l.transitions(), Some(&[true]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tie mask has 1 entries"), "{e}");
        assert!(OnlinePso::new(50.0, 1.0).is_err() && OnlinePso::new(0.0, 0.1).is_err());
    }

    #[test]
    fn ratios_beyond_the_clamp_get_no_gradient() {
        // A policy mean far from the reference puts ρ far outside [0.9, 1.1] on both sides.
        let w = Side::new(1, 0.5, 0.3);
        let l = Side::new(3, -0.5, 0.3);
        let out = OnlinePso::default()
            .loss(&w.transitions(), &l.transitions(), None)
            .unwrap();
        out.loss.backward();
        assert_eq!(out.diagnostics.clamped_fraction, Some(1.0));
        assert_eq!(w.policy.grad().abs().max().double_value(&[]), 0.0);
        assert_eq!(l.policy.grad().abs().max().double_value(&[]), 0.0);
    }

    /// A one-pair side with constant tensors (so every mean is exact): x_{t'} = 0, μ_ref = r,
    /// μ_θ = r − offset, s = 1.
    fn constant_side(r: f64, offset: f32) -> (Tensor, Tensor, Tensor) {
        let full = |v: f64| Tensor::full([1, 1, 2, 2], v, (Kind::Float, Device::Cpu));
        let policy = (full(r) - offset as f64).set_requires_grad(true);
        (full(0.0), policy, full(r))
    }

    fn ratio(r: f64, offset: f32) -> f64 {
        let (next, policy, reference) = constant_side(r, offset);
        let side = Transitions {
            next: &next,
            mean_policy: &policy,
            mean_reference: &reference,
            std: &[1.0],
        };
        let log_ratio = OnlinePso::log_ratio(&side, "winner").unwrap();
        log_ratio.exp().double_value(&[0])
    }

    #[test]
    fn a_ratio_exactly_on_the_edge_keeps_its_gradient() {
        // Bisect the fp32 offset for the first ratio ≥ the fp32 edge 1 + ε; some reference value
        // puts it exactly on the edge, and the next offsets past it beyond the edge.
        let edge = Tensor::from(1.1f32).double_value(&[]);
        let (r, offset) = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
            .into_iter()
            .find_map(|r| {
                let (mut lo, mut hi) = (0.0f32.to_bits(), (r as f32).to_bits());
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if ratio(r, f32::from_bits(mid)) < edge {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                (ratio(r, f32::from_bits(hi)) == edge).then(|| (r, f32::from_bits(hi)))
            })
            .expect("no fp32 offset lands exactly on the edge");
        let beyond = (offset.to_bits()..)
            .map(f32::from_bits)
            .find(|&o| ratio(r, o) > edge)
            .unwrap();
        let loser = Side::new(5, 0.0, 1.0);
        let (ln, lp, lr) = (
            loser.next.narrow(0, 0, 1),
            loser.policy.narrow(0, 0, 1),
            loser.reference.narrow(0, 0, 1),
        );
        let loser = Transitions {
            next: &ln,
            mean_policy: &lp,
            mean_reference: &lr,
            std: &[1.0],
        };
        for (o, passes) in [(offset, true), (beyond, false)] {
            let (next, policy, reference) = constant_side(r, o);
            let winner = Transitions {
                next: &next,
                mean_policy: &policy,
                mean_reference: &reference,
                std: &[1.0],
            };
            let out = OnlinePso::default().loss(&winner, &loser, None).unwrap();
            out.loss.backward();
            let g = policy.grad().abs().max().double_value(&[]);
            assert_eq!(g > 0.0, passes, "offset {o}: gradient {g}");
            let outside = if passes { 0.0 } else { 0.5 };
            assert_eq!(out.diagnostics.clamped_fraction, Some(outside));
        }
    }

    #[test]
    fn tied_pairs_contribute_nothing() {
        let w = Side::new(1, 0.01, 0.5);
        let l = Side::new(3, -0.01, 0.5);
        let pso = OnlinePso::default();
        let all = pso.loss(&w.transitions(), &l.transitions(), None).unwrap();
        let first = pso
            .loss(&w.transitions(), &l.transitions(), Some(&[true, false]))
            .unwrap();
        assert_eq!(
            (first.diagnostics.counted, first.diagnostics.skipped),
            (1, 1)
        );
        first.loss.backward();
        assert_eq!(w.policy.grad().get(1).abs().max().double_value(&[]), 0.0);
        assert!(w.policy.grad().get(0).abs().max().double_value(&[]) > 0.0);
        assert_ne!(all.diagnostics.loss, first.diagnostics.loss);
        let none = pso
            .loss(&w.transitions(), &l.transitions(), Some(&[false, false]))
            .unwrap();
        assert_eq!(none.loss.double_value(&[]), 0.0);
        assert_eq!(none.diagnostics.margin, None);
        none.loss.backward();
    }
}
