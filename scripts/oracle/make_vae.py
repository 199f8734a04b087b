"""Builds tiny random-weight AutoencoderKL models with diffusers and records their outputs.

Usage: make_vae.py OUTDIR. For each case NAME it writes OUTDIR/NAME/ (a diffusers `vae/` folder:
config.json + safetensors; `sharded` is saved in shards, and an fp16 variant is saved too) and
OUTDIR/NAME/expected.safetensors with the inputs and reference outputs (fp32, CPU).
"""
import copy
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

CASES = {
    "two_level": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
    "sharded": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8, scaling_factor=0.13025),
    # SD3 / FLUX layout: 16 latent channels, no quant convs, latents shifted before scaling.
    "sd3_flux": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
}

out = Path(sys.argv[1])
for name, kwargs in CASES.items():
    torch.manual_seed(0)
    n = len(kwargs["block_out_channels"])
    kwargs = {"latent_channels": 4, **kwargs}
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=32,
        **kwargs,
    ).eval()
    # Random values everywhere (the default init zeroes norms' biases): every weight must matter.
    with torch.no_grad():
        for pname, p in vae.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    folder = out / name
    if name == "sharded":
        vae.save_pretrained(folder, max_shard_size="40KB")
    else:
        vae.save_pretrained(folder)
        copy.deepcopy(vae).half().save_pretrained(folder, variant="fp16")
    scale = 2 ** (n - 1)
    x = torch.rand(2, 3, 8 * scale, 12 * scale) * 2 - 1
    z = torch.randn(2, kwargs["latent_channels"], 8, 12)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        decoded = vae.decode(z).sample
        # What the SD3 / FLUX pipelines decode: latents / scaling_factor + shift_factor.
        shift = vae.config.shift_factor or 0.0
        decoded_scaled = vae.decode(z / vae.config.scaling_factor + shift).sample
    save_file(
        {
            "x": x,
            "z": z,
            "mean": post.mean.contiguous(),
            "logvar": post.logvar.contiguous(),
            "decoded": decoded.contiguous(),
            "decoded_scaled": decoded_scaled.contiguous(),
        },
        str(folder / "expected.safetensors"),
    )
