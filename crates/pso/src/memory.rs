//! What a run needs in accelerator memory, estimated from the model folder alone: parameter
//! counts from the safetensors headers (no weights are read), the trainable tensors and their
//! AdamW state from `peft`, and the learner's saved activations from the transformer's shape
//! (`pso doctor --config`). The activation term is an estimate (≈ 30 saved values per token and
//! channel per block in the run's dtype, attention through SDPA; with `learner.recompute_blocks`
//! one value per block plus one block's); it is the one to watch at 1024² on the 8B / 12B flow
//! models.

use std::path::Path;

use serde::Serialize;

use crate::config::RunConfig;
use crate::objective::ObjectiveKind;
use crate::peft::{difffit, lora, PeftKind};
use diffusion::models::dit::DiTTransformer2DConfig;
use diffusion::models::flux::FluxTransformer2DConfig;
use diffusion::models::sd3::SD3Transformer2DConfig;
use diffusion::models::vae::AutoencoderKLConfig;
use diffusion::models::z_image::{self, ZImageTransformer2DConfig};

/// Saved values per token and channel of one transformer block in a training forward pass.
const ACTIVATION_VALUES_PER_TOKEN_CHANNEL: u64 = 30;
/// Bytes per trainable parameter held in fp32: the value, its gradient and AdamW's two moments.
const TRAINABLE_BYTES: u64 = 16;

/// Why no estimate could be made.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct MemoryError {
    /// The file or folder involved.
    pub path: String,
    /// What is wrong and what to do.
    pub why: String,
}

/// One line of the estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// What it is.
    pub what: String,
    /// Bytes on the run's device.
    pub bytes: u64,
    /// How it was counted.
    pub detail: String,
    /// Held only during the learner's pass or the actor's decoding, which do not overlap.
    pub transient: bool,
}

/// The estimate for a run config.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// The parts, weights first.
    pub parts: Vec<Part>,
    /// The weights and optimizer state plus the larger transient part.
    pub total_bytes: u64,
}

/// Every tensor's name and shape in a component folder's weight files, read from the headers
/// alone (the safetensors crate wants the whole file, which the estimate must not need).
fn tensor_shapes(dir: &Path) -> Result<Vec<(String, Vec<u64>)>, MemoryError> {
    let err = |why: String| MemoryError {
        path: dir.display().to_string(),
        why,
    };
    let files = hf::load::weight_files(dir, None).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for file in files {
        use std::io::Read;
        let mut f = std::fs::File::open(&file).map_err(|e| err(e.to_string()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| err(e.to_string()))?;
        let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
        f.read_exact(&mut header)
            .map_err(|e| err(format!("{}: {e}", file.display())))?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| err(format!("{}: safetensors header: {e}", file.display())))?;
        for (name, info) in map {
            if name == "__metadata__" {
                continue;
            }
            let shape = info["shape"]
                .as_array()
                .map(|dims| dims.iter().filter_map(|d| d.as_u64()).collect())
                .unwrap_or_default();
            out.push((name, shape));
        }
    }
    Ok(out)
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn billions(n: u64) -> String {
    format!("{:.2} B", n as f64 / 1e9)
}

/// The denoiser's shape as the activation term needs it.
struct Shape {
    blocks: u64,
    width: u64,
    tokens: u64,
    /// Tokens × blocks of blocks that run before the recomputed ones and always keep their
    /// activations (Z-Image's refiners of the image and of the prompt).
    refined_tokens: u64,
}

fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, MemoryError> {
    hf::load::read_config(dir).map_err(|e| MemoryError {
        path: dir.display().to_string(),
        why: e.to_string(),
    })
}

/// Estimates the memory of `config`'s learner and actor on one device, for the model folder
/// `root` (local; nothing is downloaded).
pub fn estimate(config: &RunConfig, root: &Path) -> Result<MemoryEstimate, MemoryError> {
    let dtype_bytes = config.model.dtype.kind().elt_size_in_bytes() as u64;
    let vae_dir = root.join("vae");
    let vae: AutoencoderKLConfig = read_config(&vae_dir)?;
    let f = 1u64 << vae.block_out_channels.len().saturating_sub(1);
    let (h, w) = (
        u64::from(config.sampler.height) / f,
        u64::from(config.sampler.width) / f,
    );
    let prompt_tokens = config.model.max_sequence_length.map(|n| n as u64);
    let t5 = prompt_tokens.unwrap_or(256);
    let transformer = root.join("transformer");
    // The folder, the activation shape, and which variables DiffFit trains.
    type Trains = fn(&str) -> bool;
    let (denoiser_dir, shape, difffit_trains): (_, _, Trains) =
        if transformer.join("config.json").is_file() {
            let class: serde_json::Value = read_config(&transformer)?;
            match class["_class_name"].as_str().unwrap_or_default() {
                "SD3Transformer2DModel" => {
                    let c: SD3Transformer2DConfig = read_config(&transformer)?;
                    let p = c.patch_size as u64;
                    let shape = Shape {
                        blocks: c.num_layers as u64,
                        width: c.inner_dim() as u64,
                        tokens: (h / p) * (w / p) + 77 + t5,
                        refined_tokens: 0,
                    };
                    (transformer, Some(shape), difffit::trains_flow)
                }
                "FluxTransformer2DModel" => {
                    let c: FluxTransformer2DConfig = read_config(&transformer)?;
                    let shape = Shape {
                        blocks: (c.num_layers + c.num_single_layers) as u64,
                        width: c.inner_dim() as u64,
                        tokens: (h / 2) * (w / 2) + t5,
                        refined_tokens: 0,
                    };
                    (transformer, Some(shape), difffit::trains_flow)
                }
                "ZImageTransformer2DModel" => {
                    let c: ZImageTransformer2DConfig = read_config(&transformer)?;
                    // At most max_sequence_length (default 512) Qwen3 tokens per prompt.
                    let padded = |n: u64| z_image::padded(n as i64) as u64;
                    let image = padded((h / 2) * (w / 2));
                    let prompt = padded(prompt_tokens.unwrap_or(512));
                    let shape = Shape {
                        blocks: c.n_layers as u64,
                        width: c.dim as u64,
                        tokens: image + prompt,
                        refined_tokens: c.n_refiner_layers as u64 * (image + prompt),
                    };
                    (transformer, Some(shape), difffit::trains_z_image)
                }
                _ => {
                    let c: DiTTransformer2DConfig = read_config(&transformer)?;
                    let p = c.patch_size as u64;
                    let shape = Shape {
                        blocks: c.num_layers as u64,
                        width: c.inner_dim() as u64,
                        tokens: (h / p) * (w / p),
                        refined_tokens: 0,
                    };
                    (transformer, Some(shape), difffit::trains_dit)
                }
            }
        } else {
            (root.join("unet"), None, difffit::trains)
        };
    let mut parts = Vec::new();
    let denoiser = tensor_shapes(&denoiser_dir)?;
    let denoiser_params: u64 = denoiser.iter().map(|(_, s)| numel(s)).sum();
    parts.push(Part {
        what: "denoiser weights".into(),
        bytes: denoiser_params * dtype_bytes,
        detail: format!(
            "{} parameters, {dtype_bytes} bytes each",
            billions(denoiser_params)
        ),
        transient: false,
    });
    let text_dirs: Vec<_> = ["text_encoder", "text_encoder_2", "text_encoder_3"]
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.join("config.json").is_file())
        .collect();
    let mut text_params = 0;
    for dir in &text_dirs {
        text_params += tensor_shapes(dir)?
            .iter()
            .map(|(_, s)| numel(s))
            .sum::<u64>();
    }
    let text_elsewhere = config
        .model
        .text_encoder_device
        .as_deref()
        .is_some_and(|d| d != config.model.device);
    parts.push(Part {
        what: "text encoders".into(),
        bytes: if text_elsewhere {
            0
        } else {
            text_params * dtype_bytes
        },
        detail: if text_elsewhere {
            format!(
                "{} parameters on model.text_encoder_device, not here",
                billions(text_params)
            )
        } else {
            format!("{} parameters", billions(text_params))
        },
        transient: false,
    });
    let vae_params: u64 = tensor_shapes(&vae_dir)?.iter().map(|(_, s)| numel(s)).sum();
    let vae_bytes = if vae.force_upcast { 4 } else { dtype_bytes };
    parts.push(Part {
        what: "VAE weights".into(),
        bytes: vae_params * vae_bytes,
        detail: format!("{} parameters", billions(vae_params)),
        transient: false,
    });
    let trainable: u64 = match config.peft.kind {
        PeftKind::Lora => denoiser
            .iter()
            .filter_map(|(name, s)| {
                let module = name.strip_suffix(".weight")?;
                let targeted = config.peft.targets.iter().any(|p| lora::matches(module, p));
                (targeted && s.len() == 2).then(|| u64::from(config.peft.rank) * (s[0] + s[1]))
            })
            .sum(),
        // The variables DiffFit trains; the γ (a few channels per block) are left out.
        PeftKind::Difffit => denoiser
            .iter()
            .filter(|(name, _)| difffit_trains(name))
            .map(|(_, s)| numel(s))
            .sum(),
        PeftKind::Full => denoiser_params,
    };
    parts.push(Part {
        what: "trainable + AdamW".into(),
        bytes: trainable * TRAINABLE_BYTES,
        detail: format!(
            "{:.1} M {} parameters, fp32 value, gradient and two moments",
            trainable as f64 / 1e6,
            config.peft.kind
        ),
        transient: false,
    });
    let samples = u64::from(config.learner.batch_size)
        * if config.objective.kind == ObjectiveKind::Sft {
            1
        } else {
            2
        };
    match shape {
        Some(s) => {
            let per_token = s.width * ACTIVATION_VALUES_PER_TOKEN_CHANNEL * dtype_bytes;
            let block = s.tokens * per_token;
            let refiners = s.refined_tokens * per_token;
            let (per_sample, how) = if config.learner.recompute_blocks {
                // Each block's input kept, one block's activations alive at a time.
                (
                    s.blocks * s.tokens * s.width * dtype_bytes + block + refiners,
                    "recomputed: block inputs + one block's".to_string(),
                )
            } else {
                (
                    s.blocks * block + refiners,
                    format!("~{ACTIVATION_VALUES_PER_TOKEN_CHANNEL} saved values each"),
                )
            };
            let how = if refiners > 0 {
                format!(
                    "{how}; plus the refiners' {} token-blocks",
                    s.refined_tokens
                )
            } else {
                how
            };
            parts.push(Part {
                what: "learner activations".into(),
                bytes: samples * per_sample,
                detail: format!(
                    "{samples} samples × {} blocks × {} tokens × {} channels, {how}",
                    s.blocks, s.tokens, s.width
                ),
                transient: true,
            });
        }
        None => parts.push(Part {
            what: "learner activations".into(),
            bytes: 0,
            detail: "not estimated for UNets (a few GiB per 1024² sample in bf16)".into(),
            transient: true,
        }),
    }
    // The decoder's full-resolution feature maps, about 8 alive at once (diffusers' decoder
    // of SD3's VAE peaks 3.8 GiB above its weights for one 1024² image in fp32).
    let full_res = vae.block_out_channels.first().copied().unwrap_or(0) as u64;
    let k = u64::from(config.sampler.samples_per_prompt);
    let pixels = u64::from(config.sampler.height) * u64::from(config.sampler.width);
    parts.push(Part {
        what: "VAE decoding".into(),
        bytes: k * 8 * full_res * pixels * vae_bytes,
        detail: format!("{k} images at a time, {full_res} channels at full resolution"),
        transient: true,
    });
    let held: u64 = parts.iter().filter(|p| !p.transient).map(|p| p.bytes).sum();
    let peak = parts
        .iter()
        .filter(|p| p.transient)
        .map(|p| p.bytes)
        .max()
        .unwrap_or(0);
    let total_bytes = held + peak;
    Ok(MemoryEstimate { parts, total_bytes })
}

impl MemoryEstimate {
    /// The estimate as lines of text, with a verdict against each device's memory.
    pub fn to_text(&self, devices: &[(String, u64)]) -> String {
        let mut lines: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("  {:<22}{:>10}  {}", p.what, gib(p.bytes), p.detail))
            .collect();
        lines.push(format!(
            "  {:<22}{:>10}  weights and optimizer + the larger of activations and decoding",
            "total (≈ ±30 %)",
            gib(self.total_bytes)
        ));
        for (name, bytes) in devices {
            lines.push(if self.total_bytes <= *bytes * 9 / 10 {
                format!("  fits {name} ({})", gib(*bytes))
            } else {
                format!(
                    "  does not fit {name} ({}): set learner.recompute_blocks = true, lower \
                     learner.batch_size or sampler.height / width, set \
                     model.text_encoder_device = \"cpu\", or use a larger GPU",
                    gib(*bytes)
                )
            });
        }
        lines.join("\n") + "\n"
    }
}
