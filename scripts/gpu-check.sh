#!/usr/bin/env bash
# The GPU proof in one prepared run (bench/gpu/check.py says what it measures; bench/RESULTS.md
# holds the numbers). Its uses:
#
#   scripts/gpu-check.sh prepare    here: builds pso in release, strips it and compresses it into
#                                   .gpu/ (ignored by git, carried to the GPU machine), with the
#                                   wheels the GPU machine lacks (diffusers) in .gpu/wheels/.
#   scripts/gpu-check.sh run        on the GPU machine (PyTorch 2.11.0 installed, no Rust, no
#                                   network), from the repository root with .gpu/ beside it:
#                                   unpacks pso, points it at that PyTorch's libtorch, runs every
#                                   stage under a hard timeout, writes $OUT/results.json,
#                                   $OUT/gpu-check.log and $OUT/doctor.json.
#   scripts/gpu-check.sh --dry-run  here, on the CPU: the same stages on tiny models (fp32), into
#                                   target/gpu-check-dry/; the test suite runs it too.
#   scripts/gpu-check.sh run --dry-run
#                                   `run` from .gpu/ with tiny models on the CPU: rehearses the
#                                   device path (unpacking, wheels, libtorch) where python3 has
#                                   PyTorch (here: PATH=.venv/bin:$PATH OUT=/tmp/x).
#   scripts/gpu-check.sh run --stages=flow   (or --dry-run --stages=flow)
#                                   the flow-matching stages instead: Z-Image-Turbo's 6.15 B
#                                   transformer at 1024² in bf16 (parity, sampling speed, learner
#                                   step with blocks kept and recomputed); one device call of its own.
#
# PSO_GPU_CHECK_SECONDS (default 480) bounds the run's stages; the timeout is a minute above it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
seconds=${PSO_GPU_CHECK_SECONDS:-480}
# Versions the oracle pins (scripts/oracle/requirements.txt); the GPU machine has the rest.
wheels=(diffusers==0.42.1 importlib_metadata==10.2.0)

case "${1:-}" in
prepare)
  scripts/setup.sh
  cargo build --release --locked --bin pso
  mkdir -p .gpu/wheels
  strip -o .gpu/pso target/release/pso
  xz -T0 -6 -f .gpu/pso
  rm -f .gpu/wheels/*.whl
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "${wheels[@]}"
  du -sh .gpu .gpu/* .gpu/wheels/*
  echo "prepared .gpu/: call the device with carry [\".gpu\"] and the command scripts/gpu-check.sh run"
  ;;
run)
  out=${OUT:?OUT must name the folder results go to (the device machine sets it)}
  work=/tmp/pso-gpu-check
  mkdir -p "$work"
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    .gpu/pso.xz "$work/pso"
  chmod +x "$work/pso"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # The binary's rpath names this machine's PyTorch; the GPU machine has its own.
  torch_lib=$(python3 -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent / "lib")')
  export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  "$work/pso" doctor --json > "$out/doctor.json"
  set -o pipefail
  timeout -k 10 $((seconds + 60)) python3 -u bench/gpu/check.py --pso "$work/pso" --out "$out" \
    --work "$work" --budget "$seconds" "${@:2}" 2>&1 | tee "$out/gpu-check.log"
  ;;
--dry-run)
  scripts/setup.sh > /dev/null
  cargo build --locked --bin pso
  out=target/gpu-check-dry
  rm -rf "$out"
  .venv/bin/python -u bench/gpu/check.py --pso target/debug/pso --out "$out" --dry-run --budget 600 "${@:2}"
  echo "results: $out/results.json"
  ;;
*)
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
