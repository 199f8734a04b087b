//! A linear layer that knows its diffusers name and can carry a LoRA adapter, as peft's
//! `lora.Linear` wraps `nn.Linear`: y = W x + b + scale · B (A x).
//!
//! The adapter is attached after the base weights load (see `crate::peft`), so the model types
//! stay plain diffusers layouts. Its tensors may be fp32 while the base runs in bf16/fp16: the
//! input is cast to the adapter's dtype and the adapter's output back, so gradients reach the
//! fp32 tensors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tch::nn;
use tch::Tensor;

/// A LoRA adapter of one linear layer.
#[derive(Debug)]
pub struct Lora {
    /// A, `lora_A.weight`: [rank, in_features].
    pub down: Tensor,
    /// B, `lora_B.weight`: [out_features, rank].
    pub up: Tensor,
    /// alpha / rank.
    pub scale: f64,
    /// Shared on/off switch: off gives the base layer (the frozen reference of PSO).
    pub enabled: Arc<AtomicBool>,
}

impl Lora {
    fn shallow_clone(&self) -> Lora {
        Lora {
            down: self.down.shallow_clone(),
            up: self.up.shallow_clone(),
            scale: self.scale,
            enabled: self.enabled.clone(),
        }
    }

    /// scale · B A, the weight delta merging the adapter into the base layer would add.
    pub fn delta(&self) -> Tensor {
        self.up.matmul(&self.down) * self.scale
    }
}

/// `nn.Linear` with diffusers' parameter names (`NAME.weight`, `NAME.bias`) and an optional LoRA.
#[derive(Debug)]
pub struct Linear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Mutex<Option<Lora>>,
}

impl Linear {
    /// Lays out `weight` [out, in] (and `bias` [out]) under `vs`.
    pub fn new(vs: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let name = vs.components().collect::<Vec<_>>().join(".");
        let base = nn::linear(
            vs,
            in_features,
            out_features,
            nn::LinearConfig {
                bias,
                ..Default::default()
            },
        );
        Linear {
            name,
            weight: base.ws,
            bias: base.bs,
            lora: Mutex::new(None),
        }
    }

    /// The module's dotted name in the model, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base weight [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Folds an attached adapter into the base weight (W += scale · B A) and removes it.
    pub fn merge_lora(&self) {
        if let Some(l) = self
            .lora
            .lock()
            .expect("the LoRA slot lock is never poisoned")
            .take()
        {
            tch::no_grad(|| {
                let delta = l
                    .delta()
                    .to_kind(self.weight.kind())
                    .to_device(self.weight.device());
                let _ = self.weight.shallow_clone().g_add_(&delta);
            });
        }
    }

    /// Multiplies the layer's output channels by `gamma` [out] in its weight and bias (how
    /// DiffFit's γ merges into the layer that ends a branch).
    pub fn scale_outputs(&self, gamma: &Tensor) {
        tch::no_grad(|| {
            let g = gamma
                .to_kind(self.weight.kind())
                .to_device(self.weight.device());
            let _ = self.weight.shallow_clone().g_mul_(&g.unsqueeze(1));
            if let Some(b) = &self.bias {
                let _ = b.shallow_clone().g_mul_(&g);
            }
        });
    }

    /// (in_features, out_features).
    pub fn features(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[1], s[0])
    }

    /// Attaches (or with `None` removes) a LoRA adapter.
    pub fn set_lora(&self, lora: Option<Lora>) {
        *self
            .lora
            .lock()
            .expect("the LoRA slot lock is never poisoned") = lora;
    }

    /// The attached adapter (sharing its tensors), if any.
    pub fn lora(&self) -> Option<Lora> {
        self.lora
            .lock()
            .expect("the LoRA slot lock is never poisoned")
            .as_ref()
            .map(Lora::shallow_clone)
    }

    /// W x + b, plus the adapter's term when one is attached and enabled.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
        let guard = self
            .lora
            .lock()
            .expect("the LoRA slot lock is never poisoned");
        match guard.as_ref() {
            Some(l) if l.enabled.load(Ordering::Relaxed) => {
                let h = x
                    .to_kind(l.down.kind())
                    .linear::<Tensor>(&l.down, None)
                    .linear::<Tensor>(&l.up, None);
                base + (h * l.scale).to_kind(x.kind())
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn an_enabled_adapter_adds_scaled_b_a_and_a_disabled_one_adds_nothing() {
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = Linear::new(&vs.root() / "blk" / "to_q", 3, 2, true);
        assert_eq!(lin.name(), "blk.to_q");
        assert_eq!(lin.features(), (3, 2));
        let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let base = lin.forward(&x);
        let enabled = Arc::new(AtomicBool::new(true));
        let down = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let up = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        lin.set_lora(Some(Lora {
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            scale: 0.5,
            enabled: enabled.clone(),
        }));
        let with = lin.forward(&x);
        let want = &base + x.matmul(&down.tr()).matmul(&up.tr()) * 0.5;
        assert!(with.allclose(&want, 1e-5, 1e-6, false));
        let merged = x.linear(
            &(lin.weight() + lin.lora().unwrap().delta()),
            lin.bias.as_ref(),
        );
        assert!(with.allclose(&merged, 1e-5, 1e-5, false));
        enabled.store(false, Ordering::Relaxed);
        assert!(lin.forward(&x).equal(&base));
    }
}
