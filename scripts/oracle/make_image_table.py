"""Writes Parquet image tables with Hugging Face `datasets`, as a dataset repository holds them.

Usage: make_image_table.py OUTDIR. Writes
- OUTDIR/classes/data/train-0000{0,1}-of-00002.parquet: 5 PNG images of an Image feature with a
  ClassLabel `label` (names "cat, kitty" and "dog"), in two shards;
- OUTDIR/captions.parquet: 3 images with a text column `text`;
- OUTDIR/unlabelled.parquet: 2 images whose ClassLabel is -1 (datasets' mark of a test split);
- OUTDIR/expected.safetensors: each table's pixels ([N, 16, 16, 3] uint8, reading order) and
  OUTDIR/expected.json: each table's labels.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value, disable_progress_bars
from PIL import Image as PILImage
from safetensors.torch import save_file

disable_progress_bars()
out = Path(sys.argv[1])
rng = np.random.default_rng(0)


def images(n):
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


expected, labels = {}, {}

pixels = images(5)
class_ids = [1, 0, 1, 1, 0]
classes = Dataset.from_dict(
    {"image": [PILImage.fromarray(p) for p in pixels], "label": class_ids},
    features=Features({"image": Image(), "label": ClassLabel(names=["cat, kitty", "dog"])}),
)
for i in range(2):
    shard = classes.shard(num_shards=2, index=i, contiguous=True)
    shard.to_parquet(str(out / "classes" / "data" / f"train-{i:05d}-of-00002.parquet"))
expected["classes"] = pixels
labels["classes"] = class_ids

pixels = images(3)
texts = ["a red square", "a blue circle", "a green triangle"]
Dataset.from_dict(
    {"text": texts, "image": [PILImage.fromarray(p) for p in pixels]},
    features=Features({"text": Value("string"), "image": Image()}),
).to_parquet(str(out / "captions.parquet"))
expected["captions"] = pixels
labels["captions"] = texts

Dataset.from_dict(
    {"image": [PILImage.fromarray(p) for p in images(2)], "label": [-1, -1]},
    features=Features({"image": Image(), "label": ClassLabel(names=["cat, kitty", "dog"])}),
).to_parquet(str(out / "unlabelled.parquet"))

save_file({k: torch.from_numpy(np.stack(v)) for k, v in expected.items()}, str(out / "expected.safetensors"))
(out / "expected.json").write_text(json.dumps(labels))
