#!/usr/bin/env python3
"""read_batches over 50 batches of 2000 rows of a 1M-row WITHOUT ROWID table (PRIMARY
KEY (sensor, ts), pair cursor (ts, sensor), no timestamp index): the cost of the row
marks' first-row read beside the batch reads. Best of 3 passes, in this process.

    nice uv run --with-requirements sqlite_to_databricks_uploader.py \\
        python bench/first_row.py [SCRIPT] [DB]

SCRIPT: the uploader to time (default: this checkout's; `git show REV:...` another);
DB: made once (default bench/data/first_row.db).
"""
import datetime as dt
import importlib.util
import inspect
import os
import sqlite3
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
script = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    HERE, "..", "sqlite_to_databricks_uploader.py")
db = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "data", "first_row.db")
if not os.path.exists(db):
    os.makedirs(os.path.dirname(db), exist_ok=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE r (sensor TEXT, ts TEXT, v REAL, "
                 "PRIMARY KEY (sensor, ts)) WITHOUT ROWID")
    base = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    conn.executemany("INSERT INTO r VALUES (?, ?, ?)",
                     ((f"s{i % 100:03d}", (base + dt.timedelta(seconds=i // 100)).isoformat(),
                       i * 0.5) for i in range(1_000_000)))
    conn.commit()
    conn.close()
spec = importlib.util.spec_from_file_location("up", script)
up = importlib.util.module_from_spec(spec)
sys.modules["up"] = up
spec.loader.exec_module(up)
conn = sqlite3.connect(db)
source = up.describe_table(conn, "r", None, db)
keyed = {"key": "k"} if "key" in inspect.signature(up.read_batches).parameters else {}
took = []
for _ in range(3):
    started, batches, rows = time.perf_counter(), 0, 0
    for chunk in up.read_batches(conn, source, None, 2000, **keyed):
        rows += chunk.count
        batches += chunk.final
        if batches == 50:
            break
    took.append(time.perf_counter() - started)
print(f"cursor {source.cursor.kind} {source.cursor.columns}: {rows} rows in {batches} "
      f"batches: best {min(took):.2f} s of {[round(t, 2) for t in took]}")
