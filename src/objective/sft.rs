//! The SFT baseline (method.md §3): plain regression of the policy's prediction on the training
//! images' target (ε, v or x0), the MSE over every element as Diffusion-DPO's `--sft` computes it
//! (`F.mse_loss(pred.float(), target.float())`). It is what blurs a distilled model; PSO avoids
//! it.

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
