"""Builds tiny random-weight CLIPModels with transformers and records their outputs.

Usage: make_clip.py OUTDIR. For each case NAME (`quick`: quick_gelu, eos-id pooling, pads with
<|endoftext|>; `gelu`: exact gelu, legacy `eos_token_id == 2` pooling, pads with "!") it writes
OUTDIR/NAME/, an HF CLIPModel folder (config.json, model.safetensors, preprocessor_config.json,
tokenizer.json, tokenizer_config.json, vocab.json, merges.txt) plus `aesthetic.safetensors` (an
aesthetic-predictor MLP on the projected image embedding, converted from a .pth by
scripts/convert_aesthetic.py), and OUTDIR/NAME_text_encoder/, its text tower saved as a
CLIPTextModelWithProjection (also as an fp16 variant). OUTDIR/images/*.png are the test images, OUTDIR/expected.safetensors
the reference tensors (fp32, CPU) and OUTDIR/manifest.json the prompts, images and key names.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)


from tiny_clip_vocab import EOS_ID as eos_id, MERGES as merges, VOCAB as vocab  # noqa: E402

PROMPTS = [
    "a photo of a cat",
    "The QUICK brown fox,   jumps!\tover the lazy dog... (twice?) 12,345",
    "naïve café — 東京 🚀 don't it's we'll THEY'RE",
    "",
    "a cat<|endoftext|> after the end",
    " ".join(["the photo of a dog running in the park"] * 12),
]

# Odd sizes (W, H): upscaled, downscaled, unchanged, and strongly non-square.
SIZES = [(37, 61), (300, 17), (224, 224), (512, 333), (5, 7), (32, 32)]
images = []
(out / "images").mkdir(exist_ok=True)
rng = np.random.default_rng(0)
for w, h in SIZES:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 128 + 100 * np.sin(xx / 3 + yy / 5)], -1)
    noisy = np.clip(smooth + rng.normal(0, 40, size=smooth.shape), 0, 255).astype(np.uint8)
    name = f"{w}x{h}.png"
    Image.fromarray(noisy, "RGB").save(out / "images" / name)
    images.append(name)
pil_images = [Image.open(out / "images" / n).convert("RGB") for n in images]

PROCESSOR = dict(
    size={"shortest_edge": 35}, crop_size={"height": 32, "width": 32}, resample=3, do_center_crop=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)
CASES = {
    "quick": dict(hidden_act="quick_gelu", eos_token_id=eos_id, pad_token="<|endoftext|>"),
    "gelu": dict(hidden_act="gelu", eos_token_id=2, pad_token="!"),
}
expected = {}
manifest = {"prompts": PROMPTS, "images": images, "cases": list(CASES), "layers": 2}
for case, spec in CASES.items():
    torch.manual_seed(0)
    folder = out / case
    folder.mkdir(exist_ok=True)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act=spec["hidden_act"])
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=77, eos_token_id=spec["eos_token_id"],
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=1),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )
    model = CLIPModel(config).eval()
    # Random values everywhere (default init zeroes biases and sets norms to 1): every weight matters.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "logit_scale":
                continue
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        if case == "gelu":
            # Random towers give one sign of cosine for every pair; flip it here so that CLIPScore's
            # max(cos, 0) is seen on both sides.
            model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    # The text tower alone, as in a diffusers `text_encoder_2/` folder.
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**dict(config.text_config.to_dict(), projection_dim=16)))
    text_encoder.text_model.load_state_dict(model.text_model.state_dict())
    text_encoder.text_projection.load_state_dict(model.text_projection.state_dict())
    text_encoder.save_pretrained(out / f"{case}_text_encoder")
    text_encoder.half().save_pretrained(out / f"{case}_text_encoder", variant="fp16")

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              pad_token=spec["pad_token"], model_max_length=77)
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessorPil(**PROCESSOR)
    processor.save_pretrained(folder)

    text = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pixels = processor(pil_images, return_tensors="pt")["pixel_values"]
    # Ids that tell the pooling rules apart: row 0 has two <|endoftext|> (the first counts) and
    # larger ids before them, row 1 has none.
    gen = torch.Generator().manual_seed(2)
    synthetic = torch.randint(0, eos_id - 1, (2, 77), generator=gen)
    synthetic[0, 10] = synthetic[0, 20] = eos_id
    synthetic[0, 3] = eos_id - 1
    with torch.no_grad():
        synthetic_pooled = model.text_model(input_ids=synthetic).pooler_output
        t_nomask = model.text_model(input_ids=text["input_ids"], output_hidden_states=True)
        t_mask = model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        v = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        out_all = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        text_embeds = model.text_projection(t_nomask.pooler_output)
        image_embeds = model.visual_projection(v.pooler_output)
        tn = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        im = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        cos = im @ tn.T
        pickscore = model.logit_scale.exp() * cos
        clipscore = 100 * cos.clamp(min=0)

    assert len(t_nomask.hidden_states) == 3 and len(v.hidden_states) == 3
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    ).eval()
    # Published checkpoints are a state dict of a module whose Sequential is called `layers`.
    torch.save({f"layers.{k}": t for k, t in mlp.state_dict().items()}, folder / "aesthetic.pth")
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "convert_aesthetic.py"),
                    str(folder / "aesthetic.pth"), str(folder / "aesthetic.safetensors")], check=True)
    (folder / "aesthetic.pth").unlink()
    with torch.no_grad():
        aesthetic = mlp(im)[:, 0]

    record = {
        "input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels,
        "text_last_hidden": t_nomask.last_hidden_state,
        "text_last_hidden_masked": t_mask.last_hidden_state,
        "text_hidden_states": torch.stack(t_nomask.hidden_states),
        "text_pooled": t_nomask.pooler_output, "text_embeds": text_embeds,
        "synthetic_ids": synthetic, "synthetic_pooled": synthetic_pooled,
        "image_last_hidden": v.last_hidden_state, "image_hidden_states": torch.stack(v.hidden_states),
        "image_pooled": v.pooler_output, "image_embeds": image_embeds,
        "logits_per_image": out_all.logits_per_image,
        "pickscore": pickscore, "clipscore": clipscore, "aesthetic": aesthetic,
    }
    for k, t in record.items():
        expected[f"{case}.{k}"] = t.contiguous()

# The preprocessing alone, with a non-square crop and a crop larger than the resized image.
for name, cfg in {
    "wide": dict(size={"shortest_edge": 45}, crop_size={"height": 30, "width": 41}),
    "padded": dict(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 23}),
}.items():
    p = CLIPImageProcessorPil(**dict(PROCESSOR, **cfg))
    folder = out / "preprocess" / name
    p.save_pretrained(folder)
    expected[f"preprocess.{name}"] = p(pil_images, return_tensors="pt")["pixel_values"]
manifest["preprocess"] = ["wide", "padded"]
save_file(expected, str(out / "expected.safetensors"))
(out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
