"""diffusers' FlowMatchEulerDiscreteScheduler on a fake velocity model, and the two PSO kernels for
flow models, for tests/flow_match.rs (fp32, CPU). Prints one JSON object: {"cases": [...]}.

Per case: the config and request (steps, or sigmas as the FLUX pipelines pass them, and mu), the
scheduler's sigmas and timesteps, and a trajectory of diffusers' deterministic `step` from seeded
noise with the fake model v = tanh(A * x + B * t / 1000); per step I of that trajectory:
  latents[I]: x before the step (latents[-1] is the result),
  renoise_mean[I], renoise_std[I]: the re-noise kernel read from diffusers itself: its
    `stochastic_sampling` step (x0 = x - sigma * v, then (1 - sigma') * x0 + sigma' * noise) run with
    the noise forced to zeros (the mean) and to PROBE (mean + PROBE * std);
  sde_mean[I], sde_std[I], sde_log_prob[I]: Flow-GRPO's SDE step (flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py, `sde_step_with_logprob`), transcribed below, with the log-probability
    of next = mean + std * Z (Z saved as z[I]) as it computes it (mean over all but the batch).
"""
import json
import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers import scheduling_flow_match_euler_discrete as flow_module
from diffusers.utils.torch_utils import randn_tensor

A, B = 0.7, 0.5
PROBE = 1024.0
SHAPE = (1, 2, 4, 4)
NOISE_LEVEL = 0.7


def calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift):
    """The FLUX pipelines' `calculate_shift`."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def model(x, t):
    return torch.tanh(A * x + B * t / 1000.0)


def sde_step(sigmas, index, sample, v, noise_level, next_sample):
    """Flow-GRPO's `sde_step_with_logprob` for one step index, given the next sample."""
    sigma = sigmas[index]
    sigma_prev = sigmas[index + 1]
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = (
        -((next_sample.detach() - mean) ** 2) / (2 * (std**2))
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return mean, std, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def renoise_kernel(scheduler, t, x, v):
    """diffusers' stochastic step with the noise forced to 0 and to PROBE: (mean, std)."""
    outputs = []
    for fill in (0.0, PROBE):
        flow_module.randn_tensor = lambda shape, **kw: torch.full(shape, fill)
        index = scheduler._step_index
        outputs.append(scheduler.step(v, t, x).prev_sample)
        scheduler._step_index = index
    flow_module.randn_tensor = randn_tensor
    mean = outputs[0]
    std = ((outputs[1] - mean) / PROBE).mean().item()
    return mean, std


def run(name, config, steps=None, sigmas=None, mu=None):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(num_inference_steps=steps, sigmas=sigmas, mu=mu)
    stochastic = FlowMatchEulerDiscreteScheduler(**{**config, "stochastic_sampling": True})
    stochastic.set_timesteps(num_inference_steps=steps, sigmas=sigmas, mu=mu)
    generator = torch.Generator("cpu").manual_seed(7)
    x = torch.randn(SHAPE, generator=generator)
    case = {
        "name": name,
        "config": config,
        "steps": steps,
        "sigmas_request": None if sigmas is None else [float(s) for s in sigmas],
        "mu": mu,
        "sigmas": scheduler.sigmas.tolist(),
        "timesteps": scheduler.timesteps.tolist(),
        "noise_level": NOISE_LEVEL,
        "latents": [],
        "renoise_mean": [],
        "renoise_std": [],
        "sde_mean": [],
        "sde_std": [],
        "sde_log_prob": [],
        "z": [],
    }
    for i, t in enumerate(scheduler.timesteps):
        v = model(x, t)
        case["latents"].append(x.flatten().tolist())
        stochastic._step_index = i
        mean, std = renoise_kernel(stochastic, t, x, v)
        case["renoise_mean"].append(mean.flatten().tolist())
        case["renoise_std"].append(std)
        z = torch.randn(SHAPE, generator=generator)
        mean, std, _ = sde_step(scheduler.sigmas, i, x, v, NOISE_LEVEL, x)
        next_sample = mean + std * z
        _, _, log_prob = sde_step(scheduler.sigmas, i, x, v, NOISE_LEVEL, next_sample)
        case["sde_mean"].append(mean.flatten().tolist())
        case["sde_std"].append(float(std))
        case["sde_log_prob"].append(float(log_prob[0]))
        case["z"].append(z.flatten().tolist())
        x = scheduler.step(v, t, x).prev_sample
    case["latents"].append(x.flatten().tolist())
    return case


def main():
    base = {"num_train_timesteps": 1000}
    flux_dev = {
        **base,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    cases = [
        # FLUX.1-schnell: shift 1, the pipeline's sigmas linspace(1, 1/n, n) (mu ignored).
        run("flux-schnell-4", {**base, "shift": 1.0}, sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu),
        # FLUX.1-dev-like: dynamic (exponential) shift by the image's token count.
        run("flux-dynamic-8", flux_dev, sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu),
        # SD3 / SD3.5: static shift 3, num_inference_steps (SD3.5-Large-Turbo samples 4).
        run("sd3-shift3-4", {**base, "shift": 3.0}, steps=4),
        run("sd3-shift3-terminal-6", {**base, "shift": 3.0, "shift_terminal": 0.05}, steps=6),
        run("linear-dynamic-5", {**flux_dev, "time_shift_type": "linear"}, steps=5, mu=1.2),
        run("one-step", {**base, "shift": 3.0}, steps=1),
    ]
    print(json.dumps({"cases": cases, "model": {"a": A, "b": B}, "shape": SHAPE}))


if __name__ == "__main__":
    main()
