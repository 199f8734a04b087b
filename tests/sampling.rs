//! The samplers against diffusers (scripts/oracle/schedulers.py, fp32, CPU): timesteps, σ, every
//! latent of the trajectory, and each step's kernel (μ, s), for Euler, Euler-ancestral, LCM, DDIM
//! and DDPM (with every supported variance, learned included) over prediction types, spacings,
//! step counts, beta schedules and explicit lists, with explicit noise tensors and with seeded
//! noise.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use diffusion::sampling::{
    sample, ExplicitNoise, InitialLatents, NoiseSource, Scheduler, SchedulerConfig, SeededNoise,
    Timesteps,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// Relative tolerance of fp32 results.
const TOL: f64 = 1e-5;

#[derive(Debug, Deserialize)]
struct Index {
    model: FakeModel,
    shape: Vec<i64>,
    cases: Vec<Case>,
}

/// model_output = tanh(a·model_input + b·t/1000), as in the oracle; with a learned variance
/// followed by v = learned·tanh(−a·model_input + b·t/1000).
#[derive(Debug, Clone, Copy, Deserialize)]
struct FakeModel {
    a: f64,
    b: f64,
    learned: f64,
}

impl FakeModel {
    fn output(self, model_input: &Tensor, t: f64, learned: bool) -> Tensor {
        let eps = (model_input * self.a + self.b * t / 1000.0).tanh();
        if !learned {
            return eps;
        }
        let v = (model_input * -self.a + self.b * t / 1000.0).tanh() * self.learned;
        Tensor::cat(&[eps, v], 1)
    }
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    config: serde_json::Value,
    request: Request,
    eta: f64,
    noise: String,
    seed: u64,
    learned: bool,
}

#[derive(Debug, Deserialize)]
struct Request {
    steps: Option<usize>,
    timesteps: Option<Vec<u32>>,
}

struct Expected(HashMap<String, Tensor>);

impl Expected {
    fn load(dir: &Path, case: &str) -> Expected {
        let tensors = Tensor::read_safetensors(dir.join(format!("{case}.safetensors"))).unwrap();
        Expected(tensors.into_iter().collect())
    }

    fn get(&self, name: &str) -> &Tensor {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("oracle output lacks `{name}`"))
    }

    fn values(&self, name: &str) -> Vec<f64> {
        Vec::<f64>::try_from(self.get(name)).unwrap()
    }

    fn noise(&self) -> Vec<Tensor> {
        (0..)
            .map_while(|k| self.0.get(&format!("noise.{k}")).map(Tensor::shallow_clone))
            .collect()
    }
}

/// Runs the oracle once for all tests of this binary.
fn oracle() -> &'static (tempfile::TempDir, Index) {
    static ORACLE: OnceLock<(tempfile::TempDir, Index)> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::oracle("schedulers.py", &[dir.path().as_os_str()]);
        let index =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
                .unwrap();
        (dir, index)
    })
}

fn scheduler(case: &Case) -> Scheduler {
    let mut config = SchedulerConfig::from_json(&case.config.to_string())
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    config.eta = case.eta;
    let request = match (&case.request.steps, &case.request.timesteps) {
        (Some(s), None) => Timesteps::Steps(*s),
        (None, Some(t)) => Timesteps::Explicit(t.clone()),
        other => panic!("{}: bad request {other:?}", case.name),
    };
    Scheduler::new(config, request).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// Largest |a − b| relative to the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * b.abs().max(1.0)
}

#[test]
fn schedules_and_trajectories_match_diffusers() {
    let (dir, index) = oracle();
    let model = index.model;
    for case in &index.cases {
        let name = &case.name;
        let exp = Expected::load(dir.path(), name);
        let s = scheduler(case);

        assert_eq!(
            s.timesteps(),
            exp.values("timesteps").as_slice(),
            "{name}: timesteps"
        );
        match s.sigmas() {
            Some(sigmas) => {
                let theirs = exp.values("sigmas");
                assert_eq!(sigmas.len(), theirs.len(), "{name}: number of sigmas");
                for (a, b) in sigmas.iter().zip(&theirs) {
                    assert!(close(*a, *b), "{name}: sigmas {sigmas:?} vs {theirs:?}");
                }
            }
            None => assert!(
                !exp.0.contains_key("sigmas"),
                "{name}: diffusers has sigmas"
            ),
        }
        let init_sigma = exp.values("init_noise_sigma")[0];
        assert!(
            close(s.init_noise_sigma(), init_sigma),
            "{name}: init_noise_sigma {} vs {init_sigma}",
            s.init_noise_sigma()
        );

        let mut denoiser = |x: &Tensor, t: f64| model.output(x, t, case.learned);
        let mut explicit = ExplicitNoise::new(exp.noise());
        let mut seeded = SeededNoise::new(case.seed);
        let (initial, noise): (_, &mut dyn NoiseSource) = match case.noise.as_str() {
            "explicit" => (
                InitialLatents::Given(exp.get("init").shallow_clone()),
                &mut explicit,
            ),
            "seeded" => (
                InitialLatents::Draw {
                    shape: index.shape.clone(),
                    kind: Kind::Float,
                    device: Device::Cpu,
                },
                &mut seeded,
            ),
            other => panic!("{name}: unknown noise mode {other}"),
        };
        let out = sample(&s, &mut denoiser, initial, noise, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            explicit.remaining(),
            0,
            "{name}: the sampler drew fewer noise tensors than diffusers"
        );

        let tr = out.trajectory.expect("recorded");
        assert_eq!(tr.latents.len(), s.num_steps() + 1, "{name}");
        for (i, ours) in tr.latents.iter().enumerate() {
            let err = rel_err(ours, exp.get(&format!("latents.{i}")));
            assert!(err < TOL, "{name}: latents.{i} relative error {err:e}");
        }
        for (i, kernel) in tr.kernels.iter().enumerate() {
            let err = rel_err(&kernel.mean, exp.get(&format!("mean.{i}")));
            assert!(err < TOL, "{name}: mean.{i} relative error {err:e}");
            match &kernel.learned_std {
                Some(s) => {
                    let err = rel_err(s, exp.get(&format!("learned_std.{i}")));
                    assert!(err < TOL, "{name}: learned_std.{i} relative error {err:e}");
                }
                None => {
                    let theirs = exp.values(&format!("std.{i}"))[0];
                    assert!(
                        close(kernel.std, theirs),
                        "{name}: std.{i} {} vs {theirs}",
                        kernel.std
                    );
                }
            }
        }
        assert!(
            out.latents.equal(tr.latents.last().unwrap()),
            "{name}: final latents"
        );
    }
}

/// The learner's view: μ recomputed from a recorded x_t (here diffusers' own) and the model output
/// by the same pure function the sampler uses, and x_{t'} = μ + s·z for the noise z drawn.
#[test]
fn kernels_reproduce_each_recorded_transition_and_the_last_step_is_deterministic() {
    let (dir, index) = oracle();
    let model = index.model;
    let mut stochastic = 0;
    for case in index.cases.iter().filter(|c| c.noise == "explicit") {
        let name = &case.name;
        let exp = Expected::load(dir.path(), name);
        let s = scheduler(case);
        let mut noise = exp.noise().into_iter();
        let shape = exp.get("init").size();
        // The Rust noise stream of the same case: the sampler draws exactly where diffusers did.
        let draws: Vec<bool> = (0..s.num_steps()).map(|i| s.draws_noise(i)).collect();
        assert_eq!(
            draws.iter().filter(|&&d| d).count(),
            exp.noise().len(),
            "{name}: number of draws"
        );
        let mut last_std = None;
        for (i, &draws_noise) in draws.iter().enumerate() {
            let x = exp.get(&format!("latents.{i}"));
            let next = exp.get(&format!("latents.{}", i + 1));
            let output = model.output(
                &s.scale_model_input(i, x).unwrap(),
                s.timesteps()[i],
                case.learned,
            );
            let kernel = s.transition(i, x, &output).unwrap();
            let z = if draws_noise {
                noise.next().unwrap()
            } else {
                Tensor::zeros(&shape, (Kind::Float, Device::Cpu))
            };
            let err = rel_err(&kernel.step(&z), next);
            assert!(err < TOL, "{name}: step {i}: μ + s·z is off by {err:e}");
            if kernel.std > 0.0 {
                stochastic += 1;
                assert!(draws_noise, "{name}: step {i} has s > 0 but draws no noise");
            }
            last_std = Some(kernel.std);
        }
        // DDPM keeps adding noise on a last step that ends above t = 0 with a large or learned
        // variance, as diffusers does; every other sampler ends deterministically.
        let ddpm_noisy_end = name.contains("DDPM") || name.starts_with("ddpm");
        if !ddpm_noisy_end || s.timesteps().last() == Some(&0.0) {
            assert_eq!(
                last_std,
                Some(0.0),
                "{name}: the last step must be deterministic"
            );
        }
    }
    assert!(
        stochastic > 100,
        "only {stochastic} stochastic transitions were checked"
    );
}

/// A seeded source gives diffusers' `generator=torch.Generator().manual_seed(seed)` numbers even
/// when its noise is drawn in several calls (here: one per tensor).
#[test]
fn seeded_noise_drawn_piecewise_is_the_torch_generator_stream() {
    let (dir, index) = oracle();
    let model = index.model;
    for case in index.cases.iter().filter(|c| c.noise == "seeded") {
        let exp = Expected::load(dir.path(), &case.name);
        let s = scheduler(case);
        let mut seeded = SeededNoise::new(case.seed);
        let init = seeded.draw(&index.shape, 1).unwrap().remove(0);
        let steps: Vec<Tensor> = (0..s.num_steps())
            .filter(|&i| s.draws_noise(i))
            .map(|_| seeded.draw(&index.shape, 1).unwrap().remove(0))
            .collect();
        let mut denoiser = |x: &Tensor, t: f64| model.output(x, t, case.learned);
        let out = sample(
            &s,
            &mut denoiser,
            InitialLatents::Given(init),
            &mut ExplicitNoise::new(steps),
            false,
        )
        .unwrap();
        let err = rel_err(&out.latents, exp.get(&format!("latents.{}", s.num_steps())));
        assert!(err < TOL, "{}: final latents off by {err:e}", case.name);
    }
}
