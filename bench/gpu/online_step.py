"""The online-PSO optimizer step both PyTorch references of the GPU proof time
(learn_online_pytorch.py on a UNet, learn_flow_pytorch.py on Z-Image), and how they time and report
it, as `pso bench learn` does: every stochastic transition of the winner and loser trajectories is
one micro-batch (the policy's and the reference's log-likelihood of the next latent, the ratio
clamped to [1 - eps, 1 + eps], -log sigmoid(beta (log r_w - log r_l)), backward), then grad-norm
clipping and AdamW.
"""
import json
import statistics
import time

import torch
import torch.nn.functional as F

BETA, EPS = 50.0, 0.1


def pso_step(model, params, opt, winner, loser, stochastic, log_prob):
    """One optimizer step over the transitions `stochastic` of the trajectories [steps + 1, pairs, ...];
    `log_prob(x, x_next, i)` is the per-sample log-likelihood under `model` as it is (adapters on or off)."""
    low, high = torch.log(torch.tensor(1 - EPS)), torch.log(torch.tensor(1 + EPS))
    for i in stochastic:
        x = torch.cat([winner[i], loser[i]])
        x_next = torch.cat([winner[i + 1], loser[i + 1]])
        with torch.no_grad():
            model.disable_adapters()
            reference = log_prob(x, x_next, i)
            model.enable_adapters()
        policy = log_prob(x, x_next, i)
        rw, rl = (policy - reference).clamp(min=low, max=high).chunk(2)
        loss = -F.logsigmoid(BETA * (rw - rl)).mean() / len(stochastic)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def report(step, params, device, repeats):
    """Times `step` (median of `repeats` after one warm-up, the GPU synchronised around each) and prints
    the JSON the check reads: seconds per step, trainable parameters, peak allocated GPU memory in MiB."""
    def timed():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    seconds = statistics.median(timed() for _ in range(max(1, repeats)))
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    print(json.dumps({"seconds_per_step": seconds, "trainable": sum(p.numel() for p in params),
                      "peak_allocated_mib": peak}))
