//! The backbone's per-request conditioning (text embeddings or class labels) and its source.

use tch::Tensor;

use super::prompt::TextEncoders;
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
        // Each field of every part, concatenated; `None` when some part lacks it.
        let cat = |field: &dyn Fn(&Condition) -> Option<&Tensor>| {
            let all: Option<Vec<&Tensor>> = parts.iter().map(|c| field(&c.inputs)).collect();
            all.map(|v| Tensor::cat(&v, 0))
        };
        fn labels(c: &Condition) -> Option<&Tensor> {
            match c {
                Condition::Classes(l) => Some(l),
                Condition::Text { .. } => None,
            }
        }
        fn text(c: &Condition) -> Option<(&Tensor, Option<&AddedCond>, Option<&Tensor>)> {
            match c {
                Condition::Text {
                    embeds,
                    added,
                    timestep_cond,
                } => Some((embeds, added.as_ref(), timestep_cond.as_ref())),
                Condition::Classes(_) => None,
            }
        }
        fn added(c: &Condition) -> Option<&AddedCond> {
            text(c).and_then(|t| t.1)
        }
        let inputs = if let Some(labels) = cat(&labels) {
            Condition::Classes(labels)
        } else if let Some(embeds) = cat(&|c| text(c).map(|t| t.0)) {
            Condition::Text {
                embeds,
                added: cat(&|c| added(c).map(|a| &a.text_embeds)).map(|text_embeds| AddedCond {
                    text_embeds,
                    time_ids: cat(&|c| added(c).map(|a| &a.time_ids))
                        .expect("added conditioning has time ids"),
                }),
                timestep_cond: cat(&|c| text(c).and_then(|t| t.2)),
            }
        } else {
            return Err(PipelineError::Request(
                "batched conditioning mixes text and class conditioning".into(),
            ));
        };
        Ok(Conditioning { inputs, cfg: None })
    }

    /// The tensors as diffusers' models name their arguments: `encoder_hidden_states`, and for
    /// SDXL `text_embeds` and `time_ids` (`timestep_cond` for LCM); `class_labels` for DiT.
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
        };
        Conditioning {
            inputs,
            cfg: self.cfg,
        }
    }
}
