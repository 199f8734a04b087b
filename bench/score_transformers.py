"""The transformers side of `cargo bench --bench score`: PickScore-style scoring with CLIPModel.

Usage: score_transformers.py MODEL_DIR IMAGES_DIR PROMPT BATCH REPS
Scores the PNGs of IMAGES_DIR (sorted by name) in batches of BATCH against PROMPT, as PickScore's
reference code does (processor, tokenizer, get_image_features / get_text_features, normalise,
`logit_scale.exp() * text @ image.T`), after one warm-up batch, REPS times over the set. Prints
one JSON line: {"images_per_s": …, "threads": …, "scores": [scores of the whole set]}.
Image decoding is outside the timing, as in the Rust side.
"""
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

model_dir, images_dir, prompt, batch, reps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = CLIPModel.from_pretrained(model_dir).eval()
processor = AutoImageProcessor.from_pretrained(model_dir)
tokenizer = CLIPTokenizer.from_pretrained(model_dir)
images = [Image.open(p).convert("RGB") for p in sorted(images_dir.glob("*.png"))]
batches = [images[i:i + batch] for i in range(0, len(images), batch)]


@torch.no_grad()
def score(pils):
    pixels = processor(pils, return_tensors="pt")["pixel_values"]
    text = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")
    image_embeds = model.get_image_features(pixel_values=pixels)
    text_embeds = model.get_text_features(**text)
    # transformers ≥ 5 may return a model output instead of a tensor.
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (image_embeds @ text_embeds.T))[:, 0].tolist()


score(batches[0])
start = time.perf_counter()
for _ in range(reps):
    scores = [s for b in batches for s in score(b)]
elapsed = time.perf_counter() - start
print(json.dumps({"images_per_s": reps * len(images) / elapsed, "threads": torch.get_num_threads(), "scores": scores}))
