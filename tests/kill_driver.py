"""Run the uploader's main() with a fault planted at the K-th call of one hook.

usage: python tests/kill_driver.py HOOK K [uploader arguments...]

Most hooks SIGKILL the process before or after the K-th call of a function (the
crash tests restart it until a run completes). Environment:
  DRIVER_SIDE        folder for what the hooks record (old-new.json, probes.jsonl)
  DRIVER_WAREHOUSE=1 the uploader talks to tests/fake_warehouse.py
  (the landing target talks to a Files API over loopback: DATABRICKS_HOST names it)
  DRIVER_ADD_DB, DRIVER_ADD_ROWS, DRIVER_DB, DRIVER_PROBE_EVERY, DRIVER_PROBE_TIMEOUT
                     for the hooks that name them

deltalake.write_deltalake is the Delta commit itself (the sink imports it at call
time, so wrapping the module attribute reaches it); up.http_call is one HTTP request
(the zerobus-* hooks count only Zerobus Ingest inserts that carry rows); the state-file
hooks wrap json.dump, os.fsync and os.replace as Checkpoint.save uses them.
"""

import json
import os
import signal
import sqlite3
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import deltalake  # noqa: E402

import sqlite_to_databricks_uploader as up  # noqa: E402


def die():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def signal_self(signum):
    """Send this process `signum` (its handler runs, then the wrapped call goes on)."""
    return lambda: os.kill(os.getpid(), signum)


def plant(k, owner, name, when, pick=None, action=die):
    """Wrap owner.name; at its k-th picked call, run `action` before or after it."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        hit = False
        if pick is None or pick(*args, **kwargs):
            calls[0] += 1
            hit = calls[0] == k
        if hit and when == "before":
            action()
        result = original(*args, **kwargs)
        if hit and when == "after":
            action()
        return result

    setattr(owner, name, wrapper)


def is_state_file(src, dst, *args, **kwargs):
    return os.path.basename(os.fspath(dst)) == up.STATE_FILE


def torn_dump(k):
    """The k-th json.dump of the state writes half of its text, then the process dies."""
    original, calls = json.dump, [0]

    def dump(obj, fp, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            text = json.dumps(obj, *args, **kwargs)
            fp.write(text[: len(text) // 2])
            fp.flush()
            os.fsync(fp.fileno())
            die()
        return original(obj, fp, *args, **kwargs)

    json.dump = dump


def old_or_new(k, point, side):
    """Die at `point` inside the k-th Checkpoint.save, after recording the state file as
    it was (old) and the text the save writes (new) in side/old-new.json."""
    save, dump, fsync, replace = up.Checkpoint.save, json.dump, os.fsync, os.replace
    saves, active, fsyncs = [0], [None], [0]

    def checked_save(self):
        saves[0] += 1
        if saves[0] == k:
            old = None
            if os.path.exists(self.path):
                with open(self.path, encoding="utf-8") as fh:
                    old = fh.read()
            active[0] = {"old": old}
        return save(self)

    def checked_dump(obj, fp, *args, **kwargs):
        if active[0] is not None:
            active[0]["new"] = json.dumps(obj, *args, **kwargs)
            with open(os.path.join(side, "old-new.json"), "w", encoding="utf-8") as fh:
                dump(active[0], fh)
            if point == "open":  # the temp file is created and empty
                die()
            if point == "dump":  # half of it written and synced
                fp.write(active[0]["new"][: len(active[0]["new"]) // 2])
                fp.flush()
                fsync(fp.fileno())
                die()
        return dump(obj, fp, *args, **kwargs)

    def checked_fsync(fd):
        if active[0] is not None:
            fsyncs[0] += 1
            if (point, fsyncs[0]) in (("fsync-file", 1), ("fsync-dir", 2)):
                die()
        fsync(fd)
        if active[0] is not None and (point, fsyncs[0]) == ("synced", 2):
            die()

    def checked_replace(src, dst, *args, **kwargs):
        if active[0] is not None and point == "rename" and is_state_file(src, dst):
            die()
        return replace(src, dst, *args, **kwargs)

    up.Checkpoint.save, json.dump = checked_save, checked_dump
    os.fsync, os.replace = checked_fsync, checked_replace


def commit_add_rows_then_fail(k):
    """The k-th Delta commit lands, the sensor adds rows, then the write fails."""
    def fail():
        conn = sqlite3.connect(os.environ["DRIVER_ADD_DB"])
        with conn:
            conn.executemany("INSERT INTO sensor_readings (timestamp, sensor_id) "
                             "VALUES (?, ?)", [("2030-01-01T00:00:00", "LATE")] *
                             int(os.environ["DRIVER_ADD_ROWS"]))
        conn.close()
        raise PermissionError("injected: permission denied after the commit landed")
    plant(k, deltalake, "write_deltalake", "after", action=fail)


def fail_delta_write(k):
    """The k-th Delta write fails before it lands (a refused write, not retried)."""
    def fail():
        raise PermissionError("injected: permission denied, nothing written")
    plant(k, deltalake, "write_deltalake", "before", action=fail)


def after_landed(k, action):
    """Run `action` after the k-th Delta write that returned (a commit that landed;
    writes that lost a race and raised are not counted, so contention does not move
    the point)."""
    original, landed = deltalake.write_deltalake, [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        landed[0] += 1
        if landed[0] == k:
            action()
        return result

    deltalake.write_deltalake = wrapper


def lose_reply(k):
    """The k-th Delta commit lands, then its reply is lost (the call raises)."""
    def fail():
        raise ConnectionResetError("injected: connection reset before the reply")
    after_landed(k, fail)


def vanish_commit(k):
    """The k-th Delta commit lands, then another writer replaces its log entry (what a
    store that ignores If-None-Match allows): only a commitInfo line is left."""
    def replace(table_or_uri, *args, **kwargs):
        uri = table_or_uri if isinstance(table_or_uri, str) else table_or_uri.table_uri
        log_dir = os.path.join(uri.removeprefix("file://"), "_delta_log")
        newest = max(n for n in os.listdir(log_dir) if n.endswith(".json"))
        with open(os.path.join(log_dir, newest), encoding="utf-8") as fh:
            kept = [line for line in fh if line.startswith('{"commitInfo"')]
        with open(os.path.join(log_dir, newest), "w", encoding="utf-8") as fh:
            fh.writelines(kept)

    original, calls = deltalake.write_deltalake, [0]

    def wrapper(table_or_uri, *args, **kwargs):
        result = original(table_or_uri, *args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            replace(table_or_uri)
        return result

    deltalake.write_deltalake = wrapper


def wal_probe(k, side, hold):
    """After every DRIVER_PROBE_EVERY-th checkpoint commit (the main thread between two
    batches), pause so the read-ahead thread finishes its read, then try
    PRAGMA wal_checkpoint(TRUNCATE) from a second connection: it completes only when no
    connection holds a read transaction. `hold` is the control: a reader that keeps one
    read transaction across the batches of a cycle, which the probe must catch."""
    db = os.environ["DRIVER_DB"]
    every = int(os.environ.get("DRIVER_PROBE_EVERY", "1"))
    timeout = float(os.environ.get("DRIVER_PROBE_TIMEOUT", "2"))
    commits = [0]
    if hold:  # one read transaction for the whole cycle, all its batches included
        cycle = up.run_cycle

        def held_cycle(job):
            job.conn.execute("BEGIN")
            try:
                return cycle(job)
            finally:
                job.conn.execute("COMMIT")

        up.run_cycle = held_cycle
    commit = up.Checkpoint.commit

    def probed_commit(self, destination):
        commit(self, destination)
        commits[0] += 1
        if commits[0] % every or commits[0] > every * k:
            return
        time.sleep(0.05)
        before = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
        probe = sqlite3.connect(db, timeout=timeout, isolation_level=None)
        try:
            started = time.monotonic()
            for _ in range(100):  # (1, -1, -1): the sensor is checkpointing; wait
                busy, frames, done = probe.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if (busy, frames, done) != (1, -1, -1):
                    break
                time.sleep(0.01)
            took = time.monotonic() - started
        finally:
            probe.close()
        wal = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
        with open(os.path.join(side, "probes.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"busy": busy, "frames": frames, "done": done,
                                 "wal_before": before, "wal": wal, "took": took}) + "\n")

    up.Checkpoint.commit = probed_commit


def plant_statement(k, prefix, when):
    """Die before or after the k-th statement that the fake warehouse runs (with prefix)."""
    from tests import fake_warehouse
    plant(k, fake_warehouse.Warehouse, "execute", when,
          lambda self, sql, *a, **kw: sql.lstrip().startswith(prefix))


def plant_zerobus(k, when):
    """Die before or after the k-th Zerobus insert request that carries rows (after:
    the service took the rows and answered; the state still says in flight)."""
    plant(k, up, "http_call", when, lambda method, url, data, *a, **kw:
          url.endswith("/insert") and data != b"[]")


def is_batch_upload(api, method, url, *args, **kwargs):
    """A landing sink's Files API PUT of a batch file (not a folder, not a status file)."""
    return method == "PUT" and "/fs/files/" in url and url.split("?")[0].endswith(".parquet")


def hooks(k, side):
    """Hook name -> what plants it."""
    return {
        "begin-after": lambda: plant(k, up.Checkpoint, "begin", "after"),
        "commit-after": lambda: plant(k, up.Checkpoint, "commit", "after"),
        "save-before": lambda: plant(k, up.Checkpoint, "save", "before"),
        "save-after": lambda: plant(k, up.Checkpoint, "save", "after"),
        "delta-before": lambda: plant(k, deltalake, "write_deltalake", "before"),
        "delta-after": lambda: plant(k, deltalake, "write_deltalake", "after"),
        "process-before": lambda: plant(k, up, "process_batch", "before"),
        "process-after": lambda: plant(k, up, "process_batch", "after"),
        "torn-state": lambda: torn_dump(k),
        "rename-before": lambda: plant(k, os, "replace", "before", is_state_file),
        "rename-after": lambda: plant(k, os, "replace", "after", is_state_file),
        "fsync-before": lambda: plant(k, os, "fsync", "before"),
        "insert-before": lambda: plant_statement(k, "INSERT", "before"),
        "insert-after": lambda: plant_statement(k, "INSERT", "after"),
        "statement-before": lambda: plant_statement(k, "", "before"),
        "statement-after": lambda: plant_statement(k, "", "after"),
        "fail-delta-write": lambda: fail_delta_write(k),
        "commit-add-rows-then-fail": lambda: commit_add_rows_then_fail(k),
        "sigterm-delta-before": lambda: plant(k, deltalake, "write_deltalake", "before",
                                              action=signal_self(signal.SIGTERM)),
        "sigint-delta-before": lambda: plant(k, deltalake, "write_deltalake", "before",
                                             action=signal_self(signal.SIGINT)),
        "lost-reply": lambda: lose_reply(k),
        "delta-landed": lambda: after_landed(k, die),
        "vanish-commit": lambda: vanish_commit(k),
        "wal-probe": lambda: wal_probe(k, side, hold=False),
        "wal-probe-held-read": lambda: wal_probe(k, side, hold=True),
        "zerobus-before": lambda: plant_zerobus(k, "before"),
        "zerobus-after": lambda: plant_zerobus(k, "after"),
        "upload-before": lambda: plant(k, up.FilesApi, "send", "before", is_batch_upload),
        "upload-after": lambda: plant(k, up.FilesApi, "send", "after", is_batch_upload),
        "none": lambda: None,
    }


def main(argv):
    hook, k, args = argv[0], int(argv[1]), argv[2:]
    side = os.environ.get("DRIVER_SIDE", ".")
    if os.environ.get("DRIVER_WAREHOUSE"):
        from tests import fake_warehouse  # reads FAKE_WAREHOUSE_ROOT
        up.DatabricksSink.connector = fake_warehouse
    if hook.startswith("state:"):
        old_or_new(k, hook.split(":", 1)[1], side)
    else:
        hooks(k, side)[hook]()
    return up.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
