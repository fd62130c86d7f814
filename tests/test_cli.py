"""CLI: main() exit codes, the one `error:` line, --help/--version, and runs end to end."""

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import unittest
from unittest import mock

from .helpers import SCRIPT, TempDirTestCase, make_db, read_delta, run_main, run_script, up

TOKEN = "dapi0123456789abcdefSECRET"
HOST = "adb-1234567890123456.7.azuredatabricks.net"

# DESIGN section 2: flag -> environment variable.
DESIGN_NAMES = [
    ("--sqlite", "SQLITE_PATH"), ("--table", "SQLITE_TABLE_NAME"),
    ("--timestamp-col", "TIMESTAMP_COL"), ("--state-dir", "STATE_DIR"),
    ("--interval", "UPLOAD_INTERVAL"), ("--once", "ONCE"),
    ("--databricks-host", "DATABRICKS_HOST"), ("--databricks-http-path", "DATABRICKS_HTTP_PATH"),
    ("--databricks-token", "DATABRICKS_TOKEN"), ("--databricks-database", "DATABRICKS_DATABASE"),
    ("--databricks-table", "DATABRICKS_TABLE"), ("--delta-uri", "DELTA_URI"),
    ("--batch-size", "BATCH_SIZE"), ("--config", "UPLOADER_CONFIG"),
]

READINGS_SCHEMA = """
CREATE TABLE readings (id INTEGER PRIMARY KEY, timestamp TEXT, logged_at TEXT, value REAL);
CREATE TABLE other (x INTEGER);
"""
READINGS = [(i, f"2025-01-01T00:00:0{i}Z", f"2025-01-02T00:00:0{i}Z", i * 1.5)
            for i in range(1, 6)]


def help_entries(text):
    """{option string: its whole help entry, on one line} from argparse --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith("   ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


class CliTestCase(TempDirTestCase):
    """A temp dir, a small sensor database, and the signal handlers main() installs undone."""

    def setUp(self):
        super().setUp()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.db = make_db(self.path("sensors.db"),
                          "CREATE TABLE r (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                          "timestamp TEXT, v REAL)",
                          [(f"2025-01-01T00:00:0{i}Z", i * 0.5) for i in range(6)],
                          columns=["timestamp", "v"])

    def write(self, name, text):
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def assertOneErrorLine(self, err):
        """stderr is exactly one line, `error: ...`; return it."""
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, f"stderr:\n{err}")
        self.assertTrue(lines[0].startswith("error: "), lines[0])
        return lines[0]

    def assertNothingWritten(self):
        """No state dir and no lakehouse under the temp dir (see base_env)."""
        self.assertFalse(os.path.exists(self.path("state")), "state dir was created")
        self.assertFalse(os.path.exists(self.path("lake")), "lakehouse was written")

    def run_guarded(self, argv, env):
        """run_main, but a run that goes to sleep between cycles fails instead of hanging."""
        real_run_forever = up.run_forever

        def run_forever(job, *args, **kwargs):
            def wait(timeout=None):
                raise AssertionError(f"the uploader slept {timeout} s instead of exiting")
            job.stop.wait = wait
            return real_run_forever(job, *args, **kwargs)

        with mock.patch.object(up, "run_forever", run_forever):
            return run_main(argv, env)


class BadConfigTest(CliTestCase):
    """Bad values stop the tool before any row is read: exit 2, one `error:` line."""

    # (label, argv, extra env, YAML text or None, parts the error line must contain)
    CASES = [
        ("unknown YAML key", [], {}, "intervall: 60\n",
         ["intervall", "did you mean 'interval'"]),
        ("interval not a number", [], {"UPLOAD_INTERVAL": "soon"}, None,
         ["interval", "soon", "UPLOAD_INTERVAL"]),
        ("interval zero", ["--interval", "0"], {}, None, ["interval", "0", "--interval"]),
        ("interval negative in YAML", [], {}, "interval: -5\n", ["interval", "-5"]),
        ("batch_size zero", [], {"BATCH_SIZE": "0"}, None, ["batch_size", "0", "BATCH_SIZE"]),
        ("malformed JSON in env", [], {"FILTER_CONFIG": "{bad"}, None,
         ["filter_config", "{bad", "FILTER_CONFIG"]),
        ("JSON array for an object", [], {"FILTER_CONFIG": '["S1", "S2"]'}, None,
         ["filter_config", '["S1", "S2"]', "FILTER_CONFIG"]),
        ("unknown boolean word", [], {"ONCE": "maybe"}, None, ["once", "maybe", "ONCE"]),
        ("boolean 2", [], {"ONCE": "2"}, None, ["once", "2", "ONCE"]),
        ("boolean word in YAML", [], {}, "once: maybe\n", ["once", "maybe"]),
        ("malformed YAML", [], {}, "sqlite: [unclosed\n", []),
        ("YAML file is a list", [], {}, "- sqlite: x.db\n- once: true\n", []),
        ("workspace and Delta URI", [], {"DATABRICKS_HOST": HOST}, None,
         ["databricks_host", "DATABRICKS_HOST", "delta_uri", "DELTA_URI"]),
    ]

    def test_bad_values(self):
        for label, argv, extra, yaml_text, parts in self.CASES:
            with self.subTest(label):
                env = self.base_env(SQLITE_PATH=self.db, DATABRICKS_TOKEN=TOKEN, **extra)
                if yaml_text is not None:
                    path = self.write("uploader.yaml", yaml_text)
                    argv, parts = [*argv, "--config", path], [*parts, path]
                code, out, err = self.run_guarded(argv, env)
                self.assertEqual(code, 2)
                line = self.assertOneErrorLine(err)
                for part in parts:
                    self.assertIn(part, line)
                self.assertNotIn(TOKEN, out + err)
                self.assertNothingWritten()

    def test_missing_yaml_file(self):
        path = self.path("absent.yaml")
        for argv, env in ((["--config", path], {}), ([], {"UPLOADER_CONFIG": path})):
            with self.subTest(argv=argv, env=env):
                code, _, err = self.run_guarded(argv, self.base_env(SQLITE_PATH=self.db, **env))
                self.assertEqual(code, 2)
                self.assertIn(path, self.assertOneErrorLine(err))
                self.assertNothingWritten()

    def test_missing_yaml_file_error_names_where_the_path_came_from(self):
        # A stale UPLOADER_CONFIG in a unit file is the usual cause: say so.
        path = self.path("absent.yaml")
        for argv, env, origin in ((["--config", path], {}, "--config"),
                                  ([], {"UPLOADER_CONFIG": path}, "UPLOADER_CONFIG")):
            with self.subTest(origin):
                code, _, err = self.run_guarded(argv, self.base_env(SQLITE_PATH=self.db, **env))
                self.assertEqual(code, 2)
                self.assertIn(origin, self.assertOneErrorLine(err))

    def test_bad_value_with_token_flag_warns_and_never_prints_it(self):
        code, out, err = self.run_guarded(
            ["--databricks-token", TOKEN, "--batch-size", "0"], self.base_env(SQLITE_PATH=self.db))
        self.assertEqual(code, 2)
        self.assertNotIn(TOKEN, out + err)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        self.assertEqual(len(errors), 1, err)
        self.assertIn("batch_size", errors[0])
        self.assertIn("ps", err)
        self.assertNothingWritten()

    def test_token_flag_with_print_config(self):
        code, out, err = run_main(["--print-config", "--databricks-token", TOKEN], {})
        self.assertEqual(code, 0, err)
        self.assertNotIn(TOKEN, out + err)
        self.assertIn("`ps`", err)
        self.assertIn("DATABRICKS_TOKEN", err)

    def test_no_sqlite_configured(self):
        code, _, err = self.run_guarded(["--once"], self.base_env())
        self.assertEqual(code, 2)
        line = self.assertOneErrorLine(err)
        self.assertIn("--sqlite", line)
        self.assertIn("SQLITE_PATH", line)
        self.assertNothingWritten()

    def test_host_that_is_only_a_scheme_is_a_config_error(self):
        # normalize_host("https://") is "": neither a workspace nor a Delta URI is left.
        env = {"STATE_DIR": self.path("state"), "SOURCE_ID": "test-node",
               "DATABRICKS_HOST": "https://"}
        try:
            code, _, err = self.run_guarded(["--once", "--sqlite", self.db], env)
        except Exception as exc:  # noqa: BLE001 - the bug is a traceback
            self.fail(f"traceback instead of a config error: {exc!r}")
        self.assertEqual(code, 2)
        self.assertIn("databricks_host", self.assertOneErrorLine(err))


class SourceInputTest(CliTestCase):
    """A SQLite file that is missing or not SQLite is bad input: exit 2, one line."""

    def test_bad_sqlite_files(self):
        not_sqlite = self.write("notes.db", "these are not the rows you are looking for\n" * 50)
        os.mkdir(self.path("a-directory.db"))
        for path in (self.path("absent.db"), not_sqlite, self.path("a-directory.db")):
            with self.subTest(path=os.path.basename(path)):
                code, _, err = self.run_guarded(["--once", "--sqlite", path], self.base_env())
                self.assertEqual(code, 2)
                line = self.assertOneErrorLine(err)
                self.assertIn(path, line)
                self.assertNothingWritten()

    def test_missing_file_error_names_its_source(self):
        path = self.path("absent.db")
        code, _, err = self.run_guarded(["--once"], self.base_env(SQLITE_PATH=path))
        self.assertEqual(code, 2)
        self.assertIn("SQLITE_PATH", self.assertOneErrorLine(err))

    def test_not_sqlite_file_is_left_untouched(self):
        path = self.write("notes.db", "plain text\n" * 100)
        before = os.stat(path)
        self.run_guarded(["--once", "--sqlite", path], self.base_env())
        after = os.stat(path)
        self.assertEqual((before.st_size, before.st_mtime_ns), (after.st_size, after.st_mtime_ns))


class RunTest(CliTestCase):
    """main() runs a cycle: exit 0 on success, 1 when the cycle fails."""

    def upload(self, *argv, **env):
        return self.run_guarded(["--once", "--sqlite", self.db, *argv], self.base_env(**env))

    def lake_rows(self, table="raw_r"):
        return read_delta(self.path("lake", table))

    def test_once_uploads_and_exits_0(self):
        code, out, err = self.upload(DATABRICKS_TOKEN=TOKEN)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.lake_rows()), 6)
        self.assertTrue(os.path.exists(self.path("state", "last_upload.json")))
        self.assertNotIn(TOKEN, out + err)
        self.assertNotIn("error: ", err)

    def test_second_run_uploads_nothing_new_and_reset_state_never_sends_rows_twice(self):
        self.assertEqual(self.upload()[0], 0)
        self.assertEqual(self.upload()[0], 0)
        self.assertEqual(len(self.lake_rows()), 6)
        state = self.path("state", "last_upload.json")
        with open(state, "rb") as fh:
            before = fh.read()
        # The table holds this node's 6 rows: starting over would send them twice.
        code, _, err = self.upload("--reset-state")
        self.assertEqual(code, 2, err)
        self.assertIn("already holds 6 rows from node test-node", err.splitlines()[-1])
        with open(state, "rb") as fh:
            self.assertEqual(fh.read(), before, "a refused reset changed the state")
        self.assertEqual(len(self.lake_rows()), 6)
        # --start-at now: a reset that uploads only rows added from now on.
        code, _, err = self.upload("--reset-state", "--start-at", "now")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.lake_rows()), 6)
        conn = sqlite3.connect(self.db)
        conn.execute("INSERT INTO r (timestamp, v) VALUES ('2025-01-02T00:00:00Z', 7.5)")
        conn.commit()
        conn.close()
        self.assertEqual(self.upload()[0], 0)
        self.assertEqual(sorted(r["v"] for r in self.lake_rows())[-1], 7.5)
        self.assertEqual(len(self.lake_rows()), 7)

    def test_reset_state_is_an_action_that_exits_unless_a_run_is_asked_for(self):
        fresh = self.path("fresh-lake")
        argv = ["--sqlite", self.db, "--reset-state"]
        code, _, err = self.run_guarded(argv, self.base_env(DELTA_URI=fresh))
        self.assertEqual(code, 0, err)
        self.assertIn("--reset-state done", err)
        self.assertFalse(os.path.exists(os.path.join(fresh, "raw_r")), "the reset ran a cycle")
        code, _, err = self.run_guarded(argv + ["--once"], self.base_env(DELTA_URI=fresh))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(read_delta(os.path.join(fresh, "raw_r"))), 6)

    def test_source_replaced_behind_the_cursor_fails_the_cycle(self):
        self.assertEqual(self.upload()[0], 0)
        os.remove(self.db)
        make_db(self.db, "CREATE TABLE r (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "timestamp TEXT, v REAL)", [("2025-01-01T00:00:00Z", 0.0)],
                columns=["timestamp", "v"])
        code, _, err = self.upload()
        self.assertEqual(code, 1)
        last = err.splitlines()[-1]
        self.assertTrue(last.startswith("error: "), err)
        self.assertIn("--reset-state", last)
        self.assertEqual(len(self.lake_rows()), 6)

    def test_failed_write_exits_1(self):
        lake_file = self.write("lake", "a file where the lakehouse directory should be\n")
        code, _, err = self.upload(DELTA_URI=lake_file)
        self.assertEqual(code, 1)
        self.assertIn("error: ", err)

    def test_failed_write_error_is_one_line(self):
        # STYLE: main turns UploaderError into one `error: ...` line; the Delta error
        # text carries its own newline ("...\nError: Os { ... }").
        lake_file = self.write("lake", "a file where the lakehouse directory should be\n")
        code, _, err = self.upload(DELTA_URI=lake_file)
        self.assertEqual(code, 1)
        errors = [line for line in err.splitlines() if not line[:4].isdigit()]
        self.assertEqual(len(errors), 1, err)
        self.assertTrue(errors[0].startswith("error: "), err)


# What deltalake 1.x raises for s3://bucket/lake/raw_r with AWS_ENDPOINT_URL=
# http://ak:endpointPass99@127.0.0.1:9000 when the store refuses the keys (the layout of
# a recorded one; object_store quotes the URL it tried, user:password@ included)
STORE_ERROR = ("Kernel error -> Generic S3 error\n  \x1b[31m\u21b3\x1b[0m Error performing GET "
               "http://ak:endpointPass99@127.0.0.1:9000/bucket/lake/raw_r/_delta_log/"
               "_last_checkpoint in 2.1ms - Server returned non-2XX status code: 403 "
               "Forbidden: <Error><Code>AccessDenied</Code></Error>\n")


class SecretsTest(CliTestCase):
    """No secret in stderr, logs (text or JSON), --print-config or the state file, in
    whatever text a library or a service hands back; the reason stays readable."""

    def test_a_host_with_a_password_is_refused_without_printing_it(self):
        env = self.base_env(SQLITE_PATH=self.db, DELTA_URI="",
                            DATABRICKS_HOST="https://edge:hostPassw0rd@" + HOST,
                            DATABRICKS_TOKEN=TOKEN)
        for argv in (["--once"], ["--print-config"], ["--print-config", "--json"]):
            with self.subTest(argv=argv):
                code, out, err = run_main(argv, env)
                self.assertEqual(code, 2, err)
                line = self.assertOneErrorLine(err)
                self.assertIn("databricks_host must be a host name without a user or "
                              "password", line)
                self.assertIn("[REDACTED]@" + HOST, line)
                self.assertNotIn("hostPassw0rd", out + err)
        self.assertNothingWritten()

    def test_a_store_error_quoting_a_password_in_the_endpoint_url_is_redacted(self):
        env = self.base_env(SQLITE_PATH=self.db, DELTA_URI="s3://bucket/lake",
                            AWS_ENDPOINT_URL="http://ak:endpointPass99@127.0.0.1:9000",
                            AWS_ALLOW_HTTP="true")
        for log_format in ("text", "json"):
            with self.subTest(log_format=log_format), \
                    mock.patch("deltalake.DeltaTable", side_effect=OSError(STORE_ERROR)):
                code, out, err = self.run_guarded(
                    ["--once", "--log-level", "DEBUG", "--log-format", log_format], env)
                self.assertEqual(code, 1, err)
                self.assertIn("error: sink: reading s3://bucket/lake/raw_r failed: Kernel "
                              "error -> Generic S3 error", err)
                self.assertIn("Traceback", err)  # the debug traceback, redacted
                self.assertIn("http://ak:[REDACTED]@127.0.0.1:9000/bucket", err)
                self.assertNotIn("endpointPass99", out + err)

    def test_secret_environment_variables_never_reach_a_log_line(self):
        secret = "AzureSasSig0123456789"
        env = self.base_env(SQLITE_PATH=self.db, AZURE_STORAGE_SAS_KEY=secret,
                            SANITIZE_HASH_KEY="hash-key-value-42")
        real = up.DeltaSink.announce

        def announce(sink):  # a line that quotes settings, ours and a library's
            up.log.info("store options: sas=%s hash=%s", secret, "hash-key-value-42")
            logging.getLogger("a_library").warning("retrying ?%s", secret)
            return real(sink)

        # the library's logger and the root have no handler (as in a run): lastResort's
        with mock.patch.object(up.DeltaSink, "announce", announce), \
                mock.patch.object(logging.root, "handlers", []):
            code, out, err = self.run_guarded(["--once"], env)
        self.assertEqual(code, 0, err)
        self.assertIn("store options: sas=[REDACTED] hash=[REDACTED]", err)
        self.assertIn("WARNING retrying ?[REDACTED]", err)
        self.assertNotIn(secret, out + err)
        with mock.patch.dict(os.environ, {"SANITIZE_HASH_KEY": "onlyletterspepper"}):
            up.remember_secrets(up.Config(), dict(os.environ))
            self.assertEqual(up.redact("hash onlyletterspepper"), "hash [REDACTED]")

    def test_a_variable_named_key_that_holds_a_plain_name_is_not_a_secret(self):
        # PARTITION_KEY=states (a user's own variable): 'raw_states' must stay readable;
        # an account or SAS key (long, not a plain name) is still replaced
        env = self.base_env(SQLITE_PATH=self.db, PARTITION_KEY="states", SORT_KEY="ts",
                            AZURE_STORAGE_ACCOUNT_KEY="bm90LWEtcmVhbC1rZXk+Lw==")

        def announce(sink):
            up.log.info("table raw_states sorted by ts; account key %s",
                        "bm90LWEtcmVhbC1rZXk+Lw==")
        with mock.patch.object(up.DeltaSink, "announce", announce):
            code, out, err = self.run_guarded(["--once"], env)
        self.assertEqual(code, 0, err)
        self.assertIn("table raw_states sorted by ts; account key [REDACTED]", err)

    def test_redact_takes_out_the_shapes_of_secrets_and_keeps_the_rest(self):
        cases = [
            ("GET https://u:p4ssw0rd@h.example/x failed", "GET https://[REDACTED]@h.example/x failed"),
            ("HTTP 401 (Authorization: Bearer eyJhbGciOi.abc.def)",
             "HTTP 401 (Authorization: Bearer [REDACTED])"),
            ("GET https://b.s3.amazonaws.com/k?X-Amz-Security-Token=IQoJb3JpZ2luX2VjE%2F&"
             "X-Amz-Signature=0123abcdef&X-Amz-Expires=60 failed",
             "GET https://b.s3.amazonaws.com/k?X-Amz-Security-Token=[REDACTED]&"
             "X-Amz-Signature=[REDACTED]&X-Amz-Expires=60 failed"),
            ("https://a.blob.core.windows.net/c/f?sv=2022-11-02&sp=rw&sig=Zm9vYmFy%3D 403",
             "https://a.blob.core.windows.net/c/f?sv=2022-11-02&sp=rw&sig=[REDACTED] 403"),
            ('{"access_token": "opaque-123", "expires_in": 3600}',
             '{"access_token": "[REDACTED]", "expires_in": 3600}'),
            ("token dapi0123456789abcdef0123456789abcdef-2 refused",
             "token [REDACTED] refused"),
            ("sink: writing raw_r failed: HTTP 503 TEMPORARILY_UNAVAILABLE at 12:30:01",
             "sink: writing raw_r failed: HTTP 503 TEMPORARILY_UNAVAILABLE at 12:30:01"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(up.redact(text), expected)


class NamesRunTest(CliTestCase):
    """The source and target settings steer a real run, in each of the three spellings."""

    def spellings(self):
        db = make_db(self.path("two-tables.db"), READINGS_SCHEMA, READINGS)
        for name in ("cli", "env", "yaml"):
            state, lake = self.path(name, "state"), self.path(name, "lake")
            if name == "cli":
                yield name, state, lake, [
                    "--sqlite", db, "--table", "readings", "--timestamp-col", "logged_at",
                    "--state-dir", state, "--delta-uri", lake,
                    "--databricks-table", "measurements", "--batch-size", "2",
                    "--interval", "5", "--once"], {}
            elif name == "env":
                yield name, state, lake, [], {
                    "SQLITE_PATH": db, "SQLITE_TABLE_NAME": "readings",
                    "TIMESTAMP_COL": "logged_at", "STATE_DIR": state, "DELTA_URI": lake,
                    "DATABRICKS_TABLE": "measurements", "BATCH_SIZE": "2",
                    "UPLOAD_INTERVAL": "5", "ONCE": "TRUE"}
            else:
                path = self.write("names.yaml", textwrap.dedent(f"""\
                    sqlite_path: {db}
                    sqlite_table_name: readings
                    timestamp_col: logged_at
                    state_dir: {state}
                    delta_uri: {lake}
                    table_name: measurements
                    batch_size: 2
                    interval: 5
                    once: yes
                    """))
                yield name, state, lake, ["--config", path], {}

    def test_each_spelling_steers_the_run(self):
        for name, state, lake, argv, env in self.spellings():
            with self.subTest(name):
                code, _, err = self.run_guarded(argv, {"SOURCE_ID": "test-node", **env})
                self.assertEqual(code, 0, err)
                rows = read_delta(os.path.join(lake, "raw_measurements"))
                self.assertEqual(sorted(r["value"] for r in rows), [r[3] for r in READINGS])
                self.assertEqual(len({r["_batch_id"] for r in rows}), 3)  # 5 rows, batches of 2
                with open(os.path.join(state, "last_upload.json"), encoding="utf-8") as fh:
                    source = json.dumps(json.load(fh)["source"])
                self.assertIn("readings", source)
                self.assertIn("logged_at", source)


class HelpVersionTest(CliTestCase):
    """--help lists each flag with its environment variable; --version prints it."""

    def test_help_lists_env_var_beside_each_flag(self):
        code, out, _ = run_main(["--help"], {})
        self.assertEqual(code, 0)
        entries = help_entries(out)
        for flag, env in DESIGN_NAMES:
            with self.subTest(flag):
                self.assertIn(flag, entries)
                self.assertIn(env, entries[flag])
        for name, setting, _ in up.config_fields():
            with self.subTest(setting.flag):
                for env in setting.env:
                    self.assertIn(env, entries[setting.flag])

    def test_help_lists_the_actions(self):
        entries = help_entries(run_main(["--help"], {})[1])
        for flag in ("--config", "--print-config", "--reset-state", "--version"):
            self.assertIn(flag, entries)

    def test_version(self):
        code, out, _ = run_main(["--version"], {})
        self.assertEqual(code, 0)
        self.assertIn(up.__version__, out)

    def test_help_does_not_import_heavy_modules(self):
        probe = textwrap.dedent(f"""\
            import runpy, sys
            sys.argv = [{SCRIPT!r}, "--help"]
            try:
                runpy.run_path({SCRIPT!r}, run_name="__main__")
            except SystemExit:
                pass
            print(sorted(m for m in ("databricks.sql", "deltalake", "yaml") if m in sys.modules))
            """)
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--sqlite", result.stdout)
        self.assertEqual(result.stdout.splitlines()[-1], "[]")


class EndToEndTest(CliTestCase):
    """The script run as a user would: env and YAML, --print-config, exit codes."""

    def test_print_config_from_env_and_yaml(self):
        path = self.write("uploader.yaml", textwrap.dedent(f"""\
            sqlite_path: {self.db}
            table_name: readings
            interval: 60
            batch_size: 5000
            once: yes
            filter_config:
              temperature:
                ">": 20
            """))
        env = {"UPLOADER_CONFIG": path, "UPLOAD_INTERVAL": "12.5",
               "DATABRICKS_HOST": f"https://{HOST}/", "DATABRICKS_TOKEN": TOKEN}
        result = run_script(["--print-config", "--batch-size", "7"], env, cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(TOKEN, result.stdout + result.stderr)
        lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
        expectations = {
            "sqlite": (self.db, path),
            "databricks_table": ("readings", "table_name"),
            "interval": ("12.5", "UPLOAD_INTERVAL"),
            "batch_size": ("7", "--batch-size"),
            "once": ("True", "once"),
            "filter_config": ('"temperature"', "filter_config"),
            "databricks_host": (HOST, "DATABRICKS_HOST"),
            "databricks_token": ("", "DATABRICKS_TOKEN"),
            "state_dir": ("/state", "default"),
        }
        for name, (value, source) in expectations.items():
            with self.subTest(name):
                self.assertIn(value, lines[name])
                self.assertIn(source, lines[name])
        self.assertIn("sqlite_path", lines["sqlite"])
        self.assertNotIn("https://", lines["databricks_host"])
        self.assertFalse(os.path.exists(self.path("state")))

    def test_bad_config_exits_2_with_one_line(self):
        result = run_script(["--once"], {"SQLITE_PATH": self.db, "UPLOAD_INTERVAL": "0",
                                         "STATE_DIR": self.path("state"),
                                         "DELTA_URI": self.path("lake")}, cwd=self.tmp)
        self.assertEqual(result.returncode, 2)
        self.assertIn("UPLOAD_INTERVAL", self.assertOneErrorLine(result.stderr))
        self.assertNothingWritten()


if __name__ == "__main__":
    unittest.main()
