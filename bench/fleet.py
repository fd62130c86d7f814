#!/usr/bin/env python3
"""Fleet benchmark (issue 14): many nodes appending to one Delta table.

    uv run --with-requirements sqlite_to_databricks_uploader.py --with 'moto[server]' \\
        python bench/fleet.py fleet --nodes 16 --store local [--seconds 60] [--interval 4]
    ... python bench/fleet.py commit-cost --commits 2000 [--store local] [--every 100]
    ... python bench/fleet.py all        (the runs below, figures to bench/FLEET.md)

`fleet` starts N node processes at once, each with its own SQLite file, state directory
and SOURCE_ID, running the uploader's real loop (JITTER on, UPLOAD_INTERVAL compressed to
a few seconds) while a sensor thread in the same process adds rows every interval.
After --seconds the nodes get SIGTERM, then each runs one --once cycle to drain, and
the table is checked row by row against every node's source. Reported: rows exact,
failed cycles (log lines of a failed cycle), commits per second sustained, p50/p99
cycle time (the uploader's own "cycle:" lines), data files and log bytes after.

`commit-cost` makes one node commit 100-row batches through DeltaSink.write (the probe,
the marker check before and the read-back after included) and reports the median
commit time per block of commits, without upkeep and with --maintain every --every
commits. The store is a local directory or moto's S3 server on loopback (`--store s3`).
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402
from tests.object_store import S3Server  # noqa: E402

REPORT = os.path.join(HERE, "FLEET.md")
SCHEMA = ("CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
          "timestamp TEXT NOT NULL, node TEXT, v INTEGER)")
CYCLE_RE = re.compile(r"cycle: (\d+) rows read, (\d+) rows uploaded .* in ([\d.]+) s")


# === One node (a child process) ======================================================

def node_main(argv):
    """bench/fleet.py node DB STATE ID BASE INTERVAL ROWS: sensor thread + uploader loop."""
    db, state, node, base, interval, rows = argv
    interval, rows = float(interval), int(rows)
    with sqlite3.connect(db) as conn:
        conn.execute(SCHEMA)
    conn = sqlite3.connect(db, check_same_thread=False)
    stop = threading.Event()

    def sensor():
        written = 0
        while not stop.wait(interval * 0.5):
            with conn:
                conn.executemany("INSERT INTO readings (timestamp, node, v) VALUES (?, ?, ?)",
                                 [(time.strftime("%Y-%m-%dT%H:%M:%SZ"), node, written + i)
                                  for i in range(rows)])
            written += rows

    threading.Thread(target=sensor, daemon=True).start()
    env = {**os.environ, "STATE_DIR": state, "SOURCE_ID": node, "DELTA_URI": base,
           "UPLOAD_INTERVAL": str(interval), "BATCH_SIZE": "5000"}
    code = up.main(["--sqlite", db], environ=env)
    stop.set()
    return code


def start_node(work, n, base, interval, rows, env):
    node = f"node-{n:03d}"
    log = open(os.path.join(work, f"{node}.log"), "w")
    proc = subprocess.Popen([sys.executable, __file__, "node", os.path.join(work, f"{node}.db"),
                             os.path.join(work, f"state-{n:03d}"), node, base, str(interval),
                             str(rows)], env=env, stdout=log, stderr=subprocess.STDOUT)
    return node, proc, log


# === The fleet run ===================================================================

def store(kind):
    """(base URI, environment, server or None) for a local directory or moto's S3."""
    work = tempfile.mkdtemp(prefix="fleet-bench-")
    if kind == "local":
        return work, os.path.join(work, "lake"), dict(os.environ), None
    server = S3Server().start()
    env = {**os.environ, **server.env()}
    os.environ.update(server.env())  # deltalake in this process reads them too
    return work, "s3://fleet-bucket/lake", env, server


def run_fleet(nodes, kind, seconds, interval, rows):
    """Start the fleet, run it for `seconds`, drain, check; return the figures."""
    work, base, env, server = store(kind)
    try:
        started = time.monotonic()
        procs = [start_node(work, n, base, interval, rows, env) for n in range(nodes)]
        time.sleep(seconds)
        for _, proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=600) for _, proc, _ in procs]
        loop_seconds = time.monotonic() - started
        loop_version = table_version(base)
        drained = [drain(work, n, base, env) for n in range(nodes)]
        figures = check(work, base, nodes, server)
        figures.update(cycle_figures(work, nodes))
        figures.update(nodes=nodes, store=kind, seconds=round(loop_seconds),
                       interval=interval, exit_codes=dict(collections.Counter(codes)),
                       drain_failures=sum(code != 0 for code in drained),
                       commits=loop_version + 1,
                       commits_per_s=round((loop_version + 1) / loop_seconds, 2))
        return figures
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def drain(work, n, base, env):
    """One --once cycle for node n: whatever its loop had not sent yet."""
    node = f"node-{n:03d}"
    return subprocess.run([sys.executable, os.path.join(ROOT, "sqlite_to_databricks_uploader.py"),
                           "--sqlite", os.path.join(work, f"{node}.db"), "--once"],
                          env={**env, "STATE_DIR": os.path.join(work, f"state-{n:03d}"),
                               "SOURCE_ID": node, "DELTA_URI": base},
                          capture_output=True, text=True).returncode


def table_version(base):
    from deltalake import DeltaTable
    return DeltaTable(base.rstrip("/") + "/raw_readings").version()


def check(work, base, nodes, server):
    """Every source row in the table exactly once; files and log bytes after."""
    from deltalake import DeltaTable, QueryBuilder
    uri = base.rstrip("/") + "/raw_readings"
    table = DeltaTable(uri)
    reader = QueryBuilder().register("t", table).execute(
        'SELECT "_source_id", count(*), count(DISTINCT "id"), min("id"), max("id") '
        'FROM t GROUP BY "_source_id"')
    landed = {}
    for batch in reader:
        for node, count, distinct, low, high in zip(*(c.to_pylist() for c in batch.columns)):
            landed[node] = (count, distinct, low, high)
    wrong = 0
    total = 0
    for n in range(nodes):
        node = f"node-{n:03d}"
        conn = sqlite3.connect(os.path.join(work, f"{node}.db"))
        count = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        conn.close()
        total += count
        wrong += landed.get(node, (0, 0, 1, 0)) != (count, count, 1, count) and count > 0
    files, log_bytes = stored(uri, server)
    lost_races = sum(c.get("operationMetrics", {}).get("num_retries", 0)
                     for c in table.history())
    return {"rows": total, "deltalake_commit_retries": lost_races, "rows_in_table": sum(v[0] for v in landed.values()),
            "nodes_with_wrong_rows": wrong, "active_files": len(table.file_uris()),
            "stored_files": files, "log_bytes": log_bytes}


def stored(uri, server):
    """(data files stored, bytes of _delta_log) under the table."""
    if server is None:
        files = sum(n.endswith(".parquet") for top, _, names in os.walk(uri)
                    if "_delta_log" not in top for n in names)
        log_dir = os.path.join(uri, "_delta_log")
        return files, sum(os.path.getsize(os.path.join(log_dir, n)) for n in os.listdir(log_dir))
    sizes = server.sizes("lake/raw_readings/")
    return (sum(k.endswith(".parquet") and "/_delta_log/" not in k for k in sizes),
            sum(v for k, v in sizes.items() if "/_delta_log/" in k))


def cycle_figures(work, nodes):
    """Failed cycles and cycle times from the nodes' logs."""
    times, failed, rows, retried = [], 0, 0, 0
    for n in range(nodes):
        with open(os.path.join(work, f"node-{n:03d}.log"), encoding="utf-8") as fh:
            for line in fh:
                found = CYCLE_RE.search(line)
                if found and int(found.group(2)):
                    times.append(float(found.group(3)))
                    rows += int(found.group(2))
                failed += " ERROR " in line or "Traceback" in line
                retried += "sink: commit to" in line
    times.sort()
    return {"cycles": len(times), "failed_cycles": failed, "rows_in_loop": rows,
            "our_commit_retries": retried,
            "cycle_p50_s": round(statistics.median(times), 3) if times else None,
            "cycle_p99_s": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3)
            if times else None}


# === Commit cost =====================================================================

def commit_cost(commits, kind, every, block, progress=None):
    """Median commit time per block of `block` commits, upkeep every `every` (0: none).
    Each block's figure is written to `progress` (a file) as it is measured, so a run
    stopped early still leaves its curve."""
    work, base, _env, server = store(kind)
    try:
        # Compressed time: log entries and removed files expire at once (RETENTION_HOURS
        # 0, which the tool refuses), as they would after a real retention window.
        config = up.Config(delta_uri=base, source_id="bench-node", retention_hours=0.0)
        sink = up.DeltaSink(config, up.Identity("bench-node", "readings", "bench"))
        times, cpu, upkeep = [], [], []
        for seq in range(1, commits + 1):
            chunk = up.Chunk(["id", "v"], [list(range(seq * 100, seq * 100 + 100)),
                                           [float(i) for i in range(100)]],
                             100, [seq * 100 + 99], kinds=[up.BIGINT, up.DOUBLE],
                             batch_id=f"bench-{seq}")
            batch = up.Batch(seq, chunk.batch_id, chunk.columns, chunk.kinds, 100,
                             [sink.encode("raw_readings", chunk)[0]], chunk.cursor_end)
            started, busy = time.perf_counter(), time.process_time()
            sink.write("raw_readings", batch)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - busy)  # all threads: deltalake's too
            if progress and seq % block == 0:
                print(json.dumps({"store": kind, "upkeep_every": every, "block": seq - block + 1,
                                  "median_ms": round(statistics.median(times[-block:]) * 1000, 1),
                                  "cpu_ms": round(statistics.median(cpu[-block:]) * 1000, 1),
                                  "at": time.strftime("%H:%M:%S")}), file=progress, flush=True)
            if every and seq % every == 0:
                started = time.perf_counter()
                sink.maintain("raw_readings")
                upkeep.append(time.perf_counter() - started)
        blocks = [(i + 1, round(statistics.median(times[i:i + block]) * 1000, 1))
                  for i in range(0, commits, block)]
        files, log_bytes = stored(sink.table_uri("raw_readings"), server)
        cpu_blocks = [(i + 1, round(statistics.median(cpu[i:i + block]) * 1000, 1))
                      for i in range(0, commits, block)]
        # the fastest tenth of a block: what a commit costs when the machine is not busy
        # with other work (a shared machine's load moves the median)
        fast_blocks = [(i + 1, round(sorted(times[i:i + block])[len(times[i:i + block]) // 10]
                                     * 1000, 1)) for i in range(0, commits, block)]
        return {"store": kind, "commits": commits, "upkeep_every": every, "blocks": blocks,
                "cpu_blocks": cpu_blocks, "fast_blocks": fast_blocks,
                "upkeep_median_s": round(statistics.median(upkeep), 3) if upkeep else None,
                "stored_files": files, "log_bytes": log_bytes,
                "last_over_first": round(blocks[-1][1] / blocks[0][1], 2)}
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


# === Report ==========================================================================

def fleet_table(results):
    head = ("| nodes | store | s | rows | rows exact | failed cycles | commits/s | "
            "cycle p50 / p99 (s) | commit retries (deltalake / ours) | active files | "
            "stored files | log bytes |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['nodes']} | {r['store']} | {r['seconds']} | {r['rows']:,} | "
             f"{'yes' if r['nodes_with_wrong_rows'] == 0 and r['rows'] == r['rows_in_table'] else 'NO'} | "
             f"{r['failed_cycles']} | {r['commits_per_s']} | {r['cycle_p50_s']} / "
             f"{r['cycle_p99_s']} | {r['deltalake_commit_retries']} / "
             f"{r['our_commit_retries']} | {r['active_files']} | {r['stored_files']} | "
             f"{r['log_bytes']:,} |" for r in results]
    return "\n".join([head, *lines])


def cost_table(results):
    head = ("| store | upkeep | commits | median ms a commit, by block (first commit of the block: ms) | "
            "last/first | stored files | log bytes |\n|---|---|---|---|---|---|---|")
    lines = [f"| {r['store']} | {'every ' + str(r['upkeep_every']) if r['upkeep_every'] else 'none'} | "
             f"{r['commits']:,} | {', '.join(f'{i}: {ms}' for i, ms in r['blocks'])} | "
             f"{r['last_over_first']} | {r['stored_files']} | {r['log_bytes']:,} |"
             for r in results]
    return "\n".join([head, *lines])


POINTS = (1, 1000, 2000, 5000, 10000)


def block_at(blocks, commit):
    """The median of the block holding commit number `commit` (None if not reached)."""
    found = [ms for first, ms in blocks if first <= commit]
    size = blocks[1][0] - blocks[0][0] if len(blocks) > 1 else 1
    return found[-1] if found and commit < blocks[len(found) - 1][0] + size else None


def curve_figures(result):
    """Cost at commits 1, 1k, 2k, 5k, 10k; the median of the first and last 1,000
    commits' block medians, and whether the last stays within 20 % of the first."""
    blocks = result["blocks"]
    size = blocks[1][0] - blocks[0][0]
    per = max(1000 // size, 1)
    first = round(statistics.median(ms for _, ms in blocks[:per]), 1)
    last = round(statistics.median(ms for _, ms in blocks[-per:]), 1)
    return {"at": {n: block_at(blocks, n) for n in POINTS}, "first_1000_ms": first,
            "last_1000_ms": last, "last_over_first_1000": round(last / first, 2),
            "within_20_percent": last <= 1.2 * first}


def curve_table(results):
    head = ("| store | upkeep | commits run | " + " | ".join(
        f"ms at {n:,}" for n in POINTS) + " | first / last 1,000 (ms) | last/first | "
        "flat (±20 %) |\n|---|---|---|" + "---|" * (len(POINTS) + 3))
    lines = []
    variants = (("cpu_blocks", " (CPU)"), ("fast_blocks", " (fastest tenth)"))
    for r in results + [{**r, "blocks": r[key], "store": r["store"] + label}
                        for key, label in variants for r in results if r.get(key)]:
        f = curve_figures(r)
        cells = " | ".join("-" if f["at"][n] is None else str(f["at"][n]) for n in POINTS)
        lines.append(f"| {r['store']} | {'every ' + str(r['upkeep_every']) if r['upkeep_every'] else 'none'} | "
                     f"{r['commits']:,}{' (stopped)' if r.get('stopped') else ''} | {cells} | "
                     f"{f['first_1000_ms']} / {f['last_1000_ms']} | "
                     f"{f['last_over_first_1000']} | {'yes' if f['within_20_percent'] else 'no'} |")
    return "\n".join([head, *lines])


def from_progress(path):
    """A commit-cost result from the per-block lines of a run (stopped or not)."""
    with open(path) as fh:
        lines = [json.loads(line) for line in fh if line.startswith("{")]
    blocks = [[x["block"], x["median_ms"]] for x in lines]
    size = blocks[1][0] - blocks[0][0]
    result = {"store": lines[0]["store"], "upkeep_every": lines[0]["upkeep_every"],
              "commits": blocks[-1][0] + size - 1, "blocks": blocks, "stopped": True,
              "last_block_at": lines[-1]["at"]}
    if "cpu_ms" in lines[0]:
        result["cpu_blocks"] = [[x["block"], x["cpu_ms"]] for x in lines]
    return result


def main(argv):
    if argv[:1] == ["node"]:
        return node_main(argv[1:])
    if argv[:1] == ["progress"]:
        print(json.dumps(from_progress(argv[1])))
        return 0
    if argv[:1] == ["tables"]:
        return tables(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fleet", "commit-cost", "all"])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=4)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--upkeep", choices=["both", "none", "on"], default="both",
                        help="commit-cost: without upkeep, with it, or both runs")
    args = parser.parse_args(argv)
    if args.what == "fleet":
        print(json.dumps(run_fleet(args.nodes, args.store, args.seconds, args.interval,
                                   args.rows), indent=1))
    elif args.what == "commit-cost":
        variants = {"both": (0, args.every), "none": (0,), "on": (args.every,)}
        for every in variants[args.upkeep]:
            print(json.dumps(commit_cost(args.commits, args.store, every, args.block,
                                         progress=sys.stderr)), flush=True)
    else:
        run_all(args)
    return 0


def tables(path):
    """bench/fleet.py tables RESULTS.json: the markdown tables of a saved run."""
    with open(path) as fh:
        saved = json.load(fh)
    print(fleet_table(saved["fleets"]))
    print()
    print(cost_table(saved["costs"]))
    if saved.get("curves"):
        print()
        print(curve_table(saved["curves"]))


def run_all(args):
    fleets = [run_fleet(n, kind, args.seconds, args.interval if n <= 16 else 8, args.rows)
              for n in (16, 64) for kind in ("local", "s3")]
    costs = [commit_cost(args.commits, kind, every, args.block)
             for kind in ("local", "s3") for every in (0, args.every)]
    with open(REPORT + ".json", "w") as fh:
        json.dump({"fleets": fleets, "costs": costs}, fh, indent=1)
    print(fleet_table(fleets))
    print(cost_table(costs))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
