"""Builds tiny random-weight SD 2.x-like and SDXL-like diffusers pipelines and records what they
generate from fixed initial latents (and, where the sampler draws noise, a seeded CPU generator).

Usage: make_pipeline.py OUTDIR. Writes OUTDIR/<pipeline>/ (a diffusers folder) for each pipeline,
OUTDIR/<case>.safetensors (`latents`: the initial noise as `pso sample --init-noise` reads it;
`images`: uint8 [N, H, W, 3] as output_type="pil" makes them; `final`: the final latents) and
OUTDIR/cases.json describing each case's arguments.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from safetensors.torch import save_file

from tiny_models import TRAILING, text_encoder, tokenizer, unet, vae

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

torch.manual_seed(0)
pipelines = {
    "sd": StableDiffusionPipeline(vae=vae(False), text_encoder=text_encoder(False), tokenizer=tokenizer(out, "<|endoftext|>"),
                                  unet=unet(attention_head_dim=[2, 4], cross_attention_dim=32),
                                  scheduler=EulerDiscreteScheduler(**TRAILING), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False),
    "lcm": StableDiffusionPipeline(vae=vae(False), text_encoder=text_encoder(False), tokenizer=tokenizer(out, "<|endoftext|>"),
                                   unet=unet(attention_head_dim=[2, 4], cross_attention_dim=32, time_cond_proj_dim=16),
                                   scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                                          beta_schedule="scaled_linear"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    "sdxl": StableDiffusionXLPipeline(vae=vae(True), text_encoder=text_encoder(False),
                                      text_encoder_2=text_encoder(True), tokenizer=tokenizer(out, "<|endoftext|>"),
                                      tokenizer_2=tokenizer(out, "!"),
                                      unet=unet(attention_head_dim=[2, 4], cross_attention_dim=64,
                                                transformer_layers_per_block=[1, 2],
                                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                                projection_class_embeddings_input_dim=16 + 6 * 8),
                                      scheduler=EulerAncestralDiscreteScheduler(**TRAILING),
                                      force_zeros_for_empty_prompt=True),
}
for name, pipe in pipelines.items():
    pipe.save_pretrained(out / name)
    pipe.set_progress_bar_config(disable=True)

# (case, pipeline, scheduler override, args)
CASES = [
    ("sd_euler_1", "sd", None, dict(steps=1, guidance=0.0)),
    ("sd_euler_4", "sd", None, dict(steps=4, guidance=0.0, num_images=2)),
    ("sd_euler_cfg", "sd", None, dict(steps=2, guidance=3.0, negative_prompt="blurry")),
    ("sd_euler_a_1", "sd", EulerAncestralDiscreteScheduler, dict(steps=1, guidance=0.0)),
    ("sd_euler_a_4", "sd", EulerAncestralDiscreteScheduler, dict(steps=4, guidance=0.0, seed=7)),
    ("lcm_4", "lcm", None, dict(steps=4, guidance=8.0, seed=3)),
    ("sdxl_euler_a_1", "sdxl", None, dict(steps=1, guidance=0.0)),
    ("sdxl_euler_a_4_cfg", "sdxl", None, dict(steps=4, guidance=2.0, seed=11, height=24, width=40)),
]
index = []
for case, name, scheduler_cls, args in CASES:
    pipe = pipelines[name]
    base_scheduler = pipe.scheduler
    folder = name
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(base_scheduler.config)
        folder = f"{name}_{case}"
        pipe.save_pretrained(out / folder)
    args = {**dict(prompt="a photo of a cat on the moon", seed=0, height=32, width=32, num_images=1), **args}
    latents = torch.randn(args["num_images"], 4, args["height"] // 2, args["width"] // 2,
                          generator=torch.Generator().manual_seed(100 + len(index)))
    common = dict(prompt=args["prompt"], negative_prompt=args.get("negative_prompt"),
                  num_inference_steps=args["steps"], guidance_scale=args["guidance"], height=args["height"],
                  width=args["width"], num_images_per_prompt=args["num_images"])
    results = {}
    for output_type in ["np", "latent"]:
        generator = torch.Generator("cpu").manual_seed(args["seed"])
        with torch.no_grad():
            results[output_type] = pipe(**common, latents=latents.clone(), generator=generator,
                                        output_type=output_type).images
    images = torch.from_numpy((results["np"] * 255).round().astype("uint8"))
    save_file({"latents": latents.contiguous(), "images": images.contiguous(),
               "final": results["latent"].contiguous()}, str(out / f"{case}.safetensors"))
    pipe.scheduler = base_scheduler
    index.append(dict(case=case, folder=folder, **args))
(out / "cases.json").write_text(json.dumps(index, indent=1))
