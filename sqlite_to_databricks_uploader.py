#!/usr/bin/env -S uv run --script
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "databricks-sql-connector>=4.0",
#     "deltalake>=1.0",
#     "pyyaml>=6.0",
# ]
# ///
"""Upload new rows from a live SQLite database to Delta Lake tables, exactly once.

Each cycle reads the rows added since the last checkpoint, in batches, optionally
sanitizes, filters or aggregates them, appends them to a Delta table (a Databricks
SQL warehouse, or a Delta table at a path: the local lakehouse by default) and then
advances the checkpoint in STATE_DIR/last_upload.json.

examples:
  %(prog)s --demo                                  # sample data -> ./lakehouse
  %(prog)s --sqlite sensors.db --once              # one cycle to ./lakehouse
  %(prog)s --config uploader.yaml                  # loop every UPLOAD_INTERVAL s
  %(prog)s --run-query "SELECT count(*) FROM raw_sensor_readings"

Settings come from command-line flags, then environment variables, then the YAML
file given by --config, then defaults. Exit codes: 0 done, 1 a cycle failed,
2 bad configuration or input.
"""

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid

__version__ = "0.1.0"
TOOL = "sqlite-to-databricks-uploader"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

STATE_FILE = "last_upload.json"
STATE_VERSION = 1
FALLBACK_STATE_DIR = "./state"
DEFAULT_DELTA_URI = "./lakehouse"
SCENARIO_PREFIXES = ("raw", "filtered", "secure", "aggregated")
LINEAGE_COLUMNS = ("_source_id", "_batch_id", "_uploaded_at", "_rescued_data")

log = logging.getLogger("uploader")


# === Errors ==========================================================================

class UploaderError(Exception):
    """An expected failure, reported as one line; `exit_code` says how to exit."""

    exit_code = EXIT_FAILED


class ConfigError(UploaderError):
    """A setting is missing or invalid."""

    exit_code = EXIT_BAD_INPUT


class SourceError(UploaderError):
    """The SQLite source cannot be read as configured."""

    exit_code = EXIT_BAD_INPUT


class SinkError(UploaderError):
    """The target refused or failed a write; `transient` ones may be retried."""

    def __init__(self, message, transient=False):
        super().__init__(message)
        self.transient = transient


class StateError(UploaderError):
    """The state file is unreadable, foreign or cannot be written."""

    exit_code = EXIT_BAD_INPUT


class LockedError(StateError):
    """Another uploader holds the state directory."""

    exit_code = EXIT_FAILED


# === Config ==========================================================================

@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field is spelled on the command line, in env and in YAML."""

    flag: str | None
    env: tuple
    kind: str
    help: str
    group: str
    yaml_aliases: tuple = ()
    secret: bool = False
    choices: tuple = ()


def option(default, flag, env, kind, help, group, **extra):
    """Declare a config field with its flag, env names and YAML aliases."""
    env = (env,) if isinstance(env, str) else tuple(env)
    meta = Setting(flag, env, kind, help, group, **extra)
    return dataclasses.field(default=default, metadata={"setting": meta},
                             repr=not meta.secret)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the uploader; defaults live here and only here."""

    sqlite: str | None = option(
        None, "--sqlite", "SQLITE_PATH", "path", "SQLite database file (read-only)",
        "source", yaml_aliases=("sqlite_path",))
    sqlite_table_name: str | None = option(
        None, "--table", "SQLITE_TABLE_NAME", "str",
        "source table (default: the only table in the file)", "source")
    timestamp_col: str | None = option(
        None, "--timestamp-col", "TIMESTAMP_COL", "str",
        "timestamp column (default: detected by name or declared type)", "source")
    batch_size: int = option(
        100_000, "--batch-size", "BATCH_SIZE", "int",
        "rows per batch; each batch is one commit and one checkpoint", "source")
    busy_timeout: float = option(
        30.0, "--busy-timeout", "BUSY_TIMEOUT", "float",
        "seconds to wait for a SQLite lock held by the writer", "source")
    state_dir: str = option(
        "/state", "--state-dir", "STATE_DIR", "path",
        "directory of last_upload.json (falls back to ./state if not writable)",
        "state")
    interval: float = option(
        300.0, "--interval", "UPLOAD_INTERVAL", "float",
        "seconds between cycles in loop mode", "loop")
    once: bool = option(
        False, "--once", "ONCE", "bool", "run one cycle and exit", "loop")
    source_id: str | None = option(
        None, "--source-id", "SOURCE_ID", "str",
        "this node's identity in lineage columns (default: the host name)", "target")
    delta_uri: str | None = option(
        None, "--delta-uri", "DELTA_URI", "str",
        "Delta location: a directory, s3://, abfss:// or gs:// URI "
        "(default ./lakehouse when no workspace is configured)", "target")
    databricks_host: str | None = option(
        None, "--databricks-host", "DATABRICKS_HOST", "str",
        "workspace host name; setting it selects the SQL warehouse sink", "databricks")
    databricks_http_path: str | None = option(
        None, "--databricks-http-path", "DATABRICKS_HTTP_PATH", "str",
        "SQL warehouse HTTP path (/sql/1.0/warehouses/...)", "databricks")
    databricks_token: str | None = option(
        None, "--databricks-token", "DATABRICKS_TOKEN", "str",
        "personal access token (prefer the env var: flags show in ps)", "databricks",
        secret=True)
    databricks_database: str | None = option(
        None, "--databricks-database", "DATABRICKS_DATABASE", "str",
        "target catalog.schema", "databricks")
    databricks_catalog: str | None = option(
        None, "--databricks-catalog", "DATABRICKS_CATALOG", "str",
        "target catalog (with --databricks-schema, instead of --databricks-database)",
        "databricks")
    databricks_schema: str | None = option(
        None, "--databricks-schema", "DATABRICKS_SCHEMA", "str",
        "target schema (with --databricks-catalog)", "databricks")
    databricks_table: str | None = option(
        None, "--databricks-table", "DATABRICKS_TABLE", "str",
        "base name of the target table (default: the source table's name)", "target",
        yaml_aliases=("table_name",))
    enable_sanitize: bool = option(
        False, "--enable-sanitize", "ENABLE_SANITIZE", "bool",
        "sanitize rows and write to secure_<table>", "processing")
    sanitize_config: dict | None = option(
        None, "--sanitize-config", "SANITIZE_CONFIG", "json",
        "sanitize rules (JSON object; native mapping in YAML)", "processing")
    enable_filter: bool = option(
        False, "--enable-filter", "ENABLE_FILTER", "bool",
        "filter rows and write to filtered_<table>", "processing")
    filter_config: dict | None = option(
        None, "--filter-config", "FILTER_CONFIG", "json",
        "filter conditions (JSON object)", "processing")
    enable_aggregate: bool = option(
        False, "--enable-aggregate", "ENABLE_AGGREGATE", "bool",
        "aggregate rows and write to aggregated_<table>", "processing")
    aggregate_config: dict | None = option(
        None, "--aggregate-config", "AGGREGATE_CONFIG", "json",
        "aggregation spec (JSON object)", "processing")
    log_level: str = option(
        "INFO", "--log-level", "LOG_LEVEL", "choice", "log verbosity", "logging",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = option(
        "text", "--log-format", "LOG_FORMAT", "choice",
        "text, or json (one object per line) for log shippers", "logging",
        choices=("text", "json"))
    sources: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def target(self):
        """'databricks' when a workspace is configured, else 'delta'."""
        return "databricks" if self.databricks_host else "delta"

    def origin(self, name):
        """Where the value of `name` came from: a flag, an env var, a file, default."""
        return self.sources.get(name, "default")


def config_fields():
    """The (name, Setting, default) of every configurable field, in order."""
    return [(f.name, f.metadata["setting"], f.default)
            for f in dataclasses.fields(Config) if "setting" in f.metadata]


SETTINGS = {name: setting for name, setting, _ in config_fields()}
BOOL_WORDS = {"true": True, "1": True, "yes": True,
              "false": False, "0": False, "no": False}


def parse_value(name, raw, origin):
    """Turn a raw flag, env or YAML value into the field's type, or say why not."""
    setting = SETTINGS[name]
    if raw is None:
        return None
    try:
        return _PARSERS[setting.kind](raw, setting)
    except (ValueError, TypeError) as exc:
        shown = "(redacted)" if setting.secret else repr(raw)
        raise ConfigError(f"config: {name} {exc} (got {shown} from {origin})") from None


def _parse_str(raw, setting):
    if isinstance(raw, (dict, list, bool)):
        raise ValueError("must be a string")
    text = str(raw).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _parse_int(raw, setting):
    if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
        raise ValueError("must be a whole number")
    try:
        return int(str(raw).replace("_", "").strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_float(raw, setting):
    if isinstance(raw, bool):
        raise ValueError("must be a number")
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _parse_bool(raw, setting):
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word not in BOOL_WORDS:
        raise ValueError("must be one of true/false/1/0/yes/no")
    return BOOL_WORDS[word]


def _parse_json(raw, setting):
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object ({...})")
    return raw


def _parse_choice(raw, setting):
    text = _parse_str(raw, setting)
    for choice in setting.choices:
        if text.lower() == choice.lower():
            return choice
    raise ValueError(f"must be one of {', '.join(setting.choices)}")


_PARSERS = {"str": _parse_str, "path": _parse_str, "int": _parse_int,
            "float": _parse_float, "bool": _parse_bool, "json": _parse_json,
            "choice": _parse_choice}


def read_yaml_layer(path):
    """Read the YAML config file into {field: (raw value, origin)}."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("config: reading a YAML file needs pyyaml; "
                          "run the script with `uv run`") from None
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config: {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings")
    return yaml_to_layer(data, path)


def yaml_to_layer(data, path):
    """Map YAML keys (and their aliases) to fields; an unknown key is an error."""
    keys = {}
    for name, setting, _ in config_fields():
        keys[name] = name
        keys.update((alias, name) for alias in setting.yaml_aliases)
    layer = {}
    for key, value in data.items():
        name = keys.get(str(key).lower())
        if name is None:
            hint = difflib.get_close_matches(str(key), list(keys), n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config: unknown key '{key}' in {path}{tip}")
        layer[name] = (value, f"{path}: {key}")
    return layer


def read_env_layer(environ):
    """Read the settings present in the environment into {field: (raw, origin)}."""
    layer = {}
    for name, setting, _ in config_fields():
        for var in setting.env:
            if environ.get(var, "") != "":
                layer[name] = (environ[var], var)
                break
    return layer


def read_cli_layer(args):
    """Read the flags given on the command line into {field: (raw, origin)}."""
    given = vars(args)
    return {name: (given[name], setting.flag)
            for name, setting, _ in config_fields() if given.get(name) is not None}


def merge_layers(*layers):
    """Apply layers lowest first; return (values, sources) for the Config."""
    values, sources = {}, {}
    for layer in layers:
        for name, (raw, origin) in layer.items():
            values[name] = parse_value(name, raw, origin)
            sources[name] = origin
    return values, sources


def load_config(args, environ):
    """Build the Config from CLI > env > YAML > defaults, then validate it."""
    cli, env = read_cli_layer(args), read_env_layer(environ)
    path = args.config or environ.get("UPLOADER_CONFIG") or None
    file_layer = read_yaml_layer(path) if path else {}
    values, sources = merge_layers(file_layer, env, cli)
    if "databricks_token" in cli:
        log.warning("--databricks-token is visible to other users in `ps`; "
                    "prefer the DATABRICKS_TOKEN environment variable")
    return validate_config(Config(**values, sources=sources))


def validate_config(config):
    """Check ranges and combinations; fill defaults that depend on other settings."""
    def bad(name, why):
        value = getattr(config, name)
        raise ConfigError(f"config: {name} {why} (got {value!r} from {config.origin(name)})")

    if config.interval <= 0:
        bad("interval", "must be > 0")
    if config.batch_size <= 0:
        bad("batch_size", "must be > 0")
    if config.busy_timeout < 0:
        bad("busy_timeout", "must be >= 0")
    updates = {}
    if config.databricks_host:
        updates["databricks_host"] = normalize_host(config.databricks_host)
        if config.delta_uri:
            raise ConfigError(
                f"config: both databricks_host (from {config.origin('databricks_host')}) "
                f"and delta_uri (from {config.origin('delta_uri')}) are set; "
                "the uploader writes to one destination: unset one of them")
    elif not config.delta_uri:
        updates["delta_uri"] = DEFAULT_DELTA_URI
    if not config.source_id:
        updates["source_id"] = socket.gethostname() or "unknown-host"
        updates["sources"] = {**config.sources, "source_id": "default (host name)"}
    for stage in ("sanitize", "filter", "aggregate"):
        if getattr(config, f"enable_{stage}"):
            raise ConfigError(
                f"config: enable_{stage} is set (from {config.origin('enable_' + stage)}) "
                "but processing stages are not available in this version; unset it")
    return dataclasses.replace(config, **updates)


def normalize_host(host):
    """Strip a scheme and trailing slashes: 'https://x.cloud.databricks.com/' -> host."""
    host = re.sub(r"^[a-z]+://", "", host.strip(), flags=re.I)
    return host.rstrip("/")


def format_config(config):
    """Render every setting as `name = value  (source)`, secrets redacted."""
    lines = []
    width = max(len(name) for name, _, _ in config_fields())
    for name, setting, _ in config_fields():
        value = getattr(config, name)
        if setting.secret:
            shown = "(set, redacted)" if value else "(not set)"
        elif setting.kind == "json" and value is not None:
            shown = json.dumps(value, sort_keys=True)
        else:
            shown = "(not set)" if value is None else str(value)
        lines.append(f"{name:<{width}} = {shown}  [{config.origin(name)}]")
    return "\n".join(lines)


# === Source (SQLite) =================================================================

@dataclasses.dataclass(frozen=True)
class SourceColumn:
    """One column of the source table, as SQLite declares it."""

    name: str
    decl_type: str
    notnull: bool
    pk: int


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Which columns order the rows and how they are compared.

    kind is 'rowid' (an AUTOINCREMENT key, or the rowid when there is no timestamp),
    'pair' (timestamp, then rowid or primary key) or 'key' (a WITHOUT ROWID table's
    primary key). `hidden` means the first selected value is the rowid, not a column.
    """

    kind: str
    columns: tuple
    hidden: bool = False

    def describe(self):
        """The cursor as people read it: `(timestamp, rowid)`."""
        return "(" + ", ".join(self.columns) + ")"


@dataclasses.dataclass(frozen=True)
class SourceTable:
    """What the uploader knows about the source table."""

    name: str
    columns: tuple
    timestamp_col: str | None
    cursor: Cursor
    autoincrement: bool
    without_rowid: bool

    @property
    def column_names(self):
        return [c.name for c in self.columns]


TIMESTAMP_NAMES = ("timestamp", "ts", "time", "datetime", "event_time", "created_at",
                   "created", "recorded_at", "inserted_at", "reading_time", "date")
TIMESTAMP_TYPES = ("DATETIME", "TIMESTAMP", "DATE")


def quote_ident(name):
    """Quote a SQLite identifier so any name, however hostile, stays one name."""
    return '"' + name.replace('"', '""') + '"'


def open_source(path, busy_timeout, origin="sqlite"):
    """Open the SQLite file read-only; a missing or non-SQLite file is an error."""
    if not os.path.exists(path):
        raise SourceError(f"source: SQLite file not found: {path} (from {origin})")
    if os.path.isdir(path):
        raise SourceError(f"source: {path} is a directory, not a SQLite file (from {origin})")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout,
                               isolation_level=None, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise SourceError(f"source: cannot open {path} as SQLite: {exc}") from None
    return conn


def list_tables(conn):
    """Names of the user tables in the database."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")
    return [name for (name,) in rows]


def choose_table(conn, wanted, path):
    """The configured table (checked to exist) or the only table in the file."""
    tables = list_tables(conn)
    if wanted:
        for name in tables:
            if name == wanted:
                return name
        for name in tables:
            if name.lower() == wanted.lower():
                return name
        raise SourceError(f"source: no table {wanted!r} in {path}; "
                          f"tables: {', '.join(tables) or '(none)'}")
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise SourceError(f"source: {path} has no tables yet; nothing to upload")
    raise SourceError(f"source: {path} has {len(tables)} tables ({', '.join(tables)}); "
                      "choose one with --table or SQLITE_TABLE_NAME")


def read_columns(conn, table):
    """The table's columns from PRAGMA table_info."""
    rows = conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall()
    return tuple(SourceColumn(name, (decl or "").strip(), bool(notnull), pk)
                 for _cid, name, decl, notnull, _default, pk in rows)


def read_table_sql(conn, table):
    """The CREATE TABLE statement of `table`."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (table,)).fetchone()
    return row[0] or "" if row else ""


def is_without_rowid(sql):
    """True for a WITHOUT ROWID table (options follow the closing parenthesis)."""
    tail = sql[sql.rfind(")") + 1:]
    return bool(re.search(r"\bWITHOUT\s+ROWID\b", tail, re.I))


def find_timestamp_column(columns, wanted, table):
    """The configured timestamp column, or one detected by name, then by type."""
    by_name = {c.name.lower(): c.name for c in columns}
    if wanted:
        if wanted.lower() not in by_name:
            raise SourceError(f"source: table {table!r} has no column {wanted!r}; "
                              f"columns: {', '.join(c.name for c in columns)}")
        return by_name[wanted.lower()]
    for candidate in TIMESTAMP_NAMES:
        if candidate in by_name:
            return by_name[candidate]
    for column in columns:
        if column.decl_type.upper() in TIMESTAMP_TYPES:
            return column.name
    return None


def rowid_alias(columns):
    """A name that reaches the rowid: rowid, _rowid_ or oid, whichever no column shadows."""
    taken = {c.name.lower() for c in columns}
    for alias in ("rowid", "_rowid_", "oid"):
        if alias not in taken:
            return alias
    return None


def choose_cursor(columns, ts, autoincrement, without_rowid, table):
    """Pick the cursor of DESIGN section 4 for this table."""
    pks = [c.name for c in sorted(columns, key=lambda c: c.pk) if c.pk]
    ipk = (pks[0] if len(pks) == 1 and not without_rowid and
           next(c for c in columns if c.name == pks[0]).decl_type.upper() == "INTEGER"
           else None)
    if without_rowid:
        return Cursor("pair", (ts, *pks)) if ts and ts not in pks else Cursor("key", tuple(pks))
    if autoincrement and ipk:
        return Cursor("rowid", (ipk,))
    tiebreak, hidden = ipk, False
    if tiebreak is None:
        tiebreak, hidden = rowid_alias(columns), True
        if tiebreak is None:
            raise SourceError(f"source: table {table!r} has columns named rowid, _rowid_ "
                              "and oid, so its rowid cannot be read; give it a primary key")
    if ts and ts != tiebreak:
        return Cursor("pair", (ts, tiebreak), hidden)
    return Cursor("rowid", (tiebreak,), hidden)


def describe_table(conn, wanted_table, wanted_ts, path):
    """Introspect the source table: columns, timestamp column, cursor."""
    table = choose_table(conn, wanted_table, path)
    columns = read_columns(conn, table)
    sql = read_table_sql(conn, table)
    without_rowid = is_without_rowid(sql)
    autoincrement = bool(re.search(r"\bAUTOINCREMENT\b", sql, re.I))
    ts = find_timestamp_column(columns, wanted_ts, table)
    cursor = choose_cursor(columns, ts, autoincrement, without_rowid, table)
    return SourceTable(table, columns, ts, cursor, autoincrement, without_rowid)


def key_sql(cursor):
    """SQL expressions of the cursor columns (a hidden rowid stays a bare keyword)."""
    last = len(cursor.columns) - 1
    return [c if cursor.hidden and i == last else quote_ident(c)
            for i, c in enumerate(cursor.columns)]


def cursor_condition(cursor, has_cursor, op=">"):
    """`(k1, k2) > (?, ?)` after a cursor; on a first run, only non-NULL timestamps."""
    keys = key_sql(cursor)
    if not has_cursor:
        return f"{keys[0]} IS NOT NULL" if cursor.kind == "pair" else "1"
    if len(keys) == 1:
        return f"{keys[0]} {op} ?"
    return f"({', '.join(keys)}) {op} ({', '.join('?' * len(keys))})"


def select_sql(source, has_cursor):
    """The batch query: rows after the cursor, in cursor order, LIMIT ?."""
    keys = key_sql(source.cursor)
    select = ([keys[-1]] if source.cursor.hidden else []) + [
        quote_ident(c) for c in source.column_names]
    return (f"SELECT {', '.join(select)} FROM {quote_ident(source.name)} "
            f"WHERE {cursor_condition(source.cursor, has_cursor)} "
            f"ORDER BY {', '.join(keys)} LIMIT ?")


def key_positions(source):
    """Index of each cursor column within a selected row."""
    cur = source.cursor
    offset = 1 if cur.hidden else 0
    names = source.column_names
    return [0 if (cur.hidden and c == cur.columns[-1]) else names.index(c) + offset
            for c in cur.columns]


@dataclasses.dataclass
class Batch:
    """Rows read in one read transaction, column-major, with the cursor after them."""

    columns: list
    values: list
    count: int
    cursor_end: list
    last_timestamp: object = None
    seq: int = 0
    batch_id: str = ""
    kinds: list = dataclasses.field(default_factory=list)
    rescued: int = 0
    payload: object = None


def read_batches(conn, source, cursor, batch_size):
    """Yield batches after `cursor` until a short batch says the table is drained."""
    positions = key_positions(source)
    ts_pos = source.column_names.index(source.timestamp_col) if source.timestamp_col else None
    offset = 1 if source.cursor.hidden else 0
    while True:
        sql = select_sql(source, cursor is not None)
        params = (list(cursor) if cursor is not None else []) + [batch_size]
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise SourceError(f"source: reading {source.name!r} failed: {exc}") from None
        if not rows:
            return
        last, count = rows[-1], len(rows)
        cursor = [last[p] for p in positions]
        values = list(zip(*rows))[offset:]
        rows = None  # the columns hold the values now; free the row tuples
        yield Batch(source.column_names, values, count, cursor,
                    last[ts_pos + offset] if ts_pos is not None else None)
        if count < batch_size:
            return


def count_pending(conn, source, cursor):
    """Rows after the cursor (one query, at the start of a cycle)."""
    sql = (f"SELECT count(*) FROM {quote_ident(source.name)} "
           f"WHERE {cursor_condition(source.cursor, cursor is not None)}")
    return conn.execute(sql, list(cursor or [])).fetchone()[0]


def check_not_behind(conn, source, cursor):
    """Fail when the source ends before the cursor: the file was replaced or truncated."""
    if cursor is None:
        return
    table = quote_ident(source.name)
    if source.cursor.kind == "rowid" and source.autoincrement:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?",
                           (source.name,)).fetchone()
        if (row[0] if row else 0) >= cursor[0]:
            return
        high = row[0] if row else "none"
    else:
        cond = cursor_condition(source.cursor, True, op=">=")
        if conn.execute(f"SELECT 1 FROM {table} WHERE {cond} LIMIT 1", cursor).fetchone():
            return
        if not conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
            return
        high = "lower"
    raise SourceError(
        f"source: table {source.name!r} ends before the saved cursor "
        f"{source.cursor.describe()} = {cursor} (highest: {high}): the file was replaced "
        "by an older copy or truncated; to upload it from the start, use --reset-state")


def count_null_timestamps(conn, source):
    """(count, min rowid, max rowid) of rows the pair cursor cannot order."""
    if source.cursor.kind != "pair":
        return 0, None, None
    ts = quote_ident(source.timestamp_col)
    tie = key_sql(source.cursor)[-1]
    return conn.execute(f"SELECT count(*), min({tie}), max({tie}) FROM "
                        f"{quote_ident(source.name)} WHERE {ts} IS NULL").fetchone()


def is_indexed(conn, table, column):
    """True when some index starts with `column`."""
    for row in conn.execute(f"PRAGMA index_list({quote_ident(table)})").fetchall():
        info = conn.execute(f"PRAGMA index_info({quote_ident(row[1])})").fetchall()
        if info and info[0][2] is not None and info[0][2].lower() == column.lower():
            return True
    return False


def preflight(conn, source):
    """One line per finding about the cursor, each with its fix."""
    cur, table = source.cursor, source.name
    lines = [f"cursor: {cur.kind} {cur.describe()} on table {table!r}"]
    if cur.kind == "rowid" and source.autoincrement:
        lines.append("cursor: AUTOINCREMENT key: exact, rows are never reused, "
                     "late rows are included")
        return lines
    if cur.kind == "rowid":
        lines.append("preflight: no AUTOINCREMENT and no timestamp column: if rows are "
                     "deleted, rowids can be reused and such rows missed; fix: declare "
                     "the key INTEGER PRIMARY KEY AUTOINCREMENT or name a --timestamp-col")
        return lines
    ts = source.timestamp_col
    if cur.kind == "pair":
        lines.append(f"preflight: rows inserted later with an older {ts!r} than the "
                     "cursor are missed; fix: INTEGER PRIMARY KEY AUTOINCREMENT on the table")
        column = next(c for c in source.columns if c.name == ts)
        if not column.notnull:
            lines.append(f"preflight: {ts!r} is nullable: rows with a NULL timestamp are "
                         "not uploaded and are reported each cycle; fix: NOT NULL")
    if ts and not is_indexed(conn, table, ts):
        index = quote_ident(f"idx_{table}_{ts}")
        lines.append(f"preflight: {ts!r} has no index, so each cycle scans the table; "
                     f"fix (on the writer's side): CREATE INDEX {index} ON "
                     f"{quote_ident(table)}({quote_ident(ts)})")
    return lines


# === Types (SQLite -> Delta) ========================================================

BIGINT, DOUBLE, STRING, BINARY, BOOLEAN, TIMESTAMP = (
    "BIGINT", "DOUBLE", "STRING", "BINARY", "BOOLEAN", "TIMESTAMP")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
ONE_MICROSECOND = dt.timedelta(microseconds=1)


def declared_kind(decl_type, is_timestamp):
    """The Delta type for a declared SQLite type, or None to follow the values."""
    decl = decl_type.upper()
    if is_timestamp or re.search(r"DATETIME|TIMESTAMP|^DATE$", decl):
        return TIMESTAMP
    if "BOOL" in decl:
        return BOOLEAN
    if "INT" in decl:
        return BIGINT
    if any(word in decl for word in ("CHAR", "CLOB", "TEXT", "STRING")):
        return STRING
    if "BLOB" in decl:
        return BINARY
    if any(word in decl for word in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL")):
        return DOUBLE
    return None


def infer_kind(values):
    """The Delta type of an untyped column, from its first non-NULL value."""
    for value in values:
        if value is None:
            continue
        if isinstance(value, int):
            return BIGINT
        if isinstance(value, float):
            return DOUBLE
        if isinstance(value, bytes):
            return BINARY
        return STRING
    return STRING


def resolve_kinds(source, batch, known):
    """Delta types of the batch's columns: the target's own, else declared, else seen."""
    kinds = []
    for column, values in zip(source.columns, batch.values):
        kind = known.get(column.name) or declared_kind(
            column.decl_type, column.name == source.timestamp_col) or infer_kind(values)
        known.setdefault(column.name, kind)
        kinds.append(kind)
    return kinds


def parse_timestamp(value):
    """Microseconds since the epoch (UTC) for a text or numeric timestamp, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            return parse_iso_timestamp(text)
    if isinstance(value, (int, float)):
        return epoch_to_micros(value)
    return None


def parse_iso_timestamp(text):
    """Microseconds for ISO-8601 text ('T' or space, with or without a zone; UTC if none)."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return (moment - EPOCH) // ONE_MICROSECOND


def epoch_to_micros(number):
    """Epoch seconds, milliseconds, microseconds or nanoseconds, told apart by size."""
    if not math.isfinite(number):
        return None
    size = abs(number)
    scale = 1e6 if size < 1e11 else 1e3 if size < 1e14 else 1 if size < 1e17 else 1e-3
    micros = int(round(number * scale))
    return micros if -62135596800 * 10**6 <= micros <= 253402300799 * 10**6 else None


def coerce_value(value, kind):
    """(typed value, fits) for one value; a value that does not fit is rescued."""
    if value is None:
        return None, True
    if kind == BIGINT:
        if isinstance(value, int):
            return value, True
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value), True
    elif kind == DOUBLE:
        if isinstance(value, (int, float)):
            return float(value), True
    elif kind == STRING:
        if isinstance(value, str):
            return value, True
    elif kind == BINARY:
        if isinstance(value, bytes):
            return value, True
    elif kind == BOOLEAN:
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value), True
    elif kind == TIMESTAMP:
        micros = parse_timestamp(value)
        if micros is not None:
            return micros, True
    return None, False


def jsonable(value):
    """A JSON-safe form of a raw SQLite value for `_rescued_data`."""
    if isinstance(value, bytes):
        return {"$binary": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def coerce_column(values, kind, name, rescued):
    """Typed values of one column; misfits become NULL and go into `rescued`."""
    out = []
    for i, value in enumerate(values):
        typed, fits = coerce_value(value, kind)
        if not fits:
            rescued.setdefault(i, {})[name] = jsonable(value)
        out.append(typed)
    return out


def rescued_json(rescued, count):
    """The `_rescued_data` column: one JSON object per row that had misfits."""
    return [json.dumps(rescued[i], ensure_ascii=False, sort_keys=True)
            if i in rescued else None for i in range(count)]


# === Routing =========================================================================

def strip_scenario_prefix(base):
    """'raw_readings' -> 'readings', so routing never doubles a prefix."""
    for prefix in SCENARIO_PREFIXES:
        if base.lower().startswith(prefix + "_") and len(base) > len(prefix) + 1:
            return base[len(prefix) + 1:]
    return base


def route_table(base, sanitize=False, filter=False, aggregate=False):
    """The target table: `<scenario>_<base>`, named by the most processed stage."""
    prefix = ("aggregated" if aggregate else "secure" if sanitize
              else "filtered" if filter else "raw")
    name = re.sub(r"\W", "_", strip_scenario_prefix(base.strip())).lower()
    return f"{prefix}_{name}"


def target_table(config, source):
    """The routed target table for this config and source table."""
    base = config.databricks_table or source.name
    return route_table(base, config.enable_sanitize, config.enable_filter,
                       config.enable_aggregate)


# === Sinks ===========================================================================

@dataclasses.dataclass(frozen=True)
class Identity:
    """Who writes: node, source table and state generation (one app per state)."""

    source_id: str
    source_table: str
    state_id: str

    @property
    def app_id(self):
        return f"{TOOL}/{self.source_id}/{self.source_table}/{self.state_id}"


@dataclasses.dataclass
class Receipt:
    """What a sink did with a batch."""

    rows: int
    skipped: bool = False


class Sink:
    """Where batches go. Implementations register in SINKS by name."""

    name = ""

    def __init__(self, config, identity):
        self.config, self.identity = config, identity

    @property
    def destination(self):
        """Stable id of the destination system: progress is kept per destination."""
        raise NotImplementedError

    def describe(self):
        """One line for logs: where rows go."""
        return self.destination

    def known_kinds(self, table):
        """{column: kind} of the target table's existing columns."""
        return {}

    def prepare(self, batch):
        """Encode the batch for this sink; runs in the read-ahead thread, no I/O."""
        return None

    def write(self, table, batch):
        """Append the batch, tagged with its batch id; skip it if already committed."""
        raise NotImplementedError

    def has_committed(self, table, seq, batch_id):
        """True when the batch is already in the target table."""
        raise NotImplementedError

    def close(self):
        """Release connections."""


SINKS = {}


def register_sink(cls):
    """Class decorator: make a sink selectable by its name."""
    SINKS[cls.name] = cls
    return cls


def make_sink(config, identity):
    """The sink chosen by the config."""
    return SINKS[config.target](config, identity)


def lineage_values(batch, identity, uploaded_micros, rescued):
    """Values of the lineage columns for every row of the batch."""
    n = batch.count
    return [[identity.source_id] * n, [batch.batch_id] * n, [uploaded_micros] * n,
            rescued_json(rescued, n)]


@register_sink
class DeltaSink(Sink):
    """Append to Delta tables under a path or object-store URI with deltalake."""

    name = "delta"
    RETRIES = 5

    def __init__(self, config, identity):
        super().__init__(config, identity)
        uri = config.delta_uri
        self.base = uri if "://" in uri else os.path.abspath(uri)
        self._tables = {}

    @property
    def destination(self):
        return "delta:" + self.base

    def table_uri(self, table):
        """Location of one table under the base URI."""
        if "://" in self.base:
            return self.base.rstrip("/") + "/" + table
        return os.path.join(self.base, table)

    def _open(self, table):
        """The table's DeltaTable, brought up to date; None if it does not exist yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        found = self._tables.get(table)
        if found is not None:
            found.update_incremental()
            return found
        try:
            found = self._tables[table] = DeltaTable(self.table_uri(table))
        except TableNotFoundError:
            return None
        return found

    def known_kinds(self, table):
        found = self._open(table)
        return delta_kinds(found.schema()) if found else {}

    def has_committed(self, table, seq, batch_id):
        found = self._open(table)
        version = found.transaction_version(self.identity.app_id) if found else None
        return version is not None and version >= seq

    def prepare(self, batch):
        return to_record_batch(batch, self.identity)

    def write(self, table, batch):
        for attempt in range(1, self.RETRIES + 1):
            try:
                if self.has_committed(table, batch.seq, batch.batch_id):
                    return Receipt(batch.count, skipped=True)
                self._append(table, batch)
                return Receipt(batch.count)
            except Exception as exc:  # deltalake raises several unrelated types
                if not is_transient_delta_error(exc) or attempt == self.RETRIES:
                    raise SinkError(f"sink: writing batch {batch.batch_id} to "
                                    f"{self.table_uri(table)} failed: {exc}") from exc
                log.warning("sink: write to %s failed (%s); retry %d", table, exc, attempt)
                time.sleep(min(2 ** attempt, 30) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _append(self, table, batch):
        from deltalake import CommitProperties, Transaction, write_deltalake
        marker = Transaction(self.identity.app_id, batch.seq)
        meta = {"uploader.source_id": self.identity.source_id,
                "uploader.batch_id": batch.batch_id,
                "uploader.cursor_end": json.dumps(encode_cursor(batch.cursor_end))}
        target = self._tables.get(table) or self.table_uri(table)
        write_deltalake(target, batch.payload, mode="append", schema_mode="merge",
                        commit_properties=CommitProperties(app_transactions=[marker],
                                                           custom_metadata=meta))


def is_transient_delta_error(exc):
    """Commit conflicts and storage hiccups are retried; schema errors are not."""
    text = f"{type(exc).__name__} {exc}".lower()
    if any(word in text for word in ("schema", "protocol", "permission", "invalid")):
        return False
    return any(word in text for word in ("commit", "conflict", "timeout", "timed out",
                                         "connection", "temporar", "throttl", "503",
                                         "version", "already exists", "io error"))


DELTA_TO_KIND = {"long": BIGINT, "integer": BIGINT, "short": BIGINT, "byte": BIGINT,
                 "double": DOUBLE, "float": DOUBLE, "string": STRING, "binary": BINARY,
                 "boolean": BOOLEAN, "timestamp": TIMESTAMP, "timestamp_ntz": TIMESTAMP}


def delta_kinds(schema):
    """{column: kind} from a deltalake Schema."""
    kinds = {}
    for field in schema.fields:
        kind = DELTA_TO_KIND.get(str(getattr(field.type, "type", "")))
        if kind:
            kinds[field.name] = kind
    return kinds


def arrow_type(kind):
    """The Arrow type that Delta stores for a kind."""
    from arro3.core import DataType
    return {BIGINT: DataType.int64(), DOUBLE: DataType.float64(),
            STRING: DataType.string(), BINARY: DataType.binary(),
            BOOLEAN: DataType.bool(), TIMESTAMP: DataType.timestamp("us", tz="UTC")}[kind]


def to_arrow_array(values, kind, name, rescued):
    """One Arrow column: fast path through Arrow, per-value fallback for misfits."""
    from arro3.core import Array, DataType
    if kind == TIMESTAMP:
        try:
            text = Array(values, DataType.string())
            stamps = text.cast(arrow_type(TIMESTAMP))
            if stamps.null_count == text.null_count:
                return stamps
        except (TypeError, ValueError, OverflowError):
            pass
        micros = coerce_column(values, TIMESTAMP, name, rescued)
        return Array(micros, DataType.int64()).cast(arrow_type(TIMESTAMP))
    if kind != BOOLEAN:
        try:
            return Array(values, arrow_type(kind))
        except (TypeError, ValueError, OverflowError):
            pass
    return Array(coerce_column(values, kind, name, rescued), arrow_type(kind))


def to_record_batch(batch, identity):
    """The batch as an Arrow RecordBatch with typed columns and lineage columns."""
    from arro3.core import Array, DataType, Field, RecordBatch, Schema
    rescued = {}
    arrays = [to_arrow_array(values, kind, name, rescued)
              for name, kind, values in zip(batch.columns, batch.kinds, batch.values)]
    now = (dt.datetime.now(dt.timezone.utc) - EPOCH) // ONE_MICROSECOND
    source_id, batch_id, uploaded, rescue = lineage_values(batch, identity, now, rescued)
    arrays += [Array(source_id, DataType.string()), Array(batch_id, DataType.string()),
               Array(uploaded, DataType.int64()).cast(arrow_type(TIMESTAMP)),
               Array(rescue, DataType.string())]
    batch.rescued = len(rescued)
    names = list(batch.columns) + list(LINEAGE_COLUMNS)
    schema = Schema([Field(n, a.type, nullable=True) for n, a in zip(names, arrays)])
    return RecordBatch(arrays, schema=schema)


@register_sink
class DatabricksSink(Sink):
    """Append to Unity Catalog tables through a Databricks SQL warehouse."""

    name = "databricks"

    def __init__(self, config, identity):
        super().__init__(config, identity)
        raise ConfigError("config: the Databricks SQL warehouse sink is not available in "
                          "this version; unset databricks_host (from "
                          f"{config.origin('databricks_host')}) to use the Delta sink")


# === Checkpoint ======================================================================

def encode_cursor(values):
    """Cursor values as JSON: text stays text, numbers stay numbers, bytes tagged."""
    if values is None:
        return None
    return [{"$hex": v.hex()} if isinstance(v, bytes) else v for v in values]


def decode_cursor(values):
    """Inverse of encode_cursor."""
    if values is None:
        return None
    return [bytes.fromhex(v["$hex"]) if isinstance(v, dict) else v for v in values]


def utc_now_text():
    """The current time as ISO-8601 UTC with a Z."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def resolve_state_dir(config):
    """The configured state dir, or the local fallback when the default is not usable."""
    wanted = config.state_dir
    if is_usable_dir(wanted):
        return wanted
    if config.origin("state_dir") != "default":
        raise StateError(f"state: cannot write to {wanted} (from "
                         f"{config.origin('state_dir')}): missing or not writable")
    log.warning("state: %s is not writable; keeping state in %s (set STATE_DIR to choose)",
                wanted, os.path.abspath(FALLBACK_STATE_DIR))
    if not is_usable_dir(FALLBACK_STATE_DIR):
        raise StateError(f"state: cannot create {os.path.abspath(FALLBACK_STATE_DIR)}")
    return FALLBACK_STATE_DIR


def is_usable_dir(path):
    """Create `path` if needed; True when a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


class Checkpoint:
    """Owns last_upload.json: the cursor per destination and the in-flight batch."""

    def __init__(self, state_dir):
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.data = None
        self._lock = None

    def lock(self):
        """Take the state lock, or fail naming the process that holds it."""
        lock_path = self.path + ".lock"
        fh = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise LockedError(f"state: another uploader (pid {holder}) is using "
                              f"{os.path.abspath(self.dir)}; one uploader per state "
                              "directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def load(self, source_desc, reset=False):
        """Read the state (missing means first run); foreign state is an error."""
        if reset and os.path.exists(self.path):
            backup = f"{self.path}.reset-{int(time.time())}"
            os.replace(self.path, backup)
            log.warning("state: --reset-state: previous state kept as %s", backup)
        if not os.path.exists(self.path):
            self.data = new_state(source_desc)
            return self
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            check_state_shape(data)
        except (OSError, ValueError) as exc:
            raise StateError(f"state: cannot read {self.path}: {exc}; fix or move it, or "
                             "use --reset-state to upload from the start") from None
        check_state_source(data, source_desc, self.path)
        self.data = data
        return self

    def position(self, destination):
        """The progress record of one destination (created empty on first use)."""
        return self.data["destinations"].setdefault(destination, {
            "cursor": None, "last_upload": None, "rows": 0, "seq": 0,
            "inflight": None, "updated_at": None})

    def begin(self, destination, batch, table):
        """Record the batch as in flight before it is sent."""
        self.position(destination)["inflight"] = {
            "batch_id": batch.batch_id, "seq": batch.seq, "table": table,
            "rows": batch.count, "cursor_end": encode_cursor(batch.cursor_end),
            "last_upload": batch.last_timestamp}
        self.save()

    def commit(self, destination):
        """The in-flight batch is in the target: advance the cursor past it."""
        pos = self.position(destination)
        flight = pos["inflight"]
        pos.update(cursor=flight["cursor_end"], seq=flight["seq"], inflight=None,
                   rows=pos["rows"] + flight["rows"], table=flight["table"],
                   updated_at=utc_now_text())
        if flight.get("last_upload") is not None:
            pos["last_upload"] = flight["last_upload"]
        self.save()

    def abandon(self, destination):
        """The in-flight batch never reached the target: it will be read again."""
        self.position(destination)["inflight"] = None
        self.save()

    def save(self):
        """Write atomically: temp file, fsync, rename, fsync the directory."""
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(f"state: cannot write {self.path}: {exc.strerror}") from None

    def close(self):
        """Release the lock."""
        if self._lock:
            self._lock.close()
            self._lock = None


def new_state(source_desc):
    """An empty state for this source, with a fresh state id."""
    return {"version": STATE_VERSION, "tool": TOOL, "state_id": uuid.uuid4().hex[:12],
            "created_at": utc_now_text(), "source": source_desc, "destinations": {}}


def check_state_shape(data):
    """Raise ValueError unless `data` looks like our state file."""
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        raise ValueError("not a state file of this tool")
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    if not isinstance(data.get("destinations"), dict) or not data.get("state_id"):
        raise ValueError("state file is incomplete")


def check_state_source(data, source_desc, path):
    """The state must belong to this source file, table and cursor."""
    old = data.get("source", {})
    for key in ("path", "table", "cursor"):
        if old.get(key) != source_desc[key]:
            raise StateError(
                f"state: {path} belongs to {key} {old.get(key)!r}, not "
                f"{source_desc[key]!r}; use one STATE_DIR per source, or --reset-state "
                "to upload this source from the start")


def source_description(path, source):
    """What identifies the source in the state file."""
    return {"path": os.path.realpath(path), "table": source.name,
            "cursor": {"kind": source.cursor.kind, "columns": list(source.cursor.columns)}}


# === Cycle ===========================================================================

@dataclasses.dataclass
class Job:
    """Everything a cycle needs, opened once at start."""

    config: Config
    conn: sqlite3.Connection
    source: SourceTable
    checkpoint: Checkpoint
    sink: Sink
    table: str
    stop: threading.Event
    kinds: dict = dataclasses.field(default_factory=dict)


def prefetch(iterable, stop):
    """Yield items of `iterable` while a thread produces the next one."""
    slot, done = queue.Queue(maxsize=1), object()
    halt = threading.Event()

    def put(item):
        while not halt.is_set():
            try:
                slot.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while not stop.is_set():
            item = slot.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        halt.set()
        worker.join()


def settle_inflight(job):
    """After a crash, ask the target whether the in-flight batch landed."""
    dest = job.sink.destination
    flight = job.checkpoint.position(dest)["inflight"]
    if not flight:
        return
    if job.sink.has_committed(flight["table"], flight["seq"], flight["batch_id"]):
        job.checkpoint.commit(dest)
        log.info("checkpoint: in-flight batch %s is in %s; cursor advanced",
                 flight["batch_id"], flight["table"])
    else:
        job.checkpoint.abandon(dest)
        log.info("checkpoint: in-flight batch %s did not reach %s; it will be sent again",
                 flight["batch_id"], flight["table"])


def prepare_batches(job, batches, first_seq):
    """Number, type and encode each batch for the sink (in the read-ahead thread)."""
    state_id = job.checkpoint.data["state_id"]
    for seq, batch in enumerate(batches, start=first_seq):
        batch.seq, batch.batch_id = seq, f"{state_id}-{seq}"
        batch.kinds = resolve_kinds(job.source, batch, job.kinds)
        batch.payload = job.sink.prepare(batch)
        if batch.payload is not None:
            batch.values = None  # encoded: let the Python objects go
        yield batch


def write_batch(job, batch):
    """In-flight record -> write to the sink -> advance the checkpoint."""
    dest = job.sink.destination
    if batch.seq != job.checkpoint.position(dest)["seq"] + 1:
        raise AssertionError(f"batch {batch.seq} out of order")
    job.checkpoint.begin(dest, batch, job.table)
    receipt = job.sink.write(job.table, batch)
    job.checkpoint.commit(dest)
    return receipt


def run_cycle(job):
    """Upload every row after the cursor, batch by batch; return rows uploaded."""
    conn, source, dest = job.conn, job.source, job.sink.destination
    pos = job.checkpoint.position(dest)
    cursor = decode_cursor(pos["cursor"])
    check_not_behind(conn, source, cursor)
    report_null_timestamps(conn, source)
    pending = count_pending(conn, source, cursor)
    started, done = time.monotonic(), 0
    if not job.kinds:
        job.kinds.update(job.sink.known_kinds(job.table))
    batches = read_batches(conn, source, cursor, job.config.batch_size)
    mark = started
    for batch in prefetch(prepare_batches(job, batches, pos["seq"] + 1), job.stop):
        receipt = write_batch(job, batch)
        done += batch.count
        took, mark = max(time.monotonic() - mark, 1e-9), time.monotonic()
        log.info("batch %s: %d rows -> %s in %.2f s (%d rows/s)%s%s, pending %d",
                 batch.batch_id, batch.count, job.table, took, batch.count / took,
                 ", already there" if receipt.skipped else "",
                 f", {batch.rescued} rows with rescued values" if batch.rescued else "",
                 max(pending - done, 0))
    elapsed = time.monotonic() - started
    log.info("cycle: %d rows uploaded to %s in %.2f s%s", done, job.table, elapsed,
             " (stopping)" if job.stop.is_set() else "")
    return done


def report_null_timestamps(conn, source):
    """Warn about rows the pair cursor cannot order because their timestamp is NULL."""
    count, low, high = count_null_timestamps(conn, source)
    if count:
        log.warning("source: %d rows have a NULL %r (rowid %s..%s) and are not uploaded",
                    count, source.timestamp_col, low, high)


def run_forever(job, sleep_backoff=None):
    """Cycle every interval until stopped; with --once, one cycle and its exit code."""
    failures = 0
    while not job.stop.is_set():
        try:
            run_cycle(job)
            failures = 0
        except (SinkError, SourceError, StateError) as exc:
            if job.config.once:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_FAILED
            failures += 1
            delay = min(job.config.interval, 5 * 2 ** min(failures, 10))
            delay *= random.uniform(0.8, 1.2)
            log.error("%s; retrying in %.0f s", exc, delay)
            job.stop.wait(delay)
            continue
        if job.config.once:
            break
        job.stop.wait(job.config.interval)
    return EXIT_OK


def open_job(config, reset_state, stop):
    """Open source, checkpoint and sink; settle any in-flight batch."""
    conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
    source = describe_table(conn, config.sqlite_table_name, config.timestamp_col,
                            config.sqlite)
    checkpoint = Checkpoint(resolve_state_dir(config))
    checkpoint.lock()
    checkpoint.load(source_description(config.sqlite, source), reset=reset_state)
    identity = Identity(config.source_id, source.name, checkpoint.data["state_id"])
    sink = make_sink(config, identity)
    job = Job(config, conn, source, checkpoint, sink, target_table(config, source), stop)
    for line in preflight(conn, source):
        log.info(line)
    log.info("target: %s table %s (node %s)", sink.describe(), job.table, config.source_id)
    if config.target == "delta" and config.origin("delta_uri") == "default":
        log.info("target: no Databricks workspace configured; writing to the local "
                 "Delta lakehouse %s", os.path.abspath(config.delta_uri))
    settle_inflight(job)
    return job


def close_job(job):
    """Close what open_job opened."""
    job.sink.close()
    job.checkpoint.close()
    job.conn.close()


# === Demo and queries ================================================================

DEMO_DIR = "demo"
DEMO_SENSORS = 20
DEMO_SCHEMA = """CREATE TABLE IF NOT EXISTS sensor_readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    sensor_id TEXT NOT NULL,
    temperature REAL, humidity REAL, pressure REAL, vibration REAL, voltage REAL,
    status_code INTEGER, anomaly_flag INTEGER, anomaly_type TEXT,
    firmware_version TEXT, model TEXT, manufacturer TEXT, serial_number TEXT,
    location TEXT, latitude REAL, longitude REAL, original_timezone TEXT,
    synced INTEGER DEFAULT 0, deployment_type TEXT)"""
DEMO_COLUMNS = ("timestamp", "sensor_id", "temperature", "humidity", "pressure",
                "vibration", "voltage", "status_code", "anomaly_flag", "anomaly_type",
                "firmware_version", "model", "manufacturer", "serial_number", "location",
                "latitude", "longitude", "original_timezone", "synced", "deployment_type")
DEMO_CITIES = (("Lisbon", 38.72, -9.14), ("Austin", 30.27, -97.74),
               ("Osaka", 34.69, 135.50), ("Nairobi", -1.29, 36.82))


def sensor_rows(start, seconds, sensors=DEMO_SENSORS, seed=0):
    """Readings of the Bacalhau sensor schema: one per sensor per second."""
    rng = random.Random(seed)
    for second in range(seconds):
        stamp = (start + dt.timedelta(seconds=second)).isoformat(timespec="milliseconds")
        for s in range(sensors):
            city, lat, lon = DEMO_CITIES[s % len(DEMO_CITIES)]
            anomaly = rng.random() < 0.01
            yield (stamp, f"SENSOR_{s:03d}", round(rng.gauss(22, 2), 3),
                   round(rng.gauss(45, 5), 3), round(rng.gauss(1013, 3), 3),
                   round(abs(rng.gauss(0.2, 0.1)), 4), round(rng.gauss(12, 0.2), 3),
                   1 if anomaly else 0, int(anomaly), "spike" if anomaly else None,
                   "1.4.0" if s % 3 else "2.0.0-beta", "EnvMonitor-3000",
                   "SensorTech" if s % 2 else "DataSense", f"SN-{s:06d}", city,
                   round(lat + s * 0.001, 6), round(lon - s * 0.001, 6), "+00:00", 0,
                   "edge")


def make_sensor_db(path, seconds, sensors=DEMO_SENSORS):
    """Create (or extend) a sensor database; new readings follow the last one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(DEMO_SCHEMA)
        conn.execute("CREATE INDEX IF NOT EXISTS idx_timestamp ON sensor_readings(timestamp)")
        (last, count) = conn.execute("SELECT max(timestamp), count(*) FROM "
                                     "sensor_readings").fetchone()
        start = (dt.datetime.fromisoformat(last) + dt.timedelta(seconds=1) if last else
                 dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
                 - dt.timedelta(seconds=seconds))
        marks = ", ".join("?" * len(DEMO_COLUMNS))
        with conn:
            conn.executemany(f"INSERT INTO sensor_readings ({', '.join(DEMO_COLUMNS)}) "
                             f"VALUES ({marks})",
                             sensor_rows(start, seconds, sensors, seed=count))
    finally:
        conn.close()
    return seconds * sensors


def list_delta_tables(base):
    """Names of the Delta tables directly under a local base directory."""
    if "://" in base or not os.path.isdir(base):
        return []
    return sorted(name for name in os.listdir(base)
                  if os.path.isdir(os.path.join(base, name, "_delta_log")))


def run_query(base, sql):
    """Run SQL over the Delta tables under `base`; return (column names, rows)."""
    from deltalake import DeltaTable, QueryBuilder
    builder = QueryBuilder()
    for name in list_delta_tables(base):
        builder.register(name, DeltaTable(os.path.join(base, name)))
    try:
        reader = builder.execute(sql)
        batches = list(reader)
    except Exception as exc:  # DataFusion reports SQL errors with its own types
        raise ConfigError(f"query: {str(exc).splitlines()[0]}") from None
    names = [f.name for f in reader.schema]
    rows = [row for b in batches for row in zip(*(c.to_pylist() for c in b.columns))]
    return names, rows


def format_rows(names, rows):
    """A plain text table."""
    cells = [[str(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths)] + body)


def demo_summary(config, job):
    """What the demo wrote, where, and how to look at it."""
    base = os.path.abspath(config.delta_uri)
    lines = ["", f"demo: source  {os.path.abspath(config.sqlite)}",
             f"demo: target  {base}"]
    for name in list_delta_tables(base):
        _, rows = run_query(base, f'SELECT count(*) FROM "{name}"')
        lines.append(f"demo: table   {name}: {rows[0][0]:,} rows")
    script = os.path.basename(sys.argv[0]) or "sqlite_to_databricks_uploader.py"
    lines += ["demo: look at the result with:",
              f"  uv run {script} --delta-uri {config.delta_uri} --run-query "
              f"\"SELECT sensor_id, count(*) AS readings, avg(temperature) AS avg_temp "
              f"FROM {job.table} GROUP BY sensor_id ORDER BY sensor_id LIMIT 5\"",
              "demo: run --demo again to add 10 more minutes of readings and upload "
              "only those"]
    return "\n".join(lines)


# === CLI =============================================================================

class Formatter(logging.Formatter):
    """Text or JSON log lines, UTC times, secrets replaced."""

    def __init__(self, json_lines, secrets):
        super().__init__()
        self.json_lines, self.secrets = json_lines, [s for s in secrets if s]

    def format(self, record):
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, "[REDACTED]")
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.json_lines:
            return json.dumps({"time": stamp, "level": record.levelname,
                               "message": message}, ensure_ascii=False)
        return f"{stamp} {record.levelname:<7} {message}"


def setup_logging(level="INFO", json_lines=False, secrets=()):
    """Log to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(json_lines, secrets))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


GROUP_TITLES = {"source": "source (SQLite)", "state": "state", "loop": "schedule",
                "target": "target", "databricks": "Databricks SQL warehouse",
                "processing": "processing", "logging": "logging"}


def build_parser():
    """The argument parser: every setting's flag, with its env var in the help."""
    parser = argparse.ArgumentParser(
        prog="sqlite_to_databricks_uploader.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_argument_group("actions")
    actions.add_argument("--config", metavar="FILE",
                         help="YAML file of settings [env UPLOADER_CONFIG]")
    actions.add_argument("--print-config", action="store_true",
                         help="print each setting, its value and its source; exit")
    actions.add_argument("--reset-state", action="store_true",
                         help="forget the saved cursor and upload from the start")
    actions.add_argument("--demo", action="store_true",
                         help="make sample sensor data in ./demo and upload it once")
    actions.add_argument("--run-query", metavar="SQL",
                         help="run SQL over the tables under the Delta URI; print; exit")
    actions.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = {}
    for name, setting, default in config_fields():
        title = GROUP_TITLES[setting.group]
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        env = " or ".join(setting.env)
        extra = f" (default {default})" if default not in (None, False) else ""
        if setting.kind == "bool":
            group.add_argument(setting.flag, dest=name, action="store_const", const="true",
                               help=f"{setting.help}{extra} [env {env}]")
        else:
            group.add_argument(setting.flag, dest=name, metavar=name.upper().split("_")[-1],
                               help=f"{setting.help}{extra} [env {env}]")
    return parser


def main(argv=None, environ=None):
    """Run the uploader; return the exit code."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.demo:
            apply_demo_defaults(args, environ)
        config = load_config(args, environ)
        setup_logging(config.log_level, config.log_format == "json",
                      [config.databricks_token])
        if args.print_config:
            print(format_config(config))
            return EXIT_OK
        if args.run_query:
            names, rows = run_query(os.path.abspath(config.delta_uri), args.run_query)
            print(format_rows(names, rows))
            return EXIT_OK
        return run_job(config, args)
    except UploaderError as exc:
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def apply_demo_defaults(args, environ):
    """--demo: sample database in ./demo, state beside it, one cycle."""
    if args.sqlite is not None:
        raise ConfigError("config: --demo makes its own database in ./demo; drop --sqlite")
    args.sqlite = os.path.join(DEMO_DIR, "sensor_data.db")
    if args.state_dir is None and not environ.get("STATE_DIR"):
        args.state_dir = os.path.join(DEMO_DIR, "state")
    args.once = "true"
    fresh = not os.path.exists(args.sqlite)
    rows = make_sensor_db(args.sqlite, 3600 if fresh else 600)
    log.info("demo: %s %d sensor readings in %s", "wrote" if fresh else "added", rows,
             args.sqlite)


def run_job(config, args):
    """Open the job, run it until done or stopped, close it."""
    if not config.sqlite:
        raise ConfigError("config: no SQLite file: set --sqlite, SQLITE_PATH or "
                          "'sqlite' in the YAML file (or try --demo)")
    stop = threading.Event()
    install_signal_handlers(stop)
    job = open_job(config, args.reset_state, stop)
    try:
        code = run_forever(job)
        if args.demo:
            print(demo_summary(config, job))
        return code
    finally:
        close_job(job)


def install_signal_handlers(stop):
    """SIGTERM/SIGINT finish the current batch and exit 0; a second one exits now."""
    def handle(signum, frame):
        if stop.is_set():
            raise SystemExit(EXIT_OK)
        log.info("signal %s: finishing the current batch, then exiting",
                 signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


if __name__ == "__main__":
    sys.exit(main())
