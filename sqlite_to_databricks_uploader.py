#!/usr/bin/env -S uv run --script
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "databricks-sdk>=0.50",
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
import bisect
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import functools
import fnmatch
import gc
import glob
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import select
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

TARGETS = ("delta", "databricks", "zerobus", "landing")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

STATE_FILE = "last_upload.json"
STATE_VERSION = 2  # 2: a position per target table (1: per destination)
MANY_STATE_VERSION = 3  # 3: many sources: a position per (target table, file, table)
DEFAULT_STATE_DIR = "/state"  # a mounted volume; never created by the tool
FALLBACK_STATE_DIR = "./state"
DEFAULT_DELTA_URI = "./lakehouse"
AUTO_VOLUME = "uploader_staging"  # the staging volume databricks_volume=auto creates
SCENARIO_PREFIXES = ("raw", "filtered", "secure", "aggregated")
LINEAGE_COLUMNS = ("_source_id", "_batch_id", "_uploaded_at", "_rescued_data",
                   "_source_file")

log = logging.getLogger("uploader")
REAL_SLEEP = time.sleep
JEMALLOC_SETTING = ("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")


# === Errors ==========================================================================

# Secret values redact() replaces: the secret settings, the environment's secrets and the
# tokens the process obtains as it runs (a Zerobus table token, an OAuth token from
# databricks-sdk). Shorter values are left alone: they occur by chance in any message, and
# no real credential is that short.
SECRETS = set()
MIN_SECRET = 6
REDACTED = "[REDACTED]"
# Secrets in shapes that need not be known first: a URL's user:password@ (a
# DATABRICKS_HOST, an AWS_ENDPOINT_URL; deltalake's errors carry the URL), an
# Authorization value a service echoes, credentials in a query string (a presigned S3
# URL, an Azure SAS), a form or a JSON reply, a personal access token.
SECRET_SHAPES = (
    (re.compile(r"[^\s/@:'\"<>()\[\]]+:[^\s/@'\"<>()\[\]]*@(?=[\w\[])"), REDACTED + "@"),
    (re.compile(r"\b(Bearer|Basic)\s+[\w.~+/=-]{6,}", re.I), r"\1 " + REDACTED),
    (re.compile(r"\b(sig|signature|x-amz-signature|x-amz-security-token|access_token|"
                r"refresh_token|id_token|client_secret|password|token)=[^&\s'\"<>]+", re.I),
     r"\1=" + REDACTED),
    (re.compile(r'"(access_token|refresh_token|id_token|client_secret|password|token)"'
                r'\s*:\s*"[^"]*"', re.I), r'"\1": "' + REDACTED + '"'),
    (re.compile(r"\bdapi[0-9a-f]{32}(-\d+)?\b"), REDACTED))


def remember_secret(*values):
    """Have redact() replace these values from now on (a token as it is obtained)."""
    for value in values:
        value = value.strip() if isinstance(value, str) else ""
        if len(value) >= MIN_SECRET:
            SECRETS.update({value, urllib.parse.quote(value, safe="")})


def redact(text):
    """`text` with each secret in it replaced by [REDACTED]: the values remembered
    (longest first: a secret that holds another goes whole) and SECRET_SHAPES. Every
    error message and log line goes through it."""
    for secret in sorted(SECRETS, key=len, reverse=True):  # a copy: threads add tokens
        text = text.replace(secret, REDACTED)
    for shape, replacement in SECRET_SHAPES:
        text = shape.sub(replacement, text)
    return text


class UploaderError(Exception):
    """An expected failure, reported as one line; `exit_code` says how to exit.
    Its text is redacted wherever it goes: stderr, logs, the state and status files."""

    exit_code = EXIT_FAILED

    def __str__(self):
        return redact(" ".join(super().__str__().split()))  # one line, whatever the cause said


class ConfigError(UploaderError):
    """A setting is missing or invalid."""

    exit_code = EXIT_BAD_INPUT


class SourceError(UploaderError):
    """The SQLite source cannot be read as configured."""

    exit_code = EXIT_BAD_INPUT


class SourceBusyError(SourceError):
    """The source stayed locked, or kept a hot journal, for BUSY_TIMEOUT: transient."""

    exit_code = EXIT_FAILED


class SourceReplacedError(SourceError):
    """Another file took the source's name, and its rows up to the cursor are not the
    rows uploaded: going on from the cursor would skip them."""

    exit_code = EXIT_FAILED


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
    sqlite_table_name: str | tuple | None = option(
        None, "--table", "SQLITE_TABLE_NAME", "tables",
        "source table; give --table more than once for several (default: the only "
        "table in the file)", "source")
    timestamp_col: str | None = option(
        None, "--timestamp-col", "TIMESTAMP_COL", "str",
        "timestamp column (default: detected by name or declared type)", "source")
    timestamp_format: str | None = option(
        None, "--timestamp-format", "TIMESTAMP_FORMAT", "str",
        "strptime layout of a text timestamp column, such as '%%d/%%m/%%Y %%H:%%M' "
        "(default: detected from a sample of rows)", "source")
    cursor: str = option(
        "auto", "--cursor", "CURSOR", "choice",
        "what orders the rows: timestamp (with the rowid), rowid, or auto (the "
        "timestamp when its values sort as time)", "source",
        choices=("auto", "rowid", "timestamp"))
    batch_size: int = option(
        50_000, "--batch-size", "BATCH_SIZE", "int",
        "rows per batch; each batch is one commit and one checkpoint", "source")
    sources: tuple = option(
        (), "--sources", "SOURCES", "sources",
        "several sources: a list (JSON; native in YAML) of {sqlite: path or "
        "glob, tables: [names] or all, and per-table timestamp_col, cursor, "
        "databricks_table and processing settings}", "source")
    forget_after: float = option(
        86400.0, "--forget-after", "FORGET_AFTER", "float",
        "seconds a file matched by a glob in sources may be gone before its position is "
        "forgotten", "source")
    busy_timeout: float = option(
        30.0, "--busy-timeout", "BUSY_TIMEOUT", "float",
        "seconds to wait for a SQLite lock held by the writer", "source")
    cursor_lag: float = option(
        0.0, "--cursor-lag", "CURSOR_LAG", "float",
        "seconds: with a (timestamp, rowid) cursor, leave rows newer than now minus this "
        "for a later cycle, so rows committed late within it are not passed", "source")
    start_at: str = option(
        "beginning", "--start-at", "START_AT", "choice",
        "where a target table used for the first time starts: the beginning of the "
        "source (its history is uploaded) or now (only rows added from now on)", "source",
        choices=("beginning", "now"))
    state_dir: str = option(
        DEFAULT_STATE_DIR, "--state-dir", "STATE_DIR", "path",
        "directory of last_upload.json (default: /state when mounted and writable, "
        "else ./state)",
        "state")
    interval: float = option(
        300.0, "--interval", "UPLOAD_INTERVAL", "float",
        "seconds between cycles in loop mode", "loop")
    once: bool = option(
        False, "--once", "ONCE", "bool", "run one cycle and exit", "loop")
    jitter: bool = option(
        True, "--jitter", "JITTER", "bool",
        "in loop mode, wait a random part of the interval before the first cycle, so a "
        "fleet started together does not commit together (JITTER=false: no wait)", "loop")
    target: str | None = option(
        None, "--target", "TARGET", "choice",
        "where rows go: delta (a Delta table at delta_uri), databricks (the SQL "
        "warehouse), zerobus (Zerobus Ingest) or landing (files in a Unity Catalog "
        "volume); default: databricks when a workspace is configured, else delta",
        "target", choices=TARGETS)
    source_id: str | None = option(
        None, "--source-id", "SOURCE_ID", "str",
        "this node's identity in lineage columns (default: the host name)", "target")
    delta_uri: str | None = option(
        None, "--delta-uri", "DELTA_URI", "str",
        "Delta location: a directory, s3://, abfss:// or gs:// URI "
        "(default ./lakehouse when no workspace is configured)", "target")
    maintain_every: str | None = option(
        None, "--maintain-every", "MAINTAIN_EVERY", "str",
        "Delta: run table upkeep (as --maintain) after every N cycles (e.g. 12) or once "
        "per duration (e.g. 6h); set it on one node of a fleet", "target")
    write_checkpoints: bool = option(
        True, "--write-checkpoints", "WRITE_CHECKPOINTS", "bool",
        "Delta: write a log checkpoint every 100th commit (WRITE_CHECKPOINTS=false on "
        "edge nodes leaves it to --maintain)", "target")
    retention_hours: float = option(
        168.0, "--retention-hours", "RETENTION_HOURS", "float",
        "Delta: --maintain deletes unreferenced files older than this (at least 1)",
        "target")
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
    databricks_client_id: str | None = option(
        None, "--databricks-client-id", "DATABRICKS_CLIENT_ID", "str",
        "service principal id for OAuth machine-to-machine (instead of a token)",
        "databricks")
    databricks_client_secret: str | None = option(
        None, "--databricks-client-secret", "DATABRICKS_CLIENT_SECRET", "str",
        "service principal OAuth secret (prefer the env var)", "databricks", secret=True)
    databricks_config_profile: str | None = option(
        None, "--databricks-config-profile", "DATABRICKS_CONFIG_PROFILE", "str",
        "profile in ~/.databrickscfg to authenticate with (as written by `databricks auth "
        "login`), instead of a token or client credentials", "databricks")
    databricks_volume: str = option(
        "auto", "--databricks-volume", "DATABRICKS_VOLUME", "str",
        "Unity Catalog volume (/Volumes/catalog/schema/volume) for staging batches as "
        f"Parquet and loading them with COPY INTO; 'auto' creates <catalog>.<schema>."
        f"{AUTO_VOLUME} once (inline statements if the principal may not), 'none' sends "
        "inline statements only", "databricks")
    max_statement_bytes: int = option(
        1_048_576, "--max-statement-bytes", "MAX_STATEMENT_BYTES", "int",
        "largest SQL statement sent to the warehouse, in bytes", "databricks")
    startup_timeout: float = option(
        600.0, "--startup-timeout", "STARTUP_TIMEOUT", "float",
        "seconds to wait for a warehouse that is starting (503) before a cycle fails",
        "databricks")
    zerobus_endpoint: str | None = option(
        None, "--zerobus-endpoint", "ZEROBUS_ENDPOINT", "str",
        "Zerobus Ingest endpoint of the workspace (<workspace-id>.zerobus.<region>."
        "cloud.databricks.com, or a full https:// URL); for target zerobus", "zerobus")
    zerobus_workspace_id: str | None = option(
        None, "--zerobus-workspace-id", "ZEROBUS_WORKSPACE_ID", "str",
        "workspace id the Zerobus token is asked for (default: the first label of the "
        "endpoint's host name)", "zerobus")
    zerobus_max_request_bytes: int = option(
        4_194_304, "--zerobus-max-request-bytes", "ZEROBUS_MAX_REQUEST_BYTES", "int",
        "largest Zerobus Ingest request body, in bytes (a batch goes as several requests)",
        "zerobus")
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
    origins: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def origin(self, name):
        """Where the value of `name` came from: a flag, an env var, a file, default."""
        return self.origins.get(name, "default")


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
    if setting.kind == "sources":
        return parse_sources(raw, origin)
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
    if isinstance(raw, float):
        return int(raw)
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


def _parse_tables(raw, setting):
    """One table name, or several (--table given more than once, a YAML list)."""
    names = raw if isinstance(raw, (list, tuple)) else [raw]
    if not names:
        raise ValueError("must name a table")
    names = tuple(dict.fromkeys(_parse_str(n, setting) for n in names))
    return names[0] if len(names) == 1 else names


_PARSERS = {"str": _parse_str, "path": _parse_str, "int": _parse_int,
            "float": _parse_float, "bool": _parse_bool, "json": _parse_json,
            "choice": _parse_choice, "tables": _parse_tables}

# what an item of `sources`, or one of its tables, may set for itself
SOURCE_SETTINGS = ("timestamp_col", "timestamp_format", "cursor", "cursor_lag", "start_at",
                   "databricks_table", "enable_sanitize", "sanitize_config", "enable_filter",
                   "filter_config", "enable_aggregate", "aggregate_config")


def parse_sources(raw, origin):
    """The YAML `sources` list as a tuple of {sqlite, tables, settings, origins}."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config: sources is not valid JSON: {exc.msg} at column "
                              f"{exc.colno} (from {origin})") from None
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"config: sources must be a list of sources, each with sqlite "
                          f"and tables (from {origin})")
    return tuple(parse_source(item, f"{origin}[{i}]") for i, item in enumerate(raw))


def parse_source(item, where):
    """One item of `sources`: a path or glob, its tables and its own settings."""
    if isinstance(item, str):
        item = {"sqlite": item}
    if not isinstance(item, dict):
        raise ConfigError(f"config: {where} must be a mapping with sqlite and tables")
    item = {str(k).lower(): v for k, v in item.items()}
    path = item.pop("sqlite", None) or item.pop("sqlite_path", None)
    if path is None:
        raise ConfigError(f"config: {where} has no sqlite (a file or a glob such as "
                          "/data/sensor-*.db)")
    tables = parse_table_list(item.pop("tables", None), f"{where}.tables")
    settings, origins = parse_overrides(item, where)
    return {"sqlite": parse_value("sqlite", path, f"{where}.sqlite"), "tables": tables,
            "settings": settings, "origins": origins}


def parse_table_list(raw, where):
    """None (the only table), "all", or a tuple of {name, settings, origins}."""
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return "all"
    if isinstance(raw, (str, dict)):
        raw = [raw] if isinstance(raw, str) else [{k: v} for k, v in raw.items()]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"config: {where} must be all or a list of table names")
    tables = []
    for i, entry in enumerate(raw):
        name, extra = entry, {}
        if isinstance(entry, dict) and "name" in entry:
            name, extra = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, extra), = entry.items()
        if not isinstance(name, str) or not name.strip() or not isinstance(
                extra or {}, dict):
            raise ConfigError(f"config: {where}[{i}] must be a table name, or a mapping "
                              "of a table name to its settings")
        settings, origins = parse_overrides(
            {str(k).lower(): v for k, v in (extra or {}).items()}, f"{where}.{name}")
        tables.append({"name": name.strip(), "settings": settings, "origins": origins})
    return tuple(tables)


def parse_overrides(mapping, where):
    """({field: value}, {field: origin}) of the settings a source or table sets."""
    settings, origins = {}, {}
    for key, raw in mapping.items():
        if key not in SOURCE_SETTINGS:
            hint = difflib.get_close_matches(key, SOURCE_SETTINGS + ("tables", "sqlite"), n=1)
            tip = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config: unknown key '{key}' in {where}{tip}; a source "
                              f"takes sqlite, tables and {', '.join(SOURCE_SETTINGS)}")
        origins[key] = f"{where}.{key}"
        settings[key] = parse_value(key, raw, origins[key])
    return settings, origins


def read_yaml_layer(path, origin="--config"):
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
        raise ConfigError(f"config: cannot read {path} (from {origin}): "
                          f"{exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config: {path} (from {origin}) is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} (from {origin}) must hold a mapping of settings")
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
        if name in layer:
            raise ConfigError(f"config: {path} sets {name} twice "
                              f"({layer[name][1].split(': ')[-1]} and {key}); keep one")
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
    origin = "--config" if args.config else "UPLOADER_CONFIG"
    file_layer = read_yaml_layer(path, origin) if path else {}
    values, sources = merge_layers(file_layer, env, cli)
    if "databricks_token" in cli:
        log.warning("--databricks-token is visible to other users in `ps`; "
                    "prefer the DATABRICKS_TOKEN environment variable")
    return validate_config(Config(**values, origins=sources))


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
    if not 0 <= config.cursor_lag < 10 * 365 * 86400:
        bad("cursor_lag", "must be >= 0 seconds (and under ten years)")
    if config.startup_timeout < 0:
        bad("startup_timeout", "must be >= 0 seconds")
    if config.retention_hours < 1:
        bad("retention_hours", "must be >= 1 (an in-flight commit must keep its files)")
    if config.sources and (config.sqlite or config.sqlite_table_name):
        name = "sqlite" if config.sqlite else "sqlite_table_name"
        raise ConfigError(f"config: {name} (from {config.origin(name)}) and sources (from "
                          f"{config.origin('sources')}) are both set; list the file "
                          "in sources instead")
    if config.maintain_every is not None and parse_every(config.maintain_every) is None:
        bad("maintain_every", "must be a number of cycles (12) or a duration (30m, 6h, 1d)")
    chosen = chosen_sink(config)
    updates = {"target": chosen.name, **chosen.defaults(config)}
    if config.databricks_host:
        updates["databricks_host"] = normalize_host(config.databricks_host)
        if not updates["databricks_host"]:
            bad("databricks_host", "must name a workspace host")
        if "@" in updates["databricks_host"]:  # it would be in logs, status and state
            bad("databricks_host", "must be a host name without a user or password: put "
                "the token in DATABRICKS_TOKEN")
        if re.match(r"\s*http://", config.databricks_host, re.I) and \
                not is_loopback(updates["databricks_host"]):
            bad("databricks_host", "must be https:// (plain http:// only for a test "
                "service on this machine: 127.0.0.1, localhost)")
        if config.delta_uri and not config.target:
            raise ConfigError(
                f"config: both databricks_host (from {config.origin('databricks_host')}) "
                f"and delta_uri (from {config.origin('delta_uri')}) are set; "
                "the uploader writes to one destination: unset one of them, or choose "
                "one with --target")
    elif chosen.needs_workspace:
        raise missing("databricks_host", f" for target {chosen.name}")
    if not config.source_id:
        updates["source_id"] = socket.gethostname() or "unknown-host"
        updates["origins"] = {**config.origins, "source_id": "default (host name)"}
    return dataclasses.replace(config, **updates)


EVERY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text):
    """maintain_every as ("cycles", n) or ("seconds", s); None when it is neither."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    if not found or float(found.group(1)) <= 0:
        return None
    number, unit = found.groups()
    if not unit:
        return ("cycles", int(float(number))) if float(number).is_integer() else None
    return "seconds", float(number) * EVERY_UNITS[unit]


def missing(name, why=""):
    """A ConfigError naming the flag, env var and YAML key that provide a setting."""
    setting = SETTINGS[name]
    return ConfigError(f"config: {name} is required{why}: set {setting.flag}, "
                       f"{' or '.join(setting.env)} or '{name}' in the YAML file")


def check_target(config):
    """Before a run: the chosen target must be completely configured (each sink
    checks its own settings)."""
    return sink_class(config).check_settings(config)


def validate_workspace(config):
    """Check the Databricks settings; return the target catalog.schema."""
    need = " when databricks_host is set"
    if not config.databricks_http_path:
        raise missing("databricks_http_path", need)
    check_credentials(config, need)
    database = workspace_database(config, need)
    volume = config.databricks_volume or "auto"
    if volume.lower() not in ("auto", "none") and not is_volume_path(volume):
        raise ConfigError(f"config: databricks_volume must be auto, none or look like "
                          f"/Volumes/catalog/schema/volume (got {volume!r} from "
                          f"{config.origin('databricks_volume')})")
    if config.max_statement_bytes < 10_000:
        raise ConfigError(f"config: max_statement_bytes must be at least 10000 (got "
                          f"{config.max_statement_bytes} from "
                          f"{config.origin('max_statement_bytes')})")
    return database


def is_volume_path(path):
    """True for /Volumes/<catalog>/<schema>/<volume>[/folder...]."""
    return bool(re.fullmatch(r"/Volumes/[^/]+/[^/]+/[^/]+(/.*)?", path or ""))


def check_credentials(config, need):
    """A token, a service principal's id and secret, or a ~/.databrickscfg profile."""
    has_oauth = config.databricks_client_id or config.databricks_client_secret
    if config.databricks_config_profile:
        check_profile(config)
    elif not config.databricks_token and not has_oauth:
        raise missing("databricks_token", need + " (or databricks_client_id and "
                      "databricks_client_secret for OAuth, or databricks_config_profile)")
    if has_oauth and not config.databricks_token:
        for name in ("databricks_client_id", "databricks_client_secret"):
            if not getattr(config, name):
                raise missing(name, " for OAuth machine-to-machine")


def workspace_database(config, need):
    """The target catalog.schema: databricks_database, or databricks_catalog and
    databricks_schema."""
    database = config.databricks_database
    if not database:
        if not (config.databricks_catalog and config.databricks_schema):
            raise missing("databricks_database", need + " (or both databricks_catalog "
                          "and databricks_schema)")
        database = f"{config.databricks_catalog}.{config.databricks_schema}"
    parts = database.split(".")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"config: databricks_database must be catalog.schema (got "
                          f"{database!r} from {config.origin('databricks_database')})")
    return database


PROFILE_AUTH_KEYS = ("token", "client_id", "auth_type", "password", "azure_client_id",
                     "azure_use_msi", "google_service_account", "google_credentials",
                     "metadata_service_url")


def check_profile(config):
    """The named ~/.databrickscfg profile exists and holds credentials of some kind."""
    import configparser
    name, path = config.databricks_config_profile, os.path.expanduser("~/.databrickscfg")
    where = f"from {config.origin('databricks_config_profile')}"
    # DEFAULT is a profile like the others: its keys are not merged into every profile
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        found = parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigError(f"config: cannot read {path}: {first_line(exc)}") from None
    if not found:
        raise ConfigError(f"config: databricks_config_profile {name!r} ({where}) needs "
                          f"{path}, which does not exist (`databricks auth login` writes it)")
    section = parser[name] if parser.has_section(name) else None
    if section is None:
        raise ConfigError(f"config: databricks_config_profile {name!r} ({where}) is not a "
                          f"profile in {path} (it has: {', '.join(parser.sections()) or 'none'})")
    if not any(key in section for key in PROFILE_AUTH_KEYS):
        raise ConfigError(f"config: profile {name!r} in {path} has no credentials (token, "
                          "client_id or auth_type); run `databricks auth login`")


def normalize_host(host):
    """Strip a scheme and trailing slashes: 'https://x.cloud.databricks.com/' -> host."""
    host = re.sub(r"^[a-z]+://", "", host.strip(), flags=re.I)
    return host.rstrip("/")


def config_as_dict(config):
    """{setting: {value, source}}, secrets redacted, for --print-config --json."""
    out = {}
    for name, setting, _ in config_fields():
        value = getattr(config, name)
        if setting.secret and value:
            value = "(set, redacted)"
        elif isinstance(value, str):
            value = redact(value)  # a URL may carry a user:password@
        out[name] = {"value": value, "source": config.origin(name)}
    return out


def format_config(config):
    """Render every setting as `name = value  (source)`, secrets redacted."""
    lines = []
    width = max(len(name) for name, _, _ in config_fields())
    for name, setting, _ in config_fields():
        value = getattr(config, name)
        if setting.secret:
            shown = "(set, redacted)" if value else "(not set)"
        elif setting.kind in ("json", "sources") and value:
            shown = json.dumps(value, sort_keys=True)
        else:
            shown = "(not set)" if value in (None, ()) else str(value)
        lines.append(f"{name:<{width}} = {redact(shown)}  [{config.origin(name)}]")
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
    formats: dict = dataclasses.field(default_factory=dict)  # column -> TimeFormat
    reason: str = ""  # why this cursor, in one sentence

    @property
    def column_names(self):
        return [c.name for c in self.columns]

    @property
    def timestamp_format(self):
        """The TimeFormat of the timestamp column (ISO when there is none)."""
        return self.formats.get(self.timestamp_col, ISO_FORMAT)


TIMESTAMP_NAMES = ("timestamp", "ts", "time", "datetime", "event_time", "created_at",
                   "created", "recorded_at", "inserted_at", "reading_time", "date")
# epoch columns of real producers: Home Assistant's last_updated_ts, time_fired_ts ...
TIME_NAME = re.compile(r".+(_ts|_time|_timestamp|_datetime|_at)$", re.I)
SAMPLE_HEAD, SAMPLE_TAIL = 50, 300


def quote_ident(name):
    """Quote a SQLite identifier so any name, however hostile, stays one name."""
    return '"' + name.replace('"', '""') + '"'


def open_source(path, busy_timeout, origin="sqlite", clock=time.monotonic, sleep=time.sleep):
    """Open the SQLite file read-only; a missing or non-SQLite file is an error.

    A writer's lock, or a hot journal a crashed writer left (which a read-only
    connection cannot roll back), is waited out for `busy_timeout` seconds, said in
    one line; then SourceBusyError (exit 1: the next run may find the file free).
    """
    if not os.path.exists(path):
        raise SourceError(f"source: SQLite file not found: {path} (from {origin})")
    if os.path.isdir(path):
        raise SourceError(f"source: {path} is a directory, not a SQLite file (from {origin})")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    deadline, delay, said = clock() + busy_timeout, 0.05, False
    while True:
        try:
            return connect_source(uri, busy_timeout)
        except sqlite3.Error as exc:
            cause = busy_cause(exc, path)
            if cause is None:
                raise SourceError(f"source: cannot open {path} as SQLite: {exc}") from None
        left = deadline - clock()
        if left <= 0:
            raise SourceBusyError(f"source: {cause}; gave up after {busy_timeout:g} s "
                                  "(BUSY_TIMEOUT); the next run tries again") from None
        if not said:
            log.warning("source: %s; waiting up to %g s (BUSY_TIMEOUT)", cause, busy_timeout)
            said = True
        sleep(min(delay, left))
        delay = min(delay * 2, 1.0)


def connect_source(uri, busy_timeout):
    """A read-only connection whose first read went through (no waiting on locks);
    later statements wait up to `busy_timeout` for the writer."""
    conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    return conn


def busy_cause(exc, path):
    """What keeps a read-only reader out, in words; None when it is not transient."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_READONLY_ROLLBACK":
        return (f"{path} has a hot journal ({path}-journal) left by a writer that "
                "stopped mid-transaction; a read-only reader cannot roll it back: the "
                "writer does when it opens the file again, as does any read-write open")
    if name.startswith("SQLITE_BUSY"):
        return (f"{path} is locked by another connection (the writer holds a lock, "
                "e.g. in a long write transaction)")
    return None


def list_tables(conn):
    """Names of the user tables in the database."""
    return sorted(name for name, kind in table_kinds(conn).items() if kind == "table")


def table_kinds(conn):
    """{name: kind} of the file's tables and views: 'table' (a user table), 'view',
    'virtual' (FTS, R*Tree: an index over other tables), 'shadow' (where a virtual table
    keeps its index; rows change in place) or 'internal' (sqlite_*)."""
    try:
        rows = conn.execute("SELECT name, type FROM pragma_table_list "
                            "WHERE schema = 'main'").fetchall()
    except sqlite3.OperationalError:  # SQLite before 3.37: tell them apart by name
        rows = conn.execute("SELECT name, CASE WHEN sql LIKE 'CREATE VIRTUAL%' THEN "
                            "'virtual' ELSE type END FROM sqlite_master "
                            "WHERE type IN ('table', 'view')").fetchall()
        virtual = [name for name, kind in rows if kind == "virtual"]
        rows = [(name, "shadow" if kind == "table" and any(
            name.startswith(v + "_") for v in virtual) else kind) for name, kind in rows]
    return {name: "internal" if name.startswith("sqlite_") else kind
            for name, kind in rows}


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
        check_not_view(conn, wanted, path, tables)
        raise SourceError(f"source: no table {wanted!r} in {path}; "
                          f"tables: {', '.join(tables) or '(none)'}")
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise SourceError(f"source: {path} has no tables yet; nothing to upload")
    raise SourceError(f"source: {path} has {len(tables)} tables ({', '.join(tables)}); "
                      "choose one with --table or SQLITE_TABLE_NAME")


def check_not_view(conn, wanted, path, tables):
    """A view named as the source table is refused with the reason: it has no rowid,
    and what it shows can change under any cursor, so every row once is not possible."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'view' AND "
                       "lower(name) = lower(?)", (wanted,)).fetchone()
    if row:
        raise SourceError(f"source: {row[0]!r} in {path} is a view, not a table: a view "
                          "has no rowid and no stable order, so no cursor can upload its "
                          "rows exactly once; name the table it reads from with --table "
                          f"(tables: {', '.join(tables) or '(none)'})")


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


def is_time_declared(column):
    """True for a column declared DATETIME, TIMESTAMP or DATE."""
    return bool(re.match(r"(DATETIME|TIMESTAMP|DATE)\b", column.decl_type, re.I))


def timestamp_candidates(columns, wanted, table):
    """The configured timestamp column, or those that may be one: by name, by the
    epoch naming of real producers (`*_ts`, `*_time`), then by declared type."""
    by_name = {c.name.lower(): c.name for c in columns}
    if wanted:
        if wanted.lower() not in by_name:
            raise SourceError(f"source: table {table!r} has no column {wanted!r}; "
                              f"columns: {', '.join(c.name for c in columns)}")
        return [by_name[wanted.lower()]]
    found = [by_name[n] for n in TIMESTAMP_NAMES if n in by_name]
    found += [c.name for c in columns if TIME_NAME.fullmatch(c.name)]
    found += [c.name for c in columns if is_time_declared(c)]
    return list(dict.fromkeys(found))


def sample_rows(conn, table, names, order):
    """The first SAMPLE_HEAD and last SAMPLE_TAIL rows by the key `order` (cheap: both
    ends of the table's B-tree), as {column: non-NULL values}, {column: NULLs seen}."""
    if not names:
        return {}, {}
    select = (f"SELECT {', '.join(order + [quote_ident(n) for n in names])} "
              f"FROM {quote_ident(table)} ORDER BY {', '.join(order)} {{}} LIMIT ?")
    try:
        rows = {row[:len(order)]: row[len(order):] for end, limit in (
            ("ASC", SAMPLE_HEAD), ("DESC", SAMPLE_TAIL))
            for row in conn.execute(select.format(end), (limit,)).fetchall()}
    except sqlite3.Error as exc:
        raise SourceError(f"source: sampling {table!r} failed: {exc}") from None
    columns = list(zip(*rows.values())) or [() for _ in names]
    values = {n: [v for v in col if v is not None] for n, col in zip(names, columns)}
    nulls = {n: sum(v is None for v in col) for n, col in zip(names, columns)}
    return values, nulls


def cursor_problem(name, fmt, values, nulls):
    """Why the column cannot lead a cursor ('' when it can)."""
    if nulls:
        return f"{name!r} is NULL in {nulls} of the sampled rows"
    if values and not any(fmt.micros(v) is not None for v in values):
        return f"{name!r} holds no value readable as time ({fmt.why or fmt.describe()})"
    if not fmt.sorts:
        return f"{name!r} does not sort as time: {fmt.why}"
    return ""


PLAUSIBLE_SINCE = 315532800 * 10**6  # 1980-01-01 in microseconds


def is_plausible(name, fmt, values):
    """False for a column found only by its name's ending (`*_time`, `*_ts`) whose
    numbers are not dates after 1980: a duration such as response_time."""
    loose = TIME_NAME.fullmatch(name) and name.lower() not in TIMESTAMP_NAMES
    if not loose or fmt.kind != "epoch" or not values:
        return True
    return all((fmt.micros(v) or 0) >= PLAUSIBLE_SINCE for v in values if is_number(v))


def choose_timestamp(candidates, wanted, values, nulls, pattern):
    """(timestamp column, its TimeFormat, why it cannot lead a cursor or '', notes on
    the candidates passed over); the first that can lead a cursor wins, else the first
    with values readable as time, which is still typed TIMESTAMP."""
    formats, problems, rejected = {}, {}, set()
    for name in candidates:
        formats[name] = detect_time_format(values[name], pattern)
        problems[name] = cursor_problem(name, formats[name], values[name], nulls[name])
        if not wanted and not is_plausible(name, formats[name], values[name]):
            problems[name] = (f"{name!r} holds numbers such as {values[name][0]!r}, "
                              "not dates after 1980")
            rejected.add(name)
        if not problems[name]:
            passed = [problems[c] for c in candidates[:candidates.index(name)]]
            return name, formats[name], "", passed
    readable = [n for n in candidates if wanted or n not in rejected and any(
        formats[n].micros(v) is not None for v in values[n])]
    if not readable:
        return None, ISO_FORMAT, "", [problems[c] for c in candidates]
    name = readable[0]
    return name, formats[name], problems[name], [problems[c] for c in candidates
                                                 if c != name]


def rowid_alias(columns):
    """A name that reaches the rowid: rowid, _rowid_ or oid, whichever no column shadows."""
    taken = {c.name.lower() for c in columns}
    for alias in ("rowid", "_rowid_", "oid"):
        if alias not in taken:
            return alias
    return None


def integer_key(columns, without_rowid):
    """The INTEGER PRIMARY KEY column (an alias of the rowid), or None."""
    pks = [c for c in columns if c.pk]
    if len(pks) == 1 and not without_rowid and pks[0].decl_type.upper() == "INTEGER":
        return pks[0].name
    return None


def choose_cursor(columns, ts, autoincrement, without_rowid, table, mode="auto"):
    """Pick the cursor of DESIGN section 4 for this table; `ts` is a timestamp column
    that can lead it (None when there is none). mode 'rowid' never lets it lead,
    'timestamp' lets it lead even beside an AUTOINCREMENT key."""
    pks = [c.name for c in sorted(columns, key=lambda c: c.pk) if c.pk]
    ipk = integer_key(columns, without_rowid)
    ts = None if mode == "rowid" else ts
    if without_rowid:
        # the timestamp leads even when it is part of the key, so that new rows of
        # every key sort after the cursor
        rest = tuple(p for p in pks if p != ts)
        return Cursor("pair", (ts, *rest)) if ts and rest else Cursor("key", tuple(pks))
    if autoincrement and ipk and mode != "timestamp":
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


def cursor_reason(cursor, ts, problem, mode, autoincrement, passed, sampled=True):
    """Why this cursor, in one sentence (the preflight and --status say it)."""
    skipped = "".join(f"; passed over: {p}" for p in passed if p)
    if mode != "auto":
        return f"forced by cursor={mode}" + (f" ({problem})" if problem else "") + skipped
    if cursor.kind == "rowid" and autoincrement:
        return "the table's key is INTEGER PRIMARY KEY AUTOINCREMENT" + skipped
    if cursor.kind == "rowid" and ts and ts == cursor.columns[0]:
        return f"{ts!r} is the table's INTEGER PRIMARY KEY, so its rowid" + skipped
    if cursor.kind in ("rowid", "key") and problem:
        typed = f"; {ts!r} is still typed TIMESTAMP"
        return f"{problem}, so it cannot order the rows{typed}" + skipped
    if cursor.kind in ("rowid", "key"):
        return "no timestamp column" + skipped
    if not sampled:
        return f"{ts!r} by its name or type; the table has no rows yet to check its values"
    return f"{ts!r} sorts as time and is not NULL in the sampled rows" + skipped


def describe_table(conn, wanted_table, wanted_ts, path, mode="auto", pattern=None):
    """Introspect the source table: columns, timestamp column and its format (from a
    sample of rows), cursor and why. `mode` is the cursor setting (auto, rowid,
    timestamp); `pattern` a strptime layout for the timestamp column."""
    table = choose_table(conn, wanted_table, path)
    columns = read_columns(conn, table)
    sql = read_table_sql(conn, table)
    without_rowid = is_without_rowid(sql)
    autoincrement = bool(re.search(r"\bAUTOINCREMENT\b", sql, re.I))
    candidates = timestamp_candidates(columns, wanted_ts, table)
    typed = [c.name for c in columns if is_time_declared(c) and c.name not in candidates]
    order = ([quote_ident(c.name) for c in sorted(columns, key=lambda c: c.pk) if c.pk]
             if without_rowid else [rowid_alias(columns) or "1"])
    values, nulls = sample_rows(conn, table, candidates + typed, order)
    ts, fmt, problem, passed = choose_timestamp(candidates, wanted_ts, values, nulls,
                                                pattern)
    if mode == "timestamp":  # NULL timestamps are reported each cycle, not an error
        problem = cursor_problem(ts, fmt, values[ts], 0) if ts else (
            f"table {table!r} has no timestamp column")
        if problem:
            raise ConfigError(f"config: cursor is timestamp, but {problem}; set --cursor "
                              "(CURSOR) to auto or rowid")
    # only columns typed TIMESTAMP are read as time; another candidate stays as stored
    declared = [c.name for c in columns if is_time_declared(c)]
    formats = {n: detect_time_format(values[n]) for n in declared}
    if ts:
        formats[ts] = fmt
    cursor = choose_cursor(columns, None if problem else ts, autoincrement,
                           without_rowid, table, mode)
    reason = cursor_reason(cursor, ts, problem, mode, autoincrement, passed,
                           bool(ts and (values[ts] or nulls[ts])))
    return SourceTable(table, columns, ts, cursor, autoincrement, without_rowid,
                       formats, reason)


def describe_source(conn, config):
    """describe_table() with the source settings of `config`."""
    if isinstance(config.sqlite_table_name, tuple):
        raise ConfigError(f"config: this action reads one source table; "
                          f"sqlite_table_name names {len(config.sqlite_table_name)} (from "
                          f"{config.origin('sqlite_table_name')}): give --table once")
    return describe_table(conn, config.sqlite_table_name, config.timestamp_col,
                          config.sqlite, config.cursor, config.timestamp_format)


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


def select_sql(source, has_cursor, bounded=False):
    """The batch query: rows after the cursor (and, bounded, up to a second cursor), in
    cursor order, LIMIT ?."""
    keys = key_sql(source.cursor)
    select = ([keys[-1]] if source.cursor.hidden else []) + [
        quote_ident(c) for c in source.column_names]
    bound = f" AND {cursor_condition(source.cursor, True, op='<=')}" if bounded else ""
    return (f"SELECT {', '.join(select)} FROM {quote_ident(source.name)} "
            f"WHERE {cursor_condition(source.cursor, has_cursor)}{bound} "
            f"ORDER BY {', '.join(keys)} LIMIT ?")


def stamp_position(source):
    """Index of the timestamp column within a selected row (None without one)."""
    if source.timestamp_col is None:
        return None
    return source.column_names.index(source.timestamp_col) + (1 if source.cursor.hidden else 0)


def key_positions(source):
    """Index of each cursor column within a selected row."""
    cur = source.cursor
    offset = 1 if cur.hidden else 0
    names = source.column_names
    return [0 if (cur.hidden and c == cur.columns[-1]) else names.index(c) + offset
            for c in cur.columns]


@dataclasses.dataclass
class Chunk:
    """Rows read from the source in one go, column-major, with the cursor after them:
    all or part of one read statement, whose rows make one batch. Processing returns a
    chunk of the same shape; the cycle gives it its batch id and the sink encodes it."""

    columns: list
    values: list
    count: int
    cursor_end: list
    last_timestamp: object = None
    kinds: list = dataclasses.field(default_factory=list)
    batch_id: str = ""  # of the batch it goes in (set by the cycle before encoding)
    notes: dict = dataclasses.field(default_factory=dict)  # from processing
    first: bool = True  # the first chunk of its read statement
    final: bool = True  # the last chunk of its read statement
    resend: bool = False  # rows of an in-flight batch that did not land: send as they are
    source_count: int = None  # rows read from the source, before processing (default count)
    keys: list = dataclasses.field(default_factory=list)  # cursor columns, per row (a
    # sink's row key; filtering keeps them with their rows, aggregating does not)
    cursor_row: dict = None  # row_mark() of the last row read (the row at cursor_end)

    def __post_init__(self):
        if self.source_count is None:
            self.source_count = self.count


CHUNK_ROWS = 10_000


def read_batches(conn, source, cursor, batch_size, chunk_rows=CHUNK_ROWS, *, newer=None,
                 until=None, refresh=None, key=""):
    """Yield the rows after `cursor` in chunks, until a short batch says it is drained.

    A batch is one statement, so one read transaction. It is fetched chunk by chunk,
    so that the Python values of only one chunk live at a time; the statement is
    finished before the batch's last chunk (final=True) is yielded. `newer(row)`
    (cursor_lag) is true for a row too recent to pass: reading stops before the first
    one, as if drained (rows come in timestamp order). With `until` (the cursor_end of
    an in-flight batch that did not land) the first batch is exactly the rows up to it
    (resend=True), whatever batch_size now is. `refresh(source)` gives the table as it is
    before each batch, so a column added meanwhile is read from then on. Each chunk has
    the mark of its last row (row_mark), keyed with `key` (the state id), with the
    table's first row, read once (again when the columns change), when a row is read.
    """
    head, headed = None, None
    while True:
        if refresh is not None:
            source = refresh(source)
        resend, limit = until is not None, batch_size if until is None else -1
        sql = select_sql(source, cursor is not None, bounded=resend)
        params = (list(cursor) if cursor is not None else []) + (
            list(until) if resend else []) + [limit]
        statement = reading_source(source, lambda: conn.execute(sql, params))
        rows, count, first = reading_source(source, lambda: statement.fetchmany(chunk_rows)), 0, True
        held, lagged = False, None if resend else newer  # a re-sent batch passed the lag
        while rows:
            if headed is not source:  # (in the batch's read transaction)
                head, headed = reading_source(
                    source, lambda: read_first_row(conn, source, key)), source
            full = len(rows) == chunk_rows
            if lagged is not None and lagged(rows[-1]):
                rows, held = rows[:bisect.bisect_left(rows, True, key=lagged)], True
            count += len(rows)
            ahead = None
            if not held and (limit < 0 or count < limit) and full:
                ahead = reading_source(source, statement.fetchone)  # is there more?
                if ahead is not None and lagged is not None and lagged(ahead):
                    ahead, held = None, True
            if ahead is None:
                statement.close()  # ends the read transaction before the batch moves on
            if not rows:  # the first row is already too recent
                return
            chunk = rows_to_chunk(source, rows, first, final=ahead is None, key=key,
                                  head=head)
            chunk.resend = resend
            cursor, rows, first = chunk.cursor_end, None, False
            yield chunk
            chunk = None  # while the next chunk is read, hold no values of this one
            if ahead is not None:
                rows = [ahead]
                rows += reading_source(source, lambda: statement.fetchmany(chunk_rows - 1))
        statement.close()
        if resend:
            if not count:
                raise SourceError(
                    f"source: the rows of the in-flight batch (up to {source.cursor.describe()}"
                    f" = {list(until)}) are no longer in {source.name!r}; rows were deleted "
                    "or the file was replaced: check the target, then use --reset-state")
            until = None
            continue
        if held or count < batch_size:
            return


def read_missing(conn, source, until, names, batch_size, missing, chunk_rows=CHUNK_ROWS,
                 key=""):
    """Yield, in chunks, the rows at or before `until` for whose key (the values of
    `names`) `missing(key)` is true; a batch ends after `batch_size` such rows. Each
    chunk is read by its own short statement, so no read transaction lasts while a
    batch is written. Marks are keyed with `key` (the state id)."""
    positions = [source.column_names.index(n) + (1 if source.cursor.hidden else 0)
                 for n in names]
    keys = key_positions(source)
    sql, scan, rows = select_sql(source, True, bounded=True), None, []
    while True:
        params = (list(scan) if scan else []) + list(until) + [chunk_rows]
        found = reading_source(source, lambda: conn.execute(
            sql if scan else select_sql(source, False, bounded=True), params).fetchall())
        if found:
            scan = [found[-1][p] for p in keys]
            rows += [r for r in found if missing(tuple(r[p] for p in positions))]
        done = len(found) < chunk_rows
        while rows and (len(rows) >= batch_size or done):
            part, rows = rows[:batch_size], rows[batch_size:]
            yield rows_to_chunk(source, part, True, final=True, key=key)
        if done:
            return


def refresh_columns(conn, source):
    """The source table with the columns it has now: a column added while the uploader
    runs is read from the next batch on. The cursor's columns must still be there."""
    columns = reading_source(source, lambda: read_columns(conn, source.name))
    if columns == source.columns:
        return source
    names, before = {c.name for c in columns}, {c.name for c in source.columns}
    needed = [c for c in key_columns(source) + [source.timestamp_col] if c]
    if any(c not in names for c in needed):
        raise SourceError(f"source: table {source.name!r} lost its cursor or timestamp "
                          f"column ({', '.join(c for c in needed if c not in names)}); "
                          "restart the uploader once the table is complete again")
    log.info("source: table %r changed while running: columns added: %s; dropped: %s; "
             "the next batch carries them", source.name,
             ", ".join(sorted(names - before)) or "none",
             ", ".join(sorted(before - names)) or "none")
    return dataclasses.replace(source, columns=columns)


def key_columns(source):
    """The cursor's columns that are table columns (not a hidden rowid)."""
    cur = source.cursor
    return [c for i, c in enumerate(cur.columns)
            if not (cur.hidden and i == len(cur.columns) - 1)]


def lag_applies(source):
    """cursor_lag works on a cursor led by the timestamp (pair, or a key led by it)."""
    cur = source.cursor
    return (cur.kind != "rowid" and source.timestamp_col is not None
            and cur.columns[0] == source.timestamp_col)


def lag_filter(source, lag):
    """cursor_lag as a predicate on selected rows (None when it does not apply): true
    for a row whose timestamp is after now minus the lag."""
    if not lag or not lag_applies(source):
        return None
    cutoff = int((time.time() - lag) * 1_000_000)
    pos, read = stamp_position(source), source.timestamp_format.micros

    def newer(row):
        micros = read(row[pos])
        return micros is not None and micros > cutoff
    return newer


def reading_source(source, action):
    """Run one SQLite call on the source; its errors are source errors."""
    try:
        return action()
    except sqlite3.Error as exc:
        raise SourceError(f"source: reading {source.name!r} failed: {exc}") from None


def rows_to_chunk(source, rows, first, final, key="", head=None):
    """Row tuples as a column-major Chunk, with the cursor after the last row and the
    mark of that row, keyed with `key` (`head`: the table's first row, read_first_row)."""
    offset = 1 if source.cursor.hidden else 0
    positions = key_positions(source)
    ts_pos = stamp_position(source)
    last, count = rows[-1], len(rows)
    columns = list(zip(*rows))
    stamps = columns[ts_pos] if ts_pos is not None else None
    for name, fmt in source.formats.items():
        if not fmt.native:
            pos = source.column_names.index(name) + offset
            columns[pos] = normalize_times(columns[pos], fmt)
    mark = row_mark(source.column_names, last[offset:], key, stamp=source.timestamp_col,
                    first=head)
    return Chunk(source.column_names, columns[offset:], count, [last[p] for p in positions],
                 stamps[-1] if stamps is not None else None, source_kinds(source),
                 first=first, final=final, keys=[columns[p] for p in positions],
                 cursor_row=mark)


def mark_digest(key, values):
    """A short digest of values as SQLite returned them (type and value), keyed with the
    state id: the state keeps no row data, and a digest cannot be matched to a value
    guessed without that state (a table of likely values, another node's state)."""
    text = repr([(type(v).__name__, v) for v in values])
    return hashlib.blake2b(text.encode(), key=str(key).encode()[:64],
                           digest_size=8).hexdigest()


def row_mark(names, row, key="", stamp=None, first=None):
    """What tells the row at a cursor from another file's row there, as digests keyed
    with `key` (the state id): of its column names (and their number, so a column added
    later is left out), of its values, of its timestamp (column `stamp`), which a row
    updated in place keeps, and `first`, the table's first row then (read_first_row:
    its digest and where it was)."""
    names = list(names)
    mark = {"names": mark_digest(key, names), "n": len(names),
            "digest": mark_digest(key, row)}
    if stamp in names:
        mark["stamp"] = mark_digest(key, [row[names.index(stamp)]])
    if first is not None:
        mark["first"], mark["first_at"] = first[:2]
        if first[2:] and first[2]:
            mark["first_by"] = first[2]
    return mark


def first_order(source, by_key=True):
    """What orders the table's rows as stored: its rowid (the last column of a rowid
    table's cursor), or a WITHOUT ROWID table's PRIMARY KEY (an index seek; marks of
    before, without first_by, by_key=False: its cursor's columns, a scan and a sort
    when no index leads with them)."""
    keys = key_sql(source.cursor)
    if not source.without_rowid:
        return keys[-1:]
    if not by_key:
        return keys
    return [quote_ident(c.name) for c in sorted(source.columns, key=lambda c: c.pk) if c.pk]


def read_first_row(conn, source, key, names=None, by_key=True):
    """(digest, place, by) of the table's first row (first_order): the digest of columns
    `names` (default: all), its rowid or key as a cursor, and "key" when that is a
    WITHOUT ROWID table's PRIMARY KEY (the mark's first_by); None when it is empty."""
    names = source.column_names if names is None else names
    order = first_order(source, by_key)
    keys = ", ".join(order)
    row = conn.execute(f"SELECT {keys}, {', '.join(quote_ident(n) for n in names)} FROM "
                       f"{quote_ident(source.name)} ORDER BY {keys} LIMIT 1").fetchone()
    if row is None:
        return None
    width = len(order)
    return (mark_digest(key, row[width:]), encode_cursor(row[:width]),
            "key" if source.without_rowid and by_key else None)


def has_rows_from(conn, source, place, by_key=True):
    """True when some row is at or before `place` (a first row's place) in first_order."""
    order = first_order(source, by_key)
    keys = order[0] if len(order) == 1 else f"({', '.join(order)})"
    marks = "?" if len(order) == 1 else f"({', '.join('?' * len(order))})"
    return conn.execute(f"SELECT 1 FROM {quote_ident(source.name)} WHERE {keys} <= {marks} "
                        "LIMIT 1", decode_cursor(place)).fetchone() is not None


def is_marked_row(conn, source, cursor, mark, key=""):
    """True when the row at `cursor` is the one `mark` was made of (see compare_mark);
    `key` is the one the mark was made with (the state id)."""
    return compare_mark(conn, source, cursor, mark, key)[0]


def compare_mark(conn, source, cursor, mark, key):
    """(same, what): is the row at `cursor` the one `mark` was made of, and what was
    found. It is when it holds the same values, or when only values a producer updates
    in place changed (a 'last seen' column): its timestamp and the table's first row are
    those marked, or, with a timestamp, the rows up to the first row marked are gone (a
    purge) and none took their place. A mark of an older version (a list of columns, an
    unkeyed digest of the values) has only the values."""
    if "columns" in mark:  # (older version)
        names = mark["columns"]
        if not set(names) <= set(source.column_names):
            return False, "its columns are others"
        row = read_marked_row(conn, source, cursor, names)
        if row is None:
            return False, "no such row"
        old = hashlib.sha256(repr([(type(v).__name__, v) for v in row]).encode())
        same = old.hexdigest()[:16] == mark["digest"]
        return same, "the same values" if same else "other values"
    names = source.column_names[:mark["n"]]
    if len(names) < mark["n"] or mark_digest(key, names) != mark["names"]:
        return False, "its columns are others"
    row = read_marked_row(conn, source, cursor, names)
    if row is None:
        return False, "no such row"
    if mark_digest(key, row) == mark["digest"]:
        return True, "the same values"
    stamp = source.timestamp_col
    if "stamp" in mark and (stamp not in names or mark_digest(
            key, [row[names.index(stamp)]]) != mark["stamp"]):
        return False, "another timestamp"
    by_key = not source.without_rowid or mark.get("first_by") == "key"
    first = read_first_row(conn, source, key, names, by_key)
    if mark.get("first") is not None and first is not None and first[0] == mark["first"]:
        return True, "other values, updated in place: " + (
            "its timestamp and the table's first row are those marked" if "stamp" in mark
            else "the table's first row is the one marked")
    if "stamp" in mark and mark.get("first_at") is not None and not has_rows_from(
            conn, source, mark["first_at"], by_key):
        return True, ("other values, updated in place: its timestamp is the one marked, "
                      "and the table's first rows, up to the one marked, were deleted since")
    return False, "other values, and the table's first row is another"


def begins_with(conn, source, place, mark, key):
    """True when the row at `place` (a table's first row) is the one `mark` was made
    of, or has the timestamp marked (its other values updated in place since)."""
    if is_marked_row(conn, source, place, mark, key):
        return True
    stamp, names = source.timestamp_col, source.column_names[:mark.get("n", 0)]
    if "stamp" not in mark or stamp not in names:
        return False
    row = read_marked_row(conn, source, place, names)
    return row is not None and mark_digest(key, [row[names.index(stamp)]]) == mark["stamp"]


def read_row_mark(conn, source, cursor, key="", names=None):
    """The mark of the row at `cursor` now, made of columns `names` (default: all) and
    keyed with `key` (the state id); None when no row is there."""
    names = source.column_names if names is None else names
    row = read_marked_row(conn, source, cursor, names)
    if row is None:
        return None
    return row_mark(names, row, key, stamp=source.timestamp_col,
                    first=read_first_row(conn, source, key, names))


def read_marked_row(conn, source, cursor, names):
    """The values of columns `names` of the row at `cursor`; None when none is there."""
    return conn.execute(f"SELECT {', '.join(quote_ident(n) for n in names)} FROM "
                        f"{quote_ident(source.name)} WHERE "
                        f"{cursor_condition(source.cursor, True, op='=')}", cursor).fetchone()


def has_rows_up_to(conn, source, cursor):
    """True when some row is at or before the cursor."""
    return conn.execute(f"SELECT 1 FROM {quote_ident(source.name)} WHERE "
                        f"{cursor_condition(source.cursor, True, op='<=')} LIMIT 1",
                        cursor).fetchone() is not None


def is_purged_up_to(conn, source, cursor):
    """True when the table has no row up to the cursor (the row there included) but rows
    after it: the rows up to it were deleted (a purge), so going on after the cursor
    skips none of its rows."""
    return not has_rows_up_to(conn, source, cursor) and conn.execute(
        f"SELECT 1 FROM {quote_ident(source.name)} LIMIT 1").fetchone() is not None


def count_passed(conn, source, pending, nulls=None):
    """Rows at or before the cursor: all rows but the `pending` ones after it and those
    a pair cursor cannot order (`nulls`, counted when not given)."""
    if nulls is None:
        nulls = count_null_timestamps(conn, source)[0]
    total = conn.execute(f"SELECT count(*) FROM {quote_ident(source.name)}").fetchone()[0]
    return total - pending - nulls


def read_end_cursor(conn, source):
    """The cursor after the last row now in the table (None when it has none)."""
    keys = key_sql(source.cursor)
    row = conn.execute(f"SELECT {', '.join(keys)} FROM {quote_ident(source.name)} "
                       f"WHERE {cursor_condition(source.cursor, False)} ORDER BY "
                       f"{', '.join(k + ' DESC' for k in keys)} LIMIT 1").fetchone()
    return list(row) if row else None


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
        "(by an older copy, or another database) or truncated; to go on from its current "
        "end, use --reset-state --start-at now")


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
    cur, table, ts = source.cursor, source.name, source.timestamp_col
    lines = [f"cursor: {cur.kind} {cur.describe()} on table {table!r}: {source.reason}"]
    if ts:
        fmt = source.timestamp_format
        lines.append(f"timestamp: {ts!r} read as {fmt.describe()}"
                     + (f" ({fmt.why})" if fmt.why and fmt.sorts else ""))
    if cur.kind == "rowid" and source.autoincrement:
        lines.append("cursor: AUTOINCREMENT key: exact, rows are never reused, "
                     "late rows are included")
        return lines
    if cur.kind == "rowid" and cur.columns[0] == ts:
        lines.append(f"preflight: the rowid is {ts!r}: records stored later with an older "
                     f"{ts!r} (an import of old records) sort before the cursor")
        return lines
    if cur.kind == "rowid":
        lines.append("preflight: no AUTOINCREMENT and no timestamp cursor: if the newest "
                     "rows are deleted, their rowids can be reused and such rows missed; "
                     "fix: declare the key INTEGER PRIMARY KEY AUTOINCREMENT")
        return lines
    if cur.kind == "pair":
        lines.append(f"preflight: rows inserted later with an older {ts!r} than the "
                     "cursor are missed; fix: INTEGER PRIMARY KEY AUTOINCREMENT on the table"
                     ", or give late rows time with CURSOR_LAG (seconds)")
        column = next(c for c in source.columns if c.name == ts)
        if not column.notnull:
            lines.append(f"preflight: {ts!r} is nullable: rows with a NULL timestamp are "
                         "not uploaded and are reported each cycle; fix: NOT NULL")
    if cur.columns[0] == ts and not is_indexed(conn, table, ts):
        index = quote_ident(f"idx_{table}_{ts}")
        lines.append(f"preflight: {ts!r} has no index, so each cycle scans the table; "
                     f"fix (on the writer's side): CREATE INDEX {index} ON "
                     f"{quote_ident(table)}({quote_ident(ts)})")
    return lines


GLOB_CHARS = re.compile(r"[*?[]")
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's own files beside a database


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One configured source: a SQLite file or a glob of them, the tables wanted from
    it (None: the only one; "all"; or {name, settings, origins} each) and the settings
    it sets for its tables."""

    pattern: str
    tables: object
    settings: dict
    origins: dict
    origin: str

    @property
    def is_glob(self):
        return bool(GLOB_CHARS.search(self.pattern))

    @functools.cached_property
    def real_pattern(self):
        """The glob with its folder as a real path (as files are kept in the state)."""
        return os.path.join(os.path.realpath(os.path.dirname(self.pattern) or "."),
                            os.path.basename(self.pattern))

    def matches(self, path):
        """True when `path` (a real path) is one of this glob's files."""
        return self.is_glob and fnmatch.fnmatchcase(path, self.real_pattern)


def source_specs(config):
    """The configured sources: the `sources` list, or the single-source settings as one."""
    if config.sources:
        return [SourceSpec(item["sqlite"], item["tables"], item["settings"],
                           item["origins"], config.origin("sources"))
                for item in config.sources]
    names = config.sqlite_table_name
    names = (names,) if isinstance(names, str) else names
    tables = tuple({"name": n, "settings": {}, "origins": {}} for n in names or ())
    return [SourceSpec(config.sqlite, tables or None, {}, {}, config.origin("sqlite"))]


def is_single(specs):
    """One plain file and at most one table: the single-source run (and state) of before."""
    spec, *more = specs
    return not more and not spec.is_glob and (
        spec.tables is None or spec.tables != "all" and len(spec.tables) == 1)


def match_files(spec):
    """The files a source names now: its path, or its glob's files, sorted (real paths)."""
    if not spec.is_glob:
        return [spec.pattern]
    found = (os.path.realpath(p) for p in glob.glob(os.path.expanduser(spec.pattern)))
    return sorted({p for p in found if os.path.isfile(p) and not p.endswith(SIDE_FILES)})


def spec_tables(spec, conn, path):
    """The tables wanted from one file ({name, settings, origins} each) and, for
    `tables: all`, what was passed over: (tables, views, SQLite's internal tables with
    virtual tables and their shadow tables)."""
    if spec.tables is None:
        return [{"name": choose_table(conn, None, path), "settings": {}, "origins": {}}], [], []
    if spec.tables != "all":
        return list(spec.tables), [], []
    kinds = sorted(table_kinds(conn).items())
    views = [name for name, kind in kinds if kind == "view"]
    internal = [name for name, kind in kinds if kind in ("internal", "virtual", "shadow")]
    tables = [{"name": name, "settings": {}, "origins": {}}
              for name, kind in kinds if kind == "table"]
    return tables, views, internal


def spec_config(config, spec, path, table=None):
    """The settings of one source table: the config, then its source's settings, then
    its own."""
    table = table or {"name": None, "settings": {}, "origins": {}}
    settings = {**spec.settings, **table["settings"]}
    origins = {**spec.origins, **table["origins"], "sqlite": spec.origin,
               "sqlite_table_name": table["origins"].get("name", spec.origin)}
    return dataclasses.replace(config, sqlite=path, sqlite_table_name=table["name"],
                               sources=(), origins={**config.origins, **origins},
                               **settings)


def unusable_cursor(source):
    """Why no cursor can upload this table's rows exactly once ('' when one can): a
    WITHOUT ROWID table with no timestamp to lead, keyed by anything but one integer,
    takes new rows anywhere in its key order and changes rows in place."""
    cur = source.cursor
    if cur.kind != "key":
        return ""
    keys = [c for c in source.columns if c.name in cur.columns]
    if len(keys) == 1 and re.match(r"(INT|BIGINT)", keys[0].decl_type, re.I):
        return ""
    if cur.columns[0] == source.timestamp_col and source.timestamp_format.sorts:
        return ""  # keyed by its time
    return (f"a WITHOUT ROWID table keyed by {cur.describe()} with no timestamp that "
            "sorts as time: new rows sort anywhere in its key and rows change in place, "
            "so no cursor uploads them exactly once")


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


def source_kinds(source):
    """Declared Delta types of the source columns (None: follow the values)."""
    return [declared_kind(c.decl_type, c.name == source.timestamp_col)
            for c in source.columns]


def resolve_kinds(chunk, known):
    """Delta types of the chunk's columns: the target's own, else declared, else seen."""
    kinds = []
    for name, kind, values in zip(chunk.columns, chunk.kinds, chunk.values):
        kind = known.get(name) or kind or infer_kind(values)
        known.setdefault(name, kind)
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
        return moment_to_micros(dt.datetime.fromisoformat(text))
    except ValueError:
        return None


def moment_to_micros(moment):
    """Microseconds since the epoch for a datetime (UTC when it has no zone)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return (moment - EPOCH) // ONE_MICROSECOND


def epoch_to_micros(number):
    """Epoch seconds, milliseconds, microseconds or nanoseconds, told apart by size."""
    if not math.isfinite(number):
        return None
    micros = int(round(number * (1e6, 1e3, 1, 1e-3)[epoch_scale(number)]))
    return micros if -62135596800 * 10**6 <= micros <= 253402300799 * 10**6 else None


JULIAN_UNIX_EPOCH = 2440587.5  # julianday('1970-01-01 00:00:00')
JULIAN_RANGE = (2378496.5, 2561117.5)  # julianday() of 1800-01-01 .. 2300-01-01
DATE_LAYOUTS = ("%Y/%m/%d", "%m/%d/%Y", "%d/%m/%Y", "%m/%d/%y", "%d/%m/%y", "%d.%m.%Y",
                "%m-%d-%Y", "%d-%m-%Y", "%b %d %Y", "%b %d, %Y", "%d %b %Y", "%B %d %Y",
                "%B %d, %Y", "%d %B %Y", "%a %b %d %Y")
TIME_LAYOUTS = ("", " %H:%M", " %H:%M:%S", " %H:%M:%S.%f", " %I:%M %p", " %I:%M:%S %p")
OTHER_LAYOUTS = ("%a, %d %b %Y %H:%M:%S %z", "%a, %d %b %Y %H:%M:%S GMT",
                 "%d %b %Y %H:%M:%S %z", "%a %b %d %H:%M:%S %Y", "%d/%b/%Y:%H:%M:%S %z",
                 "%Y-%m-%d %H:%M:%S %z", "%Y-%m-%dT%H:%M:%S %z", "%Y-%m-%d %H:%M:%S UTC",
                 "%Y-%m-%d %H:%M:%S.%f UTC", "%Y-%m-%d %H:%M:%S %z %Z")
TIME_PATTERNS = tuple(d + t + z for d in DATE_LAYOUTS for t in TIME_LAYOUTS
                      for z in ("", " %z")) + OTHER_LAYOUTS
SORTING_DIRECTIVES = ("Y", "m", "d", "H", "M", "S", "f")
ISO_PARTS = re.compile(r"(\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d)?)?)(\.\d+)?(.*)")


@dataclasses.dataclass(frozen=True)
class TimeFormat:
    """How a column writes time: detected from sampled values, or configured.

    kind is 'iso' (ISO-8601 text), 'epoch' (seconds, milliseconds or microseconds,
    told apart by size), 'julian' (SQLite julianday() numbers) or 'strptime' (text in
    `pattern`). `sorts` says whether the stored values sort as time (a cursor can
    follow them); `why` says why not, or which of two readings was chosen.
    """

    kind: str = "iso"
    pattern: str | None = None
    sorts: bool = True
    why: str = ""
    layout: object = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.pattern:
            object.__setattr__(self, "layout", layout_regex(self.pattern))

    @property
    def native(self):
        """True when parse_timestamp reads the stored values as they are."""
        return self.kind in ("iso", "epoch")

    def describe(self):
        """The format as people read it."""
        if self.kind == "strptime":
            return f"text in {self.pattern}"
        return {"iso": "ISO-8601 text", "epoch": "epoch numbers",
                "julian": "julianday() numbers"}[self.kind]

    def micros(self, value):
        """Microseconds since the epoch (UTC) for a stored value, else None."""
        if self.kind == "julian" and is_number(value):
            return julian_to_micros(value)
        if self.kind == "strptime" and isinstance(value, str):
            micros = layout_micros(value.strip(), self.layout) if self.layout else None
            if micros is None:
                micros = strptime_micros(value, self.pattern)
            return micros if micros is not None else parse_iso_timestamp(value.strip())
        return parse_timestamp(value)


ISO_FORMAT = TimeFormat()


def is_number(value):
    """Numbers (bool included, as SQLite stores it) compare with numbers only."""
    return isinstance(value, (int, float))


def julian_to_micros(number):
    """Microseconds since the epoch for a julianday() number."""
    if not math.isfinite(number) or not JULIAN_RANGE[0] <= number <= JULIAN_RANGE[1]:
        return None
    # SQLite keeps a julian day as whole milliseconds (iJD); round back to them
    return int(round((number - JULIAN_UNIX_EPOCH) * 86_400_000)) * 1000


def strptime_micros(text, pattern):
    """Microseconds for text in a strptime pattern (UTC when it has no zone), else None."""
    try:
        return moment_to_micros(dt.datetime.strptime(text.strip(), pattern))
    except ValueError:
        return None


LAYOUT_FIELDS = {"Y": r"(\d{4})", "m": r"(\d{1,2})", "d": r"(\d{1,2})", "H": r"(\d{1,2})",
                 "M": r"(\d{1,2})", "S": r"(\d{1,2})"}


def layout_regex(pattern):
    """(regex, fields) that read a layout of only %Y %m %d %H %M %S as strptime does,
    about ten times faster; None for any other layout (strptime reads it)."""
    parts = re.split(r"(%.)", pattern)
    fields = [p[1] for p in parts[1::2]]
    if "Y" not in fields or len(set(fields)) < len(fields) or not set(fields) <= set(
            LAYOUT_FIELDS):
        return None
    regex = "".join(LAYOUT_FIELDS[p[1]] if i % 2 else re.escape(p)
                    for i, p in enumerate(parts))
    return re.compile(regex), fields


def layout_micros(text, layout):
    """Microseconds for text read with layout_regex(), else None."""
    match = layout[0].fullmatch(text)
    if not match:
        return None
    got = dict(zip(layout[1], map(int, match.groups())))
    try:
        return moment_to_micros(dt.datetime(got["Y"], got.get("m", 1), got.get("d", 1),
                                            got.get("H", 0), got.get("M", 0), got.get("S", 0)))
    except ValueError:
        return None


def epoch_scale(number):
    """0, 1, 2, 3 for epoch seconds, milliseconds, microseconds, nanoseconds."""
    size = abs(number)
    return 0 if size < 1e11 else 1 if size < 1e14 else 2 if size < 1e17 else 3


def detect_time_format(values, pattern=None):
    """The TimeFormat of a column from its sampled non-NULL values (or `pattern`)."""
    numbers = [v for v in values if is_number(v)]
    texts = [v for v in values if isinstance(v, str)]
    if pattern and (texts or not values):
        return pattern_format(pattern, texts)
    if len(numbers) + len(texts) < len(values):
        return TimeFormat(sorts=False, why="it holds BLOB values")
    if numbers and texts:
        kind = "epoch" if len(numbers) >= len(texts) else "iso"
        return TimeFormat(kind, sorts=False, why="it mixes numbers and text, which "
                          "SQLite sorts apart")
    if numbers:
        return number_format(numbers)
    return text_format(texts) if texts else ISO_FORMAT


def number_format(numbers):
    """julianday() when every number is a julian day of 1800..2300, else epoch."""
    if all(JULIAN_RANGE[0] <= n <= JULIAN_RANGE[1] for n in numbers):
        return TimeFormat("julian")
    if len({epoch_scale(n) for n in numbers}) > 1:
        return TimeFormat("epoch", sorts=False, why="it mixes epoch seconds, "
                          "milliseconds or microseconds")
    return TimeFormat("epoch")


def text_format(texts):
    """ISO-8601, numeric text, or the strptime pattern that reads the most values."""
    try:
        [float(t) for t in texts]
    except ValueError:
        pass
    else:
        same = len({re.sub(r"\d", "9", t) for t in texts}) == 1
        return TimeFormat("epoch", sorts=same, why="" if same else
                          "its numbers are text of different widths, which sort "
                          "alphabetically")
    if all(parse_iso_timestamp(t.strip()) is not None for t in texts):
        why = iso_order_problem(texts)
        return TimeFormat("iso", sorts=not why, why=why)
    return guess_pattern(texts)


def iso_order_problem(texts):
    """Why ISO-8601 texts would not sort as time ('' when they do)."""
    parts = [ISO_PARTS.fullmatch(t) for t in texts]
    if not all(parts):
        return "some values are not plain ISO-8601 text"
    if len({re.sub(r"\d", "9", m[1]) for m in parts}) > 1:
        return "its values mix layouts (such as 'T' and space, or dates with times)"
    zones = {m[3] for m in parts}
    if len(zones) > 1:
        return "its values carry different time zones"
    if min(zones)[:1] > "." and len({bool(m[2]) for m in parts}) > 1:
        # '10:00:00Z' sorts after '10:00:00.5Z'; a '+01:00' or ' UTC' zone sorts before
        return "some values have a fraction of a second before the zone and some not"
    return ""


def guess_pattern(texts):
    """The strptime pattern reading the most sampled texts; a warning when the day and
    month could be read either way."""
    def score(pattern, values):
        return sum(strptime_micros(t, pattern) is not None for t in values)

    head = texts[:20]
    candidates = [p for p in TIME_PATTERNS if score(p, head)]
    scores = {p: score(p, texts) for p in candidates}
    if not scores:
        return TimeFormat(sorts=False, why=f"values like {texts[0]!r} are not a time "
                          "this tool recognises (give the layout with --timestamp-format)")
    best = max(scores.values())
    chosen = next(p for p in candidates if scores[p] == best)
    fmt = pattern_format(chosen, texts)
    twin = chosen.replace("%m", "%@").replace("%d", "%m").replace("%@", "%d")
    if twin != chosen and scores.get(twin) == best:
        fmt = dataclasses.replace(fmt, why=(
            f"{fmt.why}; " if fmt.why else "") + f"every sampled value such as "
            f"{texts[0]!r} reads as {chosen} and as {twin}: chose {chosen}; to read it "
            f"the other way, set --timestamp-format '{twin}'")
    return fmt


def pattern_format(pattern, texts):
    """A strptime TimeFormat; it sorts as time only when its fields go from the year down
    to the second in fixed widths (checked on the sampled texts)."""
    if "%" not in pattern:
        raise ConfigError(f"config: timestamp_format {pattern!r} has no strptime "
                          "directive (such as %Y-%m-%d %H:%M)")
    fields = tuple(re.findall(r"%(.)", pattern))
    sorts = fields == SORTING_DIRECTIVES[:len(fields)] and all(
        round_trips(t, pattern) for t in texts)
    why = "" if sorts else f"text in {pattern} sorts alphabetically, not as time"
    return TimeFormat("strptime", pattern, sorts, why)


def round_trips(text, pattern):
    """True when `text` is exactly what `pattern` writes (zero-padded, fixed width)."""
    try:
        return dt.datetime.strptime(text, pattern).strftime(pattern) == text
    except ValueError:
        return False


def normalize_times(values, fmt):
    """Values of a column in a non-native format as ISO-8601 UTC text, so that every
    sink and stage reads the same instant; what does not parse stays as it was."""
    out = []
    for value in values:
        micros = fmt.micros(value) if value is not None else None
        out.append(micros_to_sql(micros) if micros is not None else value)
    return out


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


def coerce_one(value, kind, i, name, rescued):
    """Typed value, or None with the original kept in `rescued`."""
    typed, fits = coerce_value(value, kind)
    if not fits:
        rescued.setdefault(i, {})[name] = jsonable(value)
    return typed


def coerce_column(values, kind, name, rescued):
    """Typed values of one column; misfits become NULL and go into `rescued`."""
    return [coerce_one(value, kind, i, name, rescued) for i, value in enumerate(values)]


def rescued_json(rescued, count):
    """The `_rescued_data` column: one JSON object per row that had misfits."""
    return [json.dumps(rescued[i], ensure_ascii=False, sort_keys=True)
            if i in rescued else None for i in range(count)]


# === Processing ======================================================================
# Pure functions over column-major batches (names, kinds, values): no I/O, no
# globals. Stages run in the order sanitize -> filter -> aggregate.

FILTER_OPS = (">", ">=", "<", "<=", "==", "!=", "in", "not_in", "is_null")
AGG_FUNCTIONS = ("avg", "min", "max", "sum", "count")
TIME_PARTS = {"hour_of_day": BIGINT, "minute_of_hour": BIGINT, "day_of_week": BIGINT,
              "day_of_month": BIGINT, "month": BIGINT, "year": BIGINT, "date": STRING}
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MICROS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Rule:
    """One compiled sanitize rule: op is remove|replace|hash|round|drop|null."""

    column: str
    op: str
    arg: object = None
    arg2: object = None


@dataclasses.dataclass(frozen=True)
class Condition:
    """One compiled filter condition on a column."""

    column: str
    op: str
    operand: object


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """A compiled aggregate spec; window and grace are in microseconds (0: none)."""

    group_by: tuple
    measures: tuple  # ((column, (functions...)), ...); column "records" counts rows
    window: int = 0
    grace: int = 0
    timestamp_col: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The processing stages enabled, compiled and validated."""

    sanitize: tuple = ()
    filter: tuple = ()
    aggregate: Aggregation | None = None
    hash_key: bytes = dataclasses.field(default=b"", repr=False)

    @property
    def is_raw(self):
        return not (self.sanitize or self.filter or self.aggregate)


def compile_plan(config, source, environ):
    """Validate the enabled stages against the source columns; one error names the fault."""
    check_stages_enabled(config)
    names = list(source.column_names)
    kinds = dict(zip(names, source_kinds(source)))
    plan = {}
    if config.enable_sanitize:
        plan["sanitize"] = compile_sanitize(config, names, kinds)
        if any(rule.op == "hash" for rule in plan["sanitize"]):
            key = environ.get("SANITIZE_HASH_KEY", "")
            if not key:
                raise ConfigError("config: sanitize_config uses hash but SANITIZE_HASH_KEY "
                                  "is not set; set it to the same secret on every node")
            plan["hash_key"] = key.encode()
        for rule in plan["sanitize"]:
            if rule.op == "drop":
                names.remove(rule.column)
            elif rule.op == "hash":
                kinds[rule.column] = STRING
    if config.enable_filter:
        plan["filter"] = compile_filter(config, names, kinds)
    if config.enable_aggregate:
        plan["aggregate"] = compile_aggregate(config, names, kinds, source.timestamp_col)
    return Plan(**plan)


STAGE_HARM = {"sanitize": "with the columns it drops, hashes or masks in the clear",
              "filter": "unfiltered", "aggregate": "row by row, not aggregated"}


def check_stages_enabled(config):
    """A stage's config without its enable flag is a mistake that would leak rows."""
    for stage, harm in STAGE_HARM.items():
        if getattr(config, f"{stage}_config") and not getattr(config, f"enable_{stage}"):
            raise ConfigError(
                f"config: {stage}_config is set (from {config.origin(stage + '_config')}) "
                f"but enable_{stage} is off (from {config.origin('enable_' + stage)}): "
                f"rows would go out {harm}; set {SETTINGS['enable_' + stage].env[0]}=true "
                f"(or {SETTINGS['enable_' + stage].flag}), or remove {stage}_config")


def stage_spec(config, stage):
    """The JSON spec of a stage, required once the stage is enabled."""
    spec = getattr(config, f"{stage}_config")
    if not spec:
        raise ConfigError(f"config: enable_{stage} is set (from "
                          f"{config.origin('enable_' + stage)}) but {stage}_config is empty; "
                          f"set {stage.upper()}_CONFIG or {stage}_config in the YAML file")
    return spec, f"{stage}_config (from {config.origin(stage + '_config')})"


def find_column(column, names):
    """The real name of `column`: exact, else matched case-insensitively as SQLite
    matches column names (`Temperature` is `temperature`); None when absent."""
    if column in names:
        return column
    folded = [name for name in names if name.lower() == column.lower()]
    return folded[0] if folded else None


def check_column(column, names, where):
    """The real name of `column`; an unknown one is a config error with a "did you
    mean" and the known columns."""
    found = find_column(column, names)
    if found is not None:
        return found
    folded = {name.lower(): name for name in names}
    near = difflib.get_close_matches(column.lower(), list(folded), n=1)
    hint = f" (did you mean {folded[near[0]]!r}?)" if near else ""
    shown = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)"
                                     if len(names) > 30 else "")
    raise ConfigError(f"config: {where}: unknown column {column!r}{hint}; columns: {shown}")


def check_unique(columns, where):
    """Two entries that name one column (e.g. spelled in two cases) are a config error."""
    seen = {}
    for given, real in columns:
        if real in seen:
            raise ConfigError(f"config: {where}: {seen[real]!r} and {given!r} name the same "
                              f"column {real!r}; keep one")
        seen[real] = given


def compile_sanitize(config, names, kinds):
    """Rules from {column: regex | {replace_value, with_value} | {hash|round|drop|null}}."""
    spec, where = stage_spec(config, "sanitize")
    rules, given = [], []
    for column, action in spec.items():
        real = check_column(column, names, where)
        given.append((column, real))
        rule = compile_rule(real, action, where)
        if rule.op == "round" and kinds.get(real) in (STRING, BINARY):
            raise ConfigError(f"config: {where}: round for {column!r} needs a numeric "
                              f"column, but its declared type makes it {kinds[real]}, so "
                              "its values would go out unrounded; use a regex, replace, "
                              "hash, null or drop rule")
        rules.append(rule)
    check_unique(given, where)
    return tuple(rules)


def compile_rule(column, action, where):
    """One sanitize rule, checked."""
    if isinstance(action, str):
        try:
            return Rule(column, "remove", re.compile(action))
        except re.error as exc:
            raise ConfigError(f"config: {where}: bad regex for {column!r}: {exc}") from None
    if not isinstance(action, dict):
        raise ConfigError(f"config: {where}: rule for {column!r} must be a regex string "
                          "or an object")
    keys = set(action)
    if keys == {"replace_value", "with_value"}:
        return Rule(column, "replace", action["replace_value"], action["with_value"])
    if keys == {"round"} and isinstance(action["round"], int) and not isinstance(
            action["round"], bool):
        return Rule(column, "round", action["round"])
    for op in ("hash", "drop", "null"):
        if keys == {op} and action[op] is True:
            return Rule(column, op)
    raise ConfigError(f"config: {where}: rule for {column!r} must be one of "
                      "{replace_value, with_value}, {hash: true}, {round: N}, "
                      f"{{drop: true}}, {{null: true}} (got {json.dumps(action)})")


def compile_filter(config, names, kinds):
    """Conditions from {column: scalar | {op: operand, ...}}; all must hold."""
    spec, where = stage_spec(config, "filter")
    conditions = []
    for column, test in spec.items():
        column = check_column(column, names, where)
        pairs = test.items() if isinstance(test, dict) else [
            ("is_null", True) if test is None else ("==", test)]
        for op, operand in pairs:
            conditions.append(compile_condition(column, op, operand, kinds.get(column), where))
    return tuple(conditions)


def compile_condition(column, op, operand, kind, where):
    """One filter condition, with its operand checked against the column's type."""
    if op not in FILTER_OPS:
        raise ConfigError(f"config: {where}: unknown operator {op!r} for {column!r}; "
                          f"operators: {', '.join(FILTER_OPS)}")
    if op == "is_null":
        if not isinstance(operand, bool):
            raise ConfigError(f"config: {where}: is_null for {column!r} takes true or false")
        return Condition(column, op, operand)
    if op in ("in", "not_in"):
        if not isinstance(operand, list):
            raise ConfigError(f"config: {where}: {op} for {column!r} takes a list")
        for item in operand:
            check_operand(column, op, item, kind, where)
        return Condition(column, op, tuple(operand))
    check_operand(column, op, operand, kind, where)
    return Condition(column, op, operand)


def check_operand(column, op, operand, kind, where):
    """Text against a numeric column, or a number against a text column, is an error."""
    if isinstance(operand, (dict, list)) or operand is None:
        raise ConfigError(f"config: {where}: {op} for {column!r} takes a number or text "
                          f"(got {json.dumps(operand)})")
    numeric = isinstance(operand, (int, float))
    if (kind in (BIGINT, DOUBLE, BOOLEAN) and not numeric) or (kind == STRING and numeric):
        raise ConfigError(f"config: {where}: {column!r} holds {kind} values, which never "
                          f"compare with {json.dumps(operand)}")


def compile_aggregate(config, names, kinds, timestamp_col):
    """The aggregate spec: group_by, aggregations, optional window and grace."""
    spec, where = stage_spec(config, "aggregate")
    unknown = set(spec) - {"group_by", "aggregations", "window", "grace"}
    if unknown:
        raise ConfigError(f"config: {where}: unknown key {sorted(unknown)[0]!r}; keys: "
                          "group_by, aggregations, window, grace")
    group_by = spec.get("group_by") or []
    if isinstance(group_by, str):
        group_by = [group_by]
    if not isinstance(group_by, list) or not all(isinstance(c, str) for c in group_by):
        raise ConfigError(f"config: {where}: group_by must be a column name or a list of "
                          f"them (got {json.dumps(group_by)})")
    group_by = compile_group_by(group_by, names, timestamp_col, where + ": group_by")
    measures = compile_measures(spec.get("aggregations"), names, kinds, where)
    window = parse_duration(spec.get("window"), "window", where)
    grace = parse_duration(spec.get("grace"), "grace", where)
    if window and not timestamp_col:
        raise ConfigError(f"config: {where}: a window needs a timestamp column")
    if window and timestamp_col not in names:
        raise ConfigError(f"config: {where}: the window needs {timestamp_col!r}, which "
                          "sanitize_config drops")
    return Aggregation(tuple(group_by), measures, window, grace, timestamp_col)


def compile_group_by(group_by, names, timestamp_col, where):
    """Real column names, or time parts of the timestamp (a column of that name wins)."""
    given = []
    for column in group_by:
        real = find_column(column, names) or check_column(column, names + list(TIME_PARTS),
                                                          where)
        if real not in names and not timestamp_col:
            raise ConfigError(f"config: {where}: {column!r} needs a timestamp column")
        given.append((column, real))
    check_unique(given, where)
    return [real for _, real in given]


def compile_measures(aggregations, names, kinds, where):
    """((column, (functions...)), ...) from {column: fn | [fn, ...]}."""
    if not isinstance(aggregations, dict) or not aggregations:
        raise ConfigError(f"config: {where}: aggregations must map columns to "
                          f"{'|'.join(AGG_FUNCTIONS)}")
    measures, given = [], []
    for column, fns in aggregations.items():
        fns = [fns] if isinstance(fns, str) else fns
        if not isinstance(fns, list) or not fns:
            raise ConfigError(f"config: {where}: aggregations for {column!r} must be a "
                              "function name or a list of them")
        for fn in fns:
            if fn not in AGG_FUNCTIONS:
                raise ConfigError(f"config: {where}: unknown aggregation {fn!r} for "
                                  f"{column!r}; functions: {', '.join(AGG_FUNCTIONS)}")
        if column == "records" and find_column(column, names) is None:
            if fns != ["count"]:
                raise ConfigError(f"config: {where}: 'records' counts rows; use "
                                  "\"records\": \"count\"")
            real = column
        else:
            real = check_column(column, names, where + ": aggregations")
            if kinds.get(real) in (STRING, BINARY) and set(fns) & {"avg", "sum"}:
                raise ConfigError(f"config: {where}: cannot avg or sum {column!r}: it "
                                  f"holds {kinds[real]} values")
        given.append((column, real))
        measures.append((real, tuple(fns)))
    check_unique(given, where + ": aggregations")
    return tuple(measures)


def parse_duration(text, key, where):
    """'15m' -> microseconds; None -> 0."""
    if text is None:
        return 0
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", str(text))
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"config: {where}: {key} must look like 30s, 15m, 1h or 1d "
                          f"(got {json.dumps(text)})")
    return int(match.group(1)) * WINDOW_UNITS[match.group(2)] * MICROS


def process_batch(plan, chunk, carry):
    """Run the enabled stages over a chunk; return (chunk, carry after it)."""
    if plan.is_raw:
        return chunk, carry
    names, kinds, values = list(chunk.columns), list(chunk.kinds), list(chunk.values)
    count, notes, keys = chunk.count, {}, chunk.keys
    if plan.sanitize:
        names, kinds, values = sanitize_columns(plan.sanitize, names, kinds, values,
                                                plan.hash_key)
    if plan.filter:  # the rows' cursor keys are filtered with them (a sink's lineage)
        width = len(values)
        values, kept = filter_columns(plan.filter, names, values + list(keys), count)
        values, keys = values[:width], values[width:]
        notes["filtered_out"], count = count - kept, kept
    if plan.aggregate:
        names, kinds, values, carry, agg_notes = aggregate_columns(
            plan.aggregate, names, kinds, values, count, carry)
        notes.update(agg_notes)
        count = len(values[0]) if values else 0
    out = dataclasses.replace(chunk, columns=names, kinds=kinds, values=values, count=count,
                              notes=notes, keys=keys)
    return out, carry


def sanitize_columns(rules, names, kinds, values, hash_key):
    """Apply sanitize rules column by column."""
    for rule in rules:
        i = names.index(rule.column)
        if rule.op == "drop":
            del names[i], kinds[i], values[i]
            continue
        values[i] = sanitize_values(rule, values[i], hash_key)
        if rule.op == "hash":
            kinds[i] = STRING
    return names, kinds, values


def sanitize_values(rule, column, hash_key):
    """One sanitized column."""
    if rule.op == "remove":
        sub = rule.arg.sub
        return [sub("", v) if type(v) is str else v for v in column]
    if rule.op == "replace":
        old, new = rule.arg, rule.arg2
        if isinstance(old, str) and isinstance(new, str):
            return [v.replace(old, new) if type(v) is str else v for v in column]
        return [new if v == old and type(v) is type(old) else v for v in column]
    if rule.op == "round":
        digits = rule.arg
        return [round(v, digits) if type(v) is float else v for v in column]
    if rule.op == "null":
        return [None] * len(column)
    return hash_column(column, hash_key)


def hash_column(column, key):
    """Keyed SHA-256 (HMAC) hex of each value; the same value gives the same hash."""
    import hmac
    cache = {}
    out = []
    for value in column:
        if value is None:
            out.append(None)
            continue
        digest = cache.get(value)
        if digest is None:
            raw = value if isinstance(value, bytes) else str(value).encode()
            digest = cache[value] = hmac.digest(key, raw, "sha256").hex()
        out.append(digest)
    return out


def filter_columns(conditions, names, values, count):
    """Keep the rows where every condition holds; return (values, rows kept)."""
    import itertools
    mask = None
    for cond in conditions:
        column = values[names.index(cond.column)]
        test = condition_test(cond)
        hits = [test(v) for v in column]
        mask = hits if mask is None else [a and b for a, b in zip(mask, hits)]
    kept = sum(mask)
    if kept == count:
        return values, kept
    return [list(itertools.compress(column, mask)) for column in values], kept


def condition_test(cond):
    """A predicate for one condition. NULL satisfies no comparison."""
    op, operand = cond.op, cond.operand
    if op == "is_null":
        return (lambda v: v is None) if operand else (lambda v: v is not None)
    if op in ("in", "not_in"):
        keyed = {(is_number(x), x) for x in operand}
        inside = op == "in"
        return lambda v: v is not None and ((is_number(v), v) in keyed) == inside
    numeric = is_number(operand)
    compare = {">": lambda a: a > operand, ">=": lambda a: a >= operand,
               "<": lambda a: a < operand, "<=": lambda a: a <= operand,
               "==": lambda a: a == operand, "!=": lambda a: a != operand}[op]
    return lambda v: v is not None and is_number(v) == numeric and (
        numeric or type(v) is type(operand)) and compare(v)


def time_part(part, micros):
    """A derived group-by value from a timestamp in microseconds."""
    moment = EPOCH + dt.timedelta(microseconds=micros)
    if part == "hour_of_day":
        return moment.hour
    if part == "minute_of_hour":
        return moment.minute
    if part == "day_of_week":
        return moment.isoweekday()
    if part == "day_of_month":
        return moment.day
    if part == "month":
        return moment.month
    if part == "year":
        return moment.year
    return moment.date().isoformat()


def aggregate_columns(spec, names, kinds, values, count, carry):
    """Group rows and aggregate; with a window, emit closed windows and carry open ones.

    A window [start, end) closes when a row at or after end + grace has been read
    (the watermark, in read order). A row whose window is already closed when it is
    read is late: counted, not aggregated. Both depend only on the read order, so
    the output is the same however the rows are split into batches and cycles.
    """
    column = dict(zip(names, values))
    stamps = timestamp_micros(column, spec)
    groups = [column[g] if g in column else derived_part(g, stamps) for g in spec.group_by]
    measured = [(m, column.get(m)) for m, _ in spec.measures]
    families = [kinds[names.index(m)] == STRING if m in column else False
                for m, _ in spec.measures]
    state = decode_carry(carry)
    open_, watermark = state["open"], state["watermark"]
    late = untimed = 0
    for i in range(count):
        ts = stamps[i] if stamps is not None else None
        if stamps is not None and ts is None:
            untimed += 1
            continue
        start = ts - ts % spec.window if spec.window else None
        if spec.window and watermark is not None and \
                start + spec.window + spec.grace <= watermark:
            late += 1
            continue
        key = (tuple(g[i] for g in groups), start)
        acc = open_.get(key)
        if acc is None:
            acc = open_[key] = [0, {m: [0, 0, None, None] for m, col in measured
                                    if col is not None}]
        acc[0] += 1
        for (name, col), text in zip(measured, families):
            if col is not None:
                accumulate(acc[1][name], col[i], text)
        if spec.window and (watermark is None or ts > watermark):
            watermark = ts
    done = closed_keys(open_, spec, watermark)
    rows = [emit_row(key, open_.pop(key), spec) for key in done]
    notes = {k: v for k, v in (("late", late), ("untimed", untimed)) if v}
    carry = encode_carry(open_, watermark) if spec.window else None
    out_names, out_kinds = aggregate_schema(spec, names, kinds)
    out_values = [list(col) for col in zip(*rows)] if rows else [[] for _ in out_names]
    return out_names, out_kinds, out_values, carry, notes


def timestamp_micros(column, spec):
    """Row timestamps in microseconds when the spec needs them, else None."""
    needs = spec.window or any(g in TIME_PARTS and g not in column for g in spec.group_by)
    if not needs:
        return None
    cache = {}
    out = []
    for value in column[spec.timestamp_col]:
        micros = cache.get(value, ...) if value is not None else None
        if micros is ...:
            micros = cache[value] = parse_timestamp(value)
        out.append(micros)
    return out


def derived_part(part, stamps):
    """A column of a time part (hour_of_day, ...) computed from the timestamps."""
    cache = {}
    out = []
    for micros in stamps:
        if micros is None:
            out.append(None)
            continue
        minute = micros - micros % (60 * MICROS)  # every part is constant within it
        value = cache.get(minute)
        if value is None:
            value = cache[minute] = time_part(part, micros)
        out.append(value)
    return out


def accumulate(acc, value, text):
    """Fold one value into [count, sum, min, max]; text columns only min/max."""
    if value is None or (text and type(value) is not str) or (
            not text and not is_number(value)):
        return
    acc[0] += 1
    if not text:
        acc[1] += value
    if acc[2] is None or value < acc[2]:
        acc[2] = value
    if acc[3] is None or value > acc[3]:
        acc[3] = value


def closed_keys(open_, spec, watermark):
    """Keys to emit now: every group without a window; closed windows with one."""
    if not spec.window:
        keys = list(open_)
    elif watermark is None:
        keys = []
    else:
        keys = [k for k in open_ if k[1] + spec.window + spec.grace <= watermark]
    return sorted(keys, key=lambda k: (k[1] or 0, json.dumps(k[0], default=str)))


def measure_outputs(spec):
    """(output column, measure column, function) in output order."""
    out = []
    for column, fns in spec.measures:
        if column == "records" and fns == ("count",):
            out.append(("records", column, "records"))
            continue
        wanted = list(fns) + [f for f in ("sum", "count") if "avg" in fns and f not in fns]
        out.extend((f"{column}_{fn}", column, fn) for fn in wanted)
    if not any(name == "records" for name, _, _ in out):
        out.append(("records", None, "records"))
    return out


def aggregate_schema(spec, names, kinds):
    """Output column names and kinds of the aggregate stage."""
    kind_of = dict(zip(names, kinds))
    out_names = list(spec.group_by)
    out_kinds = [kind_of.get(g) or TIME_PARTS.get(g) for g in spec.group_by]
    if spec.window:
        out_names += ["window_start", "window_end"]
        out_kinds += [TIMESTAMP, TIMESTAMP]
    for name, column, fn in measure_outputs(spec):
        source = kind_of.get(column)
        out_names.append(name)
        out_kinds.append(BIGINT if fn in ("count", "records") else DOUBLE if fn == "avg"
                         else (BIGINT if source in (BIGINT, BOOLEAN) else DOUBLE)
                         if fn == "sum" else source)
    return out_names, out_kinds


def emit_row(key, acc, spec):
    """One output row for a (group, window) accumulator."""
    group, start = key
    row = list(group)
    if spec.window:
        row += [micros_to_iso(start), micros_to_iso(start + spec.window)]
    records, measures = acc
    for _name, column, fn in measure_outputs(spec):
        if fn == "records":
            row.append(records)
            continue
        count, total, low, high = measures[column]
        row.append({"count": count, "sum": total if count else None, "min": low,
                    "max": high, "avg": total / count if count else None}[fn])
    return row


def micros_to_iso(micros):
    """Microseconds since the epoch as ISO-8601 UTC text."""
    return (EPOCH + dt.timedelta(microseconds=micros)).isoformat()


def encode_carry(open_, watermark):
    """Open windows as JSON-safe data for the checkpoint."""
    return {"watermark": watermark,
            "open": [[encode_cursor(list(group)), start, acc[0],
                      {m: list(v) for m, v in acc[1].items()}]
                     for (group, start), acc in open_.items()]}


def decode_carry(carry):
    """Inverse of encode_carry; a missing carry is an empty one."""
    if not carry:
        return {"open": {}, "watermark": None}
    open_ = {(tuple(decode_cursor(group)), start):
             [records, {m: list(v) for m, v in measures.items()}]
             for group, start, records, measures in carry["open"]}
    return {"open": open_, "watermark": carry["watermark"]}


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
    """Who writes: node, source table and state generation (one app per state; among
    many sources, one per position), and the source file's base name."""

    source_id: str
    source_table: str
    state_id: str
    source_file: str = ""
    scope: str = ""  # among many sources, the position's file and table (Job.scope)

    @property
    def app_id(self):
        return self.app_id_of(self.source_id)

    @property
    def source_path(self):
        """Among many sources, the source file's real path (from the scope), else "":
        files of one base name in two folders are two sources."""
        head, tail = " <- ", f":{self.source_table}"
        if not (self.scope.startswith(head) and self.scope.endswith(tail)):
            return ""
        return self.scope[len(head):-len(tail)]

    def with_source(self, status):
        """A node_status dict with the source it is about (for --fleet-status: a node
        with many sources reports once per source: file, by its real path, and table)."""
        return {**status, "source_file": self.source_file or None,
                "source_path": self.source_path or None,
                "source_table": self.source_table or None}

    def app_id_of(self, source_id):
        """The Delta transaction app id of batches written under `source_id`."""
        return f"{TOOL}/{source_id}/{self.source_table}/{self.state_id}"


@dataclasses.dataclass
class Batch:
    """What the cycle writes and checkpoints: the chunks of one read statement, processed
    and encoded by the sink (`payload`: one encoding per chunk that has rows, in order),
    with the cursor after them."""

    seq: int
    batch_id: str
    columns: list
    kinds: list
    count: int  # rows written
    payload: list
    cursor_end: list
    last_timestamp: object = None
    carry: object = None  # open aggregate windows after the batch
    source_count: int = 0  # rows read from the source
    rescued: int = 0  # rows with rescued values
    notes: dict = dataclasses.field(default_factory=dict)
    resend: bool = False  # the rows of an in-flight batch that did not land
    pending: int = None  # rows after it in the source, when the cycle knows
    mark: object = None  # what the sink's seal() keeps in the in-flight record
    cursor_row: dict = None  # row_mark() of the row at cursor_end


@dataclasses.dataclass
class Receipt:
    """What a sink did with a batch."""

    rows: int
    skipped: bool = False


def retry(action, *, what, is_transient, sleep, clock, jitter, attempts=None,
          deadline=None, first=1.0, cap=60.0, spread=(0.5, 1.0), on_retry=None,
          asked=None):
    """Run `action()` and return what it returns; when it raises an exception that
    `is_transient(exc)` says may pass, wait and run it again.

    The waits double from `first` seconds up to `cap`, each times `jitter(*spread)`,
    unless `asked(exc)` gives the wait the failure itself asks for (a Retry-After, in
    seconds; None: the backoff's). The retrying ends, and the last error stands, after
    `attempts` runs in all or once `deadline` seconds (by `clock`) have passed since the
    first failure (the last wait is cut to fit). `sleep(seconds)` waits; a true return
    (a stop was asked for) ends the retrying at once. Before each wait
    `on_retry(exc, retry, delay)` is called; by
    default one warning line says what failed (`what`: "writing batch 7f3a-12") and when
    it goes again. A sink passes its own sleep, clock and jitter (see Sink.retry).
    """
    failures, started = 0, None
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            failures += 1
            started = clock() if started is None else started
            waited = clock() - started
            if (attempts is not None and failures >= attempts) or (
                    deadline is not None and waited >= deadline):
                raise
            delay = min(first * 2 ** (failures - 1), cap) * jitter(*spread)
            wanted = asked(exc) if asked is not None else None
            delay = delay if wanted is None else wanted
            if deadline is not None:
                delay = min(delay, deadline - waited)
            (on_retry or log_retry(what))(exc, failures, delay)
            if sleep(delay):
                raise


def log_retry(what):
    """retry()'s default on_retry: one warning line per retry."""
    def say(exc, attempt, delay):
        said = str(exc) if isinstance(exc, UploaderError) else \
            f"sink: {what} failed: {first_line(exc)}"
        log.warning("%s; retry %d in %.1f s", said, attempt, delay)
    return say


def is_transient_sink_error(exc):
    """retry()'s test for errors the sinks raise: a SinkError marked transient."""
    return isinstance(exc, SinkError) and exc.transient


class Sink:
    """Where batches go. Implementations register in SINKS by name."""

    name = ""
    needs_workspace = True  # a Databricks workspace (databricks_host) is required
    # Waits between retries, as retry() takes them. The cycle gives a sink its StopFlag's
    # wait (a stop ends the waiting); a test gives a sink class its own, as a connector.
    sleep = staticmethod(time.sleep)
    clock = staticmethod(time.monotonic)
    jitter = staticmethod(random.uniform)

    def __init__(self, config, identity):
        self.config, self.identity = config, identity

    def retry(self, action, **how):
        """retry(action, **how) with this sink's sleep, clock and jitter."""
        return retry(action, sleep=self.sleep, clock=self.clock, jitter=self.jitter, **how)

    @classmethod
    def check_settings(cls, config):
        """Before a run or an action: the sink's settings are complete; the config with
        the values this sink derives from them."""
        return config

    @classmethod
    def defaults(cls, config):
        """While the config is validated: {setting: value} this target fills in when
        the user left it unset."""
        return {}

    @classmethod
    def for_actions(cls, config):
        """A sink for actions that write no batches (queries, self-test)."""
        return cls(config, Identity(config.source_id, "", ""))

    @classmethod
    def ddl(cls, database, table, names, kinds):
        """--print-ddl: the statements that make the routed table for these columns."""
        return [create_table_sql(qualified_name(database, table), names, kinds)]

    def announce(self):
        """Log what a user should know about this target at start (nothing by default)."""

    def query(self, sql, info_table=None):
        """--run-query: [(column names, rows), ...] of SQL, or of INFO (the tables, the
        target table's columns and row count)."""
        raise ConfigError(f"config: --run-query is not available on the {self.name} target")

    def self_test(self, name):
        """--test-upload: yield (step, error or None) for a scratch table `name`."""
        raise ConfigError(f"config: --test-upload is not available on the {self.name} target")

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

    def encode(self, table, chunk):
        """Encode one processed chunk of a batch; runs in the read-ahead thread, no I/O.
        Returns (payload, rows with rescued values); a batch's write gets the payloads
        of its chunks, in order, as `batch.payload`."""
        return None, 0

    def seal(self, table, batch):
        """After a batch's chunks are encoded (read-ahead thread): finish its payload;
        return what its in-flight record keeps for `has_committed(mark=...)` (JSON), or
        None."""
        return None

    def write(self, table, batch):
        """Append the batch, tagged with its batch id; skip it if already committed."""
        raise NotImplementedError

    def has_committed(self, table, seq, batch_id, source_id=None):
        """True when the batch (written as `source_id`, default ours) is in the table."""
        raise NotImplementedError

    def recover_position(self, table, source):
        """{cursor, carry} after this node's last batch in `table`, or None if none."""
        raise SinkError(f"sink: {self.name} cannot rebuild a lost state")

    # Why --recover-state of many sources is refused on this target (None: it works):
    # a file goes on only where the target keeps, per batch, the mark of the row at its
    # cursor end (row_mark), which tells whether the file now under its name is the one
    # its rows came from.
    recover_files_refused = ("it keeps no record, per batch, of the row at the batch's "
                             "cursor, so it cannot tell whether the file now under a "
                             "name is the one its rows came from")

    def recover_files(self, table, source):
        """--recover-state among many sources: {file name: {cursor, carry, batch_id,
        cursor_row}} of this node's newest batch in `table` from each file name (the base
        name its rows carry) and source table `source.name`; {} when there are none."""
        raise SinkError(f"sink: --recover-state with many sources is not available on "
                        f"the {self.name} target: {self.recover_files_refused}")

    def count_rows(self, table, source_id):
        """Rows of node `source_id` in `table` (0 when the table does not exist)."""
        raise NotImplementedError

    def count_file_rows(self, table, source_id, source_file, sent=()):
        """{batch id: rows} of node `source_id`'s rows from file `source_file` (their
        `_source_file`, a base name) in `table`, but for batches of a prefix in `sent`
        (see batch_prefix); {} when there are none. Rows of versions before
        `_source_file` (NULL there, or no such column) may be of any file: they count."""
        raise NotImplementedError

    def read_keys(self, table, source_id, names):
        """The set of (values of `names`) of node `source_id`'s rows in `table`."""
        raise NotImplementedError

    def upkeep(self, table):
        """After each cycle in loop mode: table upkeep when it is due (Delta)."""

    def report_status(self, status):
        """After each cycle, per target table: the node's status (a plain dict: source_id,
        table, cursor, pending, behind, last_batch, last_upload, rows, version, last_error,
        lag_seconds, interval) for --fleet-status. Never raises: the cycle's rows do not
        depend on it. Nothing by default (a Delta commit carries it in its metadata)."""

    def retire_status(self, table):
        """The node forgot this sink's source file (gone for FORGET_AFTER): remove the
        status report_status recorded about it for `table`, in one log line. Never
        raises: a status left behind only keeps a line of --fleet-status. Nothing by
        default."""

    def maintain(self, table):
        """--maintain: compact, checkpoint and vacuum the table."""
        raise ConfigError(f"config: --maintain is for Delta tables; the {self.name} "
                          "target looks after its own tables")

    def upkeep_warning(self, table):
        """A line for --status when the table needs upkeep, else None."""
        return None

    def list_tables(self):
        """The target's table names, or None when it cannot list them cheaply."""
        return None

    @classmethod
    def ingest_sql(cls, config, tables):
        """--print-ingest-sql: the SQL that loads what this target lands in `tables`."""
        raise ConfigError(f"config: --print-ingest-sql is for the landing target; the "
                          f"{cls.name} target writes its tables itself")

    def fleet(self, table):
        """--fleet-status: one record per node that wrote to `table`."""
        raise ConfigError(f"config: --fleet-status reads the Delta log; it does not "
                          f"support the {self.name} target yet")

    def close(self):
        """Release connections."""


SINKS = {}


BATCH_SEQ = re.compile(r"(-backfill)?-\d+(\.\d+/\d+)?$")  # a batch id after its prefix


def batch_prefix(batch_id):
    """What the batch ids of one position share: the state id and, among many sources,
    the position's tag (without the stream, the sequence number and the part)."""
    return BATCH_SEQ.sub("", batch_id)


def unsent(counts, sent):
    """{batch id: rows} of `counts` (pairs) but for batches of a prefix in `sent`."""
    return {batch_id: n for batch_id, n in counts if batch_prefix(batch_id) not in sent}


def register_sink(cls):
    """Class decorator: make a sink selectable by its name."""
    SINKS[cls.name] = cls
    return cls


def sink_class(config):
    """The sink class the config chooses."""
    return SINKS[config.target]


def chosen_sink(config):
    """While the config is validated: the sink class `target` names, else the default
    (the SQL warehouse when a workspace is configured, else the local Delta lakehouse)."""
    name = config.target or ("databricks" if config.databricks_host else "delta")
    if name not in SINKS:
        raise ConfigError(f"config: target {name} (from {config.origin('target')}) is not "
                          "available in this version")
    return SINKS[name]


def make_sink(config, identity):
    """The sink chosen by the config."""
    return sink_class(config)(config, identity)


def lineage_values(chunk, identity, uploaded_micros, rescued):
    """Values of the lineage columns for every row of the chunk."""
    n = chunk.count
    return [[identity.source_id] * n, [chunk.batch_id] * n, [uploaded_micros] * n,
            rescued_json(rescued, n), [identity.source_file or None] * n]


@register_sink
class DeltaSink(Sink):
    """Append to Delta tables under a path or object-store URI with deltalake.

    Many nodes may append to one table. deltalake retries a commit that lost the race
    for a log version itself (up to COMMIT_RETRIES times, without writing the data files
    again); what it gives up on (a table another node created a moment earlier: "protocol
    changed") is retried here after a jittered pause. Each commit is read back at its
    version: one that vanished is an error, never rows lost in silence.
    """

    name = "delta"
    needs_workspace = False

    @classmethod
    def defaults(cls, config):
        return {} if config.delta_uri else {"delta_uri": DEFAULT_DELTA_URI}
    RETRIES = 8
    # retry(): waits doubling from 0.4 s to 30 s, jittered by half either way
    BACKOFF = {"attempts": RETRIES, "first": 0.4, "cap": 30, "spread": (0.5, 1.5)}
    COMMIT_RETRIES = 100
    # a DeltaTable kept up to date with update_incremental() replays every commit since
    # it was opened; opened again from the newest checkpoint every so many versions, a
    # commit stays as cheap as in a new process (at 1,500 commits, 24 ms instead of
    # 128 ms; bench/FLEET.md)
    REOPEN_EVERY = 100
    TARGET_FILE_SIZE = 128 * 2 ** 20
    MANY_FILES = 1_000  # --status warns above: at 1,000 small files a local commit costs
    # 1.3x the first, at 10,000 about 8x (bench/FLEET.md)

    def __init__(self, config, identity):
        super().__init__(config, identity)
        uri = config.delta_uri
        self.base = uri if "://" in uri else os.path.abspath(uri)
        self._tables = {}
        self._opened = {}  # table -> version its DeltaTable was opened at
        self._checked = set()
        self.upkeep_due = UpkeepSchedule(config.maintain_every, lambda: self.clock())

    @property
    def destination(self):
        return "delta:" + self.base

    def announce(self):
        if self.config.origin("delta_uri") == "default":
            log.info("target: no Databricks workspace configured; writing to the local "
                     "Delta lakehouse %s", self.base)

    def query(self, sql, info_table=None):
        """SQL over the Delta tables in a local directory (DataFusion)."""
        if "://" in self.base:
            raise ConfigError(f"query: --run-query reads Delta tables in a local directory, "
                              f"and delta_uri is {self.config.delta_uri} (from "
                              f"{self.config.origin('delta_uri')}); query it with a Delta "
                              "reader (DuckDB delta_scan, Spark, Databricks)")
        if sql.strip().upper() == "INFO":
            return delta_info(self.base, info_table)
        return [run_query(self.base, sql)]

    def self_test(self, name):
        import shutil
        from arro3.core import Array, DataType, RecordBatch
        uri = self.table_uri(name)
        data = RecordBatch.from_pydict({"id": Array([1], DataType.int64()),
                                        "note": Array(["it works"], DataType.string())})

        def write():
            from deltalake import write_deltalake
            write_deltalake(uri, data, mode="error")

        def read():
            from deltalake import DeltaTable, QueryBuilder
            reader = QueryBuilder().register("t", DeltaTable(uri)).execute(
                "SELECT id, note FROM t")
            check_read_back([tuple(c.to_pylist()[0] for c in b.columns) for b in reader])

        def drop():
            if "://" in uri:
                raise SinkError(f"left {uri} in place: remove it with your storage tools")
            shutil.rmtree(uri)

        probe = [("conditional writes", lambda: self.check_store(name))] if "://" in uri else []
        yield from run_steps(probe + [(f"write {uri}", write), ("read it back", read),
                                      (f"remove {name}", drop)])

    def table_uri(self, table):
        """Location of one table under the base URI."""
        if "://" in self.base:
            return self.base.rstrip("/") + "/" + table
        return os.path.join(self.base, table)

    def check_store(self, table):
        """Once per table: refuse a store that does not enforce conditional writes. A
        probe that fails for a transient reason (a connection reset) is tried again."""
        if table not in self._checked:
            self.retry(lambda: probe_conditional_writes(self.table_uri(table), os.environ),
                       what=f"checking {table} for conditional writes",
                       is_transient=is_transient_sink_error, **self.BACKOFF)
            self._checked.add(table)

    def _open(self, table, check=True):
        """The table's DeltaTable, brought up to date; None if it does not exist yet.
        A read that fails for a transient reason (a store slow to answer) is tried again."""
        if check:
            self.check_store(table)
        return self.retry(lambda: self._load(table), what=f"reading {table}",
                          is_transient=is_transient_sink_error, **self.BACKOFF)

    def _load(self, table):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
        found = self._tables.get(table)
        if found is not None:
            try:
                found.update_incremental()
            except Exception as exc:  # deltalake raises several unrelated types
                self._tables.pop(table, None)
                raise SinkError(f"sink: reading {self.table_uri(table)} failed: "
                                f"{first_line(exc)}",
                                transient=is_transient_delta_error(exc)) from None
            if found.version() - self._opened[table] < self.REOPEN_EVERY:
                return found
        try:
            found = self._tables[table] = DeltaTable(self.table_uri(table))
            self._opened[table] = found.version()
        except TableNotFoundError:
            return None
        except Exception as exc:  # deltalake raises several unrelated types
            raise SinkError(f"sink: reading {self.table_uri(table)} failed: "
                            f"{first_line(exc)}", transient=is_transient_delta_error(exc))
        return found

    def known_kinds(self, table):
        found = self._open(table)
        return delta_kinds(found.schema()) if found else {}

    def has_committed(self, table, seq, batch_id, source_id=None):
        return self._holds(self._open(table), seq, source_id)

    def _holds(self, found, seq, source_id=None):
        """True when the table `found` (None: missing) holds batch `seq` of the node."""
        app_id = self.identity.app_id_of(source_id or self.identity.source_id)
        version = found.transaction_version(app_id) if found else None
        return version is not None and version >= seq

    def encode(self, table, chunk):
        return to_record_batch(chunk, self.identity)

    def count_rows(self, table, source_id):
        rows = self._select(table, source_id, "count(*)", "counting rows")
        return rows[0][0] if rows else 0

    def count_file_rows(self, table, source_id, source_file, sent=()):
        found = self._open(table)
        named = found is not None and "_source_file" in {f.name for f in found.schema().fields}
        where = (f'AND ("_source_file" = {text_literal(source_file)} OR "_source_file" IS '
                 'NULL)') if named else ""
        return unsent(self._select(table, source_id, '"_batch_id", count(*)',
                                   "counting rows", f'{where} GROUP BY "_batch_id"',
                                   found=found), sent)

    def read_keys(self, table, source_id, names):
        columns = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        return set(self._select(table, source_id, columns, "reading keys"))

    def _select(self, table, source_id, what, doing, more="", found=False):
        """Rows (tuples) of `SELECT what` over node `source_id`'s rows in `table`
        (`more`: SQL after the node's condition; `found`: the table, when the caller
        has just opened it)."""
        from deltalake import QueryBuilder
        found = self._open(table) if found is False else found
        if found is None:
            return []
        try:
            reader = QueryBuilder().register("t", found).execute(
                f'SELECT {what} FROM t WHERE "_source_id" = {text_literal(source_id)} {more}')
            return [row for b in reader
                    for row in zip(*(c.to_pylist() for c in b.columns))]
        except Exception as exc:  # DataFusion's own error types
            raise SinkError(f"sink: {doing} of node {source_id} in "
                            f"{self.table_uri(table)} failed: {first_line(exc)}",
                            transient=is_transient_delta_error(exc)) from None

    def recover_position(self, table, source):
        """The cursor after this node's last commit to `table`, from the Delta log."""
        return next(self._batches_of(table, source), (None, None))[1]

    recover_files_refused = None

    def recover_files(self, table, source):
        """From the Delta log: each file's newest commit (uploader.source_file) and the
        mark of the row at its cursor end (uploader.cursor_row)."""
        newest = {}
        for name, found in self._batches_of(table, source):
            if name:
                newest.setdefault(name, found)
        return newest

    def _batches_of(self, table, source):
        """(file name, {cursor, carry, batch_id, cursor_row}) of this node's commits to
        `table` from source table `source.name`, newest first."""
        found = self._open(table)
        for commit in found.history() if found is not None else ():  # newest first
            if (commit.get("uploader.source_id") == self.identity.source_id and
                    commit.get("uploader.source_table") == source.name):
                carry, row = commit.get("uploader.carry"), commit.get("uploader.cursor_row")
                yield commit.get("uploader.source_file"), {
                    "cursor": json.loads(commit["uploader.cursor_end"]),
                    "carry": json.loads(carry) if carry else None,
                    "batch_id": commit.get("uploader.batch_id"),
                    "cursor_row": json.loads(row) if row else None}

    def write(self, table, batch):
        # a transient failure anywhere (opening the table, the commit, reading it back)
        # sends the batch again; a stop during the wait leaves it for the next cycle
        self.check_store(table)
        return self.retry(lambda: self._write_once(table, batch),
                          what=f"writing batch {batch.batch_id}",
                          is_transient=is_transient_sink_error, **self.BACKOFF)

    def _write_once(self, table, batch):
        try:
            if self._holds(self._load(table), batch.seq):
                return Receipt(batch.count, skipped=True)
            self._append(table, batch)
            self._verify(table, batch)
            return Receipt(batch.count)
        except SinkError:
            raise
        except Exception as exc:  # deltalake raises several unrelated types
            raise SinkError(f"sink: writing batch {batch.batch_id} to "
                            f"{self.table_uri(table)} failed: {first_line(exc)}",
                            transient=is_transient_delta_error(exc)) from exc

    def _append(self, table, batch):
        from arro3.core import RecordBatchReader
        from deltalake import CommitProperties, Transaction, write_deltalake
        marker = Transaction(self.identity.app_id, batch.seq)
        target = self._tables.get(table) or self.table_uri(table)
        data = RecordBatchReader.from_batches(batch.payload[0].schema, batch.payload)
        write_deltalake(target, data, mode="append", schema_mode="merge",
                        commit_properties=CommitProperties(
                            app_transactions=[marker], custom_metadata=self.metadata(batch),
                            max_commit_retries=self.COMMIT_RETRIES),
                        post_commithook_properties=self.hooks())

    def hooks(self):
        """Post-commit work: the 100th-commit checkpoint unless WRITE_CHECKPOINTS=false."""
        from deltalake import PostCommitHookProperties
        return PostCommitHookProperties(create_checkpoint=self.config.write_checkpoints)

    def metadata(self, batch):
        """What a commit says about its node: for --recover-state and --fleet-status."""
        meta = {"uploader.source_id": self.identity.source_id,
                "uploader.source_table": self.identity.source_table,
                "uploader.source_file": self.identity.source_file,
                "uploader.source_path": self.identity.source_path,
                "uploader.batch_id": batch.batch_id,
                "uploader.cursor_end": json.dumps(encode_cursor(batch.cursor_end)),
                "uploader.rows": str(batch.count),
                "uploader.interval": str(self.config.interval),
                "uploader.version": __version__}
        if batch.carry is not None:  # open aggregate windows, for --recover-state
            meta["uploader.carry"] = json.dumps(batch.carry)
        if batch.cursor_row is not None:  # the file's row at the cursor, for the same
            meta["uploader.cursor_row"] = json.dumps(batch.cursor_row)
        if batch.pending is not None:
            meta["uploader.pending"] = str(batch.pending)
        stamp = parse_timestamp(batch.last_timestamp)
        if stamp is not None:
            now = (dt.datetime.now(dt.timezone.utc) - EPOCH) // ONE_MICROSECOND
            meta["uploader.lag_seconds"] = f"{max(now - stamp, 0) / 1e6:.3f}"
        return meta

    def _verify(self, table, batch):
        """Read this node's marker back at the commit's version; it must be there."""
        if self._holds(self._tables.get(table) or self._load(table), batch.seq):
            return
        raise SinkError(f"sink: batch {batch.batch_id} was committed to "
                        f"{self.table_uri(table)} but its commit is not in the table's log: "
                        "another writer replaced it (does the store enforce conditional "
                        "writes?); the batch is sent again at the next cycle")

    def upkeep(self, table):
        """After a cycle: table upkeep, when MAINTAIN_EVERY says it is due."""
        if not self.upkeep_due():
            return
        try:
            self.maintain(table)
        except Exception as exc:  # upkeep failing must not stop the uploads
            log.warning("maintain: upkeep of %s failed (%s); it runs again when next due",
                        table, first_line(exc))

    def maintain(self, table):
        """Compact small files, checkpoint the log, vacuum; log each step."""
        found = self._open(table, check=False)
        if found is None:
            log.info("maintain: %s does not exist yet; nothing to do", self.table_uri(table))
            return
        from deltalake import CommitProperties
        props = {"commit_properties": CommitProperties(max_commit_retries=self.COMMIT_RETRIES),
                 "post_commithook_properties": self.hooks()}
        self._keep_for(found, table, props)
        before = len(found.file_uris())
        metrics = found.optimize.compact(target_size=self.TARGET_FILE_SIZE, **props)
        found.update_incremental()
        log.info("maintain: compact %s: %d data files before, %d after (%d small files "
                 "into %d)", table, before, len(found.file_uris()),
                 metrics.get("numFilesRemoved", 0), metrics.get("numFilesAdded", 0))
        uri, logs = self.table_uri(table), count_log_files(self.table_uri(table))
        found.create_checkpoint()
        found.cleanup_metadata()
        log.info("maintain: checkpoint %s at version %d, expired log entries removed: log "
                 "files %s before, %s after", table, found.version(), logs,
                 count_log_files(uri))
        stored = count_data_files(uri)
        removed = found.vacuum(retention_hours=int(self.config.retention_hours),
                               dry_run=False, enforce_retention_duration=False, full=True,
                               **props)
        log.info("maintain: vacuum %s: %d unreferenced files older than %g h removed "
                 "(stored data files %s before, %s after)", table, len(removed),
                 self.config.retention_hours, stored, count_data_files(uri))

    def _keep_for(self, found, table, props):
        """Log entries and removed files expire after RETENTION_HOURS (table properties,
        unless the table sets its own): the log does not grow for a month (deltalake's
        default), and commits that list it stay as fast as the first."""
        keep = f"interval {int(self.config.retention_hours * 3600)} seconds"
        mine = {"delta.logRetentionDuration": keep, "delta.deletedFileRetentionDuration": keep}
        have = found.metadata().configuration
        missing = {k: v for k, v in mine.items() if k not in have}
        if missing:
            found.alter.set_table_properties(missing, **props)
            log.info("maintain: %s keeps log entries and removed files for %g h "
                     "(RETENTION_HOURS)", table, self.config.retention_hours)

    def upkeep_warning(self, table):
        """A warning when the table holds so many files that commits slow down."""
        found = self._open(table, check=False)
        files = len(found.file_uris()) if found else 0
        if files > self.MANY_FILES:
            return (f"{table} holds {files:,} data files (over {self.MANY_FILES:,}): each "
                    "commit reads them all and slows down; run --maintain (compaction, "
                    "checkpoint, vacuum) on one node, or set MAINTAIN_EVERY on one node")
        return None

    def list_tables(self):
        return None if "://" in self.base else list_delta_tables(self.base)

    # No retire_status: a node's status is the metadata of its commits, which stay in
    # the table's history; a forgotten file's last report leaves the `history` commits
    # that fleet() reads as newer commits land, and vacuum and log retention age it out.
    def fleet(self, table, history=2000):
        """Each node's last commit in `table` per source file and table, as the node
        reported it, and its rows."""
        found = self._open(table, check=False)
        if found is None:
            return []
        newest = {}
        for commit in found.history(history):  # newest first
            node = commit.get("uploader.source_id")
            key = (node, commit.get("uploader.source_file"),
                   commit.get("uploader.source_path"), commit.get("uploader.source_table"))
            if node and key not in newest:
                newest[key] = commit_report(commit)
        reports = list(reversed(newest.values()))
        shared = shared_files(reports)
        if shared:  # commits say a batch's rows, not the source's: count its batches'
            by_prefix = fleet_prefix_counts(found, {node for node, _ in shared})
            for report in reports:
                if (report["source_id"], report["source_file"]) in shared:
                    report["rows"] = by_prefix.get(
                        (report["source_id"], batch_prefix(report["last_batch"] or "")), 0)
        return fleet_lines(reports, fleet_counts(found))


class UpkeepSchedule:
    """When the next table upkeep is due: every N cycles, or every so many seconds."""

    def __init__(self, every, clock):
        self.rule = parse_every(every) if every else None
        self.clock, self.cycles, self.last = clock, 0, clock()

    def __call__(self):
        """Count a cycle; True when upkeep is due now."""
        if self.rule is None:
            return False
        kind, amount = self.rule
        self.cycles += 1
        due = self.cycles >= amount if kind == "cycles" else self.clock() - self.last >= amount
        if due:
            self.cycles, self.last = 0, self.clock()
        return due


def count_log_files(uri):
    """Files in a local table's _delta_log ('?' on an object store)."""
    if "://" in uri:
        return "?"
    log_dir = os.path.join(uri, "_delta_log")
    return len(os.listdir(log_dir)) if os.path.isdir(log_dir) else 0


def count_data_files(uri):
    """Parquet files stored under a local table ('?' on an object store)."""
    if "://" in uri:
        return "?"
    return sum(name.endswith(".parquet") for top, _, names in os.walk(uri)
               if "_delta_log" not in top for name in names)


def fleet_counts(found):
    """{(node, source file): (rows in the table, newest _uploaded_at)} by _source_id
    and _source_file (None: rows without one, or a table without the column)."""
    from deltalake import QueryBuilder
    by_file = any(f.name == "_source_file" for f in found.schema().fields)
    keys = '"_source_id", "_source_file"' if by_file else '"_source_id"'
    reader = QueryBuilder().register("t", found).execute(
        f'SELECT {keys}, count(*), max("_uploaded_at") FROM t GROUP BY {keys}')
    counts = {}
    for batch in reader:
        columns = [c.to_pylist() for c in batch.columns]
        nodes, files, rows, newest = columns if by_file else \
            (columns[0], [None] * len(columns[0]), *columns[1:])
        counts.update(((n, f), (r, u)) for n, f, r, u in zip(nodes, files, rows, newest))
    return counts


def shared_files(reports):
    """{(node, source file)} that several reports are about (two source tables of one
    file, or files named alike in two folders): their rows in the table are not told
    apart by _source_file."""
    seen, shared = set(), set()
    for key in ((r.get("source_id"), r.get("source_file")) for r in reports):
        (shared if key in seen and key[1] else seen).add(key)
    return shared


def fleet_prefix_counts(found, nodes):
    """{(node, batch prefix): rows} of `nodes` in the Delta table `found`: the rows of
    each position (its batches share the prefix; see batch_prefix)."""
    from deltalake import QueryBuilder
    names = ", ".join(text_literal(n) for n in sorted(nodes))
    prefix = f'regexp_replace("_batch_id", {text_literal(BATCH_SEQ.pattern)}, \'\')'
    reader = QueryBuilder().register("t", found).execute(
        f'SELECT "_source_id", {prefix}, count(*) FROM t WHERE "_source_id" IN ({names}) '
        f"GROUP BY 1, 2")
    return {(n, p): r for b in reader for n, p, r in zip(*(c.to_pylist() for c in b.columns))}


def fleet_lines(reports, counts=None):
    """--fleet-status of one table: a line per (node, source file, source table) that a
    node reported on (`reports`: node_status dicts, oldest first; a source file is its
    real path where the report gives one, so files of one base name in two folders are
    two lines), with its rows in the table (`counts`: {(node, source file's base name):
    (rows, newest _uploaded_at)}; None: the rows each report gives). A node that
    reported on one source, or none, gets one line with all its rows, as before many
    sources. A base name whose rows several lines share (two source tables of one file
    feeding one target table, or files named alike) gives each line the rows it
    reported."""
    nodes = {}
    for report in reports:
        key = (report.get("source_file"), report.get("source_path"),
               report.get("source_table"))
        nodes.setdefault(report.get("source_id"), {})[key] = report
    files = {}
    for (node, file), found in (counts or {}).items():
        files.setdefault(node, {})[file] = found
    lines = []
    for node in sorted(set(nodes) | set(files), key=str):
        mine, held = current_reports(nodes.get(node, {})), files.get(node, {})
        if len(mine) <= 1:
            report = next(iter(mine.values()), None)
            lines.append(fleet_line(node, report, *node_rows(report, held.values(), counts)))
            continue
        sources = [file for file, _, _ in mine]
        for (file, _, _), report in sorted(mine.items(), key=lambda x: tuple(map(str, x[0]))):
            alone, found = sources.count(file) == 1, held.pop(file, None)
            own = [found] if alone and found else []
            lines.append(fleet_line(node, report, *node_rows(report, own,
                                                             counts if alone else None)))
        lines += [fleet_line(node, {"source_file": file}, rows, newest)
                  for file, (rows, newest) in held.items()]  # rows no report is about
    return lines


def current_reports(mine):
    """A node's reports {(file, path, table): report} but those an older version made
    that newer ones replace: without a source file (one per node) when some have one,
    and without a path when one of the same file and table has it."""
    if any(file is not None for file, _, _ in mine):
        mine = {k: v for k, v in mine.items() if k[0] is not None}
    placed = {(file, table) for file, path, table in mine if path is not None}
    return {(file, path, table): v for (file, path, table), v in mine.items()
            if path is not None or (file, table) not in placed}


def node_rows(report, found, counts):
    """(rows, newest _uploaded_at) of a line: the rows counted in the table (`found`,
    unless `counts` is None), else those its report gives."""
    if counts is None:
        return (report or {}).get("rows"), None
    found = list(found)
    newest = [u for _, u in found if u is not None]
    return sum(r for r, _ in found), max(newest) if newest else None


def fleet_line(node, report, rows, newest):
    """One line of --fleet-status: what the node last reported about one source (a dict
    of node_status's names; None when it reported nothing) and its rows in the table
    (and the newest _uploaded_at among them)."""
    report = report or {}
    at = as_utc(report.get("last_upload")) or newest
    return {"node": node, "source_file": report.get("source_file"),
            "source_path": report.get("source_path"),
            "source_table": report.get("source_table"),
            "rows": rows, "last_batch": report.get("last_batch"),
            "last_commit_at": at, "cursor": report.get("cursor"),
            "pending_rows": report.get("pending"), "lag_seconds": report.get("lag_seconds"),
            "version": report.get("version"), "last_error": report.get("last_error"),
            "last_report_at": as_utc(report.get("reported_at")) or at,
            "interval": report.get("interval")}


def commit_report(commit):
    """What a node said in a Delta commit's metadata, as fleet_line reads it."""
    if commit is None:
        return None
    cursor = commit.get("uploader.cursor_end")
    return {"source_id": commit.get("uploader.source_id"),
            "source_file": commit.get("uploader.source_file") or None,
            "source_path": commit.get("uploader.source_path") or None,
            "source_table": commit.get("uploader.source_table") or None,
            "last_batch": commit.get("uploader.batch_id"),
            "last_upload": dt.datetime.fromtimestamp(commit["timestamp"] / 1000,
                                                     dt.timezone.utc)
            if "timestamp" in commit else None,
            "cursor": json.loads(cursor) if cursor else None,
            "pending": reported(commit, "uploader.pending", int),
            "lag_seconds": reported(commit, "uploader.lag_seconds", float),
            "interval": reported(commit, "uploader.interval", float),
            "version": commit.get("uploader.version")}


def as_utc(value):
    """A moment (datetime, naive meaning UTC, or ISO text) as an aware UTC datetime."""
    if isinstance(value, str):
        micros = parse_iso_timestamp(value)
        return EPOCH + dt.timedelta(microseconds=micros) if micros is not None else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    return None


def reported(commit, key, kind):
    """A number a node put in its commit's metadata, or None."""
    return kind(commit[key]) if commit.get(key) is not None else None


# Object stores whose own API refuses to create a file that exists (deltalake commits
# with a create-if-absent request there): nothing to probe.
SELF_ENFORCING = {"abfs": "Azure Storage", "abfss": "Azure Storage", "az": "Azure Storage",
                  "adl": "Azure Storage", "azure": "Azure Storage",
                  "gs": "Google Cloud Storage", "gcs": "Google Cloud Storage"}


def probe_conditional_writes(uri, environ):
    """On an S3-compatible store, create a scratch object twice with If-None-Match: *;
    the second must fail, or two nodes' commits could overwrite each other. One log
    line says what was found (or why the store was not probed)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in SELF_ENFORCING:
        log.info("target: %s is on %s, which refuses to create a file twice itself: not "
                 "probed for conditional writes", uri, SELF_ENFORCING[parts.scheme])
        return
    if parts.scheme not in ("s3", "s3a"):
        return  # local files: link without replace
    target = s3_target(environ)
    if not (target["key"] and target["secret"]):
        log.info("target: not checking that %s enforces conditional writes: no "
                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment", uri)
        return
    first, second = put_twice(target, parts.netloc, parts.path.strip("/"), uri)
    if first[0] >= 300 or second[0] not in (200, 201, 409, 412):
        status, text = first if first[0] >= 300 else second
        code = re.search(r"<Code>([^<]*)</Code>", text)
        raise SinkError(f"sink: checking {uri} for conditional writes: a scratch PUT got "
                        f"HTTP {status} {code.group(1) if code else ''}",
                        transient=status >= 500)
    if second[0] < 300:
        raise ConfigError(
            f"target: {uri}: the store ignores conditional writes (a second PUT with "
            "If-None-Match: * replaced the object instead of failing with 412), so nodes "
            "committing at once would overwrite each other's commits and lose rows; fix: "
            "enable conditional writes on the store or use one that enforces them (AWS S3 "
            "does)")
    log.info("target: %s enforces conditional writes (a second PUT with If-None-Match: * "
             "got HTTP %d): nodes may commit to it at once", uri, second[0])


def put_twice(target, bucket, prefix, uri):
    """(status, text) of two PUTs of one scratch object with If-None-Match: *; the
    object is removed after."""
    key = f"{prefix}/_uploader_probe/{uuid.uuid4().hex}"
    try:
        first = s3_request(target, "PUT", bucket, key, b"probe", {"If-None-Match": "*"})
        second = s3_request(target, "PUT", bucket, key, b"again", {"If-None-Match": "*"})
        s3_request(target, "DELETE", bucket, key)
    except OSError as exc:
        raise SinkError(f"sink: checking {uri} for conditional writes failed: {exc}",
                        transient=True) from None
    return first, second


def s3_target(environ):
    """Endpoint, region and keys of S3, from the variables deltalake reads too."""
    endpoint = next((environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                                          "AWS_ENDPOINT") if environ.get(k)), None)
    return {"endpoint": endpoint,
            "region": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            "key": environ.get("AWS_ACCESS_KEY_ID"),
            "secret": environ.get("AWS_SECRET_ACCESS_KEY"),
            "token": environ.get("AWS_SESSION_TOKEN"),
            "virtual": environ.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "").lower()
            in ("true", "1", "yes")}


def s3_request(target, method, bucket, key, body=b"", headers=None):
    """One request signed with AWS Signature V4; return (status, response text)."""
    import hashlib
    import hmac
    import http.client
    region = target["region"]
    if target["endpoint"]:
        url = urllib.parse.urlsplit(target["endpoint"])
        scheme, host, path = url.scheme, url.netloc, f"/{bucket}/{key}"
        if target["virtual"]:
            host, path = f"{bucket}.{url.netloc}", f"/{key}"
    else:
        scheme, host, path = "https", f"{bucket}.s3.{region}.amazonaws.com", f"/{key}"
    path = urllib.parse.quote(path, safe="/-_.~")
    now = dt.datetime.now(dt.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    digest = hashlib.sha256(body).hexdigest()
    signed = {"host": host, "x-amz-date": stamp, "x-amz-content-sha256": digest,
              **{k.lower(): v for k, v in (headers or {}).items()}}
    if target["token"]:
        signed["x-amz-security-token"] = target["token"]
    names = sorted(signed)
    request = "\n".join([method, path, "", *(f"{n}:{signed[n].strip()}" for n in names), "",
                         ";".join(names), digest])
    scope = f"{day}/{region}/s3/aws4_request"
    text = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                      hashlib.sha256(request.encode()).hexdigest()])
    secret = ("AWS4" + target["secret"]).encode()
    for part in (day, region, "s3", "aws4_request"):
        secret = hmac.new(secret, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={target['key']}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = kind(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=signed)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def first_line(exc):
    """The first line of an exception's message (libraries add backtraces)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Lost races deltalake does not retry itself: another node created the table (or changed
# its schema) between this node's read and its commit. Sent again, the write succeeds.
COMMIT_RACES = ("protocol changed", "metadata changed", "concurrent", "already exists",
                "max commit attempts")


def text_literal(text):
    """A string literal of DataFusion's SQL (Delta and landed files)."""
    return "'" + text.replace("'", "''") + "'"


def is_transient_delta_error(exc):
    """Commit races and storage hiccups are retried; schema errors are not."""
    text = f"{type(exc).__name__} {exc}".lower()
    if any(race in text for race in COMMIT_RACES):
        return True
    if any(word in text for word in ("schema", "protocol", "permission", "invalid")):
        return False
    return any(word in text for word in ("commit", "conflict", "timeout", "timed out",
                                         "connection", "temporar", "throttl", "503",
                                         "version", "io error"))


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
    from arro3.core import Array
    if kind == TIMESTAMP:
        return timestamp_array(values, name, rescued)
    if kind != BOOLEAN:
        try:
            return Array(values, arrow_type(kind))
        except (TypeError, ValueError, OverflowError):
            pass
    return Array(coerce_column(values, kind, name, rescued), arrow_type(kind))


def timestamp_array(values, name, rescued):
    """Text through Arrow's parser, each value on its own; the rest per value in Python."""
    from arro3.core import Array, DataType
    try:
        return checked_cast(Array(values, DataType.string()))
    except (TypeError, ValueError, OverflowError):
        pass  # not all text: judge each value
    texts = [v if type(v) is str else None for v in values]
    fast = Array(texts, DataType.string()).cast(arrow_type(TIMESTAMP))
    fast = fast.cast(DataType.int64()).to_pylist()
    micros = [m if m is not None else coerce_one(v, TIMESTAMP, i, name, rescued)
              for i, (m, v) in enumerate(zip(fast, values))]
    return Array(micros, DataType.int64()).cast(arrow_type(TIMESTAMP))


def checked_cast(text):
    """Cast a text array to TIMESTAMP; TypeError unless every non-NULL text parsed."""
    stamps = text.cast(arrow_type(TIMESTAMP))
    if stamps.null_count != text.null_count:
        raise TypeError("some text is not a timestamp")
    return stamps


def to_record_batch(chunk, identity):
    """The chunk as an Arrow RecordBatch with typed columns and lineage columns, and the
    number of rows with rescued values."""
    from arro3.core import Array, DataType, Field, RecordBatch, Schema
    rescued = {}
    arrays = [to_arrow_array(values, kind, name, rescued)
              for name, kind, values in zip(chunk.columns, chunk.kinds, chunk.values)]
    now = (dt.datetime.now(dt.timezone.utc) - EPOCH) // ONE_MICROSECOND
    source_id, batch_id, uploaded, rescue, source_file = lineage_values(
        chunk, identity, now, rescued)
    arrays += [Array(source_id, DataType.string()), Array(batch_id, DataType.string()),
               Array(uploaded, DataType.int64()).cast(arrow_type(TIMESTAMP)),
               Array(rescue, DataType.string()), Array(source_file, DataType.string())]
    names = list(chunk.columns) + list(LINEAGE_COLUMNS)
    schema = Schema([Field(n, a.type, nullable=True) for n, a in zip(names, arrays)])
    return RecordBatch(arrays, schema=schema), len(rescued)


@register_sink
class DatabricksSink(Sink):
    """Append to Unity Catalog tables through a Databricks SQL warehouse.

    Every write is idempotent: `INSERT ... REPLACE WHERE _source_id/_batch_id`
    statements (a batch bigger than MAX_STATEMENT_BYTES goes as several, each replacing
    its own rows), or a Parquet file staged in a volume and loaded with COPY INTO, which
    skips files it has loaded before. The connector may send a statement twice; either
    way the table ends as if it ran once.
    """

    name = "databricks"
    RETRIES = 6
    STATUS_TRIES = 5  # a status MERGE that met another node's commit: tries in all
    STATUS_HEARTBEAT = 3600  # seconds: an unchanged status is sent again after this
    STARTUP_POLL = 30  # at most this many seconds between tries to reach a starting warehouse
    STARTUP_LOG = 30   # and a line this often while waiting
    connector = None  # the DB-API module; None imports databricks.sql (tests set a double)
    workspace_url = None  # where databricks-sdk authenticates; None: https://<host> (tests:
    # a loopback token endpoint)
    # The connector's HTTP layer waits max(Retry-After, _retry_delay_max) after each 429
    # or 503 (at least 5 s, 60 s by default): one 503 after a commit stalled a cycle for
    # a minute. Given a retry budget of 1 s it refuses every such wait at once (its own
    # waits are all at least 1 s) and raises MaxRetryDurationError, wrapped in a
    # RequestError, so `retrying` decides how long to wait, with jitter, and says so.
    CONNECTOR_RETRY = {"_retry_stop_after_attempts_duration": 1.0, "_retry_delay_min": 1.0,
                       "_retry_delay_max": 5.0}

    def __init__(self, config, identity):
        super().__init__(config, identity)
        self.database = config.databricks_database
        self._conn = None
        self._columns = {}
        self._row_size = None  # rendered bytes per row, learnt from a sample
        self._staging_dir = None
        self._credentials = None
        self._learnt = False
        self._volume = None  # the staging volume's path; "" for none; None: not chosen yet
        self._volume_lock = threading.Lock()
        self._status = None  # the status table: None: not created yet, "ready", "off"
        self._sent = (None, 0.0)  # the last status recorded, and when (self.clock)

    @property
    def destination(self):
        return f"databricks:{self.config.databricks_host}/{self.database}"

    @classmethod
    def check_settings(cls, config):
        return dataclasses.replace(config, databricks_database=validate_workspace(config))

    def query(self, sql, info_table=None):
        """SQL on the warehouse; INFO: its tables, the target's columns, its row count."""
        if sql.strip().upper() != "INFO":
            return [self.execute(sql, fetch="names", what="running the query")]
        results = [self.execute(f"SHOW TABLES IN {qualified_name(self.database)}",
                                fetch="names", what="listing tables")]
        if info_table:
            target = self.target(info_table)
            results.append(self.execute(f"DESCRIBE TABLE {target}", fetch="names",
                                        what=f"describing {info_table}"))
            results.append(self.execute(f"SELECT count(*) AS row_count FROM {target}",
                                        fetch="names", what=f"counting {info_table}"))
        return results

    def self_test(self, name):
        target = self.target(name)
        steps = [("connect", lambda: self.execute("SELECT 1", fetch=True, what="connecting")),
                 (f"create {name}", lambda: self.execute(
                     f"CREATE TABLE {target} (id BIGINT, note STRING, at TIMESTAMP) "
                     "USING DELTA", what="creating a scratch table")),
                 ("insert a row", lambda: self.execute(
                     f"INSERT INTO {target} VALUES (1, {sql_string('it works')}, "
                     f"{sql_literal(0, TIMESTAMP)})", what="inserting")),
                 ("read it back", lambda: check_read_back(self.execute(
                     f"SELECT id, note FROM {target}", fetch=True, what="reading back"))),
                 (f"drop {name}", lambda: self.execute(f"DROP TABLE {target}",
                                                       what="dropping the scratch table"))]
        yield from run_steps(steps)

    def describe(self):
        return f"Databricks {self.config.databricks_host} {self.database}"

    def target(self, table):
        """The backtick-quoted catalog.schema.table."""
        return qualified_name(self.database, table)

    # --- connection ----------------------------------------------------------------

    def _connect(self):
        module = self.connector
        if module is None:
            from databricks import sql as module
        self._staging_dir = self._staging_dir or scratch_dir("stage-")
        connector_log = logging.getLogger("databricks.sql")
        if not connector_log.handlers:  # its errors reach stderr raw; ours say it in a line
            connector_log.addHandler(logging.NullHandler())
        cfg = self.config
        kwargs = dict(server_hostname=cfg.databricks_host, http_path=cfg.databricks_http_path,
                      user_agent_entry=f"{TOOL}/{__version__}",
                      session_configuration={"TIMEZONE": "UTC"},
                      staging_allowed_local_path=self._staging_dir,
                      enable_telemetry=False, **self.CONNECTOR_RETRY)
        if is_loopback(cfg.databricks_host):  # a warehouse double on this machine: no TLS
            kwargs["_connection_uri"] = (f"http://{cfg.databricks_host}/"
                                         f"{cfg.databricks_http_path.lstrip('/')}")
        if cfg.databricks_token:
            kwargs["access_token"] = cfg.databricks_token
        else:
            if self._credentials is None:  # one provider: its token outlives a reconnect
                self._credentials = WorkspaceCredentials(cfg, self.workspace_url or (
                    f"http://{cfg.databricks_host}" if is_loopback(cfg.databricks_host)
                    else None))
            kwargs["credentials_provider"] = self._credentials
            module = self._credentials.connector(module)
        try:
            return module.connect(**kwargs)
        except Exception as exc:  # the connector raises many types; classify them
            error = databricks_error("connecting to the warehouse", exc, self.config)
            if error_kind(exc) == UNAVAILABLE:  # starting (or throttling): worth a wait
                error = UnavailableError(str(error), transient=True)
            raise error from None

    def execute(self, sql, params=None, fetch=False, what="running a statement"):
        """Run one statement on the shared connection; reopen it after a failure."""
        if self._conn is None:
            self._conn = self._connect()
        try:
            cursor = self._conn.cursor()
            try:
                cursor.execute(sql, params) if params else cursor.execute(sql)
                if fetch == "names":
                    rows = cursor.fetchall()
                    return [d[0] for d in cursor.description or []], rows
                return cursor.fetchall() if fetch else None
            finally:
                cursor.close()
        except Exception as exc:  # classified below
            error = databricks_error(what, exc, self.config)
            if error.transient:  # the connection may be broken; a refusal leaves it sound
                self._reset()
            raise error from None

    def _reset(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self):
        self._reset()
        if self._staging_dir:
            import shutil
            shutil.rmtree(self._staging_dir, ignore_errors=True)

    def retrying(self, what, action):
        """Run `action`, retrying transient failures with capped backoff and jitter:
        a warehouse that cannot take a session yet is waited for (see started); other
        transient failures (conflicts, dropped connections) get RETRIES runs in all."""
        return self.retry(lambda: self.started(action), what=what, attempts=self.RETRIES,
                          first=2, is_transient=lambda exc: is_transient_sink_error(exc)
                          and not isinstance(exc, UnavailableError))

    def started(self, action):
        """Run `action`; while the warehouse cannot take a session yet (starting: 503, or
        throttling), wait for it up to startup_timeout, with a line every STARTUP_LOG s."""
        timeout, marks = self.config.startup_timeout, {}

        def say(exc, attempt, delay):
            now = self.clock()
            waited = now - marks.setdefault("first", now)
            if "logged" not in marks or waited - marks["logged"] >= self.STARTUP_LOG:
                log.warning("sink: warehouse is starting; waited %.0f s of %.0f (%s)",
                            waited, timeout, str(exc).removeprefix("sink: "))
                marks["logged"] = waited
        try:
            return self.retry(action, what="reaching the warehouse", deadline=timeout,
                              cap=self.STARTUP_POLL, on_retry=say,
                              is_transient=lambda exc: isinstance(exc, UnavailableError))
        except UnavailableError as exc:
            waited = self.clock() - marks.get("first", self.clock())
            if waited < timeout:  # stopping: the failure stands
                raise
            raise SinkError(f"{exc}; the warehouse was not ready after {waited:.0f} s "
                            f"(startup_timeout {timeout:.0f} s)") from None

    # --- tables --------------------------------------------------------------------

    def _describe(self, table):
        """{column: kind} of the target table, in table order; {} when it is missing."""
        try:
            rows = self.execute(f"DESCRIBE TABLE {self.target(table)}", fetch=True,
                                what=f"describing {table}")
        except SinkError as exc:
            if "TABLE_OR_VIEW_NOT_FOUND" in str(exc) or "not found" in str(exc).lower():
                return {}
            raise
        columns = {}
        for row in rows:
            name, dtype = row[0], row[1]
            if not name or name.startswith("#"):
                break
            columns[name] = SQL_TO_KIND.get(str(dtype).lower().split("(")[0], STRING)
        return columns

    def known_kinds(self, table):
        if table not in self._columns:
            self._columns[table] = self.retrying(f"describing {table}",
                                                 lambda: self._describe(table))
        return dict(self._columns[table])

    def ensure_table(self, table, names, kinds):
        """Create the table when missing; add the batch's new columns (and lineage
        columns a table made by an older version lacks)."""
        known = self.known_kinds(table) or self._create(table, names, kinds)
        lower = {n.lower() for n in known}
        wanted = dict(zip(names, kinds)) | dict(zip(LINEAGE_COLUMNS, LINEAGE_KINDS))
        new = [(n, k) for n, k in wanted.items() if n.lower() not in lower]
        if new:
            self._add_columns(table, new)

    def _create(self, table, names, kinds):
        """CREATE TABLE IF NOT EXISTS; another node may win the race to create it."""
        try:
            self._ddl(create_table_sql(self.target(table), names, kinds), table)
        except SinkError:
            if not self._describe_again(table):
                raise
        else:
            self._describe_again(table)
        known = self._columns[table] = self._columns.get(table) or dict(zip(
            table_layout(names), list(kinds) + list(LINEAGE_KINDS)))
        return dict(known)

    def _add_columns(self, table, new):
        """ALTER TABLE ... ADD COLUMNS; fine when another node (or a re-sent request)
        added them first, and tried again when another node's ALTER won a race. The
        table's columns are read again either way: another node may have added its own."""
        for attempt in range(1, self.RETRIES + 1):
            try:
                if needs_column_mapping([n for n, _ in new]):
                    self._ddl(column_mapping_sql(self.target(table)), table)
                self._ddl(add_columns_sql(self.target(table), new), table)
                break
            except SinkError as exc:
                now = {n.lower() for n in self._describe_again(table)}
                if all(n.lower() in now for n, _ in new):
                    break
                if attempt == self.RETRIES or not (exc.transient or is_schema_change(exc)):
                    raise
                log.info("sink: another writer changed %s while columns were added; "
                         "adding them again", table)
        self._describe_again(table)

    def _describe_again(self, table):
        """The table's columns read afresh (a new dict: the read-ahead thread reads it)."""
        self._columns.pop(table, None)
        return self.known_kinds(table)

    def _ddl(self, ddl, table):
        try:
            self.retrying(f"changing {table}", lambda: self.execute(ddl, what=f"changing {table}"))
        except SinkError as exc:
            if not exc.transient and re.search(r"PERMISSION|INSUFFICIENT|403|not authorized",
                                               str(exc), re.I):
                raise SinkError(f"{exc}; ask an admin to run: {ddl}") from None
            raise
        log.info("sink: %s", ddl if len(ddl) < 300 else ddl[:300] + " ...")

    # --- writes --------------------------------------------------------------------

    def volume(self):
        """The staging volume's path, or None when batches go as inline statements."""
        with self._volume_lock:  # first asked in the read-ahead thread, before any write
            if self._volume is None:
                self._volume = self._choose_volume()
            return self._volume or None

    def _choose_volume(self):
        """databricks_volume: a path, none, or auto: create our volume once; when the
        principal may not, say so in one line and send inline statements."""
        setting = self.config.databricks_volume or "auto"
        if setting.lower() == "none":
            return ""
        if setting.lower() != "auto":
            return setting
        name = qualified_name(self.database, AUTO_VOLUME)
        path = "/Volumes/" + "/".join(self.database.split(".") + [AUTO_VOLUME])
        try:
            self.retrying("creating the staging volume", lambda: self.execute(
                f"CREATE VOLUME IF NOT EXISTS {name}", what=f"creating volume {name}"))
        except SinkError as exc:
            if exc.transient:
                raise
            cause = str(exc).split(" failed: ", 1)[-1].split("; ")[0]  # the server's words
            log.warning("sink: cannot create the staging volume %s (%s): batches go as "
                        "inline statements (DATABRICKS_VOLUME=%s once an admin creates it, "
                        "or none)", name, cause, path)
            return ""
        log.info("sink: staging batches as Parquet in %s", path)
        return path

    def encode(self, table, chunk):
        """A chunk as rendered rows, or as Arrow data when its batch goes as a Parquet
        file: with a volume, every batch bigger than one statement is staged."""
        if self.volume() and not (chunk.first and chunk.final and
                                  chunk.count * self._bytes_per_row(chunk) <= self.budget()):
            return to_record_batch(chunk, self.identity)
        rows, names, rescued = render_rows(chunk)
        inline = InlineRows(rows, names)
        if self.volume() and inline.size > self.budget():
            return to_record_batch(chunk, self.identity)
        return inline, rescued

    def budget(self):
        """Bytes of rows one statement may carry (the rest is its frame)."""
        return self.config.max_statement_bytes * 0.985 - 1000

    def _bytes_per_row(self, chunk):
        """Rendered bytes per row, from a sample of the first chunk seen."""
        if self._row_size is None and chunk.count:
            rows, _, _ = render_rows(sample_chunk(chunk, 200))
            self._row_size = sum(len(r) + 1 for r in rows) / len(rows)
        return self._row_size or 1.0

    def write(self, table, batch):
        chunks = batch.payload
        if any(not isinstance(p, InlineRows) for p in chunks):
            staged = [StagedFile(batch.batch_id, parquet_bytes(chunks))]
            self._send(table, batch, f"staging batch {batch.batch_id}",
                       lambda: self._load_staged(table, staged))
            return Receipt(batch.count)
        statements = inline_statements(chunks, self.budget(), self.identity.source_id,
                                       batch.batch_id, self.identity.source_file)
        for statement in statements:
            what = f"writing batch {batch.batch_id}" + (
                f" ({statement.part})" if len(statements) > 1 else "")
            self._send(table, batch, what, lambda: self.execute(statement.assemble(
                self.target(table), self._columns.get(table)), what=what))
        return Receipt(batch.count)

    def _send(self, table, batch, what, action):
        """Make sure the table has the batch's columns, then run `action` (retried);
        when another writer changed the table meanwhile (a column added, so the insert
        lacks one, or a commit that changed its metadata), read its columns again and
        run it again: every write is idempotent."""
        for attempt in range(1, self.RETRIES + 1):
            self.ensure_table(table, batch.columns, batch.kinds)
            try:
                return self.retrying(what, action)
            except SinkError as exc:
                if attempt == self.RETRIES or not (is_schema_change(exc) or
                                                   is_conflict(exc)):
                    raise
                log.info("sink: batch %s met another writer's commit on %s; sending it "
                         "again", batch.batch_id, table)
                if is_schema_change(exc):
                    self._columns.pop(table, None)
        raise AssertionError("unreachable")

    def _load_staged(self, table, files):
        """PUT the batch's Parquet files into the volume, COPY INTO once, remove them."""
        folder = f"{self.volume().rstrip('/')}/{self.identity.source_id}/{table}"
        names = [f"{f.name}.parquet" for f in files]
        if self._conn is None:
            self._conn = self._connect()
        for staged, name in zip(files, names):
            local = os.path.join(self._staging_dir, name)
            with open(local, "wb") as fh:
                fh.write(staged.data)
            try:
                self.execute(f"PUT {sql_string(local)} INTO {sql_string(folder + '/' + name)} "
                             "OVERWRITE", what=f"uploading {name} to {folder}")
            finally:
                with contextlib.suppress(OSError):
                    os.remove(local)
        self.execute(copy_into_sql(self.target(table), folder, names),
                     what=f"loading {', '.join(names)} into {table}")
        for name in names:  # only after the load is confirmed
            try:
                self.execute(f"REMOVE {sql_string(folder + '/' + name)}",
                             what=f"removing {name}")
            except SinkError as exc:
                log.warning("sink: loaded %s but could not remove it: %s", name, exc)

    def recover_position(self, table, source):
        """The cursor after this node's rows in `table`: max of an integer cursor column."""
        return recover_by_max(lambda what: self._select(
            table, self.identity.source_id, what, "reading the cursor for --recover-state"),
            table, source, quote_name)

    def count_rows(self, table, source_id):
        rows = self._select(table, source_id, "count(*)", "counting rows")
        return rows[0][0] if rows else 0

    def count_file_rows(self, table, source_id, source_file, sent=()):
        where = "AND (`_source_file` = :source_file OR `_source_file` IS NULL) "
        try:
            return self._count_batches(table, source_id, source_file, sent, where)
        except SinkError as exc:
            if "UNRESOLVED_COLUMN" not in str(exc):
                raise
            # a table of versions before _source_file: its rows may be of any file
            return self._count_batches(table, source_id, source_file, sent, "")

    def _count_batches(self, table, source_id, source_file, sent, where):
        return unsent(self._rows(
            f"SELECT `_batch_id`, count(*) FROM {self.target(table)} WHERE `_source_id` = "
            f":source_id {where}GROUP BY `_batch_id`",
            {"source_id": source_id, "source_file": source_file}, f"counting rows in {table}"),
            sent)

    def read_keys(self, table, source_id, names):
        rows = self._select(table, source_id, ", ".join(map(quote_name, names)),
                            "reading keys")
        return {tuple(row) for row in rows}

    def _select(self, table, source_id, what, doing):
        """Rows of `SELECT what` over node `source_id`'s rows ([] if no table)."""
        return self._rows(f"SELECT {what} FROM {self.target(table)} WHERE "
                          "`_source_id` = :source_id", {"source_id": source_id},
                          f"{doing} in {table}")

    def has_committed(self, table, seq, batch_id, source_id=None):
        """The batch is in when its one statement is, or the last of its statements
        (they are sent in order, each after the one before has landed)."""
        rows = self._rows(
            f"SELECT DISTINCT `_batch_id` FROM {self.target(table)} WHERE "
            "`_source_id` = :source_id AND (`_batch_id` = :batch_id OR "
            "`_batch_id` LIKE :parts)",
            {"source_id": source_id or self.identity.source_id, "batch_id": batch_id,
             "parts": batch_id + ".%"}, f"checking batch {batch_id}")
        return any(is_whole_batch(row[0], batch_id) for row in rows)

    def _rows(self, sql, params, doing):
        """Rows of a query (retried); [] when its table does not exist."""
        try:
            return self.retrying(doing, lambda: self.execute(
                sql, params, fetch=True, what=doing)) or []
        except SinkError as exc:
            if "TABLE_OR_VIEW_NOT_FOUND" in str(exc):
                return []
            raise

    # --- node status (--fleet-status) ----------------------------------------------

    def report_status(self, status):
        """Upsert this node's row of the schema's status table (STATUS_TABLE) for this
        source. A failure costs one log line, never the cycle: the next cycle reports
        again. A status like the last one sent goes only once an hour: idle nodes (and
        the idle sources of a busy node) must not keep the warehouse from stopping."""
        status = self.identity.with_source(status)
        if self._status == "off" or (status == self._sent[0] and
                                     self.clock() - self._sent[1] < self.STATUS_HEARTBEAT):
            return
        try:
            if self._status is None:
                self._create_status_table()
            self._merge_status(status)
            self._sent = (status, self.clock())
        except SinkError as exc:
            if exc.transient or is_conflict(exc):
                log.warning("sink: this node's status for --fleet-status was not recorded "
                            "(%s); the next cycle reports it", exc)
                return
            self._status = "off"
            log.warning("sink: this node's status for --fleet-status cannot be recorded in "
                        "%s (%s); its rows still go, and --fleet-status shows them without "
                        "the node's report (where the token may not create tables, ask an "
                        "admin to run: %s)", self.target(STATUS_TABLE), exc,
                        status_table_sql(self.target(STATUS_TABLE)))

    def _create_status_table(self):
        """CREATE TABLE IF NOT EXISTS, once per run; a node that lost the race to
        create it goes on with the table the winner made."""
        try:
            self.execute(status_table_sql(self.target(STATUS_TABLE)),
                         what=f"creating {STATUS_TABLE}")
        except SinkError as exc:
            if not (is_conflict(exc) or "ALREADY_EXISTS" in str(exc)):
                raise
        have = {n.lower() for n in self._describe_again(STATUS_TABLE)}
        missing = [(n, k) for n, k in STATUS_COLUMNS if n not in have]
        if missing:  # made by an older version
            self._add_columns(STATUS_TABLE, missing)
        self._status = "ready"

    def _merge_status(self, status):
        """One MERGE."""
        return self._change_status(
            status_merge_sql(self.target(STATUS_TABLE), status_values(status)),
            f"recording the node's status in {STATUS_TABLE}")

    def _change_status(self, sql, what):
        """One statement on the status table; a conflict with another node's commit
        goes again after a pause."""
        return self.retry(lambda: self.execute(sql, what=what), what=what,
                          attempts=self.STATUS_TRIES, cap=math.inf, spread=(0.5, 1.5),
                          is_transient=lambda exc: isinstance(exc, SinkError)
                          and is_conflict(exc), on_retry=lambda exc, n, delay: None)

    def retire_status(self, table):
        """Delete this source's row of the status table: one DELETE of the row whose
        node, target table, source file and source table are this sink's."""
        status = self.identity.with_source({"source_id": self.identity.source_id,
                                            "table": table})
        source = f"{status['source_file']}:{status['source_table']}"
        try:
            self._delete_status(status, source)
        except SinkError as exc:
            if "TABLE_OR_VIEW_NOT_FOUND" not in str(exc):  # (else: never reported)
                log.warning("sink: the status of %s (forgotten) stays in %s: "
                            "--fleet-status keeps its line (%s)", source,
                            self.target(STATUS_TABLE), exc)
            return
        log.info("sink: %s is forgotten: its line of --fleet-status (its row of %s) is "
                 "removed", source, STATUS_TABLE)

    def _delete_status(self, status, source):
        """One DELETE; on a status table of a version before source_path (no report
        of this run has added it yet), one without it."""
        what = f"removing the status of {source} from {STATUS_TABLE}"
        try:
            self._change_status(status_delete_sql(self.target(STATUS_TABLE), status), what)
        except SinkError as exc:
            if "UNRESOLVED_COLUMN" not in str(exc):
                raise
            self._change_status(status_delete_sql(self.target(STATUS_TABLE), status,
                                                  by_path=False), what)

    def fleet(self, table):
        """Each row of the status table for `table` (one per node and source; a table
        of an older version has one per node), and each node's rows in `table` by file."""
        keys, group = fleet_keys(self._describe_again(table))
        counts = {(node, file): (rows, as_utc(newest)) for node, file, rows, newest in
                  self._rows(f"SELECT {keys}, count(*), max(`_uploaded_at`) FROM "
                             f"{self.target(table)} GROUP BY {group}",
                             None, f"counting each node's rows in {table}")}
        have = {n.lower() for n in self._describe_again(STATUS_TABLE)}
        names = [n for n, _ in STATUS_COLUMNS if n in have]
        reports = [self._expecting(node_report(dict(zip(names, row)))) for row in self._rows(
            f"SELECT {', '.join(map(quote_name, names))} FROM {self.target(STATUS_TABLE)} "
            "WHERE `target_table` = :target_table ORDER BY `reported_at`",
            {"target_table": table}, f"reading {STATUS_TABLE}")] if names else []
        return fleet_lines(reports, counts)

    def _expecting(self, report):
        """An idle node (nothing pending, no error) reports again within the hour: its
        silence is judged on that, not on its interval."""
        if not report.get("pending") and not report.get("last_error"):
            report["interval"] = max(report.get("interval") or 0,
                                     self.STATUS_HEARTBEAT / 2)
        return report

    def list_tables(self):
        """The target tables nodes report on in the status table (None: no report yet)."""
        rows = self._rows(f"SELECT DISTINCT `target_table` FROM {self.target(STATUS_TABLE)}",
                          None, f"reading {STATUS_TABLE}")
        return sorted(row[0] for row in rows) or None


def fleet_keys(columns):
    """(selected, grouped) keys of each node's rows per source file in a table or view
    with `columns`; by node alone (NULL as the file) when it predates _source_file."""
    if "_source_file" in {n.lower() for n in columns}:
        return "`_source_id`, `_source_file`", "`_source_id`, `_source_file`"
    return "`_source_id`, NULL", "`_source_id`"


def recover_by_max(select, table, source, quote):
    """A lost cursor rebuilt from rows (not commits): the max of a single cursor column
    the table holds, found by `select(what) -> rows`; None when no row is there."""
    cursor = source.cursor
    if cursor.hidden or len(cursor.columns) != 1 or table.startswith("aggregated_"):
        raise SinkError(
            f"sink: cannot recover a {cursor.kind} cursor {cursor.describe()} from "
            f"{table}: the table does not hold it; --reset-state re-sends everything "
            "instead (rows already there would be duplicated)")
    rows = select(f"max({quote(cursor.columns[0])}), count(*)")
    if not rows or rows[0][0] is None:
        return None
    return {"cursor": [rows[0][0]], "carry": None, "rows": rows[0][1]}


@dataclasses.dataclass
class InlineStatement:
    """A batch as one `INSERT ... REPLACE WHERE` statement and its size in bytes.

    Spark's grammar takes REPLACE WHERE only with a positional select list (not BY NAME,
    not a column list), so the statement names the table's columns in table order: it
    is assembled again when the table has gained columns since the rows were rendered.
    """

    rows: str
    names: list
    where: str
    lineage: dict
    part: str = ""
    columns: list = None
    sql: str = ""
    size: int = 0

    @classmethod
    def build(cls, rows, names, source_id, batch_id, uploaded, k=1, n=1, source_file=""):
        """Rendered rows of statement k of n of batch `batch_id`, written by `source_id`
        at `uploaded`. Its REPLACE WHERE takes its own rows, so running it twice leaves
        them once; the first (or only) statement also clears what an earlier attempt cut
        differently left of the batch, so that a batch sent again is whole and once."""
        source, tag = sql_string(source_id), sql_string(part_id(batch_id, k, n))
        whole, parts = sql_string(batch_id), sql_string(batch_id + ".%")
        if n == 1:
            mine = f"`_batch_id` = {whole} OR `_batch_id` LIKE {parts}"
        elif k == 1:
            other = sql_string(f"{batch_id}.%/{n}")
            mine = (f"`_batch_id` = {whole} OR (`_batch_id` LIKE {parts} AND `_batch_id` "
                    f"NOT LIKE {other}) OR `_batch_id` = {tag}")
        else:
            mine = f"`_batch_id` = {tag}"
        return cls(rows, names, f"`_source_id` = {source} AND ({mine})",
                   {"_source_id": source, "_batch_id": tag, "_uploaded_at": uploaded,
                    "_source_file": sql_string(source_file) if source_file else "NULL"},
                   part=f"statement {k} of {n}")

    def assemble(self, target, columns=None):
        """The statement for a table with `columns` in table order; returns the SQL."""
        columns = list(columns or table_layout(self.names))
        have = {c.lower() for c in columns}
        columns += [n for n in self.names if n.lower() not in have]  # never drop a value
        if columns == self.columns and self.sql:
            return self.sql
        given = {n.lower(): quote_name(n) for n in self.names}
        given.update(self.lineage)  # our tags, which the REPLACE WHERE predicate reads
        select = ", ".join(given.get(c.lower(), "NULL") for c in columns)
        self.columns = columns
        self.sql = (f"INSERT INTO {target} REPLACE WHERE {self.where} SELECT {select} "
                    f"FROM VALUES {self.rows} AS v({', '.join(map(quote_name, self.names))})")
        self.size = len(self.sql.encode("utf-8"))
        return self.sql


@dataclasses.dataclass
class StagedFile:
    """Part of a batch as Parquet bytes, to be staged in a volume as <name>.parquet."""

    name: str
    data: bytes


SQL_TYPES = {BIGINT: "BIGINT", DOUBLE: "DOUBLE", STRING: "STRING", BINARY: "BINARY",
             BOOLEAN: "BOOLEAN", TIMESTAMP: "TIMESTAMP"}
SQL_TO_KIND = {"bigint": BIGINT, "int": BIGINT, "integer": BIGINT, "smallint": BIGINT,
               "tinyint": BIGINT, "double": DOUBLE, "float": DOUBLE, "decimal": DOUBLE,
               "string": STRING, "varchar": STRING, "char": STRING, "binary": BINARY,
               "boolean": BOOLEAN, "timestamp": TIMESTAMP, "timestamp_ntz": TIMESTAMP,
               "date": TIMESTAMP}
LINEAGE_KINDS = (STRING, STRING, TIMESTAMP, STRING, STRING)
TABLE_PROPERTIES = (("delta.enableChangeDataFeed", "true"),
                    ("delta.autoOptimize.optimizeWrite", "true"))
COLUMN_MAPPING = (("delta.columnMapping.mode", "name"), ("delta.minReaderVersion", "2"),
                  ("delta.minWriterVersion", "5"))
SQL_ESCAPES = re.compile(r"[\\'$\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def quote_name(name):
    """Backtick-quote one identifier; a backtick inside is doubled."""
    return "`" + name.replace("`", "``") + "`"


def qualified_name(database, table=None):
    """`catalog`.`schema`[.`table`], each part quoted on its own."""
    parts = (database.split(".") if database else []) + ([table] if table else [])
    return ".".join(quote_name(p) for p in parts)


def sql_string(text):
    """A Databricks SQL string literal.

    Backslash escapes (Spark reads '' as two adjacent literals, not a quote); `$` is
    escaped too, because Spark substitutes ${...} variables in the statement text.
    """
    return "'" + SQL_ESCAPES.sub(_escape_char, text) + "'"


def _escape_char(match):
    char = match.group(0)
    if char in "\\'":
        return "\\" + char
    return f"\\u{ord(char):04x}"


def sql_literal(value, kind):
    """A typed value as a Databricks SQL literal."""
    if value is None:
        return "NULL"
    if kind == STRING:
        return sql_string(value)
    if kind == BIGINT:
        return str(value)
    if kind == DOUBLE:
        if math.isfinite(value):
            # a decimal literal: the shortest text that reads back as this double (repr
            # switches to exponent form, a DOUBLE literal, before DECIMAL(38) would
            # overflow); the insert into the DOUBLE column casts it exactly. Only -0.0
            # needs the D suffix: a decimal has no negative zero.
            text = repr(float(value))
            return text + "D" if text == "-0.0" else text
        name = "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
        return f"CAST('{name}' AS DOUBLE)"
    if kind == BOOLEAN:
        return "TRUE" if value else "FALSE"
    if kind == BINARY:
        return "X'" + value.hex() + "'"
    return "TIMESTAMP'" + micros_to_sql(value) + "'"


def micros_to_sql(micros):
    """Microseconds since the epoch as '2025-01-01T00:00:00.5Z'."""
    moment = EPOCH + dt.timedelta(microseconds=micros)
    text = f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def render_columns(chunk):
    """Literals column by column (typed, misfits rescued); and the rescued count."""
    rescued = {}
    columns = []
    for name, kind, values in zip(chunk.columns, chunk.kinds, chunk.values):
        typed = coerce_column(values, kind, name, rescued)
        cache = {}
        out = []
        for value in typed:
            text = cache.get(value) if kind in (STRING, TIMESTAMP) else None
            if text is None:
                text = sql_literal(value, kind)
                if kind in (STRING, TIMESTAMP) and len(cache) < 10_000:
                    cache[value] = text
            out.append(text)
        columns.append(out)
    return columns, rescued


def render_rows(chunk):
    """The chunk as inline-table rows `(..)`, their column names (with `_rescued_data`
    when a value was rescued), and the number of rows with rescued values."""
    columns, rescued = render_columns(chunk)
    names = list(chunk.columns)
    if rescued:
        columns.append([sql_string(v) if v else "NULL"
                        for v in rescued_json(rescued, chunk.count)])
        names.append("_rescued_data")
    return ["(" + ",".join(row) + ")" for row in zip(*columns)], names, len(rescued)


@dataclasses.dataclass
class InlineRows:
    """A chunk of a batch rendered for an inline statement."""

    rows: list
    names: list

    @property
    def size(self):
        return sum(len(r) + 1 for r in self.rows)


def sample_chunk(chunk, count):
    """The first `count` rows of a chunk, to estimate the rest by."""
    return dataclasses.replace(chunk, values=[v[:count] for v in chunk.values],
                               count=min(chunk.count, count),
                               kinds=[k or infer_kind(v) for k, v in
                                      zip(chunk.kinds, chunk.values)])


def pack_rows(chunks, budget):
    """The rows of a batch's chunks cut into statements of at most `budget` bytes (a
    row bigger than that alone), in order: [(rows, names)]. The cut depends only on the
    rows, so a batch sent again is cut the same way."""
    groups, rows, size, names = [], [], 0, None
    for chunk in chunks:
        for row in chunk.rows:
            if rows and (size + len(row) + 1 > budget or chunk.names != names):
                groups.append((rows, names))
                rows, size = [], 0
            rows.append(row)
            size += len(row) + 1
            names = chunk.names
    if rows:
        groups.append((rows, names))
    return groups


def part_id(batch_id, k, n):
    """The `_batch_id` of statement k of n: the batch id itself when it is the only one."""
    return batch_id if n == 1 else f"{batch_id}.{k}/{n}"


def is_whole_batch(found, batch_id):
    """True for the `_batch_id` of a batch's only or last statement."""
    if found == batch_id:
        return True
    k, _, n = found[len(batch_id) + 1:].partition("/")
    return found.startswith(batch_id + ".") and k == n and k.isdigit()


def inline_statements(chunks, budget, source_id, batch_id, source_file=""):
    """The statements that carry a batch's rendered chunks."""
    groups = pack_rows(chunks, budget)
    now = (dt.datetime.now(dt.timezone.utc) - EPOCH) // ONE_MICROSECOND
    return [InlineStatement.build(",".join(rows), names, source_id, batch_id,
                                  sql_literal(now, TIMESTAMP), k, len(groups), source_file)
            for k, (rows, names) in enumerate(groups, start=1)]


def table_layout(names):
    """The columns, in order, of a table created for a batch with these columns."""
    return [n for n in names if n != "_rescued_data"] + list(LINEAGE_COLUMNS)


def render_insert(target, chunk, identity, columns=None):
    """INSERT INTO t REPLACE WHERE <its batch> SELECT <the table's columns> FROM VALUES ...
    for the rows of a chunk (a batch of one chunk) as one statement.

    `columns` are the table's columns in table order (default: the table this batch
    would create); those the chunk lacks are NULL."""
    rows, names, _ = render_rows(chunk)
    (statement,) = inline_statements([InlineRows(rows, names)], math.inf,
                                     identity.source_id, chunk.batch_id,
                                     identity.source_file)
    return statement.assemble(target, columns)


SCHEMA_CHANGE_MARKERS = ("INSERT_COLUMN_ARITY_MISMATCH", "DELTA_METADATA_CHANGED")


def is_schema_change(error):
    """True when a write failed because the table's columns changed under it."""
    return any(marker in str(error) for marker in SCHEMA_CHANGE_MARKERS)


def is_conflict(error):
    """True when Delta's optimistic concurrency failed a write: another writer's commit
    landed first. Every write here is idempotent, so it may simply go again."""
    return bool(re.search(r"DELTA_CONCURRENT_|DELTA_METADATA_CHANGED|DELTA_PROTOCOL_CHANGED|"
                          r"concurrent update", str(error), re.I))


def needs_column_mapping(names):
    """Delta refuses ` ,;{}()\\n\\t=` in column names unless columns are mapped by name."""
    return any(re.search(r"[ ,;{}()\n\t=]", n) for n in names)


def create_table_sql(target, names, kinds):
    """CREATE TABLE IF NOT EXISTS with the batch's columns and the lineage columns."""
    columns = [f"{quote_name(n)} {SQL_TYPES[k]}" for n, k in zip(names, kinds)]
    columns += [f"{quote_name(n)} {SQL_TYPES[k]}" for n, k in zip(LINEAGE_COLUMNS,
                                                                LINEAGE_KINDS)]
    properties = TABLE_PROPERTIES + (COLUMN_MAPPING if needs_column_mapping(names) else ())
    props = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in properties)
    return (f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(columns)}) USING DELTA "
            f"TBLPROPERTIES ({props})")


# Each node's last report, one row per (node, target table, source file, source table),
# upserted after each cycle; one table per schema, so --fleet-status reads a fleet's
# tables in one query. Deletion vectors give it row-level concurrency on Databricks
# (DBR 14.3+): nodes upserting their own rows at once do not conflict. The source file
# and table came later: they are the last columns (an older table gains them), and a
# row without them (an older version's, one per node and target table) is taken over
# by the node's first report that has them. Among many sources the file is told by its
# real path (source_path, later still): a row without it (of the same base name and
# table) is taken over too.
STATUS_TABLE = "_uploader_nodes"
STATUS_COLUMNS = (("source_id", STRING), ("target_table", STRING), ("last_batch", STRING),
                  ("last_batch_at", TIMESTAMP), ("rows", BIGINT), ("cursor", STRING),
                  ("pending_rows", BIGINT), ("behind_rows", BIGINT), ("lag_seconds", DOUBLE),
                  ("interval_seconds", DOUBLE), ("version", STRING), ("last_error", STRING),
                  ("reported_at", TIMESTAMP), ("source_file", STRING),
                  ("source_table", STRING), ("source_path", STRING))
STATUS_KEY = ("source_id", "target_table", "source_file", "source_table", "source_path")
STATUS_PROPERTIES = (("delta.enableDeletionVectors", "true"),)


def status_table_sql(target, columns=STATUS_COLUMNS):
    """CREATE TABLE IF NOT EXISTS for the status table."""
    columns = ", ".join(f"{quote_name(n)} {SQL_TYPES[k]}" for n, k in columns)
    props = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in STATUS_PROPERTIES)
    return (f"CREATE TABLE IF NOT EXISTS {target} ({columns}) USING DELTA "
            f"TBLPROPERTIES ({props})")


def status_values(status, now=None):
    """A node_status dict as the status table's values, in STATUS_COLUMNS order."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cursor = status.get("cursor")
    error = status.get("last_error")
    return (status["source_id"], status["table"], status.get("last_batch"),
            parse_timestamp(status.get("last_upload")), status.get("rows"),
            json.dumps(cursor) if cursor is not None else None, status.get("pending"),
            status.get("behind"), status.get("lag_seconds"), status.get("interval"),
            status.get("version"), error[:2000] if error else None, moment_to_micros(now),
            status.get("source_file"), status.get("source_table"), status.get("source_path"))


def status_merge_sql(target, values):
    """Upsert one row (node, target table, source file and its path, source table):
    idempotent, and a copy that runs late (queued while its node died) leaves a newer
    report in place. The node's rows of older versions are matched too: without a
    source file nor table, or of this file and table without a path; such a row becomes
    this source's row, rather than stay behind as a line that went silent."""
    names = [quote_name(n) for n, _ in STATUS_COLUMNS]
    select = ", ".join(  # a typed NULL: the source's columns have the table's types
        f"{sql_literal(v, k) if v is not None else f'CAST(NULL AS {SQL_TYPES[k]})'} AS {n}"
        for v, (_, k), n in zip(values, STATUS_COLUMNS, names))
    updates = ", ".join(f"{quote_name(n)} = s.{quote_name(n)}" for n, _ in STATUS_COLUMNS
                        if n not in STATUS_KEY[:2])
    return (f"MERGE INTO {target} AS t USING (SELECT {select}) AS s "
            "ON t.`source_id` = s.`source_id` AND t.`target_table` = s.`target_table` "
            "AND (t.`source_file` <=> s.`source_file` AND t.`source_table` <=> "
            "s.`source_table` AND (t.`source_path` <=> s.`source_path` OR t.`source_path` "
            "IS NULL) OR t.`source_file` IS NULL AND t.`source_table` IS NULL AND "
            "t.`source_path` IS NULL) "
            f"WHEN MATCHED AND s.`reported_at` >= t.`reported_at` THEN UPDATE SET {updates} "
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(names)}) "
            f"VALUES ({', '.join('s.' + n for n in names)})")


def status_delete_sql(target, status, by_path=True):
    """Delete one source's row (a file the node forgot): node, target table, source file
    and source table must all match, and its path (or the row has none: an older
    version's report on this file), so no other node's or source's row goes, nor the
    node's row of an older version (no source file nor table)."""
    values = (status["source_id"], status["table"], status["source_file"],
              status["source_table"])
    path = status.get("source_path")
    where = [f"{quote_name(n)} = {sql_string(v)}" for n, v in zip(STATUS_KEY, values)]
    if by_path:  # (not on a table without the column)
        where.append(f"(`source_path` = {sql_string(path)} OR `source_path` IS NULL)"
                     if path else "`source_path` IS NULL")
    return f"DELETE FROM {target} WHERE " + " AND ".join(where)


def node_report(report):
    """A row of the status table ({column: value}) as fleet_line reads it."""
    cursor = report.pop("cursor")
    return {**report, "cursor": json.loads(cursor) if cursor else None,
            "last_upload": report.pop("last_batch_at"), "pending": report.pop("pending_rows"),
            "interval": report.pop("interval_seconds")}


def add_columns_sql(target, new):
    """ALTER TABLE ... ADD COLUMNS for columns the source gained."""
    cols = ", ".join(f"{quote_name(n)} {SQL_TYPES[k]}" for n, k in new)
    return f"ALTER TABLE {target} ADD COLUMNS ({cols})"


def column_mapping_sql(target):
    """Turn on column mapping so that a new column may have a name Delta refuses."""
    props = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in COLUMN_MAPPING)
    return f"ALTER TABLE {target} SET TBLPROPERTIES ({props})"


def copy_into_sql(target, folder, names):
    """COPY INTO the staged files (one commit); it skips files it has already loaded."""
    files = ", ".join(sql_string(n) for n in ([names] if isinstance(names, str) else names))
    return (f"COPY INTO {target} FROM {sql_string(folder)} FILEFORMAT = PARQUET "
            f"FILES = ({files}) FORMAT_OPTIONS ('mergeSchema' = 'true') "
            "COPY_OPTIONS ('mergeSchema' = 'true')")


def parquet_bytes(chunks):
    """Arrow record batches as one zstd Parquet file (written by deltalake: no pyarrow)."""
    import shutil
    from arro3.core import RecordBatchReader
    from deltalake import WriterProperties, write_deltalake
    data = RecordBatchReader.from_batches(chunks[0].schema, chunks)
    folder = scratch_dir("parquet-")
    try:
        write_deltalake(folder, data, mode="overwrite", target_file_size=2**40,
                        writer_properties=WriterProperties(compression="ZSTD"))
        files = glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)
        if len(files) != 1:
            raise SinkError(f"sink: expected one Parquet file, deltalake wrote {len(files)}")
        with open(files[0], "rb") as fh:
            return fh.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Temporary files (Parquet being encoded, files staged or downloaded) go under one folder
# per process, <system temp>/uploader-scratch-<pid>, locked for the life of the process: a
# SIGKILL skips every cleanup, and the next start removes the folders of dead processes
# only (the kernel drops a dead process's lock; another uploader on the host keeps its own).
SCRATCH_PREFIX = "uploader-scratch-"
SCRATCH = {}  # this process's folder: pid, path, the open lock file
SCRATCH_LOCK = threading.Lock()


def scratch_root(base=None):
    """This process's scratch folder, made and locked on first use (in a forked child
    too); removed at a normal exit. Its name has the pid and a random part: processes
    in separate pid namespaces (containers) sharing one temporary folder may have the
    same pid."""
    import atexit
    import shutil
    import tempfile
    with SCRATCH_LOCK:
        if SCRATCH.get("pid") == os.getpid():
            return SCRATCH["path"]
        base = base or tempfile.gettempdir()
        path = os.path.join(base, f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        new = tempfile.mkdtemp(prefix=".uploader-new-", dir=base)  # locked before it
        lock = open(os.path.join(new, ".lock"), "w")  # gets a name a cleanup looks at
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(new, path)
        SCRATCH.update(pid=os.getpid(), path=path, lock=lock)
        atexit.register(shutil.rmtree, path, True)
        return path


def scratch_dir(prefix):
    """A new temporary folder in this process's scratch folder (the caller removes it)."""
    import tempfile
    return tempfile.mkdtemp(prefix=prefix, dir=scratch_root())


def remove_stale_scratch(base=None):
    """Remove the scratch folders of uploader processes that are gone (their lock is
    free), never a live one's; one log line says how many. How many were removed."""
    import shutil
    import tempfile
    removed = 0
    for path in glob.glob(os.path.join(base or tempfile.gettempdir(), SCRATCH_PREFIX + "*")):
        if path == SCRATCH.get("path") or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live process
                shutil.rmtree(path)
            removed += 1
        except OSError:  # locked (BlockingIOError), or gone meanwhile
            continue
    if removed:
        log.info("start: removed %d temporary folder%s left by uploader processes that "
                 "were killed (in %s)", removed, "" if removed == 1 else "s",
                 base or tempfile.gettempdir())
    return removed


class UnavailableError(SinkError):
    """The warehouse cannot take a session yet (starting, or throttling): wait for it."""


# Kinds of connector failure: wait for the warehouse, retry the statement, or fail now.
UNAVAILABLE, TRANSIENT, PERMANENT = "unavailable", "transient", "permanent"
# Error classes ("[CLASS] message", Spark and Delta) and SQLSTATEs (or their first two
# characters) that say what to do. 2D521 is Delta's transaction conflict; 40xxx a
# rollback; 42xxx syntax and access rules, 22xxx bad data, 28xxx authorization.
TRANSIENT_MARKERS = ("DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
                     "TEMPORARILY_UNAVAILABLE", "2D521", "40")
PERMANENT_MARKERS = ("PERMISSION_DENIED", "INSUFFICIENT_PERMISSIONS", "UNAUTHORIZED",
                     "TABLE_OR_VIEW_NOT_FOUND", "SCHEMA_NOT_FOUND", "CATALOG_NOT_FOUND",
                     "PARSE_SYNTAX_ERROR", "UNRESOLVED_COLUMN", "DATATYPE_MISMATCH",
                     "CAST_INVALID_INPUT", "DELTA_FAILED_TO_MERGE_FIELDS", "42", "22", "28",
                     "0A", "23", "44")
AUTH_PHRASES = re.compile(r"Invalid access token|Token is expired|invalid_client", re.I)
# Java exception names of Delta's conflicts and Databricks' wording of them; and a
# session the warehouse forgot (it restarted): a new connection gets a new one
RETRY_PHRASES = re.compile(r"concurrent update|Concurrent\w*Exception|"
                           r"(Metadata|Protocol)ChangedException|"
                           r"Invalid (Session|Operation)Handle", re.I)


def error_causes(exc):
    """The exception and what it wraps: the connector's RequestError keeps the original
    in args[1]; urllib3's MaxRetryError in `reason`; Python chains in __cause__."""
    seen, todo = [], [exc]
    while todo and len(seen) < 10:
        current = todo.pop(0)
        if isinstance(current, BaseException) and current not in seen:
            seen.append(current)
            todo += [*current.args[1:2], getattr(current, "reason", None),
                     current.__cause__, current.__context__]
    return seen


def http_status(causes):
    """The HTTP status a failed request got, if any (4xx/5xx only)."""
    for cause in causes:
        context = getattr(cause, "context", None)
        code = context.get("http-code") if isinstance(context, dict) else None
        code = code or getattr(cause, "code", None) or getattr(cause, "status", None)
        if isinstance(code, int) and 400 <= code < 600:
            return code
    return None


def server_codes(text):
    """(error class, SQLSTATE) of a warehouse message '[CLASS] ... SQLSTATE: 42P01'."""
    found = re.match(r"\s*\[([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_]+)*\]", text)
    state = re.search(r"\bSQLSTATE:?\s*([0-9A-Z]{5})\b", text)
    return (found.group(1) if found else None), (state.group(1) if state else None)


def error_kind(exc):
    """UNAVAILABLE, TRANSIENT or PERMANENT, from the failure's structure: the
    exception classes, the HTTP status, the error class and SQLSTATE; never from
    numbers that happen to be in the text (a row count, a batch id)."""
    causes = error_causes(exc)
    names = {cls.__name__ for cause in causes for cls in type(cause).__mro__}
    text = str(exc)
    if "MaxRetryDurationError" in names:  # the connector refused to wait out a 429/503
        return UNAVAILABLE
    status = http_status(causes)
    if status in (429, 503) or ("ResponseError" in names and
                                re.search(r"too many (429|503) ", text)):
        return UNAVAILABLE
    if status is not None:
        return TRANSIENT if status >= 500 else PERMANENT
    for code in server_codes(text):
        if code and code.startswith(TRANSIENT_MARKERS):
            return TRANSIENT
        if code and code.startswith(PERMANENT_MARKERS):
            return PERMANENT
    if RETRY_PHRASES.search(text):
        return TRANSIENT
    if AUTH_PHRASES.search(text):
        return PERMANENT
    if any(is_network_error(c) for c in causes):
        return TRANSIENT
    if "RequestError" in names and len(causes) == 1:  # no answer, and no cause given
        return TRANSIENT
    return PERMANENT


def is_network_error(exc):
    """A connection, socket or HTTP-transport failure; not a bad URL or setting (those
    are ValueErrors too, in urllib3 and requests alike)."""
    network = isinstance(exc, (OSError, EOFError)) or type(exc).__module__.startswith(
        ("urllib3", "thrift", "http.client"))
    return network and not isinstance(exc, ValueError)


def databricks_error(what, exc, config):
    """A SinkError from a connector failure: transient ones are retried, others say why."""
    text = first_line(exc)  # redacted with the SinkError's text
    kind = error_kind(exc)
    hint = databricks_hint(exc, config) if kind == PERMANENT else ""
    if any(type(c).__name__ == "MaxRetryDurationError" for c in error_causes(exc)):
        hint = " (the warehouse is starting, busy or unreachable)"  # a plainer word for it
    return SinkError(f"sink: {what} failed: {text}{hint}", transient=kind != PERMANENT)


def databricks_hint(exc, config):
    """The obvious fix for a permanent warehouse error, if there is one."""
    status = http_status(error_causes(exc))
    error_class, state = server_codes(str(exc))
    if status == 401 or error_class == "UNAUTHORIZED" or AUTH_PHRASES.search(str(exc)):
        return "; check DATABRICKS_TOKEN (or the service principal's id and secret)"
    if status == 403 or state == "42501" or error_class in (
            "PERMISSION_DENIED", "INSUFFICIENT_PERMISSIONS"):
        return "; the token lacks a privilege on the catalog, schema or table"
    if error_class in ("SCHEMA_NOT_FOUND", "CATALOG_NOT_FOUND"):
        return (f"; create it first: CREATE SCHEMA IF NOT EXISTS "
                f"{qualified_name(config.databricks_database or '')}")
    return ""


def is_loopback(host):
    """True for localhost / 127.x / [::1] (with a port or not): a test warehouse."""
    return bool(re.fullmatch(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?", host or ""))


def host_url(host):
    """https://<host>, or http:// for a loopback host (a test double: no TLS)."""
    return f"{'http' if is_loopback(host) else 'https'}://{host}"


def http_call(method, url, data, headers, timeout, what):
    """One HTTP request with the standard library: (status, headers, body) of any
    answer. No answer (a network failure: the request may or may not have been carried
    out) is a transient SinkError."""
    import http.client
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise SinkError(f"sink: {what} failed: {first_line(exc)}", transient=True) from None


def http_reason(body, sep=": "):
    """The reason in a Databricks error reply: `<error_code><sep><message>` of its JSON
    (OAuth's `error`/`error_description` too), else its first line ("" when empty)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        found = json.loads(text)
    except ValueError:
        return text.strip().splitlines()[0][:300] if text.strip() else ""
    if not isinstance(found, dict):
        return text[:300]
    code = str(found.get("error_code") or found.get("error") or "")
    message = str(found.get("message") or found.get("error_description") or "")
    message = message.strip().rstrip(".")
    return sep.join(filter(None, (code, message))) or text[:300]


def http_error(what, status, headers, body, hint="", sep=": "):
    """A SinkError for an HTTP error reply, with the service's reason (secrets redacted,
    as in every SinkError: a service may echo the request's token) and `hint`: 429 and
    5xx (but 501) are transient, the rest permanent (the request must change);
    `retry_after`: the Retry-After it came with."""
    reason = http_reason(body, sep)
    error = SinkError(f"sink: {what} failed: HTTP {status}" + (f" {reason}" if reason else "")
                      + hint, transient=status == 429 or status >= 500 and status != 501)
    error.retry_after = retry_after(headers)
    return error


def retry_after(headers):
    """Seconds a 429/503 asks to wait (Retry-After in seconds), or None."""
    value = (headers or {}).get("Retry-After")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def asked_wait(cap, jitter=None):
    """retry()'s `asked` for HTTP errors: the Retry-After the error came with (set by
    http_error), at most `cap` seconds and, given `jitter`, up to 20% more (a fleet told
    the same wait does not come back at once); None: the backoff's wait."""
    def asked(exc):
        wait = getattr(exc, "retry_after", None)
        if wait is None:
            return None
        return min(wait, cap) * (jitter(1.0, 1.2) if jitter else 1)
    return asked


def renewing(send, renew, renewed):
    """send() -> (status, headers, body), sent once more when `renew(status, body)` (if
    any) got a new token for a refused one: once per request (`renewed`, a list kept across the
    request's retries, remembers it), then the refusal stands."""
    status, headers, body = send()
    if renew is not None and not renewed and renew(status, body):
        renewed.append(status)
        status, headers, body = send()
    return status, headers, body


class WorkspaceCredentials:
    """OAuth credentials from databricks-sdk, as the connector's `credentials_provider`.

    Client credentials (a service principal) or a ~/.databrickscfg profile (any auth
    the SDK knows: `databricks auth login`, a token, M2M). The SDK refreshes a token
    ahead of the `expires_in` it came with (tokens may be opaque, not JWTs); a request
    refused with 401/403 all the same (a token revoked or expired early) gets one fresh
    token and one retry: every statement the sink sends may run twice.
    """

    def __init__(self, config, url=None):
        self.config = config
        self.url = url or f"https://{config.databricks_host}"
        self._headers = None  # the SDK's header factory, made on first use

    def __call__(self):
        """What the connector calls once per connection: a header factory."""
        return self.headers

    def headers(self):
        """Authorization headers for one request (the SDK refreshes when due)."""
        if self._headers is None:
            self._headers = self._authenticate()
        headers = self._headers()
        remember_secret(*(value.partition(" ")[2] for value in headers.values()))
        return headers

    def refresh(self):
        """Forget the token: the next request gets a new one."""
        self._headers = None

    def _authenticate(self):
        from databricks.sdk.core import Config
        logging.getLogger("databricks.sdk").setLevel(logging.ERROR)  # its notes are not ours
        cfg = self.config
        settings = {"host": self.url}
        if cfg.databricks_client_id:
            settings.update(client_id=cfg.databricks_client_id, auth_type="oauth-m2m",
                            client_secret=cfg.databricks_client_secret)
        if cfg.databricks_config_profile:
            settings["profile"] = cfg.databricks_config_profile
        found = Config(**settings)
        remember_secret(found.client_secret, found.token, found.password,  # a profile's
                        found.azure_client_secret)
        return found.authenticate

    def connector(self, module):
        """The DB-API module, its connect and statements retried once with a new token."""
        credentials = self

        class Refreshing:
            @staticmethod
            def connect(**kwargs):
                conn = credentials.retried(lambda: module.connect(**kwargs))
                return RefreshingConnection(conn, credentials)

        return Refreshing

    def retried(self, action):
        """Run `action`; if the token was refused, refresh it and run it once more."""
        try:
            return action()
        except Exception as exc:  # the connector raises many types
            if not is_refused_token(exc):
                raise
            log.info("sink: the workspace refused the OAuth token (%s); getting a new one",
                     first_line(exc))
            self.refresh()
        return action()


def is_refused_token(exc):
    """True for an HTTP 401/403 (a token expired or revoked), not a missing privilege."""
    context = getattr(exc, "context", None)
    code = context.get("http-code") if isinstance(context, dict) else None
    return code in (401, 403) or bool(re.search(
        r"\b401\b|Unauthorized|Invalid access token|token (has )?expired", str(exc), re.I))


class RefreshingConnection:
    """A connector connection whose statements get one new token after a 401/403."""

    def __init__(self, conn, credentials):
        self._conn, self._credentials = conn, credentials

    def cursor(self):
        return RefreshingCursor(self._conn, self._credentials)

    def close(self):
        self._conn.close()

    def __getattr__(self, name):
        return getattr(self._conn, name)


class RefreshingCursor:
    """A cursor whose execute is retried once with a new token after a 401/403."""

    def __init__(self, conn, credentials):
        self._cursor, self._credentials = conn.cursor(), credentials

    def execute(self, *args):
        return self._credentials.retried(lambda: self._cursor.execute(*args))

    def __getattr__(self, name):
        return getattr(self._cursor, name)


@register_sink
class ZerobusSink(Sink):
    """Push rows to Zerobus Ingest over its REST interface (standard library only).

    Each request is `POST <endpoint>/zerobus/v1/tables/<catalog.schema.table>/insert`
    with a JSON array of records and a bearer token the workspace's OAuth endpoint issues
    to the service principal for that one table (client credentials, with
    `authorization_details` naming the table). The service acknowledges a request once
    it is durable; rows become queryable seconds later. It is at least once and has no
    idempotency key, so: a batch is encoded once and every retry sends the same bytes;
    an in-flight batch at a crash is sent again with exactly its rows; every row carries
    `_source_id`, `_batch_id` and `_row_key` (its source row's cursor key), and the view
    `<table>_deduped` keeps one row per (`_source_id`, `_row_key`). With a SQL warehouse
    configured (DATABRICKS_HTTP_PATH) the warehouse sink's own DDL creates the table and
    the view, and `has_committed` looks for the batch's last request there; without one,
    an in-flight batch is always sent again (its duplicates are the view's to drop).
    """

    name = "zerobus"
    RETRIES = 8
    TOKEN_EARLY = 60  # seconds before its expiry a token is replaced
    TIMEOUT = 60  # seconds for one request
    RETRY_AFTER_MAX = 300  # longest wait a 429/503 Retry-After is obeyed for
    TABLE_NAME = re.compile(r"[A-Za-z0-9_]+")  # what the service takes (its docs)

    def __init__(self, config, identity):
        super().__init__(config, identity)
        self.database = config.databricks_database
        self.endpoint = zerobus_url(config)
        self.token_url = f"{host_url(config.databricks_host)}/oidc/v1/token"
        self.warehouse = (DatabricksSink(config, identity) if config.databricks_http_path
                          else None)
        self._tokens = {}  # table -> (token, monotonic expiry)
        self._checked = set()  # tables the service took a probe for
        self._views = {}  # table -> columns of its deduped view as last created
        self._odd_warned = set()  # tables whose column names were warned about
        self._offset = ("", 0)  # (batch id, its rows encoded before this part)

    @property
    def destination(self):
        return f"zerobus:{self.endpoint}/{self.database}"

    def describe(self):
        return f"Zerobus Ingest {self.endpoint} {self.database}"

    @classmethod
    def check_settings(cls, config):
        cfg = config
        for name in ("databricks_client_id", "databricks_client_secret"):
            if not getattr(cfg, name):
                raise missing(name, " for target zerobus (Zerobus Ingest takes the OAuth "
                              "token of a service principal)")
        if not cfg.zerobus_endpoint:
            raise missing("zerobus_endpoint", " for target zerobus")
        if cfg.zerobus_max_request_bytes < 10_000:
            raise ConfigError(f"config: zerobus_max_request_bytes must be at least 10000 "
                              f"(got {cfg.zerobus_max_request_bytes} from "
                              f"{cfg.origin('zerobus_max_request_bytes')})")
        endpoint = zerobus_url(cfg)
        workspace = cfg.zerobus_workspace_id or urllib.parse.urlsplit(
            endpoint).hostname.split(".")[0]
        if not workspace.isdigit():
            raise missing("zerobus_workspace_id", f": the endpoint {endpoint} does not "
                          "start with the workspace id (<workspace-id>.zerobus.<region>...)")
        database = (validate_workspace(cfg) if cfg.databricks_http_path else
                    workspace_database(cfg, " for target zerobus"))
        return dataclasses.replace(cfg, databricks_database=database,
                                   zerobus_workspace_id=workspace)

    @classmethod
    def ddl(cls, database, table, names, kinds):
        """The table (with `_row_key`) and its deduplicating view."""
        names, kinds = list(names) + ["_row_key"], list(kinds) + [STRING]
        return [create_table_sql(qualified_name(database, table), names, kinds),
                deduped_view_sql(database, table, table_layout(names))]

    def announce(self):
        log.info("target: Zerobus Ingest %s into %s: at least once in each table, exactly "
                 "once in its <table>_deduped view", self.endpoint, self.database)
        if self.warehouse is None:
            log.info("target: no SQL warehouse configured (DATABRICKS_HTTP_PATH): the "
                     "tables and views must exist (--print-ddl prints them), and an "
                     "in-flight batch at a crash is sent again")

    def query(self, sql, info_table=None):
        return self.through_warehouse("--run-query").query(sql, info_table)

    def self_test(self, name):
        """--test-upload: a scratch table made through the warehouse, a token for it, a
        row sent to Zerobus Ingest, the table dropped. (The row is not read back: rows
        become visible seconds after the service acknowledges them.)"""
        warehouse = self.through_warehouse("--test-upload")
        target = warehouse.target(name)
        row = json.dumps([{"id": 1, "note": "it works", "at": 0}]).encode()
        steps = [(f"create {name}", lambda: warehouse.execute(
                     f"CREATE TABLE {target} (id BIGINT, note STRING, at TIMESTAMP) "
                     "USING DELTA", what="creating a scratch table")),
                 (f"get a token for {self.fqn(name)}", lambda: self.token(name)),
                 ("send a row", lambda: self._post(name, row, "sending a row")),
                 (f"drop {name}", lambda: warehouse.execute(
                     f"DROP TABLE {target}", what="dropping the scratch table"))]
        yield from run_steps(steps)

    def close(self):
        if self.warehouse is not None:
            self.warehouse.close()

    def fqn(self, table):
        return f"{self.database}.{table}"

    # --- tables --------------------------------------------------------------------

    def known_kinds(self, table):
        """The table's columns (through the warehouse); and, at start, the service's
        word on the table: one it refuses fails here, with its reason."""
        self.check_name(table)
        kinds = self.through_warehouse().known_kinds(table) if self.warehouse else {}
        if kinds or self.warehouse is None:
            self.check_table(table)
        return kinds

    def check_name(self, table):
        if not self.TABLE_NAME.fullmatch(table):
            raise SinkError(f"sink: Zerobus Ingest takes only table names of ASCII "
                            f"letters, digits and underscores, not {table!r}; set "
                            "DATABRICKS_TABLE to such a name")

    def check_table(self, table):
        """Once per table: a token for it and an empty insert; a refusal says why."""
        if table in self._checked:
            return
        self.check_name(table)
        try:
            self._post(table, b"[]", f"checking table {self.fqn(table)}")
        except SinkError as exc:
            if "HTTP 400" not in str(exc):  # an empty array may be refused as such
                hint = "" if self.warehouse else (
                    "; create it and its view (--print-ddl prints them) or set "
                    "DATABRICKS_HTTP_PATH so the uploader creates them")
                raise SinkError(f"{exc}{hint if 'NOT_FOUND' in str(exc) else ''}",
                                transient=exc.transient) from None
            log.debug("sink: the empty probe of %s was refused (%s); rows will tell",
                      table, exc)
        self._checked.add(table)

    def prepare(self, table, batch):
        """Through the warehouse: the table with the batch's columns, and its view (made
        when missing or when its columns are not the table's: a fleet restarting does
        not replace it a thousand times)."""
        self.check_name(table)  # before the warehouse makes a table the service refuses
        odd = [n for n in batch.columns if not self.TABLE_NAME.fullmatch(n)]
        if odd and table not in self._odd_warned:  # said once per table
            self._odd_warned.add(table)
            log.warning("sink: Zerobus Ingest's documentation (of its preview) allowed only "
                        "ASCII letters, digits and underscores in column names: the service "
                        "may refuse %s", ", ".join(map(repr, odd)))
        if self.warehouse is not None:
            warehouse, names = self.through_warehouse(), list(batch.columns) + ["_row_key"]
            warehouse.ensure_table(table, names, list(batch.kinds) + [STRING])
            columns = list(warehouse.known_kinds(table))
            if self._views.get(table) != columns:  # once per process and new column
                if list(warehouse._describe_again(table + DEDUPED_SUFFIX)) != columns:
                    warehouse._ddl(deduped_view_sql(self.database, table, columns), table)
                self._views[table] = columns
        self.check_table(table)

    # --- writes --------------------------------------------------------------------

    def encode(self, table, part):
        """Each row as a JSON record without its `_batch_id` (added per request: the
        last request of a batch is told apart), frozen: retries send these bytes."""
        rescued = {}
        columns = [coerce_column(values, kind, name, rescued)
                   for name, kind, values in zip(part.columns, part.kinds, part.values)]
        encoders = [ZEROBUS_VALUES.get(kind, ZEROBUS_VALUES[STRING]) for kind in part.kinds]
        batch, offset = self._offset
        # parts of a batch come in order; its first part starts the numbering again, so
        # a batch encoded again in this process (re-sent after a failed write) gets the
        # same keys, and the view keeps one copy
        offset = offset if batch == part.batch_id and not part.first else 0
        keys = row_keys(part, table, offset, self.identity.source_table)
        self._offset = (part.batch_id, offset + part.count)
        now = (dt.datetime.now(dt.timezone.utc) - EPOCH) // ONE_MICROSECOND
        extra = rescued_json(rescued, part.count)
        rows, dumps = [], json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                           allow_nan=False).encode
        for i, row in enumerate(zip(*columns)):
            record = {name: encode(value) for name, encode, value
                      in zip(part.columns, encoders, row) if value is not None}
            record.update(_row_key=keys[i], _source_id=self.identity.source_id,
                          _uploaded_at=now)
            if self.identity.source_file:  # rows of two files may share a row key
                record["_source_file"] = self.identity.source_file
            if extra[i]:
                record["_rescued_data"] = extra[i]
            rows.append(dumps(record).encode("utf-8"))
        return rows, len(rescued)

    def write(self, table, batch):
        """The batch in requests under zerobus_max_request_bytes, in order, each sent
        until the service acknowledges it."""
        self.prepare(table, batch)
        rows = [row for part in batch.payload for row in part]
        tag = len(batch.batch_id) + 40  # `,"_batch_id":"<id>.k/n"` at most
        groups = pack_requests(rows, self.config.zerobus_max_request_bytes - 2, tag)
        for k, group in enumerate(groups, 1):
            batch_id = part_id(batch.batch_id, k, len(groups))
            field = b',"_batch_id":' + json.dumps(batch_id).encode() + b"}"
            body = b"[" + b",".join(row[:-1] + field for row in group) + b"]"
            what = f"sending batch {batch.batch_id}" + (
                f" (request {k}/{len(groups)})" if len(groups) > 1 else "")
            self._post(table, body, what)
        return Receipt(batch.count)

    def _post(self, table, body, what):
        """POST one insert with the table's token; a token refused (401) is replaced
        once."""
        url = (f"{self.endpoint}/zerobus/v1/tables/"
               f"{urllib.parse.quote(self.fqn(table), safe='.')}/insert")

        def refresh(status, reply):
            if status != 401:
                return False
            log.info("sink: Zerobus Ingest refused the token for %s (%s); getting a new "
                     "one", table, http_reason(reply) or "no details")
            self._tokens.pop(table, None)
            return True

        self._request(url, body, lambda: {
            "Authorization": f"Bearer {self.token(table)}",
            "Content-Type": "application/json", "User-Agent": f"{TOOL}/{__version__}"},
            what, refresh)

    def _request(self, url, body, headers, what, renew=None):
        """POST until the answer is 2xx (its body): 429, 5xx and network failures are
        retried (retry(): capped, jittered backoff; a Retry-After is obeyed, plus up to
        20% so a fleet told the same wait does not come back at once); a refusal is sent
        again at once when `renew(status, reply)` got a new token (once: renewing());
        anything else fails with the reason."""
        renewed = []

        def attempt():
            status, answer, reply = renewing(lambda: http_call(
                "POST", url, body, headers(), self.TIMEOUT, what), renew, renewed)
            if 200 <= status < 300:
                return reply
            raise http_error(what, status, answer, reply,
                             ZEROBUS_HINTS.get(status, ""))

        return self.retry(attempt, what=what, is_transient=is_transient_sink_error,
                          attempts=self.RETRIES, first=2.0, cap=60.0,
                          asked=asked_wait(self.RETRY_AFTER_MAX, self.jitter))

    def token(self, table):
        """The OAuth token for `table` (one per table: the service checks the scope)."""
        token, expiry = self._tokens.get(table, (None, 0.0))
        if token is None or self.clock() >= expiry:
            token, lifetime = self._fetch_token(table)
            remember_secret(token)  # a service or proxy may echo it in an error
            expiry = self.clock() + max(lifetime - self.TOKEN_EARLY, lifetime / 2)
            self._tokens[table] = (token, expiry)
        return token

    def _fetch_token(self, table):
        """Client credentials with `authorization_details` for the one table; a
        refusal is permanent and says why; (token, seconds it lives)."""
        cfg = self.config
        catalog, schema = self.database.split(".")
        details = [{"type": "unity_catalog_privileges", "privileges": privileges,
                    "object_type": kind, "object_full_path": path}
                   for privileges, kind, path in (
                       (["USE CATALOG"], "CATALOG", catalog),
                       (["USE SCHEMA"], "SCHEMA", self.database),
                       (["SELECT", "MODIFY"], "TABLE", self.fqn(table)))]
        form = urllib.parse.urlencode({
            "grant_type": "client_credentials", "scope": "all-apis",
            "resource": f"api://databricks/workspaces/{cfg.zerobus_workspace_id}/"
                        "zerobusDirectWriteApi",
            "authorization_details": json.dumps(details)}).encode()
        basic = base64.b64encode(f"{cfg.databricks_client_id}:"
                                 f"{cfg.databricks_client_secret}".encode()).decode()
        what = f"getting a Zerobus token for {self.fqn(table)}"
        reply = self._request(self.token_url, form, lambda: {
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded"}, what)
        try:
            found = json.loads(reply)
            return found["access_token"], float(found.get("expires_in") or 3600)
        except (ValueError, KeyError, TypeError):
            raise SinkError(f"sink: {what}: the token endpoint answered without an "
                            "access_token") from None

    # --- what the table holds (through the warehouse) ---------------------------------

    def has_committed(self, table, seq, batch_id, source_id=None):
        """With a warehouse: the batch's only or last request is in the table (its
        requests go in order, each once the one before is durable). A row not visible
        yet proves nothing (they appear seconds later), so absence means: send again."""
        if self.warehouse is not None and self.through_warehouse().has_committed(
                table, seq, batch_id, source_id):
            return True
        log.info("sink: batch %s is not seen in %s; Zerobus Ingest cannot say whether it "
                 "landed, so it is sent again (%s_deduped keeps one copy of each row)",
                 batch_id, table, table)
        return False

    def through_warehouse(self, doing=""):
        """The warehouse sink, waiting as this sink waits (a test's clock, a stop)."""
        if self.warehouse is None:  # (only actions get here: a setting is missing)
            raise ConfigError(f"config: {doing} reads the table through a SQL warehouse: "
                              "set DATABRICKS_HTTP_PATH (Zerobus Ingest only takes rows)")
        warehouse = self.warehouse
        warehouse.sleep, warehouse.clock, warehouse.jitter = self.sleep, self.clock, self.jitter
        return warehouse

    def count_rows(self, table, source_id):
        """Rows of the node in the table, copies included (any says the table holds
        the node's rows); without a warehouse 0, said in a line: a table new to the
        state then starts from the beginning, and rows it already holds from this
        target appear once in the view all the same (their `_row_key`s are the same)."""
        if self.warehouse is None:
            log.info("sink: without a SQL warehouse the rows of node %s in %s cannot be "
                     "counted; taken as 0 (rows sent again appear once in %s%s)",
                     source_id, table, table, DEDUPED_SUFFIX)
            return 0
        return self.through_warehouse().count_rows(table, source_id)

    def count_file_rows(self, table, source_id, source_file, sent=()):
        """As count_rows: without a SQL warehouse none, said in a line."""
        if self.warehouse is None:
            self.count_rows(table, source_id)  # (says it cannot count)
            return {}
        return self.through_warehouse().count_file_rows(table, source_id, source_file,
                                                        sent)

    def read_keys(self, table, source_id, names):
        return self.through_warehouse("reading keys").read_keys(table, source_id, names)

    def recover_position(self, table, source):
        return self.through_warehouse("--recover-state").recover_position(table, source)

    def fleet(self, table):
        """--fleet-status through the warehouse: per node and source file, its rows in
        the view, its newest batch and when it was uploaded. No node reports (pending
        rows, errors): they would cost a warehouse statement per node and cycle, which
        this target exists to avoid."""
        warehouse = self.through_warehouse("--fleet-status")
        view = table + DEDUPED_SUFFIX
        keys, group = fleet_keys(warehouse._describe_again(view))
        rows = warehouse._rows(
            f"SELECT {keys}, count(*), max_by(`_batch_id`, `_uploaded_at`), "
            f"max(`_uploaded_at`) FROM {warehouse.target(view)} GROUP BY {group}", None,
            f"reading the fleet in {table}")
        reports = [{"source_id": node, "source_file": file, "last_batch": batch}
                   for node, file, _, batch, _ in sorted(rows, key=lambda r: str(r[4]))]
        return fleet_lines(reports, {(node, file): (count, as_utc(newest))
                                     for node, file, count, _, newest in rows})


DEDUPED_SUFFIX = "_deduped"


def deduped_view_sql(database, table, columns):
    """CREATE OR REPLACE VIEW <table>_deduped: one row per (_source_id, _source_file,
    _row_key), the first copy uploaded (a batch sent again repeats its rows with a later
    _uploaded_at); the rows of two files of one table may share a row key. Rows without
    a `_row_key` (written by another target) are all kept."""
    cols = ", ".join(quote_name(c) for c in columns)
    return (f"CREATE OR REPLACE VIEW {qualified_name(database, table + DEDUPED_SUFFIX)} "
            f"AS SELECT {cols} FROM (SELECT {cols}, row_number() OVER (PARTITION BY "
            "`_source_id`, `_source_file`, `_row_key` ORDER BY `_uploaded_at`, "
            "`_batch_id`) AS "
            f"`_copy_number` FROM {qualified_name(database, table)}) WHERE `_copy_number` = 1 "
            "OR `_row_key` IS NULL")


def row_keys(part, table, offset, source_table):
    """`_row_key` of each row: its source table and source row's cursor key as JSON
    (two source tables may feed one target table); for aggregated rows (no one source
    row) '<batch id>:<row number in the batch>' (batch ids are unique per source)."""
    keys = part.keys
    if table.startswith("aggregated_") or not keys or len(keys[0]) != part.count:
        return [f"{part.batch_id}:{offset + i}" for i in range(part.count)]
    return [json.dumps([source_table, *map(jsonable, key)], separators=(",", ":"))
            for key in zip(*keys)]


def zerobus_double(value):
    if math.isfinite(value):
        return value
    return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"


# How a typed value travels in a Zerobus JSON record (the protobuf JSON mapping the
# service's JSON records follow: TIMESTAMP as microseconds since the epoch, bytes base64)
ZEROBUS_VALUES = {BIGINT: int, DOUBLE: zerobus_double, STRING: str, BOOLEAN: bool,
                  BINARY: lambda v: base64.b64encode(v).decode("ascii"), TIMESTAMP: int}


def pack_requests(rows, budget, tag):
    """Encoded rows cut into request bodies of at most `budget` bytes (each row grows
    by `tag` bytes when sent; a row bigger than that goes alone), in order."""
    groups, group, size = [], [], 0
    for row in rows:
        if group and size + len(row) + tag + 1 > budget:
            groups.append(group)
            group, size = [], 0
        group.append(row)
        size += len(row) + tag + 1
    if group:
        groups.append(group)
    return groups


ZEROBUS_HINTS = {
    401: "; check the service principal's id and secret",
    403: "; grant the service principal USE CATALOG, USE SCHEMA, SELECT and MODIFY on the "
         "table",
    413: "; lower zerobus_max_request_bytes"}


def zerobus_url(config):
    """The endpoint as a URL: https://, or http:// for a loopback host (a test double)."""
    text = config.zerobus_endpoint.strip().rstrip("/")
    if "://" not in text:
        text = host_url(text)
    parts = urllib.parse.urlsplit(text)
    where = f"(got {config.zerobus_endpoint!r} from {config.origin('zerobus_endpoint')})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"config: zerobus_endpoint must be a host name or an https:// "
                          f"URL {where}")
    if "@" in parts.netloc:  # it would be in logs, status and state
        raise ConfigError(f"config: zerobus_endpoint must not carry a user or password "
                          f"{where}")
    if parts.scheme == "http" and not is_loopback(parts.netloc):
        raise ConfigError(f"config: zerobus_endpoint must use https:// (plain http:// only "
                          f"for a loopback host) {where}")
    return text


@register_sink
class LandingSink(Sink):
    """Land each batch as one immutable Parquet file in a Unity Catalog volume.

    A fan-in target (DESIGN 11): no warehouse on the write path. A batch is one zstd
    Parquet file, uploaded with the Files API to a name made of its batch id,
    `<volume>/<route table>/<source_id>/<batch id>.parquet`, so a batch sent again
    rewrites the same file with the same rows, and a batch in flight is settled by
    asking (HEAD) whether its file is there with the size recorded when it was sealed.
    One Auto Loader streaming table (or a scheduled COPY INTO) per route loads each
    file once (--print-ingest-sql). After each cycle the node writes
    `<volume>/_nodes/<source_id>.json`: its cursor, pending rows, last upload, version
    and last error (Spark's file listing skips names that begin with `_`).
    """

    name = "landing"
    RETRIES = 8
    STATUS_DIR = "_nodes"
    files_class = None  # the Files API client; None: FilesApi (tests may set their own)

    def __init__(self, config, identity):
        super().__init__(config, identity)
        self.volume = config.databricks_volume.rstrip("/")
        self._files = None
        self._superseded = self.superseded_status_paths()  # removed after a report

    @classmethod
    def check_settings(cls, config):
        """A volume path, a host and credentials; no SQL warehouse."""
        volume = config.databricks_volume
        if not is_volume_path(volume):
            raise ConfigError(f"config: databricks_volume must be a volume path "
                              f"/Volumes/catalog/schema/volume[/folder] for target landing "
                              f"(got {volume!r} from {config.origin('databricks_volume')}): "
                              "set --databricks-volume or DATABRICKS_VOLUME")
        check_credentials(config, " for target landing")
        if config.databricks_database:
            workspace_database(config, " for target landing")
        if not re.fullmatch(r"[^/\\_.=\x00-\x1f][^/\\=\x00-\x1f]*", config.source_id):
            raise ConfigError(f"config: source_id {config.source_id!r} (from "
                              f"{config.origin('source_id')}) names a folder of landed "
                              "files: it may not contain / \\ = or control characters, "
                              "nor begin with _ or . (Spark skips such folders)")
        return config

    @property
    def destination(self):
        return f"landing:{self.config.databricks_host}{self.volume}"

    def describe(self):
        return f"Databricks volume {self.volume} on {self.config.databricks_host}"

    def announce(self):
        log.info("target: each batch lands as one Parquet file under %s/<table>/%s/; "
                 "--print-ingest-sql prints the SQL that loads them", self.volume,
                 self.config.source_id)

    @property
    def files(self):
        """The Files API client, made on first use."""
        if self._files is None:
            self._files = (self.files_class or FilesApi)(self.config, self)
        return self._files

    def folder(self, table, source_id=None):
        """Where one node's batch files of one route go."""
        return f"{self.volume}/{table}/{source_id or self.identity.source_id}"

    def file_path(self, table, batch_id, source_id=None):
        return f"{self.folder(table, source_id)}/{batch_id}.parquet"

    def self_test(self, name):
        """--test-upload: upload a file to a scratch folder of the volume, check its
        size, read it back, remove it (the principal's READ and WRITE VOLUME)."""
        folder, body = f"{self.volume}/{name}", b"it works\n"
        path = f"{folder}/probe.txt"

        def check_size():
            if self.files.size(path) != len(body):
                raise SinkError(f"{path} is not {len(body)} bytes")

        def read():
            if self.files.download(path) != body:
                raise SinkError(f"{path} did not read back as written")

        def remove():
            self.files.call("DELETE", "files", path, what=f"removing {path}")
            self.files.call("DELETE", "directories", folder, what=f"removing {folder}")

        yield from run_steps([(f"upload {path}", lambda: self.files.upload(path, body)),
                              ("check its size", check_size), ("read it back", read),
                              (f"remove {name}", remove)])

    # --- writes --------------------------------------------------------------------

    def encode(self, table, chunk):
        return to_record_batch(chunk, self.identity)

    def seal(self, table, batch):
        """The batch's chunks as one Parquet file (the payload, a list of one); the
        in-flight record keeps its size."""
        batch.payload = [parquet_bytes(batch.payload)]
        return {"bytes": len(batch.payload[0])}

    def write(self, table, batch):
        data = batch.payload[0] if isinstance(batch.payload[0], bytes) else \
            parquet_bytes(batch.payload)
        self.files.upload(self.file_path(table, batch.batch_id), data)
        return Receipt(batch.count)

    def has_committed(self, table, seq, batch_id, source_id=None, mark=None):
        """The batch's file is there (with the size it was sealed with, when known)."""
        size = self.files.size(self.file_path(table, batch_id, source_id))
        if size is None:
            return False
        expected = (mark or {}).get("bytes")
        if expected is not None and size != expected:
            log.warning("sink: %s holds %d bytes, %d were sent: it is sent again",
                        self.file_path(table, batch_id, source_id), size, expected)
            return False
        return True

    def status_path(self):
        """This node's status file: `<source_id>.json`; among many sources one per
        source, `<source_id>=<digest of its file's real path and table>.json` (no source
        id holds an `=`, so no name is another node's)."""
        name = self.identity.source_id
        if self.identity.scope:
            source = f"{self.identity.source_path}\0{self.identity.source_table}"
            name += "=" + uuid.uuid5(uuid.NAMESPACE_URL, source).hex[:16]
        return f"{self.volume}/{self.STATUS_DIR}/{name}.json"

    def superseded_status_paths(self):
        """Among many sources, the status file this source's replaces: the node's
        single-source file (versions before 2026-11-30 wrote one per node, whatever its
        sources). One DELETE per source and process, answered 404 once it is gone."""
        if not self.identity.scope:
            return []
        return [f"{self.volume}/{self.STATUS_DIR}/{self.identity.source_id}.json"]

    def report_status(self, status):
        """Write this node's status file for this source (a failure is logged, never
        fatal); after the first, remove the files it supersedes."""
        path = self.status_path()
        body = json.dumps({**self.identity.with_source(status), "reported_at": utc_now_text()},
                          default=str, sort_keys=True)
        try:
            self.files.upload(path, body.encode() + b"\n", tries=2)
        except SinkError as exc:
            log.warning("sink: could not write the node status %s: %s", path, exc)
            return
        while self._superseded:
            old = self._superseded[0]
            try:
                gone = self.files.call("DELETE", "files", old, what=f"removing {old}",
                                       missing_ok=True, tries=2)[0] != 404
            except SinkError as exc:
                log.debug("sink: %s stays until the next report: %s", old, exc)
                return
            if gone:
                log.info("sink: the status file %s is replaced by %s", old, path)
            self._superseded.pop(0)

    def retire_status(self, table):
        """Delete this source's status file (one per source file and table: `table`
        is in it); one already gone is fine."""
        path = self.status_path()
        source = f"{self.identity.source_file}:{self.identity.source_table}"
        try:
            status = self.files.call("DELETE", "files", path, what=f"removing {path}",
                                     missing_ok=True, tries=2)[0]
        except SinkError as exc:
            log.warning("sink: the status of %s (forgotten) stays in %s: --fleet-status "
                        "keeps its line (%s)", source, path, exc)
            return
        if status != 404:
            log.info("sink: %s is forgotten: its line of --fleet-status (its status file "
                     "%s) is removed", source, path)

    # --- reads ---------------------------------------------------------------------

    def landed(self, table, source_id):
        """[(name, size)] of a node's batch files in a route, in batch order."""
        entries = self.files.list(self.folder(table, source_id))
        found = [(e["name"], e.get("file_size")) for e in entries
                 if not e.get("is_directory") and e["name"].endswith(".parquet")]
        return sorted(found, key=lambda item: batch_order(item[0]))

    def _select(self, table, source_id, what, doing, newest=False):
        """Rows of `SELECT what` over a node's landed files (downloaded, then read with
        DataFusion; with `newest`, its newest file only), [] when there are none."""
        return self._query(table, source_id, f"SELECT {what} FROM t", doing, newest)[1]

    def _query(self, table, source_id, sql, doing, newest=False, keep=None):
        """(Arrow schema, rows) of `sql` over table t, the node's landed files (a
        function: of t's column names); (None, []) when there are none."""
        import shutil
        from deltalake import QueryBuilder
        names = [name for name, _ in self.landed(table, source_id)][-1 if newest else 0:]
        names = [name for name in names if keep is None or keep(name)]
        if not names:
            return None, []
        folder = scratch_dir("landed-")
        try:
            for name in names:
                with open(os.path.join(folder, name), "wb") as fh:
                    fh.write(self.files.download(f"{self.folder(table, source_id)}/{name}"))
            query = QueryBuilder()
            query.execute(f"CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION "
                          f"{sql_string(folder + os.sep)}")
            if callable(sql):
                sql = sql(query.execute("SELECT * FROM t LIMIT 0").schema.names)
            reader = query.execute(sql)
            return reader.schema, [row for b in reader
                                   for row in zip(*(c.to_pylist() for c in b.columns))]
        except Exception as exc:  # DataFusion's own error types
            raise SinkError(f"sink: {doing} of node {source_id} in "
                            f"{self.folder(table, source_id)} failed: "
                            f"{first_line(exc)}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def known_kinds(self, table):
        """{column: kind} of the newest file this node landed in `table`: a column keeps
        its type from one file to the next (across restarts too), as the ingest wants."""
        schema, _ = self._query(table, self.identity.source_id, "SELECT * FROM t LIMIT 0",
                                "reading the columns", newest=True)
        from arro3.core import DataType
        views = {str(DataType.string_view()): STRING, str(DataType.binary_view()): BINARY}
        stored = {str(arrow_type(k)): k for k in (BIGINT, DOUBLE, STRING, BINARY, BOOLEAN,
                                                  TIMESTAMP)}
        kinds = {}
        for name, found in zip(schema.names, schema.types) if schema else ():
            kind = stored.get(str(found)) or views.get(str(found))  # DataFusion reads views
            if kind and name not in LINEAGE_COLUMNS:
                kinds[name] = kind
        return kinds

    def count_rows(self, table, source_id):
        rows = self._select(table, source_id, "count(*)", "counting rows")
        return rows[0][0] if rows else 0

    def count_file_rows(self, table, source_id, source_file, sent=()):
        """(Only the files of batches not `sent` are read: a file is a batch.)"""
        def sql(names):  # files of versions before _source_file: of any file
            where = (f'WHERE ("_source_file" = {text_literal(source_file)} OR '
                     '"_source_file" IS NULL) ') if "_source_file" in names else ""
            return f'SELECT "_batch_id", count(*) FROM t {where}GROUP BY "_batch_id"'

        return dict(self._query(
            table, source_id, sql, "counting rows",
            keep=lambda name: batch_prefix(name.removesuffix(".parquet")) not in sent)[1])

    def read_keys(self, table, source_id, names):
        columns = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        return {tuple(row) for row in self._select(table, source_id, columns,
                                                   "reading keys")}

    def recover_position(self, table, source):
        """The cursor after this node's landed rows: max of an integer cursor column."""
        return recover_by_max(lambda what: self._select(
            table, self.identity.source_id, what, "reading the cursor for --recover-state"),
            table, source, lambda n: '"' + n.replace('"', '""') + '"')

    def list_tables(self):
        return sorted(e["name"] for e in self.files.list(self.volume)
                      if e.get("is_directory") and not e["name"].startswith(("_", ".")))

    def fleet(self, table):
        """--fleet-status: each status file (as its node wrote it after its last cycle;
        one per node, or per source of a node with many) about `table`."""
        folder = f"{self.volume}/{self.STATUS_DIR}"
        reports = []
        for entry in self.files.list(folder):
            if entry.get("is_directory") or not entry["name"].endswith(".json"):
                continue
            try:
                status = json.loads(self.files.download(f"{folder}/{entry['name']}"))
            except ValueError:
                log.warning("sink: %s/%s is not a status file; skipped", folder, entry["name"])
                continue
            if status.get("table") == table:
                reports.append(status)
        reports.sort(key=lambda status: str(status.get("reported_at")))
        return fleet_lines(reports)

    @classmethod
    def ingest_sql(cls, config, tables):
        """--print-ingest-sql: the Databricks SQL that loads the landed files."""
        return landing_ingest_sql(config, tables)

    def close(self):
        self._files = None


def landing_ingest_sql(config, tables):
    """Statements (with comments) that load the landed files of each route table exactly
    once, in the volume's catalog.schema (or databricks_database), and the fleet view."""
    volume = config.databricks_volume.rstrip("/")
    database = config.databricks_database or ".".join(volume.split("/")[2:4])
    out = []
    for table in tables:
        target, folder = qualified_name(database, table), f"{volume}/{table}/"
        out += [f"-- {table}: an Auto Loader streaming table; it loads each landed file "
                "once (refresh it on the schedule below, or from a job)",
                ingest_streaming_sql(target, folder) + ";",
                f"-- {table}, or: a table loaded by a scheduled COPY INTO (a Databricks job "
                "running it every few minutes); COPY INTO skips files it has loaded",
                f"CREATE TABLE IF NOT EXISTS {target};",
                ingest_copy_sql(target, folder) + ";"]
    out += ["-- the fleet: one row per node (per source of a node with many), from the "
            "status file each node writes after each cycle",
            fleet_view_sql(qualified_name(database, "uploader_fleet"),
                           f"{volume}/{LandingSink.STATUS_DIR}/") + ";"]
    return "\n".join(out)


# Auto Loader adds its own rescued-data column; the files already carry the uploader's
# _rescued_data (values that did not fit their column), so the loader's gets another name
INGEST_OPTIONS = ("format => 'parquet', schemaEvolutionMode => 'addNewColumns', "
                  "rescuedDataColumn => '_rescued_load'")


def ingest_query(folder, stream=True):
    """The SELECT over the landed files of one route, with the file each row came from."""
    source = f"read_files({sql_string(folder)}, {INGEST_OPTIONS})"
    return (f"SELECT *, _metadata.file_path AS _landed_file FROM "
            f"{'STREAM ' if stream else ''}{source}")


def ingest_streaming_sql(target, folder):
    """CREATE OR REFRESH STREAMING TABLE over read_files (Databricks SQL only)."""
    return (f"CREATE OR REFRESH STREAMING TABLE {target} SCHEDULE EVERY 1 HOUR AS "
            + ingest_query(folder))


def ingest_copy_sql(target, folder):
    """COPY INTO from a route's folder: every node's files, each loaded once."""
    return (f"COPY INTO {target} FROM {sql_string(folder)} FILEFORMAT = PARQUET "
            "PATTERN = '*/*.parquet' FORMAT_OPTIONS ('mergeSchema' = 'true') "
            "COPY_OPTIONS ('mergeSchema' = 'true')")


def fleet_view_sql(view, folder):
    """A view of the nodes' status files (node_status, as each node last wrote it: one
    per node, or per source of a node with many; files of older versions have no
    source_file, source_table or source_path, which the hints make NULL)."""
    return (f"CREATE OR REPLACE VIEW {view} AS SELECT source_id, source_file, source_table, "
            "source_path, `table`, cursor, pending, "
            "behind, last_batch, CAST(last_upload AS TIMESTAMP) AS last_upload, `rows`, "
            "version, last_error, lag_seconds, `interval`, "
            "CAST(reported_at AS TIMESTAMP) AS reported_at FROM "
            f"read_files({sql_string(folder)}, format => 'json', "
            "schemaHints => 'cursor STRING, pending BIGINT, behind BIGINT, `rows` BIGINT, "
            "source_file STRING, source_table STRING, source_path STRING')")


def batch_order(name):
    """Sort key of a batch file `<state id>[-stream]-<seq>.parquet`: stream, then seq."""
    stem = name.removesuffix(".parquet")
    head, _, seq = stem.rpartition("-")
    return (head, int(seq)) if seq.isdigit() else (stem, -1)


class FilesApi:
    """The Databricks Files API on volume paths, with the standard library.

    PUT /api/2.0/fs/files{path}?overwrite=true (raw bytes; no body in the reply), HEAD
    for a file's size (404: none), GET to download, GET /api/2.0/fs/directories{path}
    to list (pages of `contents`, `next_page_token`), PUT of a directory to create it
    (idempotent). Errors are JSON `{"error_code", "message"}`. 429 (waiting its
    Retry-After), 5xx and network errors are tried again with capped, jittered backoff;
    a 401/403 gets one new token (OAuth), then is permanent with a hint. A PUT is
    idempotent here: a reply lost after the upload committed makes the retry rewrite
    the same bytes.
    """

    TIMEOUT = 60
    RETRY_AFTER_CAP = 60

    def __init__(self, config, pacer):
        self.config, self.pacer = config, pacer  # pacer: sleep, clock, jitter
        self.base = host_url(config.databricks_host)
        self._credentials = None
        self.requests = 0  # how many requests were sent (the fleet benchmark counts them)
        self._made = set()  # folders known to exist

    def headers(self):
        cfg = self.config
        if cfg.databricks_token:
            return {"Authorization": f"Bearer {cfg.databricks_token}"}
        if self._credentials is None:
            self._credentials = WorkspaceCredentials(cfg, self.base)
        return self._credentials.headers()

    def url(self, api, path, query=None):
        quoted = urllib.parse.quote(path, safe="/")
        return f"{self.base}/api/2.0/fs/{api}{quoted}" + (
            "?" + urllib.parse.urlencode(query) if query else "")

    def upload(self, path, data, tries=None):
        """Put a file (overwriting); its folder is made first, once per process."""
        folder = path.rsplit("/", 1)[0]
        if folder not in self._made:
            self.call("PUT", "directories", folder, what=f"creating {folder}", tries=tries)
            self._made.add(folder)
        self.call("PUT", "files", path, data, {"overwrite": "true"},
                  what=f"uploading {path}", tries=tries)

    def size(self, path):
        """The file's size in bytes, or None when it does not exist."""
        status, headers, _ = self.call("HEAD", "files", path, what=f"checking {path}",
                                       missing_ok=True)
        return None if status == 404 else int(headers.get("Content-Length", -1))

    def download(self, path):
        return self.call("GET", "files", path, what=f"downloading {path}")[2]

    def list(self, folder):
        """The entries of a folder ([] when it does not exist), all pages."""
        entries, token = [], None
        while True:
            status, _, body = self.call("GET", "directories", folder,
                                        query={"page_token": token} if token else None,
                                        what=f"listing {folder}", missing_ok=True)
            if status == 404:
                return entries
            page = json.loads(body or b"{}")
            entries += page.get("contents", [])
            token = page.get("next_page_token")
            if not token:
                return entries

    def call(self, method, api, path, data=None, query=None, what="", missing_ok=False,
             tries=None):
        """One request, retried while the failure is transient; (status, headers, body).
        A refused OAuth token (401/403) is replaced once, then the refusal stands."""
        url, renewed = self.url(api, path, query), []

        def once():
            status, headers, body = renewing(lambda: self.send(method, url, data, what),
                                             self.renew, renewed)
            if status < 300 or (status == 404 and missing_ok):
                return status, headers, body
            raise http_error(what, status, headers, body, sep=" ",
                             hint=FILES_API_HINTS.get(status, "").format(
                                 volume=self.config.databricks_volume))

        return self.pacer.retry(once, what=what, is_transient=is_transient_sink_error,
                                attempts=tries or LandingSink.RETRIES, first=1.0, cap=30.0,
                                spread=(0.5, 1.5), asked=asked_wait(self.RETRY_AFTER_CAP))

    def renew(self, status, body):
        """renewing()'s `renew`: a new OAuth token after a 401/403 (not a fixed token)."""
        if status not in (401, 403) or not self._credentials:
            return False
        log.info("sink: the workspace refused the token (HTTP %d); getting a new one",
                 status)
        self._credentials.refresh()
        return True

    def send(self, method, url, data, what):
        """One request with this client's token (http_call)."""
        headers = {**self.headers(), "User-Agent": f"{TOOL}/{__version__}"}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        self.requests += 1
        return http_call(method, url, data, headers, self.TIMEOUT, what)


FILES_API_HINTS = {
    401: "; check DATABRICKS_TOKEN (or the service principal's id and secret)",
    403: "; the principal needs READ VOLUME and WRITE VOLUME on the volume (and USE "
         "CATALOG, USE SCHEMA)",
    404: "; does the volume {volume} exist?"}


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
    """The configured state dir (created if needed: it was asked for); by default the
    volume at /state when it is a writable directory, else ./state, said in one line.
    /state is never created: made by the tool at the filesystem root, it would pass
    for a volume that is not there."""
    wanted = config.state_dir
    if config.origin("state_dir") != "default":
        if is_usable_dir(wanted, create=True):
            return wanted
        raise StateError(f"state: cannot write to {wanted} (from "
                         f"{config.origin('state_dir')}): missing or not writable")
    if is_usable_dir(wanted):
        return wanted
    fallback = os.path.abspath(FALLBACK_STATE_DIR)
    if os.path.exists(wanted):
        log.warning("state: %s is not a writable directory; keeping state in %s "
                    "(set STATE_DIR to choose)", wanted, fallback)
    else:
        log.info("state: no volume at %s; keeping state in %s (set STATE_DIR to choose)",
                 wanted, fallback)
    if not is_usable_dir(FALLBACK_STATE_DIR, create=True):
        raise StateError(f"state: cannot create {fallback}")
    return FALLBACK_STATE_DIR


def is_usable_dir(path, create=False):
    """True when a file can be written in directory `path` (made first if `create`)."""
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            return False
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def position_key(destination, table):
    """Progress is kept per target table: the destination system, then the table."""
    return f"{destination}/{table}"


# Positions of gone files kept after they are forgotten (see Checkpoint.forget): about
# 0.5 kB each in a state file written at every batch
FORGOTTEN_KEPT = 100
EMPTY_POSITION = {"cursor": None, "last_upload": None, "rows": 0, "seq": 0,
                  "inflight": None, "carry": None, "updated_at": None}


def locked(method):
    """Run a Checkpoint method under its lock: the jobs of many sources, each in its
    worker, share one state."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._mutex:
            return method(self, *args, **kwargs)
    return run


class Checkpoint:
    """Owns last_upload.json: a position (cursor, in-flight batch, ...) per target table.

    Nothing outside this class changes the state; callers name a position by its key
    (`position_key(destination, table)`) and get copies back.
    """

    clock = staticmethod(time.time)  # names the backup of a reset state; tests give their own

    def __init__(self, state_dir):
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self.data = None
        self._lock = None
        self._backup = False  # --reset-state: move the old file aside at the first save
        self._mutex = threading.RLock()

    def lock(self):
        """Take the state lock, or fail naming the process that holds it."""
        lock_path = self.path + ".lock"
        try:
            fh = open(lock_path, "a+", encoding="utf-8")
        except OSError as exc:
            raise StateError(f"state: cannot open {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise LockedError(f"state: another uploader (pid {holder}) is using "
                              f"{os.path.abspath(self.dir)}; one uploader per state "
                              "directory") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        except OSError as exc:
            with contextlib.suppress(OSError):  # close() flushes the pid again
                fh.close()
            raise StateError(f"state: cannot write {lock_path}: {exc.strerror}") from None
        self._lock = fh

    def load(self, source_desc, reset=False):
        """Read the state (missing means first run); foreign state is an error.

        With `reset` the old file is left alone until the first save, which moves it
        aside: a reset that is refused before then changes nothing."""
        if reset:
            self.data, self._backup = new_state(source_desc), os.path.exists(self.path)
            return self
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
        self.data = migrate_state(data, self.path)
        return self

    def load_many(self, reset=False):
        """Read the state of many sources (missing means first run). A state of one
        source (version 1 or 2) becomes one: each position keeps its cursor, batch ids
        and Delta app id, now keyed also by its file and table (said in one line)."""
        if reset or not os.path.exists(self.path):
            self.data, self._backup = new_state(None), reset and os.path.exists(self.path)
            return self
        data = self.read_old()
        if data is None:
            raise StateError(f"state: cannot read {self.path}; fix or move it, or use "
                             "--reset-state to upload from the start")
        self.data = to_many_state(data, self.path)
        return self

    @locked
    def forget(self, keys):
        """Remove positions (those of a file that is gone) and save. They are kept a
        while in the state's `forgotten` list (the newest FORGOTTEN_KEPT): a file that
        comes back, or a copy of it, is known by the row at its cursor (its inode too,
        when it kept it) and goes on there (Sources.follow_moves)."""
        kept = self.data.setdefault("forgotten", [])
        for key in keys:
            pos = self.data["destinations"].pop(key, None)
            if pos is not None:
                kept.append({**{k: v for k, v in pos.items() if not k.startswith("last_error")},
                             "key": key, "forgotten_at": utc_now_text()})
        del kept[:-FORGOTTEN_KEPT]
        self.save()

    @locked
    def move_file(self, old, new, file_id=None, apart=False, now=None):
        """Key the positions of file `old` by its new name `new`, in one save (a crash
        leaves all of them at one name): those the state keeps and, with `file_id`, only
        those of that file, and the forgotten ones of that file (back: kept again).
        Never onto a position there is: its file must be set apart first (`apart`: the
        positions of a gone file, under a name no file has until they are forgotten,
        keep in field `apart` the name they had); `now`: the (device, inode) the file
        has now, when it was checked (a volume mounted again gives another device)."""
        moved, kept = {}, []
        for key, pos in self.data["destinations"].items():
            if is_position_of(pos, old, file_id):
                moved[key] = pos
        for pos in self.data.get("forgotten", ()):
            if file_id is not None and is_position_of(pos, old, file_id):
                moved[pos["key"]] = {k: v for k, v in pos.items()
                                     if k not in ("key", "forgotten_at")}
            else:
                kept.append(pos)
        renamed = {}
        for key, pos in moved.items():
            table = pos["source"]["table"]
            pos = {k: v for k, v in pos.items() if k != "apart"}
            renamed[key.replace(source_scope(old, table), source_scope(new, table))] = {
                **pos, "source": {**pos["source"], "path": new},
                **({"apart": old} if apart else {"gone_at": None, "drained": None}),
                **({"file_id": list(now)} if now else {})}
        taken = set(renamed) & (set(self.data["destinations"]) - set(moved))
        if taken:
            raise StateError(f"state: cannot move the positions of {old} to {new}: "
                             f"{', '.join(sorted(taken))} is another file's")
        for key in moved:
            self.data["destinations"].pop(key, None)
        self.data["destinations"].update(renamed)
        if "forgotten" in self.data:
            self.data["forgotten"] = kept
        self.save()
        return len(renamed)

    def read_old(self):
        """The state file on disk (before a reset), or None when there is none or it is
        unreadable."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            check_state_shape(data)
        except (OSError, ValueError):
            return None
        return migrate_state(data, self.path, quiet=True)

    @locked
    def rename(self, old, new):
        """Give the position `old` the key `new` (a version 1 position, on first use)."""
        self.data["destinations"][new] = self.data["destinations"].pop(old)
        self.save()

    @locked
    def has_position(self, key):
        """True when the target table `key` has a position in this state."""
        return key in self.data["destinations"]

    @locked
    def position(self, key):
        """A copy of the position of one target table (an empty one if it has none)."""
        found = self.data["destinations"].get(key)
        return json.loads(json.dumps(found if found else EMPTY_POSITION))

    def _record(self, key):
        return self.data["destinations"].setdefault(key, dict(EMPTY_POSITION))

    @locked
    def update(self, key, **fields):
        """Set fields of a position (creating it) and save."""
        self._record(key).update(fields)
        self.save()

    @locked
    def begin(self, key, batch, table, source_id):
        """Record the batch as in-flight before it is sent."""
        self.update(key, inflight={
            "batch_id": batch.batch_id, "seq": batch.seq, "table": table,
            "rows": batch.count, "source_rows": batch.source_count,
            "cursor_end": encode_cursor(batch.cursor_end),
            "last_upload": batch.last_timestamp, "carry": batch.carry,
            "source_id": source_id, "cursor_row": batch.cursor_row,
            **({"mark": batch.mark} if batch.mark else {})})

    @locked
    def commit(self, key):
        """The in-flight batch is in the target: advance the cursor past it."""
        pos = self._record(key)
        flight = pos["inflight"]
        pos.update(seq=flight["seq"], inflight=None, rows=pos["rows"] + flight["rows"],
                   table=flight["table"])
        self._move(pos, flight["cursor_end"], flight.get("carry"), flight.get("last_upload"),
                   flight.get("source_rows", flight["rows"]), flight.get("cursor_row"))

    @locked
    def advance(self, key, batch):
        """A batch that left nothing to write (all filtered, windows still open)."""
        self._move(self._record(key), encode_cursor(batch.cursor_end), batch.carry,
                   batch.last_timestamp, batch.source_count, batch.cursor_row)

    def _move(self, pos, cursor, carry, last_upload, passed, row):
        """Put the cursor (already encoded), the mark of the row there and the open
        windows after a batch of `passed` source rows; save."""
        pos.update(cursor=cursor, carry=carry, cursor_row=row, updated_at=utc_now_text())
        if pos.get("behind_base") is not None:  # rows at or before the cursor
            pos["behind_base"] += passed
        if last_upload is not None:
            pos["last_upload"] = last_upload
        self.save()

    @locked
    def save(self):
        """Write atomically: temp file, fsync, rename, fsync the directory."""
        if self._backup:
            self._move_aside()
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

    def _move_aside(self):
        """--reset-state: keep the previous state file as last_upload.json.reset-<time>."""
        backup = f"{self.path}.reset-{int(self.clock())}"
        n = 1
        while os.path.exists(backup):
            backup, n = f"{self.path}.reset-{int(self.clock())}-{n}", n + 1
        try:
            os.replace(self.path, backup)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"state: cannot move {self.path} aside: {exc.strerror}") from None
        else:
            log.warning("state: --reset-state: previous state kept as %s", backup)
        self._backup = False

    def close(self):
        """Release the lock."""
        if self._lock:
            self._lock.close()
            self._lock = None


def is_position_of(pos, path, file_id=None):
    """True when a position (or a forgotten one) is of file `path` (and of `file_id`:
    the (device, inode) it recorded)."""
    return ((pos.get("source") or {}).get("path") == path
            and (file_id is None or pos.get("file_id") == list(file_id)))


def new_state(source_desc):
    """An empty state for this source (None: for many sources), with a fresh state id."""
    return {"version": STATE_VERSION if source_desc else MANY_STATE_VERSION, "tool": TOOL,
            "state_id": uuid.uuid4().hex[:12], "created_at": utc_now_text(),
            "source": source_desc or {"many": True}, "destinations": {}}


def source_scope(path, table):
    """What a position's key adds among many sources: its file and source table."""
    return f" <- {os.path.realpath(path)}:{table}"


def to_many_state(data, path):
    """A state of one source (version 1 or 2) as a state of many (version 3)."""
    if data["version"] == MANY_STATE_VERSION:
        return data
    source, moved = data["source"], {}
    scope = source_scope(source["path"], source["table"])
    for key, pos in data["destinations"].items():
        base, hash_, stream = key.partition("#")
        moved[base + scope + hash_ + stream] = {**pos, "source": source, "tag": ""}
    log.info("state: %s was written for one source (%s, table %s); it now keeps a "
             "position per source, the old ones unchanged", path, source["path"],
             source["table"])
    return {**data, "version": MANY_STATE_VERSION, "source": {"many": True},
            "destinations": moved}


def is_many_state(path):
    """True when the state file at `path` is one of many sources."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("version") == MANY_STATE_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def check_state_shape(data):
    """Raise ValueError unless `data` looks like our state file."""
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        raise ValueError("not a state file of this tool")
    if data.get("version") not in (1, STATE_VERSION, MANY_STATE_VERSION):
        raise ValueError(f"unsupported state version {data.get('version')!r}")
    if not isinstance(data.get("destinations"), dict) or not data.get("state_id"):
        raise ValueError("state file is incomplete")
    if not isinstance(data.get("source"), dict):
        raise ValueError("state file has no source")
    for dest, pos in data["destinations"].items():
        if not (isinstance(pos, dict) and isinstance(pos.get("cursor"), (list, type(None)))
                and isinstance(pos.get("inflight"), (dict, type(None)))
                and isinstance(pos.get("seq", 0), int)):
            raise ValueError(f"destination {dest!r} is malformed")


def migrate_state(data, path, quiet=False):
    """Version 1 kept one position per destination: key each by the table it wrote."""
    if data["version"] in (STATE_VERSION, MANY_STATE_VERSION):
        return data
    moved = {}
    for dest, pos in data["destinations"].items():
        table = pos.get("table") or (pos.get("inflight") or {}).get("table")
        moved[position_key(dest, table) if table else dest] = pos
    if not quiet:
        log.info("state: %s is of version 1; its positions now belong to their target "
                 "tables (%s)", path, ", ".join(sorted(moved)) or "none")
    return {**data, "version": STATE_VERSION, "destinations": moved}


def check_state_source(data, source_desc, path):
    """The state must belong to this source file, table and cursor."""
    old = data.get("source", {})
    for key in ("path", "table", "cursor"):
        if old.get(key) != source_desc[key] and key == "cursor":
            raise StateError(cursor_changed(path, old.get(key), source_desc[key]))
        if old.get(key) != source_desc[key]:
            raise StateError(
                f"state: {path} belongs to {key} {old.get(key)!r}, not "
                f"{source_desc[key]!r}; use one STATE_DIR per source, or --reset-state "
                "to upload this source from the start")


def cursor_changed(path, was, now):
    """The error for a state file written with another cursor of the same table."""
    def shown(cursor):
        return f"{cursor['kind']} ({', '.join(cursor['columns'])})" if cursor else "none"
    keep = "timestamp" if (was or {}).get("kind") == "pair" else "rowid"
    return (f"state: {path} was written with the cursor {shown(was)}, but this run chose "
            f"{shown(now)}; to keep the old cursor set --cursor {keep} (CURSOR), or "
            "--reset-state to upload the source from the start")


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
    plan: Plan = Plan()
    kinds: dict = dataclasses.field(default_factory=dict)
    behind_due: float = 0.0  # monotonic time of the next count of rows behind the cursor
    pending: int | None = None  # rows after the cursor at the end of the last cycle
    stream: str = ""  # "" for the cursor's batches; "backfill" for --backfill's
    tag: str = ""  # among many sources, what sets this position's batch ids apart
    scope: str = ""  # among many sources, the file and table in the position's key
    recorded: dict = dataclasses.field(default_factory=dict)  # kept with a new position
    file_id: tuple = None  # file_identity() of the file the connection reads
    unconfirmed: tuple = None  # another file under the name, said to be checked again

    @property
    def key(self):
        """The checkpoint position of this job's target table (file and table among
        many sources, and stream)."""
        key = position_key(self.sink.destination, self.table) + self.scope
        return f"{key}#{self.stream}" if self.stream else key

    @property
    def where(self):
        """The target table for logs; among many sources, with the file and table."""
        if not self.scope:
            return self.table
        return f"{self.table} (from {os.path.basename(self.config.sqlite)}:{self.source.name})"

    @property
    def batch_prefix(self):
        """Batch ids are <prefix>-<seq>: the state id, the position's tag among many
        sources, and the stream if not the cursor's."""
        return "-".join(filter(None, (self.checkpoint.data["state_id"], self.tag,
                                      self.stream)))


def prefetch(iterable, stop):
    """Yield items of `iterable` while a thread produces the next one.

    The producer hands each item over and waits until it is taken before making the
    next, so at most two items exist at a time: memory does not grow with the backlog.
    """
    slot, done = queue.Queue(maxsize=1), object()
    halt, taken = threading.Event(), threading.Semaphore(0)

    def put(item):
        slot.put(item)
        while not halt.is_set():
            if taken.acquire(timeout=0.1):
                return True
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
            taken.release()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        halt.set()
        worker.join()


def settle_inflight(job):
    """After a crash, ask the target whether the in-flight batch landed.

    A batch that did not land keeps its in-flight record: the cycle sends it again
    with exactly the rows recorded (up to its cursor_end) under the same batch id, so
    a copy of the old statement that a warehouse runs late leaves the same rows."""
    flight = job.checkpoint.position(job.key)["inflight"]
    if not flight:
        return
    mark = {"mark": flight["mark"]} if flight.get("mark") else {}  # (sinks that seal)
    if job.sink.has_committed(flight["table"], flight["seq"], flight["batch_id"],
                              flight.get("source_id"), **mark):
        job.checkpoint.commit(job.key)
        log.info("state: in-flight batch %s is in %s; cursor advanced",
                 flight["batch_id"], flight["table"])
    else:
        log.info("state: in-flight batch %s did not reach %s; it is sent again "
                 "with the same rows", flight["batch_id"], flight["table"])


def prepare_batches(job, chunks, position):
    """Process, number, type and encode the rows read (in the read-ahead thread).

    The chunks of one read statement are processed and encoded one by one (so the
    Python values of only one chunk live at a time) and handed on together as one
    batch: one checkpoint, one in-flight record, however many requests the sink makes
    of it. Nothing is handed on until the read statement has finished, so no read
    transaction is held while a write waits.
    """
    prefix = job.batch_prefix
    seq, carry = position["seq"], position.get("carry")
    encoded = []
    for chunk in chunks:
        batch_id = f"{prefix}-{seq + 1}"
        encoded.append(encode_chunk(job, chunk, carry, batch_id))
        carry = encoded[-1].carry
        chunk = None  # encoded: only one chunk's values live at a time
        if encoded[-1].chunk.final:
            batch, encoded = merge_chunks(encoded, seq + 1), []
            seq += 1 if batch.count else 0
            if batch.count:
                batch.mark = job.sink.seal(job.table, batch)
            yield batch


@dataclasses.dataclass
class Encoded:
    """A processed chunk as the sink encoded it (its values let go)."""

    chunk: Chunk
    payload: object
    rescued: int
    carry: object  # open aggregate windows after it


def encode_chunk(job, chunk, carry, batch_id):
    """Process one chunk and have the sink encode it for batch `batch_id`."""
    out, after = process_batch(job.plan, chunk, carry)
    payload, rescued = None, 0
    if out.count:
        out = dataclasses.replace(out, batch_id=batch_id, kinds=resolve_kinds(out, job.kinds))
        payload, rescued = job.sink.encode(job.table, out)
    return Encoded(dataclasses.replace(out, values=None, keys=[]), payload, rescued, after)


def merged_notes(chunks):
    """The processing notes of a batch's chunks, summed."""
    notes = {}
    for chunk in chunks:
        for key, value in chunk.notes.items():
            notes[key] = notes.get(key, 0) + value
    return notes


def merge_chunks(encoded, seq):
    """The encoded chunks of one read statement as batch `seq` (one write, one
    checkpoint); a batch of no rows (all filtered out, windows still open) has seq 0."""
    done = [e for e in encoded if e.chunk.count]
    chunks = [e.chunk for e in encoded]
    shape = done[-1].chunk if done else chunks[-1]
    return Batch(
        seq=seq if done else 0, batch_id=shape.batch_id if done else "",
        columns=shape.columns, kinds=shape.kinds, count=sum(e.chunk.count for e in done),
        payload=[e.payload for e in done], cursor_end=chunks[-1].cursor_end,
        last_timestamp=chunks[-1].last_timestamp, carry=encoded[-1].carry,
        source_count=sum(c.source_count for c in chunks),
        rescued=sum(e.rescued for e in encoded), notes=merged_notes(chunks),
        resend=chunks[-1].resend, cursor_row=chunks[-1].cursor_row)


def write_batch(job, batch):
    """In-flight record -> write to the sink -> advance the checkpoint."""
    if not batch.count:
        job.checkpoint.advance(job.key, batch)
        return Receipt(0)
    pos = job.checkpoint.position(job.key)
    if batch.seq != pos["seq"] + 1:
        raise AssertionError(f"batch {batch.seq} out of order")
    if batch.resend:
        check_resend(pos["inflight"], batch)
    job.checkpoint.begin(job.key, batch, job.table, job.config.source_id)
    receipt = job.sink.write(job.table, batch)
    job.checkpoint.commit(job.key)
    return receipt


def check_resend(flight, batch):
    """A batch sent again must be the rows it was: fewer means rows were deleted."""
    recorded = flight.get("source_rows")
    if recorded is None or batch.source_count == recorded:
        return
    if batch.source_count < recorded:
        raise SourceError(f"source: in-flight batch {flight['batch_id']} had {recorded} "
                          f"rows, only {batch.source_count} are still in the source: rows "
                          "were deleted or the file was replaced; check the target, then "
                          "use --reset-state")
    log.warning("source: in-flight batch %s had %d rows; %d rows were inserted into its "
                "range since and go with it", flight["batch_id"], recorded,
                batch.source_count - recorded)


def run_cycle(job):
    """Upload every row after the cursor, batch by batch; return rows uploaded."""
    with gc_paused():
        return upload_pending(job)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector: a cycle makes millions of row tuples, which
    form no cycles but would trigger collections over and over (about 10% of a run).
    The few cycles a batch does make (the JSON encoder's closures when the state is
    saved, deltalake's schema conversion) are collected after each batch, so a long
    backlog does not pile them up."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def upload_pending(job):
    """The cycle's work: settle, check the source, read, process, write, checkpoint."""
    settle_inflight(job)  # a failed write of the previous cycle may have landed
    pos = job.checkpoint.position(job.key)
    cursor = decode_cursor(pos["cursor"])
    pending = job.pending = reading_source(job.source, lambda: check_source(job, pos, cursor))
    started, done, read, notes = time.monotonic(), 0, 0, {}
    if pending is None:  # another file under the name, not told yet: none of it is read
        job.pending = 0  # (rows written meanwhile are checked with it the next cycle)
        log_cycle(job, 0, 0, time.monotonic() - started, notes)
        return 0
    if not job.kinds:
        job.kinds.update(job.sink.known_kinds(job.table))
    newer = lag_filter(job.source, job.config.cursor_lag)
    flight = pos["inflight"]  # settled as not landed: its rows go again, exactly
    batches = read_batches(job.conn, job.source, cursor, job.config.batch_size, newer=newer,
                           until=decode_cursor(flight["cursor_end"]) if flight else None,
                           refresh=lambda source: refresh_job_source(job, source),
                           key=job.checkpoint.data["state_id"])
    mark, progress = started, current_progress()
    for batch in prefetch(prepare_batches(job, batches, dict(pos)), job.stop):
        batch.pending = max(pending - read - batch.source_count, 0)  # for --fleet-status
        receipt = write_batch(job, batch)
        gc.collect(0)  # the batch's few reference cycles (see gc_paused)
        done, read = done + batch.count, read + batch.source_count
        job.pending = max(pending - read, 0)
        for key, value in batch.notes.items():
            notes[key] = notes.get(key, 0) + value
        took, mark = max(time.monotonic() - mark, 1e-9), time.monotonic()
        log_batch(job, batch, receipt, took, max(pending - read, 0))
        if pending > 2 * job.config.batch_size:
            progress.show(read, pending, read / max(time.monotonic() - started, 1e-9))
    progress.clear()
    if newer is not None and not job.stop.is_set() and pending > read:
        notes["rows_held_back_by_cursor_lag"] = pending - read
    log_cycle(job, read, done, time.monotonic() - started, notes)
    return done


def refresh_job_source(job, source):
    """The source table as it is now, kept in the job for the cycles that follow."""
    job.source = refresh_columns(job.conn, source)
    return job.source


def check_source(job, pos, cursor):
    """Start-of-cycle checks and reports; return the rows pending after the cursor, or
    None when the file is another one not told to hold the rows uploaded yet (then
    nothing is read from it this cycle: a row its producer writes meanwhile could be
    one going on would skip)."""
    follow_replaced(job)
    conn, source = job.conn, job.source
    check_not_behind(conn, source, cursor)
    if not check_same_rows(job, pos, cursor):
        return None
    nulls = report_null_timestamps(conn, source)
    pending = count_pending(conn, source, cursor)
    if cursor is not None and time.monotonic() >= job.behind_due:
        started = time.monotonic()
        report_behind(job, pos, count_passed(conn, source, pending, nulls))
        # SQLite counts a table by walking a b-tree: on a big table keep it to about
        # 1% of the time, so an idle cycle stays cheap
        job.behind_due = started + 100 * (time.monotonic() - started)
    return pending


def follow_replaced(job):
    """One source: a file replaced while the uploader runs (another inode under its name)
    is opened again, so that its rows are read (and checked) rather than those of the
    file held open, which no one writes any more. Among many sources, Sources.connect
    does this for all the tables of a file."""
    path = job.config.sqlite
    now = file_identity(path)
    if job.scope or now is None or job.file_id is None or now == job.file_id:
        return
    log.warning("source: %s is another file than before (replaced in place): it is opened "
                "again, and goes on from the cursor only where its rows up to it are those "
                "uploaded", path)
    conn = open_source(path, job.config.busy_timeout, job.config.origin("sqlite"))
    job.conn.close()
    job.conn, job.file_id = conn, now
    job.source = refresh_columns(conn, job.source)


def check_same_rows(job, pos, cursor):
    """A file that is not the one the position was read from (replaced in place: a
    restored backup, a copy, the same file after a remount on another device, a new
    database under the old name) goes on from the cursor only if that skips none of its
    rows: its row at the cursor is the row uploaded (compare_mark), or it has rows and
    all follow the cursor. It is then recorded, with the mark of its row at the cursor
    (positions written before files were recorded take the file read now, as they
    did). False when the file is not recorded: it is checked again the next cycle. A
    mark of an older version is made again of the file recorded (it holds the row)."""
    now, was = job.file_id, pos.get("file_id")
    mark = pos.get("cursor_row")
    if now is None or was == list(now):
        if cursor is not None and was is not None and "columns" in (mark or {}):
            mark = read_row_mark(job.conn, job.source, cursor, job.checkpoint.data["state_id"])
            if mark is not None:
                job.checkpoint.update(job.key, cursor_row=mark)
        return True
    if was is not None and cursor is not None:
        where = (f"{job.config.sqlite} is another file than the one uploaded from "
                 f"({file_change(was, now)}: replaced in place)")
        at = f"{job.source.cursor.describe()} = {cursor}"
        if mark is None:
            log.warning("source: %s; its row at the cursor %s was not recorded, so whether "
                        "it holds the rows uploaded cannot be told: it goes on from there",
                        where, at)
        elif not check_replaced(job, cursor, mark, where, at):
            return False
    if cursor is not None:  # (no row there: the mark of the file uploaded is kept)
        mark = read_row_mark(job.conn, job.source, cursor,
                             job.checkpoint.data["state_id"]) or mark
    job.checkpoint.update(job.key, file_id=list(now), cursor_row=mark)
    return True


def file_change(was, now):
    """What tells two file_identity() apart, in words."""
    return " and ".join(what for what, a, b in zip(("another device", "another inode"),
                                                   was, now) if a != b) or "the same"


def check_replaced(job, cursor, mark, where, at):
    """Another file under the source's name: say that it goes on (True), or that it is
    checked again the next cycle (False: an empty table, a new database's first rows
    would be at or before the cursor), or refuse it."""
    conn, source = job.conn, job.source
    same, what = compare_mark(conn, source, cursor, mark, job.checkpoint.data["state_id"])
    if same:
        log.log(logging.INFO if what == "the same values" else logging.WARNING,
                "source: %s; its row at the cursor %s is the row uploaded (%s), so it "
                "holds the rows uploaded: it goes on after them", where, at, what)
        return True
    if is_purged_up_to(conn, source, cursor):
        log.info("source: %s; it has no row up to the cursor %s, only rows after it, "
                 "so going on skips none of them: it goes on", where, at)
        return True
    if not has_rows_up_to(conn, source, cursor):
        if job.unconfirmed != job.file_id:
            job.unconfirmed = job.file_id
            log.warning("source: %s; its table %r is empty, so whether its rows will be "
                        "those uploaded (a copy being put in place) or a new database's, "
                        "whose rows up to the cursor %s going on would skip, cannot be told "
                        "yet: it is checked again each cycle, and nothing is read from it "
                        "until then (0 rows uploaded)", where, source.name, at)
        return False
    fix = ("move it to a new name, where it is uploaded from its first row as a new file"
           if job.scope else "use --reset-state --start-at now to take it from its current "
           "end (its rows so far are not uploaded)")
    raise SourceReplacedError(
        f"source: {where}, and its row at the cursor {at} is not the row uploaded "
        f"({what}): its rows up to the cursor are not those uploaded and going on would "
        f"skip them; put back the file uploaded from, or {fix}")


def report_behind(job, pos, behind):
    """Rows that appeared behind the cursor (an import of older records, a late commit,
    mixed timestamp formats): counted from the table's size, kept in the checkpoint until
    --backfill uploads them, and reported every cycle. `behind` is the number of rows at
    or before the cursor now; behind_base, the number there were (deleted rows lower it:
    then only the base moves)."""
    base = pos.get("behind_base")
    found = behind - base if base is not None else 0
    tally = pos.get("behind", 0) + max(found, 0)
    if base != behind or tally != pos.get("behind", 0):
        job.checkpoint.update(job.key, behind_base=behind, behind=tally)
    if tally:
        log.warning("source: %d rows are behind the cursor %s and not uploaded to %s "
                    "(%d new since the last cycle): rows inserted with an older key than "
                    "the cursor (an import of older records, a late commit, mixed "
                    "timestamp formats); --backfill uploads those %s does not hold",
                    tally, job.source.cursor.describe(), job.table, max(found, 0),
                    job.table)


def log_batch(job, batch, receipt, took, pending):
    """One line per batch: rows, target table, rows/s, rows still pending."""
    log.log(logging.INFO if batch.count else logging.DEBUG,
            "batch %s: %d rows -> %s in %.2f s (%d rows/s)%s%s, pending %d",
            batch.batch_id or "(none)", batch.count, job.where, took,
            batch.source_count / took, ", already there" if receipt.skipped else "",
            f", {batch.rescued} rows with rescued values" if batch.rescued else "", pending)


def log_cycle(job, read, done, elapsed, notes):
    """One line per cycle, and a warning for rows an aggregate could not place."""
    log.info("cycle: %d rows read, %d rows uploaded to %s in %.2f s%s%s", read, done,
             job.where, elapsed, "".join(f", {v} {k.replace('_', ' ')}"
                                         for k, v in sorted(notes.items())),
             " (stopping)" if job.stop.is_set() else "")
    if notes.get("late") or notes.get("untimed"):
        log.warning("aggregate: %d rows arrived after their window closed and %d rows "
                    "have no usable timestamp; they are not in %s (raise 'grace' to wait "
                    "longer for late rows)", notes.get("late", 0), notes.get("untimed", 0),
                    job.table)


def report_null_timestamps(conn, source):
    """Warn about rows the pair cursor cannot order because their timestamp is NULL."""
    count, low, high = count_null_timestamps(conn, source)
    if count:
        log.warning("source: %d rows have a NULL %r (rowid %s..%s) and are not uploaded",
                    count, source.timestamp_col, low, high)
    return count


def run_forever(job, rng=random):
    """Cycle every interval until stopped; with --once, one cycle and its exit code."""
    failures = 0
    if job.config.jitter and not job.config.once:  # a fleet started at once spreads out
        job.stop.wait(rng.uniform(0, job.config.interval))
    while not job.stop.is_set():
        try:
            run_cycle(job)
            job.sink.report_status(node_status(job))
            job.sink.upkeep(job.table)
            record_error(job, None)
            failures = 0
        except (SinkError, SourceError, StateError) as exc:
            job.sink.report_status(node_status(job, exc))
            record_error(job, exc)
            if job.config.once:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_FAILED
            failures += 1
            delay = min(job.config.interval, 5 * 2 ** min(failures, 10))
            delay *= rng.uniform(0.8, 1.2)
            log.error("%s; retrying in %.0f s", exc, delay)
            job.stop.wait(delay)
            continue
        if job.config.once:
            break
        job.stop.wait(job.config.interval)
    return EXIT_OK


def node_status(job, error=None):
    """What the node reports about its target table after a cycle (--fleet-status)."""
    pos = job.checkpoint.position(job.key)
    seq, landed = pos.get("seq", 0), parse_timestamp(pos.get("updated_at"))
    newest = parse_timestamp(pos.get("last_upload"))
    lag = (landed - newest) / 1e6 if landed is not None and newest is not None else None
    return {"source_id": job.config.source_id, "table": job.table,
            "cursor": pos.get("cursor"), "pending": job.pending,
            "behind": pos.get("behind", 0), "last_batch": f"{job.batch_prefix}-{seq}" if seq
            else None, "last_upload": pos.get("updated_at"), "rows": pos.get("rows", 0),
            "version": __version__, "last_error": str(error) if error else None,
            "lag_seconds": max(lag, 0.0) if lag is not None else None,
            "interval": job.config.interval}


def recover_state(job):
    """--recover-state: rebuild this target table's cursor from what the target holds."""
    if job.checkpoint.position(job.key)["cursor"] is not None or \
            job.checkpoint.position(job.key)["inflight"]:
        raise StateError(f"state: {job.checkpoint.path} already has a cursor for "
                         f"{job.table}; --recover-state is for a lost state file")
    found = job.sink.recover_position(job.table, job.source)
    if found is None:
        log.warning("state: %s holds nothing from node %s; starting from the beginning",
                    job.table, job.config.source_id)
        job.checkpoint.update(job.key)
        return
    if found.get("cursor_row") and not holds_marked_row(job.conn, job.source, found):
        if not holds_purged(job.conn, job.source, found):
            raise StateError(
                f"state: the last batch of node {job.config.source_id} in {job.table} ends "
                f"at {job.source.cursor.describe()} = {decode_cursor(found['cursor'])}, and "
                f"the row of {job.config.sqlite} there is not the row uploaded: it is not "
                "the file those rows came from (another file under its name?), so going on "
                "after them would skip its rows; put back the file uploaded from, or "
                "--start-at now uploads only rows added from now on")
        log.info("state: the last batch of node %s in %s ends at %s = %s, and %s has no "
                 "row up to it, only rows after it (the rows up to it were deleted: a "
                 "purge), so going on after it skips none of them", job.config.source_id,
                 job.table, job.source.cursor.describe(), decode_cursor(found["cursor"]),
                 job.config.sqlite)
    rows = found["rows"] if "rows" in found else job.sink.count_rows(
        job.table, job.config.source_id)
    job.checkpoint.update(job.key, cursor=found["cursor"], carry=found.get("carry"),
                          rows=rows, updated_at=utc_now_text())
    log.info("state: recovered the cursor %s = %s from %s (node %s)",
             job.source.cursor.describe(), found["cursor"], job.table, job.config.source_id)


def backfill(job):
    """--backfill: upload the rows at or before the cursor that the target table does not
    hold (rows imported or committed behind the cursor), exactly once, as batches of
    their own stream; the cursor stays where it is."""
    names = backfill_key(job)
    stamps = [n == job.source.timestamp_col for n in names]  # TIMESTAMP in the target
    run = backfill_job(job)
    settle_inflight(run)
    if run.checkpoint.position(run.key)["inflight"]:  # it did not land: rows go again
        run.checkpoint.update(run.key, inflight=None)
    held = {key_value(key, stamps)
            for key in job.sink.read_keys(job.table, job.config.source_id, names)}
    fmt = job.source.timestamp_format
    pos = job.checkpoint.position(job.key)
    cursor = decode_cursor(pos["cursor"])
    sent = read = 0
    if cursor is not None:
        chunks = read_missing(job.conn, job.source, cursor, names, job.config.batch_size,
                              lambda key: key_value(key, stamps, fmt) not in held,
                              key=job.checkpoint.data["state_id"])
        bpos = run.checkpoint.position(run.key)
        mark = time.monotonic()
        for batch in prefetch(prepare_batches(run, chunks, bpos), job.stop):
            receipt = write_batch(run, batch)
            sent, read = sent + batch.count, read + batch.source_count
            took, mark = max(time.monotonic() - mark, 1e-9), time.monotonic()
            log_batch(run, batch, receipt, took, 0)
    if job.stop.is_set():
        return EXIT_OK
    passed = reading_source(job.source, lambda: count_passed(
        job.conn, job.source, count_pending(job.conn, job.source, cursor)))
    job.checkpoint.update(job.key, behind=0, behind_base=passed)
    log.info("backfill: %d rows behind the cursor were missing from %s and are uploaded "
             "(%d rows sent); %d of this node's rows were already there", read, job.table,
             sent, len(held))
    return EXIT_OK


def backfill_key(job):
    """The columns that tell the target's rows apart: the table's key, as uploaded."""
    source, plan = job.source, job.plan
    if plan.aggregate:
        raise ConfigError(f"config: --backfill cannot add rows to {job.table}: aggregated "
                          "windows are closed once emitted")
    names = key_columns(source)
    if source.cursor.kind == "pair":
        names = names[1:]  # the key after the timestamp identifies a row
    altered = {r.column for r in plan.sanitize if r.op != "round"}
    if not names or set(names) & altered:
        raise ConfigError(
            f"config: --backfill needs a key that {job.table} holds as uploaded; table "
            f"{source.name!r} has none ({source.cursor.kind} cursor "
            f"{source.cursor.describe()}): give it an INTEGER PRIMARY KEY, or upload the "
            "rows behind the cursor with --reset-state into a new table")
    return names


def key_value(key, stamps, fmt=None):
    """A row key comparable between the source and the target: a timestamp column as
    microseconds (the target holds it as a TIMESTAMP; the source as it was written, in
    the format `fmt` that the source was read with; fmt None: a value of the target)."""
    out = []
    for value, stamp in zip(key, stamps):
        if stamp and fmt is None and isinstance(value, dt.datetime):
            value = moment_to_micros(value)
        elif stamp and fmt is not None:
            value = parse_timestamp(value if fmt.native else normalize_times([value], fmt)[0])
        out.append(value)
    return tuple(out)


def backfill_job(job):
    """The job of the backfill stream: its own position, batch ids and Delta app id."""
    identity = job.sink.identity
    sink = make_sink(job.config, dataclasses.replace(
        identity, state_id=f"{identity.state_id}-backfill"))
    return dataclasses.replace(job, sink=sink, stream="backfill", kinds=job.kinds)


def start_route(job):
    """A target table this state has no position for: make sure the table holds none
    of this node's rows (else they would be sent twice), then start at the beginning
    of the source, or at its current end with START_AT=now."""
    checkpoint, key = job.checkpoint, job.key
    if checkpoint.has_position(key):
        return
    if checkpoint.has_position(job.sink.destination):  # version 1, table never recorded
        checkpoint.rename(job.sink.destination, key)
        return
    now = job.config.start_at == "now"
    held = 0 if now else unexplained_rows(job)
    if held and job.scope:
        raise StateError(
            f"state: {job.table} already holds {held:,} rows from node "
            f"{job.config.source_id} read from a file named {job.sink.identity.source_file} "
            f"that no position of {checkpoint.path} sent (a lost or reset state file, a "
            "file forgotten after FORGET_AFTER that came back, or renamed while no "
            "uploader ran?), so uploading it from the beginning would send them twice; "
            "start_at: now for this source (or --start-at now) uploads only rows added from "
            "now on, or remove them from the table first")
    if held:
        raise StateError(
            f"state: {job.table} already holds {held:,} rows from node "
            f"{job.config.source_id} that {checkpoint.path} has no record of (a lost or "
            "reset state file?), so uploading from the beginning would send them twice; "
            "--recover-state continues after them, --start-at now uploads only rows added "
            "from now on, or remove them from the table first")
    cursor = reading_source(job.source, lambda: read_end_cursor(job.conn, job.source)) \
        if now else None
    checkpoint.update(job.key, cursor=encode_cursor(cursor), updated_at=utc_now_text(),
                      behind_base=None if now else 0, **job.recorded)
    if now:
        log.info("state: %s is new to this state: starting at the current end of "
                 "the source, %s = %s (START_AT=now); rows before it are not uploaded "
                 "to it", job.where, job.source.cursor.describe(), cursor)
    else:
        log.info("state: %s is new to this state: uploading the source from the "
                 "beginning", job.where)


def unexplained_rows(job):
    """Rows of this node in the job's target table that the state cannot account for:
    with one source, all of them (the table is new to the state); among many, those
    read from a file of the job's file name that this state did not send (their batch
    ids are of another state id, and of no batch a position took up with
    --recover-state: a lost or reset state). Rows a forgotten position of
    this state sent count as sent: a new file under a rotated name is not held back by
    the rows of the files that had the name before; a forgotten file that comes back
    (or a copy of it) is known by the row at its cursor (Sources.follow_moves)."""
    if not job.scope:
        return job.sink.count_rows(job.table, job.config.source_id)
    state_id, table = job.checkpoint.data["state_id"], position_key(
        job.sink.destination, job.table) + " <- "
    sent = sent_prefixes(job.checkpoint, state_id, table)
    for pos in job.checkpoint.data.get("forgotten", ()):
        if pos["key"].startswith(table):
            sent.update(pos.get("recovered") or ())
    return sum(job.sink.count_file_rows(job.table, job.config.source_id,
                                        job.sink.identity.source_file,
                                        StateBatches(state_id, sent)).values())


class StateBatches(frozenset):
    """The batch id prefixes of one state, as count_file_rows's `sent`: `prefixes`
    (those of its positions and of the batches they took up), and the state id with any
    tag (a position's, kept or forgotten: the tags of positions forgotten long ago are
    not kept)."""

    def __new__(cls, state_id, prefixes=()):
        batches = super().__new__(cls, {state_id, *prefixes})
        batches.state_id = state_id
        return batches

    def __contains__(self, prefix):
        return (super().__contains__(prefix)
                or str(prefix).startswith(self.state_id + "-"))


def sent_prefixes(checkpoint, state_id, table):
    """The batch prefixes of the positions whose keys begin with `table`: their own, and
    those of the batches --recover-state took them up after (`recovered`)."""
    sent = set()
    for key, pos in checkpoint.data["destinations"].items():
        if key.startswith(table):
            sent.add("-".join(filter(None, (state_id, pos.get("tag")))))
            sent.update(pos.get("recovered") or ())
    return sent


class Recovery:
    """--recover-state among many sources: the newest batch of this node from each file
    name and source table in each target table (read once), and the batches a file of
    this run took up (each goes on in one file at most)."""

    def __init__(self):
        self.found, self.taken, self.tried = {}, set(), set()

    def batches(self, job):
        """{file name: newest batch} of the job's target table and source table."""
        where = (job.table, job.source.name)
        if where not in self.found:
            self.found[where] = job.sink.recover_files(job.table, job.source)
        return self.found[where]


def recover_file(job, recovery):
    """--recover-state among many sources, for a file new to the state: go on after the
    newest batch the target holds from the file's name, when the file holds the row at
    that batch's cursor end (the row uploaded); a file renamed since (log rotation) goes
    on after the newest batch of its old name when the file now under that name is not
    the one its rows came from. True when a batch was taken up; else the file is left
    to start_route, as any file new to the state."""
    name, batches = job.sink.identity.source_file, recovery.batches(job)
    known = sent_prefixes(job.checkpoint, job.checkpoint.data["state_id"],
                          position_key(job.sink.destination, job.table) + " <- ")
    for other in [name] * (name in batches) + sorted(set(batches) - {name}):
        found = batches[other]
        prefix = batch_prefix(found["batch_id"] or "")
        if found["batch_id"] in recovery.taken or prefix in known:
            continue
        if not holds_marked_row(job.conn, job.source, found) and not (
                other == name and found.get("cursor_row")
                and purged_here(job, found, batches)):
            if other == name:
                log.warning("state: %s table %s: the newest batch from a file named %s in "
                            "%s %s, so it is taken as a file new to the state",
                            job.config.sqlite, job.source.name, name, job.table,
                            "records no row at its cursor (an older version wrote it): "
                            "whether this file is the one its rows came from cannot be "
                            "told" if found.get("cursor_row") is None else
                            "ends at a row this file does not hold: it is not the file "
                            "those rows came from (log rotation reused the name?)")
            continue
        if other != name and other_holds(job, other, found):
            continue  # the file named so is the one those rows came from
        recovery.taken.add(found["batch_id"])
        recovery.tried.add(job.key)
        take_batch(job, found, prefix, other)
        log.info("state: recovered %s table %s: the cursor %s = %s after batch %s%s",
                 job.config.sqlite, job.source.name, job.source.cursor.describe(),
                 decode_cursor(found["cursor"]), found["batch_id"],
                 f" (read from it when it was named {other})" if other != name else "")
        return True
    recovery.tried.add(job.key)
    return False


def holds_marked_row(conn, source, found):
    """True when the file of `conn` holds the row marked at the batch's cursor end (the
    mark is keyed with the state id that begins the batch id)."""
    mark, cursor = found.get("cursor_row"), decode_cursor(found["cursor"])
    if mark is None or cursor is None:
        return False
    try:
        return is_marked_row(conn, source, cursor, mark,
                             (found.get("batch_id") or "").split("-")[0])
    except sqlite3.Error:  # another table under that name
        return False


def holds_purged(conn, source, found):
    """True when the file of `conn` has no row up to the batch's cursor end, only rows
    after it (a purge deleted the row marked there): going on after it skips nothing."""
    cursor = decode_cursor(found["cursor"])
    try:
        return cursor is not None and is_purged_up_to(conn, source, cursor)
    except sqlite3.Error:  # another table under that name
        return False


def purged_here(job, found, batches):
    """True when the job's file has no row up to the batch's cursor end, only rows after
    it (a purge deleted the row marked there), and no other file in its folder holds
    that row (log rotation moved it; a file that holds the newest batch of its own name,
    `batches`, is that name's): going on after the batch skips none of its rows."""
    if not holds_purged(job.conn, job.source, found):
        return False
    folder, own = os.path.split(job.config.sqlite)
    for other in sorted(os.listdir(folder or ".")):
        path = os.path.join(folder, other)
        if other == own or other.endswith(SIDE_FILES) or not os.path.isfile(path):
            continue
        try:
            if other_holds(job, other, found) and not (
                    other in batches and other_holds(job, other, batches[other])):
                return False
        except (SourceError, sqlite3.Error):  # not a database
            continue
    log.info("state: %s table %s: the newest batch from its name in %s ends at %s = %s, "
             "and it has no row up to it, only rows after it (the rows up to it were "
             "deleted: a purge), so going on after it skips none of them",
             job.config.sqlite, job.source.name, job.table, job.source.cursor.describe(),
             decode_cursor(found["cursor"]))
    return True


def other_holds(job, name, found):
    """True when file `name` in the job's file's folder holds the row marked at the
    batch's cursor end (it is the file the batch was read from)."""
    path = os.path.join(os.path.dirname(job.config.sqlite), name)
    if not os.path.exists(path):
        return False
    conn = open_source(path, job.config.busy_timeout, "--recover-state")
    try:
        return holds_marked_row(conn, job.source, found)
    finally:
        conn.close()


def take_batch(job, found, prefix, name):
    """Give the job's new position the cursor and open windows after batch `found`,
    read from a file named `name` (the rows it sent count as the position's); the row
    at the cursor is marked with this state's id."""
    rows = sum(n for batch_id, n in job.sink.count_file_rows(
        job.table, job.config.source_id, name).items() if batch_prefix(batch_id) == prefix)
    job.checkpoint.update(job.key, cursor=found["cursor"], carry=found.get("carry"),
                          cursor_row=reading_source(job.source, lambda: read_row_mark(
                              job.conn, job.source, decode_cursor(found["cursor"]),
                              job.checkpoint.data["state_id"])),
                          file_id=list(job.file_id),
                          rows=rows, recovered=[prefix], updated_at=utc_now_text(),
                          **job.recorded)


def open_job(config, reset_state, stop, environ=None, recover=False):
    """Open source, checkpoint and sink; find or start the target table's position."""
    conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
    checkpoint = job = None
    try:
        source = describe_source(conn, config)
        plan = compile_plan(config, source, os.environ if environ is None else environ)
        checkpoint = Checkpoint(resolve_state_dir(config))  # nothing written before here
        checkpoint.lock()
        if not reset_state:
            source = recorded_cursor(conn, config, source, checkpoint.read_old())
        checkpoint.load(source_description(config.sqlite, source), reset=reset_state)
        job = attach_job(config, conn, source, plan, checkpoint, stop)
        announce_job(job)
        if recover:
            recover_state(job)
        start_route(job)
    except BaseException:
        if job is not None:
            job.sink.close()
        if checkpoint is not None:
            checkpoint.close()
        conn.close()
        raise
    return job


def attach_job(config, conn, source, plan, checkpoint, stop, tag="", scope=""):
    """The Job of one source table, its sink writing as this node under the state id
    (and, among many sources, the position's tag: its own Delta app id)."""
    state_id = "-".join(filter(None, (checkpoint.data["state_id"], tag)))
    identity = Identity(config.source_id, source.name, state_id,
                        os.path.basename(config.sqlite), scope)
    job = Job(config, conn, source, checkpoint, make_sink(config, identity),
              target_table(config, source), stop, plan, tag=tag, scope=scope,
              file_id=file_identity(config.sqlite))  # (just opened: the file read)
    if job.sink.sleep is REAL_SLEEP:  # (a test may have given the sink its own)
        job.sink.sleep = stop.wait  # SIGTERM ends a wait for a starting warehouse
    return job


def recorded_cursor(conn, config, source, state):
    """With cursor: auto, the cursor the state was written with, while it still fits:
    the sample that chose it may differ today (a NULL among the last rows), and
    switching would refuse the state."""
    was = ((state or {}).get("source") or {}).get("cursor")
    if (not was or config.cursor != "auto" or config.timestamp_col
            or state["source"].get("table") != source.name
            or was == source_description(config.sqlite, source)["cursor"]):
        return source
    mode, ts = ("timestamp", was["columns"][0]) if was["kind"] == "pair" else ("rowid", None)
    try:
        kept = describe_table(conn, source.name, ts, config.sqlite, mode,
                              config.timestamp_format)
    except (ConfigError, SourceError):
        return source  # it no longer fits: the state check says so
    if source_description(config.sqlite, kept)["cursor"] != was:
        return source
    log.info("cursor: keeping %s %s, recorded in the state, over today's choice %s %s",
             kept.cursor.kind, kept.cursor.describe(), source.cursor.kind,
             source.cursor.describe())
    return kept


def announce_job(job):
    """The preflight findings and where rows go, one line each."""
    config, source = job.config, job.source
    for line in preflight(job.conn, source):
        log.info(line)
    if config.cursor_lag and not lag_applies(source):
        log.warning("source: cursor_lag has no effect: the cursor %s is not led by a "
                    "timestamp (a rowid cursor never passes a row committed late)",
                    source.cursor.describe())
    log.info("target: %s table %s (node %s)", job.sink.describe(), job.where,
             config.source_id)
    job.sink.announce()


def close_job(job):
    """Close what open_job opened."""
    job.sink.close()
    job.checkpoint.close()
    job.conn.close()


def open_source_job(config, conn, source, checkpoint, stop, environ, recovery=None,
                    first=False):
    """The Job of one (file, source table) among many sources: a position keyed by its
    target table, file and table, with its own tag, so batch ids and Delta app ids of
    two files never meet; a position kept from before keeps its cursor kind. With
    --recover-state (`recovery`), a new position goes on after the batch of the target
    the file's rows were last sent in, if there is one; in the `first` pass only such
    a job is opened (None otherwise), so that a file reusing its name is checked after."""
    plan = compile_plan(config, source, environ)
    scope = source_scope(config.sqlite, source.name)
    key = position_key(destination_of(config), target_table(config, source)) + scope
    tag = new_tag(checkpoint)
    if checkpoint.has_position(key):
        pos = checkpoint.position(key)
        recorded = pos.get("source")
        if recorded:
            source = recorded_cursor(conn, config, source, {"source": recorded})
            now = source_description(config.sqlite, source)["cursor"]
            if recorded["cursor"] != now:
                raise StateError(cursor_changed(f"{checkpoint.path} ({key})",
                                                recorded["cursor"], now))
        tag = pos.get("tag", "")
    job = attach_job(config, conn, source, plan, checkpoint, stop, tag, scope)
    job.recorded = {"source": source_description(config.sqlite, source), "tag": tag}
    if (recovery is not None and job.key not in recovery.tried
            and not checkpoint.has_position(job.key) and not recover_file(job, recovery)
            and first):
        job.sink.close()
        return None
    announce_job(job)
    start_route(job)
    return job


def destination_of(config):
    """The destination system of the configured target (as position keys name it)."""
    return make_sink(config, Identity(config.source_id, "", "")).destination


def new_tag(checkpoint):
    """A short id no position of the state has: it sets a new position's batch ids and
    Delta app id apart (random, not from the file's name: a file renamed by rotation
    keeps its tag, and the new file under the old name must not get the same)."""
    taken = {pos.get("tag") for pos in checkpoint.data["destinations"].values()}
    while True:
        tag = uuid.uuid4().hex[:8]
        if tag not in taken:
            return tag


def file_identity(path):
    """(device, inode) of a file, None when it is gone: a new one means it was replaced."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def note_first_row(job):
    """Record in the job's position, once it has sent rows, the mark of the file's first
    row: a file that takes the inode of a deleted file, and has not its row at the
    cursor, is another file when it does not begin with that row either."""
    pos = job.checkpoint.position(job.key)
    if pos.get("first_row") or pos["cursor"] is None:
        return
    conn, source = job.conn, job.source

    def read():  # (a locked file, or a table dropped since: the job's own failure)
        row = conn.execute(select_sql(source, False), [1]).fetchone()
        if row is None:
            return None
        first = [row[p] for p in key_positions(source)]
        return {"cursor": encode_cursor(first),
                "mark": read_row_mark(conn, source, first, job.checkpoint.data["state_id"])}
    first_row = reading_source(source, read)
    if first_row is not None:
        job.checkpoint.update(job.key, first_row=first_row)


WORKERS = 2  # files read at once (one is read while another's batch is written)


class Sources:
    """Many sources in one process: a Job per (file, source table), one state file and
    one lock. Each cycle looks for new files (globs) and tables (`tables: all`), runs
    every job, and forgets files gone for FORGET_AFTER; a job that fails is logged and
    runs again at the next cycle, without holding up the others."""

    def __init__(self, config, specs, checkpoint, stop, environ, clock=time.time):
        self.config, self.specs, self.checkpoint = config, specs, checkpoint
        self.stop, self.environ, self.clock = stop, environ, clock
        self.jobs = {}  # (file, source table) -> Job
        self.files = {}  # file -> [connection, (device, inode)]
        self.failed = {}  # (file, source table or "") -> what failed in this cycle
        self.refused = set()  # files of this cycle refused as replaced in place
        self.unconfirmed = set()  # files not read in this cycle (follow_moves)
        self.said = set()  # what is said once
        self.recovery = None  # --recover-state: a Recovery (kept: a file that failed
        # in a cycle is recovered at the next)

    def cycle(self):
        """Find files and tables, run every job once; return {where: error} of failures.
        Files are read by up to WORKERS workers at once, so that one file's rows are read
        while another's batch is written (as a single source reads ahead); the tables of
        one file go one after the other, on its connection."""
        self.failed, self.refused = {}, set()
        self.refresh()
        files = {}
        for where, job in self.jobs.items():
            files.setdefault(where[0], []).append((where, job))
        if len(files) > 1:
            with concurrent.futures.ThreadPoolExecutor(
                    min(WORKERS, len(files)), thread_name_prefix="source") as pool:
                running = [pool.submit(self.run_jobs, jobs) for jobs in files.values()]
                # wait in short steps: a SIGTERM that reaches a worker thread has its
                # handler run by this thread only when it wakes, and the workers stop
                # between batches only once the handler has set the stop flag
                waiting = running
                while waiting:
                    waiting = concurrent.futures.wait(waiting, timeout=0.1).not_done
                for done in running:
                    done.result()
        else:
            for jobs in files.values():
                self.run_jobs(jobs)
        for path in self.refused:  # not held open: renamed, it is a new file
            self.close_file(path)
        self.forget_gone()
        return self.failed

    def run_jobs(self, jobs):
        """One cycle of each job of one file; a failure is the job's own."""
        for where, job in jobs:
            if self.stop.is_set():
                return
            try:
                run_cycle(job)
                note_first_row(job)
                job.sink.report_status(node_status(job))
                job.sink.upkeep(job.table)
            except (SinkError, SourceError, StateError) as exc:
                job.sink.report_status(node_status(job, exc))
                self.fail(where, exc, job)
                if isinstance(exc, SourceReplacedError):
                    self.refused.add(where[0])
            else:
                self.clear_error(job)

    def refresh(self):
        """Open the jobs of files and tables that appeared since the last cycle."""
        self.follow_renames()
        self.follow_moves()
        found = list(self.walk())
        # --recover-state: first the files that go on after a batch of the target, then
        # the others (a file that reused the name of one of them is checked after it)
        for first in ((True, False) if self.recovery else (False,)):
            for spec, path, conn, table, error in found:
                where = (os.path.realpath(path), table["name"] if table else "")
                if where[0] in self.unconfirmed or first and error is not None:
                    continue
                if error is not None:
                    self.fail(where, error)
                elif where not in self.jobs:
                    self.open(spec, path, conn, table, where, first)

    def walk(self):
        """(spec, file, connection, table, None) for each wanted table of each file
        now, or (spec, file, None, None, error) for a file that cannot be read."""
        for spec in self.specs:
            files = match_files(spec)
            if spec.is_glob and not files:
                self.once(f"none:{spec.pattern}", logging.WARNING, "source: no file matches "
                          "%s yet (from %s); looking again each cycle", spec.pattern,
                          spec.origin)
            for path in files:
                try:
                    conn = self.connect(path, spec)
                    tables, views, internal = spec_tables(spec, conn, path)
                except sqlite3.Error as exc:
                    yield spec, path, None, None, SourceError(f"source: reading {path} "
                                                              f"failed: {exc}")
                    continue
                except SourceError as exc:
                    yield spec, path, None, None, exc
                    continue
                if spec.tables == "all":
                    self.say_skipped(path, views, internal)
                for table in tables:
                    yield spec, path, conn, table, None

    def follow_renames(self):
        """A file held open that a glob now finds under another name (rotation by
        rename) keeps its positions: they move to the new name, said in one line. Only
        a file held open is followed: its inode cannot be another file's meanwhile. A
        file at the new name that is not moving (deleted, or gone from the glob's names:
        logrotate's `rotate 1`) is set apart first, so that its last rows are read and
        its positions forgotten as a gone file's; no position is moved onto another."""
        held = {found[1]: path for path, found in self.files.items()
                if found[1] and file_identity(path) != found[1]}
        moves = {}
        for spec in self.specs if held else ():
            for path in match_files(spec) if spec.is_glob else ():
                old = held.get(file_identity(path))
                if old and old != path:
                    moves[old] = path
        while moves:
            free = [old for old, new in moves.items() if not self.holds(new)]
            for old in free:
                if not self.holds(moves[old]):  # (else an earlier move took the name)
                    self.move_file(old, moves.pop(old))
            for old, new in list(moves.items()):
                if self.holds(new) and (new not in moves or not free):
                    # not moving (deleted, or gone from the glob's names), or a ring
                    apart = self.set_apart(new)
                    if new in moves:
                        moves[apart] = moves.pop(new)
                    break

    def holds(self, path):
        """True when the state keeps positions of file `path`, or it is held open."""
        return path in self.files or any(
            is_position_of(pos, path) for pos in self.checkpoint.data["destinations"].values())

    def set_apart(self, path):
        """Give the file at `path` (held open, or gone) a name no file has: its jobs read
        its last rows from the connection held open, and its positions are forgotten
        after FORGET_AFTER, as those of a gone file."""
        found, apart = self.files.get(path), f"{path}#gone-{new_tag(self.checkpoint)}"
        self.checkpoint.move_file(path, apart, apart=True)
        for where in [w for w in self.jobs if w[0] == path]:
            job = self.jobs.pop(where)
            job.scope = source_scope(apart, where[1])
            self.jobs[(apart, where[1])] = job
        if found:
            self.files[apart] = self.files.pop(path)
        log.info("source: %s is another file now; the file that had that name (deleted, or "
                 "renamed) keeps its positions apart, as %s: its last rows are read from "
                 "it while it is held open, and they are forgotten once it is gone for "
                 "FORGET_AFTER", path, apart)
        return apart

    def follow_moves(self):
        """A file renamed while no uploader ran, or forgotten and back: a file a glob
        finds under a name new to the state, with the (device, inode) a position recorded
        (or the inode alone, when no position has its device: a volume mounted again) for
        a file no longer at its name, is that file if it has the row marked at each
        position's cursor: its positions move to the new name, said in one line. Else a
        file whose first row is not that file's is a new file (a freed inode taken
        again); one that begins as it did is refused for the cycle, in one line, unless
        its start_at is now: its rows may be in the target under the old name. A file
        new to the state with no such inode (a copy of a gone file put back) is known
        alike by the row at the cursor of a gone or forgotten file, and refused alike if
        it begins as one. One file at a time, so that a chain of renames (.1 -> .2, then
        the file -> .1) is followed."""
        self.unconfirmed = set()
        while self.follow_move():
            pass

    def follow_move(self):
        """Move the positions of one file renamed while no uploader ran; False if none."""
        lost, known, read = self.lost_files(), {}, {where[0] for where in self.jobs}
        for pos in self.checkpoint.data["destinations"].values():
            known.setdefault((pos.get("source") or {}).get("path"), set()).add(
                tuple(pos.get("file_id") or ()))
        for spec in self.specs if lost else ():
            for path in match_files(spec):
                now, ids = file_identity(path), known.get(path)
                if now is None or path in self.unconfirmed or (ids and now not in ids):
                    continue  # (another file under a name the state keeps: replaced)
                found = ([r for r in lost if r[1] == now]
                         or [r for r in lost if r[1][1:] == now[1:]])
                found = [r for r in found if (r[2] and r[0] != path) or not (r[2] or ids)]
                if found and self.claim(spec, path, found, partial=bool(ids)):
                    return True
                if not (ids or found or os.path.realpath(path) in read):
                    # a copy (another inode) of a gone file put back: known by its rows
                    copies = self.sent_from(lost, path)
                    if copies and self.claim(spec, path, copies, by_inode=False):
                        return True
        return False

    def lost_files(self):
        """(name, (device, inode), kept) of each file the state keeps positions of that
        is not at its name and not held open, then of each forgotten lately (newest
        first)."""
        lost = {}
        for pos in self.checkpoint.data["destinations"].values():
            path, found = (pos.get("source") or {}).get("path"), tuple(pos.get("file_id") or ())
            if path and found and path not in self.files and file_identity(path) != found:
                lost.setdefault((path, found), True)
        for pos in reversed(self.checkpoint.data.get("forgotten", ())):
            if pos.get("file_id"):
                lost.setdefault((pos["source"]["path"], tuple(pos["file_id"])), False)
        return [(path, found, kept) for (path, found), kept in lost.items()]

    def sent_from(self, lost, path):
        """The files of `lost` whose positions sent rows, those named `path` first."""
        sent = [r for r in lost if any(pos["cursor"] is not None or pos["inflight"]
                                       for pos in self.positions_of(*r))]
        return sorted(sent, key=lambda r: r[0] != path)

    def claim(self, spec, new, lost, partial=False, by_inode=True):
        """Move the positions of the first file of `lost` whose rows marked at their
        cursors `new` has to `new` (True); else refuse `new` for this cycle, unless it is
        a new file, or the positions of it that `new` already has were moved (partial).
        Not `by_inode`: `lost` are gone files whose inode `new` has not (a copy of one
        of them?); only a file that begins as one of them is refused."""
        try:
            conn = self.connect(new, spec)
        except (sqlite3.Error, SourceError):
            return False  # (walk says why)
        for old, found, kept in lost:
            if self.has_rows_uploaded(spec, conn, new, self.positions_of(old, found, kept)):
                self.checkpoint.move_file(old, new, found, now=file_identity(new))
                log.info("source: %s is now %s (%s: the same file, with the rows uploaded "
                         "from it); its positions move with it", old, new,
                         ("renamed while no uploader was reading it" if kept else
                          "gone long enough that its positions were forgotten, and back")
                         + ("" if by_inode else ", as a copy"))
                return True
        doubt = []  # the same file, changed? (kept: unless it is surely another file)
        for old, found, kept in lost:
            begins = self.begins_as(spec, conn, new, self.positions_of(old, found, kept))
            if begins or (kept and by_inode and begins is None):
                doubt.append((old, kept))
        if doubt and not partial and spec_config(self.config, spec, new).start_at != "now":
            old, kept = doubt[0]
            how = "keeps" if kept else "forgot after it was gone"
            self.unconfirmed.add(new)
            self.fail((new, ""), StateError(
                f"state: {new} " + (
                    f"has the inode of {old}, whose positions this state {how}, and begins "
                    "with its first row" if by_inode else
                    f"is new to this state but begins with the first row of {old}, whose "
                    f"positions this state {how}") +
                ", but has not the row uploaded at their cursor, so it is not read: if it "
                f"is {old} {'renamed' if kept else 'back'} (and changed), its rows are in "
                f"the target: {'rename it back, or ' if by_inode else ''}give it start_at: "
                "now (--start-at now) to upload only rows added from now on" +
                (f"; if it is another file, it is read once the positions of {old} are "
                 f"forgotten (FORGET_AFTER after {old} is gone)" if kept and by_inode
                 else "")))
        return False

    def positions_of(self, path, found, kept):
        """The positions (kept, or forgotten) of file `path` with (device, inode) `found`."""
        positions = (self.checkpoint.data["destinations"].values() if kept
                     else self.checkpoint.data.get("forgotten", ()))
        return [pos for pos in positions if is_position_of(pos, path, found)]

    def begins_as(self, spec, conn, path, positions):
        """Whether file `path` begins with a first row the positions recorded of their
        file (see note_first_row): False for another file, that took the inode of a
        deleted one; None when no first row was recorded (positions written before)."""
        firsts = []
        try:
            tables = {t["name"]: t for t in spec_tables(spec, conn, path)[0]}
            for pos in positions:
                first, table = pos.get("first_row"), tables.get(pos["source"]["table"])
                if first is None or table is None:
                    firsts += [False] * (first is not None)
                    continue
                config = spec_config(self.config, spec, path, table)
                source = recorded_cursor(conn, config, describe_source(conn, config), pos)
                firsts.append(begins_with(conn, source, decode_cursor(first["cursor"]),
                                          first["mark"], self.checkpoint.data["state_id"]))
        except (sqlite3.Error, UploaderError):
            return None
        return any(firsts) if firsts else None

    def has_rows_uploaded(self, spec, conn, path, positions):
        """True when file `path` has, for each position, the row uploaded at its cursor
        (the row marked in the position; before the first batch landed, the row at the end
        of the batch in flight), or the position sent nothing."""
        try:
            tables = {t["name"]: t for t in spec_tables(spec, conn, path)[0]}
            for pos in positions:
                cursor, mark = decode_cursor(pos["cursor"]), pos.get("cursor_row")
                if cursor is None and not pos["inflight"]:
                    continue
                if cursor is None:
                    flight = pos["inflight"]
                    cursor, mark = decode_cursor(flight["cursor_end"]), flight.get("cursor_row")
                table = tables.get(pos["source"]["table"])
                if cursor is None or mark is None or table is None:
                    return False
                config = spec_config(self.config, spec, path, table)
                source = recorded_cursor(conn, config, describe_source(conn, config), pos)
                if (source_description(path, source)["cursor"] != pos["source"]["cursor"]
                        or not is_marked_row(conn, source, cursor, mark,
                                             self.checkpoint.data["state_id"])):
                    return False
        except (sqlite3.Error, UploaderError):
            return False
        return bool(positions)

    def move_file(self, old, new):
        """Give the positions and connection of file `old` to its new name `new`."""
        self.drop_jobs(old)  # opened again under the new name
        self.files[new] = self.files.pop(old)
        self.checkpoint.move_file(old, new)
        log.info("source: %s is now %s (renamed: the same file); its positions move with "
                 "it", old, new)

    def connect(self, path, spec):
        """The file's connection, opened again when another file took its name."""
        real = os.path.realpath(path)
        found, now = self.files.get(real), file_identity(path)
        if found and (found[1] == now or now is None):  # gone: read what is held open
            return found[0]
        if found:
            log.warning("source: %s is another file than before (replaced in place): it "
                        "goes on from the cursors of the file it replaced only where its "
                        "rows up to them are those uploaded", path)
            self.close_file(real)
        conn = open_source(path, self.config.busy_timeout, spec.origin)
        self.files[real] = [conn, now]
        return conn

    def open(self, spec, path, conn, table, where, first=False):
        """Open the job of one file's table; one with no usable cursor is named once
        (`first`: the first pass of --recover-state, see open_source_job)."""
        config = spec_config(self.config, spec, where[0], table)
        try:
            source = describe_source(conn, config)
            problem = unusable_cursor(source)
            if problem:
                unusable = SourceError(f"source: table {source.name!r} in {path} is not "
                                       f"uploaded: {problem}")
                if spec.tables != "all":
                    raise unusable
                self.once(f"unusable:{where}", logging.WARNING, "%s", unusable)
                return
            job = open_source_job(config, conn, source, self.checkpoint, self.stop,
                                  self.environ, self.recovery, first)
            if job is not None:
                self.jobs[where] = job
        except SourceError as exc:
            if first:
                return  # the second pass tries again and says it
            if spec.tables != "all" or isinstance(exc, SourceBusyError):
                self.fail(where, exc)
            else:  # a table of `all` no cursor can read (its rowid unreachable, ...)
                self.once(f"unusable:{where}", logging.WARNING, "%s; it is not uploaded",
                          exc)
        except (SinkError, StateError) as exc:
            if not first:
                self.fail(where, exc)

    def say_skipped(self, path, views, internal):
        """tables: all passes over views and SQLite's own tables: said once a file."""
        if views or internal:
            self.once(f"skipped:{path}:{views}:{internal}", logging.INFO,
                      "source: %s: tables: all skips views (%s) and SQLite's internal, "
                      "virtual (FTS, R*Tree) and shadow tables (%s)", path, ", ".join(views) or "none",
                      ", ".join(internal) or "none")

    def once(self, what, level, message, *args):
        if what not in self.said:
            self.said.add(what)
            log.log(level, message, *args)

    def fail(self, where, exc, job=None):
        """Log a failed source and keep its error in its position for --status."""
        self.failed[where] = str(exc)
        log.error("%s (file %s%s); trying again at the next cycle", exc, where[0],
                  f", table {where[1]}" if where[1] else "")
        if job is not None:
            record_error(job, exc)

    def clear_error(self, job):
        record_error(job, None)

    def forget_gone(self):
        """Files a glob matched that are gone: a job still open finishes the rows it can
        read; then, after FORGET_AFTER seconds, the positions go (one line a file)."""
        gone, back = {}, []
        for key, pos in self.checkpoint.data["destinations"].items():
            path = (pos.get("source") or {}).get("path")
            if not path or not any(s.matches(pos.get("apart") or path) for s in self.specs):
                continue
            if file_identity(path) is None:
                gone.setdefault(path, []).append(key)
            elif pos.get("gone_at") is not None:  # it came back
                back.append(key)
        for key in back:
            self.checkpoint.update(key, gone_at=None, drained=None)
        for path, keys in gone.items():
            self.settle_gone(path, keys)

    def settle_gone(self, path, keys):
        """Mark a gone file's positions once drained; forget them after the grace."""
        jobs = [(w, j) for w, j in self.jobs.items() if w[0] == path]
        try:
            if any(not is_drained(job) for _, job in jobs):
                return  # still rows to read from the file held open
        except SourceError as exc:
            log.warning("%s; %s is gone, its positions are kept", exc, path)
            return
        self.close_file(path)
        positions = [self.checkpoint.position(k) for k in keys]
        since = min((p["gone_at"] for p in positions if p.get("gone_at")), default=None)
        if since is None:
            for key in keys:
                self.checkpoint.update(key, gone_at=self.clock(), drained=bool(jobs))
            return
        if self.clock() - since < self.config.forget_after:
            return
        self.checkpoint.forget(keys)
        drained = all(p.get("drained") for p in positions)
        log.info("source: %s is gone for %.0f s %s; its positions are forgotten (%s)", path,
                 self.clock() - since, "after all its rows were uploaded" if drained else
                 "(it went while no uploader was reading it: rows added after its last "
                 "upload were not uploaded)",
                 ", ".join(sorted(k.split(" <- ")[0] for k in keys)))
        self.retire_status(positions[0].get("apart") or path, positions)

    def retire_status(self, path, positions):
        """Have the sink remove the status (--fleet-status) the forgotten positions of
        file `path` reported; not where a file still read has the same path and source
        table: it reports on that status too (a file made again where one was)."""
        name, real = os.path.basename(path), os.path.realpath(path)
        kept = {(os.path.realpath(p["source"]["path"]), p["source"]["table"])
                for p in self.checkpoint.data["destinations"].values() if p.get("source")}
        kept |= {(os.path.realpath(w[0]), w[1]) for w in self.jobs}
        spec = next(s for s in self.specs if s.matches(path))
        for pos in positions:
            table = pos["source"]["table"]
            if (real, table) in kept:
                log.debug("source: the status of %s:%s stays: a file read now reports on "
                          "it", name, table)
                continue
            sink = make_sink(spec_config(self.config, spec, path), Identity(
                self.config.source_id, table, "", name, source_scope(path, table)))
            if sink.sleep is REAL_SLEEP:
                sink.sleep = self.stop.wait
            try:
                sink.retire_status(pos["table"])
            finally:
                sink.close()

    def drop_jobs(self, path):
        """Close the jobs reading file `path` (its connection stays open)."""
        for where in [w for w in self.jobs if w[0] == path]:
            self.jobs.pop(where).sink.close()

    def close_file(self, path):
        """Close a file's connection and the jobs reading it."""
        self.drop_jobs(path)
        found = self.files.pop(path, None)
        if found:
            found[0].close()

    def close(self):
        for path in list(self.files):
            self.close_file(path)
        self.checkpoint.close()


def record_error(job, exc):
    """Keep the error of a failed cycle in the job's position for --status (None: the
    cycle went well, clear it); the state is written only when this changes it."""
    if not job.checkpoint.has_position(job.key):
        return
    if exc is None and not job.checkpoint.position(job.key).get("last_error"):
        return
    with contextlib.suppress(UploaderError):  # (a state that cannot be written said so)
        job.checkpoint.update(job.key, last_error=str(exc) if exc else None,
                              last_error_at=utc_now_text() if exc else None)


def is_drained(job):
    """True when the job's position has no in-flight batch and no row after its cursor."""
    pos = job.checkpoint.position(job.key)
    if pos["inflight"]:
        return False
    return not reading_source(job.source, lambda: count_pending(
        job.conn, job.source, decode_cursor(pos["cursor"])))


def open_sources(config, specs, reset_state, stop, environ):
    """Lock the state dir and read the state of many sources; no job is opened yet."""
    checkpoint = Checkpoint(resolve_state_dir(config))
    checkpoint.lock()
    try:
        checkpoint.load_many(reset=reset_state)
    except BaseException:
        checkpoint.close()
        raise
    return Sources(config, specs, checkpoint, stop, environ)


def run_sources(sources, rng=random):
    """Cycle every interval until stopped; with --once, one cycle, exit 1 if a source
    failed."""
    config = sources.config
    if config.jitter and not config.once:
        sources.stop.wait(rng.uniform(0, config.interval))
    while not sources.stop.is_set():
        failed = sources.cycle()
        if config.once:
            for (path, table), error in failed.items():
                print(f"error: {path}{' table ' + table if table else ''}: {error}",
                      file=sys.stderr)
            return EXIT_FAILED if failed else EXIT_OK
        sources.stop.wait(config.interval)
    return EXIT_OK


class Progress:
    """One self-erasing progress line on a terminal; silent when stderr is not one."""

    def __init__(self, stream):
        self.stream, self.shown = stream, False
        self.active = hasattr(stream, "isatty") and stream.isatty()

    def show(self, done, total, rate):
        """Rows done of total, the rate and the time left."""
        if not self.active or total <= 0:
            return
        left = (total - done) / rate if rate > 0 else 0
        self.stream.write(f"\r\x1b[K{done:,}/{total:,} rows ({done / total:.0%})  "
                          f"{rate:,.0f} rows/s  {int(left) // 60}m{int(left) % 60:02d}s left")
        self.stream.flush()
        self.shown = True

    def clear(self):
        """Erase the progress line (before a log line, or at the end)."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def current_progress():
    """The progress line of the log's stderr handler (a silent one without it)."""
    for handler in log.handlers:
        if isinstance(handler, ProgressHandler):
            return handler.progress
    return Progress(None)


class StopFlag:
    """A stop request that a signal handler can make without taking a lock.

    threading.Event.set() takes the lock that Event.wait() holds for a few bytecodes;
    a SIGTERM landing there, in the main thread, deadlocked the process (2 in 300
    tries of a bare loop). Here set() stores a flag and writes a byte to a pipe, and
    wait() sleeps in select() on the pipe's other end.
    """

    def __init__(self):
        self._set = self._closed = False
        self._wake, self._waker = os.pipe()
        os.set_blocking(self._waker, False)

    def is_set(self):
        return self._set

    def set(self):
        self._set = True
        if not self._closed:  # (a closed descriptor's number may belong to a file now)
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                os.write(self._waker, b"!")

    def wait(self, timeout=None):
        """Sleep until set() or `timeout` seconds; return whether it is set."""
        if not self._set:
            select.select([self._wake], [], [], timeout)
        return self._set

    def close(self):
        if not self._closed:
            self._closed = True
            os.close(self._wake)
            os.close(self._waker)


def install_signal_handlers(stop):
    """SIGTERM/SIGINT finish the current batch and exit 0; a second Ctrl-C exits now."""
    def handle(signum, frame):
        if stop.is_set():
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now (the state stays safe)
                raise SystemExit(EXIT_OK)
            return  # supervisors may send SIGTERM twice (uv forwards it to Python too)
        log.info("signal %s: finishing the current batch, then exiting",
                 signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


# === Actions: DDL, queries, self-test ================================================

def sample_output(config, source, conn, environ):
    """Output column names and kinds of the routed table, from the first rows."""
    plan = compile_plan(config, source, {"SANITIZE_HASH_KEY": "ddl-only", **environ})
    chunk = next(read_batches(conn, source, None, 1000), None)
    if chunk is None:  # an empty table: declared types only
        chunk = Chunk(source.column_names, [[] for _ in source.columns], 0, [], None,
                      source_kinds(source))
    out, _ = process_batch(plan, chunk, None)
    return out.columns, resolve_kinds(out, {})


def print_ddl(config, environ):
    """The CREATE TABLE the uploader would run for the routed table; no connection."""
    conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
    try:
        source = describe_source(conn, config)
        names, kinds = sample_output(config, source, conn, environ)
    finally:
        conn.close()
    table = target_table(config, source)
    database = config.databricks_database or (
        f"{config.databricks_catalog}.{config.databricks_schema}"
        if config.databricks_catalog and config.databricks_schema else None)
    return ";\n".join(sink_class(config).ddl(database, table, names, kinds)) + ";"


def print_ingest_sql(config):
    """--print-ingest-sql: the SQL that loads what the target lands (landing)."""
    config = check_target(config)
    cls = sink_class(config)
    sink = cls.for_actions(config)
    try:
        return cls.ingest_sql(config, named_tables(config, sink))
    finally:
        sink.close()


def self_test(config):
    """Create a scratch table, insert a row, read it back, drop it; report each step."""
    config = check_target(config)
    name = f"_uploader_selftest_{uuid.uuid4().hex[:8]}"
    sink = sink_class(config).for_actions(config)
    ok = True
    try:
        for step, error in sink.self_test(name):
            ok = ok and error is None
            print(f"test-upload: {step:<40} {'ok' if error is None else 'FAILED: ' + error}")
            if error is not None:
                break
    finally:
        sink.close()
    return EXIT_OK if ok else EXIT_FAILED


def check_read_back(rows):
    """The self-test row must come back as written."""
    if [tuple(r) for r in rows] != [(1, "it works")]:
        raise SinkError(f"read back {rows!r}, expected [(1, 'it works')]")


def run_steps(steps):
    """Run steps until one fails; yield (step, error or None)."""
    for step, action in steps:
        try:
            action()
        except Exception as exc:  # reported, not raised: the self-test says what failed
            yield step, first_line(exc)
            return
        yield step, None


def find_state_file(config):
    """Where the state file is (or would be), without creating anything."""
    wanted = config.state_dir
    if config.origin("state_dir") != "default":
        return os.path.join(wanted, STATE_FILE)
    for folder in (wanted, FALLBACK_STATE_DIR):
        if os.path.exists(os.path.join(folder, STATE_FILE)):
            return os.path.join(folder, STATE_FILE)
    return os.path.join(wanted if is_usable_dir(wanted) else FALLBACK_STATE_DIR, STATE_FILE)


def with_recorded_source(config):
    """--status without --sqlite: the source the state file was written for."""
    path = find_state_file(config)
    try:
        with open(path, encoding="utf-8") as fh:
            source = json.load(fh)["source"]
        sqlite, table = source["path"], source["table"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("config: --status reads the source: set --sqlite or SQLITE_PATH "
                          f"(no readable state file at {os.path.abspath(path)} names "
                          "one)") from None
    origin = f"state file {os.path.abspath(path)}"
    return dataclasses.replace(
        config, sqlite=sqlite, sqlite_table_name=config.sqlite_table_name or table,
        origins={**config.origins, "sqlite": origin, "sqlite_table_name": origin})


def named_tables(config, sink):
    """The target tables --maintain and --fleet-status look at: the routed table of the
    source (--sqlite) or of --databricks-table, else every table the sink can list."""
    if config.sqlite or config.databricks_table:
        name = config.databricks_table
        if config.sqlite:
            conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
            try:
                name = describe_table(conn, config.sqlite_table_name, config.timestamp_col,
                                      config.sqlite).name
            finally:
                conn.close()
        return [target_table(config, SourceTable(name, (), None, None, False, False))]
    found = sink.list_tables()
    if found is not None:
        return found
    raise ConfigError("config: name the target table: set --sqlite (its routed table) or "
                      "--databricks-table")


def target_sink(config):
    """The configured sink, for the actions that read or tend the target."""
    config = check_target(config)
    return sink_class(config).for_actions(config)


def maintain(config):
    """--maintain: compact, checkpoint and vacuum each named Delta table."""
    sink = target_sink(config)
    try:
        for table in named_tables(config, sink):
            try:
                sink.maintain(table)
            except UploaderError:
                raise
            except Exception as exc:  # deltalake raises several unrelated types
                raise SinkError(f"maintain: {table}: {first_line(exc)}") from exc
    finally:
        sink.close()
    return EXIT_OK


SILENT_INTERVALS = 3


def fleet_status(config, now=None):
    """--fleet-status: each node's last report (per source), from the target; silent
    lines flagged."""
    now = now or dt.datetime.now(dt.timezone.utc)
    sink = target_sink(config)
    lines = []
    try:
        for table in named_tables(config, sink):
            found = sink.fleet(table)
            for line in found:
                interval = line.pop("interval") or config.interval
                age = (now - line["last_report_at"]).total_seconds() \
                    if line["last_report_at"] else None
                line.update(table=table, silent_seconds=age,
                            silent=age is None or age > SILENT_INTERVALS * interval)
            lines += mark_done(found)
    finally:
        sink.close()
    return lines


def mark_done(lines):
    """A source file its node has finished with (rotated away: nothing pending, no
    error at its last report) while the node reports on a newer file of the same source
    table is `done`, not SILENT: the node is heard through the newer file."""
    newest = {}
    for line in lines:
        key, at = (line["node"], line["source_table"]), line["last_report_at"]
        if at and (key not in newest or at > newest[key]):
            newest[key] = at
    for line in lines:
        at, newer = line["last_report_at"], newest.get((line["node"], line["source_table"]))
        line["done"] = bool(line["silent"] and line["source_file"] and at and at < newer
                            and line["pending_rows"] == 0 and not line["last_error"])
        line["silent"] = line["silent"] and not line["done"]
    return lines


def format_fleet(lines):
    """--fleet-status as a table, one line per node; with a source column (file:table)
    when a node has several sources feeding a table, one line per source. Files that
    are done (a rotated logger's older files, one more each day) are counted, not
    listed: --json lists them."""
    if not lines:
        return "fleet: no node has written to the target table yet"
    nodes = [(x["table"], x["node"]) for x in lines]
    shown = [x for x in lines if not x.get("done")]
    if len(set(nodes)) < len(nodes):
        text = format_rows(["table", "node", "source", *FLEET_HEADER[2:]],
                           [(*row[:2], f"{name or '-'}:{x['source_table'] or '-'}", *row[2:])
                            for x, name, row in zip(shown, source_names(shown),
                                                    fleet_rows(shown))])
    else:
        text = format_rows(FLEET_HEADER, fleet_rows(shown))
    done = len(lines) - len(shown)
    return text + (f"\n{done:,} source file{'s' * (done != 1)} done (nothing pending, "
                   "newer files of their tables report; --json lists them)" if done else "")


FLEET_HEADER = ("table", "node", "rows", "last batch", "last commit", "cursor", "pending",
                "lag", "version", "state")


def fleet_rows(lines):
    """The cells of format_fleet's lines, in FLEET_HEADER order."""
    return [(x["table"], x["node"], "-" if x["rows"] is None else f"{x['rows']:,}",
             x["last_batch"] or "-",
             x["last_commit_at"].isoformat(timespec="seconds") if x["last_commit_at"] else "-",
             json.dumps(x["cursor"]) if x["cursor"] is not None else "-",
             "-" if x["pending_rows"] is None else f"{x['pending_rows']:,}",
             "-" if x["lag_seconds"] is None else f"{x['lag_seconds']:.0f} s",
             x["version"] or "-", fleet_state(x)) for x in lines]


def source_names(lines):
    """Each line's source file as shown: its base name; where a node has files of that
    name in several folders, the shortest end of its path that no other has."""
    paths = {}
    for x in lines:
        if x.get("source_path"):
            paths.setdefault((x["table"], x["node"], x["source_file"]), set()).add(
                x["source_path"])
    return [short_path(x["source_path"], paths[(x["table"], x["node"], x["source_file"])])
            if x.get("source_path") else x["source_file"] for x in lines]


def short_path(path, among):
    """The fewest last parts of `path` that end no other path in `among`."""
    parts = path.split("/")
    for n in range(1, len(parts)):
        if sum(p.split("/")[-n:] == parts[-n:] for p in among) == 1:
            return "/".join(parts[-n:])
    return path


def fleet_state(line):
    """ok, SILENT for how long, or the error of the node's last cycle."""
    if line["silent"]:
        return f"SILENT {line['silent_seconds'] or 0:.0f} s"
    if line["last_error"]:
        return "failing: " + line["last_error"].splitlines()[0][:100]
    return "ok"


def warn_upkeep(config, report):
    """--status: warn when the target table needs upkeep (so many files commits slow)."""
    with contextlib.suppress(UploaderError):
        sink = target_sink(config)
        try:
            warning = sink.upkeep_warning(report["target_table"])
        finally:
            sink.close()
        if warning:
            log.warning("status: %s", warning)


def status_report(config):
    """Where the upload stands, read-only: the state file and the source, no upload."""
    config = check_target(config)
    conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
    try:
        source = describe_source(conn, config)
        path = find_state_file(config)
        checkpoint = Checkpoint(os.path.dirname(path))
        if os.path.exists(path):
            source = recorded_cursor(conn, config, source, checkpoint.read_old())
            checkpoint.load(source_description(config.sqlite, source))
        else:
            checkpoint.data = new_state(source_description(config.sqlite, source))
        identity = Identity(config.source_id, source.name, checkpoint.data["state_id"])
        destination = make_sink(config, identity).destination
        pos = checkpoint.position(position_key(destination, target_table(config, source)))
        cursor = decode_cursor(pos.get("cursor"))
        pending = count_pending(conn, source, cursor)
        unordered = count_null_timestamps(conn, source)
        behind = rows_behind(conn, source, pos, pending, unordered[0])
    finally:
        conn.close()
    return {"source": os.path.abspath(config.sqlite), "source_table": source.name,
            "cursor_kind": source.cursor.kind, "cursor_columns": list(source.cursor.columns),
            "cursor_reason": source.reason, "timestamp_col": source.timestamp_col,
            "timestamp_format": source.timestamp_format.describe(),
            "unordered_rows": unordered[0], "unordered_rowids": list(unordered[1:]),
            "cursor": pos.get("cursor"), "pending_rows": pending, "behind_rows": behind,
            "uploaded_rows": pos.get("rows", 0), "batches": pos.get("seq", 0),
            "last_upload_at": pos.get("updated_at"), "last_timestamp": pos.get("last_upload"),
            "in_flight": pos.get("inflight"), "last_error": pos.get("last_error"),
            "last_error_at": pos.get("last_error_at"), "destination": destination,
            "target_table": target_table(config, source), "source_id": config.source_id,
            "state_file": os.path.abspath(path), "state_exists": os.path.exists(path)}


def sources_status(config, specs):
    """--status of many sources: one record per (file, source table), read-only."""
    config = check_target(config)
    path = find_state_file(config)
    checkpoint = Checkpoint(os.path.dirname(path))
    data = checkpoint.read_old() if os.path.exists(path) else None
    checkpoint.data = to_many_state(data, path) if data else new_state(None)
    if not config.sqlite and not config.sources:  # the sources the state names
        specs = recorded_specs(checkpoint.data)
    sources = Sources(config, specs, checkpoint, None, os.environ)
    destination = destination_of(config)
    try:
        lines = [source_status(sources, destination, *found) for found in sources.walk()]
    finally:
        for where in list(sources.files):
            sources.close_file(where)
    seen = {(x["file"], x["source_table"]) for x in lines}
    lines += [gone_status(pos) for key, pos in checkpoint.data["destinations"].items()
              if pos.get("source") and "#" not in key and file_identity(
                  pos["source"]["path"]) is None and
              (pos["source"]["path"], pos["source"]["table"]) not in seen]
    return {"state_file": os.path.abspath(path), "state_exists": os.path.exists(path),
            "destination": destination, "source_id": config.source_id, "sources": lines}


def recorded_specs(state):
    """One source per position of a state of many sources (its file, source table and
    target table, as the settings that routed it are not at hand)."""
    found = {(p["source"]["path"], p["source"]["table"], key.split(" <- ")[0].rsplit("/", 1)[1])
             for key, p in state["destinations"].items() if p.get("source") and "#" not in key}
    if not found:
        raise ConfigError("config: --status reads the sources: set sources, --sqlite or "
                          "SQLITE_PATH (the state file names none)")
    return [SourceSpec(path, ({"name": table, "settings": {}, "origins": {}, "target": target},),
                       {}, {}, "state file") for path, table, target in sorted(found)]


def source_status(sources, destination, spec, path, conn, table, error):
    """The --status record of one file's table (or why it cannot be read)."""
    real = os.path.realpath(path)
    record = {"file": real, "source_table": table["name"] if table else None,
              "target_table": None, "cursor_kind": None, "cursor": None,
              "pending_rows": None, "behind_rows": None, "uploaded_rows": 0,
              "last_upload_at": None, "in_flight": None, "last_error": None}
    if error is not None:
        return {**record, "last_error": str(error)}
    config = spec_config(sources.config, spec, real, table)
    try:
        source = describe_source(conn, config)
        target = table.get("target") or target_table(config, source)
        pos = sources.checkpoint.position(position_key(destination, target) +
                                          source_scope(real, source.name))
        if pos.get("source"):
            source = recorded_cursor(conn, config, source, {"source": pos["source"]})
        pending = count_pending(conn, source, decode_cursor(pos["cursor"]))
        nulls = count_null_timestamps(conn, source)[0]
        behind = rows_behind(conn, source, pos, pending, nulls)
    except (UploaderError, sqlite3.Error) as exc:
        return {**record, "last_error": str(exc)}
    problem = unusable_cursor(source)
    return {**record, "source_table": source.name, "target_table": target,
            "cursor_kind": source.cursor.kind, "cursor": pos["cursor"],
            "pending_rows": pending, "behind_rows": behind, "uploaded_rows": pos["rows"],
            "last_upload_at": pos["updated_at"], "in_flight": pos["inflight"],
            "last_error": pos.get("last_error") or (f"not uploaded: {problem}"
                                                    if problem else None)}


def gone_status(pos):
    """The --status record of a position whose file is not there now."""
    return {"file": pos["source"]["path"], "source_table": pos["source"]["table"],
            "target_table": pos.get("table"), "cursor_kind": pos["source"]["cursor"]["kind"],
            "cursor": pos["cursor"], "pending_rows": None, "behind_rows": None,
            "uploaded_rows": pos["rows"], "last_upload_at": pos["updated_at"],
            "in_flight": pos["inflight"],
            "last_error": pos.get("last_error") or "the file is gone"}


def format_sources_status(report):
    """--status of many sources: one line each."""
    def shown(value):
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else value
    rows = [(os.path.basename(x["file"]), x["source_table"] or "-", x["target_table"] or "-",
             json.dumps(x["cursor"]) if x["cursor"] is not None else "start",
             shown(x["pending_rows"]), shown(x["behind_rows"]), shown(x["uploaded_rows"]),
             x["last_upload_at"] or "never", (x["last_error"] or "-")[:100])
            for x in report["sources"]]
    table = format_rows(["file", "table", "target table", "cursor", "pending", "behind",
                         "uploaded", "last upload", "last error"], rows)
    return (f"{table}\n\ndestination {report['destination']}  node {report['source_id']}"
            f"\nstate file  {report['state_file']}"
            + ("" if report["state_exists"] else " (not yet written)"))


def rows_behind(conn, source, pos, pending, nulls):
    """Rows behind the cursor and not uploaded: those counted by the cycles so far, and
    those that appeared since the last one."""
    if pos.get("cursor") is None:
        return 0
    base = pos.get("behind_base")
    now = count_passed(conn, source, pending, nulls)
    return pos.get("behind", 0) + (max(now - base, 0) if base is not None else 0)


def format_status(report):
    """The status report as aligned text."""
    flight = report["in_flight"]
    lines = [("source", f"{report['source']} (table {report['source_table']})"),
             ("cursor", f"{report['cursor_kind']} ({', '.join(report['cursor_columns'])}) "
                        f"at {report['cursor'] if report['cursor'] is not None else 'start'}"),
             ("why", report["cursor_reason"]),
             ("timestamp", f"{report['timestamp_col']} ({report['timestamp_format']})"
                           if report["timestamp_col"] else "none"),
             ("pending", f"{report['pending_rows']:,} rows"),
             ("behind", f"{report['behind_rows']:,} rows behind the cursor, not uploaded"
                        + (" (--backfill uploads them)" if report["behind_rows"] else "")),
             ("unordered", f"{report['unordered_rows']:,} rows" + (
                 f" with a NULL {report['timestamp_col']} (rowid "
                 f"{report['unordered_rowids'][0]}..{report['unordered_rowids'][1]}): the "
                 "cursor cannot order them, so they are not uploaded"
                 if report["unordered_rows"] else "")),
             ("uploaded", f"{report['uploaded_rows']:,} rows in {report['batches']} batches"),
             ("last upload", f"{report['last_upload_at'] or 'never'}"
                             + (f" (source timestamp {report['last_timestamp']})"
                                if report["last_timestamp"] is not None else "")),
             ("in-flight", f"batch {flight['batch_id']} ({flight['rows']} rows)"
                           if flight else "none"),
             ("last error", f"{report['last_error']} (at {report['last_error_at']})"
                            if report["last_error"] else "none"),
             ("destination", report["destination"]),
             ("target table", report["target_table"]),
             ("node", report["source_id"]),
             ("state file", report["state_file"] + ("" if report["state_exists"]
                                                    else " (not yet written)"))]
    return "\n".join(f"{k:<13}{v}" for k, v in lines)


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


def delta_info(base, table):
    """--run-query INFO on the lakehouse: its tables, then the target's columns and
    row count (every table's, when no source names the target)."""
    tables = list_delta_tables(base)
    if table and table not in tables:
        raise ConfigError(f"query: no table {table} under {base} yet (tables: "
                          f"{', '.join(tables) or 'none'}): nothing was uploaded to it")
    results = [(["table"], [(name,) for name in tables])]
    for name in [table] if table else tables:
        results.append(describe_delta_table(base, name))
        _, count = run_query(base, f'SELECT count(*) FROM "{name}"')
        results.append((["table", "row_count"], [(name, count[0][0])]))
    return results


SQL_TYPE_NAMES = {"long": "bigint", "integer": "int", "short": "smallint", "byte": "tinyint"}


def describe_delta_table(base, name):
    """(names, rows) of a Delta table's columns and their SQL types, as DESCRIBE shows."""
    from deltalake import DeltaTable
    rows = []
    for field in DeltaTable(os.path.join(base, name)).schema().fields:
        delta_type = str(getattr(field.type, "type", field.type))
        rows.append((name, field.name, SQL_TYPE_NAMES.get(delta_type, delta_type)))
    return ["table", "col_name", "data_type"], rows


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
              "demo: where the upload stands:",
              f"  uv run {script} --state-dir {config.state_dir} --status",
              "demo: run --demo again to add 10 more minutes of readings and upload "
              "only those"]
    return "\n".join(lines)


# === CLI =============================================================================

class Formatter(logging.Formatter):
    """Text or JSON log lines, UTC times, secrets replaced."""

    def __init__(self, json_lines):
        super().__init__()
        self.json_lines = json_lines

    def format(self, record):
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        message = redact(message)
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.json_lines:
            return json.dumps({"time": stamp, "level": record.levelname,
                               "message": message}, ensure_ascii=False)
        return f"{stamp} {record.levelname:<7} {message}"


class ProgressHandler(logging.StreamHandler):
    """A stderr handler that erases the progress line before each log line."""

    def __init__(self, stream, progress):
        super().__init__(stream)
        self.progress = progress

    def emit(self, record):
        self.progress.clear()
        super().emit(record)


def setup_logging(level="INFO", json_lines=False):
    """Log to stderr in the chosen format."""
    handler = ProgressHandler(sys.stderr, Progress(sys.stderr))
    handler.setFormatter(Formatter(json_lines))
    log.handlers[:] = [handler]
    if logging.lastResort is not None:  # what libraries' warnings go through: redacted too
        logging.lastResort.setFormatter(handler.formatter)
    log.setLevel(level)
    log.propagate = False


# Environment variables whose values are secrets (AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, AZURE_STORAGE_SAS_KEY, AZURE_CLIENT_SECRET, ...): deltalake and the
# SDKs read them themselves, and may quote them in an error
SECRET_VARIABLE = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|_KEY)$", re.I)


def is_secret_variable(name, value):
    """Whether an environment variable holds a secret, by its name: one with SECRET,
    TOKEN or PASSWORD in it always; *_KEY (an account key, a SAS key) unless its value
    is a plain name, letters without digits (PARTITION_KEY=states, SORT_KEY=ts: taken
    for secrets, they turned 'raw_states' into 'raw_[REDACTED]' in every line)."""
    if not SECRET_VARIABLE.search(name):
        return False
    if re.search(r"SECRET|TOKEN|PASSWORD|PASSWD", name, re.I) or name.upper() in KEY_SECRETS:
        return True
    return not re.fullmatch(r"[A-Za-z_.\-]*", value.strip())


# *_KEY variables that are secrets whatever they hold: ours, and object stores' keys
KEY_SECRETS = {"SANITIZE_HASH_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_MASTER_KEY",
               "GOOGLE_SERVICE_ACCOUNT_KEY"}


def remember_secrets(config, environ):
    """Have redact() know the run's secrets before anything is logged: the secret
    settings (and the client id and secret as HTTP Basic sends them), the secret-named
    environment variables, and the password of each user:password@ in a setting or
    variable (an error may quote it without the user)."""
    SECRETS.clear()  # one run's (main() may run many times in one process: tests)
    remember_secret(*(getattr(config, name) for name, setting, _ in config_fields()
                      if setting.secret))
    if config.databricks_client_id and config.databricks_client_secret:  # HTTP Basic's form
        remember_secret(base64.b64encode(f"{config.databricks_client_id}:"
                                         f"{config.databricks_client_secret}".encode()).decode())
    remember_secret(*(value for name, value in environ.items()
                      if is_secret_variable(name, value)))
    texts = [*environ.values(), *(str(getattr(config, name) or "")
                                  for name, _, _ in config_fields())]
    remember_secret(*(password for text in texts
                      for password in re.findall(r"[^\s/@:]+:([^\s/@]+)@", text)))


GROUP_TITLES = {"source": "source (SQLite)", "state": "state", "loop": "schedule",
                "target": "target", "databricks": "Databricks SQL warehouse",
                "zerobus": "Zerobus Ingest",
                "processing": "processing", "logging": "logging"}


HELP_EXAMPLES = """examples:
  %(prog)s --demo                              sample data -> ./lakehouse
  %(prog)s --sqlite sensors.db --once          one cycle to ./lakehouse
  %(prog)s --config uploader.yaml              loop every UPLOAD_INTERVAL seconds
  %(prog)s --sqlite sensors.db --status        where the upload stands
  %(prog)s --run-query "SELECT count(*) FROM raw_sensor_readings"
  DATABRICKS_TOKEN=... %(prog)s --sqlite sensors.db --databricks-host HOST \\
      --databricks-http-path /sql/1.0/warehouses/ID --databricks-database cat.schema
  %(prog)s --sqlite sensors.db --enable-filter --filter-config '{"temperature": {">": 21}}'

Settings: flag > environment variable > YAML file (--config) > default.
Exit codes: 0 done, 1 a cycle failed, 2 bad configuration or input.
"""


def build_parser():
    """The argument parser: every setting's flag, with its env var in the help."""
    parser = argparse.ArgumentParser(
        prog="sqlite_to_databricks_uploader.py", description=__doc__.split("\nexamples:")[0],
        epilog=HELP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_argument_group("actions")
    actions.add_argument("--config", metavar="FILE",
                         help="YAML file of settings [env UPLOADER_CONFIG]")
    actions.add_argument("--print-config", action="store_true",
                         help="print each setting, its value and its source; exit")
    actions.add_argument("--reset-state", action="store_true",
                         help="forget the saved cursors (the old state file is kept) and "
                              "exit; refused while the target table holds rows of this "
                              "SOURCE_ID, unless --start-at now; with --once, then run")
    actions.add_argument("--recover-state", action="store_true",
                         help="with the state file lost: rebuild the cursor from what the "
                              "target holds for this SOURCE_ID, then run")
    actions.add_argument("--backfill", action="store_true",
                         help="upload the rows behind the cursor that the target table "
                              "does not hold (imported or committed late); exit")
    actions.add_argument("--demo", action="store_true",
                         help="make sample sensor data in ./demo and upload it once")
    actions.add_argument("--run-query", metavar="SQL",
                         help="run SQL on the warehouse, or over the tables under the "
                              "Delta URI; INFO describes the target; print; exit")
    actions.add_argument("--status", action="store_true",
                         help="print where the upload stands (cursor, pending rows, last "
                              "upload, target); no upload")
    actions.add_argument("--fleet-status", action="store_true",
                         help="print one line per node that writes to the target table "
                              "(last batch, rows, cursor, pending, lag; silent nodes "
                              "flagged), read from the Delta log or the warehouse's "
                              "_uploader_nodes table")
    actions.add_argument("--maintain", action="store_true",
                         help="Delta: compact small files, checkpoint the log and vacuum "
                              "the target table; run it on one node or as a scheduled job")
    actions.add_argument("--json", action="store_true",
                         help="with --status, --fleet-status or --print-config: print JSON")
    actions.add_argument("--print-ingest-sql", action="store_true",
                         help="landing: print the Databricks SQL that loads the landed "
                              "files (Auto Loader streaming table, or COPY INTO) and the "
                              "fleet view; no connection")
    actions.add_argument("--print-ddl", action="store_true",
                         help="print the CREATE TABLE for the target table; no connection")
    actions.add_argument("--test-upload", action="store_true",
                         help="create a scratch table, insert a row, read it back, drop it")
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
        elif setting.kind == "tables":
            group.add_argument(setting.flag, dest=name, action="append", metavar="TABLE",
                               help=f"{setting.help}{extra} [env {env}]")
        else:
            group.add_argument(setting.flag, dest=name, metavar=name.upper().split("_")[-1],
                               help=f"{setting.help}{extra} [env {env}]")
    return parser


def main(argv=None, environ=None):
    """Run the uploader; return the exit code."""
    environ = os.environ if environ is None else environ
    # deltalake allocates with its own jemalloc, which by default keeps freed pages for
    # 10 s: with a commit every second or two, the process grew with the backlog. Give
    # them back at once (no measurable cost), unless the user tuned it. jemalloc reads
    # this when deltalake is first imported, which is after this line.
    os.environ.setdefault(*JEMALLOC_SETTING)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.demo:
            apply_demo_defaults(args, environ)
        config = load_config(args, environ)
        remember_secrets(config, environ)
        setup_logging(config.log_level, config.log_format == "json")
        if args.print_config:
            print(json.dumps(config_as_dict(config), indent=1) if args.json
                  else format_config(config))
            return EXIT_OK
        if args.status and is_many(config):
            report = sources_status(config, source_specs(config))
            print(json.dumps(report, indent=1, default=str) if args.json
                  else format_sources_status(report))
            return EXIT_OK
        if args.status:
            if not config.sqlite:
                config = with_recorded_source(config)
            report = status_report(config)
            print(json.dumps(report, indent=1, default=str) if args.json
                  else format_status(report))
            warn_upkeep(config, report)
            return EXIT_OK
        if args.fleet_status:
            lines = fleet_status(config)
            print(json.dumps(lines, indent=1, default=str) if args.json
                  else format_fleet(lines))
            return EXIT_OK
        if args.maintain:
            return maintain(config)
        if args.print_ingest_sql:
            print(print_ingest_sql(config))
            return EXIT_OK
        if args.print_ddl:
            if not config.sqlite:
                raise ConfigError("config: --print-ddl reads the source table's columns: "
                                  "set --sqlite or SQLITE_PATH")
            print(print_ddl(config, environ))
            return EXIT_OK
        if args.run_query:
            return print_query(config, args.run_query)
        if args.test_upload:
            return self_test(config)
        return run_job(config, args, environ)
    except UploaderError as exc:
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def print_query(config, sql):
    """--run-query: SQL (or INFO) on the target, whichever it is."""
    config = check_target(config)
    info = sql.strip().upper() == "INFO"
    sink = sink_class(config).for_actions(config)
    try:
        results = sink.query(sql, info_table(config) if info else None)
    finally:
        sink.close()
    print("\n\n".join(format_rows(names, rows) for names, rows in results))
    return EXIT_OK


def info_table(config):
    """The target table INFO describes: routed from the source table, or from
    DATABRICKS_TABLE; None when neither is configured."""
    if config.sqlite:
        conn = open_source(config.sqlite, config.busy_timeout, config.origin("sqlite"))
        try:
            return target_table(config, describe_source(conn, config))
        finally:
            conn.close()
    if config.databricks_table:
        return target_table(config, SourceTable(config.databricks_table, (), None, None,
                                                False, False))
    return None


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


def run_job(config, args, environ):
    """Open the job, run it until done or stopped, close it."""
    if not config.sqlite and not config.sources:
        raise ConfigError("config: no SQLite file: set --sqlite, SQLITE_PATH or "
                          "'sqlite' in the YAML file (or try --demo)")
    remove_stale_scratch()
    config = check_target(config)
    specs = source_specs(config)
    if is_many(config):
        return run_many(config, specs, args, environ)
    if config.sources:  # a list of one source: the single-source run
        spec = specs[0]
        config = spec_config(config, spec, spec.pattern, (spec.tables or (None,))[0])
    if args.reset_state and args.recover_state:
        raise ConfigError("config: --reset-state and --recover-state contradict each "
                          "other: the first forgets the cursor, the second rebuilds it")
    stop = StopFlag()
    install_signal_handlers(stop)
    try:
        job = open_job(config, args.reset_state, stop, environ, recover=args.recover_state)
        try:
            if args.backfill:
                return backfill(job)
            if args.reset_state and not config.once:
                log.info("state: --reset-state done; the next run uploads to %s from the "
                         "position above (add --once to run a cycle right away)", job.table)
                return EXIT_OK
            code = run_forever(job)
            if args.demo:
                print(demo_summary(config, job))
            return code
        finally:
            close_job(job)
    finally:
        stop.close()


def is_many(config):
    """Many sources configured, or a state of many sources in the state dir."""
    return (bool(config.sqlite or config.sources) and not is_single(source_specs(config))
            or is_many_state(find_state_file(config)))


def run_many(config, specs, args, environ):
    """Many sources (or a state of many): one Job per file and table, one state."""
    if args.backfill:
        raise ConfigError("config: --backfill works on one source table; run it with "
                          "--sqlite FILE --table TABLE and a state dir of its own")
    if args.recover_state:
        check_recover_many(config, args)
    stop = StopFlag()
    install_signal_handlers(stop)
    try:
        sources = open_sources(config, specs, args.reset_state, stop, environ)
        try:
            if args.recover_state:
                sources.recovery = Recovery()
            if args.reset_state and not config.once:
                sources.refresh()
                log.info("state: --reset-state done; the next run uploads every source "
                         "from the positions above (add --once to run a cycle right away)")
                return EXIT_FAILED if sources.failed else EXIT_OK
            return run_sources(sources)
        finally:
            sources.close()
    finally:
        stop.close()


def check_recover_many(config, args):
    """--recover-state with many sources: not with --reset-state, and only on a target
    that keeps, per batch, what tells the file its rows came from."""
    if args.reset_state:
        raise ConfigError("config: --reset-state and --recover-state contradict each "
                          "other: the first forgets the cursors, the second rebuilds them")
    cls = sink_class(config)
    if cls.recover_files_refused:
        raise ConfigError(f"config: --recover-state with many sources is not available on "
                          f"the {cls.name} target: {cls.recover_files_refused}; give the "
                          "files whose rows the tables hold start_at: now (--start-at now), "
                          "or remove this node's rows of them from the tables first")


if __name__ == "__main__":
    sys.exit(main())
