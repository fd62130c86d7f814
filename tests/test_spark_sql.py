"""Every statement the warehouse sink sends parses with Apache Spark's own SQL parser.

The sink runs for real against tests/fake_warehouse.py (which already refuses what
Spark 4.0 refuses, so a regression is caught without Spark too); each statement it sent
is then parsed by `sessionState().sqlParser().parsePlan(sql)` of a local SparkSession.
README's test command installs pyspark 4.0 (the oldest grammar the tool targets:
Spark 4.0 refuses `INSERT INTO t BY NAME REPLACE WHERE ...`, which newer releases take).
A slow suite (a JVM starts): it runs when UPLOADER_FULL_TESTS=1, as CI runs it. Without
pyspark or Java the module is skipped, and says why.

Databricks-only statements that open-source Spark's grammar does not have (COPY INTO,
CREATE VOLUME, and PUT / REMOVE, which the connector runs on the client) are listed in
SPARK_UNKNOWN and checked only against the fake warehouse's parser.
"""

import json
import os
import shutil
import sqlite3
import tempfile
import unittest
from unittest import mock

from . import fake_warehouse
from .helpers import FULL_TESTS, insert_rows, make_db, run_main, up

SPARK = None
SPARK_UNKNOWN = ("COPY INTO", "CREATE VOLUME", "PUT", "REMOVE")
KINDS = ("CREATE TABLE", "CREATE OR REPLACE VIEW", "ALTER TABLE ADD COLUMNS",
         "ALTER TABLE SET TBLPROPERTIES", "INSERT REPLACE WHERE", "INSERT VALUES",
         "MERGE INTO", "DELETE FROM", "SELECT", "DESCRIBE", "SHOW TABLES",
         "DROP TABLE") + SPARK_UNKNOWN


def setUpModule():
    global SPARK
    if not FULL_TESTS:  # a JVM and a minute: with the slow suites
        raise unittest.SkipTest("slow suite (Spark's SQL parser): set UPLOADER_FULL_TESTS=1 "
                                "to run it")
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise unittest.SkipTest("pyspark is not installed: run README's test command "
                                "(it adds --with 'pyspark>=4.0,<4.1')") from None
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        raise unittest.SkipTest("pyspark needs Java 17 or later (no java on PATH)")
    SPARK = (SparkSession.builder.master("local[1]").appName("uploader-sql-check")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    SPARK.sparkContext.setLogLevel("ERROR")


def tearDownModule():
    if SPARK is not None:
        gateway = SPARK.sparkContext._gateway
        SPARK.stop()
        # py4j's finaliser thread sleeps in a loop with time.sleep: left running, it
        # spins (and fills memory) under the tests that patch time.sleep
        gateway.shutdown()


def kind_of(sql):
    """The statement kind, one of KINDS."""
    words = sql.split()
    head = " ".join(words[:2]).upper()
    if head == "ALTER TABLE":
        return "ALTER TABLE SET TBLPROPERTIES" if " SET TBLPROPERTIES " in sql else \
            "ALTER TABLE ADD COLUMNS"
    if words[0] == "INSERT":
        return "INSERT REPLACE WHERE" if " REPLACE WHERE " in sql else "INSERT VALUES"
    for kind in KINDS:
        if sql.upper().startswith(kind):
            return kind
    return words[0].upper()


HOSTILE = ["it's", "a`b", "with space", "f(x)=1, {y}", "é ü", "$x", "back\\slash"]
VALUES = [("it's ${x} \\ é 😀\n", float("nan"), b"\x00'\xff", "2025-01-02T03:04:05.5Z", 1),
          ("", float("inf"), b"", "0999-06-01 00:00:00", 0),
          (None, -0.0, None, 1735787045, None), ("12abc", 1e300, b"x", "not a time", 2)]


class SparkParsesEveryStatement(unittest.TestCase):
    """Run the sink through each kind of statement, then parse each one with Spark."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="uploader-spark-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        patches = [mock.patch.object(up.DatabricksSink, "connector", fake_warehouse),
                   mock.patch.object(fake_warehouse, "WAREHOUSE",
                                     fake_warehouse.Warehouse(os.path.join(cls.tmp, "wh"))),
                   mock.patch.object(up.Sink, "sleep", staticmethod(lambda seconds: None))]
        for patch in patches:
            patch.start()
            cls.addClassCleanup(patch.stop)
        cls.warehouse = fake_warehouse.WAREHOUSE
        cls.exercise()
        cls.sent = [s["sql"] for s in cls.warehouse.statements()]
        refused = [s for s in cls.warehouse.statements() if s["outcome"] != "ok"]
        assert not refused, refused

    @classmethod
    def env(cls, **extra):
        return {"DATABRICKS_HOST": "adb-1.2.azuredatabricks.net", "DATABRICKS_TOKEN": "dapi",
                "DATABRICKS_HTTP_PATH": "/sql/1.0/warehouses/w", "SOURCE_ID": "node'1",
                "DATABRICKS_DATABASE": "main.sensors", "DATABRICKS_VOLUME": "none",
                "STATE_DIR": os.path.join(cls.tmp, "state"), **extra}

    @classmethod
    def upload(cls, *argv, **env):
        code, out, err = run_main(argv, cls.env(**env))
        assert code == 0, err

    @classmethod
    def exercise(cls):
        """Every path that sends a statement: create, insert, add columns (with column
        mapping), settle an in-flight batch, recover a cursor, stage in a volume, the
        node's status upsert, --run-query INFO, --fleet-status and --test-upload."""
        old = [(n, k) for n, k in up.STATUS_COLUMNS
               if n not in ("source_file", "source_table", "source_path")]
        fake_warehouse.connect(server_hostname="h", http_path="p", access_token="t").cursor(
        ).execute(up.status_table_sql("`main`.`sensors`.`_uploader_nodes`", old))  # older
        db = os.path.join(cls.tmp, "hostile.db")
        columns = HOSTILE[:2] + ["n", "r", "b", "at", "flag"]
        make_db(db, "CREATE TABLE \"r`';--\" (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "\"it's\" TEXT, \"a`b\" TEXT, n TEXT, r REAL, b BLOB, at DATETIME, "
                "flag BOOLEAN)", [(f"{c}{i}",) * 2 + v for i, (c, v) in
                                  enumerate(zip(HOSTILE, VALUES))], columns=columns)
        cls.upload("--sqlite", db, "--once")
        conn = sqlite3.connect(db)
        for name in HOSTILE[2:]:
            conn.execute(f"ALTER TABLE \"r`';--\" ADD COLUMN {up.quote_ident(name)} TEXT")
        insert_rows(conn, [tuple(HOSTILE)], HOSTILE)
        conn.commit()
        conn.close()
        cls.warehouse.plan("crash_after", "INSERT INTO")
        try:
            cls.upload("--sqlite", db, "--once")
        except fake_warehouse.Crash:
            pass
        cls.upload("--sqlite", db, "--once")  # settles the in-flight batch with a SELECT
        os.remove(os.path.join(cls.tmp, "state", up.STATE_FILE))
        cls.upload("--sqlite", db, "--once", "--recover-state")
        big = make_db(os.path.join(cls.tmp, "big.db"), "CREATE TABLE \"r`';--\" (id INTEGER "
                      "PRIMARY KEY AUTOINCREMENT, \"it's\" TEXT)", [("x" * 100,)] * 300,
                      columns=["it's"])
        cls.upload("--sqlite", big, "--once", "--max-statement-bytes", "10000",
                   DATABRICKS_VOLUME="auto", STATE_DIR=os.path.join(cls.tmp, "state-staged"),
                   SOURCE_ID="node-2")
        sink = up.DatabricksSink(up.check_target(up.load_config(
            up.build_parser().parse_args([]), cls.env())), up.Identity("node'1", "t", "s"))
        try:  # what --backfill and a new table's check read
            sink.read_keys("raw_r_____", "node'1", ["id", "it's"])
            sink.count_rows("raw_r_____", "node'1")
        finally:
            sink.close()
        cls.many(db)
        cls.upload("--sqlite", db, "--run-query", "INFO")
        cls.upload("--sqlite", db, "--fleet-status")
        cls.upload("--fleet-status")  # the tables named in the status table
        cls.upload("--test-upload")
        cls.zerobus(db)

    @classmethod
    def many(cls, db):
        """Two files of hostile names through `sources:`: a status row for each; one
        is removed, and forgotten: its status row is deleted."""
        folder = os.path.join(cls.tmp, "many")
        os.makedirs(folder)
        for name in ("it's.db", "a`b ${x}.db"):
            shutil.copy(db, os.path.join(folder, name))
        config = os.path.join(cls.tmp, "many.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            json.dump({"sources": [{"sqlite": os.path.join(folder, "*.db")}]}, fh)
        for run in range(3):
            cls.upload("--config", config, "--once", "--forget-after", "0",
                       STATE_DIR=os.path.join(cls.tmp, "state-many"), SOURCE_ID="node'3")
            if run == 0:
                os.remove(os.path.join(folder, "a`b ${x}.db"))

    @classmethod
    def zerobus(cls, db):
        """The Zerobus sink with a warehouse: its table and deduplicating view (made
        again when a column is added), and its SELECTs (settling a batch, the fleet)."""
        from .zerobus_fake import ZerobusFake
        fake = ZerobusFake()
        fake.catalog = lambda table: {n: k.upper() for n, k in
                                      cls.warehouse.columns(table).items()}
        address = fake.start()
        try:
            env = dict(TARGET="zerobus", ZEROBUS_ENDPOINT=f"http://{address}",
                       DATABRICKS_HOST=address, ZEROBUS_WORKSPACE_ID=fake.workspace_id,
                       DATABRICKS_CLIENT_ID="sp-id", DATABRICKS_CLIENT_SECRET="sp-secret",
                       DATABRICKS_TABLE="zerobus_t",
                       STATE_DIR=os.path.join(cls.tmp, "state-zerobus"))
            cls.upload("--sqlite", db, "--once", **env)
            conn = sqlite3.connect(db)
            conn.execute("ALTER TABLE \"r`';--\" ADD COLUMN \"late, col\" TEXT")
            insert_rows(conn, [("late",)], ["late, col"])
            conn.commit()
            conn.close()
            cls.upload("--sqlite", db, "--once", **env)
            cls.upload("--sqlite", db, "--fleet-status", **env)  # a SELECT ... max_by
        finally:
            fake.stop()

    def test_every_kind_was_sent(self):
        self.assertEqual(sorted({kind_of(s) for s in self.sent}), sorted(KINDS))

    def check_kind(self, kind):
        statements = [s for s in self.sent if kind_of(s) == kind]
        self.assertTrue(statements, f"no {kind} statement was sent")
        parser = SPARK._jsparkSession.sessionState().sqlParser()
        for sql in statements:
            with self.subTest(sql=sql[:120]):
                parser.parsePlan(sql)  # a ParseException fails the test

    def test_create_table_with_tblproperties(self):
        self.check_kind("CREATE TABLE")
        self.assertTrue([s for s in self.sent if "'delta.columnMapping.mode' = 'name'" in s])

    def test_create_or_replace_view_of_zerobus(self):
        self.check_kind("CREATE OR REPLACE VIEW")
        views = [s for s in self.sent if kind_of(s) == "CREATE OR REPLACE VIEW"]
        self.assertEqual(len(views), 2)  # made, and made again with the new column
        self.assertIn("`late, col`", views[1])

    def test_print_ddl_of_zerobus(self):
        """--print-ddl's statements for the Zerobus target (not sent: printed)."""
        parser = SPARK._jsparkSession.sessionState().sqlParser()
        for sql in up.ZerobusSink.ddl("main.sensors", "raw_t", HOSTILE, [up.STRING] * 7):
            with self.subTest(sql=sql[:60]):
                parser.parsePlan(sql)

    def test_alter_table_add_columns(self):
        self.check_kind("ALTER TABLE ADD COLUMNS")

    def test_alter_table_set_tblproperties(self):
        self.check_kind("ALTER TABLE SET TBLPROPERTIES")

    def test_insert_replace_where_with_hostile_names_and_values(self):
        self.check_kind("INSERT REPLACE WHERE")
        sent = " ".join(self.sent)
        for piece in ("CAST('Infinity' AS DOUBLE)", "X'00",
                      "TIMESTAMP'0999-06-01T00:00:00Z'", "`f(x)=1, {y}`",
                      "\\u0024"):
            self.assertIn(piece, sent)

    def test_rendered_special_values(self):
        """What SQLite cannot hold (NaN) but an aggregate can produce, and the rest."""
        batch = up.Chunk(["r", "b", "at", "s"], [
            [float("nan"), float("-inf"), -0.0, 5e-324], [b"\x00'", b"", None, bytes(range(256))],
            [-62135596800000000, 0, 253402300799999999, None], ["${x}", "\\", "'", None]],
            4, [4], kinds=[up.DOUBLE, up.BINARY, up.TIMESTAMP, up.STRING], batch_id="s-1")
        sql = up.render_insert("`m`.`s`.`t ;`", batch, up.Identity("n'`", "t", "s"),
                               ["_batch_id", "extra", "s", "r", "_source_id", "at", "b"])
        for piece in ("CAST('NaN' AS DOUBLE)", "-0.0D", "TIMESTAMP'0001-01-01T00:00:00Z'"):
            self.assertIn(piece, sql)
        SPARK._jsparkSession.sessionState().sqlParser().parsePlan(sql)

    def test_a_batch_cut_into_several_statements(self):
        """Each statement of a batch cut in three: its REPLACE WHERE with LIKE / NOT LIKE."""
        parser = SPARK._jsparkSession.sessionState().sqlParser()
        for k in (1, 2, 3):
            with self.subTest(statement=k):
                statement = up.InlineStatement.build("(1,'a')", ["id", "v"], "n'1", "s-4",
                                                     "TIMESTAMP'2025-01-01T00:00:00Z'", k, 3)
                sql = statement.assemble("`m`.`s`.`t`")
                self.assertIn("'s-4.%s/3'" % k, sql)
                parser.parsePlan(sql)

    def test_merge_of_the_node_status(self):
        """Each cycle's upsert of the node's row in _uploader_nodes (the node id is
        node'1), and the status table's CREATE with deletion vectors."""
        self.check_kind("MERGE INTO")
        merges = [s for s in self.sent if kind_of(s) == "MERGE INTO"]
        self.assertTrue([s for s in merges if "'node\\'1' AS `source_id`" in s])
        self.assertTrue([s for s in merges if "'it\\'s.db' AS `source_file`" in s])
        self.assertTrue([s for s in self.sent if s.startswith(  # an older status table
            "ALTER TABLE `main`.`sensors`.`_uploader_nodes` ADD COLUMNS")])
        self.assertTrue([s for s in self.sent if s.startswith(
            "CREATE TABLE IF NOT EXISTS `main`.`sensors`.`_uploader_nodes`")])

    def test_delete_of_a_forgotten_files_status(self):
        """A file forgotten after FORGET_AFTER: its row of _uploader_nodes is deleted."""
        self.check_kind("DELETE FROM")
        (delete,) = [s for s in self.sent if kind_of(s) == "DELETE FROM"]
        for piece in ("DELETE FROM `main`.`sensors`.`_uploader_nodes` WHERE ",
                      "'node\\'3'", "'a`b \\u0024{x}.db'"):
            self.assertIn(piece, delete)

    def test_insert_values_of_test_upload(self):
        self.check_kind("INSERT VALUES")

    def test_select_to_settle_and_recover(self):
        self.check_kind("SELECT")
        selects = [s for s in self.sent if s.startswith("SELECT")]
        self.assertTrue([s for s in selects if "`target_table` = :target_table" in s])  # --fleet-status
        self.assertTrue([s for s in selects if "`_batch_id` = :batch_id" in s])
        self.assertTrue([s for s in selects if s.startswith("SELECT max(")])
        self.assertTrue([s for s in selects if s.startswith("SELECT `id`, `it's` FROM")])
        self.assertTrue([s for s in selects if "max_by(`_batch_id`" in s])  # Zerobus fleet

    def test_describe_show_tables_and_drop(self):
        for kind in ("DESCRIBE", "SHOW TABLES", "DROP TABLE"):
            with self.subTest(kind=kind):
                self.check_kind(kind)

    def test_spark_refuses_by_name_replace_where(self):
        """The check can fail: Spark 4.0 refuses the form the tool used before."""
        insert = next(s for s in self.sent if kind_of(s) == "INSERT REPLACE WHERE")
        target, rest = insert[len("INSERT INTO "):].split(" REPLACE WHERE ", 1)
        old = f"INSERT INTO {target} BY NAME REPLACE WHERE {rest}"
        parser = SPARK._jsparkSession.sessionState().sqlParser()
        with self.assertRaisesRegex(Exception, "PARSE_SYNTAX_ERROR|ParseException"):
            parser.parsePlan(old)

    def test_databricks_only_statements_are_not_spark_grammar(self):
        """COPY INTO, CREATE VOLUME, PUT and REMOVE: Databricks SQL, not in Spark's
        grammar; skipped here (the fake warehouse parses them), said explicitly."""
        parser = SPARK._jsparkSession.sessionState().sqlParser()
        for kind in SPARK_UNKNOWN:
            sql = next(s for s in self.sent if kind_of(s) == kind)
            with self.subTest(kind=kind):
                with self.assertRaisesRegex(Exception, "PARSE_SYNTAX_ERROR|ParseException"):
                    parser.parsePlan(sql)
        self.skipTest(f"not in Spark's grammar, checked by the fake warehouse only: "
                      f"{', '.join(SPARK_UNKNOWN)}")


class SparkParsesTheIngestSql(unittest.TestCase):
    """--print-ingest-sql (the landing target): what Spark 4.0's grammar has parses with
    Spark; what is Databricks-only is checked as far as Spark can see it.

    Spark 4.0 parses: the fleet view over read_files (named arguments, `=>`), the COPY
    INTO table's CREATE TABLE IF NOT EXISTS, and the ingest query itself without the
    STREAM keyword. It has no CREATE OR REFRESH STREAMING TABLE ... SCHEDULE, no `FROM
    STREAM read_files(...)` and no COPY INTO: the streaming table is parsed as the same
    statement in Spark's words (CREATE TABLE ... AS, the query without STREAM), so its
    names, quoting and options are checked; COPY INTO is parsed by sqlglot's Databricks
    dialect (as the fake warehouse parses it) and shown to be refused by Spark."""

    TABLES = ["raw_r`';--", "secure_readings", "\u00e9 x"]

    @classmethod
    def setUpClass(cls):
        config = up.Config(databricks_volume="/Volumes/main/sens'ors/land ing/sub",
                           source_id="n")
        cls.sql = up.landing_ingest_sql(config, cls.TABLES)
        cls.statements = [line[:-1] for line in cls.sql.splitlines()
                          if line and not line.startswith("--")]
        cls.parser = SPARK._jsparkSession.sessionState().sqlParser()

    def of_kind(self, head):
        found = [s for s in self.statements if s.startswith(head)]
        self.assertTrue(found, head)
        return found

    def test_the_fleet_view_parses(self):
        (view,) = self.of_kind("CREATE OR REPLACE VIEW")
        folder = up.sql_string("/Volumes/main/sens'ors/land ing/sub/_nodes/")
        self.assertIn(f"read_files({folder}, format => 'json'", view)
        self.parser.parsePlan(view)

    def test_the_copy_into_table_parses(self):
        for sql in self.of_kind("CREATE TABLE IF NOT EXISTS"):
            with self.subTest(sql=sql):
                self.parser.parsePlan(sql)

    def test_the_streaming_table_parses_in_sparks_words(self):
        streaming = self.of_kind("CREATE OR REFRESH STREAMING TABLE")
        self.assertEqual(len(streaming), len(self.TABLES))
        for sql in streaming:
            with self.subTest(sql=sql):
                head, query = sql.split(" SCHEDULE EVERY 1 HOUR AS ", 1)
                self.assertIn(" FROM STREAM read_files(", query)
                batch = query.replace(" FROM STREAM read_files(", " FROM read_files(")
                self.parser.parsePlan(batch)
                table = head.removeprefix("CREATE OR REFRESH STREAMING TABLE ")
                self.parser.parsePlan(f"CREATE TABLE {table} AS {batch}")
                with self.assertRaisesRegex(Exception, "PARSE_SYNTAX_ERROR|ParseException"):
                    self.parser.parsePlan(sql)  # Databricks SQL only

    def test_copy_into_is_databricks_sql(self):
        import sqlglot
        from sqlglot import exp
        for sql in self.of_kind("COPY INTO"):
            with self.subTest(sql=sql):
                self.assertIsInstance(sqlglot.parse_one(sql, read="databricks"), exp.Copy)
                with self.assertRaisesRegex(Exception, "PARSE_SYNTAX_ERROR|ParseException"):
                    self.parser.parsePlan(sql)


if __name__ == "__main__":
    unittest.main()
