"""Builds a tiny random-weight DiTPipeline folder with diffusers and samples it as DiTPipeline does.

Usage: make_dit_pipeline.py OUTDIR. Writes OUTDIR/pipeline/ (model_index.json with an id2label,
transformer/ with a learned sigma and the 1000 ImageNet-sized classes DiTPipeline's hard-coded null
class 1000 needs, vae/, scheduler/ with DDIMScheduler), OUTDIR/ddpm_scheduler/ (a DDPMScheduler
config to swap in), and per case OUTDIR/<case>.safetensors (`images`: uint8 [N, H, W, 3]) with
OUTDIR/cases.json giving each case's scheduler, class labels, guidance, steps and seeds. The
pipeline's generator is torch.Generator("cpu").manual_seed(seed) and draws the initial latents;
DiTPipeline does not hand it to `scheduler.step`, so DDPM's noise comes from torch's global
generator, seeded with global_seed just before the call.
"""
import json
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.utils import logging
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from make_dit import randomize  # noqa: E402

out = Path(sys.argv[1])
torch.manual_seed(0)
transformer = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                              num_embeds_ada_norm=1000), 0.2)
vae = tiny_models.vae(False)
# DiT's own scheduler settings (the converted facebook/DiT checkpoints): linear betas, no clipping.
scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
folder = out / "pipeline"
pipe.save_pretrained(folder)
# save_pretrained does not keep id2label; the hub folders carry it in model_index.json.
index = json.loads((folder / "model_index.json").read_text())
index["id2label"] = {"3": "tiger shark, Galeocerdo cuvieri", "207": "golden retriever", "999": "toilet tissue"}
(folder / "model_index.json").write_text(json.dumps(index, indent=1))
ddpm = DDPMScheduler(beta_schedule="linear", clip_sample=False)
ddpm.save_pretrained(out / "ddpm_scheduler")

logging.set_verbosity_error()  # id2label from JSON has string keys, as on the hub
pipe = DiTPipeline.from_pretrained(folder, dtype=torch.float32)
assert pipe.get_label_ids(["golden retriever", "Galeocerdo cuvieri"]) == [207, 3], pipe.labels
pipe.set_progress_bar_config(disable=True)
ddpm_pipe = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae,
                        scheduler=DDPMScheduler.from_pretrained(out / "ddpm_scheduler"))
ddpm_pipe.set_progress_bar_config(disable=True)

cases = []
for name, p, scheduler, labels, guidance, steps, seed in [
    ("ddim-guided", pipe, "ddim", [207, 3, 0], 4.0, 5, 1),
    ("ddim-unguided", pipe, "ddim", [999], 1.0, 3, 2),
    ("ddpm-guided", ddpm_pipe, "ddpm", [3, 500], 3.0, 4, 3),
    ("ddpm-unguided", ddpm_pipe, "ddpm", [12], 1.0, 4, 4),
]:
    global_seed = 1000 + seed
    torch.manual_seed(global_seed)
    with torch.no_grad():
        images = p(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    images = torch.from_numpy((images * 255).round().astype("uint8"))
    save_file({"images": images.contiguous()}, str(out / f"{name}.safetensors"))
    cases.append(dict(case=name, scheduler=scheduler, class_labels=labels, guidance=guidance, steps=steps,
                      seed=seed, global_seed=global_seed))
(out / "cases.json").write_text(json.dumps(cases, indent=1))
