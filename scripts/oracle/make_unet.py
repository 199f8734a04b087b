"""Builds tiny random-weight UNet2DConditionModels with diffusers and records their outputs.

Usage: make_unet.py OUTDIR. Each case NAME becomes OUTDIR/NAME/ (a diffusers `unet/` folder)
plus OUTDIR/NAME/expected.safetensors holding the inputs and the reference output (fp32, CPU).
The cases cover SD 1.x (conv projections, head count as `attention_head_dim`), SD 2.x (linear
projections, per-block heads, a latent size that is not a multiple of 4), SDXL (`text_time`
added conditioning, DownBlock2D first, deeper transformers) and LCM (`time_cond_proj_dim`).
"""
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

COMMON = dict(in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=24)
CASES = {
    "sd1": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=2,
        sample=(2, 16, 16),
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        sample=(2, 10, 14),
    ),
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        sample=(2, 16, 12),
    ),
    "lcm": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        time_cond_proj_dim=16,
        sample=(1, 8, 8),
    ),
}

out = Path(sys.argv[1])
for name, kwargs in CASES.items():
    torch.manual_seed(0)
    batch, h, w = kwargs.pop("sample")
    unet = UNet2DConditionModel(sample_size=16, **COMMON, **kwargs).eval()
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    folder = out / name
    unet.save_pretrained(folder)
    inputs = {
        "sample": torch.randn(batch, 4, h, w),
        "timestep": torch.tensor([999.0, 249.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 7, 24),
    }
    kw = {}
    if name == "sdxl":
        inputs["text_embeds"] = torch.randn(batch, 16)
        inputs["time_ids"] = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0], [1024.0, 768.0, 16.0, 8.0, 1024.0, 1024.0]])
        kw["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    if name == "lcm":
        inputs["timestep_cond"] = torch.randn(batch, 16)
        kw["timestep_cond"] = inputs["timestep_cond"]
    with torch.no_grad():
        output = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], **kw).sample
    inputs["output"] = output
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "expected.safetensors"))
