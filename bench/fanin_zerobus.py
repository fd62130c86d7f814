#!/usr/bin/env python3
"""Fan-in benchmark, Zerobus Ingest (issue 16, point 4): many nodes push into one route,
then one read of the deduplicated view.

    uv run --with-requirements sqlite_to_databricks_uploader.py \\
        nice python bench/fanin_zerobus.py --nodes 256 --cycles 3 --rows 200

The shape of bench/fanin.py (its landing and warehouse targets), for the Zerobus target:
N simulated nodes run in this process as threads (compressed time: no interval; between
two cycles each node's sensor adds --rows rows to its own SQLite file). Each node is the
uploader's own job (open_job, run_cycle: the cycle's code, its checkpoint and its sink)
with its own state directory and SOURCE_ID, all writing the route table `raw_readings`
through tests/zerobus_fake.py on loopback (the table made first from the tool's own
--print-ddl statements, as an admin would; no warehouse). Then the "ingest": the
`raw_readings_deduped` view, computed on the rows the fake stored, is checked: every
source row of every node exactly once, with its node's id. Copies in the table itself
(at least once) are counted.

Reported (one JSON line, and a table row on stderr): rows, the exactly-once check,
requests by kind (token, the empty start check, inserts), request bytes per row (insert
bodies), wall time of the upload phase and per 1,000,000 rows, ingest time; and, for the
same rows, the statements and bytes the warehouse path would send (rendered by the
warehouse sink's own code, not run). The nodes share two cores with the fake service
and each other (one Python process): wall time is an upper bound for the client side
and says nothing of the real service (P50 200 ms to a durable ack per its documentation).
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
from tests.zerobus_fake import ZerobusFake  # noqa: E402

SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "timestamp TEXT NOT NULL, sensor TEXT, value REAL)")
TABLE = "raw_readings"
DATABASE = "main.sensors"


def make_source(path, node, rows, start=0):
    """Add `rows` readings to a node's SQLite file."""
    with sqlite3.connect(path) as conn:
        conn.execute(SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
        conn.executemany("INSERT INTO readings (timestamp, sensor, value) VALUES (?, ?, ?)",
                         [(f"2026-01-01T00:{(start + i) // 60 % 60:02d}:{(start + i) % 60:02d}Z",
                           f"{node}-s{i % 8}", (start + i) * 0.5) for i in range(rows)])
    conn.close()


def config_for(db, env, batch_size):
    return up.check_target(up.load_config(up.build_parser().parse_args(
        ["--sqlite", db, "--batch-size", str(batch_size)]), env))


def run_node(i, tmp, env, args, errors):
    """One node: its cycles, its sensor adding rows between them."""
    node = f"node-{i:04d}"
    db = os.path.join(tmp, f"{node}.db")
    make_source(db, node, args.rows)
    config = config_for(db, {**env, "STATE_DIR": os.path.join(tmp, "state", node),
                             "SOURCE_ID": node}, args.batch_size)
    job = None
    try:
        job = up.open_job(config, False, threading.Event(), environ={})
        for cycle in range(args.cycles):
            if cycle:
                make_source(db, node, args.rows, start=cycle * args.rows)
            up.run_cycle(job)
    except Exception as exc:  # counted and reported: the run goes on
        errors.append(f"{node}: {exc}")
    finally:
        if job is not None:
            up.close_job(job)


def warehouse_cost(tmp, nodes, batch_size):
    """(statements, bytes) the warehouse path's inline statements would take for the
    same rows, rendered with the warehouse sink's own code (not run)."""
    statements = size = 0
    budget = 1_048_576 * 0.985 - 1000  # MAX_STATEMENT_BYTES' default, as the sink cuts it
    for i in range(nodes):
        db = os.path.join(tmp, f"node-{i:04d}.db")
        conn = up.open_source(db, 5)
        source = up.describe_table(conn, None, None, db)
        for chunk in up.read_batches(conn, source, None, batch_size):
            chunk.kinds = up.resolve_kinds(chunk, {})
            rows, names, _ = up.render_rows(chunk)
            for statement in up.inline_statements([up.InlineRows(rows, names)], budget,
                                                  f"node-{i:04d}", "s-1"):
                statements += 1
                size += len(statement.assemble(f"`main`.`sensors`.`{TABLE}`").encode())
        conn.close()
    return statements, size


def run(args):
    """One benchmark run; the figures as a dict."""
    logging.getLogger("uploader").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="uploader-fanin-zerobus-")
    service = ZerobusFake()
    address = service.start()
    fqn = f"{DATABASE}.{TABLE}"
    errors = []
    try:
        env = {"TARGET": "zerobus", "DATABRICKS_HOST": address,
               "ZEROBUS_ENDPOINT": f"http://{address}",
               "ZEROBUS_WORKSPACE_ID": service.workspace_id,
               "DATABRICKS_CLIENT_ID": "sp-id", "DATABRICKS_CLIENT_SECRET": "sp-secret",
               "DATABRICKS_DATABASE": DATABASE}
        sample = os.path.join(tmp, "ddl-sample.db")
        make_source(sample, "sample", 1)
        ddl = up.print_ddl(config_for(sample, env, args.batch_size), {})
        service.create_table(fqn, ddl.split(";\n")[0])
        threads = [threading.Thread(target=run_node, args=(i, tmp, env, args, errors))
                   for i in range(args.nodes)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        upload = time.perf_counter() - started
        started = time.perf_counter()
        view = service.deduped(fqn)
        landed = [(r["_source_id"], r["id"]) for r in view]
        ingest = time.perf_counter() - started
        kinds, body = collections.Counter(), 0
        for path, status, size in service.requests:
            kind = ("token" if path == "/oidc/v1/token" else
                    "insert" if size > 2 else "start check")
            kinds[kind] += 1
            body += size if kind == "insert" else 0
        copies = len(service.rows[fqn]) - len(view)
        # one batch per node and cycle, as the nodes sent them
        statements, sql_bytes = warehouse_cost(tmp, args.nodes,
                                               min(args.rows, args.batch_size))
    finally:
        service.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    want = {(f"node-{i:04d}", r) for i in range(args.nodes)
            for r in range(1, args.rows * args.cycles + 1)}
    counts = collections.Counter(landed)
    rows = len(want)
    return {"target": "zerobus", "nodes": args.nodes, "cycles": args.cycles,
            "rows_per_cycle": args.rows, "rows": rows,
            "exactly_once": set(counts) == want and max(counts.values(), default=0) == 1,
            "duplicates": sum(n - 1 for n in counts.values()),
            "missing": len(want - set(counts)), "errors": errors[:5],
            "copies_in_table": copies,
            "requests": sum(kinds.values()), "requests_by_kind": dict(kinds),
            "requests_per_1000_rows": round(1000 * sum(kinds.values()) / rows, 1),
            "data_bytes_per_row": round(body / rows, 1),
            "upload_seconds": round(upload, 2),
            "seconds_per_million_rows": round(upload / rows * 1e6, 1),
            "ingest_seconds": round(ingest, 2),
            "warehouse_statements": statements,
            "warehouse_bytes_per_row": round(sql_bytes / rows, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
