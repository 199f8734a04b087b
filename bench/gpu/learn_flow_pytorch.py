"""The PyTorch side of the GPU proof's flow-model learner step (bench/gpu/check.py, stage flow_learn):
one online-PSO optimizer step as `pso bench learn` runs it on a Z-Image folder, written with diffusers
+ peft + torch.optim.AdamW.

LoRA r32 (alpha 32) on to_q/to_k/to_v/to_out.0 over the frozen transformer in DTYPE (adapters in fp32,
as peft keeps them); every stochastic transition of a STEPS-step re-noise trajectory (all but the last,
deterministic one) is one micro-batch: the Gaussian log-likelihood of x_{i+1} given x_i, mean
(1 - s') (x - s v) and std s', under the policy and under the reference (adapters disabled, no grad),
the clamped log-ratio, the PSO loss (beta 50), backward; then grad-norm clipping and AdamW. With
RECOMPUTE 1 the transformer recomputes its blocks in the backward pass (diffusers' gradient
checkpointing, what pso's learner.recompute_blocks does by hand). Winner and loser trajectories are
random latents; the prompt is encoded outside the timing (as pso prepares it before the step).

Usage: learn_flow_pytorch.py PIPELINE DEVICE DTYPE SIZE PAIRS STEPS RECOMPUTE REPEATS. Prints JSON: the
median seconds per step (after one warm-up), trainable parameters, peak allocated GPU memory in MiB.
"""
import sys
from pathlib import Path

import torch
from diffusers import ZImagePipeline
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_step import pso_step, report  # noqa: E402

folder, device, dtype_name, size, pairs, steps, recompute, repeats = sys.argv[1:9]
size, pairs, steps, repeats = int(size), int(pairs), int(steps), int(repeats)
dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
torch.manual_seed(0)
pipe = ZImagePipeline.from_pretrained(folder, dtype=dtype).to(device)
with torch.no_grad():
    caption = pipe._encode_prompt(["a photo of a cat"], device=device, max_sequence_length=512)[0]
model = pipe.transformer
model.requires_grad_(False)
if recompute == "1":
    model.enable_gradient_checkpointing()
model.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in model.parameters() if p.requires_grad]
for p in params:
    p.data = p.data.float()
opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
# ZImagePipeline's sigmas linspace(1, 1/n, n), shifted by the folder's scheduler, then 0.
pipe.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), device=device)
sigmas = pipe.scheduler.sigmas.double().tolist()
side = 2 * (size // 16)
winner = torch.randn(steps + 1, pairs, 16, side, side, device=device)
loser = torch.randn(steps + 1, pairs, 16, side, side, device=device)


def velocity(x, sigma):
    rows = model(list(x.to(dtype).unsqueeze(2).unbind(0)), torch.full((x.shape[0],), 1.0 - sigma, device=device),
                 [caption] * x.shape[0], return_dict=False)[0]
    return -torch.stack(rows).squeeze(2).float()


def log_prob(x, x_next, i):
    s, s_next = sigmas[i], sigmas[i + 1]
    mean = (1 - s_next) * (x - s * velocity(x, s))
    return -((x_next - mean) ** 2).sum(dim=[1, 2, 3]) / (2 * s_next ** 2)


stochastic = [i for i in range(steps) if sigmas[i + 1] > 0]

report(lambda: pso_step(model, params, opt, winner, loser, stochastic, log_prob), params, device, repeats)
