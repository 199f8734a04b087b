//! The SFT baseline (method.md §3): plain regression of the policy's prediction on the training
//! images' target (ε, v or x0), the MSE over every element as Diffusion-DPO's `--sft` computes it
//! (`F.mse_loss(pred.float(), target.float())`). It is what blurs a distilled model; PSO avoids
//! it.
//!
//! [`hybrid_loss`] is the fine-tuning loss of learned-variance models (DiT, DiffFit's Algorithm
//! 2): iDDPM's L_hybrid = L_simple + λ·L_vlb.

use tch::{Kind, Tensor};

use super::{check_alike, host_values, Diagnostics, Loss, ObjectiveError};

/// Mean squared error of `prediction` against `target` (both [B, …]), in fp32.
pub fn sft_loss(prediction: &Tensor, target: &Tensor) -> Result<Loss, ObjectiveError> {
    let batch = check_alike("sft", &[("prediction", prediction), ("target", target)])?;
    let d = prediction.to_kind(Kind::Float) - target.detach().to_kind(Kind::Float);
    let loss = d.square().mean(Kind::Float);
    let value = host_values(&[loss.shallow_clone()])[0];
    Ok(Loss {
        loss,
        diagnostics: Diagnostics {
            loss: value,
            counted: batch,
            mse_policy: Some(value),
            ..Diagnostics::default()
        },
    })
}

/// λ of iDDPM's hybrid loss.
pub const VLB_WEIGHT: f64 = 0.001;

/// `[B, 1, 1, …]` per-sample values shaped to broadcast over `like` ([B, …]).
fn per_sample(values: &[f64], like: &Tensor) -> Tensor {
    let mut shape = vec![1i64; like.dim()];
    shape[0] = values.len() as i64;
    Tensor::from_slice(values)
        .to_kind(Kind::Float)
        .to_device(like.device())
        .view(shape.as_slice())
}

/// The mean of each sample's elements, [B].
fn mean_per_sample(t: &Tensor) -> Tensor {
    t.flatten(1, -1).mean_dim(1, false, Kind::Float)
}

/// The standard normal CDF as iDDPM's `approx_standard_normal_cdf` writes it (tanh form).
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    ((x + x.pow_tensor_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt()).tanh() * 0.5
        + 0.5
}

/// iDDPM's `discretized_gaussian_log_likelihood` of `x` (in [-1, 1], bins of 2/255) under a
/// Gaussian of `mean` and `log_scale` (log σ).
fn discretized_gaussian_log_likelihood(x: &Tensor, mean: &Tensor, log_scale: &Tensor) -> Tensor {
    let centered = x - mean;
    let inv_std = (-log_scale).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_std * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_std * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (-&cdf_min + 1.0).clamp_min(1e-12).log();
    let log_cdf_delta = (&cdf_plus - &cdf_min).clamp_min(1e-12).log();
    log_cdf_plus.where_self(
        &x.lt(-0.999),
        &log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_cdf_delta),
    )
}

/// iDDPM's hybrid loss for a model that predicts ε and the variance interpolation v (its output
/// [B, 2C, …], `prediction`), on `x_t` noised from `x0` with `noise` at `timesteps` of the
/// training schedule `alphas_cumprod` (T entries):
///
/// loss = mean_B [ MSE(ε̂, ε) + λ·T·L_t ], λ = [`VLB_WEIGHT`],
///
/// where L_t is the one-timestep VLB term in bits per dimension with the mean's gradient stopped
/// (only v learns from it): KL(q(x_{t-1} | x_t, x0) ‖ p(x_{t-1} | x_t)) for t > 0, the
/// discretized decoder NLL at t = 0, with log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1)/2 and
/// β̃ clipped to β̃_1 at t = 0. λ·T·L_t is a one-sample estimate of λ·L_vlb (L_vlb sums T such
/// terms); for T = 1000 it is DiT's `mse + vb`.
pub fn hybrid_loss(
    prediction: &Tensor,
    noise: &Tensor,
    x0: &Tensor,
    x_t: &Tensor,
    timesteps: &[u32],
    alphas_cumprod: &[f64],
) -> Result<Loss, ObjectiveError> {
    let c = noise.size().get(1).copied().unwrap_or(0);
    let doubled = prediction.size().get(1).copied().unwrap_or(0);
    if doubled != 2 * c {
        return Err(ObjectiveError::Input {
            objective: "hybrid",
            why: format!(
                "the prediction has {doubled} channels; a learned-variance model gives ε and v, \
                 twice the latent's {c}"
            ),
        });
    }
    let prediction = prediction.to_kind(Kind::Float);
    let eps = prediction.narrow(1, 0, c);
    let v = prediction.narrow(1, c, c);
    let batch = check_alike(
        "hybrid",
        &[
            ("ε prediction", &eps),
            ("noise", noise),
            ("x0", x0),
            ("x_t", x_t),
        ],
    )?;
    let total = alphas_cumprod.len();
    if timesteps.len() != batch || timesteps.iter().any(|&t| t as usize >= total) {
        return Err(ObjectiveError::Input {
            objective: "hybrid",
            why: format!(
                "need one timestep per sample ({batch}) below the schedule's {total}, got \
                 {timesteps:?}"
            ),
        });
    }
    let ac = |t: i64| {
        if t < 0 {
            1.0
        } else {
            alphas_cumprod[t as usize]
        }
    };
    let beta = |t: i64| 1.0 - ac(t) / ac(t - 1);
    let posterior_var = |t: i64| beta(t) * (1.0 - ac(t - 1)) / (1.0 - ac(t));
    let column = |f: &dyn Fn(i64) -> f64| {
        let values: Vec<f64> = timesteps.iter().map(|&t| f(t as i64)).collect();
        per_sample(&values, x0)
    };
    // β̃_0 = 0: iDDPM clips its log to β̃_1's.
    let log_posterior_var = column(&|t| posterior_var(t.max(1).min(total as i64 - 1)).ln());
    let log_beta = column(&|t| beta(t).ln());
    let mean_x0 = column(&|t| beta(t) * ac(t - 1).sqrt() / (1.0 - ac(t)));
    let mean_xt = column(&|t| (1.0 - ac(t - 1)) * (1.0 - beta(t)).sqrt() / (1.0 - ac(t)));
    let recip = column(&|t| (1.0 / ac(t)).sqrt());
    let recip_m1 = column(&|t| (1.0 / ac(t) - 1.0).sqrt());

    let x0 = x0.detach().to_kind(Kind::Float);
    let x_t = x_t.detach().to_kind(Kind::Float);
    let true_mean = &mean_x0 * &x0 + &mean_xt * &x_t;
    let pred_x0 = &recip * &x_t - &recip_m1 * eps.detach();
    let model_mean = &mean_x0 * pred_x0 + &mean_xt * &x_t;
    let frac = (&v + 1.0) / 2.0;
    let model_log_var = &frac * &log_beta + (-&frac + 1.0) * &log_posterior_var;
    let kl = ((&model_log_var - &log_posterior_var)
        + (&log_posterior_var - &model_log_var).exp()
        + (&true_mean - &model_mean).square() * (-&model_log_var).exp()
        - 1.0)
        * 0.5;
    let ln2 = std::f64::consts::LN_2;
    let kl = mean_per_sample(&kl) / ln2;
    let nll = -mean_per_sample(&discretized_gaussian_log_likelihood(
        &x0,
        &model_mean,
        &(&model_log_var * 0.5),
    )) / ln2;
    let first: Vec<bool> = timesteps.iter().map(|&t| t == 0).collect();
    let at_zero = Tensor::from_slice(&first).to_device(x0.device());
    let vb = nll.where_self(&at_zero, &kl);
    let mse = mean_per_sample(&(&eps - noise.detach().to_kind(Kind::Float)).square());
    let loss = (&mse + &vb * (VLB_WEIGHT * total as f64)).mean(Kind::Float);
    let [value, mse_value] = host_values(&[loss.shallow_clone(), mse.mean(Kind::Float)])[..] else {
        unreachable!("two values in, two out")
    };
    Ok(Loss {
        loss,
        diagnostics: Diagnostics {
            loss: value,
            counted: batch,
            mse_policy: Some(mse_value),
            ..Diagnostics::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn sft_is_the_mean_squared_error() {
        let opts = (Kind::Float, Device::Cpu);
        let pred = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let target = Tensor::zeros([2, 2], opts);
        let out = sft_loss(&pred, &target).unwrap();
        assert_eq!(out.diagnostics.loss, 7.5);
        assert_eq!(out.diagnostics.counted, 2);
        let e = sft_loss(&pred, &Tensor::zeros([2, 3], opts))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("sft: `target` has shape [2, 3]"), "{e}");
    }
}
