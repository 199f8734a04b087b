"""Header-only model folders of published architectures, for `pso doctor --config` estimates of
models too large to download here (docs/configuration.md, "What fits where").

Usage: header_only_folders.py OUT. Writes OUT/sd35-large, OUT/flux-schnell and OUT/z-image-turbo: model_index.json,
transformer/ and vae/ with each config.json and a diffusion_pytorch_model.safetensors holding the
safetensors header of the bf16 weights (names and shapes from diffusers' classes built on the meta
device) and no data, which is all the estimate reads. Text encoders are left out: the shipped
configs run them on the CPU.
"""
import json
import struct
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel

SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)
FLUX_SCHNELL = dict(attention_head_dim=128, guidance_embeds=False, in_channels=64, joint_attention_dim=4096,
                    num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                    pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
# diffusers' defaults are Z-Image-Turbo's 6B transformer.
Z_IMAGE_TURBO = dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560)
VAE_16 = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
              use_quant_conv=False, use_post_quant_conv=False)


def header_only(model, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        size = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)


def main():
    out = Path(sys.argv[1])
    for name, cls, cfg, pipeline in (("sd35-large", SD3Transformer2DModel, SD35_LARGE, "StableDiffusion3Pipeline"),
                                     ("flux-schnell", FluxTransformer2DModel, FLUX_SCHNELL, "FluxPipeline"),
                                     ("z-image-turbo", ZImageTransformer2DModel, Z_IMAGE_TURBO, "ZImagePipeline")):
        with torch.device("meta"):
            header_only(cls(**cfg), out / name / "transformer")
            header_only(AutoencoderKL(**VAE_16), out / name / "vae")
        (out / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))


if __name__ == "__main__":
    main()
