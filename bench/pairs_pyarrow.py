"""pyarrow's side of bench/pairs.rs: reads the same store the same ways, prints seconds as JSON.

Usage: pairs_pyarrow.py STORE_DIR PROJECTED_COLUMNS REPLAY_COLUMNS (comma-separated).
"""
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

store, projected, replay = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
files = sorted(str(p) for p in store.glob("*.parquet"))


def timed(columns):
    start = time.perf_counter()
    rows = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
            rows += batch.num_rows
    return time.perf_counter() - start


print(json.dumps({"full_s": timed(None), "projected_s": timed(projected), "replay_s": timed(replay)}))
