//! Checkpointing a run's learner and resuming from the latest checkpoint.

use std::path::PathBuf;

use super::dir::RunDir;
use super::error::RunError;
use crate::checkpoint;
use crate::config::RunConfig;
use crate::learner::Learner;

/// Writes a checkpoint of `learner` with data cursor `cursor` (pairs or rounds consumed).
pub fn save(
    dir: &RunDir,
    learner: &Learner,
    config: &RunConfig,
    cursor: u64,
) -> Result<PathBuf, RunError> {
    let state = checkpoint::State {
        pso_version: env!("CARGO_PKG_VERSION").into(),
        counters: learner.counters(),
        data_cursor: cursor,
        config_hash: config.training_hash(),
        peft: config.peft.kind.to_string(),
        world_size: learner.world_size(),
    };
    Ok(checkpoint::save(
        &dir.checkpoints(),
        learner,
        &state,
        config.learner.keep_checkpoints,
    )?)
}

/// A learner over `adapter`'s tensors, data-parallel over `group` when given, restored from
/// `dir`'s latest checkpoint when resuming; returns it with the data cursor to continue from (0
/// for a new run).
pub fn start_learner(
    adapter: &crate::peft::Adapter,
    config: &RunConfig,
    dir: &RunDir,
    resuming: bool,
    group: Option<std::sync::Arc<dist::ProcessGroup>>,
) -> Result<(Learner, u64), RunError> {
    let mut learner = Learner::new(adapter.params_shallow(), &config.optim, &config.learner);
    if let Some(group) = group {
        learner.join(group)?;
    }
    let cursor = if resuming {
        resume(dir, &mut learner, config)?
    } else {
        0
    };
    Ok((learner, cursor))
}

/// Restores the newest checkpoint of `dir` that reads back whole into `learner` (passing over,
/// with a warning, a damaged newest one or a broken `latest` pointer); returns the data cursor
/// (0 when the run has no checkpoint yet).
pub fn resume(dir: &RunDir, learner: &mut Learner, config: &RunConfig) -> Result<u64, RunError> {
    let Some((loaded, skipped)) = checkpoint::load_newest(&dir.checkpoints())? else {
        return Ok(0);
    };
    for passed in &skipped {
        tracing::warn!(
            path = %passed.path.display(),
            why = %passed.why,
            "passing over a checkpoint that does not read back; resuming from an older one"
        );
    }
    let latest = loaded.dir.clone();
    if loaded.state.world_size != learner.world_size() {
        return Err(RunError::RunDir {
            path: latest,
            why: format!(
                "was trained by {} data-parallel ranks and this resume has {}: the effective \
                 batch (learner.batch_size × ranks) and each rank's share of the data would \
                 change; resume with {0} ranks (torchrun --nproc-per-node)",
                loaded.state.world_size,
                learner.world_size()
            ),
        });
    }
    if loaded.state.config_hash != config.training_hash() {
        return Err(RunError::RunDir {
            path: latest,
            why: "was written under a different training config; resume with the run's own \
                  config.toml"
                .into(),
        });
    }
    learner.restore(
        loaded.trainable,
        loaded.optimizer,
        loaded.ema,
        loaded.state.counters,
    )?;
    tracing::info!(
        checkpoint = %latest.display(),
        step = loaded.state.counters.step,
        "resumed"
    );
    Ok(loaded.state.data_cursor)
}

/// The checkpoint `latest` names, or `None` when there is none or the pointer is broken (empty,
/// dangling): the caller then writes a checkpoint, which repairs it.
pub(crate) fn latest_or_none(checkpoints: &std::path::Path) -> Option<PathBuf> {
    checkpoint::latest(checkpoints).ok().flatten()
}
