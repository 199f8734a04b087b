//! Activation recomputation per transformer block (what PyTorch calls gradient checkpointing;
//! tch has none). A forward pass in grad mode keeps only each block's inputs: the blocks run
//! without autograd, the last block's output re-enters the graph as a leaf, and the loss's
//! backward stops there. [`Recompute::take`] then hands the kept passes to the model, which runs
//! each block again with autograd, last to first, and backpropagates the gradient of its output
//! into its parameters and inputs; the model's own input stage gets the gradient last. The
//! gradients equal those of the plain pass; the memory is the block boundaries plus one block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::{Kind, Tensor};

/// The recomputation switch and the passes waiting for their backward.
#[derive(Debug)]
pub struct Recompute<P> {
    on: AtomicBool,
    pending: Mutex<Vec<P>>,
}

impl<P> Default for Recompute<P> {
    fn default() -> Self {
        Recompute {
            on: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
        }
    }
}

impl<P> Recompute<P> {
    /// Turns recomputation on or off for later forward passes.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether this forward pass should keep only block inputs: recomputation is on and
    /// autograd records (a reference model's `no_grad` pass runs plainly).
    pub fn applies(&self) -> bool {
        self.on.load(Ordering::Relaxed) && grad_enabled()
    }

    /// Keeps a pass for [`Recompute::take`]; `out` names a pass's output leaf. Panics when a
    /// kept pass already received its gradient but was never finished: its blocks would get no
    /// gradient (a caller that forgot `finish_recomputation` after a backward).
    pub fn push(&self, pass: P, out: impl Fn(&P) -> &Tensor) {
        let unfinished = self
            .pending
            .lock()
            .expect("the recompute lock is never poisoned")
            .iter()
            .any(|p| grad_of(out(p)).is_some());
        assert!(
            !unfinished,
            "a forward pass with recomputed blocks was backpropagated but never finished: call \
             Backbone::finish_recomputation after each backward (Learner::step_over_then)"
        );
        self.pending
            .lock()
            .expect("the recompute lock is never poisoned")
            .push(pass);
    }

    /// The kept passes, last first, emptying the list.
    pub fn take(&self) -> Vec<P> {
        let mut all = std::mem::take(
            &mut *self
                .pending
                .lock()
                .expect("the recompute lock is never poisoned"),
        );
        all.reverse();
        all
    }
}

/// Whether autograd records operations here (tch exposes no `GradMode` query).
fn grad_enabled() -> bool {
    Tensor::ones([1], (Kind::Float, tch::Device::Cpu))
        .set_requires_grad(true)
        .g_mul_scalar(1.0)
        .requires_grad()
}

/// A detached copy of `t` that autograd tracks from here (a block input or output boundary).
pub fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// The gradient autograd left in `t`, if any.
pub fn grad_of(t: &Tensor) -> Option<Tensor> {
    let g = t.grad();
    g.defined().then_some(g)
}

/// The sum of the gradients autograd left in the leaves `a` and `b` (one tensor used by both
/// the recomputed blocks and the output stage), if either has one.
pub fn summed_grad(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    match (grad_of(a), grad_of(b)) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Σ ⟨output, gradient⟩ over the pairs with a gradient: its backward sends each gradient into
/// its output's graph. `None` when nothing carries a gradient.
pub fn surrogate(pairs: &[(&Tensor, Option<&Tensor>)]) -> Option<Tensor> {
    pairs
        .iter()
        .filter_map(|(out, grad)| {
            let g = (*grad)?;
            out.requires_grad()
                .then(|| (*out * g.to_kind(out.kind())).sum(Kind::Float))
        })
        .reduce(|a, b| a + b)
}

/// Backpropagates [`surrogate`] of `pairs`, when there is one.
pub fn backward(pairs: &[(&Tensor, Option<&Tensor>)]) {
    if let Some(s) = surrogate(pairs) {
        s.backward();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grad_mode_is_detected_and_an_unfinished_pass_is_refused() {
        assert!(grad_enabled());
        tch::no_grad(|| assert!(!grad_enabled()));
        let r: Recompute<Tensor> = Recompute::default();
        r.set(true);
        assert!(r.applies());
        tch::no_grad(|| assert!(!r.applies()));
        let zero = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        r.push(leaf(&zero), |t| t);
        r.push(leaf(&(&zero + 1.0)), |t| t);
        let taken: Vec<f64> = r.take().iter().map(|t| t.double_value(&[0])).collect();
        assert_eq!(taken, [1.0, 0.0], "last first");
        assert!(r.take().is_empty());
        // A pass whose output got a gradient must be finished before the next one.
        let out = leaf(&zero);
        r.push(out.shallow_clone(), |t| t);
        (&out * 2.0).sum(Kind::Float).backward();
        let again =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.push(leaf(&zero), |t| t)));
        assert!(again.is_err());
    }
}
