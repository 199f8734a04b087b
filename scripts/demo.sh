#!/usr/bin/env bash
# The main job on the embedded default: online PSO on the toy model (data/toy, a 32² text-to-image
# model of coloured shapes distilled to 4 LCM steps, made by `pso toy build`) with the
# `pixel:centered` reward, on CPU. It samples pairs from the current model, scores them, stores
# them, learns from them, evaluates on held-out captions every 25 steps, and ends with the report
# and the held-out reward before and after (bench/learning measures what else changes). Then it
# replays the logged pairs offline for a few steps, as one would with a collected dataset.
# About 3 minutes on 2 cores once set up; a first run on a fresh machine also installs PyTorch
# and builds, about 8 minutes in all. PSO_DEMO_STEPS=N changes the number of online steps
# (default 200).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\n== %s\n' "$*"; }
steps=${PSO_DEMO_STEPS:-200}

say "setup"
# The demo needs libtorch only; scripts/test.sh installs the Python test oracle when it runs.
PSO_SKIP_ORACLE=${PSO_SKIP_ORACLE:-1} scripts/setup.sh
say "build (profile demo: unoptimised Rust, a quarter of the release build's time on 2 cores)"
cargo build --profile demo --locked
pso=target/demo/pso
demo=runs/demo
rm -rf "$demo"
mkdir -p "$demo"

say "pso doctor"
$pso doctor

say "the toy model: how it was built and how well it draws its captions (data/toy/build.json)"
.venv/bin/python - <<'PY'
import json
b = json.load(open("data/toy/build.json"))
print(f"seed {b['options']['seed']}, classifier on dataset images: caption accuracy {b['classifier_on_data']['caption']:.3f}")
for r in b["samples"]:
    print(f"  {r['sampler']:28} {r['steps']:>2} steps: caption accuracy {r['accuracy']['caption']:.3f}")
PY

say "pso sample: 4 LCM steps from the toy model"
$pso sample --model data/toy/pipeline --prompt "a large red circle on a blue background" \
  --steps 4 --seed 1 --num-images 4 --out "$demo/samples"

say "pso online: online PSO with LoRA, reward pixel:centered ($steps steps)"
$pso online --config configs/tiny-cpu.toml --out "$demo/online" --max-steps "$steps"

say "pso report"
$pso report "$demo/online"

say "did it learn? (held-out captions, fixed seeds: RUN/eval.jsonl)"
.venv/bin/python - "$demo/online" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
evals = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines() if l.strip()]
key = next(k for k in evals[0] if k.startswith("eval/"))
for e in evals:
    print(f"  step {e['step']:>4}: {key} = {e[key]:.4f}")
first, last = evals[0][key], evals[-1][key]
print(f"reward on held-out captions: {first:.4f} -> {last:.4f} ({'+' if last >= first else ''}{last - first:.4f})")
metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
print(f"training-round reward mean: first 10 steps {sum(m['reward_mean'] for m in metrics[:10]) / 10:.4f}, "
      f"last 10 steps {sum(m['reward_mean'] for m in metrics[-10:]) / 10:.4f}")
PY

say "pso offline: replay the logged pairs with offline PSO (20 steps)"
$pso offline --config configs/tiny-cpu.toml --set objective.kind=offline_pso --set learner.max_steps=20 \
  --pairs "$demo/online/pairs" --out "$demo/offline"
tail -n 1 "$demo/offline/metrics.jsonl"

say "done"
echo "report:     $root/$demo/online/report/index.html"
echo "samples:    $root/$demo/online/samples/step-*.png (held-out captions, fixed seeds)"
echo "pair store: $root/$demo/online/pairs"
