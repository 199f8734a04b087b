"""A tiny random OpenCLIP model saved as an HPSv2 checkpoint, and the HPSv2 scores OpenCLIP gives it.

Usage: make_hpsv2.py OUTDIR. Writes OUTDIR/hps.pt ({"state_dict": ...}, as HPS_v2.1_compressed.pt is
laid out), OUTDIR/images/{0,1,2}.png (one of them not square) and OUTDIR/scores.json:
{"prompt": [score per image]} for two prompts, computed as HPSv2's img_score.py does: OpenCLIP's eval
transform (224, OpenAI mean/std), its tokenizer, `model(image, text)` and the diagonal of
image_features @ text_features.T (both normalised by the model).
"""
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

PROMPTS = ["a red square on a dark ground", "A photo of a cat, highly detailed"]


def main():
    out = Path(sys.argv[1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=32, image_size=224),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
        output_dict=True,
    )
    with torch.no_grad():
        # Away from the init's ones and zeros, so a swapped or missing tensor shows.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    torch.save({"state_dict": model.state_dict()}, out / "hps.pt")

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(224, 224), (300, 200), (96, 128)]):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = [220, 30, 30]
        path = out / "images" / f"{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)

    preprocess = open_clip.image_transform(
        224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    scores = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            row = []
            for path in paths:
                image = preprocess(Image.open(path)).unsqueeze(0)
                text = tokenizer([prompt])
                outputs = model(image, text)
                image_features, text_features = outputs["image_features"], outputs["text_features"]
                row.append(float(torch.diagonal(image_features @ text_features.T)[0]))
            scores[prompt] = row
    (out / "scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main()
