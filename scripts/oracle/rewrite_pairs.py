"""Rewrites every shard of a pair store with pyarrow's defaults, as a user filtering a store
in Python would: read the table, keep every other row, give `timesteps` pyarrow's default list
type (`pa.list_(pa.int32())`, elements nullable), write it back (pyarrow names list elements
`element` in Parquet). Prints the Arrow type pyarrow reads `timesteps` as afterwards.

Usage: rewrite_pairs.py STORE_DIR
"""

import glob
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    store = sys.argv[1]
    types = {}
    for path in sorted(glob.glob(f"{store}/*.parquet")):
        table = pq.read_table(path)
        table = table.take(list(range(0, table.num_rows, 2)))
        column = table.schema.get_field_index("timesteps")
        table = table.set_column(
            column, "timesteps", table["timesteps"].cast(pa.list_(pa.int32()))
        )
        pq.write_table(table, path)
        types[path] = str(pq.read_table(path).schema.field("timesteps").type)
    print(json.dumps(types))


if __name__ == "__main__":
    main()
