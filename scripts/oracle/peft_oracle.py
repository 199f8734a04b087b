"""Oracle for the PEFT tests: tiny pipelines, and diffusers' `load_lora_weights` on a pso export.

  peft_oracle.py make OUT
      writes OUT/sd (tiny SD 2.x-like pipeline, Euler, trailing spacing) and OUT/sdxl (tiny
      SDXL-like pipeline, Euler ancestral).
  peft_oracle.py lora PIPELINE LORA_FILE INPUTS OUT
      loads PIPELINE, applies LORA_FILE with `pipe.load_lora_weights`, runs the UNet on INPUTS
      (`sample`, `timestep`, `encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`) and
      writes its output as `sample` to OUT.
"""
import sys
from pathlib import Path

import torch
from diffusers import (DiffusionPipeline, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)
from safetensors.torch import load_file, save_file

from tiny_models import TRAILING, text_encoder, tokenizer, unet, vae


def make(out: Path):
    torch.manual_seed(1)
    StableDiffusionPipeline(vae=vae(False), text_encoder=text_encoder(False), tokenizer=tokenizer(out, "<|endoftext|>"),
                            unet=unet(attention_head_dim=[2, 4], cross_attention_dim=32),
                            scheduler=EulerDiscreteScheduler(**TRAILING), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out / "sd")
    StableDiffusionXLPipeline(vae=vae(True), text_encoder=text_encoder(False), text_encoder_2=text_encoder(True),
                              tokenizer=tokenizer(out, "<|endoftext|>"), tokenizer_2=tokenizer(out, "!"),
                              unet=unet(attention_head_dim=[2, 4], cross_attention_dim=64,
                                        transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
                              scheduler=EulerAncestralDiscreteScheduler(**TRAILING),
                              force_zeros_for_empty_prompt=True).save_pretrained(out / "sdxl")


def lora(pipeline: str, lora_file: str, inputs: str, out: str):
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(lora_file)
    x = load_file(inputs)
    added = None
    if "text_embeds" in x:
        added = dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    with torch.no_grad():
        sample = pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                           added_cond_kwargs=added).sample
    save_file({"sample": sample.contiguous()}, out)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "lora":
        lora(*sys.argv[2:6])
    else:
        sys.exit(f"unknown command {sys.argv[1]}; see the docstring")
