"""Reads a pso pair store with pyarrow, pandas, polars and DuckDB; prints what each saw as JSON.

Usage: read_pairs.py STORE_DIR. Test oracle: proves the store is readable as is by common tools.
"""
import io
import json
import sys
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
from PIL import Image

store = Path(sys.argv[1])
files = sorted(str(p) for p in store.glob("*.parquet"))

table = pq.read_table(files)
meta = pq.read_metadata(files[0]).metadata
out = {
    "schema_version": meta[b"pso.pairs.schema_version"].decode(),
    "pyarrow": {
        "rows": table.num_rows,
        "types": {f.name: str(f.type) for f in table.schema},
        "prompt": table.column("prompt").to_pylist(),
        "label": table.column("label").to_pylist(),
        "seed_0": table.column("seed_0").to_pylist(),
        "image_0_size": [
            list(Image.open(io.BytesIO(b)).size) for b in table.column("image_0").to_pylist()
        ],
    },
    "pandas": {"rows": len(pd.concat([pd.read_parquet(f) for f in files]))},
    "polars": {"rows": pl.read_parquet(files).height},
}
con = duckdb.connect()
rows, ties = con.execute(
    "select count(*), count(*) filter (where label = -1) from read_parquet(?)", [files]
).fetchone()
out["duckdb"] = {"rows": rows, "ties": ties}
print(json.dumps(out))
