//! The objectives against the official formulas (scripts/oracle/objectives.py, PyTorch autograd,
//! CPU): loss values, gradients with respect to the policy's inputs and diagnostics for online PSO
//! (ratios inside, on and beyond the clamp edges, ties, small and large s), Diffusion-DPO and
//! offline PSO (ε and v targets, ties, saturation), `pso_db` and SFT; plus the noising and targets.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use diffusion::sampling::{
    BetaSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
    Timesteps,
};
use pso::objective::offline_pso::offline_pso;
use pso::objective::{
    add_noise, hybrid_loss, noise_pair, regression_target, sft_loss, training_alphas_cumprod,
    Diagnostics, Dpo, Loss, OnlinePso, PairPredictions, PsoDb, TrainingSchedule, Transitions,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Relative tolerance of fp32 results.
const TOL: f64 = 1e-5;

#[derive(Debug, Deserialize)]
struct Index {
    alphas_cumprod_file: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    objective: String,
    #[serde(default)]
    beta: f64,
    #[serde(default)]
    epsilon: f64,
    #[serde(default)]
    lambda: f64,
    #[serde(default)]
    prior_weight: f64,
    #[serde(default)]
    std_w: Vec<f64>,
    #[serde(default)]
    std_l: Vec<f64>,
    counted: Option<Vec<bool>>,
    #[serde(default)]
    timesteps: Vec<u32>,
    prediction: Option<String>,
    diagnostics: ExpectedDiagnostics,
}

#[derive(Debug, Deserialize)]
struct ExpectedDiagnostics {
    loss: f64,
    counted: usize,
    skipped: usize,
    margin: Option<f64>,
    accuracy: Option<f64>,
    log_ratio_winner: Option<f64>,
    log_ratio_loser: Option<f64>,
    clamped_fraction: Option<f64>,
    mse_policy: Option<f64>,
    mse_reference: Option<f64>,
}

struct Oracle {
    dir: tempfile::TempDir,
    index: Index,
}

fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::oracle("objectives.py", &[dir.path().as_os_str()]);
        let index =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
                .unwrap();
        Oracle { dir, index }
    })
}

fn load(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(file))
        .unwrap()
        .into_iter()
        .collect()
}

fn alphas_cumprod() -> Vec<f64> {
    oracle_alphas_cumprod("alphas_cumprod")
}

/// The ᾱ the oracle wrote under `name`, widened to f64.
fn oracle_alphas_cumprod(name: &str) -> Vec<f64> {
    let o = oracle();
    let t = &load(o.dir.path(), &o.index.alphas_cumprod_file)[name];
    Vec::<f32>::try_from(t)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn cases(objectives: &[&str]) -> Vec<(&'static Case, HashMap<String, Tensor>)> {
    let o = oracle();
    let found: Vec<_> = o
        .index
        .cases
        .iter()
        .filter(|c| objectives.contains(&c.objective.as_str()))
        .map(|c| (c, load(o.dir.path(), &format!("{}.safetensors", c.name))))
        .collect();
    assert!(!found.is_empty(), "the oracle wrote no {objectives:?} case");
    found
}

fn get<'a>(t: &'a HashMap<String, Tensor>, case: &str, name: &str) -> &'a Tensor {
    t.get(name)
        .unwrap_or_else(|| panic!("{case}: the oracle output lacks `{name}`"))
}

/// A leaf copy of an oracle input that records its gradient.
fn leaf(t: &Tensor) -> Tensor {
    t.copy().set_requires_grad(true)
}

/// max |got − want| ≤ TOL · max(max |want|, floor).
fn assert_close(case: &str, what: &str, got: &Tensor, want: &Tensor, floor: f64) {
    assert_eq!(got.size(), want.size(), "{case}: {what} shape");
    let scale = want.abs().max().double_value(&[]).max(floor);
    let err = (got - want).abs().max().double_value(&[]);
    assert!(
        err <= TOL * scale,
        "{case}: {what} differs by {err:e} (scale {scale:e})"
    );
}

fn assert_scalar(case: &str, what: &str, got: Option<f64>, want: Option<f64>) {
    match (got, want) {
        (Some(g), Some(w)) => assert!(
            (g - w).abs() <= TOL * w.abs().max(1.0),
            "{case}: {what} is {g}, the oracle says {w}"
        ),
        (g, w) => assert_eq!(g.is_some(), w.is_some(), "{case}: {what} {g:?} vs {w:?}"),
    }
}

fn check_diagnostics(case: &str, got: &Diagnostics, want: &ExpectedDiagnostics) {
    assert_scalar(case, "loss", Some(got.loss), Some(want.loss));
    assert_eq!(
        (got.counted, got.skipped),
        (want.counted, want.skipped),
        "{case}"
    );
    assert_scalar(case, "margin", got.margin, want.margin);
    assert_scalar(case, "accuracy", got.accuracy, want.accuracy);
    assert_scalar(
        case,
        "log_ratio_winner",
        got.log_ratio_winner,
        want.log_ratio_winner,
    );
    assert_scalar(
        case,
        "log_ratio_loser",
        got.log_ratio_loser,
        want.log_ratio_loser,
    );
    assert_scalar(
        case,
        "clamped_fraction",
        got.clamped_fraction,
        want.clamped_fraction,
    );
    assert_scalar(case, "mse_policy", got.mse_policy, want.mse_policy);
    assert_scalar(case, "mse_reference", got.mse_reference, want.mse_reference);
}

/// Checks the loss value, then backpropagates it and checks each (leaf, expected gradient).
fn check_loss(case: &Case, t: &HashMap<String, Tensor>, out: Loss, grads: &[(&Tensor, &str)]) {
    let name = case.name.as_str();
    assert_close(name, "loss", &out.loss, get(t, name, "loss"), 1e-3);
    check_diagnostics(name, &out.diagnostics, &case.diagnostics);
    out.loss.backward();
    for (leaf, key) in grads {
        let want = get(t, name, key);
        let got = leaf.grad();
        assert_close(name, key, &got, want, 1e-6);
        // Clamped ratios and masked pairs must get exactly no gradient, as in PyTorch.
        let zero_where_expected = got.masked_select(&want.eq(0.0)).abs().sum(tch::Kind::Float);
        assert_eq!(
            zero_where_expected.double_value(&[]),
            0.0,
            "{name}: {key} is non-zero where the oracle's gradient is exactly zero"
        );
    }
}

fn prediction(case: &Case) -> PredictionType {
    match case.prediction.as_deref() {
        Some("epsilon") => PredictionType::Epsilon,
        Some("v_prediction") => PredictionType::VPrediction,
        Some("sample") => PredictionType::Sample,
        other => panic!("{}: unknown prediction type {other:?}", case.name),
    }
}

#[test]
fn online_pso_matches_the_official_loss_and_gradients() {
    for (case, t) in cases(&["online_pso"]) {
        let name = case.name.as_str();
        let (pw, pl) = (
            leaf(get(&t, name, "policy_w")),
            leaf(get(&t, name, "policy_l")),
        );
        let winner = Transitions {
            next: get(&t, name, "next_w"),
            mean_policy: &pw,
            mean_reference: get(&t, name, "ref_w"),
            std: &case.std_w,
        };
        let loser = Transitions {
            next: get(&t, name, "next_l"),
            mean_policy: &pl,
            mean_reference: get(&t, name, "ref_l"),
            std: &case.std_l,
        };
        let objective = OnlinePso::new(case.beta, case.epsilon).unwrap();
        let out = objective
            .loss(&winner, &loser, case.counted.as_deref())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_loss(
            case,
            &t,
            out,
            &[(&pw, "grad_policy_w"), (&pl, "grad_policy_l")],
        );
    }
}

/// The whole online chain, kernel included: from x_t, the stored x_{t'} and the policy's and
/// reference's ε predictions, pso's Euler-ancestral kernel (the sampler's own transition) and
/// online PSO loss equal the official SDXL-Turbo step with log-prob and loss
/// (`turbo_inference_with_logprob.py` l. 24–116, `train_online_pso_sdxl_turbo.py` l. 842–850),
/// gradients into the policy's prediction included.
#[test]
fn online_pso_from_kernels_matches_the_official_turbo_chain() {
    let mut config = SchedulerConfig::new(SchedulerKind::EulerAncestral);
    config.beta_schedule = BetaSchedule::ScaledLinear;
    config.beta_start = 0.00085;
    config.beta_end = 0.012;
    config.timestep_spacing = TimestepSpacing::Trailing;
    let scheduler = Scheduler::new(config, Timesteps::Steps(4)).unwrap();
    let cases = cases(&["turbo_chain"]);
    assert_eq!(cases.len(), 3);
    for (case, t) in cases {
        let name = case.name.as_str();
        let step = case.timesteps[0] as usize;
        let policy = [
            leaf(get(&t, name, "policy_0")),
            leaf(get(&t, name, "policy_1")),
        ];
        let kernels: Vec<_> = (0..2)
            .map(|side| {
                let x = get(&t, name, &format!("x_{side}"));
                let reference = get(&t, name, &format!("ref_{side}"));
                let pol = scheduler.transition(step, x, &policy[side]).unwrap();
                let rf = scheduler.transition(step, x, reference).unwrap();
                (pol, rf)
            })
            .collect();
        let winner_is_1 = Vec::<f32>::try_from(get(&t, name, "winner_is_1")).unwrap();
        // Rows of each side, reordered into (winner, loser) per pair.
        let pick = |of: &dyn Fn(usize) -> Tensor, winner: bool| {
            let rows: Vec<Tensor> = winner_is_1
                .iter()
                .enumerate()
                .map(|(i, &w1)| {
                    let side = usize::from((w1 > 0.5) == winner);
                    of(side).get(i as i64)
                })
                .collect();
            Tensor::stack(&rows, 0)
        };
        let next = |side: usize| get(&t, name, &format!("next_{side}")).shallow_clone();
        let mean_policy = |side: usize| kernels[side].0.mean.shallow_clone();
        let mean_reference = |side: usize| kernels[side].1.mean.shallow_clone();
        let std = vec![kernels[0].0.std; winner_is_1.len()];
        let (next_w, next_l) = (pick(&next, true), pick(&next, false));
        let (pol_w, pol_l) = (pick(&mean_policy, true), pick(&mean_policy, false));
        let (ref_w, ref_l) = (pick(&mean_reference, true), pick(&mean_reference, false));
        let winner = Transitions {
            next: &next_w,
            mean_policy: &pol_w,
            mean_reference: &ref_w,
            std: &std,
        };
        let loser = Transitions {
            next: &next_l,
            mean_policy: &pol_l,
            mean_reference: &ref_l,
            std: &std,
        };
        let out = OnlinePso::new(case.beta, case.epsilon)
            .unwrap()
            .loss(&winner, &loser, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_scalar(
            name,
            "loss",
            Some(out.loss.double_value(&[])),
            Some(case.diagnostics.loss),
        );
        out.loss.backward();
        for (side, p) in policy.iter().enumerate() {
            assert_close(
                name,
                &format!("grad_policy_{side}"),
                &p.grad(),
                get(&t, name, &format!("grad_policy_{side}")),
                1e-3,
            );
        }
    }
}

#[test]
fn online_pso_edge_case_covers_both_sides_of_both_edges() {
    // The oracle put pairs 0 and 1 exactly on 1 + ε and 1 − ε, pairs 2 and 3 just beyond them.
    let (case, t) = cases(&["online_pso"])
        .into_iter()
        .find(|(c, _)| c.name == "online_edges")
        .expect("the oracle wrote no online_edges case");
    let norm = |key: &str, pair: i64| {
        get(&t, &case.name, key)
            .get(pair)
            .abs()
            .max()
            .double_value(&[])
    };
    assert!(norm("grad_policy_w", 0) > 0.0 && norm("grad_policy_l", 1) > 0.0);
    assert_eq!(norm("grad_policy_w", 2), 0.0);
    assert_eq!(norm("grad_policy_l", 3), 0.0);
}

/// `objective.zero_terminal_snr` noises on the schedule Diffusion-DPO's `enforce_zero_terminal_snr`
/// makes for Turbo models (train.py l. 480–503, transcribed in the oracle); off, on DDPM's.
#[test]
fn zero_terminal_snr_matches_diffusion_dpo_turbo_schedule() {
    let mut config = SchedulerConfig::new(SchedulerKind::Euler);
    config.beta_schedule = BetaSchedule::ScaledLinear;
    config.beta_start = 0.00085;
    config.beta_end = 0.012;
    for (zero_snr, name) in [(false, "alphas_cumprod"), (true, "alphas_cumprod_zero_snr")] {
        let ours = training_alphas_cumprod(&config, zero_snr);
        let theirs = oracle_alphas_cumprod(name);
        assert_eq!(ours.len(), theirs.len());
        for (t, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.max(1e-3),
                "{name} t={t}: {a} vs {b}"
            );
        }
    }
    assert_eq!(training_alphas_cumprod(&config, true)[999], 0.0);
    assert!(training_alphas_cumprod(&config, false)[999] > 0.004);
}

#[test]
fn dpo_and_offline_pso_match_the_official_losses() {
    let ac = alphas_cumprod();
    for (case, t) in cases(&["dpo", "offline_pso"]) {
        let name = case.name.as_str();
        let pred = prediction(case);
        let pair = noise_pair(
            get(&t, name, "x0_w"),
            get(&t, name, "x0_l"),
            get(&t, name, "noise"),
            &case.timesteps,
            &TrainingSchedule::Vp {
                alphas_cumprod: ac.clone(),
                prediction: pred,
            },
        )
        .unwrap();
        assert_close(
            name,
            "noisy_w",
            &pair.noisy_winner,
            get(&t, name, "noisy_w"),
            1.0,
        );
        assert_close(
            name,
            "noisy_l",
            &pair.noisy_loser,
            get(&t, name, "noisy_l"),
            1.0,
        );
        assert_close(
            name,
            "target_w",
            &pair.target_winner,
            get(&t, name, "target_w"),
            1.0,
        );
        assert_close(
            name,
            "target_l",
            &pair.target_loser,
            get(&t, name, "target_l"),
            1.0,
        );

        let objective = if case.objective == "dpo" {
            Dpo::diffusion_dpo(ac.len(), case.beta).unwrap()
        } else {
            offline_pso(&[999, 749, 499, 249], case.beta, case.lambda).unwrap()
        };
        let (pw, pl) = (
            leaf(get(&t, name, "policy_w")),
            leaf(get(&t, name, "policy_l")),
        );
        let predictions = PairPredictions {
            policy_winner: &pw,
            policy_loser: &pl,
            reference_winner: get(&t, name, "ref_w"),
            reference_loser: get(&t, name, "ref_l"),
            target_winner: get(&t, name, "target_w"),
            target_loser: get(&t, name, "target_l"),
        };
        let out = objective
            .loss(&predictions, &case.timesteps, case.counted.as_deref())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_loss(
            case,
            &t,
            out,
            &[(&pw, "grad_policy_w"), (&pl, "grad_policy_l")],
        );
    }
}

#[test]
fn pso_db_matches_the_official_edm_style_loss() {
    for (case, t) in cases(&["pso_db"]) {
        let name = case.name.as_str();
        let objective = PsoDb {
            beta: case.beta,
            lambda: case.lambda,
            prior_weight: case.prior_weight,
        };
        let (pw, pl) = (
            leaf(get(&t, name, "policy_w")),
            leaf(get(&t, name, "policy_l")),
        );
        let out = objective
            .loss(
                &pw,
                &pl,
                get(&t, name, "target_w"),
                get(&t, name, "target_l"),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_loss(
            case,
            &t,
            out,
            &[(&pw, "grad_policy_w"), (&pl, "grad_policy_l")],
        );
    }
}

#[test]
fn sft_matches_mse_on_eps_v_and_x0_targets() {
    let ac = alphas_cumprod();
    for (case, t) in cases(&["sft"]) {
        let name = case.name.as_str();
        let (x0, noise) = (get(&t, name, "x0"), get(&t, name, "noise"));
        let noisy = add_noise(x0, noise, &case.timesteps, &ac).unwrap();
        assert_close(name, "noisy", &noisy, get(&t, name, "noisy"), 1.0);
        let target = regression_target(x0, noise, &case.timesteps, &ac, prediction(case)).unwrap();
        assert_close(name, "target", &target, get(&t, name, "target"), 1.0);
        let p = leaf(get(&t, name, "policy"));
        let out = sft_loss(&p, &target).unwrap();
        check_loss(case, &t, out, &[(&p, "grad_policy")]);
    }
}

#[test]
fn hybrid_matches_iddpm_mse_plus_vlb_with_the_decoder_nll_at_t0() {
    let ac = alphas_cumprod();
    for (case, t) in cases(&["hybrid"]) {
        let name = case.name.as_str();
        let (x0, noise) = (get(&t, name, "x0"), get(&t, name, "noise"));
        let noisy = add_noise(x0, noise, &case.timesteps, &ac).unwrap();
        assert_close(name, "noisy", &noisy, get(&t, name, "noisy"), 1.0);
        let p = leaf(get(&t, name, "policy"));
        let out = hybrid_loss(&p, noise, x0, &noisy, &case.timesteps, &ac).unwrap();
        check_loss(case, &t, out, &[(&p, "grad_policy")]);
    }
    let z = Tensor::zeros([1, 2, 2, 2], (Kind::Float, Device::Cpu));
    let e = hybrid_loss(&z, &z, &z, &z, &[0], &ac)
        .unwrap_err()
        .to_string();
    assert!(e.contains("twice the latent's 2"), "{e}");
}
