"""The training objectives as the official code writes them, on random tensors (CPU): values and
autograd gradients with respect to the policy's inputs, for tests/objectives.rs.

Usage: objectives.py OUTDIR. Writes OUTDIR/index.json (one entry per case: name, objective,
parameters, per-pair scalars and the expected diagnostics) and OUTDIR/<case>.safetensors (inputs,
the loss and its gradients).

Sources (read, re-implemented here):
- online_pso: Pairwise_Sample_Optimization human_preference_tuning/train_online_pso_sdxl_dmd2.py
  l. 848-854 (ratio clamp, loss, `compare` l. 420-434) and
  pso_pytorch/diffusers_patch/distilled_inference_with_logprob.py l. 129-135 (the log-prob), in
  fp32 and in that op order. Tied pairs are removed before the batch mean (the Rust objective masks
  them; the official DMD2 script would add the constant log 2 for each).
- dpo: DiffusionDPO train.py l. 1121-1145 (fp32); offline_pso: the official personalization
  script's --loss_type pso (l. 1843-1883: lambda-weighted losers, no 1/2, beta_pso); noising and targets with diffusers'
  DDPMScheduler.add_noise / get_velocity.
- pso_db: Pairwise_Sample_Optimization personalization/train_pso_sdxl_turbo_dreambooth.py
  l. 1723-1893 with --do_edm_style_training --loss_type pso_db: EulerDiscreteScheduler noising in
  sigma space, x0 = x - sigma * eps_hat, sigma^-2 weighting, in float64 (the fp32 EDM route loses
  digits at small sigma; mathematically it is the eps-MSE the Rust objective computes).
- sft: DiffusionDPO train.py l. 1120 (F.mse_loss on float).
- hybrid: iDDPM / DiT gaussian_diffusion.py `training_losses` with learned-range variance: MSE on
  eps plus the one-timestep VLB term (bits per dim, mean gradient stopped). Here the model's
  posterior mean and log-variance come from diffusers' DDPMScheduler (learned_range) step, the
  true posterior from the same step given the true eps, the KL from torch.distributions; at t = 0
  the decoder NLL with iDDPM's tanh CDF and the log-variance clipped to log beta~_1 (where
  diffusers clamps beta~_0 to 1e-20 instead).
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

SHAPE = (2, 4, 4)  # C, H, W of the latents


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def enforce_zero_terminal_snr(scheduler):
    """DiffusionDPO train.py l. 480-503, applied there when the model name contains "turbo"."""
    alphas = 1 - scheduler.betas
    alphas_bar = alphas.cumprod(0)
    alphas_bar_sqrt = alphas_bar.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, prediction_type=prediction_type,
    )


# ----------------------------------------------------------------------------------- online PSO

def log_prob(next_latents, mean, std):
    """distilled_step_with_logprob's Gaussian log-prob, mean over all but the batch dim."""
    lp = (
        -((next_latents.detach() - mean) ** 2) / (2 * (std ** 2))
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def compare(a, b):
    """The DMD2 script's winner/loser labels: (+1, -1) if a wins, (-1, +1) if b wins, (0, 0) ties."""
    a, b = a[..., None], b[..., None]
    a_dom = torch.logical_and(torch.all(a <= b, dim=1), torch.any(a < b, dim=1))
    b_dom = torch.logical_and(torch.all(b <= a, dim=1), torch.any(b < a, dim=1))
    c = torch.zeros([a.shape[0], 2], dtype=torch.float)
    c[a_dom] = torch.tensor([-1.0, 1.0])
    c[b_dom] = torch.tensor([1.0, -1.0])
    return c


def online_official(sides, rewards, beta, eps):
    """sides[k] = (next, mean_policy, mean_ref, std[B,1,1,1]) of sample k in {0, 1}."""
    lp = [log_prob(n, mp, s) - log_prob(n, mr, s) for n, mp, mr, s in sides]
    h = compare(rewards[:, 0], rewards[:, 1])
    counted = h.abs().sum(1) > 0
    ratio_0 = torch.clamp(torch.exp(lp[0]), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(lp[1]), 1 - eps, 1 + eps)
    logits = beta * (torch.log(ratio_0)) * h[:, 0] + beta * (torch.log(ratio_1)) * h[:, 1]
    per_pair = -torch.log(torch.sigmoid(logits))
    loss = per_pair[counted].sum() / max(int(counted.sum()), 1)
    return loss, lp, h, counted, logits


def as_std(values, ndim):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, *([1] * (ndim - 1)))


def ratio_of(offset, r, std):
    """fp32 ratio of a constant row: next = 0, mean_ref = r, mean_policy = r - offset."""
    nxt = torch.zeros(1, *SHAPE)
    ref = torch.full((1, *SHAPE), r)
    pol = torch.full((1, *SHAPE), r) - torch.tensor(offset, dtype=torch.float32)
    s = as_std([std], 4)
    return torch.exp(log_prob(nxt, pol, s) - log_prob(nxt, ref, s)).item(), nxt, pol, ref


def f32(x):
    return float(np.float32(x))


def edge_offset(target):
    """(std, r, at, beyond): a constant row with this s and mean_ref = r whose fp32 ratio is
    exactly `target` (an fp32 clamp edge) at offset `at`, and strictly beyond it at `beyond`.
    Small log-likelihoods (|lp| < 1, where fp32 is finer) are needed to reach 0.9 exactly."""
    for std in (0.5, 0.6, 0.4):
        for r in (f32(std * (0.45 + k / 256)) for k in range(128)):
            lo, hi = f32(-r), f32(r)  # ratio(lo) < 0.9 < 1.1 < ratio(hi)
            while True:
                mid = f32((lo + hi) / 2)
                if mid in (lo, hi):
                    break
                if ratio_of(mid, r, std)[0] < target:
                    lo = mid
                else:
                    hi = mid
            if ratio_of(hi, r, std)[0] != target:
                continue
            away = np.float32(1.0 if target > 1 else -1.0)
            beyond = np.nextafter(np.float32(hi), away)
            while (ratio_of(float(beyond), r, std)[0] - target) * away <= 0:
                beyond = np.nextafter(beyond, away)
            return std, r, hi, float(beyond)
    raise RuntimeError(f"no fp32 offset puts the ratio exactly on {target}")


def online_case(name, seed, std_w, std_l, offsets_w, offsets_l, ties=(), beta=50.0, eps=0.1,
                edges=()):
    """Pairs whose policy means sit `offsets * std` from the reference; next = reference + std * z.
    `edges` = [(pair, side, 'at'|'beyond', 'hi'|'lo')] replaces that row by a constant row."""
    g = gen(seed)
    b = len(std_w)
    rows = {}
    for side, stds, offs in (("w", std_w, offsets_w), ("l", std_l, offsets_l)):
        s = as_std(stds, 4)
        ref = randn(g, b, *SHAPE)
        nxt = ref + s * randn(g, b, *SHAPE)
        pol = ref + s * torch.tensor(offs, dtype=torch.float32).reshape(-1, 1, 1, 1) * randn(g, b, *SHAPE)
        rows[side] = [nxt, pol, ref, list(stds)]
    for pair, side, where, edge in edges:
        target = f32(1 + eps) if edge == "hi" else f32(1 - eps)
        std, r, at, beyond = edge_offset(target)
        _, nxt, pol, ref = ratio_of(at if where == "at" else beyond, r, std)
        for k, t in enumerate((nxt, pol, ref)):
            rows[side][k][pair] = t[0]
        rows[side][3][pair] = std
    rows["w"][1].requires_grad_(True)
    rows["l"][1].requires_grad_(True)
    # The official code sees (sample_0, sample_1, rewards); put the winner first on even pairs.
    swap = torch.tensor([i % 2 == 1 for i in range(b)])
    rewards = torch.stack([torch.where(swap, 0.0, 1.0), torch.where(swap, 1.0, 0.0)], 1)
    for i in ties:
        rewards[i] = 0.5
    sides = []
    for k in (0, 1):
        take_w = (~swap) if k == 0 else swap
        pick = lambda tw, tl: torch.where(take_w.reshape(-1, 1, 1, 1), tw, tl)
        std = [rows["w"][3][i] if take_w[i] else rows["l"][3][i] for i in range(b)]
        sides.append((
            pick(rows["w"][0], rows["l"][0]),
            pick(rows["w"][1], rows["l"][1]),
            pick(rows["w"][2], rows["l"][2]),
            as_std(std, 4),
        ))
    loss, lp, h, counted, logits = online_official(sides, rewards, beta, eps)
    loss.backward()
    lp_w = torch.where(swap, lp[1], lp[0]).detach()
    lp_l = torch.where(swap, lp[0], lp[1]).detach()
    c = counted
    n = int(c.sum())

    def outside(x):
        r = torch.exp(x)
        return ((r < 1 - eps) | (r > 1 + eps)).float().sum().item()

    diag = {"loss": loss.item(), "counted": n, "skipped": b - n}
    if n:
        diag.update(
            margin=logits[c].mean().item(),
            accuracy=(logits[c] > 0).float().mean().item(),
            log_ratio_winner=lp_w[c].mean().item(),
            log_ratio_loser=lp_l[c].mean().item(),
            clamped_fraction=(outside(lp_w[c]) + outside(lp_l[c])) / (2 * n),
        )
    tensors = {
        "next_w": rows["w"][0], "policy_w": rows["w"][1].detach(), "ref_w": rows["w"][2],
        "next_l": rows["l"][0], "policy_l": rows["l"][1].detach(), "ref_l": rows["l"][2],
        "loss": loss.detach(),
        "grad_policy_w": rows["w"][1].grad, "grad_policy_l": rows["l"][1].grad,
    }
    entry = {
        "name": name, "objective": "online_pso", "beta": beta, "epsilon": eps,
        "std_w": rows["w"][3], "std_l": rows["l"][3], "counted": c.tolist(),
        "diagnostics": diag,
    }
    return entry, tensors


# ------------------------------------------------------------- online PSO, kernel to loss

def turbo_step_with_logprob(self, model_output, timestep, sample, prev_sample):
    """pso_pytorch/diffusers_patch/turbo_inference_with_logprob.py l. 24-116, with a given
    prev_sample (the learner's call)."""
    step_indices = []
    for _t in timestep:
        step_indices.append((_t == self.timesteps).nonzero()[0].item())
    next_step_indices = [s + 1 for s in step_indices]
    sigma = self.sigmas[step_indices].reshape(-1, 1, 1, 1).to(model_output.device)
    sample = sample.to(torch.float32)
    pred_original_sample = sample - sigma * model_output
    sigma_from = self.sigmas[step_indices]
    sigma_to = self.sigmas[next_step_indices]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    sigma_from = sigma_from.reshape(-1, 1, 1, 1)
    sigma_to = sigma_to.reshape(-1, 1, 1, 1)
    sigma_up = sigma_up.reshape(-1, 1, 1, 1)
    sigma_down = sigma_down.reshape(-1, 1, 1, 1)
    derivative = (sample - pred_original_sample) / sigma
    dt = sigma_down - sigma
    prev_sample_mean = sample + derivative * dt
    prev_sample = prev_sample.to(torch.float32)
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (sigma_up**2))
        - torch.log(sigma_up)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample.to(model_output.dtype), log_prob


def turbo_chain_case(name, seed, step, beta=50.0, eps=0.1, spread=0.01):
    """The whole official SDXL-Turbo chain from the models' ε predictions to the loss:
    turbo_step_with_logprob for policy and reference (LoRA off), then
    train_online_pso_sdxl_turbo.py l. 842-850 with sample_compare (l. 401-416). Rewards differ, so
    no pair is tied. Rust recomputes it from its own Euler-ancestral kernel."""
    g = gen(seed)
    b = 3
    sched = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, timestep_spacing="trailing",
    )
    sched.set_timesteps(4)
    t = sched.timesteps[step].repeat(b)
    sigma = float(sched.sigmas[step])
    tensors, logp, refp = {}, [], []
    for side in (0, 1):
        x = randn(g, b, *SHAPE) * sigma
        ref = randn(g, b, *SHAPE)
        pol = (ref + spread * randn(g, b, *SHAPE)).requires_grad_(True)
        # The sampler's draw: the reference step plus fresh noise, so the ratio is near 1.
        with torch.no_grad():
            sigma_to = sched.sigmas[step + 1]
            sigma_up = (sigma_to**2 * (sched.sigmas[step]**2 - sigma_to**2) / sched.sigmas[step]**2) ** 0.5
            nxt = x + ref * ((sigma_to**2 - sigma_up**2) ** 0.5 - sched.sigmas[step]) + sigma_up * randn(g, b, *SHAPE)
        _, lp = turbo_step_with_logprob(sched, pol, t, x, nxt)
        with torch.no_grad():
            _, rp = turbo_step_with_logprob(sched, ref, t, x, nxt)
        logp.append(lp)
        refp.append(rp)
        tensors.update({f"x_{side}": x, f"ref_{side}": ref, f"policy_{side}": pol, f"next_{side}": nxt})
    rewards = [randn(g, b), randn(g, b)]
    a, bb = rewards
    a_dominates = a <= bb
    b_dominates = bb < a
    c = torch.zeros([b, 2], dtype=torch.float)
    c[a_dominates] = torch.tensor([-1., 1.])
    c[b_dominates] = torch.tensor([1., -1.])
    ratio_0 = torch.clamp(torch.exp(logp[0] - refp[0]), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(logp[1] - refp[1]), 1 - eps, 1 + eps)
    loss = -torch.log(torch.sigmoid(
        beta * (torch.log(ratio_0)) * c[:, 0] + beta * (torch.log(ratio_1)) * c[:, 1]
    )).mean()
    loss.backward()
    out = {k: v.detach().clone() for k, v in tensors.items()}
    out.update({
        "winner_is_1": (c[:, 1] > 0).to(torch.float32),
        "loss": loss.detach(),
        "grad_policy_0": tensors["policy_0"].grad,
        "grad_policy_1": tensors["policy_1"].grad,
    })
    entry = {
        "name": name, "objective": "turbo_chain", "beta": beta, "epsilon": eps,
        "timesteps": [step], "diagnostics": {"loss": loss.item(), "counted": b, "skipped": 0},
    }
    return entry, out


# --------------------------------------------------------------------------------------- DPO

def dpo_case(name, objective, seed, timesteps, beta, prediction="epsilon", ties=(),
             spread=(0.1, 0.1), lam=1.0):
    """Official Diffusion-DPO (objective "dpo") or the official offline PSO loss ("offline_pso",
    personalization/train_pso_sdxl_turbo_dreambooth.py --loss_type pso, l. 1843-1883) on
    predictions = target + random error (policy and reference)."""
    g = gen(seed)
    b = len(timesteps)
    sched = sd_scheduler(prediction)
    x0_w, x0_l = randn(g, b, *SHAPE), randn(g, b, *SHAPE)
    noise = randn(g, b, *SHAPE)
    t = torch.tensor(timesteps, dtype=torch.long)
    latents = torch.cat([x0_w, x0_l])
    # train.py: `timesteps.chunk(2)[0].repeat(2)`, `noise.chunk(2)[0].repeat(2, 1, 1, 1)`
    t2, noise2 = t.repeat(2), noise.repeat(2, 1, 1, 1)
    noisy = sched.add_noise(latents, noise2, t2)
    target = noise2 if prediction == "epsilon" else sched.get_velocity(latents, noise2, t2)
    ref_pred = target + spread[1] * randn(g, 2 * b, *SHAPE)
    model_pred = (ref_pred + spread[0] * randn(g, 2 * b, *SHAPE)).requires_grad_(True)
    counted = torch.tensor([i not in ties for i in range(b)])
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    if objective == "dpo":
        # train.py l. 1131-1143
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad():
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        scale_term = -0.5 * beta
        inside_term = scale_term * (model_diff - ref_diff)
    else:
        # train_pso_sdxl_turbo_dreambooth.py l. 1850, 1873, 1878, 1883 (neg_defactor = lam)
        model_diff = model_losses_w - lam * model_losses_l
        with torch.no_grad():
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
            ref_diff = ref_losses_w - lam * ref_losses_l
        logits = ref_diff - model_diff
        inside_term = beta * logits
    # train.py takes the mean over the batch; ties are removed first (Diffusion-DPO drops them
    # from its data set).
    n = int(counted.sum())
    loss = -1 * F.logsigmoid(inside_term[counted]).sum() / max(n, 1)
    loss.backward()
    diag = {"loss": loss.item(), "counted": n, "skipped": b - n}
    if n:
        diag.update(
            margin=inside_term[counted].mean().item(),
            accuracy=((inside_term[counted] > 0).sum().float() / n).item(),
            mse_policy=(0.5 * (model_losses_w[counted].mean() + model_losses_l[counted].mean())).item(),
            mse_reference=(0.5 * (ref_losses_w[counted].mean() + ref_losses_l[counted].mean())).item(),
        )
    grad_w, grad_l = model_pred.grad.chunk(2)
    noisy_w, noisy_l = noisy.chunk(2)
    target_w, target_l = target.chunk(2)
    ref_w, ref_l = ref_pred.chunk(2)
    pol_w, pol_l = model_pred.detach().chunk(2)
    tensors = {
        "x0_w": x0_w, "x0_l": x0_l, "noise": noise,
        "noisy_w": noisy_w, "noisy_l": noisy_l, "target_w": target_w, "target_l": target_l,
        "policy_w": pol_w, "policy_l": pol_l, "ref_w": ref_w, "ref_l": ref_l,
        "loss": loss.detach(), "grad_policy_w": grad_w, "grad_policy_l": grad_l,
    }
    entry = {
        "name": name, "objective": objective, "lambda": lam,
        "beta": beta, "prediction": prediction, "timesteps": timesteps,
        "counted": counted.tolist(), "diagnostics": diag,
    }
    return entry, tensors


# ------------------------------------------------------------------------------------ pso_db

def pso_db_case(name, seed, indices, scales_w, scales_l, beta=5.0, lam=0.1, prior=0.5):
    """Official pso_db, EDM style, float64: eps_hat -> x0_hat = x - sigma * eps_hat, weight
    sigma^-2, target x0; the Rust objective gets eps_hat and eps (fp32)."""
    g = gen(seed)
    b = len(indices)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    )
    x0 = torch.cat([randn(g, b, *SHAPE), randn(g, b, *SHAPE)])
    noise = randn(g, b, *SHAPE).repeat(2, 1, 1, 1)
    scales = torch.tensor(scales_w + scales_l, dtype=torch.float32).reshape(-1, 1, 1, 1)
    eps_hat = noise + scales * randn(g, 2 * b, *SHAPE)
    timesteps = sched.timesteps[torch.tensor(indices).repeat(2)]
    model_input, noise64 = x0.double(), noise.double()
    noisy = sched.add_noise(model_input, noise64, timesteps)
    step = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas.double()[step].reshape(-1, 1, 1, 1)
    pred = eps_hat.double().requires_grad_(True)
    model_pred = pred * (-sigmas) + noisy
    weighting = sigmas ** -2.0
    target = model_input
    model_losses = torch.mean((weighting * (model_pred - target) ** 2).reshape(target.shape[0], -1), 1)
    eps_form = ((pred - noise64) ** 2).reshape(2 * b, -1).mean(1)
    assert torch.allclose(model_losses, eps_form, rtol=1e-9, atol=1e-12), "EDM != eps-MSE"
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - lam * model_losses_l
    logits = -model_diff
    loss = torch.relu(1 - beta * logits).mean()
    loss = loss + prior * model_losses_l.mean()
    loss.backward()
    grad_w, grad_l = pred.grad.float().chunk(2)
    diag = {
        "loss": loss.item(), "counted": b, "skipped": 0,
        "margin": (beta * logits).mean().item(),
        "accuracy": ((logits > 0).sum().float() / b).item(),
        "mse_policy": (0.5 * (model_losses_w.mean() + model_losses_l.mean())).item(),
    }
    pol_w, pol_l = eps_hat.chunk(2)
    tensors = {
        "policy_w": pol_w, "policy_l": pol_l, "target_w": noise[:b], "target_l": noise[b:],
        "loss": loss.detach().float(), "grad_policy_w": grad_w, "grad_policy_l": grad_l,
    }
    entry = {
        "name": name, "objective": "pso_db", "beta": beta, "lambda": lam, "prior_weight": prior,
        "timesteps": [int(t) for t in timesteps[:b]], "diagnostics": diag,
    }
    return entry, tensors


# --------------------------------------------------------------------------------------- SFT

def sft_case(name, seed, timesteps, prediction):
    g = gen(seed)
    b = len(timesteps)
    sched = sd_scheduler("epsilon" if prediction == "sample" else prediction)
    x0, noise = randn(g, b, *SHAPE), randn(g, b, *SHAPE)
    t = torch.tensor(timesteps, dtype=torch.long)
    noisy = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": None, "sample": x0}[prediction]
    if target is None:
        target = sched.get_velocity(x0, noise, t)
    pred = (target + 0.3 * randn(g, b, *SHAPE)).requires_grad_(True)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    tensors = {
        "x0": x0, "noise": noise, "noisy": noisy, "target": target, "policy": pred.detach(),
        "loss": loss.detach(), "grad_policy": pred.grad,
    }
    entry = {
        "name": name, "objective": "sft", "prediction": prediction, "timesteps": timesteps,
        "diagnostics": {"loss": loss.item(), "counted": b, "skipped": 0, "mse_policy": loss.item()},
    }
    return entry, tensors


def hybrid_case(name, seed, timesteps):
    g = gen(seed)
    b = len(timesteps)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(1000)
    x0, noise = randn(g, b, *SHAPE), randn(g, b, *SHAPE)
    t = torch.tensor(timesteps, dtype=torch.long)
    noisy = sched.add_noise(x0, noise, t)
    eps = noise + 0.3 * randn(g, b, *SHAPE)
    v = torch.tanh(randn(g, b, *SHAPE))
    pred = torch.cat([eps, v], 1).requires_grad_(True)
    eps_hat, v_hat = pred[:, :SHAPE[0]], pred[:, SHAPE[0]:]
    mse = ((eps_hat - noise) ** 2).flatten(1).mean(1)
    vb = []
    for i, ti in enumerate(timesteps):
        def mean_of(e):
            step = sched.step(torch.cat([e, v_hat[i:i + 1].detach()], 1), ti, noisy[i:i + 1], generator=gen(99))
            if ti == 0:
                return step.prev_sample
            z = torch.randn(noisy[i:i + 1].shape, generator=gen(99))
            return step.prev_sample - torch.exp(0.5 * sched._get_variance(ti, v_hat[i:i + 1].detach())) * z
        model_mean = mean_of(eps_hat[i:i + 1].detach())
        if ti > 0:
            true_mean = mean_of(noise[i:i + 1])
            model_log_var = sched._get_variance(ti, v_hat[i:i + 1])
            prev = ti - 1
            beta_t = 1 - sched.alphas_cumprod[ti] / sched.alphas_cumprod[prev]
            true_var = beta_t * (1 - sched.alphas_cumprod[prev]) / (1 - sched.alphas_cumprod[ti])
            kl = torch.distributions.kl_divergence(
                torch.distributions.Normal(true_mean, true_var.sqrt()),
                torch.distributions.Normal(model_mean, torch.exp(0.5 * model_log_var)))
            vb.append(kl.flatten().mean() / math.log(2.0))
        else:
            ac = sched.alphas_cumprod.double()
            beta0 = 1 - ac[0]
            beta1 = 1 - ac[1] / ac[0]
            post1 = beta1 * (1 - ac[0]) / (1 - ac[1])
            frac = (v_hat[i:i + 1] + 1) / 2
            log_var = frac * math.log(beta0) + (1 - frac) * math.log(post1)
            log_scale = 0.5 * log_var

            def cdf(x):
                return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
            x = x0[i:i + 1]
            centered = x - model_mean
            inv = torch.exp(-log_scale)
            cdf_plus, cdf_min = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
            log_probs = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                                    torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                                (cdf_plus - cdf_min).clamp(min=1e-12).log()))
            vb.append(-log_probs.flatten().mean() / math.log(2.0))
    vb = torch.stack(vb).float()
    loss = (mse + 0.001 * 1000 * vb).mean()
    loss.backward()
    tensors = {"x0": x0, "noise": noise, "noisy": noisy, "policy": pred.detach(), "loss": loss.detach(),
               "grad_policy": pred.grad}
    entry = {
        "name": name, "objective": "hybrid", "prediction": "epsilon", "timesteps": timesteps,
        "diagnostics": {"loss": loss.item(), "counted": b, "skipped": 0, "mse_policy": mse.mean().item()},
    }
    return entry, tensors


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = sd_scheduler()
    cases = [
        # Ratios inside the trust region; winners and losers at different steps (different s).
        online_case("online_inside", 1, [0.9, 0.6, 0.3, 0.75], [0.3, 0.6, 0.9, 0.5],
                    [0.02] * 4, [0.03] * 4),
        # Some ratios inside, some beyond 1 + eps or below 1 - eps.
        online_case("online_mixed_clamp", 2, [0.7, 0.7, 0.4, 0.4, 0.5], [0.7, 0.5, 0.4, 0.6, 0.5],
                    [0.05, 0.8, 0.02, 1.5, 0.4], [0.9, 0.03, 1.2, 0.01, 0.6]),
        # Ties (pairs 1 and 3) are skipped.
        online_case("online_ties", 3, [0.5] * 4, [0.5] * 4, [0.05] * 4, [0.05] * 4, ties=(1, 3)),
        online_case("online_all_tied", 4, [0.5] * 2, [0.5] * 2, [0.05] * 2, [0.05] * 2,
                    ties=(0, 1)),
        # Ratios exactly on the fp32 edges 1.1 and 0.9 (gradient passes) and just beyond (none).
        online_case("online_edges", 5, [0.5] * 4, [0.5] * 4, [0.02] * 4, [0.02] * 4, edges=[
            (0, "w", "at", "hi"), (1, "l", "at", "lo"), (2, "w", "beyond", "hi"),
            (3, "l", "beyond", "lo"),
        ]),
        online_case("online_small_s", 6, [1e-3, 1e-4, 3e-3], [1e-4, 1e-3, 5e-4],
                    [0.03, 0.01, 0.2], [0.02, 0.05, 0.01]),
        online_case("online_large_s", 7, [14.6, 80.0, 3.0], [40.0, 14.6, 120.0],
                    [0.03, 0.01, 0.2], [0.02, 0.05, 0.01]),
        online_case("online_beta_eps", 8, [0.5] * 3, [0.5] * 3, [0.1, 0.2, 0.05],
                    [0.05, 0.1, 0.3], beta=7.0, eps=0.3),
        turbo_chain_case("turbo_chain_first", 41, 0),
        turbo_chain_case("turbo_chain_second", 42, 1, spread=0.05),
        turbo_chain_case("turbo_chain_third", 43, 2, beta=20.0, eps=0.2),
        dpo_case("dpo_eps", "dpo", 11, [3, 250, 612, 999], 5000.0, spread=(0.003, 0.1)),
        dpo_case("dpo_v", "dpo", 12, [0, 400, 999], 5000.0, prediction="v_prediction", spread=(0.003, 0.1)),
        dpo_case("dpo_ties", "dpo", 13, [10, 500, 900, 700], 5000.0, ties=(0, 2), spread=(0.003, 0.1)),
        dpo_case("dpo_saturated", "dpo", 14, [100, 800], 5e6, spread=(0.1, 0.1)),
        dpo_case("offline_pso_eps", "offline_pso", 15, [999, 749, 499, 249], 200.0, spread=(0.003, 0.1),
                 lam=0.1),
        dpo_case("offline_pso_v", "offline_pso", 16, [249, 999, 499], 50.0, prediction="v_prediction",
                 lam=0.3),
        dpo_case("offline_pso_ties", "offline_pso", 17, [999, 249, 749], 200.0, ties=(1,),
                 spread=(0.003, 0.1), lam=0.1),
        pso_db_case("pso_db_mixed", 21, [249, 499, 749, 999], [0.05, 0.1, 0.05, 0.02],
                    [1.0, 2.5, 0.5, 3.0]),
        pso_db_case("pso_db_params", 22, [999, 249, 499], [0.3, 0.05, 0.2], [0.2, 1.0, 0.1],
                    beta=50.0, lam=0.3, prior=0.0),
        sft_case("sft_eps", 31, [5, 500, 999], "epsilon"),
        sft_case("sft_v", 32, [5, 500, 999], "v_prediction"),
        sft_case("sft_sample", 33, [250, 750], "sample"),
        hybrid_case("hybrid", 34, [0, 1, 2, 500, 999]),
        hybrid_case("hybrid_low", 35, [0, 0, 3]),
    ]
    index = {"alphas_cumprod_file": "alphas_cumprod.safetensors", "cases": []}
    zero_snr = sd_scheduler()
    enforce_zero_terminal_snr(zero_snr)
    save_file({"alphas_cumprod": sd.alphas_cumprod.contiguous(),
               "alphas_cumprod_zero_snr": zero_snr.alphas_cumprod.contiguous()},
              str(out / "alphas_cumprod.safetensors"))
    for entry, tensors in cases:
        tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out / f"{entry['name']}.safetensors"))
        index["cases"].append(entry)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(cases)} cases written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
