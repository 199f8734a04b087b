"""Tiny random diffusers SD3Transformer2DModels and their outputs, for tests/sd3_parity.rs.

Usage: make_sd3.py OUTDIR. For each variant (sd3: no qk norm; sd35: RMS qk norm and SD3.5's dual
attention in block 0) writes OUTDIR/<variant>/ (config.json + diffusion_pytorch_model.safetensors,
as save_pretrained lays out a transformer/ folder) and OUTDIR/<variant>/io.safetensors with the
inputs (latents [2, 16, 8, 12], a non-square grid smaller than the stored positions; context;
pooled; timestep) and the output `sample`, fp32 on the CPU.
"""
import sys
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=20,
    out_channels=16,
    pos_embed_max_size=10,
)
VARIANTS = {
    "sd3": {},
    "sd35": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
}


def main():
    out = Path(sys.argv[1])
    for name, extra in VARIANTS.items():
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**BASE, **extra).eval()
        with torch.no_grad():
            # adaLN-Zero starts at zero and norms at one: move every parameter so each counts.
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        inputs = {
            "latents": torch.randn(2, 16, 8, 12, generator=g),
            "context": torch.randn(2, 7, 24, generator=g),
            "pooled": torch.randn(2, 20, generator=g),
            "timestep": torch.tensor([999.0, 250.5]),
        }
        with torch.no_grad():
            sample = model(
                hidden_states=inputs["latents"],
                encoder_hidden_states=inputs["context"],
                pooled_projections=inputs["pooled"],
                timestep=inputs["timestep"],
            ).sample
        save_file({**inputs, "sample": sample.contiguous()}, folder / "io.safetensors")


if __name__ == "__main__":
    main()
