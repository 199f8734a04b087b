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
step "crates that build without libtorch: pairs, and reward's protocol without its local scorers"
cargo clippy -p reward --lib --no-default-features --locked -- -D warnings
if { cargo tree -p pairs -e normal --locked
     cargo tree -p reward --no-default-features -e normal --locked; } | grep -q 'torch-sys'; then
  echo "pairs or reward (no default features) depends on libtorch" >&2
  exit 1
fi
step "cargo test"
cargo test --workspace --locked
