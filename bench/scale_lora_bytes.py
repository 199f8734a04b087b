"""Gradient bytes a data-parallel step all-reduces for LoRA on the real UNets (bench/scale).

Builds each UNet of bench/gpu/architectures.json on PyTorch's meta device (shapes only, no
memory, no weights) and counts the LoRA parameters pso trains on its default targets (to_q,
to_k, to_v, to_out.0 of every attention): r · (in + out) per Linear. Prints JSON lines.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_params(unet, rank):
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            total += rank * (module.in_features + module.out_features)
    return total


def main():
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    archs = json.loads((Path(__file__).parent / "gpu/architectures.json").read_text())
    for model in ("sd-turbo", "sdxl-turbo"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(archs[model]["unet"])
        params = lora_params(unet, rank)
        print(json.dumps({"model": model, "rank": rank, "params": params}))


if __name__ == "__main__":
    main()
