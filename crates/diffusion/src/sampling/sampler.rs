//! The few-step sampling loop of a diffusers text-to-image pipeline, model-agnostic, optionally
//! recording its trajectory x_T → … → x0 with the kernel (μ, s) and noise z of every transition.

use tch::{Device, Kind, Tensor};

use super::kernel::Kernel;
use super::noise::NoiseSource;
use super::scheduler::Scheduler;
use super::SamplingError;

/// The denoising model: scaled latents and timestep in, model output (ε, v or x0) out.
pub trait Denoiser {
    /// The model output for `model_input` (already scaled by the scheduler) at `timestep`, a value
    /// of diffusers' `scheduler.timesteps` (integral for LCM and DDIM, fp32 for the Euler family).
    fn predict(&mut self, model_input: &Tensor, timestep: f64) -> Tensor;
}

impl<F: FnMut(&Tensor, f64) -> Tensor> Denoiser for F {
    fn predict(&mut self, model_input: &Tensor, timestep: f64) -> Tensor {
        self(model_input, timestep)
    }
}

/// Where x_T comes from.
#[derive(Debug)]
pub enum InitialLatents {
    /// A pipeline's `latents=`: unit-variance noise, multiplied by `init_noise_sigma` here.
    Given(Tensor),
    /// Drawn from the noise source first, as a pipeline draws them from its `generator`.
    Draw {
        /// Latent shape [B, C, H, W].
        shape: Vec<i64>,
        /// Latent dtype.
        kind: Kind,
        /// Latent device.
        device: Device,
    },
}

/// A recorded trajectory.
#[derive(Debug)]
pub struct Trajectory {
    /// The model timestep of each step.
    pub timesteps: Vec<f64>,
    /// x_{t0} = x_T (after `init_noise_sigma`), x_{t1}, …, x0: one more than the steps.
    pub latents: Vec<Tensor>,
    /// The kernel of each step: latents[i + 1] = μ_i + s_i·z_i.
    pub kernels: Vec<Kernel>,
    /// The noise z_i drawn at each step (`None` where the step draws none).
    pub noise: Vec<Option<Tensor>>,
}

impl Trajectory {
    /// Indices of the transitions with a likelihood (s > 0); the deterministic last step has none.
    pub fn stochastic_steps(&self) -> Vec<usize> {
        (0..self.kernels.len())
            .filter(|&i| self.kernels[i].std > 0.0)
            .collect()
    }
}

/// What a sampling run returns.
#[derive(Debug)]
pub struct SampleOutput {
    /// The final latents x0 (before the VAE's scaling factor is undone).
    pub latents: Tensor,
    /// The trajectory, when recording was asked for.
    pub trajectory: Option<Trajectory>,
}

/// Runs the pipeline loop: for each step, model input = `scale_model_input(x)`, output = model,
/// x ← μ + s·z with (μ, s) from [`Scheduler::transition`] and z from `noise`.
///
/// Runs without autograd. The latents keep the kind of x_T; the model output is cast to it. No
/// tensor is modified in place, so recorded latents and means share storage with the loop's.
pub fn sample(
    scheduler: &Scheduler,
    denoiser: &mut impl Denoiser,
    initial: InitialLatents,
    noise: &mut dyn NoiseSource,
    record: bool,
) -> Result<SampleOutput, SamplingError> {
    let _no_grad = tch::no_grad_guard();
    let (shape, kind, device) = match &initial {
        InitialLatents::Given(t) => (t.size(), t.kind(), t.device()),
        InitialLatents::Draw {
            shape,
            kind,
            device,
        } => (shape.clone(), *kind, *device),
    };
    let steps = scheduler.num_steps();
    let step_draws = (0..steps).filter(|&i| scheduler.draws_noise(i)).count();
    let drawn_latents = matches!(initial, InitialLatents::Draw { .. });
    let mut drawn = noise
        .draw(&shape, step_draws + usize::from(drawn_latents))?
        .into_iter()
        .map(|t| t.to_kind(kind).to_device(device));
    let latents = match initial {
        InitialLatents::Given(t) => t,
        InitialLatents::Draw { .. } => drawn.next().expect("the initial latents were drawn"),
    };
    let mut x = latents * scheduler.init_noise_sigma();
    let mut trajectory = record.then(|| Trajectory {
        timesteps: scheduler.timesteps().to_vec(),
        latents: vec![x.shallow_clone()],
        kernels: Vec::with_capacity(steps),
        noise: Vec::with_capacity(steps),
    });
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let model_input = scheduler.scale_model_input(i, &x)?;
        let output = denoiser.predict(&model_input, t).to_kind(kind);
        let kernel = scheduler.transition(i, &x, &output)?;
        let z = scheduler
            .draws_noise(i)
            .then(|| drawn.next().expect("one noise tensor per drawing step"));
        x = match &z {
            Some(z) => kernel.step(z),
            None => kernel.mean.shallow_clone(),
        };
        if let Some(tr) = trajectory.as_mut() {
            tr.latents.push(x.shallow_clone());
            tr.kernels.push(kernel);
            tr.noise.push(z);
        }
    }
    Ok(SampleOutput {
        latents: x,
        trajectory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::config::{SchedulerConfig, SchedulerKind, TimestepSpacing};
    use crate::sampling::noise::{ExplicitNoise, SeededNoise};
    use crate::sampling::scheduler::Timesteps;

    fn scheduler(kind: SchedulerKind, steps: usize) -> Scheduler {
        let mut c = SchedulerConfig::new(kind);
        c.timestep_spacing = TimestepSpacing::Trailing;
        Scheduler::new(c, Timesteps::Steps(steps)).unwrap()
    }

    fn model(x: &Tensor, t: f64) -> Tensor {
        (x * 0.7 + t / 1000.0).tanh()
    }

    #[test]
    fn recorded_trajectory_has_one_latent_per_timestep_plus_x0() {
        let s = scheduler(SchedulerKind::EulerAncestral, 4);
        let out = sample(
            &s,
            &mut model,
            InitialLatents::Draw {
                shape: vec![1, 4, 3, 3],
                kind: Kind::Float,
                device: Device::Cpu,
            },
            &mut SeededNoise::new(3),
            true,
        )
        .unwrap();
        let tr = out.trajectory.unwrap();
        assert_eq!(tr.latents.len(), 5);
        assert_eq!(tr.kernels.len(), 4);
        assert_eq!(tr.stochastic_steps(), [0, 1, 2]);
        assert!(tr.latents[4].equal(&out.latents));
    }

    #[test]
    fn too_little_explicit_noise_fails_before_the_model_runs() {
        let s = scheduler(SchedulerKind::Lcm, 4);
        let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let mut calls = 0;
        let mut counting = |x: &Tensor, t: f64| {
            calls += 1;
            model(x, t)
        };
        let err = sample(
            &s,
            &mut counting,
            InitialLatents::Given(x),
            &mut ExplicitNoise::new([]),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("0 tensor(s) left but 3"), "{err}");
        assert_eq!(calls, 0);
    }
}
