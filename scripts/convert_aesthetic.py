"""Converts a LAION improved-aesthetic-predictor checkpoint (.pth state dict) to safetensors.

Usage: convert_aesthetic.py IN.pth OUT.safetensors. The checkpoint (e.g. sac+logos+ava1-l14-linearMSE.pth)
holds `layers.{0,2,4,6,7}.{weight,bias}`: Linear(768,1024), Dropout, Linear(1024,128), Dropout,
Linear(128,64), Dropout, Linear(64,16), Linear(16,1). Put OUT next to the CLIP ViT-L/14 model files as
`aesthetic.safetensors` for `pso score --scorer aesthetic --model DIR`.
"""
import sys

import torch
from safetensors.torch import save_file

EXPECTED = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]

src, dst = sys.argv[1], sys.argv[2]
state = torch.load(src, map_location="cpu", weights_only=True)
if "state_dict" in state:
    state = state["state_dict"]
missing = [k for k in EXPECTED if k not in state]
if missing:
    sys.exit(f"{src}: not an aesthetic-predictor state dict, missing {missing}; found {sorted(state)[:10]}")
save_file({k: state[k].float().contiguous() for k in EXPECTED}, dst)
print(f"wrote {dst}: " + ", ".join(f"{k} {tuple(state[k].shape)}" for k in EXPECTED))
