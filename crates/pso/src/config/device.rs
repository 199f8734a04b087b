//! Where and in which precision a model runs: `model.dtype`, `model.device` and the CLI's
//! `--dtype` / `--device`.

use serde::{Deserialize, Serialize};

/// Numeric precision of the model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float (CPU default).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16 (CUDA, compute capability ≥ 8.0).
    Bf16,
}

/// Resolves a device spec (`cpu`, `cuda`, `cuda:N`, `auto`) to a device that exists here.
pub fn resolve_device(spec: &str) -> Result<tch::Device, String> {
    let cuda = tch::Cuda::device_count();
    match spec {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cuda" => resolve_device("cuda:0"),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) if (n as i64) < cuda => Ok(tch::Device::Cuda(n)),
            Some(Ok(n)) => Err(format!(
                "device `{other}`: this machine has {cuda} CUDA device(s) (cuda:{n} does not exist); `pso doctor` lists them"
            )),
            _ => Err(format!("device `{other}` is not cpu, cuda, cuda:N or auto")),
        },
    }
}

impl DType {
    /// The libtorch kind of this precision.
    pub fn kind(self) -> tch::Kind {
        match self {
            DType::F32 => tch::Kind::Float,
            DType::F16 => tch::Kind::Half,
            DType::Bf16 => tch::Kind::BFloat16,
        }
    }
}
