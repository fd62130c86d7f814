#!/usr/bin/env python3
"""Benchmarks of the uploader against baselines run in the same invocation.

Every timed figure is a median of whole-process runs (the way a user runs the tool:
`uv run script ...`), measured alternately with its baselines so that machine noise
hits all of them, and reported as a ratio to the baseline plus the absolute medians.

    python bench/bench.py first-upload [--rows 1000000] [--runs 5] [--dlt]
    python bench/bench.py incremental  [--rows 1000000] [--new 10000] [--dlt]
    python bench/bench.py idle-cycle   [--rows 10000000]
    python bench/bench.py memory       [--sizes 100000,1000000,5000000]
    python bench/bench.py processing   [--rows 1000000]
    python bench/bench.py warehouse    [--rows 1000000]
    python bench/bench.py many-first   [--rows 1000000] [--runs 3]
                                       (20 tables of rows/20 in 5 files vs one table)
    python bench/bench.py many-idle    [--rows 50000]  (idle cycle over those 20 tables)
    python bench/bench.py all [--dlt]  (each of the above, results to bench/RESULTS.md)
    python bench/bench.py report       (RESULTS.md again from the last `all`)

Data is made once per size in bench/data/ (the Bacalhau sensor schema: 21 columns,
20 sensors, one reading per sensor per second, ISO-8601 text timestamps). The bench
itself needs only the standard library; what runs in-process with the uploader's
dependencies (idle cycle, warehouse counts, profiles) runs under
`uv run --with-requirements sqlite_to_databricks_uploader.py`, and dlt (for the
comparison only, never a dependency of the tool) under `uv run --with dlt[...]`.
"""

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
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
RESULTS = os.path.join(HERE, "RESULTS.md")
sys.path.insert(0, ROOT)

import sqlite_to_databricks_uploader as up  # noqa: E402  (stdlib-only at import)

START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
SENSORS = 20
IN_SCRIPT_ENV = ["uv", "run", "-q", "--with-requirements", SCRIPT, "python"]
DLT_WITH = ["--with", "dlt[deltalake,sql_database]>=1.0", "--with", "pyarrow>=17",
            "--with", "sqlalchemy>=2"]
DLT_ENV = {"RUNTIME__DLTHUB_TELEMETRY": "false"}
DLT_BACKENDS = {"pyarrow": "dlt, pyarrow backend",
                "sqlalchemy": "dlt, sqlalchemy backend (default)"}
HASH_KEY = {"SANITIZE_HASH_KEY": "bench-secret"}
STAGES = {
    "raw (no processing)": ([], {}),
    "sanitize": (["--enable-sanitize", "--sanitize-config", json.dumps(
        {"serial_number": {"hash": True}, "latitude": {"round": 2},
         "location": "[0-9]"})], HASH_KEY),
    "filter": (["--enable-filter", "--filter-config", json.dumps(
        {"temperature": {">": 21}, "status_code": 0})], {}),
    "aggregate (sensor_id, hour_of_day)": (["--enable-aggregate", "--aggregate-config",
                                           json.dumps({
        "group_by": ["sensor_id", "hour_of_day"],
        "aggregations": {"temperature": "avg", "humidity": "max", "records": "count"}})],
        {}),
    "aggregate, 15m window": (["--enable-aggregate", "--aggregate-config", json.dumps({
        "group_by": ["sensor_id"], "window": "15m",
        "aggregations": {"temperature": ["avg", "min", "max"], "humidity": "avg",
                         "records": "count"}})], {}),
}
RAW = "raw (no processing)"


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
    """Run a command to completion; return (seconds, peak RSS in MB, stderr, stdout)."""
    full_env = dict(os.environ, **(env or {}))
    with open(os.path.join(DATA, "stderr.log"), "w+") as err, \
            open(os.path.join(DATA, "stdout.log"), "w+") as out:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        out.seek(0)
        text, stdout = err.read(), out.read()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text, stdout


def run_json(cmd, env=None):
    """Run a helper that prints one JSON object last; return it."""
    _, _, _, stdout = run(cmd, env)
    return json.loads(stdout.strip().splitlines()[-1])


def tool_cmd(db, lake, state, *extra, level="WARNING"):
    """The uploader, as a user runs it."""
    return ["uv", "run", "-q", SCRIPT, "--sqlite", db, "--once", "--state-dir", state,
            "--delta-uri", lake, "--log-level", level, *extra]


def floor_cmd(db, lake, order="rowid"):
    """The floor of bench/floor.py."""
    return ["uv", "run", "-q", os.path.join(HERE, "floor.py"), db, lake, "--order", order]


def dlt_cmd(db, lake, backend, state):
    """dlt's sql_table source to a local Delta table (benchmark only)."""
    return ["uv", "run", "-q", *DLT_WITH, os.path.join(HERE, "dlt_job.py"), db, lake,
            backend, state]


def uploaded_rows(stderr):
    """Rows uploaded, from the uploader's INFO cycle line."""
    found = re.findall(r"cycle: (\d+) rows read, (\d+) rows uploaded", stderr)
    return int(found[-1][1]) if found else None


def dlt_rows(stdout):
    """Rows loaded, from dlt_job.py's last line."""
    found = re.findall(r"dlt: (\d+) rows", stdout)
    return int(found[-1]) if found else None


def fresh(*paths):
    """Remove outputs of a previous run."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def median(values):
    return statistics.median(values)


def summary(results, base, ratio, digits):
    """Median, min and max seconds of a job's runs, its median over `base` (as `ratio`)
    and its median peak RSS."""
    seconds = [r[0] for r in results]
    t = median(seconds)
    return {"seconds": round(t, digits), "min_s": round(min(seconds), digits),
            "max_s": round(max(seconds), digits), ratio: round(t / base, 3),
            "peak_rss_mb": round(median([r[1] for r in results]))}


def timed_rounds(jobs, runs, before=None):
    """Run every job once per round, alternating; return {name: [(s, peak, out)]}."""
    results = {name: [] for name in jobs}
    for _ in range(runs):
        for name, job in jobs.items():
            if before:
                before(name)
            results[name].append(job())
    return results


# --- first upload ---------------------------------------------------------------

def bench_first_upload(rows, runs, with_dlt):
    """First upload of `rows` to a local Delta table: tool vs floor (vs dlt)."""
    db = sensor_db(rows)
    db_noindex = sensor_db(rows, index=False)
    lake, state, dlt_state = (os.path.join(WORK, n) for n in ("lake", "state", "dlt"))
    jobs = {"floor (rowid cursor)": lambda: run(floor_cmd(db, lake)),
            "floor (timestamp, id), no index": lambda: run(floor_cmd(db_noindex, lake,
                                                                     "pair")),
            "uploader, defaults": lambda: run(tool_cmd(db, lake, state))}
    if with_dlt:
        for backend, name in DLT_BACKENDS.items():
            jobs[name] = (lambda b=backend: run(dlt_cmd(db, lake, b, dlt_state), DLT_ENV))
    done = timed_rounds(jobs, runs, before=lambda _: fresh(lake, state, dlt_state))
    times = {n: [r[0] for r in rs] for n, rs in done.items()}
    floor = median(times["floor (rowid cursor)"])
    tool = median(times["uploader, defaults"])
    result = {"rows": rows, "runs": runs, "jobs": {}}
    for name in jobs:
        t = median(times[name])
        result["jobs"][name] = {
            "seconds": round(t, 2), "min_s": round(min(times[name]), 2),
            "max_s": round(max(times[name]), 2), "rows_per_s": round(rows / t),
            "vs_floor": round(t / floor, 2), "vs_uploader": round(t / tool, 2),
            "peak_rss_mb": round(median([r[1] for r in done[name]]))}
    for name, backend in ((n, b) for b, n in DLT_BACKENDS.items() if n in done):
        loaded = dlt_rows(done[name][-1][3])
        if loaded != rows:
            raise SystemExit(f"bench: {name} loaded {loaded} rows, not {rows}")
    return result


# --- incremental ----------------------------------------------------------------

def snapshot(name, prepare):
    """A directory holding a database after its first upload, made by `prepare(dir)`.

    Made anew by every invocation: the script under test may have changed since.
    """
    folder = os.path.join(WORK, "snap_" + name)
    fresh(folder)
    prepare(folder)
    return folder


def restore(folder, name):
    """A working copy of a snapshot, at the same path every run."""
    dest = os.path.join(WORK, "inc_" + name)
    fresh(dest)
    shutil.copytree(folder, dest)
    return dest


def bench_incremental(rows, new, runs, with_dlt):
    """A cycle that finds `new` rows on top of `rows` already uploaded, whole process."""
    base = sensor_db(rows)
    setups = {"uploader": lambda d: run(tool_cmd(
        shutil.copyfile(base, os.path.join(d, "db.db")), os.path.join(d, "lake"),
        os.path.join(d, "state")))}
    if with_dlt:
        for backend in DLT_BACKENDS:
            setups["dlt_" + backend] = (lambda d, b=backend: run(dlt_cmd(
                shutil.copyfile(base, os.path.join(d, "db.db")), os.path.join(d, "lake"),
                b, os.path.join(d, "state")), DLT_ENV))
    # the snapshots hold their own paths: make them where they will be restored
    snaps = {}
    for key, setup in setups.items():
        target = os.path.join(WORK, "inc_" + key)

        def prepare(folder, setup=setup, target=target):
            fresh(target)
            os.makedirs(target)
            setup(target)
            fresh(folder)
            shutil.copytree(target, folder)
        snaps[key] = snapshot(f"{key}_{rows}", prepare)

    def cycle(key):
        d = restore(snaps[key], key)
        append_rows(os.path.join(d, "db.db"), new)
        if key == "uploader":
            out = run(tool_cmd(os.path.join(d, "db.db"), os.path.join(d, "lake"),
                               os.path.join(d, "state"), level="INFO"))
            got = uploaded_rows(out[2])
        else:
            out = run(dlt_cmd(os.path.join(d, "db.db"), os.path.join(d, "lake"),
                              key[4:], os.path.join(d, "state")), DLT_ENV)
            got = dlt_rows(out[3])
        if got is None or got < new:
            raise SystemExit(f"bench: incremental {key} moved {got} rows, not {new}")
        return out

    names = {"uploader": "uploader, --once", "startup": "startup floor: uv run script "
             "--version"}
    jobs = {names["uploader"]: lambda: cycle("uploader"),
            names["startup"]: lambda: run(["uv", "run", "-q", SCRIPT, "--version"])}
    if with_dlt:
        for backend, name in DLT_BACKENDS.items():
            jobs[name] = (lambda b=backend: cycle("dlt_" + b))
    done = timed_rounds(jobs, runs)
    tool = median([r[0] for r in done[names["uploader"]]])
    result = {"rows": rows, "new_rows": new, "runs": runs,
              "jobs": {name: summary(rs, tool, "vs_uploader", 3) for name, rs in done.items()}}
    result["seconds"] = result["jobs"][names["uploader"]]["seconds"]
    return result


# --- idle cycle -----------------------------------------------------------------

def bench_idle_cycle(rows, cycles):
    """Cost of a cycle with no new rows inside a running loop (in-process, timed)."""
    db = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake_idle"), os.path.join(WORK, "state_idle")
    fresh(lake, state)
    seconds, peak, _, _ = run(tool_cmd(db, lake, state))  # upload everything first
    result = run_json([*IN_SCRIPT_ENV, os.path.abspath(__file__), "idle-inprocess",
                       "--rows", str(rows), "--runs", str(cycles)])
    result["first_upload_s"] = round(seconds, 1)
    result["first_upload_peak_rss_mb"] = round(peak)
    return result


def idle_inprocess(rows, cycles):
    """The timed part of bench_idle_cycle (runs with the uploader's dependencies)."""
    import threading
    db = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake_idle"), os.path.join(WORK, "state_idle")
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
            assert uploaded == 0, uploaded
    finally:
        up.close_job(job)
    return {"rows": rows, "cycles": cycles, "median_ms": round(median(times) * 1000, 2),
            "first_ms": round(times[0] * 1000, 2), "max_ms": round(max(times) * 1000, 2)}


# --- many sources ---------------------------------------------------------------

MANY_FILES, MANY_TABLES = 5, 4


def many_dbs(rows_per_table):
    """A folder of MANY_FILES sensor databases of MANY_TABLES tables (readings_0, ...)
    of `rows_per_table` readings each, made once."""
    folder = os.path.join(DATA, f"many_{MANY_FILES}x{MANY_TABLES}x{rows_per_table}")
    if os.path.isdir(folder):
        return folder
    readings, tmp = sensor_db(rows_per_table), folder + ".part"
    fresh(tmp)
    os.makedirs(tmp)
    for f in range(MANY_FILES):
        conn = sqlite3.connect(os.path.join(tmp, f"sensor-{f}.db"))
        conn.execute("ATTACH ? AS src", (readings,))
        for t in range(MANY_TABLES):
            name = f"readings_{t}"
            conn.execute(up.DEMO_SCHEMA.replace("sensor_readings", name))
            conn.execute(f"INSERT INTO {name} SELECT * FROM src.sensor_readings")
            conn.execute(f"CREATE INDEX idx_{name}_timestamp ON {name}(timestamp)")
        conn.commit()
        conn.execute("DETACH src")
        conn.close()
    os.replace(tmp, folder)
    return folder


def many_config(folder):
    """A config of one source: every table of the folder's files."""
    path = os.path.join(WORK, "many.yaml")
    with open(path, "w") as fh:  # JSON is YAML
        json.dump({"sources": [{"sqlite": os.path.join(folder, "sensor-*.db"),
                                "tables": "all"}]}, fh)
    return path


def many_cmd(config, lake, state):
    """The uploader over many sources, as a user runs it."""
    return ["uv", "run", "-q", SCRIPT, "--config", config, "--once", "--state-dir", state,
            "--delta-uri", lake, "--log-level", "WARNING"]


def state_rows(state):
    """Rows uploaded, summed over the state file's positions."""
    with open(os.path.join(state, up.STATE_FILE)) as fh:
        return sum(p["rows"] for p in json.load(fh)["destinations"].values())


def bench_many_first(rows, runs):
    """First upload of MANY_FILES x MANY_TABLES tables of rows/20 each vs one table of
    `rows`, whole process, alternating."""
    per = rows // (MANY_FILES * MANY_TABLES)
    one, config = sensor_db(rows), many_config(many_dbs(per))
    lake, state = os.path.join(WORK, "lake_many"), os.path.join(WORK, "state_many")
    names = {"one": f"one table of {rows:,} rows",
             "many": f"{MANY_FILES * MANY_TABLES} tables of {per:,} rows in {MANY_FILES} files"}

    def counted(result):
        if state_rows(state) != rows:
            raise SystemExit(f"bench: uploaded {state_rows(state)} rows, not {rows}")
        return result
    jobs = {names["one"]: lambda: counted(run(tool_cmd(one, lake, state))),
            names["many"]: lambda: counted(run(many_cmd(config, lake, state)))}
    done = timed_rounds(jobs, runs, before=lambda _: fresh(lake, state))
    base = median([r[0] for r in done[names["one"]]])
    result = {"rows": rows, "runs": runs,
              "jobs": {name: summary(rs, base, "vs_one_table", 2) for name, rs in done.items()}}
    result["ratio"] = result["jobs"][names["many"]]["vs_one_table"]
    return result


def bench_many_idle(per, cycles):
    """A cycle with nothing new over MANY_FILES x MANY_TABLES tables, in a running loop."""
    config = many_config(many_dbs(per))
    lake, state = os.path.join(WORK, "lake_many_idle"), os.path.join(WORK, "state_many_idle")
    fresh(lake, state)
    run(many_cmd(config, lake, state))  # upload everything first
    return run_json([*IN_SCRIPT_ENV, os.path.abspath(__file__), "many-idle-inprocess",
                     "--rows", str(per), "--runs", str(cycles)])


def many_idle_inprocess(per, cycles):
    """The timed part of bench_many_idle (runs with the uploader's dependencies)."""
    config_path = many_config(many_dbs(per))
    lake, state = os.path.join(WORK, "lake_many_idle"), os.path.join(WORK, "state_many_idle")
    up.setup_logging("WARNING")
    args = up.build_parser().parse_args(["--config", config_path, "--state-dir", state,
                                         "--delta-uri", lake])
    config = up.load_config(args, {})
    stop, before = up.StopFlag(), state_rows(state)
    sources = up.open_sources(config, up.source_specs(config), False, stop, {})
    times = []
    try:
        sources.refresh()  # opening the jobs is the start, not a cycle
        tables = len(sources.jobs)
        for _ in range(cycles):
            began = time.perf_counter()
            failed = sources.cycle()
            times.append(time.perf_counter() - began)
            assert not failed, failed
    finally:
        sources.close()
        stop.close()
    assert state_rows(state) == before, "an idle cycle uploaded rows"
    return {"files": MANY_FILES, "tables": tables, "rows_per_table": per, "cycles": cycles,
            "median_ms": round(median(times) * 1000, 2),
            "first_ms": round(times[0] * 1000, 2), "max_ms": round(max(times) * 1000, 2)}


# --- memory ---------------------------------------------------------------------

def bench_memory(sizes, runs):
    """Peak RSS of a first upload for backlogs of several sizes (sizes alternate)."""
    lake, state = os.path.join(WORK, "lake_mem"), os.path.join(WORK, "state_mem")
    dbs = {rows: sensor_db(rows) for rows in sizes}
    jobs = {rows: (lambda r=rows: run(tool_cmd(dbs[r], lake, state))) for rows in sizes}
    done = timed_rounds(jobs, runs, before=lambda _: fresh(lake, state))
    result = {"runs": runs, "sizes": {}}
    for rows, rs in done.items():
        result["sizes"][rows] = {"peak_rss_mb": round(median([r[1] for r in rs])),
                                 "seconds": round(median([r[0] for r in rs]), 2)}
    peaks = [r["peak_rss_mb"] for r in result["sizes"].values()]
    for r in result["sizes"].values():
        r["vs_smallest"] = round(r["peak_rss_mb"] / min(peaks), 2)
    result["max_over_min"] = round(max(peaks) / min(peaks), 2)
    return result


# --- processing -----------------------------------------------------------------

def bench_processing(rows, runs):
    """Each processing stage against the raw path: whole process, fresh lake and state."""
    db = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake_proc"), os.path.join(WORK, "state_proc")
    jobs = {name: (lambda flags=flags, env=env: run(
        tool_cmd(db, lake, state, *flags, level="INFO"), env))
        for name, (flags, env) in STAGES.items()}
    done = timed_rounds(jobs, runs, before=lambda _: fresh(lake, state))
    raw = median([r[0] for r in done[RAW]])
    result = {"rows": rows, "runs": runs, "stages": {}}
    for name, rs in done.items():
        t = median([r[0] for r in rs])
        result["stages"][name] = {
            "seconds": round(t, 2), "rows_per_s": round(rows / t),
            "vs_raw_rate": round(raw / t, 2), "rows_out": uploaded_rows(rs[-1][2]),
            "peak_rss_mb": round(median([r[1] for r in rs])),
            "config": " ".join(STAGES[name][0][1:]) or "-"}
    return result


# --- warehouse ------------------------------------------------------------------

def bench_warehouse(rows, runs):
    """Statements and bytes the Databricks sink sends, per write path (recorded)."""
    db = sensor_db(rows)
    state = os.path.join(WORK, "state_wh")
    helper = os.path.join(HERE, "warehouse.py")
    paths = {"inline": [], "staging": []}
    for _ in range(runs):
        for path in paths:
            fresh(state)
            paths[path].append(run_json([*IN_SCRIPT_ENV, helper, db, state, path]))
    literals = run_json([*IN_SCRIPT_ENV, helper, db, state, "literals"])
    seed = run_json([*IN_SCRIPT_ENV, helper, db, state, "seed"])
    per_m = 1_000_000 / rows
    out = {"rows": rows, "runs": runs, "literal_bytes": literals["bytes"],
           "paths": {}}
    for path, measured in paths.items():
        last = measured[-1]
        if any(m["statements"] != last["statements"] for m in measured):
            raise SystemExit(f"bench: warehouse {path}: statement counts differ by run")
        data = last["statements"].get("INSERT", 0) or last["statements"].get("COPY INTO", 0)
        base = literals["bytes"] if path == "inline" else last["put_file_bytes"]
        out["paths"][path] = {
            "statements": last["statements"], "bytes": last["bytes"],
            "statements_per_1m": round(last["total_statements"] * per_m),
            "data_statements": data, "rows_per_write": round(rows / data),
            "rows_per_statement": round(rows / last["total_statements"]),
            "bytes_per_1m": round(last["total_bytes"] * per_m),
            "baseline": "rows as SQL literals" if path == "inline" else "Parquet files",
            "baseline_bytes": base, "vs_baseline": round(last["total_bytes"] / base, 3),
            "vs_seed_statements": round(last["total_statements"] / seed["statements"], 6),
            "vs_seed_bytes": round(last["total_bytes"] / seed["bytes"], 3),
            "seconds": round(median([m["seconds"] for m in measured]), 2)}
    out["seed"] = {"statements_per_1m": round(seed["statements"] * per_m),
                   "rows_per_statement": 1, "bytes_per_1m": round(seed["bytes"] * per_m),
                   "vs_literals": round(seed["bytes"] / literals["bytes"], 3)}
    return out


# --- targets --------------------------------------------------------------------

def targets(out):
    """The issue's targets: (target, measured, pass) for each measured one."""
    rows = []
    fu = out.get("first_upload")
    if fu:
        tool = fu["jobs"]["uploader, defaults"]
        rows.append((f"first upload of {fu['rows']:,} rows <= 1.3x the floor (rowid cursor)",
                     f"{tool['vs_floor']}x ({tool['seconds']} s vs "
                     f"{fu['jobs']['floor (rowid cursor)']['seconds']} s)",
                     tool["vs_floor"] <= 1.3))
        dlts = [fu["jobs"][n] for n in DLT_BACKENDS.values() if n in fu["jobs"]]
        if dlts:
            best = min(dlts, key=lambda j: j["seconds"])
            rows.append(("first upload >= 3x faster than dlt's fastest backend",
                         f"{best['vs_uploader']}x ({tool['seconds']} s vs "
                         f"{best['seconds']} s)", best["vs_uploader"] >= 3))
    inc = out.get("incremental")
    if inc:
        rows.append((f"incremental cycle ({inc['new_rows']:,} new rows on {inc['rows']:,}) "
                     "<= 0.5 s, whole process", f"{inc['seconds']} s (median)",
                     inc["seconds"] <= 0.5))
    idle = out.get("idle_cycle")
    if idle:
        rows.append((f"cycle with no new rows in the running loop < 50 ms "
                     f"({idle['rows']:,} rows)", f"{idle['median_ms']} ms (median), "
                     f"{idle['max_ms']} ms (max)", idle["median_ms"] < 50))
    wh = out.get("warehouse")
    if wh:
        inline, staging = wh["paths"]["inline"], wh["paths"]["staging"]
        rows.append(("warehouse inline: >= 5,000 rows per statement",
                      f"{inline['rows_per_write']:,} rows per INSERT",
                      inline["rows_per_write"] >= 5000))
        rows.append(("warehouse inline: bytes <= 1.3x the rows as SQL literals",
                     f"{inline['vs_baseline']}x", inline["vs_baseline"] <= 1.3))
        rows.append(("warehouse staging: bytes <= 1.3x the Parquet",
                     f"{staging['vs_baseline']}x", staging["vs_baseline"] <= 1.3))
    many = out.get("many_first")
    if many:
        rows.append((f"first upload of {MANY_FILES * MANY_TABLES} tables of "
                     f"{many['rows'] // (MANY_FILES * MANY_TABLES):,} rows within 1.2x of one "
                     f"table of {many['rows']:,}", f"{many['ratio']}x", many["ratio"] <= 1.2))
    many_idle = out.get("many_idle")
    if many_idle:
        rows.append((f"cycle with nothing new over {many_idle['tables']} tables in "
                     f"{many_idle['files']} files < 50 ms",
                     f"{many_idle['median_ms']} ms (median), {many_idle['max_ms']} ms (max)",
                     many_idle["median_ms"] < 50))
    mem = out.get("memory")
    if mem:
        peaks = ", ".join(f"{int(k):,}: {v['peak_rss_mb']} MB"
                          for k, v in mem["sizes"].items())
        rows.append((" / ".join(f"{int(k):,}" for k in mem["sizes"]) + "-row backlogs: "
                     "peak RSS within +-20 % of each other",
                     f"{peaks} (max/min {mem['max_over_min']})",
                     mem["max_over_min"] <= 1.2))
    proc = out.get("processing")
    if proc:
        for name, st in proc["stages"].items():
            if name != RAW:
                rows.append((f"processing: {name} >= 0.5x the raw path's rows/s",
                             f"{st['vs_raw_rate']}x ({st['rows_per_s']:,} rows/s)",
                             st["vs_raw_rate"] >= 0.5))
    return rows


# --- report ---------------------------------------------------------------------

def capture(cmd):
    """stdout of a command, stripped ('?' when it fails)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              timeout=600).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def script_digest():
    with open(SCRIPT, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


def versions(with_dlt):
    """Versions of what was measured, and the machine."""
    out = capture([*IN_SCRIPT_ENV, "-c",
                   "import deltalake, sqlite3, sys; from importlib.metadata import version; "
                   "print(sys.version.split()[0], deltalake.__version__, "
                   "sqlite3.sqlite_version, version('arro3-core'))"]).split()
    got = dict(zip(("python", "deltalake", "sqlite", "arro3-core"), out))
    got["uploader"] = up.__version__
    if with_dlt:
        dlt = capture(["uv", "run", "-q", *DLT_WITH, "python", "-c",
                       "import dlt, pyarrow, sqlalchemy; print(dlt.__version__, "
                       "pyarrow.__version__, sqlalchemy.__version__)"]).split()
        got.update(zip(("dlt", "pyarrow (dlt env)", "sqlalchemy (dlt env)"), dlt))
    got["uv"] = capture(["uv", "--version"])
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    got["machine"] = (f"{platform.machine()}, nproc {capture(['nproc'])}, {model}, "
                      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} "
                      f"GiB, {platform.system()} {platform.release()}")
    got["commit"] = capture(["git", "rev-parse", "--short", "HEAD"])
    dirty = capture(["git", "status", "--porcelain", "--", SCRIPT])
    got["script"] = f"sha256 {script_digest()}" + (" (uncommitted changes)"
                                                   if dirty != "?" else "")
    return got


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(out, argv):
    """bench/RESULTS.md from the measurements."""
    v = out["versions"]
    parts = ["# Benchmark results", "",
             f"Made by `python3 bench/bench.py {' '.join(argv)}` on "
             f"{out['finished']}, in {out['elapsed_min']} min. Medians of whole-process "
             "runs (`uv run ...`, as a user runs the tool), each round alternating the "
             "jobs of a table so machine noise hits all of them; ratios are taken "
             "between medians of the same invocation.", "",
             "## Versions and machine", "",
             table(["what", "version"], [(k, val) for k, val in v.items()]), ""]
    if out.get("script_changed"):
        parts += ["**The script changed while the benchmark ran** (sha256 "
                  f"{out['script_changed']}): figures may mix two versions.", ""]
    parts += ["## Targets", "",
              table(["target", "measured", "result"],
                    [(t, m, "PASS" if ok else "**FAIL**") for t, m, ok in targets(out)]),
              ""]
    fu = out.get("first_upload")
    if fu:
        parts += [f"## First upload ({fu['rows']:,} rows, {fu['runs']} runs)", "",
                  "Fresh lake and state each run. The floor (bench/floor.py) reads by a "
                  "cursor into Arrow and makes one Delta append: no state, no lineage, no "
                  "typing beyond the declared types. dlt: `sql_table` + "
                  "`incremental('timestamp')` -> filesystem destination, "
                  "`table_format='delta'` (bench/dlt_job.py); dlt keeps the text "
                  "timestamp as a string, the uploader and the floor type it.", "",
                  table(["job", "median s", "min-max s", "rows/s", "vs floor",
                         "vs uploader", "peak RSS MB"],
                        [(n, j["seconds"], f"{j['min_s']}-{j['max_s']}",
                          f"{j['rows_per_s']:,}", j["vs_floor"], j["vs_uploader"],
                          j["peak_rss_mb"]) for n, j in fu["jobs"].items()]), ""]
    inc = out.get("incremental")
    if inc:
        parts += [f"## Incremental cycle ({inc['new_rows']:,} new rows on {inc['rows']:,}, "
                  f"{inc['runs']} runs)", "",
                  "Each run restores a snapshot taken after the first upload (database, "
                  "lake, state / dlt pipeline dir), appends the new rows as the sensor "
                  "would, then times one whole-process cycle. The startup floor is the "
                  "cost of `uv run` starting the script at all.", "",
                  table(["job", "median s", "min-max s", "vs uploader", "peak RSS MB"],
                        [(n, j["seconds"], f"{j['min_s']}-{j['max_s']}",
                          j["vs_uploader"], j["peak_rss_mb"])
                         for n, j in inc["jobs"].items()]), ""]
    idle = out.get("idle_cycle")
    if idle:
        parts += [f"## Idle cycle ({idle['rows']:,}-row source)", "",
                  "In-process: `open_job` once, then `run_cycle` "
                  f"{idle['cycles']} times with nothing new (as inside the running loop). "
                  f"The first upload of the {idle['rows']:,} rows before it took "
                  f"{idle['first_upload_s']} s (peak RSS "
                  f"{idle['first_upload_peak_rss_mb']} MB).", "",
                  table(["median ms", "first ms", "max ms"],
                        [(idle["median_ms"], idle["first_ms"], idle["max_ms"])]), ""]
    mem = out.get("memory")
    if mem:
        parts += [f"## Peak RSS by backlog ({mem['runs']} runs)", "",
                  table(["backlog rows", "peak RSS MB", "vs smallest", "median s"],
                        [(f"{int(k):,}", s["peak_rss_mb"], s["vs_smallest"], s["seconds"])
                         for k, s in mem["sizes"].items()]), ""]
    proc = out.get("processing")
    if proc:
        parts += [f"## Processing stages ({proc['rows']:,} rows, {proc['runs']} runs)", "",
                  "Whole process, same source file, fresh lake and state each run; "
                  "`SANITIZE_HASH_KEY` set for sanitize. Ratio: the stage's rows/s over "
                  "the raw path's (1 = as fast as raw).", "",
                  table(["stage", "median s", "rows/s", "vs raw", "rows out",
                         "peak RSS MB"],
                        [(n, s["seconds"], f"{s['rows_per_s']:,}", s["vs_raw_rate"],
                          f"{s['rows_out']:,}" if s["rows_out"] is not None else "?",
                          s["peak_rss_mb"]) for n, s in proc["stages"].items()]), "",
                  "Configs:", ""]
        parts += [f"- {n}: `{s['config']}`" for n, s in proc["stages"].items()] + [""]
    wh = out.get("warehouse")
    if wh:
        inline, staging, seed = wh["paths"]["inline"], wh["paths"]["staging"], wh["seed"]
        parts += [f"## Databricks sink: what goes on the wire ({wh['rows']:,} rows)", "",
                  "Counted by a recording DB-API double (bench/warehouse.py) that "
                  "executes nothing; the uploader runs in-process with defaults "
                  "(`--once`, batch 100,000, statement budget 1 MiB). Bytes: the SQL "
                  "text, plus the local file of each PUT. The seed baseline is the "
                  "original uploader's `executemany`: one `INSERT ... VALUES (...)` per "
                  "row, %s parameters inlined by the connector's escaper.", "",
                  table(["path", "statements / 1M rows", "rows per write",
                         "rows per statement", "bytes / 1M rows", "vs baseline",
                         "vs seed bytes", "in-process s"],
                        [("inline `INSERT ... REPLACE WHERE`", f"{inline['statements_per_1m']:,}",
                          f"{inline['rows_per_write']:,}",
                          f"{inline['rows_per_statement']:,}",
                          f"{inline['bytes_per_1m']:,}",
                          f"{inline['vs_baseline']}x rows as SQL literals",
                          inline["vs_seed_bytes"], inline["seconds"]),
                         ("volume staging (PUT + COPY INTO)",
                          f"{staging['statements_per_1m']:,}",
                          f"{staging['rows_per_write']:,}",
                          f"{staging['rows_per_statement']:,}",
                          f"{staging['bytes_per_1m']:,}",
                          f"{staging['vs_baseline']}x Parquet", staging["vs_seed_bytes"],
                          staging["seconds"]),
                         ("seed: `executemany`, one INSERT per row",
                          f"{seed['statements_per_1m']:,}", 1, 1,
                          f"{seed['bytes_per_1m']:,}",
                          f"{seed['vs_literals']}x rows as SQL literals", 1.0, "-")]), "",
                  f"Statements by kind: inline {inline['statements']}; staging "
                  f"{staging['statements']}. Rows as SQL literals: "
                  f"{wh['literal_bytes']:,} bytes; Parquet staged: "
                  f"{staging['baseline_bytes']:,} bytes.", ""]
    if os.path.exists(os.path.join(HERE, "ANALYSIS.md")):
        parts += ["## Analysis of the misses", "",
                  "Written by hand from the profiles below and a few experiments: see "
                  "[ANALYSIS.md](ANALYSIS.md) (it names the run it was written for).", ""]
    if out.get("profiles"):
        parts += ["## Profiles of missed targets", ""]
        for name, text in out["profiles"].items():
            parts += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    parts += ["## How to reproduce", "",
              "```sh",
              "python3 bench/bench.py all --dlt          # everything; writes this file",
              "python3 bench/bench.py first-upload --dlt # or one measurement, JSON out",
              "python3 bench/bench.py processing --runs 3",
              "python3 bench/bench.py warehouse",
              "```", "",
              "Needs `uv` and network access to the package index the first time (the "
              "script's dependencies; dlt only with `--dlt`). Databases are generated "
              "once per size in bench/data/ (ignored by git; the 10,000,000-row one is "
              "about 2 GB). The machine should be otherwise idle: the runs alternate, "
              "but 2 cores are easily disturbed.", ""]
    with open(RESULTS, "w") as fh:
        fh.write("\n".join(parts))


# --- profiles -------------------------------------------------------------------

def profile_missed(out, rows):
    """cProfile (in-process, no read-ahead thread) of the work behind each missed target."""
    missed = [t for t, _, ok in targets(out) if not ok]
    wanted = []
    if any(t.startswith("processing") for t in missed):
        for name in STAGES:
            st = out["processing"]["stages"].get(name)
            if name != RAW and st and st["vs_raw_rate"] < 0.5:
                wanted.append(("stage", name))
    if any(t.startswith("first upload") for t in missed):
        wanted.append(("stage", RAW))
    if any(t.startswith("incremental") for t in missed):
        wanted.append(("incremental", None))
    if any(t.startswith("warehouse inline") for t in missed):
        wanted.append(("inline", None))
    profiles = {}
    if any("peak RSS" in t for t in missed):
        profiles["peak RSS by backlog: Python heap (tracemalloc) vs RSS"] = "\n".join(
            run_json([*IN_SCRIPT_ENV, os.path.abspath(__file__), "profile-inprocess",
                      "--what", "memory", "--rows", str(size)])["text"]
            for size in sorted(int(k) for k in out["memory"]["sizes"])[:2])
    for kind, name in wanted:
        args = ["profile-inprocess", "--what", kind, "--rows", str(rows)]
        if name:
            args += ["--stage", name]
        result = run_json([*IN_SCRIPT_ENV, os.path.abspath(__file__), *args],
                          STAGES.get(name, ([], {}))[1])
        profiles[result["title"]] = result["text"]
    return profiles


def profile_inprocess(what, rows, stage):
    """Profile one scenario in this process; print {title, text}."""
    import cProfile
    import io
    import pstats
    db = sensor_db(rows)
    lake, state = os.path.join(WORK, "lake_prof"), os.path.join(WORK, "state_prof")
    fresh(lake, state)
    argv = ["--sqlite", db, "--state-dir", state, "--delta-uri", lake, "--once",
            "--log-level", "WARNING"]
    environ = dict(os.environ)
    if what == "memory":
        import resource
        import tracemalloc
        tracemalloc.start()
        code = up.main(argv)
        _, heap = tracemalloc.get_traced_memory()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"title": "memory", "text": f"{rows:>10,} rows: exit {code}, Python heap peak "
                f"{heap / 2**20:.0f} MB, peak RSS {peak:.0f} MB (RSS inflated by tracemalloc's own bookkeeping)"}
    if what == "incremental":
        inc = os.path.join(WORK, "prof_inc.db")
        shutil.copyfile(sensor_db(rows), inc)
        argv[1] = inc
        up.main(argv)
        append_rows(inc, 10_000)
        title = f"incremental cycle ({rows:,} + 10,000 rows): up.main(--once)"
    elif what == "inline":
        import importlib.util
        spec = importlib.util.spec_from_file_location("warehouse", os.path.join(
            HERE, "warehouse.py"))
        wh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wh)
        argv = ["--sqlite", db, "--state-dir", state, "--once", "--log-level", "WARNING"]
        environ.update({"DATABRICKS_HOST": "bench.cloud.databricks.com",
                        "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/bench",
                        "DATABRICKS_TOKEN": "dapi-bench",
                        "DATABRICKS_DATABASE": wh.DATABASE})
        up.DatabricksSink.connector = wh.RecordingWarehouse()
        title = f"warehouse inline path ({rows:,} rows, recording double)"
    else:
        argv += STAGES[stage][0]
        title = (f"{stage} ({rows:,} rows): up.main(--once), read-ahead off so the "
                 "profile sees processing and encoding")
    # run the read-ahead generator inline, so one profile sees every stage
    up.prefetch = lambda iterable, stop: iterable
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    code = up.main(argv, environ=environ)
    profiler.disable()
    seconds = time.perf_counter() - began
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("tottime").print_stats(15)
    text = buf.getvalue()
    text = text[text.index("ncalls"):] if "ncalls" in text else text
    text = text.replace(ROOT + "/", "")
    return {"title": title, "text": f"exit {code}, {seconds:.2f} s under cProfile; "
                                    f"top 15 by own time:\n{text}"}


# --- main -----------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("first-upload", "incremental", "idle-cycle",
                                         "memory", "processing", "warehouse", "all",
                                         "report", "idle-inprocess", "profile-inprocess",
                                         "many-first", "many-idle", "many-idle-inprocess"))
    parser.add_argument("--rows", type=int)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--idle-rows", type=int, default=10_000_000)
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--dlt", action="store_true", help="also run dlt (downloads it)")
    parser.add_argument("--no-profile", action="store_true",
                        help="with all: skip profiling missed targets")
    parser.add_argument("--what", dest="profile_what")
    parser.add_argument("--stage")
    args = parser.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    if args.what == "idle-inprocess":
        print(json.dumps(idle_inprocess(args.rows, args.runs)))
        return
    if args.what == "many-idle-inprocess":
        print(json.dumps(many_idle_inprocess(args.rows, args.runs)))
        return
    if args.what == "profile-inprocess":
        print(json.dumps(profile_inprocess(args.profile_what, args.rows, args.stage)))
        return
    if args.what == "report":  # RESULTS.md again from the last `all` (e.g. new ANALYSIS.md)
        with open(os.path.join(DATA, "results_all.json")) as fh:
            out = json.load(fh)
        report(out, out.get("argv", ["all", "--dlt"]))
        return
    began, digest = time.time(), script_digest()
    every = args.what == "all"
    out = {"versions": versions(args.dlt)}
    rows = args.rows or 1_000_000
    if args.what in ("first-upload", "all"):
        out["first_upload"] = bench_first_upload(rows, args.runs, args.dlt)
    if args.what in ("incremental", "all"):
        out["incremental"] = bench_incremental(rows, args.new, args.runs, args.dlt)
    if args.what in ("processing", "all"):
        out["processing"] = bench_processing(rows, args.runs)
    if args.what in ("warehouse", "all"):
        out["warehouse"] = bench_warehouse(rows, min(args.runs, 3))
    if args.what in ("idle-cycle", "all"):
        out["idle_cycle"] = bench_idle_cycle(
            args.rows if args.what == "idle-cycle" and args.rows else args.idle_rows, 20)
    if args.what == "many-first":
        out["many_first"] = bench_many_first(rows, args.runs)
    if args.what == "many-idle":
        out["many_idle"] = bench_many_idle(args.rows or 50_000, 20)
    if args.what in ("memory", "all"):
        out["memory"] = bench_memory([int(s) for s in args.sizes.split(",")],
                                     args.memory_runs)
    if every and not args.no_profile:
        out["profiles"] = profile_missed(out, rows)
    if script_digest() != digest:
        out["script_changed"] = f"{digest} -> {script_digest()}"
    out["targets"] = [{"target": t, "measured": m, "pass": ok} for t, m, ok in targets(out)]
    out["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["elapsed_min"] = round((time.time() - began) / 60, 1)
    out["argv"] = argv
    with open(os.path.join(DATA, f"results_{args.what}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    if every:
        report(out, argv)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
