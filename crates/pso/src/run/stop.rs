//! Stopping a run cleanly on Ctrl-C or SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dist::ProcessGroup;
use tch::Tensor;

use super::RunError;
use crate::learner::LearnerError;

/// Set when the user asks the run to stop (Ctrl-C / SIGTERM): the loop finishes its step,
/// checkpoints and returns.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut term) = signal(SignalKind::terminate()) else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            tracing::warn!("stop requested: finishing the current step, then checkpointing");
            set.store(true, Ordering::SeqCst);
        });
    });
    flag
}

/// Whether `here` holds on this process or (data-parallel) on any rank: a stop request on one
/// rank then stops every rank after the same step, instead of leaving the others waiting in a
/// collective. Every rank must call it at the same point.
pub(crate) fn any_rank(here: bool, group: Option<&ProcessGroup>) -> Result<bool, RunError> {
    let Some(group) = group else {
        return Ok(here);
    };
    let mut any = Tensor::from_slice(&[f32::from(u8::from(here))]);
    group.all_reduce_sum(&mut any).map_err(LearnerError::from)?;
    Ok(any.double_value(&[0]) > 0.0)
}
