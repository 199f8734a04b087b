#!/usr/bin/env bash
# Installs what pso needs to build, run and test, and nothing that is already there.
#
#  - PyTorch 2.11.0 from PyPI (libtorch for tch) and the Python test oracle, in a virtual
#    environment kept in a per-user cache keyed by versions, so fresh clones reuse it;
#  - .venv in this checkout, a link to that environment;
#  - .cargo/config.toml, so plain `cargo build` / `cargo test` find libtorch.
#
# Environment: PSO_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/pso), PYTHON (default python3),
# PSO_SKIP_ORACLE=1 to install libtorch only (no diffusers/transformers: no parity tests).
set -euo pipefail

TORCH_VERSION=2.11.0
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
cache=${PSO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pso}
say() { printf '[setup] %s\n' "$*"; }

command -v "$python" >/dev/null || { echo "[setup] error: $python not found; install Python 3.10-3.13 or set PYTHON" >&2; exit 1; }
command -v cargo >/dev/null || { echo "[setup] error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
venv="$cache/venv-torch-$TORCH_VERSION-py$pyver"
mkdir -p "$cache"

# One setup at a time per cache (CI and a developer may share it).
exec 9>"$cache/.setup.lock"
flock 9

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "PyTorch $TORCH_VERSION already in $venv"
else
  say "creating $venv and installing torch==$TORCH_VERSION from PyPI (about 4.6 GB, a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install "torch==$TORCH_VERSION"
fi

# Headers only (about 7 MB): the CUDA runtime's crt/ and CCCL's nv/target, which c10d's
# ProcessGroupNCCL.hpp includes and the torch wheel's own CUDA packages leave out. With them
# crates/dist builds its NCCL process group; without them it builds Gloo only.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$site/nvidia/cu13/include/crt/host_config.h" ] && [ -f "$site/nvidia/cu13/include/nv/target" ]; then
  say "CUDA headers for NCCL already in $venv"
else
  say "installing the CUDA headers c10d's NCCL process group needs (nvidia-cuda-crt, nvidia-cuda-cccl)"
  "$venv/bin/python" -m pip install -q --no-deps "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi

req="$root/scripts/oracle/requirements.txt"
stamp="$venv/.pso-oracle-$(sha256sum "$req" | cut -c1-16)"
if [ "${PSO_SKIP_ORACLE:-0}" = 1 ]; then
  say "PSO_SKIP_ORACLE=1: not installing the Python test oracle"
elif [ -f "$stamp" ]; then
  say "Python test oracle already installed ($(basename "$stamp"))"
else
  say "installing the Python test oracle from $req"
  "$venv/bin/python" -m pip install -q -r "$req"
  touch "$stamp"
fi

if [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then
  if [ -e .venv ] && [ ! -L .venv ]; then
    echo "[setup] error: .venv exists and is not a link made by setup; move it away and run again" >&2
    exit 1
  fi
  ln -sfn "$venv" .venv
  say "linked .venv -> $venv"
fi

torch_dir=$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
cxx11=$("$venv/bin/python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
mkdir -p .cargo
config=$(cat <<CFG
# Written by scripts/setup.sh; rerun it rather than editing.
[env]
LIBTORCH = "$torch_dir"
LIBTORCH_CXX11_ABI = "$cxx11"
PSO_PYTHON = "$venv/bin/python"
CFG
)
if [ "$(cat .cargo/config.toml 2>/dev/null)" != "$config" ]; then
  printf '%s\n' "$config" > .cargo/config.toml
  say "wrote .cargo/config.toml (LIBTORCH=$torch_dir)"
else
  say ".cargo/config.toml is up to date"
fi
say "done: cargo build --release && target/release/pso doctor"
