//! LoRA (peft's `LoraConfig` semantics) on the linear layers of the backbone's transformer
//! blocks, and the diffusers file layout `load_lora_weights` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::PeftError;
use super::{LoraInit, PeftSection};
use diffusion::models::backbone::Backbone;
use diffusion::models::linear::Lora;

/// Suffix of an adapter's A matrix in trainable-tensor names.
pub const DOWN: &str = ".lora_A.weight";
/// Suffix of an adapter's B matrix.
pub const UP: &str = ".lora_B.weight";

/// peft's `target_modules` rule: the name equals the pattern or ends with `.PATTERN`.
pub fn matches(name: &str, pattern: &str) -> bool {
    name == pattern
        || name
            .strip_suffix(pattern)
            .is_some_and(|head| head.ends_with('.'))
}

/// Attaches freshly initialised adapters (A from `seed` as `section.init` says, B = 0, fp32) to
/// the targeted layers; returns the trainable tensors (A and B of each layer, module order).
pub fn attach_new(
    backbone: &Backbone,
    section: &PeftSection,
    seed: u64,
    switch: &Arc<AtomicBool>,
) -> Result<Vec<(String, Tensor)>, PeftError> {
    let layers = backbone.lora_candidates();
    for pattern in &section.targets {
        if !layers.iter().any(|l| matches(l.name(), pattern)) {
            let examples = layers
                .iter()
                .take(3)
                .map(|l| format!("`{}`", l.name()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PeftError::NoMatch {
                pattern: pattern.clone(),
                examples,
            });
        }
    }
    let rank = section.rank as i64;
    let scale = section.alpha / section.rank as f64;
    // Drawn on the CPU from the re-seeded global generator (tch exposes no other), then moved:
    // the initial adapters depend on the seed only, not on the device.
    tch::manual_seed(seed as i64);
    let mut params = Vec::new();
    for layer in layers {
        if !section.targets.iter().any(|p| matches(layer.name(), p)) {
            continue;
        }
        let (fan_in, fan_out) = layer.features();
        let opts = (Kind::Float, Device::Cpu);
        let down = match section.init {
            LoraInit::Kaiming => {
                // kaiming_uniform_(a = sqrt(5)): bound = 1 / sqrt(fan_in).
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::rand([rank, fan_in], opts) * (2.0 * bound) - bound
            }
            LoraInit::Gaussian => Tensor::randn([rank, fan_in], opts) / rank as f64,
        };
        let device = layer.weight().device();
        let down = down.to_device(device).set_requires_grad(true);
        let up = Tensor::zeros([fan_out, rank], (Kind::Float, device)).set_requires_grad(true);
        params.push((format!("{}{DOWN}", layer.name()), down.shallow_clone()));
        params.push((format!("{}{UP}", layer.name()), up.shallow_clone()));
        layer.set_lora(Some(Lora {
            down,
            up,
            scale,
            enabled: switch.clone(),
        }));
    }
    Ok(params)
}

/// Attaches adapters read from a file (trainable-tensor names, without the diffusers prefix),
/// each with `scale`; returns how many layers got one.
pub fn attach_tensors(
    backbone: &Backbone,
    tensors: &HashMap<String, Tensor>,
    scale: f64,
    what: &str,
) -> Result<usize, PeftError> {
    let err = |why: String| PeftError::Tensors {
        what: what.to_owned(),
        why,
    };
    let layers = backbone.lora_candidates();
    let mut pairs: BTreeMap<&str, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        if let Some(module) = name.strip_suffix(DOWN) {
            pairs.entry(module).or_default().0 = Some(t);
        } else if let Some(module) = name.strip_suffix(UP) {
            pairs.entry(module).or_default().1 = Some(t);
        } else {
            return Err(err(format!(
                "`{name}` is not a LoRA tensor (MODULE.lora_A.weight or MODULE.lora_B.weight)"
            )));
        }
    }
    let switch = Arc::new(AtomicBool::new(true));
    for (module, (down, up)) in &pairs {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(err(format!(
                "layer `{module}` has only one of lora_A and lora_B"
            )));
        };
        let layer = layers.iter().find(|l| l.name() == *module).ok_or_else(|| {
            err(format!(
                "`{module}` is not a linear layer of this model's transformer blocks; the \
                 adapter was trained for another model"
            ))
        })?;
        let (fan_in, fan_out) = layer.features();
        let (ds, us) = (down.size(), up.size());
        if ds.len() != 2 || us.len() != 2 || ds[1] != fan_in || us[0] != fan_out || ds[0] != us[1] {
            return Err(err(format!(
                "`{module}`: lora_A {ds:?} and lora_B {us:?} do not fit a [{fan_out}, {fan_in}] \
                 layer (want [r, {fan_in}] and [{fan_out}, r])"
            )));
        }
        let device = layer.weight().device();
        layer.set_lora(Some(Lora {
            down: down.to_kind(Kind::Float).to_device(device),
            up: up.to_kind(Kind::Float).to_device(device),
            scale,
            enabled: switch.clone(),
        }));
    }
    Ok(pairs.len())
}

/// The adapters as diffusers' `load_lora_weights` reads them: the backbone's component
/// (`unet`, `transformer`) + `.` + name, with the scale folded into B so that the file needs no
/// alpha (diffusers then uses scale 1).
pub fn to_diffusers(
    tensors: &[(String, Tensor)],
    scale: f64,
    component: &str,
) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, t)| {
            let t = if name.ends_with(UP) {
                t * scale
            } else {
                t.shallow_clone()
            };
            (format!("{component}.{name}"), t)
        })
        .collect()
}

/// Trainable-tensor names from a diffusers LoRA file's entries for `component` (`unet`,
/// `transformer`; the prefix stripped); entries of other components (text encoders) are refused
/// with a message.
pub fn from_diffusers(
    tensors: Vec<(String, Tensor)>,
    component: &str,
    what: &str,
) -> Result<HashMap<String, Tensor>, PeftError> {
    let prefix = format!("{component}.");
    tensors
        .into_iter()
        .map(|(name, t)| match name.strip_prefix(&prefix) {
            Some(rest) => Ok((rest.to_owned(), t)),
            None => Err(PeftError::Tensors {
                what: what.to_owned(),
                why: format!(
                    "entry `{name}` is not a LoRA entry of the model's {component} \
                     (`{component}.MODULE.lora_A.weight`); pso loads adapters of the denoiser \
                     only"
                ),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_whole_dotted_suffixes_only() {
        let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
        assert!(matches(name, "to_out.0"));
        assert!(matches(name, "attn1.to_out.0"));
        assert!(matches(name, name));
        assert!(!matches(name, "out.0"));
        assert!(!matches(name, "to_out"));
        assert!(!matches("x.to_q", "o_q"));
    }

    #[test]
    fn diffusers_names_round_trip_with_the_scale_folded_into_b() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]);
        let b = Tensor::from_slice(&[3.0f32]).view([1, 1]);
        let ours = vec![
            (format!("m.to_q{DOWN}"), a.shallow_clone()),
            (format!("m.to_q{UP}"), b.shallow_clone()),
        ];
        let theirs = to_diffusers(&ours, 0.5, "unet");
        assert_eq!(theirs[0].0, "unet.m.to_q.lora_A.weight");
        assert!(theirs[0].1.equal(&a));
        assert_eq!(theirs[1].1.double_value(&[0, 0]), 1.5);
        let back = from_diffusers(theirs, "unet", "f").unwrap();
        assert!(back.contains_key("m.to_q.lora_B.weight"));
        let e = from_diffusers(vec![("text_encoder.x".into(), a)], "unet", "f.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.safetensors") && e.contains("text_encoder.x"),
            "{e}"
        );
    }
}
