//! A scheduler after `set_timesteps`: the timesteps, the model-input scaling, and each step as a
//! Gaussian transition kernel (μ, s).
//!
//! [`Scheduler::transition`] is a pure function of (schedule, step index, x_t, model output): the
//! sampler uses it to move, and the PSO learner calls it again with the policy's (and the frozen
//! reference's) output to get μ_θ and μ_ref for a recorded transition.

use tch::Tensor;

use super::betas;
use super::config::{PredictionType, SchedulerConfig, SchedulerKind, TimestepType};
use super::ddim::Ddim;
use super::ddpm::Ddpm;
use super::euler::{self, EulerDiscrete};
use super::euler_ancestral::EulerAncestralDiscrete;
use super::flow_match::{FlowKernel, FlowMatchEuler, FlowSchedule};
use super::kernel::Kernel;
use super::lcm::{lcm_timesteps, Lcm};
use super::spacing::spaced_timesteps;
use super::SamplingError;

/// Which timesteps to sample at: diffusers' `num_inference_steps=` or `timesteps=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timesteps {
    /// This many steps, spaced by the config's `timestep_spacing` (LCM: its distillation schedule).
    Steps(usize),
    /// These training timesteps, first (noisiest) to last; strictly descending.
    Explicit(Vec<u32>),
}

/// The scheduler-specific state.
#[derive(Debug, Clone)]
enum Inner {
    Euler(EulerDiscrete),
    EulerAncestral(EulerAncestralDiscrete),
    Lcm(Lcm),
    Ddim(Ddim),
    Ddpm(Ddpm),
    Flow(FlowMatchEuler, FlowKernel),
}

/// A diffusers scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    inner: Inner,
}

impl Scheduler {
    /// diffusers' `Scheduler.from_config(config)` followed by `set_timesteps(steps | timesteps=)`.
    ///
    /// The flow-matching scheduler takes a step count here (σ spaced as `num_inference_steps=`
    /// spaces them, no dynamic shift); [`Scheduler::flow`] takes a pipeline's own sigmas and `mu`.
    pub fn new(config: SchedulerConfig, timesteps: Timesteps) -> Result<Scheduler, SamplingError> {
        if config.kind.is_flow() {
            let steps = flow_steps(&timesteps)?;
            return Scheduler::flow(config, FlowSchedule::Steps(steps), None);
        }
        config.validate()?;
        let (values, explicit) = match &timesteps {
            Timesteps::Steps(steps) => (spaced(&config, *steps)?, false),
            Timesteps::Explicit(list) => {
                check_explicit(&config, list).map_err(|why| SamplingError::Timesteps {
                    scheduler: config.kind.class_name(),
                    why,
                })?;
                (list.iter().map(|&t| f64::from(t)).collect(), true)
            }
        };
        let alphas_cumprod = betas::alphas_cumprod(&config);
        let inner =
            match config.kind {
                SchedulerKind::Euler => {
                    Inner::Euler(EulerDiscrete::new(&config, &alphas_cumprod, values))
                }
                SchedulerKind::EulerAncestral => Inner::EulerAncestral(
                    EulerAncestralDiscrete::new(&config, &alphas_cumprod, values),
                ),
                SchedulerKind::Lcm => Inner::Lcm(Lcm::new(&config, values)),
                SchedulerKind::Ddim => {
                    Inner::Ddim(Ddim::new(&config, &alphas_cumprod, values, explicit))
                }
                SchedulerKind::Ddpm => Inner::Ddpm(Ddpm::new(&config, values)),
                SchedulerKind::FlowMatchEuler => unreachable!("flow schedulers return above"),
            };
        Ok(Scheduler {
            config,
            alphas_cumprod,
            inner,
        })
    }

    /// diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` with `schedule` (and the
    /// pipeline's `mu` under dynamic shifting), stepping with `config.flow_kernel`.
    pub fn flow(
        config: SchedulerConfig,
        schedule: FlowSchedule,
        mu: Option<f64>,
    ) -> Result<Scheduler, SamplingError> {
        if !config.kind.is_flow() {
            return Err(SamplingError::Step(format!(
                "{} is not a flow-matching scheduler; set the kind to flow_match_euler",
                config.kind.class_name()
            )));
        }
        config.validate()?;
        let euler = FlowMatchEuler::new(config.flow.clone(), schedule, mu)?;
        let inner = Inner::Flow(euler, config.flow_kernel);
        Ok(Scheduler {
            config,
            alphas_cumprod: Vec::new(),
            inner,
        })
    }

    /// The resolved config.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// ᾱ_t of the training schedule, t = 0 … N−1 (empty for flow matching, which has none).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The timesteps given to the model, first to last (diffusers' `scheduler.timesteps`).
    pub fn timesteps(&self) -> &[f64] {
        match &self.inner {
            Inner::Euler(s) => &s.timesteps,
            Inner::EulerAncestral(s) => &s.timesteps,
            Inner::Lcm(s) => &s.timesteps,
            Inner::Ddim(s) => &s.timesteps,
            Inner::Ddpm(s) => &s.timesteps,
            Inner::Flow(s, _) => &s.timesteps,
        }
    }

    /// Number of denoising steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// The Euler family's and flow matching's σ per step plus the final σ (diffusers'
    /// `scheduler.sigmas`); `None` for LCM, DDIM and DDPM, which work in ᾱ.
    pub fn sigmas(&self) -> Option<&[f64]> {
        match &self.inner {
            Inner::Euler(s) => Some(&s.sigmas),
            Inner::EulerAncestral(s) => Some(&s.sigmas),
            Inner::Flow(s, _) => Some(&s.sigmas),
            Inner::Lcm(_) | Inner::Ddim(_) | Inner::Ddpm(_) => None,
        }
    }

    /// Std of the initial noise: a pipeline's `latents=` are multiplied by it before step 0.
    pub fn init_noise_sigma(&self) -> f64 {
        match &self.inner {
            Inner::Euler(s) => euler::init_noise_sigma(&s.sigmas, s.spacing),
            Inner::EulerAncestral(s) => euler::init_noise_sigma(&s.sigmas, s.spacing),
            Inner::Lcm(_) | Inner::Ddim(_) | Inner::Ddpm(_) | Inner::Flow(..) => 1.0,
        }
    }

    fn check_step(&self, step: usize) -> Result<(), SamplingError> {
        if step >= self.num_steps() {
            return Err(SamplingError::Step(format!(
                "step index {step} is out of range: the {} schedule has {} steps (indices 0..{})",
                self.config.kind.class_name(),
                self.num_steps(),
                self.num_steps()
            )));
        }
        Ok(())
    }

    /// The model input at step `step` (diffusers' `scale_model_input`): x/sqrt(σ²+1) for the Euler
    /// family, x itself for LCM, DDIM, DDPM and flow matching.
    pub fn scale_model_input(&self, step: usize, sample: &Tensor) -> Result<Tensor, SamplingError> {
        self.check_step(step)?;
        Ok(match &self.inner {
            Inner::Euler(s) => euler::scale_model_input(sample, s.sigmas[step]),
            Inner::EulerAncestral(s) => euler::scale_model_input(sample, s.sigmas[step]),
            Inner::Lcm(_) | Inner::Ddim(_) | Inner::Ddpm(_) | Inner::Flow(..) => {
                sample.shallow_clone()
            }
        })
    }

    /// The kernel (μ, s) of step `step` from latent `sample` = x_t and the model's output for
    /// (scaled x_t, t); diffusers' `step` returns μ + s·z. A model with a learned variance
    /// returns twice the latent channels, ε̂ first.
    pub fn transition(
        &self,
        step: usize,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Result<Kernel, SamplingError> {
        self.check_step(step)?;
        let mut expected = sample.size();
        if self.learns_variance() {
            expected[1] *= 2;
        }
        if model_output.size() != expected {
            return Err(SamplingError::Step(format!(
                "step {step}: model output has shape {:?} but the latents have {:?}; the model \
                 must return a tensor shaped like its input (twice the channels with a learned \
                 variance)",
                model_output.size(),
                sample.size()
            )));
        }
        let ac = &self.alphas_cumprod;
        Ok(match &self.inner {
            Inner::Euler(s) => s.transition(step, sample, model_output),
            Inner::EulerAncestral(s) => s.transition(step, sample, model_output),
            Inner::Lcm(s) => s.transition(ac, step, sample, model_output),
            Inner::Ddim(s) => s.transition(ac, step, sample, model_output),
            Inner::Ddpm(s) => s.transition(ac, step, sample, model_output),
            Inner::Flow(s, kernel) => s.transition(step, sample, model_output, *kernel)?,
        })
    }

    /// Whether the model output carries a learned variance (a DDPM with `learned_range`): twice
    /// the latent channels, and a kernel whose s is per element.
    pub fn learns_variance(&self) -> bool {
        matches!(&self.inner, Inner::Ddpm(s) if s.variance_type.is_learned())
    }

    /// Whether diffusers' `step` draws a noise tensor at this step (even when it multiplies it by
    /// 0, as Euler-ancestral does on its last step): the sampler draws exactly the same sequence,
    /// so a seeded generator gives diffusers' numbers.
    pub fn draws_noise(&self, step: usize) -> bool {
        match &self.inner {
            Inner::Euler(_) => false,
            Inner::EulerAncestral(_) => true,
            Inner::Lcm(s) => step + 1 < s.timesteps.len(),
            Inner::Ddim(s) => s.eta > 0.0,
            Inner::Ddpm(s) => s.draws_noise(step),
            Inner::Flow(s, kernel) => s.draws_noise(step, *kernel),
        }
    }
}

/// The timesteps of `steps` steps (diffusers' `set_timesteps(num_inference_steps)`).
/// The step count of a flow-matching request (flow models take a count, not explicit
/// timesteps).
pub fn flow_steps(timesteps: &Timesteps) -> Result<usize, SamplingError> {
    let err = |why: &str| SamplingError::Timesteps {
        scheduler: SchedulerKind::FlowMatchEuler.class_name(),
        why: why.into(),
    };
    match timesteps {
        Timesteps::Steps(0) => Err(err("0 steps; use at least 1")),
        Timesteps::Steps(steps) => Ok(*steps),
        Timesteps::Explicit(_) => Err(err(
            "explicit timesteps are not supported for flow-matching models; give a step count",
        )),
    }
}

fn spaced(config: &SchedulerConfig, steps: usize) -> Result<Vec<f64>, SamplingError> {
    let n = config.num_train_timesteps;
    let err = |why: String| SamplingError::Timesteps {
        scheduler: config.kind.class_name(),
        why,
    };
    if steps == 0 {
        return Err(err("0 steps requested; ask for at least 1".into()));
    }
    if steps > n {
        return Err(err(format!(
            "{steps} steps is more than num_train_timesteps ({n}); ask for at most {n} steps"
        )));
    }
    if config.kind == SchedulerKind::Lcm {
        return lcm_timesteps(config, steps);
    }
    let t = spaced_timesteps(config.timestep_spacing, n, steps, config.steps_offset).ok_or_else(
        || {
            err(format!(
            "\"trailing\" spacing of {n} training timesteps into {steps} steps makes diffusers \
             (numpy's float arange) produce {} timesteps; choose another step count or pass \
             explicit timesteps",
            steps + 1
        ))
        },
    )?;
    if let Some(bad) = t.iter().find(|&&t| t < 0.0 || t > (n - 1) as f64) {
        return Err(err(format!(
            "{steps} steps with steps_offset {} gives timestep {bad}, outside 0..={}; lower \
             steps_offset",
            config.steps_offset,
            n - 1
        )));
    }
    Ok(t)
}

/// Checks an explicit timestep list: not empty, strictly descending, inside the training range,
/// and usable by the scheduler.
fn check_explicit(config: &SchedulerConfig, list: &[u32]) -> Result<(), String> {
    let n = config.num_train_timesteps;
    if list.is_empty() {
        return Err("the explicit timestep list is empty; give at least one timestep".into());
    }
    if let Some(w) = list.windows(2).find(|w| w[1] >= w[0]) {
        return Err(format!(
            "explicit timesteps {list:?} are not strictly descending ({} is followed by {}); list \
             them from noisiest to cleanest, e.g. [999, 749, 499, 249]",
            w[0], w[1]
        ));
    }
    if list[0] as usize >= n {
        return Err(format!(
            "explicit timestep {} is outside the training range 0..={}; use smaller timesteps",
            list[0],
            n - 1
        ));
    }
    if config.kind == SchedulerKind::Euler
        && config.timestep_type == TimestepType::Continuous
        && config.prediction_type == PredictionType::VPrediction
    {
        return Err(
            "explicit timesteps cannot be used with timestep_type \"continuous\" and \
                    v_prediction (the model timesteps are derived from σ); pass a step count"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::config::TimestepSpacing;
    use crate::sampling::flow_match::{FlowKernel, FlowMatchEuler, FlowSchedule};

    fn sched(kind: SchedulerKind, t: Timesteps) -> Result<Scheduler, SamplingError> {
        Scheduler::new(SchedulerConfig::new(kind), t)
    }

    #[test]
    fn step_counts_out_of_range_are_refused_with_the_limit() {
        for kind in [
            SchedulerKind::Euler,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lcm,
            SchedulerKind::Ddim,
        ] {
            let e = sched(kind, Timesteps::Steps(0)).unwrap_err().to_string();
            assert!(
                e.contains("0 steps") && e.contains(kind.class_name()),
                "{e}"
            );
            let e = sched(kind, Timesteps::Steps(1001)).unwrap_err().to_string();
            assert!(e.contains("1001 steps") && e.contains("(1000)"), "{e}");
        }
    }

    #[test]
    fn bad_explicit_lists_are_refused() {
        for (list, needle) in [
            (vec![], "empty"),
            (
                vec![999, 499, 749, 249],
                "not strictly descending (499 is followed by 749)",
            ),
            (vec![999, 999], "not strictly descending"),
            (vec![1000, 500], "outside the training range"),
        ] {
            for kind in [
                SchedulerKind::Euler,
                SchedulerKind::Lcm,
                SchedulerKind::Ddim,
            ] {
                let e = sched(kind, Timesteps::Explicit(list.clone()))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(needle), "{kind:?} {list:?}: {e}");
            }
        }
    }

    #[test]
    fn leading_offset_past_the_last_timestep_and_overshooting_trailing_are_refused() {
        let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
        c.steps_offset = 1;
        let e = Scheduler::new(c.clone(), Timesteps::Steps(1000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timestep 1000"), "{e}");
        c.timestep_spacing = TimestepSpacing::Trailing;
        let e = Scheduler::new(c, Timesteps::Steps(61))
            .unwrap_err()
            .to_string();
        assert!(e.contains("62 timesteps"), "{e}");
    }

    #[test]
    fn explicit_list_equal_to_trailing_gives_the_same_schedule() {
        let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
        c.timestep_spacing = TimestepSpacing::Trailing;
        let a = Scheduler::new(c.clone(), Timesteps::Steps(4)).unwrap();
        let b = Scheduler::new(c, Timesteps::Explicit(vec![999, 749, 499, 249])).unwrap();
        assert_eq!(a.timesteps(), b.timesteps());
        let x = Tensor::ones([1, 2, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let out = &x * 0.3;
        for i in 0..4 {
            let (ka, kb) = (
                a.transition(i, &x, &out).unwrap(),
                b.transition(i, &x, &out).unwrap(),
            );
            assert!(ka.mean.equal(&kb.mean), "step {i}: means differ");
            assert_eq!(ka.std, kb.std, "step {i}");
            assert!(ka.learned_std.is_none() && kb.learned_std.is_none());
        }
    }

    #[test]
    fn kernel_mean_is_differentiable_in_the_model_output() {
        for kind in [
            SchedulerKind::Euler,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lcm,
            SchedulerKind::Ddim,
        ] {
            let s = sched(kind, Timesteps::Steps(4)).unwrap();
            let x = Tensor::randn([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
            let out = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu))
                .set_requires_grad(true);
            s.transition(1, &x, &out).unwrap().mean.sum(None).backward();
            let grad = out.grad().abs().sum(None).double_value(&[]);
            assert!(grad > 0.0, "{kind:?}: no gradient reaches the model output");
        }
    }

    #[test]
    fn transition_checks_step_and_shape() {
        let s = sched(SchedulerKind::Euler, Timesteps::Steps(2)).unwrap();
        let x = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        assert!(s
            .transition(2, &x, &x)
            .unwrap_err()
            .to_string()
            .contains("step index 2"));
        let y = Tensor::zeros([1, 4, 2, 3], (tch::Kind::Float, tch::Device::Cpu));
        assert!(s
            .transition(0, &x, &y)
            .unwrap_err()
            .to_string()
            .contains("shape"));
    }

    #[test]
    fn flow_kernels_step_as_the_euler_scheduler_and_draw_noise_where_stochastic() {
        let mut config = SchedulerConfig::new(SchedulerKind::FlowMatchEuler);
        config.flow.shift = 3.0;
        let x = Tensor::randn([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let v = Tensor::randn([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let euler = FlowMatchEuler::new(config.flow.clone(), FlowSchedule::Steps(4), None).unwrap();
        for (kernel, draws) in [
            (FlowKernel::Ode, [false; 4]),
            (FlowKernel::Renoise, [true, true, true, false]),
            (FlowKernel::Sde { noise_level: 0.7 }, [true; 4]),
        ] {
            config.flow_kernel = kernel;
            let s = Scheduler::new(config.clone(), Timesteps::Steps(4)).unwrap();
            assert_eq!(s.timesteps(), euler.timesteps.as_slice());
            assert_eq!(s.init_noise_sigma(), 1.0);
            assert!(s.scale_model_input(2, &x).unwrap().equal(&x));
            for (i, &drawn) in draws.iter().enumerate() {
                assert_eq!(s.draws_noise(i), drawn, "{kernel:?} step {i}");
                let k = s.transition(i, &x, &v).unwrap();
                assert_eq!(k.std > 0.0, drawn, "{kernel:?} step {i}");
                let direct = euler.transition(i, &x, &v, kernel).unwrap();
                assert!(k.mean.equal(&direct.mean) && k.std == direct.std);
            }
        }
        config.flow_kernel = FlowKernel::Ode;
        let s = Scheduler::new(config.clone(), Timesteps::Steps(4)).unwrap();
        assert!(s
            .transition(1, &x, &v)
            .unwrap()
            .mean
            .equal(&euler.step(1, &x, &v).unwrap()));
        let e = Scheduler::new(config, Timesteps::Explicit(vec![999, 499]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give a step count"), "{e}");
    }
}
