//! Latent consistency distillation (LCD, Luo et al. 2023, "Latent Consistency Models"): the
//! student learns to map any point of the teacher's probability-flow ODE to its origin, so one
//! to four LCM steps replace tens of DDIM steps.
//!
//! Why this method: it is one training stage (progressive distillation needs log₂(1000/4)
//! halvings), the student keeps the SD architecture and ε-parameterisation, and its sampler,
//! diffusers' `LCMScheduler`, already runs here and in diffusers. LCM sampling re-noises between
//! steps, so every step but the last is a stochastic transition that online PSO can train on.
//!
//! One step, as diffusers' `train_lcm_distill_sd_wds.py` with a fixed guidance scale (as
//! LCM-LoRA; the UNet has no guidance embedding): pick t_{n+k} on the 50-step DDIM grid
//! (k = 20), noise a latent to it, let the teacher take one guided DDIM step to t_n, and pull
//! the student's consistency output f(x_{t_{n+k}}) towards the EMA target's f(x̂_{t_n}) under a
//! pseudo-Huber loss; f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t).

use rand::Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::train::{noised, Denoiser, LatentPool, Progress};
use super::ToyError;
use diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffusion::sampling::lcm::Lcm;

/// DDIM solver grid spacing (1000 training steps / 50 solver steps).
const SKIP: i64 = 20;
/// EMA decay of the target network.
const EMA: f64 = 0.95;
/// Pseudo-Huber constant.
const HUBER_C: f64 = 0.001;

/// Distillation settings.
#[derive(Debug, Clone, Copy)]
pub struct DistillSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Latents per step.
    pub batch: usize,
    /// Guidance w of the teacher: x̂ = cond + w·(cond − uncond) (CFG scale w + 1).
    pub guidance: f64,
    /// Peak learning rate.
    pub lr: f64,
}

/// The teacher's noise schedule and the student's boundary condition.
pub struct Schedule {
    /// ᾱ_t for t = 0..1000, fp32 on the training device.
    pub alphas_cumprod: Tensor,
    /// The LCM scheduler whose c_skip and c_out the student's output uses.
    pub lcm: Lcm,
}

/// A UNet in its own store, initialised to `values`.
fn unet_copy(
    config: &UNet2DConditionConfig,
    values: &[(String, Tensor)],
    device: Device,
) -> (nn::VarStore, UNet2DConditionModel) {
    let vs = nn::VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root(), config);
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in values {
            vars[name].shallow_clone().copy_(value);
        }
    });
    (vs, unet)
}

/// x̂0 from an ε prediction: (x − √(1 − ᾱ)·ε) / √ᾱ, with ᾱ of shape [B, 1, 1, 1].
fn x0_from_eps(x: &Tensor, eps: &Tensor, alpha: &Tensor) -> Tensor {
    (x - (-alpha + 1.0).sqrt() * eps) / alpha.sqrt()
}

/// Distills the teacher UNet of `teacher` into a few-step student; returns the student's
/// tensors (named as in its diffusers file).
pub fn distill(
    teacher: &Denoiser,
    config: &UNet2DConditionConfig,
    schedule: &Schedule,
    pool: &LatentPool,
    rng: &mut impl Rng,
    settings: DistillSettings,
    progress: Progress,
) -> Result<Vec<(String, Tensor)>, ToyError> {
    let device = teacher.vs.device();
    let (alphas_cumprod, lcm) = (&schedule.alphas_cumprod, &schedule.lcm);
    let start_values = teacher.part("unet");
    let (student_vs, student) = unet_copy(config, &start_values, device);
    let (target_vs, target) = unet_copy(config, &start_values, device);
    let mut opt = nn::AdamW::default().build(&student_vs, settings.lr)?;
    let b = settings.batch;
    let grid = alphas_cumprod.size()[0] / SKIP;
    let scalings = |t: &[i64]| {
        let (skip, out): (Vec<f32>, Vec<f32>) =
            t.iter().map(|&t| lcm.boundary_scalings(t as f64)).unzip();
        let column = |v: Vec<f32>| Tensor::from_slice(&v).to_device(device).view([-1, 1, 1, 1]);
        (column(skip), column(out))
    };
    let student_vars = student_vs.variables();
    for step in 0..settings.steps {
        opt.set_lr(settings.lr * ((step + 1) as f64 / 100.0).min(1.0));
        let (x0, captions) = pool.batch(rng, b, 0.0);
        let (emb, uncond) = tch::no_grad(|| -> Result<_, ToyError> {
            Ok((
                teacher.embed(&captions)?,
                teacher.embed(&vec![String::new(); b])?,
            ))
        })?;
        let start: Vec<i64> = (0..b)
            .map(|_| (rng.random_range(0..grid) + 1) * SKIP - 1)
            .collect();
        let prev: Vec<i64> = start.iter().map(|&t| (t - SKIP).max(0)).collect();
        let ts = Tensor::from_slice(&start).to_device(device);
        let tp = Tensor::from_slice(&prev).to_device(device);
        let (a_start, a_prev) = (
            alphas_cumprod.index_select(0, &ts).view([-1, 1, 1, 1]),
            alphas_cumprod.index_select(0, &tp).view([-1, 1, 1, 1]),
        );
        let x = noised(&x0, &x0.randn_like(), alphas_cumprod, &ts);
        let time = |t: &Tensor| t.to_kind(Kind::Float);

        let (skip_s, out_s) = scalings(&start);
        let eps = student.forward(&x, &time(&ts), &emb, None, None);
        let prediction = &skip_s * &x + &out_s * x0_from_eps(&x, &eps, &a_start);

        let target_value = tch::no_grad(|| {
            let both = teacher.unet.forward(
                &Tensor::cat(&[&x, &x], 0),
                &time(&Tensor::cat(&[&ts, &ts], 0)),
                &Tensor::cat(&[&emb, &uncond], 0),
                None,
                None,
            );
            let (cond, unc) = (
                both.narrow(0, 0, b as i64),
                both.narrow(0, b as i64, b as i64),
            );
            let eps = &cond + (&cond - &unc) * settings.guidance;
            let x0_hat = x0_from_eps(&x, &eps, &a_start);
            let x_prev = a_prev.sqrt() * &x0_hat + (-&a_prev + 1.0).sqrt() * &eps;
            let eps_prev = target.forward(&x_prev, &time(&tp), &emb, None, None);
            let (skip_p, out_p) = scalings(&prev);
            &skip_p * &x_prev + &out_p * x0_from_eps(&x_prev, &eps_prev, &a_prev)
        });
        let loss = ((prediction - target_value).square() + HUBER_C * HUBER_C).sqrt() - HUBER_C;
        let loss = loss.mean(Kind::Float);
        opt.backward_step_clip_norm(&loss, 1.0);
        tch::no_grad(|| {
            for (name, t) in target_vs.variables() {
                t.shallow_clone()
                    .copy_(&(&t * EMA + &student_vars[&name] * (1.0 - EMA)));
            }
        });
        progress("distill", step, settings.steps, loss.double_value(&[]));
    }
    Ok(student_vars.into_iter().collect())
}
