"""Tiny random FluxPipeline folders and what the pipeline generates from given latents, for
tests/flux_pipeline.rs.

Usage: make_flux_pipeline.py OUTDIR. Writes OUTDIR/schnell (no guidance embedding, static shift 1, as
FLUX.1-schnell) and OUTDIR/dev (guidance embedding, dynamic shift by the image's token count, as
FLUX.1-dev), each a save_pretrained folder (CLIP-L text encoder + tokenizer, T5 + fast tokenizer, a tiny
transformer, 16-channel VAE, scheduler) with io.safetensors: `latents` [3, 16, 12, 12] (unpacked; the
pipeline is given FluxPipeline._pack_latents of them) and the `images` it returns (output_type="pt",
in [0, 1]) for 2 steps at 24 x 24, guidance 3.5, T5 length 12.
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from make_t5 import tiny_t5
from tiny_models import randomize, text_encoder, tokenizer

PROMPTS = ["a red cat", "a photo of a dog on the grass", "a cat and a dog"]


def main():
    out = Path(sys.argv[1])
    _, t5_tokenizer, t5 = tiny_t5(d_model=16)
    for name, guidance, scheduler in (
        ("schnell", False, FlowMatchEulerDiscreteScheduler(shift=1.0)),
        ("dev", True, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=16, max_image_seq_len=64)),
    ):
        torch.manual_seed(0)
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=randomize(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16,
                                        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                                        shift_factor=0.1159, scaling_factor=0.3611), 0.2),
            text_encoder=text_encoder(False),
            tokenizer=tokenizer(out, "<|endoftext|>"),
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=randomize(
                FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)),
                0.05),
        )
        folder = out / name
        pipe.save_pretrained(folder, safe_serialization=True)
        latents = torch.randn(3, 16, 12, 12, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            images = pipe(PROMPTS, height=24, width=24, num_inference_steps=2, guidance_scale=3.5,
                          latents=FluxPipeline._pack_latents(latents, 3, 16, 12, 12), max_sequence_length=12,
                          output_type="pt").images
        save_file({"latents": latents, "images": images.contiguous()}, folder / "io.safetensors")


if __name__ == "__main__":
    main()
