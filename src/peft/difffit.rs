//! DiffFit on a UNet (method.md §4): train the biases, the norms' affine parameters, the
//! conditioning embeddings and new per-channel γ (init 1.0) on the attn1, attn2 and ff outputs
//! of the transformer blocks; everything else stays frozen.

use std::collections::HashMap;

use tch::{nn, Kind, Tensor};

use super::PeftError;
use crate::models::transformer::{BasicTransformerBlock, BranchScales};
use crate::models::unet::UNet2DConditionModel;

/// Top-level modules that embed the conditioning (timestep, SDXL's added text/time, class).
const CONDITIONING: [&str; 3] = ["time_embedding.", "add_embedding.", "class_embedding."];

/// Whether DiffFit trains the UNet variable `name`.
pub fn trains(name: &str) -> bool {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    let last = module.rsplit('.').next().unwrap_or("");
    name.ends_with(".bias")
        || (name.ends_with(".weight") && last.contains("norm"))
        || CONDITIONING.iter().any(|p| name.starts_with(p))
}

/// Every transformer block of the UNet, in module order (the index `peft.gamma_blocks` counts).
pub fn blocks(unet: &UNet2DConditionModel) -> Vec<&BasicTransformerBlock> {
    unet.transformers()
        .into_iter()
        .flat_map(|t| t.blocks())
        .collect()
}

/// Makes DiffFit's tensors trainable and attaches γ = 1 to the blocks in `gamma_blocks`
/// ([first, last), all when `None`); returns the trainable tensors, variables first (by name),
/// then the γ in block order.
pub fn select(
    unet: &UNet2DConditionModel,
    vs: &nn::VarStore,
    gamma_blocks: Option<[u32; 2]>,
) -> Result<Vec<(String, Tensor)>, PeftError> {
    let all = blocks(unet);
    let [first, last] = gamma_blocks.unwrap_or([0, all.len() as u32]);
    if last as usize > all.len() {
        return Err(PeftError::Config(format!(
            "peft.gamma_blocks = [{first}, {last}] but the UNet has {} transformer blocks; use a \
             range within [0, {}]",
            all.len(),
            all.len()
        )));
    }
    let mut params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| trains(name))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in &mut params {
        let _ = t.set_requires_grad(true);
    }
    for block in &all[first as usize..last as usize] {
        let ones =
            || Tensor::ones([block.dim()], (Kind::Float, vs.device())).set_requires_grad(true);
        let scales = BranchScales {
            attn1: ones(),
            attn2: ones(),
            ff: ones(),
        };
        for (suffix, t) in scales.named() {
            params.push((format!("{}.{suffix}", block.name()), t.shallow_clone()));
        }
        block.set_branch_scales(Some(scales));
    }
    Ok(params)
}

/// Loads DiffFit tensors from a file into the model: UNet variables are overwritten, γ are
/// attached to their blocks. Returns how many tensors were applied.
pub fn apply_tensors(
    unet: &UNet2DConditionModel,
    vs: &nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    what: &str,
) -> Result<usize, PeftError> {
    let err = |why: String| PeftError::Tensors {
        what: what.to_owned(),
        why,
    };
    let variables = vs.variables();
    let all = blocks(unet);
    let mut gammas: HashMap<&str, [Option<Tensor>; 3]> = HashMap::new();
    let mut updates = Vec::new();
    for (name, t) in tensors {
        if let Some((block, suffix)) = name.rsplit_once(".gamma_") {
            let slot = match suffix {
                "attn1" => 0,
                "attn2" => 1,
                "ff" => 2,
                _ => return Err(err(format!("`{name}` is not a known γ (attn1, attn2, ff)"))),
            };
            let b = all.iter().find(|b| b.name() == block).ok_or_else(|| {
                err(format!(
                    "`{name}`: `{block}` is not a transformer block of this UNet"
                ))
            })?;
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
                    "`{name}` is not a variable of this UNet; the file was written for another \
                     model"
                ))
            })?;
            if var.size() != t.size() {
                return Err(err(format!(
                    "`{name}` has shape {:?}, the UNet's variable has {:?}",
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
            let device = b.linears()[0].weight().device();
            let [a1, a2, ff] = g.map(|t| {
                t.unwrap_or_else(|| Tensor::ones([b.dim()], (Kind::Float, device)))
                    .to_device(device)
            });
            b.set_branch_scales(Some(BranchScales {
                attn1: a1,
                attn2: a2,
                ff,
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
