"""Writes a small Parquet file in the Pick-a-Pic v2 layout with pyarrow, as the dataset ships.

Usage: make_pickapic.py OUT.parquet ROWS. Every third row is a tie (label 0.5/0.5); the rest
alternate winners. Extra columns of the real dataset are included and must be ignored.
"""
import io
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg(seed: int) -> bytes:
    img = Image.new("RGB", (48, 32), ((seed * 40) % 256, (seed * 90) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


out, rows = sys.argv[1], int(sys.argv[2])
labels = [(0.5, 0.5) if i % 3 == 2 else ((1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)) for i in range(rows)]
table = pa.table(
    {
        "are_different": pa.array([True] * rows),
        "best_image_uid": pa.array([f"uid{i}" for i in range(rows)]),
        "caption": pa.array([f"a photo of object {i}" for i in range(rows)], pa.large_string()),
        "jpg_0": pa.array([jpeg(2 * i) for i in range(rows)], pa.binary()),
        "jpg_1": pa.array([jpeg(2 * i + 1) for i in range(rows)], pa.large_binary()),
        "label_0": pa.array([a for a, _ in labels], pa.float64()),
        "label_1": pa.array([b for _, b in labels], pa.float64()),
        "model_0": pa.array(["sdxl"] * rows),
        "model_1": pa.array(["sd2.1"] * rows),
    }
)
pq.write_table(table, out)
