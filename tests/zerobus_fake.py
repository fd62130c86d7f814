"""A loopback double of Zerobus Ingest's REST interface and the workspace token endpoint.

Written from the public documentation (docs.databricks.com/ingestion/zerobus-ingest,
zerobus-limits, zerobus-errors) and the token request the public Zerobus SDKs make
(databricks/zerobus-sdk-java TokenFactory):

- `POST /oidc/v1/token` (the workspace host): HTTP Basic client credentials, a form
  with grant_type=client_credentials, scope=all-apis,
  resource=api://databricks/workspaces/<id>/zerobusDirectWriteApi and
  authorization_details, a JSON list of `unity_catalog_privileges` entries (USE CATALOG,
  USE SCHEMA, and SELECT + MODIFY on the table). Answers {access_token, expires_in,
  token_type}; a bad client is 401 invalid_client, a bad form 400 invalid_request.
- `POST /zerobus/v1/tables/<catalog.schema.table>/insert` (the Zerobus endpoint): a
  bearer token scoped to that table, a JSON array of records. Every record must fit the
  table's schema (no unknown column, each value of its column's type: TIMESTAMP as
  microseconds since the epoch, BINARY as base64); the request is taken whole or not at
  all. 200 `{}` once durable. Errors are JSON {error_code, message}: 400
  INVALID_PARAMETER_VALUE, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND,
  413 for a body over the size limit, 429 RESOURCE_EXHAUSTED with Retry-After, 503
  TEMPORARILY_UNAVAILABLE.

Faults are planned with `plan(fault, ...)` and fire on the next insert: "drop_reply"
(the rows are stored, the connection closes without an answer; an empty insert does
not take it), "429", "503" and "expire" (every token expires: the insert gets 401 and a
new token works); "token_503" fires on the next token request.

`echo = True` makes every error reply quote the request's credential (the Authorization
value without its scheme: the token, or the Basic client credentials), as some proxies
and gateways do: the uploader must not print it.
"""

import base64
import datetime as dt
import http.server
import json
import re
import threading
import urllib.parse

# serve_forever() looks for shutdown() this often (default 0.5 s: each test would wait)
POLL = 0.05

TYPES = ("BIGINT", "DOUBLE", "STRING", "BINARY", "BOOLEAN", "TIMESTAMP")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class ZerobusFake:
    """The service's state; `start()` serves it on 127.0.0.1 (one port for both)."""

    def __init__(self, workspace_id="1234567890123456", clients=None,
                 max_request_bytes=10 * 2 ** 20, token_lifetime=3600):
        self.workspace_id = workspace_id
        self.clients = dict(clients or {"sp-id": "sp-secret"})
        self.grants = {}  # client id -> tables it may write; None: every table
        self.tables = {}  # catalog.schema.table -> {column: type}
        self.rows = {}  # table -> records as stored (decoded values)
        self.tokens = {}  # token -> (client, table or None)
        self.max_request_bytes = max_request_bytes
        self.token_lifetime = token_lifetime
        self.faults = []
        self.requests = []  # (path, status, bytes of body)
        self.token_requests = []  # parsed forms of the token requests
        self.lock = threading.Lock()
        self.catalog = None  # table -> {column: type} or None: the schemas of tables
        # made or altered elsewhere (through a warehouse), read on each insert
        self.materialize = None  # (table, records): where taken rows become queryable
        self.echo = False  # error replies quote the request's credential
        self._serial = 0
        self.server = None

    # --- set up ------------------------------------------------------------------

    def create_table(self, table, columns):
        """A table with {column: type}; or from the uploader's CREATE TABLE text."""
        if isinstance(columns, str):
            columns = {name.replace("``", "`"): kind for name, kind in re.findall(
                r"`((?:[^`]|``)+)` (" + "|".join(TYPES) + r")\b", columns)}
        self.tables[table] = dict(columns)
        self.rows.setdefault(table, [])

    def add_column(self, table, name, kind):
        self.tables[table][name] = kind

    def plan(self, fault, count=1, retry_after=None):
        with self.lock:
            self.faults += [(fault, retry_after)] * count

    def start(self):
        fake = self

        class Handler(Zerobus):
            service = fake

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 1024  # a fleet's connections at once (the bench)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(POLL,), daemon=True).start()
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    # --- what landed -------------------------------------------------------------

    def deduped(self, table):
        """The rows of `<table>_deduped`: per (_source_id, _source_file, _row_key) the
        first copy by (_uploaded_at, _batch_id), and every row without a _row_key, as the
        view the uploader creates selects them."""
        best = {}
        for n, row in enumerate(self.rows.get(table, [])):
            key = (row.get("_source_id"), row.get("_source_file"),
                   row.get("_row_key") or n)  # no key: each kept
            order = (row.get("_uploaded_at"), row.get("_batch_id"))
            if key not in best or order < best[key][0]:
                best[key] = (order, row)
        columns = self.tables.get(table, {})
        return [{c: row.get(c) for c in columns} for _, row in best.values()]

    def inserts(self, table=None):
        """Insert requests that were answered 200 (the empty probe included)."""
        return [r for r in self.requests if r[1] == 200 and "/insert" in r[0]
                and (table is None or f"/tables/{table}/" in r[0])]

    # --- the service -------------------------------------------------------------

    def issue(self, headers, body):
        """The token endpoint: (status, reply)."""
        with self.lock:
            if self.faults and self.faults[0][0] == "token_503":
                self.faults.pop(0)
                return 503, {"error": "temporarily_unavailable",
                             "error_description": "try again"}
        auth = headers.get("Authorization", "")
        try:
            client, _, secret = base64.b64decode(auth.removeprefix("Basic ")).decode() \
                .partition(":")
        except ValueError:
            client = secret = None
        if not auth.startswith("Basic ") or self.clients.get(client) != secret:
            return 401, {"error": "invalid_client",
                         "error_description": "Client authentication failed"}
        form = dict(urllib.parse.parse_qsl(body.decode()))
        self.token_requests.append(form)
        resource = f"api://databricks/workspaces/{self.workspace_id}/zerobusDirectWriteApi"
        if form.get("grant_type") != "client_credentials" or \
                "all-apis" not in form.get("scope", "").split():
            return 400, {"error": "invalid_request", "error_description": "bad grant"}
        if form.get("resource") != resource:
            return 400, {"error": "invalid_request",
                         "error_description": f"resource must be {resource}"}
        try:
            details = json.loads(form.get("authorization_details", ""))
            scoped = {(d["object_type"], d["object_full_path"]): set(d["privileges"])
                      for d in details if d["type"] == "unity_catalog_privileges"}
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "invalid_request",
                         "error_description": "authorization_details is not valid"}
        tables = [path for (kind, path), privileges in scoped.items()
                  if kind == "TABLE" and {"SELECT", "MODIFY"} <= privileges]
        if len(tables) != 1:
            return 400, {"error": "invalid_request", "error_description":
                         "authorization_details must grant SELECT and MODIFY on one table"}
        catalog, schema, _ = tables[0].split(".")
        if "USE CATALOG" not in scoped.get(("CATALOG", catalog), ()) or \
                "USE SCHEMA" not in scoped.get(("SCHEMA", f"{catalog}.{schema}"), ()):
            return 400, {"error": "invalid_request", "error_description":
                         "authorization_details lacks USE CATALOG or USE SCHEMA"}
        with self.lock:
            self._serial += 1
            token = f"zb-token-{self._serial}"
            self.tokens[token] = (client, tables[0])
        return 200, {"access_token": token, "token_type": "Bearer",
                     "expires_in": self.token_lifetime}

    def insert(self, table, headers, body):
        """The insert endpoint: (status, reply, extra headers, drop the reply)."""
        with self.lock:
            fault, wait = self.faults.pop(0) if self.faults else (None, None)
            if fault == "drop_reply" and body.strip() == b"[]":  # only a request of rows
                self.faults.insert(0, (fault, wait))
                fault = None
            if fault == "expire":
                self.tokens.clear()
        if fault == "429":
            return 429, error("RESOURCE_EXHAUSTED", "Too many requests"), \
                {"Retry-After": str(wait or 1)}, False
        if fault == "503":
            return 503, error("TEMPORARILY_UNAVAILABLE", "Service unavailable"), {}, False
        auth = headers.get("Authorization", "")
        grant = self.tokens.get(auth.removeprefix("Bearer ")) if \
            auth.startswith("Bearer ") else None
        if grant is None:
            return 401, error("UNAUTHENTICATED", "Invalid or expired token"), {}, False
        client, scope = grant
        if scope != table or table not in (self.grants.get(client) or [table]):
            return 403, error("PERMISSION_DENIED", f"The token may not write {table}"), \
                {}, False
        found = self.catalog(table) if self.catalog else None
        if found:  # the table as Unity Catalog has it now (made or altered elsewhere)
            self.create_table(table, found)
        if table not in self.tables:
            return 404, error("NOT_FOUND", f'Table "{table}" cannot be found.'), {}, False
        if len(body) > self.max_request_bytes:
            return 413, error("INVALID_PARAMETER_VALUE", "Request body too large"), {}, False
        if not headers.get("Content-Type", "").startswith("application/json"):
            return 400, error("INVALID_PARAMETER_VALUE", "Content-Type must be JSON"), \
                {}, False
        try:
            records = [self.decode_record(table, r) for r in parse_array(body)]
        except ValueError as exc:
            return 400, error("INVALID_PARAMETER_VALUE", str(exc)), {}, False
        with self.lock:
            self.rows[table].extend(records)
            if self.materialize and records:
                self.materialize(table, records)
        return 200, {}, {}, fault == "drop_reply"

    def decode_record(self, table, record):
        if not isinstance(record, dict):
            raise ValueError("a record must be a JSON object")
        columns, out = self.tables[table], {}
        for name, value in record.items():
            if name not in columns:
                raise ValueError(f"column {name!r} is not in table {table}")
            out[name] = None if value is None else decode_value(name, columns[name], value)
        return out


def parse_array(body):
    try:
        records = json.loads(body)
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(records, list):
        raise ValueError("the body must be a JSON array of records")
    return records


def decode_value(name, kind, value):
    """A record's value as its column stores it; ValueError for the wrong type."""
    wrong = ValueError(f"column {name!r} ({kind}) cannot take {value!r}")
    if kind == "BIGINT" or kind == "TIMESTAMP":
        if type(value) is not int:
            raise wrong
        return value if kind == "BIGINT" else EPOCH + dt.timedelta(microseconds=value)
    if kind == "DOUBLE":
        if isinstance(value, str) and value in SPECIAL:
            return SPECIAL[value]
        if type(value) not in (int, float):
            raise wrong
        return float(value)
    if kind == "BOOLEAN":
        if type(value) is not bool:
            raise wrong
        return value
    if type(value) is not str:
        raise wrong
    if kind == "BINARY":
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise wrong from None
    return value


def error(code, message):
    return {"error_code": code, "message": message}


class Zerobus(http.server.BaseHTTPRequestHandler):
    """Both endpoints on one loopback port."""

    service = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urllib.parse.unquote(self.path)
        found = re.fullmatch(r"/zerobus/v1/tables/([^/]+)/insert", path)
        extra, drop = {}, False
        if path == "/oidc/v1/token":
            status, reply = self.service.issue(self.headers, body)
        elif found:
            status, reply, extra, drop = self.service.insert(found.group(1), self.headers,
                                                             body)
        else:
            status, reply = 404, error("NOT_FOUND", f"no such endpoint {path}")
        self.service.requests.append((path, status, len(body)))
        if self.service.echo and status >= 400:
            credential = self.headers.get("Authorization", "").partition(" ")[2]
            field = "message" if "message" in reply else "error_description"
            reply = {**reply, field: f"{reply[field]} (request credential {credential})"}
        if drop:  # committed; the answer is lost with the connection
            self.close_connection = True
            return
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
