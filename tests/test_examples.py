"""Docs and deployment examples stay true to the parser: every flag and environment
variable they name exists, and each example parses as what it claims to be."""

import contextlib
import glob
import io
import logging
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tempfile
import unittest

from tests.helpers import ROOT, TempDirTestCase, run_main, sensor_db, up

EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT_NAME = "sqlite_to_databricks_uploader.py"
DOCS = ["README.md", "uploader-config.yaml.example", "start-uploader.sh"]
EXAMPLE_FILES = ["bacalhau-job.yaml", "docker-compose.yml", "sqlite-uploader.service",
                 "crontab.txt", "databricks-setup.sql", "README.md"]

FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# An environment variable is an ALL_CAPS name with an underscore (DATABRICKS_HOST), or
# any ALL_CAPS name that is assigned (ONCE=true) or expanded ($PATH, ${HOME}).
ENV_RE = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
ENV_USE_RE = re.compile(r"(?:(?<=^)|(?<=[\s\"'(=]))([A-Z][A-Z0-9_]*)=(?!=)|\$\{?([A-Z][A-Z0-9_]*)",
                        re.M)

# Flags of the other programs the docs run (so a tool flag can never hide here; the
# test checks that none of them is a tool flag).
OTHER_FLAGS = {
    "--with", "--with-requirements", "--script", "--quiet",  # uv run
    "--system", "--no-create-home", "--shell",              # useradd (systemd example)
    "--now",                                                # systemctl enable
    "--container",                        # start-uploader.sh's own: run in the uv image
    "--rm", "--init", "--name",                             # docker run
    "--dlt", "--runs",                    # bench/bench.py: also run dlt; runs per figure
}
# Environment variables of other programs, named on purpose by the docs.
OTHER_ENV = {
    "PATH", "HOME", "SHELL", "MAILTO",  # the shell and cron (crontab.txt)
    "BASH_SOURCE",                      # bash (start-uploader.sh)
    "CONFIG_FILE",                      # start-uploader.sh's usage placeholder, not a variable
    "RELIABILITY_SEED",                 # read by tests/test_reliability.py, not the tool
    "UPLOADER_FULL_TESTS",              # read by tests/helpers.py: run the slow suites
    "DATA_DIR", "STATE_HOST_DIR",       # start-uploader.sh --container: host directories
    "DELTA_DYNAMO_TABLE_NAME",          # README: deltalake's old DynamoDB lock, ignored
}
OTHER_ENV_PREFIXES = (
    "AWS_", "AZURE_", "GOOGLE_",  # object-store credentials, read by deltalake itself
    "UV_",                        # uv: cache and Python locations
    "BACALHAU_",                  # set by Bacalhau in every task (BACALHAU_NODE_ID)
)
NOT_ENV_RE = re.compile(r"SENSOR_\d+")  # sample sensor ids in README's filter example

SECRET_ENV = {"DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "SANITIZE_HASH_KEY"}

# The processing configs behind the CREATE TABLE statements of databricks-setup.sql
# (its header shows the same commands).
DDL_RUNS = [
    [],
    ["--enable-filter", "--filter-config", '{"status_code": 0}'],
    ["--enable-sanitize", "--sanitize-config",
     '{"serial_number": {"hash": true}, "latitude": {"round": 2}, "longitude": {"round": 2}}'],
    ["--enable-aggregate", "--aggregate-config",
     '{"group_by": ["sensor_id"], "window": "15m", "aggregations": '
     '{"temperature": ["avg", "min", "max"], "humidity": "avg", "records": "count"}}'],
]
# Databricks statements sqlglot does not model; it keeps them as a generic Command.
SQLGLOT_COMMANDS = ("CREATE CATALOG", "CREATE VOLUME", "GRANT")


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def doc_paths():
    """Every file whose names are checked: the docs and everything in examples/."""
    return DOCS + sorted(os.path.relpath(p, ROOT)
                         for p in glob.glob(os.path.join(EXAMPLES, "*")))


def tool_flags():
    return set(up.build_parser()._option_string_actions)


def tool_env():
    """Every environment variable the tool reads."""
    names = {env for _, setting, _ in up.config_fields() for env in setting.env}
    return names | {"UPLOADER_CONFIG", "SANITIZE_HASH_KEY"}


def env_names(text):
    names = set(ENV_RE.findall(text))
    for assigned, expanded in ENV_USE_RE.findall(text):
        names.add(assigned or expanded)
    return {n for n in names if not NOT_ENV_RE.fullmatch(n)}


def is_known_env(name):
    return (name in tool_env() or name in OTHER_ENV
            or name.startswith(OTHER_ENV_PREFIXES))


def tool_args(command):
    """The arguments given to the script in a command line (a string or a list)."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    start = next(i for i, w in enumerate(words) if w.endswith(SCRIPT_NAME)) + 1
    args = []
    for word in words[start:]:
        if word in ("&&", "||", ";", "|", ">", ">>", "2>&1") or word.startswith(">"):
            break
        args.append(word)
    return args


def parse_tool_args(test, args):
    """Parse args with the tool's own parser; fail the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return up.build_parser().parse_args(args)
    except SystemExit:
        test.fail(f"the tool rejects {args}: {err.getvalue().strip()}")


def load_yaml(path):
    import yaml
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def read_unit(path):
    """{section: {key: [values]}} of a systemd unit (keys may repeat)."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_env(service):
    return dict(v.split("=", 1) for v in service.get("Environment", []))


def is_under(path, directory):
    return posixpath.commonpath([path, directory]) == directory


# === Names in the docs ===============================================================

class NamesTest(unittest.TestCase):
    def test_the_examples_are_all_there(self):
        for name in EXAMPLE_FILES:
            with self.subTest(file=name):
                self.assertTrue(os.path.isfile(os.path.join(EXAMPLES, name)))

    def test_no_allow_listed_name_is_one_of_the_tool(self):
        self.assertEqual(OTHER_FLAGS & tool_flags(), set())
        self.assertEqual({n for n in tool_env()
                          if n in OTHER_ENV or n.startswith(OTHER_ENV_PREFIXES)}, set())

    def test_every_flag_mentioned_exists_in_the_parser(self):
        known = tool_flags() | OTHER_FLAGS
        for path in doc_paths():
            with self.subTest(file=path):
                unknown = sorted(set(FLAG_RE.findall(read(path))) - known)
                self.assertEqual(unknown, [], f"{path} names flags the tool does not have")

    def test_every_environment_variable_mentioned_is_read_by_the_tool(self):
        for path in doc_paths():
            with self.subTest(file=path):
                unknown = sorted(n for n in env_names(read(path)) if not is_known_env(n))
                self.assertEqual(unknown, [], f"{path} names variables the tool does not read")

    def test_the_checks_find_what_they_look_for(self):
        text = "run --once --no-such-flag with ONCE=1, $NOPE_VAR and ${HOME} SENSOR_001"
        self.assertEqual(set(FLAG_RE.findall(text)), {"--once", "--no-such-flag"})
        self.assertEqual(env_names(text), {"ONCE", "NOPE_VAR", "HOME"})


# === uploader-config.yaml.example ====================================================

class ExampleConfigTest(TempDirTestCase):
    """The example YAML parses through the tool and lists every key with its default."""

    def example(self):
        return os.path.join(ROOT, "uploader-config.yaml.example")

    def key_blocks(self):
        """{key: (value text, the comment lines above it)} for `key:` lines, commented or not."""
        blocks, comments = {}, []
        for line in read("uploader-config.yaml.example").splitlines():
            match = re.match(r"^(?:# )?([a-z][a-z0-9_]*): ?(.*)$", line)
            if match:
                self.assertNotIn(match.group(1), blocks, f"{match.group(1)} listed twice")
                blocks[match.group(1)] = (match.group(2), comments)
                comments = []
            elif line.startswith("#"):
                comments.append(line)
        return blocks

    def test_it_parses_as_it_is(self):
        layer = up.read_yaml_layer(self.example())
        values, _ = up.merge_layers(layer)
        self.assertEqual(values, {"sqlite": "/data/sensor_data.db"})

    def test_every_key_uncommented_parses_and_type_checks(self):
        text = "\n".join(f"{key}: {value}" for key, (value, _) in self.key_blocks().items())
        path = self.path("all-keys.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        layer = up.read_yaml_layer(path)
        self.assertEqual(set(layer), {name for name, _, _ in up.config_fields()})
        up.merge_layers(layer)  # every value has its field's type

    def test_every_key_is_listed_with_its_default(self):
        import yaml
        blocks = self.key_blocks()
        for name, _, default in up.config_fields():
            with self.subTest(key=name):
                self.assertIn(name, blocks)
                if default is None:
                    continue  # an example value; the comment says what the default does
                shown = yaml.safe_load(blocks[name][0])
                self.assertEqual(up.parse_value(name, shown, "example"), default)

    def test_each_key_names_its_flag_and_variable(self):
        settings = {name: setting for name, setting, _ in up.config_fields()}
        for name, (_, comments) in self.key_blocks().items():
            with self.subTest(key=name):
                pairs = re.findall(r"(--[a-z-]+) / ([A-Z_]+)", "\n".join(comments))
                self.assertEqual(pairs, [(settings[name].flag, settings[name].env[0])])


# === examples/ =======================================================================

class BacalhauJobTest(unittest.TestCase):
    def setUp(self):
        self.job = load_yaml(os.path.join(EXAMPLES, "bacalhau-job.yaml"))
        self.task = self.job["Tasks"][0]

    def test_it_is_a_daemon_job_running_the_uv_image(self):
        self.assertEqual(self.job["Type"], "daemon")
        self.assertEqual(len(self.job["Tasks"]), 1)
        engine = self.task["Engine"]
        self.assertEqual(engine["Type"], "docker")
        self.assertTrue(engine["Params"]["Image"].startswith("ghcr.io/astral-sh/uv:python3"))

    def command(self):
        params = self.task["Engine"]["Params"]
        return " ".join(params.get("Entrypoint", []) + params.get("Parameters", []))

    def test_the_command_runs_the_script_with_valid_flags_and_sh_accepts_it(self):
        command = self.task["Engine"]["Params"]["Parameters"][0]
        self.assertIn("exec uv run", command)
        parse_tool_args(self, tool_args(command))
        if shutil.which("sh"):
            subprocess.run(["sh", "-n", "-c", command], check=True)

    def test_inputs_script_config_data_read_only_state_read_write(self):
        targets = {s["Target"]: s["Source"] for s in self.task["InputSources"]}
        env = self.task["Env"]
        args = parse_tool_args(self, tool_args(self.command()))
        words = shlex.split(self.command())
        script = next(w for w in words if w.endswith(SCRIPT_NAME))
        for path in (script, args.config):
            source = targets[posixpath.dirname(path)]
            self.assertEqual(source["Type"], "urlDownload")
            self.assertEqual(posixpath.basename(source["Params"]["URL"]),
                             posixpath.basename(path))
        data = targets[posixpath.dirname(env["SQLITE_PATH"])]
        self.assertEqual((data["Type"], data["Params"]["ReadWrite"]), ("localDirectory", False))
        state = targets[env["STATE_DIR"]]
        self.assertEqual((state["Type"], state["Params"]["ReadWrite"]), ("localDirectory", True))

    def test_secrets_come_from_the_node_environment_only(self):
        for name, value in self.task["Env"].items():
            with self.subTest(env=name):
                self.assertTrue(is_known_env(name))
                if name in SECRET_ENV:
                    self.assertEqual(value, f"env:{name}")


class DockerComposeTest(unittest.TestCase):
    def setUp(self):
        compose = load_yaml(os.path.join(EXAMPLES, "docker-compose.yml"))
        self.service = compose["services"]["uploader"]
        self.mounts = {m["target"]: m for m in self.service["volumes"]}

    def test_the_service_runs_the_script_with_uv_and_valid_flags(self):
        self.assertTrue(self.service["image"].startswith("ghcr.io/astral-sh/uv:python3"))
        command = self.service["command"]
        self.assertEqual(command[:2], ["uv", "run"])
        args = parse_tool_args(self, tool_args(command))
        script = next(w for w in command if w.endswith(SCRIPT_NAME))
        for path in (script, args.config):
            self.assertEqual(self.mounts[path]["type"], "bind")
            self.assertTrue(self.mounts[path].get("read_only"))

    def test_data_read_only_state_on_a_volume_secrets_from_env_file(self):
        env = self.service["environment"]
        self.assertTrue(all(is_known_env(name) for name in env))
        self.assertEqual(SECRET_ENV & set(env), set(), "secrets belong in the .env file")
        self.assertTrue(self.service["env_file"])
        self.assertTrue(self.mounts[posixpath.dirname(env["SQLITE_PATH"])]["read_only"])
        state = self.mounts[env["STATE_DIR"]]
        self.assertEqual(state["type"], "volume")
        self.assertFalse(state.get("read_only", False))

    def test_restart_and_time_to_finish_a_batch(self):
        self.assertIn(self.service["restart"], ("unless-stopped", "always", "on-failure"))
        self.assertEqual(self.service["stop_signal"], "SIGTERM")
        grace = re.fullmatch(r"(\d+)([ms])", self.service["stop_grace_period"])
        seconds = int(grace.group(1)) * (60 if grace.group(2) == "m" else 1)
        self.assertGreaterEqual(seconds, 60)


class SystemdUnitTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(EXAMPLES, "sqlite-uploader.service")
        self.unit = read_unit(self.path)
        self.service = self.unit["Service"]

    def test_exec_start_runs_the_script_with_uv_and_valid_flags(self):
        (exec_start,) = self.service["ExecStart"]
        self.assertIn(" run ", exec_start)
        self.assertTrue(shlex.split(exec_start)[0].endswith("/uv"))
        parse_tool_args(self, tool_args(exec_start))

    def test_stop_restart_user_and_secrets(self):
        one = {key: values[-1] for key, values in self.service.items()}
        self.assertEqual(one["Type"], "simple")
        self.assertEqual(one["KillSignal"], "SIGTERM")
        self.assertEqual(one["KillMode"], "mixed")  # SIGTERM to uv alone: it forwards once
        self.assertEqual(one["Restart"], "on-failure")
        self.assertGreaterEqual(int(one["TimeoutStopSec"]), 60)
        self.assertNotIn(one["User"], ("root", "0"))
        self.assertTrue(one["EnvironmentFile"])
        self.assertEqual(SECRET_ENV & set(unit_env(self.service)), set())

    def test_state_directory_is_state_dir_and_data_is_read_only(self):
        env = unit_env(self.service)
        self.assertTrue(all(is_known_env(name) for name in env))
        (state,) = self.service["StateDirectory"]
        self.assertEqual(env["STATE_DIR"], f"/var/lib/{state}")
        read_only = self.service["ReadOnlyPaths"][0].split()
        self.assertTrue(any(is_under(env["SQLITE_PATH"], d) for d in read_only))

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze not installed")
    def test_systemd_analyze_verify_finds_nothing(self):
        # Verify a copy whose executable exists here; any complaint names the copy.
        with tempfile.TemporaryDirectory() as tmp:
            text = read("examples", "sqlite-uploader.service")
            text = text.replace("ExecStart=/usr/local/bin/uv", "ExecStart=/bin/sh")
            text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")
            copy = os.path.join(tmp, "sqlite-uploader.service")
            with open(copy, "w", encoding="utf-8") as fh:
                fh.write(text)
            done = subprocess.run(["systemd-analyze", "verify", copy], capture_output=True,
                                  text=True, timeout=60)
            complaints = [line for line in (done.stdout + done.stderr).splitlines()
                          if "sqlite-uploader.service" in line]
            self.assertEqual(complaints, [])


class CrontabTest(unittest.TestCase):
    def setUp(self):
        self.lines = [line for line in read("examples", "crontab.txt").splitlines()
                      if line.strip() and not line.startswith("#")]
        self.jobs = [line for line in self.lines if not re.match(r"^[A-Z_]+=", line)]

    def test_one_job_every_five_minutes_once_logging_to_a_file(self):
        (job,) = self.jobs
        fields = job.split(None, 5)
        self.assertEqual(fields[:5], ["*/5", "*", "*", "*", "*"])
        command = fields[5]
        self.assertNotIn("%", command)  # cron turns % into a newline
        self.assertNotIn("flock", command)  # the tool locks its state directory itself
        args = parse_tool_args(self, tool_args(command))
        self.assertEqual(args.once, "true")
        self.assertRegex(command, r">> ?/\S+\.log 2>&1$")
        if shutil.which("sh"):
            subprocess.run(["sh", "-n", "-c", command], check=True)

    def test_variables_are_known_and_no_secret_is_written_here(self):
        for line in self.lines:
            if line in self.jobs:
                continue
            name = line.split("=", 1)[0]
            with self.subTest(variable=name):
                self.assertTrue(is_known_env(name))
                self.assertNotIn(name, SECRET_ENV)

    def test_exit_codes_are_explained(self):
        text = read("examples", "crontab.txt")
        for code in ("0", "1", "2"):
            self.assertRegex(text, rf"(?m)^#\s+{code}\s+\S")


class DatabricksSqlTest(TempDirTestCase):
    def statements(self):
        text = read("examples", "databricks-setup.sql")
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in code.split(";") if s.strip()]

    def test_every_statement_parses_with_the_databricks_dialect(self):
        try:
            import sqlglot
            from sqlglot import exp
        except ImportError:
            self.skipTest("sqlglot is not installed: run the tests with `--with sqlglot`")
        quiet = logging.getLogger("sqlglot")  # it warns on each statement kept as a Command
        self.addCleanup(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.ERROR)
        for statement in self.statements():
            with self.subTest(statement=statement[:60]):
                try:
                    tree = sqlglot.parse_one(statement, read="databricks")
                except sqlglot.errors.SqlglotError as exc:
                    self.fail(f"not Databricks SQL: {exc}")
                if isinstance(tree, exp.Command):
                    self.assertTrue(" ".join(statement.split()).upper().startswith(
                        SQLGLOT_COMMANDS), "sqlglot could not parse this statement")

    def test_it_creates_the_catalog_schema_four_tables_volume_and_grants(self):
        text = " ".join(" ".join(self.statements()).split())
        for piece in ["CREATE CATALOG IF NOT EXISTS sensors",
                      "CREATE SCHEMA IF NOT EXISTS sensors.edge",
                      "CREATE VOLUME IF NOT EXISTS sensors.edge.staging",
                      "GRANT USE CATALOG ON CATALOG sensors",
                      "GRANT USE SCHEMA ON SCHEMA sensors.edge",
                      "GRANT READ VOLUME, WRITE VOLUME ON VOLUME sensors.edge.staging"]:
            self.assertIn(piece, text)
        for prefix in up.SCENARIO_PREFIXES:
            with self.subTest(table=prefix):
                self.assertIn(f"`sensors`.`edge`.`{prefix}_sensor_readings`", text)
                self.assertIn(f"GRANT SELECT, MODIFY ON TABLE sensors.edge.{prefix}_sensor_readings",
                              text)

    def test_the_tables_are_the_uploaders_own_ddl(self):
        def flat(sql):
            sql = " ".join(sql.split())
            return re.sub(r"\s*\)\s*", ")", re.sub(r"\s*\(\s*", "(", sql)).rstrip(";")

        db = sensor_db(self.path("sensor_data.db"), 5)
        creates = [flat(s) for s in self.statements() if s.upper().startswith("CREATE TABLE")]
        env = {**self.base_env(), "SANITIZE_HASH_KEY": "any"}
        self.assertEqual(len(creates), len(DDL_RUNS))
        for extra, create in zip(DDL_RUNS, creates):
            with self.subTest(processing=extra[:1]):
                code, out, err = run_main(["--print-ddl", "--sqlite", db, "--databricks-database",
                                           "sensors.edge", *extra], env)
                self.assertEqual(code, 0, err)
                self.assertEqual(create, flat(out))


class ShellAndReadmeTest(unittest.TestCase):
    @unittest.skipUnless(shutil.which("bash"), "bash not installed")
    def test_start_uploader_passes_bash_n(self):
        subprocess.run(["bash", "-n", os.path.join(ROOT, "start-uploader.sh")], check=True)

    def test_examples_readme_has_a_section_per_file(self):
        headings = re.findall(r"(?m)^## (\S+)", read("examples", "README.md"))
        self.assertEqual(sorted(headings), sorted(n for n in EXAMPLE_FILES if n != "README.md"))


if __name__ == "__main__":
    unittest.main()
