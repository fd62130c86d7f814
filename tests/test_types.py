"""Types (SQLite -> Delta, DESIGN 7), rescued data, and the Delta sink end to end.

Pure functions (declared_kind, parse_timestamp, coerce_value, route_table) are tested
directly; the rest runs main() with --once into a local Delta table and reads it back.
"""

import base64
import datetime as dt
import json
import math
import os
import random
import re
import sqlite3
import unittest

from tests import helpers

up = helpers.up

UTC = dt.timezone.utc


def micros(*args):
    """Microseconds since the epoch of a UTC datetime(*args)."""
    return (dt.datetime(*args, tzinfo=UTC) - up.EPOCH) // dt.timedelta(microseconds=1)


# === Local helpers ===================================================================

PipelineTestCase = helpers.PipelineTestCase


def source_rows(db, table, key):
    """Rows of a SQLite table as dicts, as SQLite returns them, sorted by `key`."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute(f"SELECT * FROM {up.quote_ident(table)}")]
    finally:
        conn.close()
    return sorted(rows, key=lambda r: r[key])


def rescued(row):
    """The row's `_rescued_data` as a dict ({} when nothing was rescued)."""
    return json.loads(row["_rescued_data"]) if row["_rescued_data"] is not None else {}


# === Pure functions ==================================================================

class DeclaredKindTest(unittest.TestCase):

    CASES = [
        ("INTEGER", False, up.BIGINT), ("BIGINT", False, up.BIGINT),
        ("int", False, up.BIGINT), ("UNSIGNED BIG INT", False, up.BIGINT),
        ("REAL", False, up.DOUBLE), ("FLOAT", False, up.DOUBLE),
        ("DOUBLE PRECISION", False, up.DOUBLE), ("NUMERIC", False, up.DOUBLE),
        ("DECIMAL(10,2)", False, up.DOUBLE),
        ("TEXT", False, up.STRING), ("VARCHAR(255)", False, up.STRING),
        ("CHAR(3)", False, up.STRING), ("NVARCHAR(10)", False, up.STRING),
        ("CLOB", False, up.STRING),
        ("BLOB", False, up.BINARY),
        ("BOOLEAN", False, up.BOOLEAN), ("bool", False, up.BOOLEAN),
        ("DATETIME", False, up.TIMESTAMP), ("TIMESTAMP", False, up.TIMESTAMP),
        ("DATE", False, up.TIMESTAMP), ("date", False, up.TIMESTAMP),
        ("TEXT", True, up.TIMESTAMP), ("INTEGER", True, up.TIMESTAMP),
        ("REAL", True, up.TIMESTAMP), ("", True, up.TIMESTAMP),
        ("", False, None),
    ]

    def test_declared_kind(self):
        for decl, is_ts, kind in self.CASES:
            with self.subTest(decl=decl, is_timestamp=is_ts):
                self.assertEqual(up.declared_kind(decl, is_ts), kind)


class ParseTimestampTest(unittest.TestCase):

    NOON = micros(2025, 3, 1, 12)
    EPOCH_S = 1_740_830_400  # 2025-03-01T12:00:00Z

    def test_text_forms(self):
        cases = {
            "2025-03-01T12:00:00": self.NOON,
            "2025-03-01 12:00:00": self.NOON,
            "2025-03-01T12:00:00Z": self.NOON,
            "2025-03-01 12:00:00Z": self.NOON,
            "2025-03-01T14:00:00+02:00": self.NOON,
            "2025-03-01T07:00:00-05:00": self.NOON,
            "2025-03-01T12:00:00.250Z": self.NOON + 250_000,
            "2025-03-01T12:00:00.123456": self.NOON + 123_456,
            "2025-03-01": micros(2025, 3, 1),
            "  2025-03-01T12:00:00Z  ": self.NOON,
            "1969-12-31T23:59:59Z": -1_000_000,
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(up.parse_timestamp(text), expected)

    def test_epoch_magnitudes(self):
        s = self.EPOCH_S
        cases = [
            (s, self.NOON), (float(s), self.NOON), (s + 0.5, self.NOON + 500_000),
            (s * 1000 + 250, self.NOON + 250_000),          # milliseconds
            (s * 1_000_000 + 7, self.NOON + 7),              # microseconds
            (s * 1_000_000_000, self.NOON),                  # nanoseconds
            (str(s), self.NOON), (str(s * 1000), self.NOON),  # numbers as text
            (0, 0), (86_400, 86_400 * 10**6),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(up.parse_timestamp(value), expected)

    def test_not_a_timestamp(self):
        for value in ("garbage", "", "2025-02-30", "2025-13-01", "12:00", None, True,
                      b"2025-03-01", float("nan"), float("inf"), "NaN", 1e30):
            with self.subTest(value=value):
                self.assertIsNone(up.parse_timestamp(value))


class TimeFormatTest(unittest.TestCase):
    """detect_time_format on sampled values: what the values are, whether they sort as
    time (a cursor can follow them), and the instant each one reads as."""

    CASES = [  # (sampled values, kind, pattern, sorts, first value's instant)
        (["2020-01-02T13:00:00", "2020-01-02T14:00:00.5"], "iso", None, True,
         micros(2020, 1, 2, 13)),
        (["2020-01-02 13:00:00+01:00", "2020-01-02 14:00:00.250+01:00"], "iso", None,
         True, micros(2020, 1, 2, 12)),
        (["2020-01-02T13:00:00Z", "2020-01-02T13:00:00.5Z"], "iso", None, False,
         micros(2020, 1, 2, 13)),
        (["2020-01-02T13:00:00", "2020-01-02 14:00:00"], "iso", None, False,
         micros(2020, 1, 2, 13)),
        (["2020-01-02 13:00:00+01:00", "2020-07-02 13:00:00+02:00"], "iso", None, False,
         micros(2020, 1, 2, 12)),
        ([1577970000, 1577973600], "epoch", None, True, micros(2020, 1, 2, 13)),
        ([1577970000.25], "epoch", None, True, micros(2020, 1, 2, 13) + 250_000),
        ([1577970000000, 1577973600000], "epoch", None, True, micros(2020, 1, 2, 13)),
        ([1577970000000000], "epoch", None, True, micros(2020, 1, 2, 13)),
        ([1577970000, 1577973600000], "epoch", None, False, micros(2020, 1, 2, 13)),
        ([2458851.0416666665, 2458851.5], "julian", None, True, micros(2020, 1, 2, 13)),
        (["Jan 2 2020", "Feb 10 2020"], "strptime", "%b %d %Y", False,
         micros(2020, 1, 2)),
        (["2010/01/02 13:00", "2010/01/02 14:00"], "strptime", "%Y/%m/%d %H:%M", True,
         micros(2010, 1, 2, 13)),
        (["2010/1/2 13:00"], "strptime", "%Y/%m/%d %H:%M", False, micros(2010, 1, 2, 13)),
        (["01/02/2020 13:00", "12/25/2020 13:00"], "strptime", "%m/%d/%Y %H:%M", False,
         micros(2020, 1, 2, 13)),
        (["01/02/2020 13:00", "25/12/2020 13:00"], "strptime", "%d/%m/%Y %H:%M", False,
         micros(2020, 2, 1, 13)),
        (["02.01.2020 13:00:00"], "strptime", "%d.%m.%Y %H:%M:%S", False,
         micros(2020, 1, 2, 13)),
        (["2020-01-02 13:00:00 +0100"], "iso", None, True, micros(2020, 1, 2, 12)),
        (["Thu, 02 Jan 2020 13:00:00 +0100"], "strptime", "%a, %d %b %Y %H:%M:%S %z",
         False, micros(2020, 1, 2, 12)),
        (["2020-01-02 13:00:00 UTC"], "strptime", "%Y-%m-%d %H:%M:%S UTC", True,
         micros(2020, 1, 2, 13)),
        (["1577970000", "1577973600"], "epoch", None, True, micros(2020, 1, 2, 13)),
        (["999", "1000"], "epoch", None, False, 999_000_000),
        (["2020-01-02 13:00:00", 1577973600], "epoch", None, False, micros(2020, 1, 2, 13)),
    ]

    def test_detect_time_format(self):
        for values, kind, pattern, sorts, first in self.CASES:
            with self.subTest(values=values):
                fmt = up.detect_time_format(values)
                self.assertEqual((fmt.kind, fmt.pattern, fmt.sorts), (kind, pattern, sorts),
                                 fmt.why)
                self.assertEqual(fmt.micros(values[0]), first)
                self.assertEqual(fmt.sorts, not fmt.why or "reads as" in fmt.why)

    def test_a_configured_layout_wins_and_a_layout_without_directive_is_an_error(self):
        fmt = up.detect_time_format(["01/02/2020 13:00"], "%d/%m/%Y %H:%M")
        self.assertEqual(fmt.micros("01/02/2020 13:00"), micros(2020, 2, 1, 13))
        with self.assertRaisesRegex(up.ConfigError, "has no strptime directive"):
            up.detect_time_format(["x"], "dd/mm/yyyy")

    def test_the_fast_layout_reader_agrees_with_strptime(self):
        texts = ["01/02/2020 13:00", "1/2/2020 3:05", "02/30/2020 13:00", "13/01/2020 13:00",
                 "01/02/2020 24:00", "01/02/20 13:00", "01/02/2020 13:00:00", " 01/02/2020 13:00 ",
                 "001/02/2020 13:00", "01/02/2020  13:00", "2020/01/02 13:00"]
        for pattern in ("%m/%d/%Y %H:%M", "%d/%m/%Y %H:%M", "%Y/%m/%d %H:%M"):
            fmt = up.TimeFormat("strptime", pattern)
            self.assertIsNotNone(fmt.layout)
            for text in texts:
                with self.subTest(pattern=pattern, text=text):
                    slow = up.strptime_micros(text, pattern)
                    fast = up.layout_micros(text.strip(), fmt.layout)
                    self.assertIn(fast, (slow, None))
                    self.assertEqual(fmt.micros(text), slow if slow is not None
                                     else up.parse_iso_timestamp(text.strip()))
        self.assertIsNone(up.TimeFormat("strptime", "%b %d %Y").layout)

    def test_both_sinks_read_the_same_instants(self):
        # the Delta sink converts through Arrow, the warehouse sink value by value
        # (coerce_value): after normalize_times both must give the same microseconds
        for values, *_ in self.CASES:
            with self.subTest(values=values):
                fmt = up.detect_time_format(values)
                column = (up.normalize_times(values, fmt) if not fmt.native
                          else list(values)) + [None, "not a time"]
                arrow = up.to_arrow_array(column, up.TIMESTAMP, "t", {})
                arrow = arrow.cast(helpers_int64()).to_pylist()
                coerced = up.coerce_column(column, up.TIMESTAMP, "t", {})
                self.assertEqual(arrow, coerced)
                self.assertEqual(coerced[:len(values)], [fmt.micros(v) for v in values])


def helpers_int64():
    from arro3.core import DataType
    return DataType.int64()


class CoerceValueTest(unittest.TestCase):

    CASES = [
        (None, up.BIGINT, None, True), (None, up.TIMESTAMP, None, True),
        (1, up.BIGINT, 1, True), (2.0, up.BIGINT, 2, True),
        (1.5, up.BIGINT, None, False), ("abc", up.BIGINT, None, False),
        (b"1", up.BIGINT, None, False),
        (1, up.DOUBLE, 1.0, True), (1.5, up.DOUBLE, 1.5, True),
        (math.inf, up.DOUBLE, math.inf, True), ("abc", up.DOUBLE, None, False),
        ("a", up.STRING, "a", True), ("", up.STRING, "", True),
        (b"a", up.STRING, None, False), (1, up.STRING, None, False),
        (b"", up.BINARY, b"", True), ("a", up.BINARY, None, False),
        (0, up.BOOLEAN, False, True), (1, up.BOOLEAN, True, True),
        (1.0, up.BOOLEAN, True, True), (2, up.BOOLEAN, None, False),
        ("true", up.BOOLEAN, None, False),
        ("2025-03-01T12:00:00Z", up.TIMESTAMP, micros(2025, 3, 1, 12), True),
        (1_740_830_400_000, up.TIMESTAMP, micros(2025, 3, 1, 12), True),
        ("garbage", up.TIMESTAMP, None, False), (b"x", up.TIMESTAMP, None, False),
    ]

    def test_coerce_value(self):
        for value, kind, typed, fits in self.CASES:
            with self.subTest(value=value, kind=kind):
                got = up.coerce_value(value, kind)
                self.assertEqual(got, (typed, fits))
                self.assertIs(type(got[0]), type(typed))


class RouteTableTest(helpers.TempDirTestCase):

    def test_route_table(self):
        cases = [
            (("readings",), {}, "raw_readings"),
            (("raw_readings",), {}, "raw_readings"),
            (("RAW_Readings",), {}, "raw_readings"),
            (("secure_readings",), {}, "raw_readings"),
            (("readings",), {"sanitize": True}, "secure_readings"),
            (("raw_readings",), {"sanitize": True}, "secure_readings"),
            (("readings",), {"filter": True}, "filtered_readings"),
            (("readings",), {"filter": True, "sanitize": True}, "secure_readings"),
            (("readings",), {"aggregate": True, "sanitize": True}, "aggregated_readings"),
            (("aggregated_readings",), {"filter": True}, "filtered_readings"),
            (("sensor readings-2",), {}, "raw_sensor_readings_2"),
        ]
        for args, flags, expected in cases:
            with self.subTest(base=args[0], **flags):
                self.assertEqual(up.route_table(*args, **flags), expected)

    def test_databricks_table_with_prefix_is_not_doubled(self):
        db = helpers.make_db(self.path("s.db"),
                             "CREATE TABLE sensor_readings (id INTEGER PRIMARY KEY "
                             "AUTOINCREMENT, v)", [(1,)], ["v"])
        code, _, err = helpers.run_main(["--sqlite", db, "--once"],
                                        self.base_env(DATABRICKS_TABLE="raw_readings"))
        self.assertEqual(code, 0, err)
        self.assertEqual(os.listdir(self.path("lake")), ["raw_readings"])


# === Delta types end to end ==========================================================

class DeltaTypesTest(PipelineTestCase):

    SCHEMA = ("CREATE TABLE typed (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, "
              "r REAL, s TEXT, b BLOB, flag BOOLEAN, dtm DATETIME, tsp TIMESTAMP, d DATE, "
              "timestamp TEXT, u_int, u_real, u_text, u_blob)")
    COLUMNS = ["n", "r", "s", "b", "flag", "dtm", "tsp", "d", "timestamp",
               "u_int", "u_real", "u_text", "u_blob"]

    def test_schema_and_values(self):
        rows = [
            (1, 1.5, "a", b"\x00\x01", 1, "2025-01-01 00:00:00", "2025-01-01T00:00:00Z",
             "2025-01-01", "2025-01-01T01:00:00+01:00", 7, 7.5, "x", b"y"),
            (-2**63, 3, "", b"", 0, "2025-06-30T23:59:59.999999", 1_735_689_600,
             "2024-02-29", 1_735_689_600_000, 2**63 - 1, -0.25, "y", b"\xff"),
            (None,) * 13,
        ]
        db = self.make(self.SCHEMA, rows, self.COLUMNS)
        self.upload(db)
        uri = self.lake("raw_typed")
        expected = {"id": "long", "n": "long", "r": "double", "s": "string",
                    "b": "binary", "flag": "boolean", "dtm": "timestamp",
                    "tsp": "timestamp", "d": "timestamp", "timestamp": "timestamp",
                    "u_int": "long", "u_real": "double", "u_text": "string",
                    "u_blob": "binary", "_source_id": "string", "_batch_id": "string",
                    "_uploaded_at": "timestamp", "_rescued_data": "string",
                    "_source_file": "string"}
        self.assertEqual(helpers.delta_schema(uri), expected)
        first, second, nulls = self.landed("raw_typed", key="id")
        new_year = dt.datetime(2025, 1, 1, tzinfo=UTC)
        self.assertEqual(first, {**first, "id": 1, "n": 1, "r": 1.5, "s": "a",
                                 "b": b"\x00\x01", "flag": True, "dtm": new_year,
                                 "tsp": new_year, "d": new_year, "timestamp": new_year,
                                 "u_int": 7, "u_real": 7.5, "u_text": "x", "u_blob": b"y",
                                 "_rescued_data": None})
        self.assertEqual(second, {**second, "n": -2**63, "r": 3.0, "s": "", "b": b"",
                                  "flag": False,
                                  "dtm": dt.datetime(2025, 6, 30, 23, 59, 59, 999999,
                                                     tzinfo=UTC),
                                  "tsp": new_year, "d": dt.datetime(2024, 2, 29, tzinfo=UTC),
                                  "timestamp": new_year, "u_int": 2**63 - 1,
                                  "u_real": -0.25, "u_text": "y", "u_blob": b"\xff",
                                  "_rescued_data": None})
        self.assertIs(type(second["r"]), float)
        self.assertIs(second["flag"], False)
        self.assertEqual({k: v for k, v in nulls.items() if v is not None and
                          not k.startswith("_")}, {"id": 3})
        self.assertIsNone(nulls["_rescued_data"])

    def test_untyped_column_keeps_its_type_across_runs(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, u)",
                       [(1,), (2,)], ["u"])
        self.upload(db)
        self.insert(db, [("text",), (3,)], ["u"])
        self.upload(db)
        self.assertEqual(helpers.delta_schema(self.lake("raw_t"))["u"], "long")
        rows = self.landed("raw_t", key="id")
        self.assertEqual([r["u"] for r in rows], [1, 2, None, 3])
        self.assertEqual([rescued(r) for r in rows], [{}, {}, {"u": "text"}, {}])

    def test_detected_timestamp_column_declared_text_or_integer_is_timestamp(self):
        for decl, value in (("TEXT", "2025-01-01T00:00:00Z"), ("INTEGER", 1_735_689_600),
                            ("REAL", 1_735_689_600_000.0)):
            with self.subTest(decl=decl):
                db = self.make(f"CREATE TABLE t (created_at {decl} NOT NULL, v)",
                               [(value, 1)], where=decl)
                self.upload(db, where=decl)
                uri = self.lake("raw_t", decl)
                self.assertEqual(helpers.delta_schema(uri)["created_at"], "timestamp")
                (row,) = helpers.read_delta(uri)
                self.assertEqual(row["created_at"], dt.datetime(2025, 1, 1, tzinfo=UTC))


class RescuedDataTest(PipelineTestCase):

    SCHEMA = ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, r REAL, "
              "s TEXT, flag BOOLEAN, timestamp TEXT, d DATETIME, label TEXT)")
    COLUMNS = ["n", "r", "s", "flag", "timestamp", "d", "label"]
    CLEAN = {"n": 1, "r": 1.5, "s": "ok", "flag": 1, "timestamp": "2025-01-01T00:00:00Z",
             "d": "2025-01-01 00:00:00"}
    MISFITS = {
        "clean": {},
        "text in INTEGER": {"n": "abc"},
        "1.5 in INTEGER": {"n": 1.5},
        "text in REAL": {"r": "abc"},
        "bad timestamp": {"timestamp": "not a time"},
        "impossible date": {"d": "2025-02-30"},
        "2 in BOOLEAN": {"flag": 2},
        "text in BOOLEAN": {"flag": "yes"},
        "BLOB in TEXT": {"s": b"\xff\x00blob"},
        "two at once": {"n": "x", "flag": 7},
    }

    def make_rows(self):
        rows = []
        for label, misfit in self.MISFITS.items():
            values = {**self.CLEAN, **misfit, "label": label}
            rows.append(tuple(values[c] for c in self.COLUMNS))
        return rows

    def typed_clean(self):
        new_year = dt.datetime(2025, 1, 1, tzinfo=UTC)
        return {"n": 1, "r": 1.5, "s": "ok", "flag": True, "timestamp": new_year,
                "d": new_year}

    def assert_rescued_rows(self, rows):
        self.assertEqual(sorted(r["label"] for r in rows), sorted(self.MISFITS))
        for row in rows:
            misfit = self.MISFITS[row["label"]]
            with self.subTest(row=row["label"]):
                expected = {c: None if c in misfit else v
                            for c, v in self.typed_clean().items()}
                self.assertEqual({c: row[c] for c in expected}, expected)
                want = {c: ({"$binary": base64.b64encode(v).decode()}
                            if isinstance(v, bytes) else v) for c, v in misfit.items()}
                self.assertEqual(rescued(row), want)

    def test_misfits_are_rescued_and_the_row_still_lands(self):
        db = self.make(self.SCHEMA, self.make_rows(), self.COLUMNS)
        err = self.upload(db)
        self.assert_rescued_rows(self.landed("raw_t", key="id"))
        self.assertIn(f", {len(self.MISFITS) - 1} rows with rescued values", err)

    def test_misfits_in_small_batches(self):
        # every row in its own batch and in pairs: the fast and the per-value paths
        for size in ("1", "2"):
            with self.subTest(batch_size=size):
                db = self.make(self.SCHEMA, self.make_rows(), self.COLUMNS, where=size)
                self.upload(db, "--batch-size", size, where=size)
                self.assert_rescued_rows(self.landed("raw_t", key="id", where=size))

    def test_rescued_original_values_keep_their_json_type(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, "
                       "r REAL)", [("quote \" and \\ and ü", "inf-ish"), (2.25, "1e999x")],
                       ["n", "r"])
        self.upload(db)
        rows = self.landed("raw_t", key="id")
        self.assertEqual([rescued(r) for r in rows],
                         [{"n": "quote \" and \\ and ü", "r": "inf-ish"},
                          {"n": 2.25, "r": "1e999x"}])
        self.assertIn("ü", rows[0]["_rescued_data"])  # readable, not \\u escaped

    def test_timestamp_text_lands_the_same_whatever_its_batch_mates(self):
        # BUG: Arrow's cast accepts '... UTC' (and leap seconds) but parse_timestamp does
        # not. A batch of only such values takes the Arrow path and lands them typed; one
        # bad value in the batch sends the whole column through parse_timestamp, and the
        # same text is then rescued with a NULL timestamp.
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "timestamp TEXT, v INTEGER)",
                       [("2025-01-01 10:00:00 UTC", 0), ("2025-01-01 10:00:01 UTC", 1),
                        ("2025-01-01 10:00:02 UTC", 2), ("garbage", 3)],
                       ["timestamp", "v"])
        self.upload(db, "--batch-size", "2")
        rows = self.landed("raw_t", key="v")
        self.assertEqual(rescued(rows[3]), {"timestamp": "garbage"})
        outcomes = [(r["timestamp"] is None, rescued(r) != {}) for r in rows[:3]]
        self.assertEqual(len(set(outcomes)), 1, f"same format, different outcome: {rows[:3]}")


# === Values ==========================================================================

class ValuesTest(PipelineTestCase):

    def test_values_land_as_sqlite_holds_them(self):
        big = random.Random(7).randbytes(3 * 1024 * 1024)
        rows = [
            (None, None, None, None),
            ("ünïcødé ✓ 日本語 🚀", math.inf, big, 2**63 - 1),
            ("it's \"quoted\" \\ back\\slash\n\ttab \\x00", -math.inf, b"", -2**63),
            ("", math.nan, b"\x00", 0),
            ("nul \x00 inside", 1e-300, b"'\"\\", -1),
        ]
        db = self.make("CREATE TABLE v (id INTEGER PRIMARY KEY AUTOINCREMENT, s TEXT, "
                       "r REAL, b BLOB, n INTEGER)", rows, ["s", "r", "b", "n"])
        self.upload(db)
        landed = self.landed("raw_v", key="id")
        expected = source_rows(db, "v", "id")
        self.assertIsNone(expected[3]["r"])  # SQLite itself stores NaN as NULL
        self.assertEqual([{k: r[k] for k in expected[0]} for r in landed], expected)
        self.assertEqual(landed[1]["b"], big)
        self.assertEqual([r["_rescued_data"] for r in landed], [None] * len(rows))


# === Lineage =========================================================================

class LineageTest(PipelineTestCase):

    def test_lineage_columns_on_every_row(self):
        db = self.make("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER)",
                       [(1,), (2,), ("bad",), (4,), (5,)], ["n"])
        before = dt.datetime.now(UTC)
        self.upload(db, "--batch-size", "2", SOURCE_ID="node-7")
        after = dt.datetime.now(UTC)
        rows = self.landed("raw_t", key="id")
        self.assertEqual(len(rows), 5)
        state_id = self.state()["state_id"]
        self.assertEqual([r["_batch_id"] for r in rows],
                         [f"{state_id}-{seq}" for seq in (1, 1, 2, 2, 3)])
        for row in rows:
            with self.subTest(id=row["id"]):
                self.assertEqual(row["_source_id"], "node-7")
                self.assertTrue(before - dt.timedelta(milliseconds=1) <= row["_uploaded_at"]
                                <= after, row["_uploaded_at"])
        self.assertEqual([r["_rescued_data"] for r in rows],
                         [None, None, '{"n": "bad"}', None, None])
        uploaded = {r["_batch_id"]: r["_uploaded_at"] for r in rows}
        self.assertEqual(len(uploaded), 3)
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{12}-\d+", b) for b in uploaded))


if __name__ == "__main__":
    unittest.main()
