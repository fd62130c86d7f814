#!/usr/bin/env python3
"""Benchmarks of the uploader against a floor run in the same invocation.

Every figure is a median of whole-process runs (the way a user runs the tool:
`uv run script ...`), measured alternately with its baseline so that machine noise
hits both, and reported as a ratio to that baseline plus the absolute medians.

    python bench/bench.py first-upload [--rows 1000000] [--runs 5] [--dlt]
    python bench/bench.py incremental  [--rows 1000000] [--new 10000]
    python bench/bench.py idle-cycle   [--rows 10000000]
    python bench/bench.py memory       [--sizes 100000,1000000,5000000]
    python bench/bench.py all          (each of the above, results to bench/RESULTS.md)

Data is made once per size in bench/data/ (the Bacalhau sensor schema: 21 columns,
20 sensors, one reading per sensor per second, ISO-8601 text timestamps).
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "sqlite_to_databricks_uploader.py")
DATA = os.path.join(HERE, "data")
WORK = os.path.join(DATA, "work")
sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402  (stdlib-only at import)

START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
SENSORS = 20


# --- data -----------------------------------------------------------------------

def sensor_db(rows, index=True, name=None):
    """Path of a sensor database with `rows` readings, made once and reused."""
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, name or f"sensors_{rows}{'' if index else '_noindex'}.db")
    if os.path.exists(path):
        return path
    tmp = path + ".part"
    if os.path.exists(tmp):
        os.remove(tmp)
    conn = sqlite3.connect(tmp)
    conn.execute(up.DEMO_SCHEMA)
    marks = ", ".join("?" * len(up.DEMO_COLUMNS))
    seconds = -(-rows // SENSORS)
    gen = up.sensor_rows(START, seconds, SENSORS)
    with conn:
        conn.executemany(f"INSERT INTO sensor_readings ({', '.join(up.DEMO_COLUMNS)}) "
                         f"VALUES ({marks})", (next(gen) for _ in range(rows)))
    if index:
        conn.execute("CREATE INDEX idx_timestamp ON sensor_readings(timestamp)")
    conn.close()
    os.replace(tmp, path)
    return path


def copy_db(path, name):
    """A private copy of a database (runs may append to it)."""
    os.makedirs(WORK, exist_ok=True)
    dest = os.path.join(WORK, name)
    shutil.copyfile(path, dest)
    return dest


def append_rows(path, rows):
    """Append `rows` readings after the last one, as the sensor would."""
    conn = sqlite3.connect(path)
    last = conn.execute("SELECT max(timestamp) FROM sensor_readings").fetchone()[0]
    start = dt.datetime.fromisoformat(last) + dt.timedelta(seconds=1)
    gen = up.sensor_rows(start, -(-rows // SENSORS), SENSORS)
    marks = ", ".join("?" * len(up.DEMO_COLUMNS))
    with conn:
        conn.executemany(f"INSERT INTO sensor_readings ({', '.join(up.DEMO_COLUMNS)}) "
                         f"VALUES ({marks})", (next(gen) for _ in range(rows)))
    conn.close()


# --- running --------------------------------------------------------------------

def run(cmd, env=None):
    """Run a command to completion; return (seconds, peak RSS in MB, stderr text)."""
    full_env = dict(os.environ, **(env or {}))
    with open(os.path.join(DATA, "stderr.log"), "w+") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text


def tool_cmd(db, lake, state, *extra):
    """The uploader, as a user runs it."""
    return ["uv", "run", "-q", SCRIPT, "--sqlite", db, "--once", "--state-dir", state,
            "--delta-uri", lake, "--log-level", "WARNING", *extra]


def floor_cmd(db, lake, order="rowid"):
    """The floor of bench/floor.py."""
    return ["uv", "run", "-q", os.path.join(HERE, "floor.py"), db, lake, "--order", order]


def dlt_cmd(db, lake, backend):
    """dlt's sql_table source to a local Delta table (benchmark only)."""
    return ["uv", "run", "-q", "--with", "dlt[deltalake,sql_database]>=1.0",
            "--with", "pyarrow", "--with", "sqlalchemy",
            os.path.join(HERE, "dlt_job.py"), db, lake, backend]


def fresh(*paths):
    """Remove outputs of a previous run."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def median(values):
    return statistics.median(values)


# --- measurements ---------------------------------------------------------------

def bench_first_upload(rows, runs, with_dlt):
    """First upload of `rows` to a local Delta table: tool vs floor (vs dlt)."""
    db = sensor_db(rows)
    db_noindex = sensor_db(rows, index=False)
    lake, state = os.path.join(WORK, "lake"), os.path.join(WORK, "state")
    jobs = {"floor (rowid cursor)": lambda: run(floor_cmd(db, lake)),
            "floor (timestamp, id), no index": lambda: run(floor_cmd(db_noindex, lake, "pair")),
            "uploader, defaults": lambda: run(tool_cmd(db, lake, state))}
    if with_dlt:
        jobs["dlt, pyarrow backend"] = lambda: run(dlt_cmd(db, lake, "pyarrow"))
    times, peaks = {k: [] for k in jobs}, {k: [] for k in jobs}
    for _ in range(runs):
        for name, job in jobs.items():
            fresh(lake, state)
            seconds, peak, _ = job()
            times[name].append(seconds)
            peaks[name].append(peak)
    floor = median(times["floor (rowid cursor)"])
    result = {"rows": rows, "runs": runs, "jobs": {}}
    for name in jobs:
        t = median(times[name])
        result["jobs"][name] = {"seconds": round(t, 2), "rows_per_s": round(rows / t),
                                "vs_floor": round(t / floor, 2),
                                "peak_rss_mb": round(median(peaks[name]))}
    return result


def bench_incremental(rows, new, runs):
    """A cycle that finds `new` rows on top of `rows` already uploaded."""
    base = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake"), os.path.join(WORK, "state")
    times = []
    for _ in range(runs):
        db = copy_db(base, "incremental.db")
        fresh(lake, state)
        run(tool_cmd(db, lake, state))
        append_rows(db, new)
        seconds, _, _ = run(tool_cmd(db, lake, state))
        times.append(seconds)
    return {"rows": rows, "new_rows": new, "runs": runs,
            "seconds": round(median(times), 3)}


def bench_idle_cycle(rows, cycles):
    """Cost of a cycle with no new rows inside a running loop, measured in-process."""
    import threading
    db = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake_idle"), os.path.join(WORK, "state_idle")
    fresh(lake, state)
    run(tool_cmd(db, lake, state))  # upload everything first
    up.setup_logging("WARNING")
    args = up.build_parser().parse_args(["--sqlite", db, "--state-dir", state,
                                         "--delta-uri", lake])
    config = up.load_config(args, {})
    job = up.open_job(config, False, threading.Event())
    times = []
    try:
        for _ in range(cycles):
            began = time.perf_counter()
            uploaded = up.run_cycle(job)
            times.append(time.perf_counter() - began)
            assert uploaded == 0
    finally:
        up.close_job(job)
    return {"rows": rows, "cycles": cycles, "median_ms": round(median(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1)}


def bench_memory(sizes):
    """Peak RSS of a first upload for backlogs of several sizes."""
    lake, state = os.path.join(WORK, "lake_mem"), os.path.join(WORK, "state_mem")
    result = {}
    for rows in sizes:
        db = sensor_db(rows)
        fresh(lake, state)
        seconds, peak, _ = run(tool_cmd(db, lake, state))
        result[rows] = {"peak_rss_mb": round(peak), "seconds": round(seconds, 2)}
    smallest = min(r["peak_rss_mb"] for r in result.values())
    for r in result.values():
        r["vs_smallest"] = round(r["peak_rss_mb"] / smallest, 2)
    return result


# --- report ---------------------------------------------------------------------

def versions():
    """Versions of what was measured."""
    out = subprocess.run(["uv", "run", "-q", "--with-requirements", SCRIPT, "python", "-c",
                          "import deltalake, arro3.core, sqlite3, sys; "
                          "print(sys.version.split()[0], deltalake.__version__, "
                          "sqlite3.sqlite_version)"],
                         capture_output=True, text=True).stdout.split()
    return {"python": out[0] if out else "?", "deltalake": out[1] if len(out) > 1 else "?",
            "sqlite": out[2] if len(out) > 2 else "?", "uploader": up.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("first-upload", "incremental", "idle-cycle",
                                         "memory", "all"))
    parser.add_argument("--rows", type=int)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--dlt", action="store_true", help="also run dlt (downloads it)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    out = {"versions": versions()}
    if args.what in ("first-upload", "all"):
        out["first_upload"] = bench_first_upload(args.rows or 1_000_000, args.runs, args.dlt)
    if args.what in ("incremental", "all"):
        out["incremental"] = bench_incremental(args.rows or 1_000_000, args.new, args.runs)
    if args.what in ("idle-cycle", "all"):
        out["idle_cycle"] = bench_idle_cycle(args.rows or 10_000_000, 20)
    if args.what in ("memory", "all"):
        out["memory"] = bench_memory([int(s) for s in args.sizes.split(",")])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
