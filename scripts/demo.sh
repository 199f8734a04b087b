#!/usr/bin/env bash
# The main job on the embedded default. Until the online loop and the embedded tiny model land,
# this shows the parts that exist: the libtorch the binary runs on, text-to-image sampling
# through a tiny random-weight SD pipeline (equal to diffusers'), and a round trip through the
# durable pair store (import a Pick-a-Pic-layout dataset, inspect, validate, read with pyarrow),
# and offline PSO with LoRA on those pairs (train, resume, export, sample with the adapter).
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

say "pso offline: offline PSO with LoRA on the imported pairs (20 steps, then resumed to 30)"
cat >"$demo/offline.toml" <<EOF
[run]
name = "offline"
[model]
id = "$demo/tiny-pipelines/sd"
device = "cpu"
[sampler]
name = "euler"
steps = 4
height = 32
width = 32
[objective]
kind = "offline_pso"
[peft]
kind = "lora"
rank = 4
alpha = 4.0
[optim]
lr = 1e-4
[learner]
batch_size = 2
max_steps = 20
checkpoint_every = 10
EOF
$pso offline --config "$demo/offline.toml" --pairs "$demo/pairs" --out "$demo/offline"
$pso offline --config "$demo/offline.toml" --pairs "$demo/pairs" --out "$demo/offline" \
  --max-steps 30 --resume
echo "last metrics line:"
tail -n 1 "$demo/offline/metrics.jsonl"

say "pso export (diffusers LoRA) and pso sample --adapter"
$pso export --run "$demo/offline" --format diffusers-lora --out "$demo/offline/lora.safetensors"
$pso sample --model "$demo/tiny-pipelines/sd" --adapter "$demo/offline/lora.safetensors" \
  --prompt "a photo of a cat" --steps 4 --seed 1 --num-images 2 --out "$demo/samples-lora"

say "done"
echo "samples:    $root/$demo/samples (base), $root/$demo/samples-lora (with the trained LoRA)"
echo "pair store: $root/$demo/pairs"
echo "run:        $root/$demo/offline (config.toml, metrics.jsonl, checkpoints/)"
