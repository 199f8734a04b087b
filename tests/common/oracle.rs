//! The Python test oracle (diffusers, transformers, peft, pyarrow in .venv) run from Rust tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root: the nearest folder above this crate that holds scripts/oracle.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join("scripts/oracle").is_dir())
        .expect("tests run inside the pso workspace")
        .to_path_buf()
}

/// The Python of the test oracle (installed by scripts/setup.sh).
pub fn python() -> PathBuf {
    std::env::var_os("PSO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// Runs an oracle script and returns its stdout; fails the test with its stderr otherwise.
pub fn oracle(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let py = python();
    let path = workspace_root().join("scripts/oracle").join(script);
    let out = Command::new(&py)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
    assert!(
        out.status.success(),
        "{} {} failed:\n{}",
        py.display(),
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
