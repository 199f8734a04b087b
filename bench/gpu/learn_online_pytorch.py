"""The PyTorch side of the GPU proof's learner step (bench/gpu/check.py): one online-PSO optimizer
step as `pso bench learn` runs it, written with diffusers + peft + torch.optim.AdamW.

LoRA r32 (alpha 32) on to_q/to_k/to_v/to_out.0 over a frozen UNet in DTYPE (adapters in fp32, as
peft keeps them); every stochastic transition of a 4-step Euler-ancestral trajectory is one
micro-batch: the Gaussian log-likelihood of x_{i+1} given x_i under the policy and under the
reference (adapters disabled, no grad), the clamped log-ratio, the PSO loss (β 50), backward;
then grad-norm clipping and AdamW. Winner and loser trajectories are random latents, prompts are
encoded outside the timing (as pso prepares them before the step).

Usage: learn_online_pytorch.py PIPELINE DEVICE DTYPE SIZE PAIRS REPEATS. Prints JSON: the median
seconds per step (after one warm-up), trainable parameters, peak allocated GPU memory in MiB.
"""
import sys
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_step import pso_step, report  # noqa: E402

folder, device, dtype_name, size, pairs, repeats = sys.argv[1:7]
size, pairs, repeats = int(size), int(pairs), int(repeats)
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", dtype=dtype).to(device)
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
for p in params:
    p.data = p.data.float()
opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
scheduler = EulerAncestralDiscreteScheduler.from_pretrained(Path(folder) / "scheduler")
scheduler.set_timesteps(4)
sigmas = scheduler.sigmas.double().tolist()
timesteps = scheduler.timesteps.to(device)
side = size // 8
steps = len(timesteps)
winner = torch.randn(steps + 1, pairs, 4, side, side, device=device)
loser = torch.randn(steps + 1, pairs, 4, side, side, device=device)
cond = torch.randn(2 * pairs, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)


def kernel(i):
    """Mean scale terms and std of the Euler-ancestral transition i → i+1."""
    s, s_next = sigmas[i], sigmas[i + 1]
    up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
    down = (s_next ** 2 - up ** 2) ** 0.5
    return s, down, up


def log_prob(x, x_next, i):
    s, down, up = kernel(i)
    inp = (x / (s ** 2 + 1) ** 0.5).to(dtype)
    noise = unet(inp, timesteps[i].expand(x.shape[0]), encoder_hidden_states=cond).sample.float()
    mean = x + noise * (down - s)
    return -((x_next - mean) ** 2).sum(dim=[1, 2, 3]) / (2 * up ** 2)


stochastic = [i for i in range(steps) if kernel(i)[2] > 0]

report(lambda: pso_step(unet, params, opt, winner, loser, stochastic, log_prob), params, device, repeats)
