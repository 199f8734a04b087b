//! The backbone's per-request conditioning (text embeddings, class labels, a flow
//! transformer's joint prompt, or Z-Image's captions) and its source.

use tch::Tensor;

use super::flux_prompt::FluxTextEncoders;
use super::prompt::TextEncoders;
use super::sd3_prompt::Sd3TextEncoders;
use super::z_image_prompt::ZImageTextEncoder;
use super::{dit, PipelineError};
use crate::models::backbone::Condition;
use crate::models::unet::AddedCond;

/// How prompts become conditioning.
pub(super) enum Conditioner {
    /// Tokenizers and text encoders (SD, SDXL).
    Text {
        encoders: Box<TextEncoders>,
        force_zeros_for_empty_prompt: bool,
    },
    /// Class ids and `id2label` names (DiT).
    Classes(dit::ClassNames),
    /// CLIP-L, CLIP-G and T5 (SD3 / SD3.5).
    Sd3(Box<Sd3TextEncoders>),
    /// CLIP-L's pooled output and T5 (FLUX).
    Flux(Box<FluxTextEncoders>),
    /// Qwen3's chat-formatted prompt tokens (Z-Image).
    ZImage(Box<ZImageTextEncoder>),
}

/// Per-request conditioning, computed once and reused at every step.
#[derive(Debug)]
pub struct Conditioning {
    /// The backbone's inputs; with guidance the unconditional half is part of them (the
    /// negative prompt first for a UNet, the null class second for DiT, as diffusers orders
    /// them).
    pub(super) inputs: Condition,
    /// The guidance scale, when classifier-free guidance runs.
    pub(super) cfg: Option<f64>,
}

impl Conditioning {
    /// Stacks the conditioning of several unguided requests along the batch (a training batch
    /// of different prompts).
    pub fn cat(parts: &[&Conditioning]) -> Result<Conditioning, PipelineError> {
        if parts.is_empty() || parts.iter().any(|c| c.cfg.is_some()) {
            return Err(PipelineError::Request(
                "batched conditioning needs at least one request, all without classifier-free \
                 guidance"
                    .into(),
            ));
        }
        let mixed = || {
            PipelineError::Request(
                "batched conditioning mixes text, class, joint-prompt and caption conditioning, \
                 or parts with and without an optional input"
                    .into(),
            )
        };
        // Every part's tensors, concatenated: all present, or (optional inputs) all absent.
        let stack = |all: Vec<Option<&Tensor>>| -> Result<Option<Tensor>, PipelineError> {
            match all.iter().flatten().count() {
                0 => Ok(None),
                n if n == all.len() => Ok(Some(Tensor::cat(
                    &all.into_iter().flatten().collect::<Vec<_>>(),
                    0,
                ))),
                _ => Err(mixed()),
            }
        };
        let inputs = match &parts[0].inputs {
            Condition::Classes(_) => {
                let mut labels = Vec::new();
                for part in parts {
                    let Condition::Classes(l) = &part.inputs else {
                        return Err(mixed());
                    };
                    labels.push(Some(l));
                }
                Condition::Classes(stack(labels)?.ok_or_else(mixed)?)
            }
            Condition::Text { .. } => {
                let (mut embeds, mut pooled, mut time_ids, mut cond) =
                    (vec![], vec![], vec![], vec![]);
                for part in parts {
                    let Condition::Text {
                        embeds: e,
                        added,
                        timestep_cond,
                    } = &part.inputs
                    else {
                        return Err(mixed());
                    };
                    embeds.push(Some(e));
                    pooled.push(added.as_ref().map(|a| &a.text_embeds));
                    time_ids.push(added.as_ref().map(|a| &a.time_ids));
                    cond.push(timestep_cond.as_ref());
                }
                Condition::Text {
                    embeds: stack(embeds)?.ok_or_else(mixed)?,
                    added: match (stack(pooled)?, stack(time_ids)?) {
                        (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
                            text_embeds,
                            time_ids,
                        }),
                        _ => None,
                    },
                    timestep_cond: stack(cond)?,
                }
            }
            Condition::Joint { .. } => {
                let (mut context, mut pooled, mut guidance) = (vec![], vec![], vec![]);
                for part in parts {
                    let Condition::Joint {
                        context: c,
                        pooled: p,
                        guidance: g,
                    } = &part.inputs
                    else {
                        return Err(mixed());
                    };
                    context.push(Some(c));
                    pooled.push(Some(p));
                    guidance.push(g.as_ref());
                }
                Condition::Joint {
                    context: stack(context)?.ok_or_else(mixed)?,
                    pooled: stack(pooled)?.ok_or_else(mixed)?,
                    guidance: stack(guidance)?,
                }
            }
            Condition::Captions { .. } => {
                let mut rows = Vec::new();
                for part in parts {
                    let Condition::Captions { tokens, lengths } = &part.inputs else {
                        return Err(mixed());
                    };
                    rows.push((tokens, lengths.as_slice()));
                }
                let (tokens, lengths) = captions_cat(&rows);
                Condition::Captions { tokens, lengths }
            }
        };
        Ok(Conditioning { inputs, cfg: None })
    }

    /// The tensors as diffusers' models name their arguments: `encoder_hidden_states`, and for
    /// SDXL `text_embeds` and `time_ids` (`timestep_cond` for LCM); `class_labels` for DiT;
    /// `encoder_hidden_states`, `pooled_projections` (and FLUX-dev's `guidance`) for SD3 / FLUX;
    /// `cap_feats` (zero-padded) and `cap_lens` for Z-Image.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        match &self.inputs {
            Condition::Classes(labels) => vec![("class_labels".into(), labels.shallow_clone())],
            Condition::Text {
                embeds,
                added,
                timestep_cond,
            } => {
                let mut out = vec![("encoder_hidden_states".to_string(), embeds.shallow_clone())];
                if let Some(a) = added {
                    out.push(("text_embeds".into(), a.text_embeds.shallow_clone()));
                    out.push(("time_ids".into(), a.time_ids.shallow_clone()));
                }
                if let Some(c) = timestep_cond {
                    out.push(("timestep_cond".into(), c.shallow_clone()));
                }
                out
            }
            Condition::Joint {
                context,
                pooled,
                guidance,
            } => {
                let mut out = vec![
                    ("encoder_hidden_states".to_string(), context.shallow_clone()),
                    ("pooled_projections".into(), pooled.shallow_clone()),
                ];
                if let Some(g) = guidance {
                    out.push(("guidance".into(), g.shallow_clone()));
                }
                out
            }
            Condition::Captions { tokens, lengths } => vec![
                ("cap_feats".to_string(), tokens.shallow_clone()),
                ("cap_lens".into(), Tensor::from_slice(lengths)),
            ],
        }
    }

    /// The same conditioning repeated `times` along the batch (rows in order 0..n, 0..n, …).
    pub fn repeat(&self, times: i64) -> Conditioning {
        let rep = |t: &Tensor| {
            let mut reps = vec![1i64; t.dim()];
            reps[0] = times;
            t.repeat(reps.as_slice())
        };
        let inputs = match &self.inputs {
            Condition::Classes(labels) => Condition::Classes(rep(labels)),
            Condition::Text {
                embeds,
                added,
                timestep_cond,
            } => Condition::Text {
                embeds: rep(embeds),
                added: added.as_ref().map(|a| AddedCond {
                    text_embeds: rep(&a.text_embeds),
                    time_ids: rep(&a.time_ids),
                }),
                timestep_cond: timestep_cond.as_ref().map(rep),
            },
            Condition::Joint {
                context,
                pooled,
                guidance,
            } => Condition::Joint {
                context: rep(context),
                pooled: rep(pooled),
                guidance: guidance.as_ref().map(rep),
            },
            Condition::Captions { tokens, lengths } => Condition::Captions {
                tokens: rep(tokens),
                lengths: (0..times).flat_map(|_| lengths.iter().copied()).collect(),
            },
        };
        Conditioning {
            inputs,
            cfg: self.cfg,
        }
    }
}

/// Caption rows of several conditionings as one batch: each part's tokens zero-padded to the
/// longest part, and the lengths in order.
pub(super) fn captions_cat(parts: &[(&Tensor, &[i64])]) -> (Tensor, Vec<i64>) {
    let longest = parts.iter().map(|(t, _)| t.size()[1]).max().unwrap_or(0);
    let padded: Vec<Tensor> = parts
        .iter()
        .map(|(t, _)| t.constant_pad_nd([0, 0, 0, longest - t.size()[1]]))
        .collect();
    (
        Tensor::cat(&padded, 0),
        parts.iter().flat_map(|(_, l)| l.iter().copied()).collect(),
    )
}
