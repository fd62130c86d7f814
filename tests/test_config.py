"""Config: CLI > env > YAML > default, every name of DESIGN section 2, parsing, secrets."""

import itertools
import json
import re
import unittest
from unittest import mock

from .helpers import TempDirTestCase, run_main, up

DEFAULTS = {name: default for name, _, default in up.config_fields()}

# One row per setting: (field, flag, env var, YAML key,
#   raw values given by (CLI, env, YAML), effective values for (CLI, env, YAML, default)).
# Values differ per layer, so the winner is visible in the value as well as its source.
PRECEDENCE = [
    ("sqlite", "--sqlite", "SQLITE_PATH", "sqlite",
     ("/data/cli.db", "/data/env.db", "/data/yaml.db"),
     ("/data/cli.db", "/data/env.db", "/data/yaml.db", None)),
    ("state_dir", "--state-dir", "STATE_DIR", "state_dir",
     ("/srv/cli-state", "/srv/env-state", "/srv/yaml-state"),
     ("/srv/cli-state", "/srv/env-state", "/srv/yaml-state", "/state")),
    ("databricks_table", "--databricks-table", "DATABRICKS_TABLE", "table_name",
     ("cli_readings", "env_readings", "yaml_readings"),
     ("cli_readings", "env_readings", "yaml_readings", None)),
    ("batch_size", "--batch-size", "BATCH_SIZE", "batch_size",
     ("10", "20", 30),
     (10, 20, 30, DEFAULTS["batch_size"])),
    ("interval", "--interval", "UPLOAD_INTERVAL", "interval",
     ("1.5", "2.5", 3.5),
     (1.5, 2.5, 3.5, 300.0)),
    ("once", "--once", "ONCE", "once",
     (None, "no", True),  # the flag takes no value; env says false, YAML says true
     (True, False, True, False)),
    ("filter_config", "--filter-config", "FILTER_CONFIG", "filter_config",
     ('{"from": "cli"}', '{"from": "env", "sensor_id": ["S1", "S2"]}',
      {"from": "yaml", "temperature": {">": 20}}),
     ({"from": "cli"}, {"from": "env", "sensor_id": ["S1", "S2"]},
      {"from": "yaml", "temperature": {">": 20}}, None)),
]

TOKEN = "dapi0123456789abcdefSECRET"


def load(argv=(), env=None):
    """The Config that these flags and this environment produce."""
    args = up.build_parser().parse_args(list(argv))
    return up.load_config(args, dict(env or {}))


PRINTED_LINE = re.compile(r"^(\w+)\s*=\s?(.*)\s+\[([^\[\]]*)\]$")


def parse_printed(text):
    """{field: (shown value, source)} from --print-config output."""
    found = {}
    for line in text.splitlines():
        match = PRINTED_LINE.match(line)
        if match:
            found[match.group(1)] = (match.group(2).strip(), match.group(3))
    return found


def yaml_text(data):
    """Block-style YAML, as a user would write it."""
    import yaml
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


class ConfigTestCase(TempDirTestCase):
    """Adds YAML files and assertions about values and their sources."""

    def write_yaml(self, data, name="uploader.yaml"):
        """Write a YAML file (a mapping, or literal text); return its path."""
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(data if isinstance(data, str) else yaml_text(data))
        return path

    def assertSource(self, source, layer, flag, env, yaml_key, yaml_path):
        """`source` names the layer the value came from, and only that one."""
        if layer == "cli":
            self.assertEqual(source, flag)
        elif layer == "env":
            self.assertEqual(source, env)
        elif layer == "yaml":
            self.assertIn(yaml_path, source)
            self.assertIn(yaml_key, source)
        else:
            self.assertTrue(source.startswith("default"), source)

    def assertShown(self, shown, expected):
        """--print-config renders `expected` as `shown`."""
        if expected is None:
            for marker in ("cli", "env", "yaml"):
                self.assertNotIn(marker, shown)
        elif isinstance(expected, bool):
            self.assertEqual(shown.lower(), str(expected).lower())
        elif isinstance(expected, (int, float)):
            self.assertEqual(float(shown), expected)
        elif isinstance(expected, dict):
            self.assertEqual(json.loads(shown), expected)
        else:
            self.assertEqual(shown, expected)


class PrecedenceTest(ConfigTestCase):
    """CLI flag > environment variable > YAML file > default, for every combination."""

    def cases(self):
        """Yield (label, field, argv, env, expected value, layer, spelling) per case."""
        for field, flag, env_var, key, raw, effective in PRECEDENCE:
            for present in itertools.product((True, False), repeat=3):
                argv, env = [], {}
                if present[0]:
                    argv += [flag] if raw[0] is None else [flag, raw[0]]
                if present[1]:
                    env[env_var] = raw[1]
                yaml_path = self.path(f"{field}.yaml")
                if present[2]:
                    self.write_yaml({key: raw[2]}, f"{field}.yaml")
                    argv += ["--config", yaml_path]
                winner = present.index(True) if True in present else 3
                layer = ("cli", "env", "yaml", "default")[winner]
                label = f"{field} from {layer} (cli={present[0]} env={present[1]} " \
                        f"yaml={present[2]})"
                yield (label, field, argv, env, effective[winner], layer,
                       (flag, env_var, key, yaml_path))

    def test_load_config_takes_the_highest_layer(self):
        for label, field, argv, env, expected, layer, names in self.cases():
            with self.subTest(label):
                config = load(argv, env)
                self.assertEqual(getattr(config, field), expected)
                self.assertSource(config.origin(field), layer, *names)

    def test_print_config_shows_value_and_source(self):
        for label, field, argv, env, expected, layer, names in self.cases():
            with self.subTest(label):
                code, out, err = run_main(["--print-config", *argv], env)
                self.assertEqual(code, 0, err)
                shown, source = parse_printed(out)[field]
                self.assertShown(shown, expected)
                self.assertSource(source, layer, *names)

    def test_print_config_lists_every_setting(self):
        code, out, err = run_main(["--print-config"], {})
        self.assertEqual(code, 0, err)
        self.assertEqual(set(parse_printed(out)), set(DEFAULTS))

    def test_uploader_config_env_names_the_yaml_file(self):
        path = self.write_yaml({"batch_size": 30, "sqlite_path": "/data/yaml.db"})
        config = load([], {"UPLOADER_CONFIG": path})
        self.assertEqual(config.batch_size, 30)
        self.assertEqual(config.sqlite, "/data/yaml.db")
        self.assertIn(path, config.origin("batch_size"))
        self.assertIn("sqlite_path", config.origin("sqlite"))

    def test_config_flag_beats_uploader_config_env(self):
        path = self.write_yaml({"batch_size": 30})
        config = load(["--config", path], {"UPLOADER_CONFIG": self.path("absent.yaml")})
        self.assertEqual(config.batch_size, 30)

    def test_empty_env_var_counts_as_unset(self):
        path = self.write_yaml({"interval": 3.5})
        config = load(["--config", path], {"UPLOAD_INTERVAL": ""})
        self.assertEqual(config.interval, 3.5)

    def test_empty_yaml_file_means_defaults(self):
        path = self.write_yaml("# nothing set yet\n")
        config = load(["--config", path])
        self.assertEqual(config.interval, 300.0)
        self.assertEqual(config.origin("interval"), "default")


class NamesTest(ConfigTestCase):
    """Every flag, env var and YAML key of DESIGN section 2 reaches its setting."""

    # (field, raw value, expected value)
    VALUES = {
        "sqlite": ("/data/sensors.db", "/data/sensors.db"),
        "sqlite_table_name": ("readings", "readings"),
        "timestamp_col": ("logged_at", "logged_at"),
        "state_dir": ("/srv/state", "/srv/state"),
        "interval": ("60", 60.0),
        "once": ("true", True),
        "databricks_host": ("adb-1.2.azuredatabricks.net", "adb-1.2.azuredatabricks.net"),
        "databricks_http_path": ("/sql/1.0/warehouses/abc123", "/sql/1.0/warehouses/abc123"),
        "databricks_token": (TOKEN, TOKEN),
        "databricks_database": ("main.sensors", "main.sensors"),
        "databricks_catalog": ("main", "main"),
        "databricks_schema": ("sensors", "sensors"),
        "databricks_table": ("readings", "readings"),
        "delta_uri": ("/srv/lake", "/srv/lake"),
        "batch_size": ("500", 500),
        "enable_sanitize": ("yes", True),
        "enable_filter": ("1", True),
        "enable_aggregate": ("true", True),
        "sanitize_config": ('{"serial_number": {"hash": true}}', {"serial_number": {"hash": True}}),
        "filter_config": ('{"status_code": 0}', {"status_code": 0}),
        "aggregate_config": ('{"group_by": ["sensor_id"], "window": "1h"}',
                             {"group_by": ["sensor_id"], "window": "1h"}),
    }
    PROCESSING = ["enable_sanitize", "sanitize_config", "enable_filter", "filter_config",
                  "enable_aggregate", "aggregate_config"]
    FLAGS = [("--sqlite", "sqlite"), ("--table", "sqlite_table_name"),
             ("--timestamp-col", "timestamp_col"), ("--state-dir", "state_dir"),
             ("--interval", "interval"), ("--once", "once"),
             ("--databricks-host", "databricks_host"),
             ("--databricks-http-path", "databricks_http_path"),
             ("--databricks-token", "databricks_token"),
             ("--databricks-database", "databricks_database"),
             ("--databricks-table", "databricks_table"), ("--delta-uri", "delta_uri"),
             ("--batch-size", "batch_size")] + [
                 ("--" + name.replace("_", "-"), name) for name in PROCESSING]
    ENVS = [("SQLITE_PATH", "sqlite"), ("SQLITE_TABLE_NAME", "sqlite_table_name"),
            ("TIMESTAMP_COL", "timestamp_col"), ("STATE_DIR", "state_dir"),
            ("UPLOAD_INTERVAL", "interval"), ("ONCE", "once"),
            ("DATABRICKS_HOST", "databricks_host"),
            ("DATABRICKS_HTTP_PATH", "databricks_http_path"),
            ("DATABRICKS_TOKEN", "databricks_token"),
            ("DATABRICKS_DATABASE", "databricks_database"),
            ("DATABRICKS_CATALOG", "databricks_catalog"),
            ("DATABRICKS_SCHEMA", "databricks_schema"),
            ("DATABRICKS_TABLE", "databricks_table"), ("DELTA_URI", "delta_uri"),
            ("BATCH_SIZE", "batch_size")] + [(name.upper(), name) for name in PROCESSING]
    YAML_KEYS = [("sqlite", "sqlite"), ("sqlite_path", "sqlite"),
                 ("sqlite_table_name", "sqlite_table_name"),
                 ("timestamp_col", "timestamp_col"), ("state_dir", "state_dir"),
                 ("interval", "interval"), ("once", "once"),
                 ("databricks_host", "databricks_host"),
                 ("databricks_http_path", "databricks_http_path"),
                 ("databricks_token", "databricks_token"),
                 ("databricks_database", "databricks_database"),
                 ("databricks_table", "databricks_table"), ("table_name", "databricks_table"),
                 ("delta_uri", "delta_uri"), ("batch_size", "batch_size")] + [
                     (name, name) for name in PROCESSING]

    def test_flags(self):
        for flag, field in self.FLAGS:
            raw, expected = self.VALUES[field]
            argv = [flag] if isinstance(expected, bool) else [flag, raw]
            with self.subTest(flag), mock.patch.object(up.log, "warning"):
                config = load(argv)
                self.assertEqual(getattr(config, field), expected)
                self.assertEqual(config.origin(field), flag)

    def test_env_vars(self):
        for var, field in self.ENVS:
            raw, expected = self.VALUES[field]
            with self.subTest(var):
                config = load([], {var: raw})
                self.assertEqual(getattr(config, field), expected)
                self.assertEqual(config.origin(field), var)

    def test_yaml_keys_and_aliases(self):
        for key, field in self.YAML_KEYS:
            raw, expected = self.VALUES[field]
            with self.subTest(key):
                path = self.write_yaml(f"{key}: {raw}\n")
                config = load(["--config", path])
                self.assertEqual(getattr(config, field), expected)
                self.assertIn(path, config.origin(field))
                self.assertIn(key, config.origin(field))

    def test_json_setting_takes_json_text_from_env_and_a_mapping_from_yaml(self):
        rule = {"temperature": {">=": 20, "<": 30}, "sensor_id": ["S1", "S2"]}
        from_env = load([], {"FILTER_CONFIG": json.dumps(rule)})
        path = self.write_yaml({"filter_config": rule})
        from_yaml = load(["--config", path])
        self.assertEqual(from_env.filter_config, rule)
        self.assertEqual(from_yaml.filter_config, rule)

    def test_whole_number_written_as_float_in_yaml(self):
        # _parse_int lets integral floats past its first check, then int("1000.0") fails.
        path = self.write_yaml("batch_size: 1000.0\n")
        self.assertEqual(load(["--config", path]).batch_size, 1000)

    def test_every_setting_has_its_own_flag_and_env_var(self):
        flags = [setting.flag for _, setting, _ in up.config_fields()]
        envs = [var for _, setting, _ in up.config_fields() for var in setting.env]
        self.assertTrue(all(flag and flag.startswith("--") for flag in flags), flags)
        self.assertEqual(len(flags), len(set(flags)))
        self.assertEqual(len(envs), len(set(envs)))
        for name, setting, _ in up.config_fields():
            with self.subTest(name):
                self.assertTrue(setting.env)


class BooleanTest(ConfigTestCase):
    """true/false/1/0/yes/no in any case; anything else is an error, not false."""

    WORDS = {"true": True, "TRUE": True, "True": True, "1": True, "yes": True,
             "YES": True, "Yes": True, " true ": True,
             "false": False, "FALSE": False, "False": False, "0": False, "no": False,
             "NO": False, "No": False}

    def test_env_words(self):
        for word, expected in self.WORDS.items():
            with self.subTest(word=word):
                self.assertIs(load([], {"ONCE": word}).once, expected)

    def test_yaml_words_quoted_and_native(self):
        for word, expected in self.WORDS.items():
            for text in (f'once: "{word}"\n', f"once: {word.strip()}\n"):
                with self.subTest(text=text):
                    path = self.write_yaml(text)
                    self.assertIs(load(["--config", path]).once, expected)

    def test_other_words_are_errors(self):
        for word in ("maybe", "2", "-1", "on", "tru", "nope"):
            with self.subTest(word=word):
                with self.assertRaises(up.ConfigError) as caught:
                    load([], {"ONCE": word})
                message = str(caught.exception)
                for part in ("once", repr(word), "ONCE"):
                    self.assertIn(part, message)

    def test_other_yaml_values_are_errors(self):
        for text in ("once: maybe\n", "once: 2\n", "once: [true]\n"):
            with self.subTest(text=text):
                path = self.write_yaml(text)
                with self.assertRaises(up.ConfigError) as caught:
                    load(["--config", path])
                self.assertIn("once", str(caught.exception))
                self.assertIn(path, str(caught.exception))


class ValueErrorsTest(ConfigTestCase):
    """Each bad value is a ConfigError naming the setting, the value and its source."""

    # (label, argv, env, yaml mapping or None, parts the message must contain)
    CASES = [
        ("interval not a number", [], {"UPLOAD_INTERVAL": "soon"}, None,
         ["interval", "'soon'", "UPLOAD_INTERVAL"]),
        ("interval nan", ["--interval", "nan"], {}, None, ["interval", "nan", "--interval"]),
        ("interval zero", [], {"UPLOAD_INTERVAL": "0"}, None, ["interval", "0", "UPLOAD_INTERVAL"]),
        ("interval negative", [], {}, {"interval": -5}, ["interval", "-5", "interval"]),
        ("batch_size zero", ["--batch-size", "0"], {}, None, ["batch_size", "0", "--batch-size"]),
        ("cursor_lag negative", [], {"CURSOR_LAG": "-1"}, None,
         ["cursor_lag", "-1", "CURSOR_LAG"]),
        ("batch_size fraction", [], {"BATCH_SIZE": "2.5"}, None,
         ["batch_size", "2.5", "BATCH_SIZE"]),
        ("batch_size word", [], {}, {"batch_size": "lots"}, ["batch_size", "lots"]),
        ("malformed JSON", [], {"FILTER_CONFIG": "{bad"}, None,
         ["filter_config", "{bad", "FILTER_CONFIG"]),
        ("JSON array", [], {"FILTER_CONFIG": "[1, 2]"}, None,
         ["filter_config", "[1, 2]", "FILTER_CONFIG"]),
        ("YAML list for a mapping", [], {}, {"filter_config": ["a", "b"]},
         ["filter_config", "filter_config"]),
        ("empty flag", ["--sqlite", " "], {}, None, ["sqlite", "--sqlite"]),
        ("YAML mapping for a path", [], {}, {"sqlite": {"path": "x.db"}}, ["sqlite"]),
    ]

    def test_bad_values(self):
        for label, argv, env, data, parts in self.CASES:
            with self.subTest(label):
                if data is not None:
                    path = self.write_yaml(data)
                    argv = [*argv, "--config", path]
                    parts = [*parts, path]
                with self.assertRaises(up.ConfigError) as caught:
                    load(argv, env)
                message = str(caught.exception)
                self.assertNotIn("\n", message)
                for part in parts:
                    self.assertIn(part, message)

    def test_unknown_yaml_key_suggests_the_right_one(self):
        path = self.write_yaml({"intervall": 60})
        with self.assertRaises(up.ConfigError) as caught:
            load(["--config", path])
        message = str(caught.exception)
        self.assertIn("intervall", message)
        self.assertIn(path, message)
        self.assertIn("did you mean 'interval'", message)

    def test_yaml_file_problems(self):
        cases = {"malformed": "sqlite: [unclosed\n", "a list": "- sqlite: x.db\n"}
        for label, text in cases.items():
            with self.subTest(label):
                path = self.write_yaml(text)
                with self.assertRaises(up.ConfigError) as caught:
                    load(["--config", path])
                self.assertIn(path, str(caught.exception))

    def test_missing_yaml_file(self):
        path = self.path("absent.yaml")
        with self.assertRaises(up.ConfigError) as caught:
            load(["--config", path])
        self.assertIn(path, str(caught.exception))

    def test_both_workspace_and_delta_uri(self):
        with self.assertRaises(up.ConfigError) as caught:
            load(["--delta-uri", "/srv/lake"], {"DATABRICKS_HOST": "adb-1.2.azuredatabricks.net"})
        message = str(caught.exception)
        for part in ("databricks_host", "DATABRICKS_HOST", "delta_uri", "--delta-uri"):
            self.assertIn(part, message)


class HostTest(ConfigTestCase):
    """DATABRICKS_HOST with or without https:// and a trailing slash."""

    HOST = "adb-1234567890123456.7.azuredatabricks.net"
    SPELLINGS = [HOST, f"https://{HOST}", f"https://{HOST}/", f"{HOST}/",
                 f"HTTPS://{HOST}//", f"  https://{HOST}/  "]

    def test_host_is_normalized_from_every_layer(self):
        for raw in self.SPELLINGS:
            path = self.write_yaml({"databricks_host": raw})
            layers = {"flag": (["--databricks-host", raw], {}),
                      "env": ([], {"DATABRICKS_HOST": raw}),
                      "yaml": (["--config", path], {})}
            for layer, (argv, env) in layers.items():
                with self.subTest(raw=raw, layer=layer):
                    config = load(argv, env)
                    self.assertEqual(config.databricks_host, self.HOST)
                    self.assertEqual(config.target, "databricks")

    def test_print_config_shows_the_normalized_host(self):
        code, out, err = run_main(["--print-config"], {"DATABRICKS_HOST": f"https://{self.HOST}/"})
        self.assertEqual(code, 0, err)
        self.assertEqual(parse_printed(out)["databricks_host"], (self.HOST, "DATABRICKS_HOST"))

    def test_no_host_means_local_lakehouse(self):
        config = load()
        self.assertEqual(config.target, "delta")
        self.assertEqual(config.delta_uri, "./lakehouse")


class TargetTest(ConfigTestCase):
    """--target / TARGET / target chooses the sink; the default follows the host."""

    def test_target_from_every_layer_wins_over_the_host_default(self):
        path = self.write_yaml({"target": "delta"})
        env = {"DATABRICKS_HOST": "example.cloud.databricks.com"}
        for argv, extra in ((["--target", "delta"], {}), ([], {"TARGET": "delta"}),
                            (["--config", path], {})):
            with self.subTest(argv=argv, env=extra):
                config = load(argv, {**env, **extra})
                self.assertEqual(config.target, "delta")
                self.assertEqual(config.delta_uri, "./lakehouse")

    def test_a_workspace_target_without_a_host_is_one_line_naming_the_setting(self):
        code, out, err = run_main(["--target", "databricks", "--print-config"], {})
        self.assertEqual(code, 2)
        self.assertIn("databricks_host is required for target databricks", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_an_unknown_target_is_refused(self):
        code, out, err = run_main(["--print-config"], {"TARGET": "kafka"})
        self.assertEqual(code, 2)
        self.assertIn("TARGET", err)

    LANDING = {"TARGET": "landing", "DATABRICKS_HOST": "adb-1.2.azuredatabricks.net",
               "DATABRICKS_TOKEN": "dapi-x", "DATABRICKS_VOLUME": "/Volumes/main/s/landing"}

    def check_landing(self, **env):
        return up.check_target(load([], {**self.LANDING, **env}))

    def test_landing_needs_a_volume_path_and_credentials_but_no_warehouse(self):
        config = self.check_landing()
        self.assertEqual((config.target, config.databricks_http_path), ("landing", None))
        config = self.check_landing(DATABRICKS_TOKEN="", DATABRICKS_CLIENT_ID="sp",
                                    DATABRICKS_CLIENT_SECRET="s")
        self.assertEqual(config.databricks_client_id, "sp")
        cases = {"DATABRICKS_VOLUME": ({"DATABRICKS_VOLUME": ""}, "databricks_volume must "
                                       "be a volume path /Volumes/catalog/schema/volume"),
                 "auto": ({"DATABRICKS_VOLUME": "auto"}, "got 'auto'"),
                 "credentials": ({"DATABRICKS_TOKEN": ""}, "databricks_token is required "
                                 "for target landing"),
                 "secret": ({"DATABRICKS_TOKEN": "", "DATABRICKS_CLIENT_ID": "sp"},
                            "databricks_client_secret is required"),
                 "source_id": ({"SOURCE_ID": "_hidden"}, "nor begin with _ or ."),
                 "slash": ({"SOURCE_ID": "a/b"}, "may not contain /")}
        for name, (env, message) in cases.items():
            with self.subTest(name):
                with self.assertRaisesRegex(up.ConfigError, re.escape(message)):
                    self.check_landing(**env)

    def test_plain_http_only_for_a_loopback_host(self):
        for host in ("http://127.0.0.1:8080", "http://localhost:1", "https://adb-1.net",
                     "adb-1.net"):
            with self.subTest(host):
                self.check_landing(DATABRICKS_HOST=host)
        for host in ("http://adb-1.2.azuredatabricks.net", "HTTP://10.0.0.1:80"):
            with self.subTest(host):
                code, out, err = run_main(["--print-config"], {**self.LANDING,
                                                               "DATABRICKS_HOST": host})
                self.assertEqual(code, 2)
                self.assertIn("databricks_host must be https://", err)


class SecretTest(ConfigTestCase):
    """The token never shows in repr, --print-config or parse errors."""

    def test_print_config_redacts_the_token_from_every_layer(self):
        path = self.write_yaml({"databricks_token": TOKEN})
        layers = {"--databricks-token": (["--databricks-token", TOKEN], {}),
                  "DATABRICKS_TOKEN": ([], {"DATABRICKS_TOKEN": TOKEN}),
                  path: (["--config", path], {})}
        for source, (argv, env) in layers.items():
            with self.subTest(source=source):
                code, out, err = run_main(["--print-config", *argv], env)
                self.assertEqual(code, 0, err)
                self.assertNotIn(TOKEN, out + err)
                shown, where = parse_printed(out)["databricks_token"]
                self.assertIn(source, where)
                self.assertNotIn("not set", shown)

    def test_repr_hides_the_token(self):
        config = load([], {"DATABRICKS_TOKEN": TOKEN})
        self.assertEqual(config.databricks_token, TOKEN)
        self.assertNotIn(TOKEN, repr(config))

    def test_bad_token_value_is_not_echoed(self):
        path = self.write_yaml({"databricks_token": {TOKEN: 1}})
        with self.assertRaises(up.ConfigError) as caught:
            load(["--config", path])
        self.assertIn("databricks_token", str(caught.exception))
        self.assertNotIn(TOKEN, str(caught.exception))

    def test_token_flag_warns_about_ps(self):
        with self.assertLogs(up.log, "WARNING") as logs:
            config = load(["--databricks-token", TOKEN])
        self.assertEqual(config.databricks_token, TOKEN)
        text = "\n".join(logs.output)
        self.assertIn("ps", text)
        self.assertIn("DATABRICKS_TOKEN", text)
        self.assertNotIn(TOKEN, text)


if __name__ == "__main__":
    unittest.main()
