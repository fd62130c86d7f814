# /// script
# requires-python = ">=3.11"
# dependencies = ["deltalake>=1.0"]
# ///
"""The floor: the least work that moves a SQLite table into a local Delta table.

Reads by a cursor in batches of plain `sqlite3` rows, builds Arrow arrays with
arro3-core (the timestamp text cast by Arrow), and streams everything into ONE
Delta append. No state, no types beyond the declared ones, no lineage columns: what
any uploader must at least spend. Used by bench.py as the baseline of each ratio.

    uv run bench/floor.py DB LAKE [--order rowid|pair] [--batch-size N]
"""

import argparse
import shutil
import sqlite3

from arro3.core import Array, DataType, Field, RecordBatch, RecordBatchReader, Schema
from deltalake import write_deltalake


def arrow_type(decl, name):
    decl = decl.upper()
    if name == "timestamp":
        return DataType.timestamp("us", tz="UTC")
    if "INT" in decl:
        return DataType.int64()
    if "REAL" in decl:
        return DataType.float64()
    return DataType.string()


def batches(conn, table, order, size):
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()
    names = [r[1] for r in info]
    types = [arrow_type(r[2], r[1]) for r in info]
    schema = Schema([Field(n, t, nullable=True) for n, t in zip(names, types)])
    if order == "rowid":
        sql = f"SELECT * FROM {table} WHERE id > ? ORDER BY id LIMIT {size}"
    else:
        sql = (f"SELECT * FROM {table} WHERE (timestamp, id) > (?, ?) "
               f"ORDER BY timestamp, id LIMIT {size}")
    cursor = [0] if order == "rowid" else ["", 0]

    def gen():
        nonlocal cursor
        while True:
            rows = conn.execute(sql, cursor).fetchall()
            if not rows:
                return
            last = rows[-1]
            cursor = [last[0]] if order == "rowid" else [last[1], last[0]]
            arrays = []
            for values, typ in zip(zip(*rows), types):
                if typ == DataType.timestamp("us", tz="UTC"):
                    arrays.append(Array(values, DataType.string()).cast(typ))
                else:
                    arrays.append(Array(values, typ))
            yield RecordBatch(arrays, schema=schema)

    return schema, gen()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("lake")
    parser.add_argument("--table", default="sensor_readings")
    parser.add_argument("--order", choices=("rowid", "pair"), default="rowid")
    parser.add_argument("--batch-size", type=int, default=100_000)
    args = parser.parse_args()
    shutil.rmtree(args.lake, ignore_errors=True)
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True, check_same_thread=False)
    schema, gen = batches(conn, args.table, args.order, args.batch_size)
    write_deltalake(args.lake, RecordBatchReader.from_batches(schema, gen), mode="append")


if __name__ == "__main__":
    main()
