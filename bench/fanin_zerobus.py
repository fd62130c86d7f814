#!/usr/bin/env python3
"""Fan-in benchmark, Zerobus Ingest (issue 16): N nodes push into one route, then one
read of the deduplicated view.

    uv run --with-requirements sqlite_to_databricks_uploader.py \\
        nice python bench/fanin_zerobus.py --nodes 256 --rows 200 [--parallel 4]

Each node is a real uploader process (`--once`, its own SQLite file of sensor rows, its
own STATE_DIR and SOURCE_ID) sending to tests/zerobus_fake.py on loopback (one process,
threads), at most --parallel at a time (compressed time: the nodes run back to back
instead of on their schedules). Then the "ingest": the `<table>_deduped` view computed
on the rows the fake stored, checked row by row against every node's source.

Reported: rows exact (each source row once in the view), requests (inserts with rows,
empty start probes, token requests), request bytes per row, the wall time of the run
and the uploader's own cycle time, both per 1,000,000 rows. For comparison, the
warehouse path's statements and bytes for the same rows are computed with the sink's
own renderer (inline `INSERT ... REPLACE WHERE` statements under MAX_STATEMENT_BYTES;
not run: a warehouse statement's time is the warehouse's).

The fake answers in microseconds, so wall time here is the node's own cost (process
start, read, encode, HTTP on loopback), not the service's latency (P50 200 ms to a
durable ack per its documentation).
"""

import argparse
import collections
import concurrent.futures
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402
from tests.zerobus_fake import ZerobusFake  # noqa: E402

SCRIPT = os.path.join(ROOT, "sqlite_to_databricks_uploader.py")
DATABASE = "main.fleet"
TABLE = "raw_sensor_readings"
CYCLE_RE = re.compile(r"cycle: (\d+) rows read, (\d+) rows uploaded .* in ([\d.]+) s")


def make_node(work, n, rows):
    """Node n's SQLite file of `rows` sensor readings (the demo's 20 columns)."""
    db = os.path.join(work, f"node{n}.db")
    conn = sqlite3.connect(db)
    conn.execute(up.DEMO_SCHEMA)
    start = up.dt.datetime(2025, 1, 1, tzinfo=up.dt.timezone.utc) + \
        up.dt.timedelta(hours=n)
    readings = up.sensor_rows(start, rows // 5 + 1, 5, seed=n)
    marks = ", ".join("?" * len(up.DEMO_COLUMNS))
    conn.executemany(f"INSERT INTO sensor_readings ({', '.join(up.DEMO_COLUMNS)}) "
                     f"VALUES ({marks})", [r for _, r in zip(range(rows), readings)])
    conn.commit()
    conn.close()
    return db


def node_env(work, n, address, fake, batch_size):
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            "STATE_DIR": os.path.join(work, f"state{n}"), "SOURCE_ID": f"node-{n:04d}",
            "TARGET": "zerobus", "DATABRICKS_HOST": address,
            "ZEROBUS_ENDPOINT": f"http://{address}",
            "ZEROBUS_WORKSPACE_ID": fake.workspace_id, "DATABRICKS_CLIENT_ID": "sp-id",
            "DATABRICKS_CLIENT_SECRET": "sp-secret", "DATABRICKS_DATABASE": DATABASE,
            "BATCH_SIZE": str(batch_size), "LOG_LEVEL": "INFO"}


def run_node(db, env):
    done = subprocess.run([sys.executable, SCRIPT, "--sqlite", db, "--once"], env=env,
                          capture_output=True, text=True, timeout=600)
    found = CYCLE_RE.findall(done.stderr)
    return done.returncode, sum(float(s) for _, _, s in found), done.stderr


def source_ids(db):
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM sensor_readings")}
    finally:
        conn.close()


def warehouse_cost(dbs, batch_size, statement_bytes=1_048_576):
    """Statements and bytes the warehouse path would send for the same rows (rendered
    with the warehouse sink's own code, not run)."""
    statements = size = 0
    for db in dbs:
        conn = up.open_source(db, 5)
        source = up.describe_table(conn, None, None, db)
        for batch in up.read_batches(conn, source, None, batch_size):
            batch.kinds = up.resolve_kinds(batch, {})
            rows, names, _ = up.render_rows(batch)
            budget = statement_bytes * 0.985 - 1000
            for statement in up.inline_statements([up.InlineRows(rows, names)], budget,
                                                  "node-0000", "s-1"):
                statements += 1
                size += len(statement.assemble(f"`main`.`fleet`.`{TABLE}`").encode())
        conn.close()
    return statements, size


def run(nodes, rows, parallel, batch_size):
    work = tempfile.mkdtemp(prefix="fanin-zerobus-")
    fake = ZerobusFake(max_request_bytes=10 * 2 ** 20)
    address = fake.start()
    try:
        dbs = [make_node(work, n, rows) for n in range(nodes)]
        env0 = node_env(work, 0, address, fake, batch_size)
        ddl = subprocess.run([sys.executable, SCRIPT, "--sqlite", dbs[0], "--print-ddl"],
                             env=env0, capture_output=True, text=True, check=True).stdout
        fqn = f"{DATABASE}.{TABLE}"
        fake.create_table(fqn, ddl.split(";\n")[0])
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(
                lambda n: run_node(dbs[n], node_env(work, n, address, fake, batch_size)),
                range(nodes)))
        wall = time.monotonic() - started
        failed = [(n, err[-300:]) for n, (code, _, err) in enumerate(results) if code]
        cycle = sum(seconds for _, seconds, _ in results)
        view = fake.deduped(fqn)
        got = collections.Counter((r["_source_id"], r["id"]) for r in view)
        want = {(f"node-{n:04d}", i) for n, db in enumerate(dbs) for i in source_ids(db)}
        total = len(want)
        inserts = [r for r in fake.requests if "/insert" in r[0] and r[1] == 200]
        with_rows = [r for r in inserts if r[2] > 2]
        body = sum(r[2] for r in with_rows)
        tokens = sum(1 for r in fake.requests if r[0] == "/oidc/v1/token")
        statements, sql_bytes = warehouse_cost(dbs, batch_size)
        return {
            "nodes": nodes, "rows": total, "failed_nodes": len(failed),
            "failures": failed[:3],
            "exact": set(got) == want and max(got.values(), default=1) == 1,
            "missing": len(want - set(got)), "extra": len(set(got) - want),
            "copies_in_table": len(fake.rows[fqn]) - len(view),
            "insert_requests": len(with_rows), "probe_requests": len(inserts) - len(with_rows),
            "token_requests": tokens, "bytes_per_row": body / total,
            "wall_s": wall, "wall_s_per_1m_rows": wall * 1e6 / total,
            "cycle_s_per_1m_rows": cycle * 1e6 / total,
            "warehouse_statements": statements, "warehouse_bytes_per_row": sql_bytes / total,
        }
    finally:
        fake.stop()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=256)
    parser.add_argument("--rows", type=int, default=200, help="rows per node")
    parser.add_argument("--parallel", type=int, default=4, help="nodes running at once")
    parser.add_argument("--batch-size", type=int, default=50_000)
    args = parser.parse_args(argv)
    result = run(args.nodes, args.rows, args.parallel, args.batch_size)
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    return 0 if result["exact"] and not result["failed_nodes"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
