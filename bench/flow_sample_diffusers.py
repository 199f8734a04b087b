"""Builds small random-weight SD3-like, FLUX-like and Z-Image-like pipelines for bench/flow_sample.rs and
times diffusers on them (fp32, CPU). Usage: flow_sample_diffusers.py OUTDIR CASES_JSON, CASES_JSON a list of
[steps, batch]. Writes OUTDIR/{sd3,flux,zimage} (save_pretrained folders) and
OUTDIR/latents-{sd3,flux,zimage}-B.safetensors (the latents both sides start from) and prints
{"sd3": {"S,B": images/s}, "flux": {...}, "zimage": {...}}: best of 3 after a warm-up, prompt encoding,
sampling and decoding to 8-bit images included.
"""
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, ZImagePipeline, ZImageTransformer2DModel)
from transformers import Qwen3Config, Qwen3Model
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "oracle"))
from make_t5 import tiny_t5  # noqa: E402
from make_z_image import tiny_tokenizer  # noqa: E402
from tiny_models import randomize, text_encoder, tokenizer  # noqa: E402

SIZE = 128  # pixels; the VAE below downsamples by 4, so 32 x 32 latents


def vae():
    return randomize(AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=16, norm_num_groups=8,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                   scaling_factor=1.5305), 0.2)


def build(out: Path) -> dict:
    """The three pipelines, saved under OUT/sd3, OUT/flux and OUT/zimage (also used by bench/flow_learn)."""
    _, t5_tok, t5 = tiny_t5(d_model=128)
    qwen_tok, qwen_fast = tiny_tokenizer()
    torch.manual_seed(0)
    pipes = {
        "sd3": StableDiffusion3Pipeline(
            tokenizer=tokenizer(out, "<|endoftext|>"), tokenizer_2=tokenizer(out, "!"),
            text_encoder=text_encoder(True), text_encoder_2=text_encoder(True), tokenizer_3=t5_tok, text_encoder_3=t5,
            transformer=randomize(SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=4,
                                                        attention_head_dim=32, num_attention_heads=4,
                                                        joint_attention_dim=128, caption_projection_dim=128,
                                                        pooled_projection_dim=32, out_channels=16,
                                                        pos_embed_max_size=32), 0.02),
            vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)),
        "flux": FluxPipeline(
            tokenizer=tokenizer(out, "<|endoftext|>"), text_encoder=text_encoder(False), tokenizer_2=t5_tok,
            text_encoder_2=t5,
            transformer=randomize(FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2,
                                                         num_single_layers=4, attention_head_dim=32,
                                                         num_attention_heads=4, joint_attention_dim=128,
                                                         pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)), 0.02),
            vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)),
        "zimage": ZImagePipeline(
            tokenizer=qwen_fast,
            text_encoder=randomize(Qwen3Model(Qwen3Config(
                vocab_size=qwen_tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rope_theta=1000000.0)), 0.02),
            transformer=randomize(ZImageTransformer2DModel(in_channels=16, dim=128, n_layers=4, n_refiner_layers=1,
                                                           n_heads=4, n_kv_heads=4, cap_feat_dim=128,
                                                           axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]), 0.02),
            vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)),
    }
    for name, pipe in pipes.items():
        pipe.save_pretrained(out / name, safe_serialization=True)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def main():
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(2)
    pipes = build(out)
    result = {}
    for name, pipe in pipes.items():
        rates = {}
        for steps, batch in cases:
            latents = torch.randn(batch, 16, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(batch))
            save_file({"latents": latents}, out / f"latents-{name}-{batch}.safetensors")
            given = (FluxPipeline._pack_latents(latents, batch, 16, SIZE // 4, SIZE // 4) if name == "flux"
                     else latents)

            def run():
                with torch.no_grad():
                    pipe("a photo of a cat", num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=0.0, height=SIZE,
                         width=SIZE, latents=given.clone(), max_sequence_length=32, output_type="pil")

            run()
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t)
            rates[f"{steps},{batch}"] = batch / best
        result[name] = rates
    print(json.dumps(result))


if __name__ == "__main__":
    main()
