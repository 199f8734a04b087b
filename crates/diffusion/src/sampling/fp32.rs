//! fp32 scalar math through libtorch, so that every scheduler scalar rounds exactly as diffusers'
//! 0-dim fp32 tensors do: libtorch's (vectorised) CPU `sqrt` and `log` are not always correctly
//! rounded, so Rust's `f32::sqrt` would differ from diffusers by an ulp, which the σ-space Euler
//! steps (x ≈ 150, μ ≈ 0.1) amplify far beyond fp32 noise.

use tch::{Kind, Tensor};

fn unary(x: f32, op: impl Fn(&Tensor) -> Tensor) -> f32 {
    op(&Tensor::from(x)).to_kind(Kind::Float).double_value(&[]) as f32
}

/// sqrt(x) as libtorch computes it on a 0-dim fp32 tensor.
pub fn sqrt(x: f32) -> f32 {
    unary(x, Tensor::sqrt)
}

/// ln(x) as libtorch computes it on a 0-dim fp32 tensor.
pub fn ln(x: f32) -> f32 {
    unary(x, Tensor::log)
}

#[cfg(test)]
mod tests {
    #[test]
    fn agrees_with_ieee_to_an_ulp() {
        for x in [0.25f32, 2.0, 11.719_165, 24_777.05] {
            assert!((super::sqrt(x) - x.sqrt()).abs() <= x.sqrt() * f32::EPSILON);
            assert!((super::ln(x) - x.ln()).abs() <= 2.0 * f32::EPSILON * x.ln().abs().max(1.0));
        }
    }
}
