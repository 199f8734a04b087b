//! Checkpoint directories: `RUN/checkpoints/step-XXXXXXXX/` with the trainable tensors, the
//! optimizer state, the EMA (when kept) and `state.json` (counters, data cursor, config hash).
//!
//! A checkpoint is written under a hidden temporary name, fsynced and renamed, then `latest`
//! (a one-line file naming the directory) is replaced atomically, then checkpoints beyond
//! `keep` are deleted oldest first. A crash at any moment leaves `latest` naming a complete one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::learner::{Counters, Learner};
use hf::tensor_file::{self, TensorFileError};

/// File naming the newest complete checkpoint.
pub const LATEST: &str = "latest";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const EMA: &str = "ema.safetensors";
const STATE: &str = "state.json";

/// Errors writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The OS refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tensor file failed.
    #[error(transparent)]
    Tensors(#[from] TensorFileError),
    /// A checkpoint is incomplete or does not belong to this run.
    #[error("{path}: {why}")]
    Invalid {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything but tensors that a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// pso version that wrote it.
    pub pso_version: String,
    /// The learner's counters.
    pub counters: Counters,
    /// Pairs (or prompts) consumed from the data source.
    pub data_cursor: u64,
    /// Hash of the training-relevant config ([`crate::config::RunConfig::training_hash`]).
    pub config_hash: String,
    /// The PEFT method (`lora`, `difffit`, `full`).
    pub peft: String,
    /// Data-parallel ranks that trained it (the effective batch is per-rank batch × ranks).
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Trainable tensors (fp32).
    pub trainable: Vec<(String, Tensor)>,
    /// Optimizer state.
    pub optimizer: Vec<(String, Tensor)>,
    /// EMA tensors, when the run kept an EMA.
    pub ema: Option<Vec<(String, Tensor)>>,
    /// Counters, cursor, hash.
    pub state: State,
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `learner` under `root` (`RUN/checkpoints`), points `latest` at it and
/// keeps the newest `keep`; returns its directory.
pub fn save(
    root: &Path,
    learner: &Learner,
    state: &State,
    keep: u32,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(root).map_err(io(root))?;
    let name = dir_name(state.counters.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let meta = HashMap::from([("pso.step".to_string(), state.counters.step.to_string())]);
    tensor_file::write(&tmp.join(TRAINABLE), &learner.trainable(), &meta)?;
    tensor_file::write(
        &tmp.join(OPTIMIZER),
        &learner.optimizer().state_tensors(),
        &meta,
    )?;
    if let Some(ema) = learner.ema() {
        tensor_file::write(&tmp.join(EMA), &ema, &meta)?;
    }
    let json = serde_json::to_vec_pretty(state).expect("the state serializes");
    tensor_file::write_atomically(&tmp.join(STATE), &json)?;
    // The files' directory entries must be durable before the directory is renamed into place.
    sync_dir(&tmp)?;
    let done = root.join(&name);
    if done.exists() {
        fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    fs::rename(&tmp, &done).map_err(io(&done))?;
    sync_dir(root)?;
    tensor_file::write_atomically(&root.join(LATEST), format!("{name}\n").as_bytes())?;
    sync_dir(root)?;
    prune(root, keep)?;
    Ok(done)
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Complete checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn prune(root: &Path, keep: u32) -> Result<(), CheckpointError> {
    let all = list(root)?;
    let excess = all.len().saturating_sub(keep.max(1) as usize);
    for dir in &all[..excess] {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(())
}

/// The checkpoint `latest` names under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let file = root.join(LATEST);
    if !file.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&file).map_err(io(&file))?;
    if name.trim().is_empty() {
        return Err(CheckpointError::Invalid {
            path: file,
            why: "is empty; write the name of one of the step-* directories into it".into(),
        });
    }
    let dir = root.join(name.trim());
    if !dir.is_dir() {
        return Err(CheckpointError::Invalid {
            path: file,
            why: format!(
                "names `{}`, which does not exist; point it at one of the step-* directories",
                name.trim()
            ),
        });
    }
    Ok(Some(dir))
}

/// A checkpoint passed over by [`load_newest`], and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The checkpoint directory (or the `latest` file).
    pub path: PathBuf,
    /// Why it could not be used.
    pub why: String,
}

/// The newest checkpoint under `root` that reads back whole: the one `latest` names, else, when
/// `latest` is missing, empty or names nothing, or that checkpoint is damaged (a truncated
/// file), the newest step-* directory that loads. Returns it with what was passed over; `None`
/// when `root` holds no checkpoint at all.
pub fn load_newest(root: &Path) -> Result<Option<(Loaded, Vec<Skipped>)>, CheckpointError> {
    let mut skipped = Vec::new();
    let mut candidates = list(root)?;
    candidates.reverse();
    match latest(root) {
        Ok(Some(named)) => {
            candidates.retain(|c| c != &named);
            candidates.insert(0, named);
        }
        Ok(None) => {}
        Err(e) => skipped.push(Skipped {
            path: root.join(LATEST),
            why: e.to_string(),
        }),
    }
    if candidates.is_empty() && skipped.is_empty() {
        return Ok(None);
    }
    for dir in candidates {
        match load(&dir) {
            Ok(loaded) => return Ok(Some((loaded, skipped))),
            Err(e) => skipped.push(Skipped {
                path: dir,
                why: e.to_string(),
            }),
        }
    }
    Err(CheckpointError::Invalid {
        path: root.to_owned(),
        why: format!(
            "no checkpoint reads back whole ({}); start the run anew in another directory",
            skipped
                .iter()
                .map(|s| s.why.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    })
}

/// Reads a checkpoint directory.
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let state_path = dir.join(STATE);
    let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: State = serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid {
        path: state_path.clone(),
        why: format!("{e}; the checkpoint is damaged, resume from an older one"),
    })?;
    let ema_path = dir.join(EMA);
    Ok(Loaded {
        dir: dir.to_owned(),
        trainable: tensor_file::read(&dir.join(TRAINABLE))?.tensors,
        optimizer: tensor_file::read(&dir.join(OPTIMIZER))?.tensors,
        ema: if ema_path.exists() {
            Some(tensor_file::read(&ema_path)?.tensors)
        } else {
            None
        },
        state,
    })
}

/// Reads only a checkpoint's trainable (or EMA) tensors, e.g. for export.
pub fn load_trainable(dir: &Path, ema: bool) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let path = dir.join(if ema { EMA } else { TRAINABLE });
    if ema && !path.exists() {
        return Err(CheckpointError::Invalid {
            path: dir.to_owned(),
            why: "has no EMA (learner.ema_decay was 0); export without --ema".into(),
        });
    }
    Ok(tensor_file::read(&path)?.tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LearnerSection, OptimSection};
    use crate::objective::{Diagnostics, Loss};
    use tch::Kind;

    #[test]
    fn save_points_latest_at_the_newest_and_keeps_k() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut learner = Learner::new(
            vec![("w".into(), w.shallow_clone())],
            &OptimSection::default(),
            &LearnerSection::default(),
        );
        let mut state = State {
            pso_version: "test".into(),
            counters: Counters::default(),
            data_cursor: 0,
            config_hash: "h".into(),
            peft: "lora".into(),
            world_size: 1,
        };
        for i in 0..3 {
            learner
                .step(|_| {
                    let loss = w.square().sum(Kind::Float);
                    Ok(Loss {
                        diagnostics: Diagnostics {
                            loss: loss.double_value(&[]),
                            ..Diagnostics::default()
                        },
                        loss,
                    })
                })
                .unwrap();
            state.counters = learner.counters();
            state.data_cursor = i + 1;
            save(&root, &learner, &state, 2).unwrap();
        }
        let names: Vec<String> = list(&root)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-00000002", "step-00000003"]);
        let newest = latest(&root).unwrap().unwrap();
        assert!(newest.ends_with("step-00000003"));
        let back = load(&newest).unwrap();
        assert_eq!(back.state, state);
        assert!(back.trainable[0].1.equal(&w.detach()));
        assert_eq!(back.optimizer.len(), 3);
        fs::write(root.join(LATEST), "step-00000009\n").unwrap();
        let e = latest(&root).unwrap_err().to_string();
        assert!(e.contains("step-00000009"), "{e}");
    }

    /// Two checkpoints under `root`, of steps 1 and 2, `latest` naming step 2.
    fn two_checkpoints(root: &Path) {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut learner = Learner::new(
            vec![("w".into(), w.shallow_clone())],
            &OptimSection::default(),
            &LearnerSection::default(),
        );
        for cursor in 1..=2 {
            learner
                .step(|_| {
                    let loss = w.square().sum(Kind::Float);
                    Ok(Loss {
                        diagnostics: Diagnostics::default(),
                        loss,
                    })
                })
                .unwrap();
            let state = State {
                pso_version: "test".into(),
                counters: learner.counters(),
                data_cursor: cursor,
                config_hash: "h".into(),
                peft: "lora".into(),
                world_size: 1,
            };
            save(root, &learner, &state, 5).unwrap();
        }
    }

    #[test]
    fn resume_falls_back_to_the_newest_checkpoint_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        assert!(load_newest(&root).unwrap().is_none());
        two_checkpoints(&root);
        let (loaded, skipped) = load_newest(&root).unwrap().unwrap();
        assert_eq!((loaded.state.data_cursor, skipped), (2, vec![]));

        // The newest checkpoint truncated (a disk that filled, a copy cut short).
        let newest = root.join(dir_name(2)).join(TRAINABLE);
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let (loaded, skipped) = load_newest(&root).unwrap().unwrap();
        assert_eq!(loaded.state.data_cursor, 1);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].path.ends_with(dir_name(2)), "{skipped:?}");

        // `latest` empty, or naming nothing: the newest directory that loads is used.
        for pointer in ["", "step-00000077\n"] {
            fs::write(root.join(LATEST), pointer).unwrap();
            let (loaded, skipped) = load_newest(&root).unwrap().unwrap();
            assert_eq!(loaded.state.data_cursor, 1);
            assert!(skipped[0].path.ends_with(LATEST), "{skipped:?}");
        }
        fs::remove_file(root.join(LATEST)).unwrap();
        assert_eq!(load_newest(&root).unwrap().unwrap().0.state.data_cursor, 1);

        // Nothing loads: the error lists every reason.
        fs::remove_file(root.join(dir_name(1)).join(STATE)).unwrap();
        let e = load_newest(&root).unwrap_err().to_string();
        assert!(e.contains("no checkpoint reads back whole"), "{e}");
        assert!(e.contains(STATE) && e.contains(TRAINABLE), "{e}");
    }
}
