"""Tiny random StableDiffusion3Pipeline folders and what `encode_prompt` makes of three prompts, for
tests/sd3_prompt.rs.

Usage: make_sd3_text.py OUTDIR. Writes OUTDIR/with_t5 (CLIP-L, CLIP-G, T5 and their tokenizers, a tiny
transformer, VAE and flow-matching scheduler, as save_pretrained lays out an SD3 folder) and
OUTDIR/no_t5 (the same without text_encoder_3 / tokenizer_3, which SD3 allows), each with
io.safetensors: `embeds` and `pooled` from `pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
max_sequence_length=12)`, and a generation: `latents` [3, 16, 12, 12] given to the pipeline and the
`images` it returns (output_type="pt", in [0, 1]) for 2 steps at 24 x 24, guidance 0 (with_t5) or 3 with
the empty negative prompt (no_t5).
"""
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from make_t5 import tiny_t5
from tiny_models import randomize, text_encoder, tokenizer

PROMPTS = ["a red cat", "a photo of a dog on the grass", "a cat and a dog"]
T5_WIDTH = 80  # wider than the two CLIPs' 32 + 32: their states are zero-padded to it


def main():
    out = Path(sys.argv[1])
    _, t5_tokenizer, t5 = tiny_t5(d_model=T5_WIDTH)
    torch.manual_seed(0)
    parts = dict(
        tokenizer=tokenizer(out, "<|endoftext|>"),
        tokenizer_2=tokenizer(out, "!"),
        text_encoder=text_encoder(True),
        text_encoder_2=text_encoder(True),
        transformer=randomize(
            SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8), 0.05),
        vae=randomize(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4,
                                    use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                    scaling_factor=1.5305), 0.2),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    for name, (tok3, enc3) in {"with_t5": (t5_tokenizer, t5), "no_t5": (None, None)}.items():
        pipe = StableDiffusion3Pipeline(**parts, tokenizer_3=tok3, text_encoder_3=enc3)
        folder = out / name
        pipe.save_pretrained(folder, safe_serialization=True)
        latents = torch.randn(3, 16, 12, 12, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=12
            )
            images = pipe(PROMPTS, height=24, width=24, num_inference_steps=2,
                          guidance_scale=0.0 if name == "with_t5" else 3.0, latents=latents.clone(),
                          max_sequence_length=12, output_type="pt").images
        save_file(
            {"embeds": embeds.contiguous(), "pooled": pooled.contiguous(), "latents": latents,
             "images": images.contiguous()},
            folder / "io.safetensors",
        )


if __name__ == "__main__":
    main()
