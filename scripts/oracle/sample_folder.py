"""Samples a diffusers StableDiffusionPipeline folder (e.g. the toy model, data/toy/pipeline) the
way diffusers does, from fixed initial latents and a seeded CPU generator, in fp32.

Usage: sample_folder.py FOLDER OUTDIR PROMPT... Writes OUTDIR/<case>.safetensors (`latents`: the
initial noise as `pso sample --init-noise` reads it; `images`: uint8 [1, H, W, 3]) for 1, 2 and 4
steps of the folder's own scheduler per prompt, and OUTDIR/cases.json with each case's arguments.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

folder, out, prompts = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
out.mkdir(parents=True, exist_ok=True)
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
side = pipe.unet.config.sample_size * pipe.vae_scale_factor
cases = []
for p, prompt in enumerate(prompts):
    for steps in [1, 2, 4]:
        case = f"p{p}_s{steps}"
        seed = 10 * p + steps
        latents = torch.randn(1, pipe.unet.config.in_channels, side // pipe.vae_scale_factor,
                              side // pipe.vae_scale_factor, generator=torch.Generator().manual_seed(1000 + seed))
        with torch.no_grad():
            images = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=0.0, height=side, width=side,
                          latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(seed),
                          output_type="np").images
        images = torch.from_numpy((images * 255).round().astype("uint8"))
        save_file({"latents": latents.contiguous(), "images": images.contiguous()}, str(out / f"{case}.safetensors"))
        cases.append(dict(case=case, prompt=prompt, steps=steps, seed=seed, side=side))
(out / "cases.json").write_text(json.dumps(cases, indent=1))
