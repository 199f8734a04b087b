"""The GPU proof in one run (scripts/gpu-check.sh calls it; issue 20).

With random weights at the real architectures of bench/gpu/architectures.json (SD-Turbo,
SDXL-Turbo, DiT-XL/2, PickScore's CLIP-H), built here by diffusers and transformers, it measures
`pso` next to the Python reference doing the same work, in this order (each stage is skipped,
and says so, once the time budget is spent):

1. parity: `pso sample --init-noise` (DiT: `--class-label --seed`) against the diffusers
   pipeline from the same latents, per dtype and step count: max and mean |Δ| per pixel (of 255);
2. sampling speed: `pso bench sample` against the diffusers pipeline, images/s at batch 1 and 8;
3. learner step: `pso bench learn` (online PSO, LoRA r32) against the same step written with
   diffusers + peft + torch.optim.AdamW, seconds per step and peak GPU memory of each process;
4. scoring speed: `pso bench score --scorer pickscore` against transformers' CLIPModel;
5. the online loop: `pso online` for a fixed time with the local PickScore-architecture scorer,
   actor alternating and concurrent: pairs per hour and the learner's busy fraction.

With `--stages flow` it measures the flow-matching path instead, on Z-Image-Turbo's transformer
(6.15 B, random weights, bf16) at 1024²: parity of `pso sample --init-noise` with ZImagePipeline
(4 and 9 steps), sampling speed against ZImagePipeline, and the online-PSO learner step (re-noise
kernel, LoRA r32, blocks kept and recomputed) against the same step in diffusers + peft
(bench/gpu/learn_flow_pytorch.py), with peak GPU memory.

Results go to OUT/results.json after every stage (a run cut short keeps what it measured).
`--dry-run` does all of it on the CPU with the `tiny` overrides, fp32, in about a minute: the
test suite runs it so that the script cannot rot.

Usage: check.py --pso BIN --out DIR [--dry-run] [--budget SECONDS] [--stages unet|flow]
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "oracle"))
import tiny_clip_vocab  # noqa: E402

PROMPT = "a photo of a cat"
# Steps of the trajectories the learner stages train on (both sides).
TRAINING_STEPS = 4


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def merged(base, override):
    """`base` with `override`'s keys replaced, recursively."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def architectures(tiny):
    spec = json.loads((ROOT / "bench" / "gpu" / "architectures.json").read_text())
    names = ["sd-turbo", "sdxl-turbo", "dit-xl-2-256", "pickscore", "z-image-turbo"]
    return {n: merged(spec[n], spec["tiny"][n]) if tiny else spec[n] for n in names}


class Peak:
    """Peak GPU memory (MiB) of one process, polled from nvidia-smi while it runs."""

    def __init__(self, pid):
        self.pid, self.mib, self._stop = pid, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=5).stdout
                for line in out.splitlines():
                    pid, used = (s.strip() for s in line.split(","))
                    if int(pid) == self.pid:
                        self.mib = max(self.mib or 0, int(used))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.mib


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.dtypes = ["f32"] if self.dry else ["f16", "bf16"]
        self.size = 64 if self.dry else 512
        self.flow_size = 64 if self.dry else 1024
        self.out = Path(args.out)
        self.work = Path(args.work or self.out / "work")
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.results = {"dry_run": self.dry, "device": self.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "torch": torch.__version__, "stages": {}}
        if not self.dry:
            self.results["gpu"] = torch.cuda.get_device_name(0)
        self.spec = architectures(self.dry)
        self.models = {}
        self.env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))

    def left(self):
        return self.deadline - time.monotonic()

    def save(self):
        self.results["seconds"] = round(self.args.budget - self.left(), 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def stage(self, name, needs_seconds, fn):
        if self.left() < needs_seconds:
            self.results["stages"][name] = {"skipped": f"{self.left():.0f} s left of the budget, {needs_seconds} s needed"}
            log(f"{name}: skipped (time)")
        else:
            log(f"{name} ...")
            started = time.monotonic()
            try:
                self.results["stages"][name] = fn()
            except Exception:  # noqa: BLE001 - a failed stage is a result; the others still run
                self.results["stages"][name] = {"error": traceback.format_exc(limit=6)}
                log(f"{name} failed:\n{traceback.format_exc(limit=6)}")
            self.results["stages"][name]["stage_seconds"] = round(time.monotonic() - started, 1)
        self.save()

    def pso(self, *args, timeout=300, peak=False):
        """Runs the pso binary; returns (stdout, peak GPU MiB or None)."""
        process = subprocess.Popen([self.args.pso, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=self.env)
        poller = Peak(process.pid) if peak and not self.dry else None
        try:
            stdout, stderr = process.communicate(timeout=max(1, min(timeout, self.left())))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise RuntimeError(f"pso {' '.join(map(str, args[:2]))} ran out of time:\n{stderr[-2000:]}")
        mib = poller.stop() if poller else None
        if process.returncode != 0:
            raise RuntimeError(f"pso {' '.join(map(str, args))} exited {process.returncode}:\n{stderr[-3000:]}")
        return stdout, mib

    def reference(self, script, *args):
        """Runs the PyTorch reference bench/gpu/SCRIPT; returns (its JSON, the process's peak GPU MiB)."""
        path = ROOT / "bench" / "gpu" / script
        process = subprocess.Popen([sys.executable, str(path), *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        poller = Peak(process.pid) if not self.dry else None
        stdout, stderr = process.communicate(timeout=max(1, self.left()))
        mib = poller.stop() if poller else None
        if process.returncode != 0:
            raise RuntimeError(f"{script} exited {process.returncode}:\n{stderr[-3000:]}")
        return json.loads(stdout), mib

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # ---- models ---------------------------------------------------------------------------

    def build(self):
        from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,
                               EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                               StableDiffusionXLPipeline, UNet2DConditionModel)
        from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                  CLIPTextModelWithProjection, CLIPTokenizer)

        schedulers = {c.__name__: c for c in [DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler]}
        save_dtype = torch.float32 if self.dry else torch.float16
        vocab_dir = self.work / "vocab"
        vocab, merges = tiny_clip_vocab.write(vocab_dir)

        def tokenizer(pad):
            return CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), pad_token=pad, model_max_length=77)

        def text_encoder(spec):
            spec = dict(spec)
            cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[
                spec.pop("class")]
            config = CLIPTextConfig(**spec, eos_token_id=tiny_clip_vocab.EOS_ID, bos_token_id=tiny_clip_vocab.BOS_ID,
                                    pad_token_id=1)
            return cls(config)

        def scheduler(spec):
            spec = dict(spec)
            return schedulers[spec.pop("class")].from_config(spec)

        built = {}
        torch.manual_seed(0)
        # Built on the device the check runs on: a 2.6 B-parameter UNet initialises in seconds there.
        with torch.device(self.device):
            for name in ["sd-turbo", "sdxl-turbo"]:
                spec = self.spec[name]
                parts = dict(unet=UNet2DConditionModel.from_config(spec["unet"]),
                             vae=AutoencoderKL.from_config(spec["vae"]),
                             text_encoder=text_encoder(spec["text_encoder"]), tokenizer=tokenizer("<|endoftext|>"),
                             scheduler=scheduler(spec["scheduler"]))
                if name == "sd-turbo":
                    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
                else:
                    pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder(spec["text_encoder_2"]),
                                                     tokenizer_2=tokenizer("!"), force_zeros_for_empty_prompt=True)
                pipe.to(save_dtype).save_pretrained(self.work / name)
                built[name] = sum(p.numel() for p in pipe.unet.parameters())
                del pipe, parts
            spec = self.spec["dit-xl-2-256"]
            pipe = DiTPipeline(transformer=DiTTransformer2DModel.from_config(spec["transformer"]),
                               vae=AutoencoderKL.from_config(spec["vae"]), scheduler=scheduler(spec["scheduler"]))
            pipe.to(save_dtype).save_pretrained(self.work / "dit-xl-2-256")
            index_path = self.work / "dit-xl-2-256" / "model_index.json"
            index = json.loads(index_path.read_text())
            index["id2label"] = {"207": "golden retriever"}
            index_path.write_text(json.dumps(index, indent=1))
            built["dit-xl-2-256"] = sum(p.numel() for p in pipe.transformer.parameters())
            del pipe
            spec = self.spec["pickscore"]
            clip = CLIPModel(CLIPConfig(
                text_config=dict(spec["clip"]["text_config"], eos_token_id=tiny_clip_vocab.EOS_ID,
                                 bos_token_id=tiny_clip_vocab.BOS_ID, pad_token_id=1),
                vision_config=spec["clip"]["vision_config"], projection_dim=spec["clip"]["projection_dim"]))
            folder = self.work / "pickscore"
            clip.to(save_dtype).save_pretrained(folder)
            built["pickscore"] = sum(p.numel() for p in clip.parameters())
            del clip
        tokenizer("<|endoftext|>").save_pretrained(folder)
        size = spec["processor"]
        CLIPImageProcessor(size={"shortest_edge": size["size"]},
                           crop_size={"height": size["crop_size"], "width": size["crop_size"]}).save_pretrained(folder)
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return {"parameters": built}

    def diffusers_pipeline(self, name, dtype):
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(self.work / name, dtype=dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- 1. parity ------------------------------------------------------------------------

    def parity(self):
        from PIL import Image
        from safetensors.torch import save_file
        rows = []
        torch_dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
        for name in ["sd-turbo", "sdxl-turbo", "dit-xl-2-256"]:
            for dtype in self.dtypes:
                pipe = self.diffusers_pipeline(name, torch_dtypes[dtype])
                for steps in [1, 4]:
                    out = self.work / f"parity-{name}-{dtype}-{steps}"
                    if name == "dit-xl-2-256":
                        # DiTPipeline draws its latents from a CPU generator, as `pso sample --seed` does.
                        self.pso("sample", "--model", self.work / name, "--class-label", "207", "--guidance", "1",
                                 "--steps", steps, "--seed", 0, "--dtype", dtype, "--device", self.device, "--out", out)
                        with torch.no_grad():
                            theirs = pipe(class_labels=[207], guidance_scale=1.0, num_inference_steps=steps,
                                          generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
                    else:
                        side = self.size // 8
                        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(steps))
                        noise = self.work / f"noise-{steps}.safetensors"
                        save_file({"latents": latents.contiguous()}, str(noise))
                        self.pso("sample", "--model", self.work / name, "--prompt", PROMPT, "--steps", steps,
                                 "--init-noise", noise, "--height", self.size, "--width", self.size, "--dtype", dtype,
                                 "--device", self.device, "--out", out)
                        with torch.no_grad():
                            theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=self.size,
                                          width=self.size, latents=latents.to(self.device, torch_dtypes[dtype]),
                                          generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
                    theirs = (theirs[0] * 255).round().astype(np.int16)
                    ours = np.asarray(Image.open(out / "000000.png").convert("RGB")).astype(np.int16)
                    diff = np.abs(ours - theirs)
                    rows.append({"model": name, "dtype": dtype, "steps": steps, "max_abs": int(diff.max()),
                                 "mean_abs": round(float(diff.mean()), 4),
                                 "p99_abs": float(np.percentile(diff, 99)),
                                 "finite": bool(np.isfinite(theirs).all())})
                    log(f"  {rows[-1]}")
                del pipe
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        # fp32 holds the UNet pipelines' bar (≤ 3/255 per pixel); half precision is judged on the
        # mean, since a rounding difference flips whole pixels here and there.
        bar = {"f32": ("max_abs", 3), "f16": ("mean_abs", 3), "bf16": ("mean_abs", 6)}
        for row in rows:
            key, limit = bar[row["dtype"]]
            row["pass"] = row[key] <= limit
        return {"rows": rows, "bar": {k: f"{m} <= {v}/255" for k, (m, v) in bar.items()}}

    # ---- 2. sampling speed ----------------------------------------------------------------

    def sample_speed(self):
        dtype = self.dtypes[0]
        torch_dtype = {"f32": torch.float32, "f16": torch.float16}[dtype]
        cases = [(1, 1), (4, 1), (1, 8), (4, 8)] if not self.dry else [(1, 1), (4, 2)]
        rows = []
        for name in ["sd-turbo", "sdxl-turbo"]:
            stdout, pso_mib = self.pso("bench", "sample", "--model", self.work / name, "--steps",
                                       ",".join(sorted({str(s) for s, _ in cases})), "--batch",
                                       ",".join(sorted({str(b) for _, b in cases})), "--size", self.size, "--dtype",
                                       dtype, "--device", self.device, "--repeats", 3, peak=True)
            ours = {(c["steps"], c["batch"]): c["images_per_s"] for c in json.loads(stdout)["cases"]}
            pipe = self.diffusers_pipeline(name, torch_dtype)
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for steps, batch in cases:
                def run():
                    self.sync()
                    start = time.perf_counter()
                    with torch.no_grad():
                        pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=self.size, width=self.size,
                             num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(0),
                             output_type="np")
                    self.sync()
                    return time.perf_counter() - start
                run()
                theirs = batch / min(run() for _ in range(3))
                rows.append({"model": name, "dtype": dtype, "steps": steps, "batch": batch,
                             "pso_images_per_s": ours[(steps, batch)], "diffusers_images_per_s": theirs,
                             "ratio": ours[(steps, batch)] / theirs})
                log(f"  {rows[-1]}")
            peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
            rows.append({"model": name, "pso_peak_process_mib": pso_mib, "diffusers_peak_allocated_mib": peak})
            del pipe
            if self.device == "cuda":
                torch.cuda.empty_cache()
        return {"rows": rows}

    # ---- 3. learner step ------------------------------------------------------------------

    def run_config(self, name, extra="", model="sd-turbo", sampler='name = "euler_ancestral"', size=None,
                   learner="batch_size = 1"):
        """A TRAINING_STEPS-step online-PSO run config with LoRA r32 for the folder `model`; `extra` is appended."""
        dtype = "f32" if self.dry else "bf16"
        text = f"""[model]
id = "{self.work / model}"
dtype = "{dtype}"
device = "{self.device}"
[sampler]
{sampler}
steps = {TRAINING_STEPS}
height = {size or self.size}
width = {size or self.size}
samples_per_prompt = 2
[peft]
kind = "lora"
rank = 32
alpha = 32.0
[objective]
kind = "online_pso"
[learner]
{learner}
{extra}"""
        path = self.work / f"{name}.toml"
        path.write_text(text)
        return path

    def learn(self):
        pairs = 2
        stdout, pso_mib = self.pso("bench", "learn", "--config", self.run_config("learn"), "--pairs", pairs,
                                   "--repeats", 5, peak=True)
        ours = json.loads(stdout)
        theirs, torch_mib = self.reference("learn_online_pytorch.py", self.work / "sd-turbo", self.device,
                                           "f32" if self.dry else "bf16", self.size, pairs, 5)
        return {"pairs": pairs, "transitions": ours["transitions"], "trainable_pso": ours["trainable"],
                "trainable_pytorch": theirs["trainable"], "pso_seconds_per_step": ours["seconds_per_step"],
                "pytorch_seconds_per_step": theirs["seconds_per_step"],
                "ratio": ours["seconds_per_step"] / theirs["seconds_per_step"],
                "pso_peak_process_mib": pso_mib, "pytorch_peak_process_mib": torch_mib,
                "pytorch_peak_allocated_mib": theirs.get("peak_allocated_mib")}

    # ---- 4. scoring speed -----------------------------------------------------------------

    def score_speed(self):
        from PIL import Image
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer
        images, batch = (64, 16) if not self.dry else (8, 4)
        stdout, _ = self.pso("bench", "score", "--scorer", "pickscore", "--model", self.work / "pickscore",
                             "--images", images, "--batch", batch)
        ours = json.loads(stdout)["images_per_s"]
        folder = self.work / "pickscore"
        dtype = torch.float32 if self.dry else torch.float16
        model = CLIPModel.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        rng = np.random.default_rng(0)
        pils = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(images)]

        @torch.no_grad()
        def score(chunk):
            pixels = processor(chunk, return_tensors="pt")["pixel_values"].to(self.device, dtype)
            text = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").to(self.device)
            im = model.get_image_features(pixel_values=pixels)
            tx = model.get_text_features(**text)
            im = getattr(im, "pooler_output", im)
            tx = getattr(tx, "pooler_output", tx)
            im, tx = im / im.norm(dim=-1, keepdim=True), tx / tx.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp() * im @ tx.T)[:, 0].float().cpu()

        def one_pass():
            start = time.perf_counter()
            for i in range(0, images, batch):
                score(pils[i:i + batch])
            return time.perf_counter() - start
        one_pass()
        theirs = images / min(one_pass() for _ in range(3))
        return {"images": images, "batch": batch, "pso_images_per_s": ours, "transformers_images_per_s": theirs,
                "ratio": ours / theirs, "note": "pso scores in its default dtype on the device; transformers in fp16"}

    # ---- 5. online loop -------------------------------------------------------------------

    def online_loop(self):
        minutes = 0.15 if self.dry else 1.0
        rows = []
        for mode, extra in [("alternating", ""), ("concurrent", f'actor_device = "{self.device}"\n')]:
            config = self.run_config(f"online-{mode}", f"""[reward]
scorer = "pickscore"
model = "{self.work / 'pickscore'}"
[online]
prompts_per_round = {2 if self.dry else 8}
{extra}[eval]
every = 0
""")
            run_dir = self.work / f"online-{mode}"
            self.pso("online", "--config", config, "--out", run_dir, "--max-hours", minutes / 60,
                     timeout=int(minutes * 60) + 240)
            lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            last = [m for m in lines if "learner_busy" in m][-1]
            rows.append({"mode": mode, "minutes": minutes, "steps": last.get("step"),
                         "pairs_per_hour": last["pairs_per_s"] * 3600, "learner_busy": last["learner_busy"]})
            log(f"  {rows[-1]}")
        return {"rows": rows}

    # ---- flow models (--stages flow) -------------------------------------------------------

    def flow_build(self):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from make_z_image import tiny_tokenizer
        from transformers import Qwen3Config, Qwen3Model

        spec = self.spec["z-image-turbo"]
        tok, fast = tiny_tokenizer()
        scheduler = {k: v for k, v in spec["scheduler"].items() if k != "class"}
        torch.manual_seed(0)
        with torch.device(self.device):
            pipe = ZImagePipeline(
                transformer=ZImageTransformer2DModel.from_config(spec["transformer"]),
                vae=AutoencoderKL.from_config(spec["vae"]),
                text_encoder=Qwen3Model(Qwen3Config(**spec["text_encoder"], vocab_size=tok.get_vocab_size())),
                tokenizer=fast, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler))
            pipe.to(torch.float32 if self.dry else torch.bfloat16).save_pretrained(self.work / "z-image-turbo")
            built = sum(p.numel() for p in pipe.transformer.parameters())
            del pipe
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return {"parameters": {"z-image-turbo": built}}

    def flow_dtype(self):
        return ("f32", torch.float32) if self.dry else ("bf16", torch.bfloat16)

    def flow_parity(self):
        from PIL import Image
        from safetensors.torch import save_file
        dtype, torch_dtype = self.flow_dtype()
        pipe = self.diffusers_pipeline("z-image-turbo", torch_dtype)
        size, rows = self.flow_size, []
        side = 2 * (size // 16)
        for steps in [4, 9]:
            latents = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(steps))
            noise = self.work / f"flow-noise-{steps}.safetensors"
            save_file({"latents": latents.contiguous()}, str(noise))
            out = self.work / f"flow-parity-{steps}"
            self.pso("sample", "--model", self.work / "z-image-turbo", "--prompt", PROMPT, "--steps", steps,
                     "--init-noise", noise, "--height", size, "--width", size, "--dtype", dtype, "--device",
                     self.device, "--out", out)
            with torch.no_grad():
                theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
                              latents=latents.to(self.device), output_type="np").images
            theirs = (theirs[0] * 255).round().astype(np.int16)
            ours = np.asarray(Image.open(out / "000000.png").convert("RGB")).astype(np.int16)
            diff = np.abs(ours - theirs)
            rows.append({"model": "z-image-turbo", "dtype": dtype, "steps": steps, "max_abs": int(diff.max()),
                         "mean_abs": round(float(diff.mean()), 4), "p99_abs": float(np.percentile(diff, 99))})
            log(f"  {rows[-1]}")
        del pipe
        if self.device == "cuda":
            torch.cuda.empty_cache()
        bar = {"f32": ("max_abs", 3), "bf16": ("mean_abs", 6)}
        for row in rows:
            key, limit = bar[row["dtype"]]
            row["pass"] = row[key] <= limit
        return {"rows": rows, "bar": {k: f"{m} <= {v}/255" for k, (m, v) in bar.items()}}

    def flow_sample_speed(self):
        dtype, torch_dtype = self.flow_dtype()
        cases = [(4, 1), (9, 1), (4, 4)] if not self.dry else [(1, 1), (2, 2)]
        size, rows = self.flow_size, []
        stdout, pso_mib = self.pso("bench", "sample", "--model", self.work / "z-image-turbo", "--steps",
                                   ",".join(sorted({str(s) for s, _ in cases})), "--batch",
                                   ",".join(sorted({str(b) for _, b in cases})), "--size", size, "--dtype", dtype,
                                   "--device", self.device, "--repeats", 3, peak=True)
        ours = {(c["steps"], c["batch"]): c["images_per_s"] for c in json.loads(stdout)["cases"]}
        pipe = self.diffusers_pipeline("z-image-turbo", torch_dtype)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for steps, batch in cases:
            def run():
                self.sync()
                start = time.perf_counter()
                with torch.no_grad():
                    pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
                         num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(0),
                         output_type="np")
                self.sync()
                return time.perf_counter() - start
            run()
            theirs = batch / min(run() for _ in range(3))
            rows.append({"model": "z-image-turbo", "dtype": dtype, "size": size, "steps": steps, "batch": batch,
                         "pso_images_per_s": ours[(steps, batch)], "diffusers_images_per_s": theirs,
                         "ratio": ours[(steps, batch)] / theirs})
            log(f"  {rows[-1]}")
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        rows.append({"model": "z-image-turbo", "pso_peak_process_mib": pso_mib, "diffusers_peak_allocated_mib": peak})
        del pipe
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return {"rows": rows}

    def flow_learn(self):
        """Recomputed blocks first: kept ones may not fit an 80 GB GPU at 1024², and a row that fails
        (out of memory on either side) is recorded as such."""
        rows = []
        for recompute in [True, False]:
            try:
                rows.append(self.flow_learn_row(recompute))
            except Exception:  # noqa: BLE001 - one failed row is a result; the other still runs
                rows.append({"recompute_blocks": recompute, "error": traceback.format_exc(limit=3)[-3000:]})
            log(f"  {rows[-1]}")
        return {"rows": rows}

    def flow_learn_row(self, recompute):
        dtype, _ = self.flow_dtype()
        pairs = 1
        config = self.run_config(f"flow-learn-{int(recompute)}", model="z-image-turbo",
                                 sampler='name = "flow_match_euler"\nflow_kernel = "renoise"', size=self.flow_size,
                                 learner=f"batch_size = {pairs}\nrecompute_blocks = {str(recompute).lower()}")
        stdout, pso_mib = self.pso("bench", "learn", "--config", config, "--pairs", pairs, "--repeats", 3,
                                   peak=True)
        ours = json.loads(stdout)
        theirs, torch_mib = self.reference("learn_flow_pytorch.py", self.work / "z-image-turbo", self.device, dtype,
                                           self.flow_size, pairs, TRAINING_STEPS, int(recompute), 3)
        return {"recompute_blocks": recompute, "pairs": pairs, "transitions": ours["transitions"],
                "trainable_pso": ours["trainable"], "trainable_pytorch": theirs["trainable"],
                "pso_seconds_per_step": ours["seconds_per_step"],
                "pytorch_seconds_per_step": theirs["seconds_per_step"],
                "ratio": ours["seconds_per_step"] / theirs["seconds_per_step"],
                "pso_peak_process_mib": pso_mib, "pytorch_peak_process_mib": torch_mib,
                "pytorch_peak_allocated_mib": theirs.get("peak_allocated_mib")}

    def run(self):
        if self.args.stages == "flow":
            self.stage("flow_build", 120, self.flow_build)
            if "error" in self.results["stages"]["flow_build"]:
                return
            self.stage("flow_parity", 60, self.flow_parity)
            self.stage("flow_sample_speed", 90, self.flow_sample_speed)
            self.stage("flow_learn", 90, self.flow_learn)
            return
        self.stage("build", 60, self.build)
        if "error" in self.results["stages"]["build"]:
            return
        self.stage("parity", 60, self.parity)
        self.stage("sample_speed", 60, self.sample_speed)
        self.stage("learn", 45, self.learn)
        self.stage("score_speed", 30, self.score_speed)
        self.stage("online_loop", 150 if not self.dry else 20, self.online_loop)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pso", required=True, help="the pso binary")
    parser.add_argument("--out", required=True, help="results.json goes here")
    parser.add_argument("--work", help="models and runs (default OUT/work)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, fp32")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all stages")
    parser.add_argument("--stages", choices=["unet", "flow"], default="unet",
                        help="unet: the UNet / DiT / scorer / loop stages; flow: Z-Image-Turbo's")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check = Check(args)
    check.run()
    check.save()
    failed = [n for n, s in check.results["stages"].items() if "error" in s]
    log(f"done in {check.results['seconds']} s; failed stages: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
