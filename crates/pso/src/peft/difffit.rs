//! DiffFit (method.md §4): train the biases, the norms' affine parameters, the conditioning
//! embeddings and new per-channel γ (init 1.0) on the residual branches of the transformer
//! blocks (a UNet's attn1, attn2 and ff; DiT's attn1 and ff, after the adaLN-Zero gate; the
//! image stream's attention and ff of SD3's joint and FLUX's double-stream blocks; every Z-Image
//! block's attention and ff, after their post-norms); everything else stays frozen.
//!
//! On DiT the conditioning embedding is the class table (`class_embedder`); the timestep MLP
//! trains only its biases. When the blocks' embedding copies are one shared embedding
//! ([`diffusion::models::dit::DiTTransformer2DModel::shares_conditioning`]), block 0's copy is the one that trains.

use std::collections::HashMap;

use tch::{nn, Kind, Tensor};

use super::PeftError;
use diffusion::models::backbone::Backbone;
use diffusion::models::transformer::BranchScales;

/// A UNet's top-level modules that embed the conditioning (timestep, SDXL's added text/time,
/// class).
const CONDITIONING: [&str; 3] = ["time_embedding.", "add_embedding.", "class_embedding."];

/// Whether DiffFit trains the UNet variable `name`.
pub fn trains(name: &str) -> bool {
    is_bias_or_norm(name) || CONDITIONING.iter().any(|p| name.starts_with(p))
}

fn is_bias_or_norm(name: &str) -> bool {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    let last = module.rsplit('.').next().unwrap_or("");
    name.ends_with(".bias") || (name.ends_with(".weight") && last.contains("norm"))
}

/// Whether DiffFit trains the DiT variable `name`: biases (adaLN's modulation included), norm
/// affines (`norm3` where the config gives it one) and the class table.
pub fn trains_dit(name: &str) -> bool {
    is_bias_or_norm(name) || name.contains("class_embedder.embedding_table.")
}

/// Whether DiffFit trains the SD3 / FLUX variable `name`: biases (adaLN's modulation included),
/// norm affines (the RMS qk-norms) and the timestep / pooled-text embedding.
pub fn trains_flow(name: &str) -> bool {
    is_bias_or_norm(name) || name.starts_with("time_text_embed.")
}

/// Whether DiffFit trains the Z-Image variable `name`: biases (adaLN's modulation included),
/// norm affines (the blocks' RMS norms, their qk-norms, the caption norm `cap_embedder.0`) and
/// the timestep embedder; the caption projection's weight stays frozen, as SD3's and FLUX's
/// `context_embedder` does.
pub fn trains_z_image(name: &str) -> bool {
    is_bias_or_norm(name) || name.starts_with("t_embedder.") || name == "cap_embedder.0.weight"
}

fn trains_in(backbone: &Backbone, name: &str) -> bool {
    backbone.reads(name)
        && match backbone {
            Backbone::UNet(_) => trains(name),
            Backbone::DiT(_) => trains_dit(name),
            Backbone::SD3(_) | Backbone::Flux(_) => trains_flow(name),
            Backbone::ZImage(_) => trains_z_image(name),
        }
}

/// The default γ range of a backbone with `blocks` transformer blocks: all of a UNet's or a
/// flow transformer's, the first half of DiT's (reported best there, method.md §4).
fn default_gamma_blocks(backbone: &Backbone, blocks: usize) -> [u32; 2] {
    match backbone {
        Backbone::UNet(_) | Backbone::SD3(_) | Backbone::Flux(_) | Backbone::ZImage(_) => {
            [0, blocks as u32]
        }
        Backbone::DiT(_) => [0, blocks.div_ceil(2) as u32],
    }
}

/// Makes DiffFit's tensors trainable and attaches γ = 1 to the blocks in `gamma_blocks`
/// ([first, last); default: every UNet block, the first half of DiT's); returns the trainable
/// tensors, variables first (by name), then the γ in block order.
pub fn select(
    backbone: &Backbone,
    vs: &nn::VarStore,
    gamma_blocks: Option<[u32; 2]>,
) -> Result<Vec<(String, Tensor)>, PeftError> {
    let all = backbone.scaled_blocks();
    let [first, last] = gamma_blocks.unwrap_or_else(|| default_gamma_blocks(backbone, all.len()));
    if last as usize > all.len() || first > last {
        return Err(PeftError::Config(format!(
            "peft.gamma_blocks = [{first}, {last}] but the model has {} transformer blocks; use \
             a range [first, last) within [0, {}]",
            all.len(),
            all.len()
        )));
    }
    let mut params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| trains_in(backbone, name))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in &mut params {
        let _ = t.set_requires_grad(true);
    }
    for block in &all[first as usize..last as usize] {
        let scales = BranchScales::ones(*block);
        for (suffix, t) in scales.named() {
            params.push((format!("{}.{suffix}", block.name()), t.shallow_clone()));
        }
        block.set_branch_scales(Some(scales));
    }
    Ok(params)
}

/// Loads DiffFit tensors from a file into the model: backbone variables are overwritten, γ are
/// attached to their blocks. Returns how many tensors were applied.
pub fn apply_tensors(
    backbone: &Backbone,
    vs: &nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    what: &str,
) -> Result<usize, PeftError> {
    let err = |why: String| PeftError::Tensors {
        what: what.to_owned(),
        why,
    };
    let variables = vs.variables();
    let all = backbone.scaled_blocks();
    let mut gammas: HashMap<&str, [Option<Tensor>; 3]> = HashMap::new();
    let mut updates = Vec::new();
    for (name, t) in tensors {
        if let Some((block, suffix)) = name.rsplit_once(".gamma_") {
            let b = all.iter().find(|b| b.name() == block).ok_or_else(|| {
                err(format!(
                    "`{name}`: `{block}` is not a transformer block of this model"
                ))
            })?;
            let slot = match suffix {
                "attn1" => 0,
                "attn2" if b.has_cross_attention() => 1,
                "ff" => 2,
                _ => {
                    let known = if b.has_cross_attention() {
                        "attn1, attn2, ff"
                    } else {
                        "attn1, ff"
                    };
                    return Err(err(format!("`{name}` is not a γ of this block ({known})")));
                }
            };
            if t.size() != [b.dim()] {
                return Err(err(format!(
                    "`{name}` has shape {:?}, the block needs [{}]",
                    t.size(),
                    b.dim()
                )));
            }
            gammas.entry(b.name()).or_default()[slot] = Some(t.to_kind(Kind::Float));
        } else {
            let var = variables.get(name).ok_or_else(|| {
                err(format!(
                    "`{name}` is not a variable of this model; the file was written for another \
                     model"
                ))
            })?;
            if var.size() != t.size() {
                return Err(err(format!(
                    "`{name}` has shape {:?}, the model's variable has {:?}",
                    t.size(),
                    var.size()
                )));
            }
            updates.push((var.shallow_clone(), t));
        }
    }
    tch::no_grad(|| {
        for (mut var, t) in updates {
            var.copy_(t);
        }
    });
    for b in all {
        if let Some(g) = gammas.remove(b.name()) {
            let device = b.device();
            let [a1, a2, ff] = g.map(|t| t.map(|t| t.to_device(device)));
            let ones = || Tensor::ones([b.dim()], (Kind::Float, device));
            b.set_branch_scales(Some(BranchScales {
                attn1: a1.unwrap_or_else(ones),
                attn2: b.has_cross_attention().then(|| a2.unwrap_or_else(ones)),
                ff: ff.unwrap_or_else(ones),
            }));
        }
    }
    Ok(tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_norms_and_conditioning_embeddings_train_and_nothing_else() {
        for name in [
            "conv_in.bias",
            "down_blocks.0.resnets.0.norm1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.norm3.weight",
            "down_blocks.0.attentions.0.norm.weight",
            "conv_norm_out.weight",
            "time_embedding.linear_1.weight",
            "add_embedding.linear_2.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias",
        ] {
            assert!(trains(name), "{name}");
        }
        for name in [
            "conv_in.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.0.resnets.0.time_emb_proj.weight",
            "mid_block.attentions.0.proj_in.weight",
        ] {
            assert!(!trains(name), "{name}");
        }
    }
}
