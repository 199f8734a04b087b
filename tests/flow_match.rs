//! The flow-matching scheduler and PSO's two kernels for flow models against the Python oracle
//! (scripts/oracle/flow_match.py): diffusers' `FlowMatchEulerDiscreteScheduler` sigmas,
//! timesteps and Euler trajectory for the FLUX (schnell, dynamic shift) and SD3 (static shift,
//! shift_terminal) requests, the re-noise kernel as diffusers' own stochastic step draws it, and
//! Flow-GRPO's SDE kernel with its log-probability.

mod common;

use diffusion::sampling::{FlowKernel, FlowMatchConfig, FlowMatchEuler, FlowSchedule};
use pso::objective::online_pso::mean_log_likelihood;
use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Deserialize)]
struct Oracle {
    cases: Vec<Case>,
    model: Model,
    shape: Vec<i64>,
}

#[derive(Deserialize)]
struct Model {
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: serde_json::Value,
    steps: Option<usize>,
    sigmas_request: Option<Vec<f64>>,
    mu: Option<f64>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    noise_level: f64,
    latents: Vec<Vec<f32>>,
    renoise_mean: Vec<Vec<f32>>,
    renoise_std: Vec<f64>,
    sde_mean: Vec<Vec<f32>>,
    sde_std: Vec<f64>,
    sde_log_prob: Vec<f64>,
    z: Vec<Vec<f32>>,
}

fn max_rel(a: &Tensor, b: &[f32]) -> f64 {
    let b = Tensor::from_slice(b).view_as(a);
    let diff = (a - &b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-6)
}

#[test]
fn flow_match_schedules_trajectories_and_kernels_match_the_oracle() {
    let oracle: Oracle = serde_json::from_str(&common::oracle("flow_match.py", &[])).unwrap();
    assert_eq!(oracle.cases.len(), 6);
    let shape = oracle.shape.clone();
    for case in &oracle.cases {
        let name = &case.name;
        let config = FlowMatchConfig::from_json(&case.config.to_string()).unwrap();
        let schedule = match (&case.steps, &case.sigmas_request) {
            (Some(n), None) => FlowSchedule::Steps(*n),
            (None, Some(s)) => FlowSchedule::Sigmas(s.clone()),
            other => panic!("{name}: {other:?}"),
        };
        let s = FlowMatchEuler::new(config, schedule, case.mu).unwrap();
        assert_eq!(s.sigmas.len(), case.sigmas.len(), "{name}");
        for (a, b) in s.sigmas.iter().zip(&case.sigmas) {
            assert!(
                (a - b).abs() <= 1e-7,
                "{name}: sigmas {:?} vs {:?}",
                s.sigmas,
                case.sigmas
            );
        }
        for (a, b) in s.timesteps.iter().zip(&case.timesteps) {
            assert!(
                (a - b).abs() <= 1e-4,
                "{name}: {:?} vs {:?}",
                s.timesteps,
                case.timesteps
            );
        }
        let mut x = Tensor::from_slice(&case.latents[0]).view(&shape[..]);
        for i in 0..s.num_steps() {
            assert!(max_rel(&x, &case.latents[i]) < 1e-5, "{name}: latents {i}");
            let t = s.timesteps[i];
            let v = (&x * oracle.model.a + oracle.model.b * t / 1000.0).tanh();

            let k = s.transition(i, &x, &v, FlowKernel::Renoise).unwrap();
            assert!(
                max_rel(&k.mean, &case.renoise_mean[i]) < 1e-5,
                "{name}: renoise mean {i}"
            );
            assert!(
                (k.std - case.renoise_std[i]).abs() < 1e-6,
                "{name}: renoise std {i}"
            );

            let sde = FlowKernel::Sde {
                noise_level: case.noise_level,
            };
            let k = s.transition(i, &x, &v, sde).unwrap();
            assert!(
                max_rel(&k.mean, &case.sde_mean[i]) < 1e-5,
                "{name}: sde mean {i}"
            );
            assert!(
                (k.std - case.sde_std[i]).abs() <= 1e-6 * case.sde_std[i].max(1.0),
                "{name}: sde std {i}: {} vs {}",
                k.std,
                case.sde_std[i]
            );
            let z = Tensor::from_slice(&case.z[i]).view(&shape[..]);
            let next = k.step(&z);
            let std = Tensor::from(k.std as f32).view([1, 1, 1, 1]);
            let log_prob = mean_log_likelihood(&next, &k.mean, &std).double_value(&[0]);
            assert!(
                (log_prob - case.sde_log_prob[i]).abs() < 1e-4,
                "{name}: log-prob {i}: {log_prob} vs {}",
                case.sde_log_prob[i]
            );
            x = s.step(i, &x, &v).unwrap().to_kind(Kind::Float);
        }
        assert!(
            max_rel(&x, case.latents.last().unwrap()) < 1e-5,
            "{name}: x0"
        );
    }
}
