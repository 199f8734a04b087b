#!/usr/bin/env bash
# Runs every test of pso on this machine: sets up what is missing (scripts/setup.sh), then
# formatting, lints, and the cargo tests (unit, integration, and those that compare with the
# Python oracle in .venv). CPU only; needs no GPU and no network beyond the package registries.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
step() { printf '\n== %s\n' "$*"; }

# One build, no incremental caches: they would double the target folder on CI's disk.
export CARGO_INCREMENTAL=0

step "setup"
scripts/setup.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test"
cargo test --workspace --locked
