"""Runs diffusers' few-step schedulers on a fake model and records everything the Rust sampler must
reproduce (fp32, CPU).

Usage: schedulers.py OUTDIR. Writes OUTDIR/index.json (one entry per case: its name, the diffusers
scheduler config, the timesteps request, eta, the noise mode and seed, the model constants) and
OUTDIR/<case>.safetensors with:
  timesteps (f64), sigmas (f64, Euler family only), init_noise_sigma (f64, one value),
  init (the pipeline's `latents=` before init_noise_sigma, explicit-noise cases only),
  noise.K (the K-th noise tensor a step drew, explicit-noise cases only),
  latents.I (x_{t_I}; latents.0 = x_T after init_noise_sigma, the last one = x0),
  mean.I and std.I (the step's kernel, see below).

The fake model is model_output = tanh(A * model_input + B * t / 1000); for DDPM cases with a learned
variance ("learned": true) it also returns C more channels, v = LEARNED * tanh(-A * model_input + B * t
/ 1000), and the kernel's per-element s is recorded as learned_std.I.

Noise. `step` draws its noise with `randn_tensor`, which each scheduler module imported by name, so
the oracle replaces that name in the scheduler modules with `feed`: in explicit-noise cases it hands
out precomputed tensors in order (saved as noise.K, so Rust can use the same numbers); in seeded
cases it calls the real `randn_tensor` with the pipeline's generator, as a pipeline with
`generator=torch.Generator("cpu").manual_seed(seed)` would (Rust must then reproduce the numbers
from the seed alone).

Kernel. Every `step` returns mu + s * z. To record mu and s from diffusers itself rather than from
a re-implementation, each step is run twice more with the noise forced to zeros (giving mu) and to
PROBE (giving mu + PROBE * s; a large power of two keeps fp32 rounding of mu out of s); the
scheduler's step counter is restored around these probes.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
)
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logging.set_verbosity_error()  # custom-timestep and unused-key warnings are expected here

A, B = 0.7, 0.5
LEARNED = 0.9
PROBE = 1024.0
SHAPE = (2, 4, 8, 8)
CLASSES = {
    c.__name__: c
    for c in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCMScheduler, DDIMScheduler, DDPMScheduler)
}

# --- noise plumbing -------------------------------------------------------------------------------
FEED = None  # None: the real randn_tensor; else a function shape -> tensor


def feed(shape, generator=None, device=None, dtype=None, layout=None):
    if FEED is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return FEED(tuple(shape)).to(dtype=dtype)


for module in (scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_euler_discrete,
               scheduling_lcm):
    module.randn_tensor = feed

# --- cases ----------------------------------------------------------------------------------------
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False,
          clip_sample=False)
DEFAULT = dict()  # each class's own defaults (linear 1e-4..0.02 for Euler/DDIM, DDIM clips x0)
COSINE = dict(beta_schedule="squaredcos_cap_v2")
BETAS = {"sd": SD, "default": DEFAULT}


def case(name, cls, config, request, eta=0.0, noise="explicit", seed=0):
    learned = config.get("variance_type") == "learned_range"
    return dict(name=name, config=dict(_class_name=cls, **config), request=request, eta=eta, noise=noise, seed=seed,
                learned=learned)


def build_cases():
    cases = []
    for bname, betas in BETAS.items():
        for steps in (1, 2, 4):
            for pred in ("epsilon", "v_prediction", "sample"):
                for spacing in ("leading", "trailing", "linspace"):
                    cfg = dict(betas, prediction_type=pred, timestep_spacing=spacing)
                    cases.append(case(f"euler-{bname}-{pred}-{spacing}-{steps}", "EulerDiscreteScheduler", cfg,
                                      dict(steps=steps)))
                    cases.append(case(f"ddim-{bname}-{pred}-{spacing}-{steps}", "DDIMScheduler", cfg,
                                      dict(steps=steps)))
                    # diffusers' ancestral Euler raises NotImplementedError for sample prediction.
                    if pred != "sample":
                        cases.append(case(f"ancestral-{bname}-{pred}-{spacing}-{steps}",
                                          "EulerAncestralDiscreteScheduler", cfg, dict(steps=steps)))
                # LCM ignores timestep_spacing and steps_offset.
                cfg = dict(betas, prediction_type=pred)
                cases.append(case(f"lcm-{bname}-{pred}-{steps}", "LCMScheduler", cfg, dict(steps=steps)))
    for ts in ([999, 749, 499, 249], [999, 850, 500, 100], [999, 499], [999], [800, 400]):
        tag = "-".join(map(str, ts))
        for cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"):
            cases.append(case(f"explicit-{cls}-{tag}", cls, dict(SD, timestep_spacing="trailing"), dict(timesteps=ts)))
    # DDIM takes no timestep list in diffusers; for evenly spaced lists its fixed stride N/steps agrees
    # with "next listed timestep", so the list can be set on the scheduler directly.
    for ts in ([999, 749, 499, 249], [999, 499], [750, 500, 250, 0]):
        cases.append(case(f"explicit-DDIMScheduler-{'-'.join(map(str, ts))}", "DDIMScheduler", dict(SD),
                          dict(timesteps=ts)))
    for eta in (0.5, 1.0):
        for spacing in ("trailing", "leading"):
            cases.append(case(f"ddim-eta{eta}-{spacing}", "DDIMScheduler",
                              dict(timestep_spacing=spacing, clip_sample=False), dict(steps=4), eta=eta))
    # DDPM (DiT's samplers): spacings, step counts, prediction types, every supported variance.
    for bname, betas in BETAS.items():
        for steps in (1, 2, 4):
            for spacing in ("leading", "trailing", "linspace"):
                for pred in ("epsilon", "v_prediction", "sample"):
                    cfg = dict(betas, prediction_type=pred, timestep_spacing=spacing)
                    cases.append(case(f"ddpm-{bname}-{pred}-{spacing}-{steps}", "DDPMScheduler", cfg,
                                      dict(steps=steps)))
                for variance in ("fixed_small_log", "fixed_large", "learned_range"):
                    cfg = dict(betas, timestep_spacing=spacing, variance_type=variance)
                    cases.append(case(f"ddpm-{bname}-{variance}-{spacing}-{steps}", "DDPMScheduler", cfg,
                                      dict(steps=steps)))
    for ts in ([999, 749, 499, 249], [999, 500, 0]):
        for variance in ("fixed_small", "learned_range"):
            cases.append(case(f"explicit-DDPMScheduler-{variance}-{'-'.join(map(str, ts))}", "DDPMScheduler",
                              dict(variance_type=variance, clip_sample=False), dict(timesteps=ts)))
    for cls in CLASSES:
        cases.append(case(f"cosine-{cls}", cls, dict(COSINE, timestep_spacing="trailing", clip_sample=False),
                          dict(steps=4)))
    cases += [
        case("euler-sigma_min", "EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing",
                                                               final_sigmas_type="sigma_min"), dict(steps=4)),
        case("euler-continuous-v", "EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing",
                                                                  prediction_type="v_prediction",
                                                                  timestep_type="continuous"), dict(steps=4)),
        case("euler-zero-snr-v", "EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing",
                                                                prediction_type="v_prediction",
                                                                rescale_betas_zero_snr=True), dict(steps=4)),
        case("ddim-zero-snr-v", "DDIMScheduler", dict(SD, timestep_spacing="trailing", prediction_type="v_prediction",
                                                      rescale_betas_zero_snr=True), dict(steps=4)),
        case("lcm-original-25", "LCMScheduler", dict(SD, original_inference_steps=25, timestep_scaling=5.0),
             dict(steps=4)),
        # A small timestep_scaling makes the boundary condition's c_skip matter (≈ 0 otherwise).
        case("lcm-boundary", "LCMScheduler", dict(SD, timestep_scaling=0.01), dict(timesteps=[999, 499, 99, 9])),
        case("lcm-boundary-v", "LCMScheduler", dict(SD, timestep_scaling=0.002, prediction_type="v_prediction"),
             dict(timesteps=[999, 99, 0])),
        # Seeded: the numbers come from the generator, as in `pipe(..., generator=...)`.
        case("seeded-ancestral", "EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="trailing"),
             dict(steps=4), noise="seeded", seed=1234),
        case("seeded-lcm", "LCMScheduler", dict(SD), dict(steps=4), noise="seeded", seed=42),
        case("seeded-ddim-eta", "DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False), dict(steps=2),
             eta=1.0, noise="seeded", seed=7),
        case("seeded-ddpm-learned", "DDPMScheduler", dict(variance_type="learned_range", clip_sample=False),
             dict(steps=4), noise="seeded", seed=11),
    ]
    return cases


# --- running --------------------------------------------------------------------------------------
def make_scheduler(c):
    cls = CLASSES[c["config"]["_class_name"]]
    config = {k: v for k, v in c["config"].items() if k != "_class_name"}
    sched = cls.from_config(config)
    req = c["request"]
    if "steps" in req:
        sched.set_timesteps(req["steps"])
    elif cls in (EulerDiscreteScheduler, LCMScheduler, DDPMScheduler):
        sched.set_timesteps(timesteps=req["timesteps"])
    elif cls is EulerAncestralDiscreteScheduler:
        # No `timesteps=` in diffusers' ancestral class: take the σ that EulerDiscreteScheduler
        # derives from the same list (the Rust scheduler does the same).
        euler = EulerDiscreteScheduler.from_config(config)
        euler.set_timesteps(timesteps=req["timesteps"])
        sched.timesteps, sched.sigmas = euler.timesteps, euler.sigmas
        sched.num_inference_steps = len(req["timesteps"])
    else:
        sched.num_inference_steps = len(req["timesteps"])
        sched.timesteps = torch.tensor(req["timesteps"], dtype=torch.int64)
    return sched


def model(x, t, learned=False):
    eps = torch.tanh(A * x + B * float(t) / 1000.0)
    if not learned:
        return eps
    return torch.cat([eps, LEARNED * torch.tanh(-A * x + B * float(t) / 1000.0)], dim=1)


def run(c):
    global FEED
    sched = make_scheduler(c)
    out = {"timesteps": sched.timesteps.to(torch.float64)}
    if hasattr(sched, "sigmas"):
        out["sigmas"] = sched.sigmas.to(torch.float64)
    out["init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)

    gen = torch.Generator("cpu").manual_seed(c["seed"])
    noise_used = []
    if c["noise"] == "seeded":
        # What a pipeline's prepare_latents does with latents=None.
        latents = randn_tensor(SHAPE, generator=gen, dtype=torch.float32)
        real_feed = None
    else:
        latents = torch.randn(SHAPE, generator=gen)
        out["init"] = latents.clone()

        def real_feed(shape):
            z = torch.randn(shape, generator=gen)
            noise_used.append(z)
            return z

    kwargs = {"generator": gen} if c["noise"] == "seeded" else {}
    if c["config"]["_class_name"] == "DDIMScheduler":
        kwargs["eta"] = c["eta"]

    x = latents * sched.init_noise_sigma
    out["latents.0"] = x.clone()
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(x, t)
        output = model(model_input, t, c["learned"])
        saved_index = getattr(sched, "_step_index", None)
        probes = []
        for fill in (0.0, PROBE):
            FEED = lambda shape, fill=fill: torch.full(shape, fill)
            probes.append(sched.step(output, t, x, **{k: v for k, v in kwargs.items() if k != "generator"}).prev_sample)
            if hasattr(sched, "_step_index"):
                sched._step_index = saved_index
        FEED = real_feed
        x = sched.step(output, t, x, **kwargs).prev_sample
        FEED = None
        out[f"mean.{i}"] = probes[0]
        spread = (probes[1] - probes[0]).to(torch.float64) / PROBE
        out[f"std.{i}"] = torch.tensor([spread.mean().item()], dtype=torch.float64)
        if c["learned"]:
            out[f"learned_std.{i}"] = spread.to(torch.float32)
        out[f"latents.{i + 1}"] = x.clone()
    for k, z in enumerate(noise_used):
        out[f"noise.{k}"] = z
    return out


def main():
    from safetensors.torch import save_file

    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    cases = build_cases()
    for c in cases:
        tensors = run(c)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(outdir / f"{c['name']}.safetensors"))
    index = dict(model=dict(a=A, b=B, learned=LEARNED), shape=list(SHAPE), cases=cases)
    (outdir / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(cases)} cases written to {outdir}")


if __name__ == "__main__":
    main()
