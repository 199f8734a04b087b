"""Builds tiny random-weight DiTTransformer2DModels with diffusers and records their outputs.

Usage: make_dit.py OUTDIR. Writes OUTDIR/dit/ and OUTDIR/dit_p4/ (diffusers `transformer/`
folders) and OUTDIR/dit_cases.safetensors with, per case NAME, the inputs `NAME.sample`,
`NAME.timestep`, `NAME.class_labels` and diffusers' `NAME.output` (fp32, CPU).

- `dit`: DiT's layout (learned sigma: 8 output channels, biased attention, tanh GELU, norms
  without affine parameters) run at its own sample size; the class labels include the null
  class (`num_embeds_ada_norm`) that classifier-free guidance uses.
- `dit_p4`: patch size 4, exact GELU, affine norm3, no q/k/v bias, run on latents twice its
  sample size with the positional embedding's interpolation scale set to 2 (the positions the
  256 → 512 transfer uses); the config cannot say this, so the test sets `pe_interpolation`.

Also `pos_embed`: diffusers' `get_2d_sincos_pos_embed` on a non-square 3 × 5 grid (dim 16, base
size 4, interpolation scale 2), which checks which half of the channels encodes which axis.
"""
import sys
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import save_file


def randomize(model, scale):
    """Random values everywhere, including what diffusers zero-initialises (the adaLN-Zero
    modulation and the output projection), so every weight matters. Only LayerNorm scales stay
    near 1: matching on names as tiny_models.randomize does would also catch `norm1.linear`
    and `norm1.emb.*`, which are modulation and embedding layers, not norms."""
    with torch.no_grad():
        norm_scales = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        for name, p in model.named_parameters():
            if name in norm_scales:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


COMMON = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, num_embeds_ada_norm=10)
CASES = {
    "dit": dict(config=dict(sample_size=8, patch_size=2, out_channels=8), size=8, interpolation=None),
    "dit_p4": dict(
        config=dict(sample_size=8, patch_size=4, activation_fn="gelu", norm_elementwise_affine=True,
                    attention_bias=False),
        size=16,
        interpolation=2.0,
    ),
}


def main(out: Path):
    cases = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        model = randomize(DiTTransformer2DModel(**COMMON, **case["config"]), 0.2)
        model.save_pretrained(out / name)
        if case["interpolation"] is not None:
            # Read by PatchEmbed.forward when the token grid differs from the configured one.
            model.pos_embed.interpolation_scale = case["interpolation"]
        size = case["size"]
        inputs = {
            "sample": torch.randn(3, 4, size, size),
            "timestep": torch.tensor([999.0, 10.0, 500.0]),
            "class_labels": torch.tensor([3, 10, 7]),
        }
        with torch.no_grad():
            inputs["output"] = model(inputs["sample"], inputs["timestep"], inputs["class_labels"]).sample
        cases.update({f"{name}.{k}": v.contiguous() for k, v in inputs.items()})
    cases["pos_embed"] = get_2d_sincos_pos_embed(16, (3, 5), base_size=4, interpolation_scale=2.0).float()
    save_file(cases, str(out / "dit_cases.safetensors"))


# Other oracles import `randomize`; only a run as a script writes files.
if __name__ == "__main__":
    main(Path(sys.argv[1]))
