//! The Gaussian transition kernel every scheduler step is split into (docs/method.md §2.4), and
//! the x̂0 prediction shared by the variance-preserving schedulers. A leaf: the schedulers build
//! on it, and [`super::scheduler::Scheduler`] dispatches to them.

use tch::Tensor;

use super::config::PredictionType;
use super::fp32;

/// One transition x_t → x_{t'} = μ + s·z with z ~ N(0, I).
#[derive(Debug)]
pub struct Kernel {
    /// The mean μ (differentiable in the model output).
    pub mean: Tensor,
    /// The standard deviation s; 0 for a deterministic step. With a learned variance, the
    /// largest s the model can choose (known without reading the tensor back).
    pub std: f64,
    /// The per-element s of a model that predicts its variance (DDPM's `learned_range`); it then
    /// replaces `std` in μ + s·z.
    pub learned_std: Option<Tensor>,
}

impl Kernel {
    /// A kernel with one s for every element.
    pub fn fixed(mean: Tensor, std: f64) -> Kernel {
        Kernel {
            mean,
            std,
            learned_std: None,
        }
    }

    /// A kernel whose s the model predicted per element, at most `bound`.
    pub fn learned(mean: Tensor, std: Tensor, bound: f64) -> Kernel {
        Kernel {
            mean,
            std: bound,
            learned_std: Some(std),
        }
    }

    /// x_{t'} = μ + s·z.
    pub fn step(&self, z: &Tensor) -> Tensor {
        match &self.learned_std {
            Some(s) => &self.mean + z * s,
            None => &self.mean + z * self.std,
        }
    }
}

/// x̂0 in the variance-preserving parameterisation x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε (LCM, DDIM).
/// Scalars are fp32 like diffusers' `alphas_cumprod` entries, so the tensor arithmetic rounds
/// alike.
pub(crate) fn predict_original_vp(
    prediction: PredictionType,
    alpha_prod_t: f32,
    sample: &Tensor,
    model_output: &Tensor,
) -> Tensor {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sqrt_alpha, sqrt_beta) = (
        f64::from(fp32::sqrt(alpha_prod_t)),
        f64::from(fp32::sqrt(beta_prod_t)),
    );
    match prediction {
        PredictionType::Epsilon => (sample - model_output * sqrt_beta) / sqrt_alpha,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample * sqrt_alpha - model_output * sqrt_beta,
    }
}
