"""PyTorch side of `bench/flow_learn`: the online-PSO learner step pso runs on a flow-matching model
(LoRA r4 on to_q/to_k/to_v/to_out.0, reference = adapters off, the re-noise kernel's means
mu = (1 - s') (x - s v) of one stored transition per trajectory, the clamped likelihood ratio and
-log sigmoid(beta (log r_w - log r_l)), backward, clip_grad_norm_, AdamW), written with diffusers + peft.

Usage: flow_learn_pytorch.py OUTDIR CASES_JSON STEPS. Builds the three pipelines of bench/flow_sample
(OUTDIR/sd3, OUTDIR/flux, OUTDIR/zimage) for the Rust side to load, then prints JSON: per model and pairs per step the
median seconds per step, and this process's peak RSS in MiB.
"""
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_sample_diffusers import SIZE, build  # noqa: E402

STEP = 1  # the transition trained: second of 4 steps
BETA, EPS = 50.0, 0.1


def mean_log_likelihood(nxt, mean, std):
    return (-(nxt - mean) ** 2 / (2 * std ** 2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).mean(dim=[1, 2, 3])


def main():
    out, cases, steps = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    pipes = build(out)
    side = SIZE // 4
    results = {}
    for name, pipe in pipes.items():
        model = pipe.transformer
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-6, eps=1e-8)
        with torch.no_grad():
            if name == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", None, None,
                                                          do_classifier_free_guidance=False, max_sequence_length=32)
                pipe.scheduler.set_timesteps(4)
            elif name == "zimage":
                embeds, pooled = pipe._encode_prompt(["a photo of a cat"], device="cpu", max_sequence_length=32)[0], None
                # ZImagePipeline's linspace(1, 1/n, n) (the static shift 3 of this model applies).
                pipe.scheduler.set_timesteps(sigmas=[1.0 - i / 4 for i in range(4)])
            else:
                embeds, pooled, text_ids = pipe.encode_prompt("a photo of a cat", None, max_sequence_length=32)
                # FluxPipeline's linspace(1, 1/n, n); the static shift 1 of this model.
                pipe.scheduler.set_timesteps(sigmas=[1.0 - i / 4 for i in range(4)])
        sigma, nxt_sigma = float(pipe.scheduler.sigmas[STEP]), float(pipe.scheduler.sigmas[STEP + 1])
        for pairs in cases:
            gen = torch.Generator().manual_seed(pairs)
            x = torch.randn(2 * pairs, 16, side, side, generator=gen)
            nxt = torch.randn(2 * pairs, 16, side, side, generator=gen)
            ctx = embeds.repeat(2 * pairs, 1, 1) if name != "zimage" else None
            pool = pooled.repeat(2 * pairs, 1) if pooled is not None else None
            t = torch.full((2 * pairs,), sigma * 1000)

            def velocity():
                if name == "zimage":
                    # Z-Image's t = 1 - sigma and negated output, as pso's backbone converts them.
                    rows = model(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, [embeds] * x.shape[0],
                                 return_dict=False)[0]
                    return -torch.stack(rows).squeeze(2)
                if name == "sd3":
                    return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pool,
                                 timestep=t).sample
                b = x.shape[0]
                packed = FluxPipeline._pack_latents(x, b, 16, side, side)
                ids = FluxPipeline._prepare_latent_image_ids(b, side // 2, side // 2, x.device, x.dtype)
                v = model(hidden_states=packed, timestep=t / 1000, guidance=None, pooled_projections=pool,
                          encoder_hidden_states=ctx, txt_ids=text_ids, img_ids=ids).sample
                return FluxPipeline._unpack_latents(v, SIZE, SIZE, 4)

            def step():
                with torch.no_grad():
                    model.disable_adapters()
                    v_ref = velocity()
                    model.enable_adapters()
                v = velocity()
                mean = (1 - nxt_sigma) * (x - sigma * v)
                mean_ref = (1 - nxt_sigma) * (x - sigma * v_ref)
                log_ratio = mean_log_likelihood(nxt, mean, nxt_sigma) - mean_log_likelihood(nxt, mean_ref, nxt_sigma)
                ratio = torch.clamp(torch.exp(log_ratio), 1 - EPS, 1 + EPS)
                lw, ll = torch.log(ratio).chunk(2)
                loss = -F.logsigmoid(BETA * (lw - ll)).mean()
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
            results[f"{name},{pairs}"] = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": results, "peak_rss_mib": peak}))


if __name__ == "__main__":
    main()
