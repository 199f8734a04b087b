"""torch.optim.AdamW with clip_grad_norm_ and diffusers' learning-rate schedules (CPU, fp32), for
tests/optim.rs.

Usage: adamw.py OUTDIR. Writes OUTDIR/adamw.safetensors:
- `init.<p>`: initial parameters; `grad.<p>.<k>`: the gradient of step k (absent where the
  parameter has no gradient at that step); `lr`: the learning rate of each step (float64);
  `norm`: clip_grad_norm_'s returned pre-clip norm per step;
- after step k: `param.<p>.<k>`, `exp_avg.<p>.<k>`, `exp_avg_sq.<p>.<k>`, `step.<p>.<k>`.
and OUTDIR/schedules.json: diffusers' constant / constant-with-warmup / cosine-with-warmup
factors (`lr_lambda`) over a range of steps.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers.optimization import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)
from safetensors.torch import save_file

STEPS = 6
LR, BETAS, EPS, WD, MAX_NORM = 1e-2, (0.9, 0.99), 1e-3, 0.1, 1.0  # eps large enough to matter
WARMUP = 2


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 3)}
    params = {n: torch.randn(*s, generator=g).requires_grad_() for n, s in shapes.items()}
    t = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(
        list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False
    )
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    lrs, norms = [], []
    for k in range(STEPS):
        opt.zero_grad(set_to_none=True)
        scale = 0.05 if k == 4 else 2.0  # step 4 is not clipped
        for n, p in params.items():
            if n == "c" and k < 2:
                continue  # no gradient on the first two steps
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad = grad.clone()
            t[f"grad.{n}.{k}"] = grad
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        for n, p in params.items():
            t[f"param.{n}.{k}"] = p.detach().clone()
            st = opt.state.get(p)
            if st:
                t[f"exp_avg.{n}.{k}"] = st["exp_avg"].clone()
                t[f"exp_avg_sq.{n}.{k}"] = st["exp_avg_sq"].clone()
                t[f"step.{n}.{k}"] = st["step"].clone().reshape(())
    t["lr"] = torch.tensor(lrs, dtype=torch.float64)
    t["norm"] = torch.tensor(norms, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "adamw.safetensors"))

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cases = []
    for kind, warm, total in [("constant", 3, 10), ("warmup", 4, 10), ("warmup", 0, 5),
                              ("cosine", 3, 11), ("cosine", 0, 7)]:
        if kind == "constant":
            s = get_constant_schedule(dummy)
        elif kind == "warmup":
            s = get_constant_schedule_with_warmup(dummy, warm)
        else:
            s = get_cosine_schedule_with_warmup(dummy, warm, total)
        lam = s.lr_lambdas[0]
        cases.append({"kind": kind, "warmup": warm, "total": total,
                      "factors": [float(lam(i)) for i in range(total + 1)]})
    (out / "schedules.json").write_text(json.dumps(cases))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
