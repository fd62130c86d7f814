"""Processing stages (sanitize, filter, aggregate) and routing, end to end and pure."""

import datetime as dt
import json
import os
import sqlite3

from tests import helpers
from tests.helpers import TempDirTestCase, file_digest, make_db, read_delta, run_main, up

SEED_SANITIZE = ('{"column_to_clean": "pattern_to_remove", '
                 '"another_column": {"replace_value": "X", "with_value": "Y"}}')
SEED_FILTER = ('{"numeric_column": {">": 100, "<=": 200}, '
               '"string_column_equals": "active_value"}')
SEED_AGGREGATE = ('{"group_by": ["device_id", "hour_of_day"], "aggregations": '
                  '{"temperature": "avg", "humidity": "max", "records": "count"}}')

SEED_SCHEMA = """CREATE TABLE readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp TEXT NOT NULL, device_id TEXT,
    column_to_clean TEXT, another_column TEXT, numeric_column INTEGER,
    string_column_equals TEXT, temperature REAL, humidity REAL)"""
SEED_COLUMNS = ("timestamp", "device_id", "column_to_clean", "another_column",
                "numeric_column", "string_column_equals", "temperature", "humidity")


def seed_rows():
    """Rows shaped like the seed's examples, over two hours and two devices."""
    rows = []
    for i in range(40):
        stamp = f"2025-03-01T{10 + i // 20:02d}:{(i % 20) * 3:02d}:00Z"
        rows.append((stamp, f"dev-{i % 2}", f"a pattern_to_remove b {i}", f"XX-{i}",
                     90 + i * 5, "active_value" if i % 3 else "idle", 20.0 + i,
                     40.0 + (i % 7)))
    return rows


class SeedExamplesTest(TempDirTestCase):
    """The seed's three example configs work verbatim and route to their tables."""

    def setUp(self):
        super().setUp()
        self.db = make_db(self.path("seed.db"), SEED_SCHEMA, seed_rows(), SEED_COLUMNS)

    def run_stage(self, *flags, **env):
        code, out, err = run_main(["--sqlite", self.db, "--once", *flags],
                                  self.base_env(**env))
        self.assertEqual(code, 0, err)
        return err

    def test_sanitize_example(self):
        err = self.run_stage("--enable-sanitize", "--sanitize-config", SEED_SANITIZE)
        rows = read_delta(self.path("lake", "secure_readings"))
        self.assertEqual(len(rows), 40)
        for row in rows:
            self.assertNotIn("pattern_to_remove", row["column_to_clean"])
            self.assertTrue(row["another_column"].startswith("YY-"), row)
        self.assertIn("secure_readings", err)

    def test_filter_example(self):
        self.run_stage("--enable-filter", "--filter-config", SEED_FILTER)
        rows = read_delta(self.path("lake", "filtered_readings"))
        expected = [r for r in seed_rows() if 100 < r[4] <= 200 and r[5] == "active_value"]
        self.assertEqual(sorted(r["numeric_column"] for r in rows),
                         sorted(r[4] for r in expected))
        self.assertTrue(expected)

    def test_aggregate_example(self):
        self.run_stage("--enable-aggregate", "--aggregate-config", SEED_AGGREGATE)
        rows = read_delta(self.path("lake", "aggregated_readings"))
        got = {(r["device_id"], r["hour_of_day"]): r for r in rows}
        for (device, hour), row in got.items():
            source = [r for r in seed_rows()
                      if r[1] == device and int(r[0][11:13]) == hour]
            self.assertEqual(row["records"], len(source))
            self.assertAlmostEqual(row["temperature_avg"],
                                   sum(r[6] for r in source) / len(source))
            self.assertEqual(row["temperature_count"], len(source))
            self.assertAlmostEqual(row["temperature_sum"], sum(r[6] for r in source))
            self.assertEqual(row["humidity_max"], max(r[7] for r in source))
        self.assertEqual(set(got), {("dev-0", 10), ("dev-1", 10), ("dev-0", 11),
                                    ("dev-1", 11)})

    def test_all_stages_route_to_aggregated_and_source_is_untouched(self):
        before = file_digest(self.db)
        err = self.run_stage("--enable-sanitize", "--sanitize-config", SEED_SANITIZE,
                             "--enable-filter", "--filter-config", SEED_FILTER,
                             "--enable-aggregate", "--aggregate-config", SEED_AGGREGATE)
        self.assertEqual(os.listdir(self.path("lake")), ["aggregated_readings"])
        rows = read_delta(self.path("lake", "aggregated_readings"))
        kept = [r for r in seed_rows() if 100 < r[4] <= 200 and r[5] == "active_value"]
        self.assertEqual(sum(r["records"] for r in rows), len(kept))
        self.assertEqual(file_digest(self.db), before)
        self.assertEqual(err.count("table aggregated_readings"), 1)

    def test_yaml_native_mapping_and_env_json(self):
        config = self.path("c.yaml")
        with open(config, "w") as fh:
            fh.write("enable_filter: true\nfilter_config:\n  numeric_column:\n"
                     "    '>': 100\n    '<=': 200\n  string_column_equals: active_value\n")
        self.run_stage("--config", config)
        from_yaml = read_delta(self.path("lake", "filtered_readings"))
        self.assertTrue(all(100 < r["numeric_column"] <= 200 for r in from_yaml))
        # the environment beats the file: only idle rows now, into a fresh target
        code, _, err = run_main(["--sqlite", self.db, "--once", "--config", config],
                                self.base_env(FILTER_CONFIG='{"string_column_equals": "idle"}',
                                              DELTA_URI=self.path("lake2"),
                                              STATE_DIR=self.path("state2")))
        self.assertEqual(code, 0, err)
        rows = read_delta(self.path("lake2", "filtered_readings"))
        self.assertEqual({r["string_column_equals"] for r in rows}, {"idle"})


class SanitizeTest(TempDirTestCase):
    """Each sanitize operation, on what lands in secure_<table>."""

    SCHEMA = ("CREATE TABLE people (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
              "email TEXT, lat REAL, note TEXT, secret TEXT, code INTEGER)")
    ROWS = [("2025-01-01 00:00:00", "ann@example.com", 38.123456, "call 555-1234", "s1", 7),
            ("2025-01-01 00:00:01", "bob@example.com", -9.987654, None, "s2", None),
            ("2025-01-01 00:00:02", None, None, "no digits", "s3", 8)]

    def upload(self, spec, key="k1", lake="lake", state="state"):
        db = self.path("p.db")
        if not os.path.exists(db):
            make_db(db, self.SCHEMA, self.ROWS, ("ts", "email", "lat", "note", "secret", "code"))
        code, _, err = run_main(
            ["--sqlite", db, "--once", "--enable-sanitize", "--sanitize-config",
             json.dumps(spec)],
            self.base_env(SANITIZE_HASH_KEY=key, DELTA_URI=self.path(lake),
                          STATE_DIR=self.path(state)))
        self.assertEqual(code, 0, err)
        return sorted(read_delta(self.path(lake, "secure_people")), key=lambda r: r["id"])

    def test_operations(self):
        rows = self.upload({"email": {"hash": True}, "lat": {"round": 2},
                            "note": r"\d", "secret": {"drop": True},
                            "code": {"null": True}})
        self.assertNotIn("secret", rows[0])
        self.assertEqual([r["lat"] for r in rows], [38.12, -9.99, None])
        self.assertEqual([r["note"] for r in rows], ["call -", None, "no digits"])
        self.assertEqual([r["code"] for r in rows], [None, None, None])
        self.assertEqual(len(rows[0]["email"]), 64)
        self.assertNotIn("ann", rows[0]["email"])
        self.assertIsNone(rows[2]["email"])
        self.assertNotIn("example.com", json.dumps(rows, default=str))

    def test_hash_is_stable_across_runs_and_keyed(self):
        first = self.upload({"email": {"hash": True}}, lake="a", state="sa")
        again = self.upload({"email": {"hash": True}}, lake="b", state="sb")
        other = self.upload({"email": {"hash": True}}, key="k2", lake="c", state="sc")
        self.assertEqual([r["email"] for r in first], [r["email"] for r in again])
        self.assertNotEqual(first[0]["email"], other[0]["email"])

    def test_replace_whole_value_for_numbers(self):
        rows = self.upload({"code": {"replace_value": 7, "with_value": -1}})
        self.assertEqual([r["code"] for r in rows], [-1, None, 8])

    def test_hash_without_key_is_config_error(self):
        db = make_db(self.path("p.db"), self.SCHEMA, self.ROWS,
                     ("ts", "email", "lat", "note", "secret", "code"))
        code, _, err = run_main(["--sqlite", db, "--once", "--enable-sanitize",
                                 "--sanitize-config", '{"email": {"hash": true}}'],
                                self.base_env())
        self.assertEqual(code, 2)
        self.assertIn("SANITIZE_HASH_KEY", err)
        self.assertFalse(os.path.exists(self.path("lake")))


class FilterTest(TempDirTestCase):
    """Operators, NULL semantics, and all conditions holding at once."""

    def setUp(self):
        super().setUp()
        self.db = make_db(
            self.path("f.db"),
            "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, v REAL, "
            "s TEXT, anything)",
            [("2025-01-01", 1.0, "a", 5), ("2025-01-02", 5.0, "b", "text"),
             ("2025-01-03", None, None, None), ("2025-01-04", 10.0, "c", 10)],
            ("ts", "v", "s", "anything"))

    def ids(self, spec):
        lake, state = self.path("lake", str(abs(hash(spec)))), self.path("st", str(abs(hash(spec))))
        code, _, err = run_main(["--sqlite", self.db, "--once", "--enable-filter",
                                 "--filter-config", spec],
                                self.base_env(DELTA_URI=lake, STATE_DIR=state))
        self.assertEqual(code, 0, err)
        path = os.path.join(lake, "filtered_t")
        return sorted(r["id"] for r in read_delta(path)) if os.path.exists(path) else []

    def test_operators(self):
        cases = {'{"v": {">": 1}}': [2, 4], '{"v": {">=": 5}}': [2, 4],
                 '{"v": {"<": 5}}': [1], '{"v": {"<=": 5}}': [1, 2],
                 '{"v": {"==": 5}}': [2], '{"v": {"!=": 5}}': [1, 4],
                 '{"s": {"in": ["a", "c"]}}': [1, 4], '{"s": {"not_in": ["a"]}}': [2, 4],
                 '{"s": {"is_null": true}}': [3], '{"s": {"is_null": false}}': [1, 2, 4],
                 '{"s": "b"}': [2], '{"s": null}': [3],
                 '{"v": {">": 1, "<": 10}, "s": {"!=": "x"}}': [2]}
        for spec, expected in cases.items():
            with self.subTest(spec=spec):
                self.assertEqual(self.ids(spec), expected)

    def test_untyped_column_compares_only_like_with_like(self):
        self.assertEqual(self.ids('{"anything": {">": 4}}'), [1, 4])
        self.assertEqual(self.ids('{"anything": "text"}'), [2])

    def test_nothing_matches_still_advances_cursor(self):
        self.assertEqual(self.ids('{"v": {">": 1000}}'), [])
        path = os.path.join(self.path("st", str(abs(hash('{"v": {">": 1000}}')))),
                            "last_upload.json")
        with open(path) as fh:
            state = json.load(fh)
        self.assertEqual(next(iter(state["destinations"].values()))["cursor"], [4])


class ValidationTest(TempDirTestCase):
    """A bad processing config stops the tool before a row is read: exit 2, one line."""

    def test_bad_configs(self):
        db = make_db(self.path("v.db"),
                     "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
                     "n INTEGER, s TEXT)", [("2025-01-01", 1, "a")], ("ts", "n", "s"))
        cases = [
            (["--enable-filter", "--filter-config", '{"nope": 1}'], "nope"),
            (["--enable-filter", "--filter-config", '{"n": {"~": 1}}'], "'~'"),
            (["--enable-filter", "--filter-config", '{"n": {">": "ten"}}'], "'n'"),
            (["--enable-filter", "--filter-config", '{"s": {">": 5}}'], "'s'"),
            (["--enable-filter", "--filter-config", '{"s": {"in": "a"}}'], "list"),
            (["--enable-filter"], "filter_config"),
            (["--enable-sanitize", "--sanitize-config", '{"s": "(unclosed"}'], "regex"),
            (["--enable-sanitize", "--sanitize-config", '{"s": {"mask": true}}'], "'s'"),
            (["--enable-aggregate", "--aggregate-config",
              '{"group_by": ["s"], "aggregations": {"n": "median"}}'], "median"),
            (["--enable-aggregate", "--aggregate-config",
              '{"group_by": ["s"], "aggregations": {"n": "avg"}, "window": "5 parsecs"}'],
             "window"),
            (["--enable-aggregate", "--aggregate-config",
              '{"group_by": ["zz"], "aggregations": {"n": "avg"}}'], "zz"),
            (["--enable-aggregate", "--aggregate-config",
              '{"group_by": ["n"], "aggregations": {"s": "avg"}}'], "'s'"),
        ]
        for flags, needle in cases:
            with self.subTest(flags=flags):
                code, out, err = run_main(["--sqlite", db, "--once", *flags], self.base_env())
                self.assertEqual(code, 2, err)
                lines = [l for l in err.splitlines() if l.startswith("error:")]
                self.assertEqual(len(lines), 1, err)
                self.assertIn(needle, lines[0])
                self.assertIn("from --", lines[0])
                self.assertFalse(os.path.exists(self.path("lake")))

    def test_error_names_env_source(self):
        db = make_db(self.path("v.db"), "CREATE TABLE t (id INTEGER PRIMARY KEY, ts TEXT)",
                     [("2025-01-01",)], ("ts",))
        code, _, err = run_main(["--sqlite", db, "--once"],
                                self.base_env(ENABLE_FILTER="yes",
                                              FILTER_CONFIG='{"ts": {"like": "x"}}'))
        self.assertEqual(code, 2)
        self.assertIn("FILTER_CONFIG", err)


class WindowedAggregateTest(TempDirTestCase):
    """Each (group, window) is emitted exactly once however uploads are timed."""

    SPEC = json.dumps({"group_by": ["sensor"], "window": "1m", "grace": "10s",
                       "aggregations": {"value": ["avg", "min", "max"], "records": "count"}})

    def rows(self):
        """3 sensors, 10 minutes, out-of-order arrivals and a few very late rows."""
        start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
        rows = []
        for second in range(600):
            for sensor in range(3):
                jitter = 5 if (second + sensor) % 17 == 0 else 0  # arrives 5 s late
                stamp = start + dt.timedelta(seconds=max(second - jitter, 0))
                rows.append((stamp.isoformat(), f"s{sensor}", (second * 7 + sensor) % 13 + 0.1))
        rows.insert(900, ((start + dt.timedelta(seconds=2)).isoformat(), "s0", 99.0))  # late
        return rows

    def run_schedule(self, name, batch_size, chunks):
        db = self.path(f"{name}.db")
        make_db(db, "CREATE TABLE r (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, "
                    "sensor TEXT, value REAL)")
        rows = self.rows()
        bounds = [len(rows) * i // chunks for i in range(chunks + 1)]
        env = self.base_env(DELTA_URI=self.path(f"lake_{name}"),
                            STATE_DIR=self.path(f"state_{name}"))
        notes = ""
        for lo, hi in zip(bounds, bounds[1:]):
            conn = sqlite3.connect(db)
            helpers.insert_rows(conn, rows[lo:hi], ("ts", "sensor", "value"))
            conn.commit()
            conn.close()
            code, _, err = run_main(["--sqlite", db, "--once", "--batch-size", str(batch_size),
                                     "--enable-aggregate", "--aggregate-config", self.SPEC],
                                    env)
            self.assertEqual(code, 0, err)
            notes += err
        table = read_delta(self.path(f"lake_{name}", "aggregated_r"))
        result = sorted((r["sensor"], r["window_start"], r["window_end"], r["value_avg"],
                         r["value_min"], r["value_max"], r["value_sum"], r["value_count"],
                         r["records"]) for r in table)
        return result, notes

    def test_same_table_for_any_batching(self):
        reference, notes = self.run_schedule("one", 100_000, 1)
        self.assertIn("late", notes)
        # 10 windows, the last one still open: 9 closed windows x 3 sensors
        self.assertEqual(len(reference), 27)
        self.assertEqual(len({(r[0], r[1]) for r in reference}), 27)
        for name, batch, chunks in (("small", 37, 3), ("odd", 250, 7), ("tiny", 11, 2)):
            with self.subTest(batch=batch, chunks=chunks):
                result, _ = self.run_schedule(name, batch, chunks)
                self.assertEqual(result, reference)

    def test_values_match_a_direct_computation(self):
        result, _ = self.run_schedule("check", 500, 4)
        rows = self.rows()
        watermark, expected = None, {}
        for stamp, sensor, value in rows:  # the documented rule, computed directly
            micros = up.parse_timestamp(stamp)
            start = micros - micros % 60_000_000
            if watermark is not None and start + 70_000_000 <= watermark:
                continue
            expected.setdefault((sensor, start), []).append(value)
            watermark = micros if watermark is None else max(watermark, micros)
        closed = {k: v for k, v in expected.items() if k[1] + 70_000_000 <= watermark}
        self.assertEqual(len(result), len(closed))
        for row in result:
            start = up.parse_timestamp(row[1].isoformat())
            values = closed[(row[0], start)]
            self.assertEqual(row[8], len(values))
            self.assertEqual(row[4], min(values))
            self.assertEqual(row[5], max(values))
            self.assertAlmostEqual(row[3], sum(values) / len(values))


class RoutingTest(TempDirTestCase):
    """Table names from the stages enabled, with the scenario prefix stripped."""

    def test_route_table(self):
        cases = [((), "raw_readings"), (("filter",), "filtered_readings"),
                 (("sanitize",), "secure_readings"), (("aggregate",), "aggregated_readings"),
                 (("sanitize", "filter"), "secure_readings"),
                 (("filter", "aggregate"), "aggregated_readings")]
        for base in ("readings", "raw_readings", "secure_readings", "Readings"):
            for stages, expected in cases:
                with self.subTest(base=base, stages=stages):
                    flags = {stage: True for stage in stages}
                    self.assertEqual(up.route_table(base, **flags), expected)

    def test_databricks_table_base_is_stripped(self):
        db = make_db(self.path("r.db"), "CREATE TABLE src (id INTEGER PRIMARY KEY "
                     "AUTOINCREMENT, ts TEXT)", [("2025-01-01",)], ("ts",))
        code, _, err = run_main(["--sqlite", db, "--once", "--databricks-table",
                                 "raw_readings"], self.base_env())
        self.assertEqual(code, 0, err)
        self.assertEqual(os.listdir(self.path("lake")), ["raw_readings"])
