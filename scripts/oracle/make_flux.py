"""Tiny random diffusers FluxTransformer2DModels and their outputs, for tests/flux_parity.rs.

Usage: make_flux.py OUTDIR. For each variant (schnell: no guidance embedding; dev: with one) writes
OUTDIR/<variant>/ (config.json + diffusion_pytorch_model.safetensors) and OUTDIR/<variant>/io.safetensors
(also a latent [2, 4, 8, 12] and FluxPipeline._pack_latents of it)
with the inputs — packed tokens [2, 24, 16] of a 4 x 6 token grid, T5 tokens [2, 5, 24], pooled [2, 12],
timestep (sigma) [2], guidance [2] (dev), img_ids [24, 3] as FluxPipeline._prepare_latent_image_ids
makes them, txt_ids zeros [5, 3] — and the output `sample`, fp32 on the CPU.
"""
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

BASE = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 2, 4),
)


def main():
    out = Path(sys.argv[1])
    for name, guidance in (("schnell", False), ("dev", True)):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**BASE, guidance_embeds=guidance).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        inputs = {
            "tokens": torch.randn(2, 24, 16, generator=g),
            "context": torch.randn(2, 5, 24, generator=g),
            "pooled": torch.randn(2, 12, generator=g),
            "timestep": torch.tensor([1.0, 0.25]),
            "img_ids": FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
            "txt_ids": torch.zeros(5, 3),
        }
        if guidance:
            inputs["guidance"] = torch.tensor([3.5, 3.5])
        # The pipeline's packing of a [2, 4, 8, 12] latent (16 channels would be real; 4 keep it small).
        latent = torch.randn(2, 4, 8, 12, generator=g)
        inputs["latent"] = latent
        inputs["packed"] = FluxPipeline._pack_latents(latent, 2, 4, 8, 12)
        with torch.no_grad():
            sample = model(
                hidden_states=inputs["tokens"],
                encoder_hidden_states=inputs["context"],
                pooled_projections=inputs["pooled"],
                timestep=inputs["timestep"],
                img_ids=inputs["img_ids"],
                txt_ids=inputs["txt_ids"],
                guidance=inputs.get("guidance"),
            ).sample
        save_file({**inputs, "sample": sample.contiguous()}, folder / "io.safetensors")


if __name__ == "__main__":
    main()
