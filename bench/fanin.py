#!/usr/bin/env python3
"""Fan-in benchmark (issue 16, point 4): many nodes landing into one route, then one ingest.

    uv run --with-requirements sqlite_to_databricks_uploader.py --with duckdb --with sqlglot \\
        nice python bench/fanin.py --target landing --nodes 256 --cycles 3 --rows 200

N simulated nodes run in this process as threads (compressed time: no interval; between
two cycles each node's sensor adds --rows rows to its own SQLite file). Each node is the
uploader's own job (open_job, run_cycle, the sink's report_status: the cycle's code, its
checkpoint and its sink) with its own state directory and SOURCE_ID, all writing the same route
table `raw_readings`. Then one simulated ingest reads everything that landed and checks
that every source row of every node is there exactly once, with its node's id.

Targets (--target):
- landing: a loopback Files API (tests/files_api.py); the ingest reads every Parquet file
  under the route's folder (DuckDB), as Auto Loader / COPY INTO would, each file once.
- warehouse: the SQL warehouse sink on the DB-API double (tests/fake_warehouse.py, sqlglot
  + DuckDB: it parses and runs every statement, so its wall time says nothing about a
  warehouse); the ingest is a SELECT of the table. DATABRICKS_VOLUME=none (inline
  statements, the warehouse path of a node without a volume).
- zerobus: Zerobus Ingest's REST interface on its loopback double (tests/zerobus_fake.py),
  no warehouse (the table made first from --print-ddl's statements); the ingest reads
  the deduplicated view, computed on the rows the fake stored; copies in the table (at
  least once) are reported as copies_in_table.

Reported (one JSON line, and a table row): rows, exactly-once check, requests (by kind),
data bytes per row (the batch files as landed; the INSERT statements' SQL), status bytes
(status files; the warehouse's status MERGEs), the number of data files or INSERTs, wall time of the
upload phase and per 1,000,000 rows, ingest time. The nodes share two cores with the fake
service and with each other (one Python process): wall time is an upper bound for the
client side and says little about the real service.
"""

import argparse
import collections
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402

SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "timestamp TEXT NOT NULL, sensor TEXT, value REAL)")
TABLE = "raw_readings"


# === Targets =========================================================================

class LandingTarget:
    """The volume landing zone on the loopback Files API."""

    VOLUME = "/Volumes/main/sensors/landing"

    def __init__(self, tmp):
        from tests import files_api
        self.service = files_api.FilesApi(volumes=[self.VOLUME])

    def env(self):
        return {"TARGET": "landing", "DATABRICKS_HOST": f"http://{self.service.host}",
                "DATABRICKS_TOKEN": "dapi-files", "DATABRICKS_VOLUME": self.VOLUME}

    def ingest(self):
        """(node, id) of every row of every landed file of the route."""
        return [(r["_source_id"], r["id"])
                for r in self.service.ingest(f"{self.VOLUME}/{TABLE}")]

    def counters(self):
        """(requests by kind, request body bytes, data files)."""
        kinds = collections.Counter()
        for method, path, _ in self.service.requests:
            api = "files" if "/fs/files/" in path else "directories"
            what = "dir" if api != "files" else "status" if "/_nodes/" in path else "batch"
            kinds[f"{method} {what}"] += 1
        with self.service.lock:
            sizes = {p: len(d) for p, (d, _) in self.service.files.items()}
        data = sum(n for p, n in sizes.items() if p.endswith(".parquet"))
        status = sum(n for p, n in sizes.items() if "/_nodes/" in p)
        # bytes sent: every stored body was sent at least once (re-sends are counted
        # in the requests, not here), status files once per cycle
        return kinds, data, status, sum(1 for p in sizes if p.endswith(".parquet"))

    def close(self):
        self.service.close()


class WarehouseTarget:
    """The SQL warehouse sink on the DB-API double (inline statements)."""

    def __init__(self, tmp):
        from tests import fake_warehouse
        self.fake = fake_warehouse
        self.fake.WAREHOUSE = fake_warehouse.Warehouse(os.path.join(tmp, "warehouse"))
        up.DatabricksSink.connector = fake_warehouse

    def env(self):
        return {"DATABRICKS_HOST": "adb-1.2.azuredatabricks.net", "DATABRICKS_TOKEN": "dapi",
                "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/w", "DATABRICKS_VOLUME": "none",
                "DATABRICKS_DATABASE": "main.sensors"}

    def ingest(self):
        return [(r["_source_id"], r["id"]) for r in self.fake.WAREHOUSE.rows(
            f"main.sensors.{TABLE}")]

    def counters(self):
        statements = [s["sql"] for s in self.fake.WAREHOUSE.statements()]
        kinds = collections.Counter(sql.split()[0].upper() for sql in statements)
        data = sum(len(sql.encode()) for sql in statements if sql.startswith("INSERT"))
        status = sum(len(sql.encode()) for sql in statements if sql.startswith("MERGE"))
        return kinds, data, status, kinds["INSERT"]

    def close(self):
        pass


class ZerobusTarget:
    """Zerobus Ingest on its loopback double (tests/zerobus_fake.py), no warehouse: the
    table is made first from the tool's own --print-ddl statements, as an admin would.
    The ingest reads the deduplicated view (`raw_readings_deduped`, computed on the rows
    the fake stored): exactly once there; copies in the table itself (at least once:
    none without faults) are counted in requests_by_kind as "copies in the table"."""

    DATABASE = "main.sensors"

    def __init__(self, tmp):
        from tests.zerobus_fake import ZerobusFake
        self.service = ZerobusFake()
        self.address = self.service.start()
        self.fqn = f"{self.DATABASE}.{TABLE}"
        sample = os.path.join(tmp, "ddl-sample.db")
        make_source(sample, "sample", 1)
        config = up.load_config(up.build_parser().parse_args(["--sqlite", sample]),
                                self.env())
        self.service.create_table(self.fqn, up.print_ddl(config, {}).split(";\n")[0])

    def env(self):
        return {"TARGET": "zerobus", "DATABRICKS_HOST": self.address,
                "ZEROBUS_ENDPOINT": f"http://{self.address}",
                "ZEROBUS_WORKSPACE_ID": self.service.workspace_id,
                "DATABRICKS_CLIENT_ID": "sp-id", "DATABRICKS_CLIENT_SECRET": "sp-secret",
                "DATABRICKS_DATABASE": self.DATABASE}

    def ingest(self):
        return [(r["_source_id"], r["id"]) for r in self.service.deduped(self.fqn)]

    def counters(self):
        """Requests by kind (token, the empty start check, inserts of rows); the insert
        bodies' bytes; no status bytes; the inserts."""
        kinds, data = collections.Counter(), 0
        for path, _, size in self.service.requests:
            kind = ("token" if path == "/oidc/v1/token" else
                    "insert" if size > 2 else "start check")
            kinds[kind] += 1
            data += size if kind == "insert" else 0
        copies = len(self.service.rows[self.fqn]) - len(self.service.deduped(self.fqn))
        return kinds, data, 0, kinds["insert"], copies

    def close(self):
        self.service.stop()


TARGETS = {"landing": LandingTarget, "warehouse": WarehouseTarget, "zerobus": ZerobusTarget}


# === Nodes ===========================================================================

def stamp(second):
    """An ISO-8601 time `second` seconds after 2026-01-01."""
    return f"2026-01-01T{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"


def make_source(path, node, rows, start=0):
    """Add `rows` readings to a node's SQLite file; the ids of the source."""
    with sqlite3.connect(path) as conn:
        conn.execute(SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
        conn.executemany("INSERT INTO readings (timestamp, sensor, value) VALUES (?, ?, ?)",
                         [(stamp(start + i), f"{node}-s{i % 8}", (start + i) * 0.5)
                          for i in range(rows)])
    conn.close()


def run_node(i, tmp, env, args, errors):
    """One node: its cycles, its sensor adding rows between them."""
    node = f"node-{i:04d}"
    db = os.path.join(tmp, f"{node}.db")
    config = up.check_target(up.load_config(up.build_parser().parse_args(
        ["--sqlite", db, "--batch-size", str(args.batch_size)]),
        {**env, "STATE_DIR": os.path.join(tmp, "state", node), "SOURCE_ID": node}))
    make_source(db, node, args.rows)
    job = None
    try:
        job = up.open_job(config, False, threading.Event(), environ={})
        for cycle in range(args.cycles):
            if cycle:
                make_source(db, node, args.rows, start=cycle * args.rows)
            up.run_cycle(job)
            job.sink.report_status(up.node_status(job))
    except Exception as exc:  # counted and reported: the run goes on
        errors.append(f"{node}: {exc}")
    finally:
        if job is not None:
            up.close_job(job)


def run(args):
    """One benchmark run; the figures as a dict."""
    logging.getLogger("uploader").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="uploader-fanin-")
    target = TARGETS[args.target](tmp)
    errors = []
    try:
        env = target.env()
        threads = [threading.Thread(target=run_node, args=(i, tmp, env, args, errors))
                   for i in range(args.nodes)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        upload = time.perf_counter() - started
        started = time.perf_counter()
        landed = target.ingest()
        ingest = time.perf_counter() - started
        kinds, data_bytes, status_bytes, files, *copies = target.counters()
    finally:
        target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    want = {(f"node-{i:04d}", r) for i in range(args.nodes)
            for r in range(1, args.rows * args.cycles + 1)}
    counts = collections.Counter(landed)
    rows = len(want)
    return {"target": args.target, "nodes": args.nodes, "cycles": args.cycles,
            "rows_per_cycle": args.rows, "rows": rows,
            "exactly_once": set(counts) == want and max(counts.values(), default=0) == 1,
            "duplicates": sum(n - 1 for n in counts.values()),
            "missing": len(want - set(counts)), "errors": errors[:5],
            "copies_in_table": copies[0] if copies else 0,
            "requests": sum(kinds.values()), "requests_by_kind": dict(kinds),
            "requests_per_1000_rows": round(1000 * sum(kinds.values()) / rows, 1),
            "data_files": files, "data_bytes_per_row": round(data_bytes / rows, 1),
            "status_bytes": status_bytes,
            "upload_seconds": round(upload, 2),
            "seconds_per_million_rows": round(upload / rows * 1e6, 1),
            "ingest_seconds": round(ingest, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="landing")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="rows per node per cycle")
    parser.add_argument("--batch-size", type=int, default=10_000)
    args = parser.parse_args(argv)
    figures = run(args)
    print(json.dumps(figures))
    print(f"| {figures['target']} | {figures['nodes']} | {figures['rows']:,} | "
          f"{'yes' if figures['exactly_once'] else 'NO'} | {figures['requests']:,} | "
          f"{figures['data_bytes_per_row']} | {figures['seconds_per_million_rows']} | "
          f"{figures['ingest_seconds']} |", file=sys.stderr)
    return 0 if figures["exactly_once"] and not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
