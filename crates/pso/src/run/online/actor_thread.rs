//! The concurrent actor thread of `pso online` and the publishing of weights to it.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use tch::{Device, Tensor};

use super::trainer::{actor_settings, attach};
use crate::actor::Actor;
use crate::config::RunConfig;
use crate::learner::Learner;
use crate::run::rounds::{Round, RoundMaker};
use crate::run::{load_pipeline, RunError};

/// The newest trainable tensors, published by the learner for a concurrent actor.
pub(super) type WeightSlot = Arc<Mutex<Option<(u64, Vec<(String, Tensor)>)>>>;

/// Where the learner's rounds come from.
pub(super) enum Rounds {
    /// Sampled by the learner's own model between its steps.
    Inline { maker: Box<RoundMaker>, next: u64 },
    /// Sampled by a concurrent actor thread on another device.
    Thread {
        rounds: Receiver<Result<Round, RunError>>,
        weights: WeightSlot,
        device: Device,
        actor: std::thread::JoinHandle<()>,
    },
}

/// Starts the concurrent actor: loads its own model on `device`, then samples round after
/// round from `first`, taking the newest published weights before each.
pub(super) fn spawn_actor(
    config: RunConfig,
    device: Device,
    mut maker: RoundMaker,
    first: u64,
    weights: WeightSlot,
    halt: Arc<AtomicBool>,
    rounds: SyncSender<Result<Round, RunError>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let result = (|| -> Result<(), RunError> {
            let pipeline = load_pipeline(&config, device)?;
            let adapter = attach(&pipeline, &config)?;
            let actor = Actor::new(&pipeline, actor_settings(&config))?;
            let mut version = 0;
            for index in first.. {
                if let Some((v, values)) = weights.lock().expect("weights lock").take() {
                    adapter.set_values(&values)?;
                    version = v;
                }
                match maker.make(&actor, index, version, &halt)? {
                    None => return Ok(()),
                    Some(round) => {
                        if rounds.send(Ok(round)).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = rounds.send(Err(e));
        }
    })
}

/// Publishes the learner's trainable tensors (copied onto the actor's device).
pub(super) fn publish(weights: &WeightSlot, learner: &Learner, device: Device) {
    let values = tch::no_grad(|| {
        learner
            .trainable()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy().to_device(device)))
            .collect()
    });
    *weights.lock().expect("weights lock") = Some((learner.counters().step, values));
}
