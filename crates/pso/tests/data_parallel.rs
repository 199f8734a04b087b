//! The learner trains data-parallel over c10d (Gloo on the CPU): each rank's gradient is
//! replaced by the mean over the ranks, so N ranks with different data take exactly the step
//! that one process takes on the mean of their losses, and stay equal. The test binary starts
//! itself once per rank with torchrun's variables.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dist::{Launch, ProcessGroup};
use pso::learner::{Learner, LearnerSection};
use pso::objective::{Diagnostics, Loss};
use pso::optim::OptimSection;
use tch::{Kind, Tensor};

const ROLE: &str = "PSO_DP_TEST_ROLE";
const STEPS: usize = 3;

/// Rank r's data: a target the loss pulls the weights toward (step 1 of rank 1 is non-finite in
/// the `nonfinite` role, which every rank must then skip).
fn target(rank: usize, step: usize) -> [f32; 2] {
    [
        rank as f32 * 2.0 - 1.0 + step as f32 * 0.1,
        3.0 - rank as f32,
    ]
}

fn loss_of(w: &Tensor, target: [f32; 2]) -> Loss {
    let loss = (w - Tensor::from_slice(&target)).square().sum(Kind::Float);
    Loss {
        diagnostics: Diagnostics {
            loss: loss.double_value(&[]),
            counted: 1,
            ..Diagnostics::default()
        },
        loss,
    }
}

fn learner(w: &Tensor) -> Learner {
    let optim = OptimSection {
        lr: 0.1,
        ..OptimSection::default()
    };
    Learner::new(
        vec![("w".into(), w.shallow_clone())],
        &optim,
        &LearnerSection::default(),
    )
}

/// What a step reported: skipped, loss (null when not finite), pairs.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Step(bool, Option<f64>, usize);

impl Step {
    fn of(report: &pso::learner::StepReport) -> Step {
        let loss = report.diagnostics.loss;
        Step(
            report.skipped,
            loss.is_finite().then_some(loss),
            report.pairs,
        )
    }
}

/// The final weights and every step's report.
type Outcome = (Vec<f64>, Vec<Step>);

/// Equal up to fp32 rounding (the ranks sum in another order than one process).
fn assert_close(ours: &Outcome, theirs: &Outcome) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
    assert!(
        ours.0.len() == theirs.0.len() && ours.0.iter().zip(&theirs.0).all(|(a, b)| close(*a, *b)),
        "{ours:?} vs {theirs:?}"
    );
    for (a, b) in ours.1.iter().zip(&theirs.1) {
        assert_eq!((a.0, a.2), (b.0, b.2), "{ours:?} vs {theirs:?}");
        match (a.1, b.1) {
            (Some(x), Some(y)) => assert!(close(x, y), "{ours:?} vs {theirs:?}"),
            (x, y) => assert_eq!(x, y, "{ours:?} vs {theirs:?}"),
        }
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
}

/// One rank's part; a no-op unless started by `run_ranks`.
#[test]
fn rank() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let launch = Launch::from_env().unwrap().unwrap();
    let group = Arc::new(ProcessGroup::gloo(&launch, Duration::from_secs(60)).unwrap());
    // Ranks start from different values: joining copies rank 0's.
    let w = Tensor::from_slice(&[0.5f32 + launch.rank as f32, -0.5]).set_requires_grad(true);
    let mut learner = learner(&w);
    learner.join(group).unwrap();
    let mut lines = Vec::new();
    for step in 0..STEPS {
        let report = learner
            .step(|_| {
                let mut loss = loss_of(&w, target(launch.rank, step));
                if role == "nonfinite" && launch.rank == 1 && step == 1 {
                    loss.diagnostics.loss = f64::NAN;
                }
                Ok(loss)
            })
            .unwrap();
        lines.push(Step::of(&report));
    }
    println!(
        "RESULT {}",
        serde_json::to_string(&(values(&w), lines)).unwrap()
    );
}

fn run_ranks(role: &str, world: usize) -> Vec<Outcome> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["rank", "--exact", "--nocapture", "--test-threads", "1"])
                .env(ROLE, role)
                .envs(Launch::local(rank, world, port).to_env())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            stdout
                .lines()
                .find_map(|l| {
                    l.split_once("RESULT ")
                        .map(|(_, r)| serde_json::from_str(r).unwrap())
                })
                .unwrap_or_else(|| panic!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
        })
        .collect()
}

/// What one process computes on the mean of the ranks' losses, from rank 0's start.
fn single_process(world: usize, skip_step: Option<usize>) -> Outcome {
    let w = Tensor::from_slice(&[0.5f32, -0.5]).set_requires_grad(true);
    let mut learner = learner(&w);
    let mut lines = Vec::new();
    for step in 0..STEPS {
        let report = learner
            .step(|_| {
                let losses: Vec<Loss> = (0..world).map(|r| loss_of(&w, target(r, step))).collect();
                let mut mean = losses
                    .iter()
                    .map(|l| l.loss.shallow_clone())
                    .reduce(|a, b| a + b)
                    .unwrap()
                    / world as f64;
                let mut value =
                    losses.iter().map(|l| l.diagnostics.loss).sum::<f64>() / world as f64;
                if skip_step == Some(step) {
                    value = f64::NAN;
                    mean *= f64::NAN;
                }
                Ok(Loss {
                    diagnostics: Diagnostics {
                        loss: value,
                        counted: world,
                        ..Diagnostics::default()
                    },
                    loss: mean,
                })
            })
            .unwrap();
        lines.push(Step::of(&report));
    }
    (values(&w), lines)
}

#[test]
fn ranks_step_as_one_process_on_the_mean_loss_and_stay_equal() {
    let results = run_ranks("train", 3);
    // Every rank applied the same averaged gradient: bit-equal weights.
    assert!(results.iter().all(|r| r == &results[0]), "{results:?}");
    assert_close(&results[0], &single_process(3, None));
}

#[test]
fn a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank() {
    let results = run_ranks("nonfinite", 2);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].1[1], Step(true, None, 2), "{results:?}");
    assert_close(&results[0], &single_process(2, Some(1)));
}
