//! AdamW exactly as `torch.optim.AdamW` (single-tensor path), with fp32 state that can be
//! saved and loaded, and `torch.nn.utils.clip_grad_norm_`.
//!
//! A parameter stored in bf16/fp16 gets an fp32 master copy: updates accumulate there and are
//! rounded into the parameter after each step, so small updates are not lost to rounding.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, TchError, Tensor};

/// Errors of the optimizer's state handling.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A parameter has state entries but not all of them.
    #[error("optimizer state entry `{0}` is missing")]
    Missing(String),
    /// A state entry's shape differs from its parameter's.
    #[error("optimizer state entry `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        /// The entry.
        name: String,
        /// Its shape.
        got: Vec<i64>,
        /// The parameter's shape.
        want: Vec<i64>,
    },
    /// A state entry names no parameter of this optimizer.
    #[error("optimizer state entry `{0}` matches no parameter")]
    Unknown(String),
    /// A step count that is negative or not an integer.
    #[error("optimizer state entry `{0}` is not a valid step count")]
    BadStep(String),
    /// libtorch failed (reading or writing the file).
    #[error(transparent)]
    Torch(#[from] TchError),
}

/// AdamW hyper-parameters (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε, added after the square root of the bias-corrected second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One parameter's moments (fp32) and update count.
#[derive(Debug)]
struct State {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW over named trainable tensors.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    masters: Vec<Option<Tensor>>,
    state: Vec<Option<State>>,
}

/// Scales the defined gradients of `params` so that their total L2 norm is at most `max_norm`
/// (as `torch.nn.utils.clip_grad_norm_`) and returns the norm before clipping; a non-finite norm
/// is returned with the gradients left as they are, so the caller can skip the step.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm();
        let norm = total.double_value(&[]);
        if !norm.is_finite() {
            return norm;
        }
        let coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let c = coef.to_kind(g.kind());
                let _ = g.g_mul_(&c);
            }
        }
        norm
    })
}

impl AdamW {
    /// An optimizer over `params` (each with requires_grad), with empty state.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let state = params.iter().map(|_| None).collect();
        let masters = params
            .iter()
            .map(|(_, p)| (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float)))
            .collect();
        AdamW {
            config,
            params,
            masters,
            state,
        }
    }

    /// The fp32 value of every parameter (its master copy where it has one), by name.
    pub fn fp32_params(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.masters)
            .map(|((name, p), master)| {
                let value = match master {
                    Some(m) => m.shallow_clone(),
                    None => p.detach(),
                };
                (name.clone(), value)
            })
            .collect()
    }

    /// Sets every parameter (and master copy) to `values`, as [`AdamW::fp32_params`] returns
    /// them; a name that is missing or unknown, or a shape that differs, is refused before
    /// anything changes.
    pub fn set_params(&mut self, values: Vec<(String, Tensor)>) -> Result<(), OptimError> {
        let mut map: HashMap<String, Tensor> = values.into_iter().collect();
        let mut ordered = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let v = map
                .remove(name)
                .ok_or_else(|| OptimError::Missing(name.clone()))?;
            if v.size() != p.size() {
                return Err(OptimError::Shape {
                    name: name.clone(),
                    got: v.size(),
                    want: p.size(),
                });
            }
            ordered.push(v.to_device(p.device()).to_kind(Kind::Float));
        }
        if let Some(k) = map.keys().min() {
            return Err(OptimError::Unknown(k.clone()));
        }
        tch::no_grad(|| {
            for (((_, p), master), v) in self.params.iter_mut().zip(&mut self.masters).zip(ordered)
            {
                p.copy_(&v);
                if let Some(m) = master {
                    m.copy_(&v);
                }
            }
        });
        Ok(())
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Clips the gradients of all parameters (see [`clip_grad_norm`]); returns the pre-clip norm.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let ps: Vec<Tensor> = self.params.iter().map(|(_, p)| p.shallow_clone()).collect();
        clip_grad_norm(&ps, max_norm)
    }

    /// Zeroes every defined gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One AdamW update with learning rate `lr`; parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        let AdamWConfig {
            betas: (beta1, beta2),
            eps,
            weight_decay,
        } = self.config;
        tch::no_grad(|| {
            for (((_, p), st), master) in self
                .params
                .iter_mut()
                .zip(self.state.iter_mut())
                .zip(&self.masters)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let st = st.get_or_insert_with(|| State {
                    exp_avg: g.zeros_like(),
                    exp_avg_sq: g.zeros_like(),
                    step: 0,
                });
                st.step += 1;
                let mut w = match master {
                    Some(m) => m.shallow_clone(),
                    None => p.shallow_clone(),
                };
                let _ = w.g_mul_scalar_(1.0 - lr * weight_decay);
                let _ = st.exp_avg.lerp_(&g, 1.0 - beta1);
                let _ = st.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = st.exp_avg_sq.g_add_(&(&g * &g * (1.0 - beta2)));
                let t = st.step as f64;
                let bc1 = 1.0 - beta1.powf(t);
                let bc2_sqrt = (1.0 - beta2.powf(t)).sqrt();
                let step_size = lr / bc1;
                let denom = st.exp_avg_sq.sqrt() / bc2_sqrt + eps;
                let _ = w.g_sub_(&(&st.exp_avg / &denom * step_size));
                if master.is_some() {
                    p.copy_(&w);
                }
            }
        });
    }

    /// The state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>` (fp32) and
    /// `step.<param>` (int64 scalar), for parameters that have been updated at least once.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, _), st) in self.params.iter().zip(&self.state) {
            if let Some(st) = st {
                out.push((format!("exp_avg.{name}"), st.exp_avg.copy()));
                out.push((format!("exp_avg_sq.{name}"), st.exp_avg_sq.copy()));
                out.push((format!("step.{name}"), Tensor::from(st.step as i64)));
            }
        }
        out
    }

    /// Replaces the state with `entries` (as [`AdamW::state_tensors`] writes them); a parameter
    /// with no entries starts fresh. Nothing changes on error.
    pub fn load_state(&mut self, entries: Vec<(String, Tensor)>) -> Result<(), OptimError> {
        let mut map: HashMap<String, Tensor> = entries.into_iter().collect();
        let mut state = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let keys = [
                format!("exp_avg.{name}"),
                format!("exp_avg_sq.{name}"),
                format!("step.{name}"),
            ];
            if keys.iter().all(|k| !map.contains_key(k)) {
                state.push(None);
                continue;
            }
            let mut take = |k: &String| map.remove(k).ok_or_else(|| OptimError::Missing(k.clone()));
            let (m, v, s) = (take(&keys[0])?, take(&keys[1])?, take(&keys[2])?);
            let want = p.size();
            for (k, t) in [(&keys[0], &m), (&keys[1], &v)] {
                if t.size() != want {
                    return Err(OptimError::Shape {
                        name: k.clone(),
                        got: t.size(),
                        want,
                    });
                }
            }
            let step = s.to_kind(Kind::Double).double_value(&[]);
            if s.numel() != 1 || step.is_nan() || step < 0.0 || step.fract() != 0.0 {
                return Err(OptimError::BadStep(keys[2].clone()));
            }
            let dev = p.device();
            state.push(Some(State {
                exp_avg: m.to_kind(Kind::Float).to_device(dev).copy(),
                exp_avg_sq: v.to_kind(Kind::Float).to_device(dev).copy(),
                step: step as u64,
            }));
        }
        if let Some(k) = map.keys().min() {
            return Err(OptimError::Unknown(k.clone()));
        }
        self.state = state;
        Ok(())
    }

    /// Writes the state to a safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), OptimError> {
        let st = self.state_tensors();
        let cpu: Vec<(String, Tensor)> = st
            .into_iter()
            .map(|(n, t)| (n, t.to_device(tch::Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&cpu, path)?;
        Ok(())
    }

    /// Reads the state from a safetensors file written by [`AdamW::save`].
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<(), OptimError> {
        let entries = Tensor::read_safetensors(path)?;
        self.load_state(entries)
    }
}
