"""PyTorch side of `bench/learn`: the offline-PSO learner step pso runs (LoRA on to_q/to_k/to_v/to_out.0,
reference = adapters off, Diffusion-DPO loss at a distilled timestep, backward, clip_grad_norm_, AdamW),
written the way the official scripts write it with diffusers + peft.

Usage: learn_pytorch.py OUTDIR CASES_JSON STEPS. Builds the tiny pipeline OUTDIR/sd (scripts/oracle/
peft_oracle.py make) for the Rust side to load, then prints JSON: per case [pairs, latent side] the
median seconds per step and this process's peak RSS in MiB.
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "oracle"))
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

import peft_oracle  # noqa: E402

out = Path(sys.argv[1])
cases = json.loads(sys.argv[2])
steps = int(sys.argv[3])
torch.set_num_threads(2)
peft_oracle.make(out)

unet = UNet2DConditionModel.from_pretrained(out / "sd" / "unet")
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
for p in params:
    p.data = p.data.float()
opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-6, eps=1e-8)
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()
distilled = torch.tensor([999, 749, 499, 249])
beta_dpo = 5000.0

results = {}
for pairs, side in cases:
    gen = torch.Generator().manual_seed(0)
    x0_w = torch.randn(pairs, 4, side, side, generator=gen)
    x0_l = torch.randn(pairs, 4, side, side, generator=gen)
    ehs = torch.randn(pairs, 77, 32, generator=gen)

    def step():
        noise = torch.randn_like(x0_w)
        t = distilled[torch.randint(0, 4, (pairs,))]
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x = torch.cat([a.sqrt() * x0_w + (1 - a).sqrt() * noise, a.sqrt() * x0_l + (1 - a).sqrt() * noise])
        tt = torch.cat([t, t])
        cond = torch.cat([ehs, ehs])
        target = torch.cat([noise, noise])
        with torch.no_grad():
            unet.disable_adapters()
            ref = unet(x, tt, encoder_hidden_states=cond).sample
            unet.enable_adapters()
        pred = unet(x, tt, encoder_hidden_states=cond).sample
        mse = (pred.float() - target).pow(2).mean(dim=[1, 2, 3])
        ref_mse = (ref.float() - target).pow(2).mean(dim=[1, 2, 3])
        mw, ml = mse.chunk(2)
        rw, rl = ref_mse.chunk(2)
        loss = -F.logsigmoid(-0.5 * beta_dpo * ((mw - ml) - (rw - rl))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    results[f"{pairs}x{side}"] = statistics.median(times)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": results, "peak_rss_mib": peak}))
