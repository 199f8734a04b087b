//! Prompt sets of online runs: a text file (one prompt per line) or a set shipped with pso
//! (`builtin:NAME`, from `data/prompts/NAME.txt`), read in a seeded order epoch after epoch.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{step_seed, RunError};

/// The prompt sets compiled into the binary.
const BUILTIN: [(&str, &str); 4] = [
    (
        "simple",
        include_str!("../../../../data/prompts/simple.txt"),
    ),
    ("eval", include_str!("../../../../data/prompts/eval.txt")),
    (
        "shapes",
        include_str!("../../../../data/prompts/shapes.txt"),
    ),
    (
        "shapes-eval",
        include_str!("../../../../data/prompts/shapes-eval.txt"),
    ),
];

/// A list of prompts.
#[derive(Debug, Clone)]
pub struct PromptSet {
    /// Where it came from (`builtin:simple`, a path), for messages.
    pub source: String,
    prompts: Vec<String>,
}

impl PromptSet {
    /// Reads `spec`: `builtin:NAME` or a UTF-8 text file; blank lines and lines starting with
    /// `#` are skipped.
    pub fn load(spec: &str) -> Result<PromptSet, RunError> {
        let text = match spec.strip_prefix("builtin:") {
            Some(name) => BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| {
                    let names: Vec<String> = BUILTIN
                        .iter()
                        .map(|(n, _)| format!("builtin:{n}"))
                        .collect();
                    RunError::Config(format!(
                        "prompt set `{spec}` does not exist; the built-in sets are {}",
                        names.join(", ")
                    ))
                })?,
            None => std::fs::read_to_string(Path::new(spec)).map_err(|e| {
                RunError::Config(format!(
                    "cannot read the prompt file {spec}: {e}; give a UTF-8 text file with one \
                     prompt per line, or builtin:simple"
                ))
            })?,
        };
        let prompts: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if prompts.is_empty() {
            return Err(RunError::Config(format!(
                "the prompt set {spec} holds no prompt (blank lines and # comments are skipped)"
            )));
        }
        Ok(PromptSet {
            source: spec.to_owned(),
            prompts,
        })
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether the set is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Prompt `index` (of the file's order).
    pub fn get(&self, index: usize) -> &str {
        &self.prompts[index]
    }
}

/// The prompts of a run as one endless stream: epoch e is every prompt once, shuffled with a
/// seed derived from (run seed, e). Position p of the stream is a pure function of p, so a
/// resumed run needs only its round number to continue where it stopped.
#[derive(Debug)]
pub struct PromptOrder {
    seed: u64,
    len: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl PromptOrder {
    /// The order of a set of `len` prompts under `seed`.
    pub fn new(len: usize, seed: u64) -> PromptOrder {
        PromptOrder {
            seed,
            len,
            epoch: None,
        }
    }

    /// The prompt index at stream position `position`.
    pub fn index_at(&mut self, position: u64) -> usize {
        let epoch = position / self.len as u64;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.len).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(step_seed(
                self.seed,
                epoch,
                u32::MAX - 1,
            )));
            self.epoch = Some((epoch, order));
        }
        let (_, order) = self.epoch.as_ref().expect("set above");
        order[(position % self.len as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_load_and_unknown_ones_are_named() {
        let s = PromptSet::load("builtin:simple").unwrap();
        assert!(s.len() >= 32);
        assert!(PromptSet::load("builtin:eval").unwrap().len() >= 8);
        let e = PromptSet::load("builtin:nope").unwrap_err().to_string();
        assert!(e.contains("builtin:simple, builtin:eval"), "{e}");
    }

    #[test]
    fn files_skip_blank_and_comment_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.txt");
        std::fs::write(&path, "# mine\n\na cat\n  a dog  \n").unwrap();
        let s = PromptSet::load(path.to_str().unwrap()).unwrap();
        assert_eq!((s.len(), s.get(0), s.get(1)), (2, "a cat", "a dog"));
        std::fs::write(&path, "# nothing\n").unwrap();
        let e = PromptSet::load(path.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("holds no prompt"), "{e}");
    }

    #[test]
    fn each_epoch_is_a_permutation_and_positions_are_reproducible() {
        let mut a = PromptOrder::new(10, 7);
        let first: Vec<usize> = (0..10).map(|p| a.index_at(p)).collect();
        let second: Vec<usize> = (10..20).map(|p| a.index_at(p)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first, second);
        let mut b = PromptOrder::new(10, 7);
        assert_eq!(b.index_at(13), second[3]);
        assert_eq!(b.index_at(2), first[2]);
    }
}
