#!/usr/bin/env bash
# The main job on the embedded default. Until the online loop and the embedded tiny model land,
# this shows the parts that exist: the libtorch the binary runs on, text-to-image sampling
# through a tiny random-weight SD pipeline (equal to diffusers'), and a round trip through the
# durable pair store (import a Pick-a-Pic-layout dataset, inspect, validate, read with pyarrow).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\n== %s\n' "$*"; }

say "setup"
scripts/setup.sh
say "build (release)"
cargo build --release --locked
pso=target/release/pso
demo=runs/demo
rm -rf "$demo"
mkdir -p "$demo"

say "pso doctor"
$pso doctor

say "pso sample on a tiny random-weight SD pipeline (built locally; its images are noise by design)"
.venv/bin/python scripts/oracle/make_pipeline.py "$demo/tiny-pipelines" >"$demo/make_pipeline.log" 2>&1 \
  || { cat "$demo/make_pipeline.log"; exit 1; }
$pso sample --model "$demo/tiny-pipelines/sd" --prompt "a photo of a cat" --steps 4 --seed 1 \
  --num-images 2 --out "$demo/samples"

say "a Pick-a-Pic v2-layout dataset (48 rows, made locally)"
.venv/bin/python scripts/oracle/make_pickapic.py "$demo/pickapic-sample.parquet" 48

say "pso pairs import --format pickapic"
$pso pairs import --format pickapic "$demo/pickapic-sample.parquet" --out "$demo/pairs"

say "pso pairs inspect"
$pso pairs inspect "$demo/pairs"

say "pso pairs validate"
$pso pairs validate "$demo/pairs"

say "read back with pyarrow"
.venv/bin/python - "$demo/pairs" <<'PY'
import sys, pyarrow.parquet as pq, pathlib
files = sorted(str(p) for p in pathlib.Path(sys.argv[1]).glob("*.parquet"))
t = pq.read_table(files, columns=["pair_id", "prompt", "label", "score_0", "score_1"])
print(t.slice(0, 5).to_pandas().to_string(index=False))
print(f"{t.num_rows} pairs in {len(files)} shard(s)")
PY

say "done"
echo "samples:    $root/$demo/samples"
echo "pair store: $root/$demo/pairs"
