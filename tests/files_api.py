"""A loopback Databricks Files API for Unity Catalog volumes, from its public reference.

Implemented (docs.databricks.com/api/workspace/files; the calls databricks-sdk's
`FilesAPI` makes):
- `PUT /api/2.0/fs/files{path}?overwrite=true|false`: the body (raw bytes, at most
  5 GiB) becomes the file; no body in the reply (204). overwrite=false on an existing
  file: 409 ALREADY_EXISTS. Missing parent folders are made.
- `HEAD /api/2.0/fs/files{path}`: 200 with Content-Length, Content-Type, Last-Modified;
  404 when there is no such file. `GET` of the same path downloads it.
- `PUT /api/2.0/fs/directories{path}`: make a folder (and its parents); idempotent.
- `DELETE` of a file, or of an empty folder (400 DIRECTORY_NOT_EMPTY otherwise); 404
  when there is none.
- `GET /api/2.0/fs/directories{path}?page_size=&page_token=`: `{"contents": [{"path",
  "name", "is_directory", "file_size", "last_modified"}], "next_page_token"}`; 404 when
  there is no such folder.
Paths are percent-encoded in the URL and must lie inside an existing volume
`/Volumes/<catalog>/<schema>/<volume>` (`volumes`): another path is 400
INVALID_PARAMETER_VALUE, a volume that does not exist 404 NOT_FOUND. Errors are JSON
`{"error_code": ..., "message": ...}`, as the workspace sends them.

Auth: `Authorization: Bearer <token>`, checked on every request: no header or an
unknown token is 401 UNAUTHENTICATED, an expired one (`expire(token)`) 401 with "Token
is expired". OAuth machine-to-machine as databricks-sdk finds it: GET
/.well-known/databricks-config, /oidc/.well-known/oauth-authorization-server, POST
/oidc/v1/token (client_credentials; `clients` {id: secret}); each token is new and
opaque, with `expires_in`.

Faults a test plans (thread-safe, each consumed once):
- `refuse(status, count=1, method=None, retry_after=None, match="")`: answer the next
  `count` requests (of one HTTP method, with `match` in the URL) with 429 / 503 (+
  Retry-After) or another status.
- `plan("drop_reply", method, match)`: carry the request out (a PUT stores the file),
  then close the connection without answering.
`requests` logs (method, path, status) of every request.
`echo = True` makes every JSON error reply quote the request's bearer token in its
message, as some proxies and gateways do: the uploader must not print it.

What the real service does not check but its consumer does: `ingest(folder)` reads
every landed Parquet file under a route's folder as the ingestion job would (DuckDB,
columns by name), checks each file against the table's schema (the lineage columns and
their types, `_source_id` = the node folder, `_batch_id` = the file name, the types a
column had in the files before) and returns the rows as dicts.
"""

import datetime as dt
import email.utils
import http.server
import json
import posixpath
import threading
import urllib.parse

from tests.helpers import issue_client_token

# serve_forever() looks for shutdown() this often (default 0.5 s: each test would wait)
POLL = 0.05

LINEAGE_TYPES = {"_source_id": "VARCHAR", "_batch_id": "VARCHAR",
                 "_uploaded_at": "TIMESTAMP WITH TIME ZONE", "_rescued_data": "VARCHAR"}
MAX_FILE = 5 * 2 ** 30
PAGE_SIZE = 1000


class Server(http.server.ThreadingHTTPServer):
    """A service takes many connections at once (a fleet): a deep accept queue."""

    request_queue_size = 1024


class FilesApi:
    """The service: volumes, files, tokens and planned faults."""

    def __init__(self, volumes=("/Volumes/main/sensors/landing",), tokens=("dapi-files",)):
        self.volumes = set(volumes)
        self.tokens = set(tokens)
        self.expired = set()
        self.clients = {}
        self.issued = []
        self.token_lifetime = 3600
        self.files = {}  # path -> (bytes, modified)
        self.folders = set()
        self.refusals = []
        self.faults = []
        self.requests = []
        self.page_size = PAGE_SIZE
        self.echo = False  # error replies quote the request's token
        self.lock = threading.Lock()
        self.server = Server(("127.0.0.1", 0), make_handler(self))
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(POLL,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # --- faults --------------------------------------------------------------------

    def refuse(self, status, count=1, method=None, retry_after=None, match=""):
        with self.lock:
            self.refusals.append([status, count, method, retry_after, match])

    def plan(self, action, method, match=""):
        with self.lock:
            self.faults.append((action, method, match))

    def expire(self, token):
        with self.lock:
            self.expired.add(token)

    def take_refusal(self, method, path):
        with self.lock:
            for refusal in self.refusals:
                if refusal[2] in (None, method) and refusal[4] in path:
                    refusal[1] -= 1
                    if refusal[1] <= 0:
                        self.refusals.remove(refusal)
                    return refusal[0], refusal[3]
        return None

    def take_fault(self, method, path):
        with self.lock:
            for i, (action, want, match) in enumerate(self.faults):
                if want == method and match in path:
                    del self.faults[i]
                    return action
        return None

    # --- auth ----------------------------------------------------------------------

    def check_token(self, header):
        """None when the bearer token is good, else (status, error_code, message)."""
        if not header.startswith("Bearer "):
            return 401, "UNAUTHENTICATED", "No access token in the request"
        token = header[len("Bearer "):].strip()
        with self.lock:
            if token in self.expired:
                return 401, "UNAUTHENTICATED", "Token is expired"
            if token not in self.tokens:
                return 401, "UNAUTHENTICATED", "Invalid access token"
        return None

    def issue_token(self, headers, form):
        """An access token for a known client (client_credentials), or None."""
        return issue_client_token(self, headers, form)

    # --- files ---------------------------------------------------------------------

    def check_path(self, path):
        """None for a path inside an existing volume, else (status, code, message)."""
        parts = path.split("/")
        if path != posixpath.normpath(path) or len(parts) < 5 or parts[1] != "Volumes" \
                or not all(parts[1:]):
            return 400, "INVALID_PARAMETER_VALUE", f"Invalid path {path!r}: expected " \
                "/Volumes/<catalog>/<schema>/<volume>/..."
        if "/".join(parts[:5]) not in self.volumes:
            return 404, "NOT_FOUND", f"Volume {'.'.join(parts[2:5])} does not exist."
        return None

    def put_file(self, path, data, overwrite):
        with self.lock:
            if path in self.folders:
                return 409, "ALREADY_EXISTS", f"{path} is a directory"
            if path in self.files and not overwrite:
                return 409, "ALREADY_EXISTS", f"The file {path} already exists"
            if len(data) > MAX_FILE:
                return 413, "INVALID_PARAMETER_VALUE", "The file is larger than 5 GiB"
            self.files[path] = (bytes(data), dt.datetime.now(dt.timezone.utc))
            self.make_folders(posixpath.dirname(path))
        return None

    def make_folders(self, path):
        while path.count("/") > 4 and path not in self.folders:
            self.folders.add(path)
            path = posixpath.dirname(path)

    def listing(self, path, page_token, page_size):
        with self.lock:
            if path not in self.folders and path not in self.volumes:
                return None
            names = sorted({p[len(path) + 1:].split("/")[0] for p in
                            list(self.files) + list(self.folders) if p.startswith(path + "/")})
            start = int(page_token or 0)
            size = min(int(page_size or self.page_size), self.page_size)
            entries = []
            for name in names[start:start + size]:
                full = f"{path}/{name}"
                if full in self.files:
                    data, modified = self.files[full]
                    entries.append({"path": full, "name": name, "is_directory": False,
                                    "file_size": len(data),
                                    "last_modified": int(modified.timestamp() * 1000)})
                else:
                    entries.append({"path": full + "/", "name": name, "is_directory": True})
        page = {"contents": entries}
        if start + size < len(names):
            page["next_page_token"] = str(start + size)
        return page

    # --- the ingestion job's view ----------------------------------------------------

    def landed(self, folder):
        """{path: bytes} of the Parquet files under a route's folder (any node)."""
        with self.lock:
            return {p: d for p, (d, _) in self.files.items()
                    if p.startswith(folder.rstrip("/") + "/") and p.endswith(".parquet")}

    def ingest(self, folder):
        """Every row of every landed file under `folder`, each file checked first;
        columns matched by name (a file without a column has NULL in it)."""
        import os
        import tempfile

        import duckdb
        kinds, names = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            con = duckdb.connect()
            try:
                for i, (path, data) in enumerate(sorted(self.landed(folder).items())):
                    local = names[path] = os.path.join(tmp, f"{i}.parquet")
                    with open(local, "wb") as fh:
                        fh.write(data)
                    rel = con.sql(f"SELECT * FROM read_parquet('{local}')")
                    check_file(path, dict(zip(rel.columns, map(str, rel.types))), kinds)
                if not names:
                    return []
                files = ", ".join(f"'{n}'" for n in names.values())
                rel = con.sql(f"SELECT * FROM read_parquet([{files}], union_by_name = true, "
                              "filename = '_landed_file')")
                rows = [dict(zip(rel.columns, values)) for values in rel.fetchall()]
            finally:
                con.close()
        by_local = {local: path for path, local in names.items()}
        for row in rows:
            check_lineage(by_local[row.pop("_landed_file")], [row])
        return rows


def check_file(path, schema, kinds):
    """A landed file must match the table: lineage columns and their types, node and
    batch named by its path, and every column's type as in the files before it."""
    for name, kind in LINEAGE_TYPES.items():
        if schema.get(name) != kind:
            raise AssertionError(f"{path}: column {name} is {schema.get(name)}, not {kind}")
    for name, kind in schema.items():
        if kinds.setdefault(name, kind) != kind:
            raise AssertionError(f"{path}: column {name} is {kind}, was {kinds[name]}")


def check_lineage(path, rows):
    """Each row of the file at .../<source_id>/<batch_id>.parquet says so."""
    node, name = path.split("/")[-2:]
    for row in rows:
        if (row["_source_id"], row["_batch_id"] + ".parquet") != (node, name):
            raise AssertionError(f"{path}: a row of {row['_source_id']} "
                                 f"{row['_batch_id']}")


def error_reply(status, code, message, headers=None):
    """(status, body, headers) of a JSON error as the workspace sends it."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    return status, body, {"Content-Type": "application/json", **(headers or {})}


def make_handler(service):
    """The HTTP request handler class bound to one FilesApi."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, body=b"", headers=None):
            if service.echo and status >= 400 and body.startswith(b"{"):
                found = json.loads(body)
                token = self.headers.get("Authorization", "").partition(" ")[2]
                found["message"] = f"{found.get('message', '')} (request token {token})"
                body = json.dumps(found).encode()
            with service.lock:
                service.requests.append((self.command, self.path, status))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def route(self):
            """(api, path, query) of a Files API URL, or None."""
            url = urllib.parse.urlsplit(self.path)
            for api in ("files", "directories"):
                prefix = f"/api/2.0/fs/{api}/"
                if url.path.startswith(prefix):
                    path = urllib.parse.unquote(url.path[len(prefix) - 1:])
                    return api, path, dict(urllib.parse.parse_qsl(url.query))
            return None

        def do_GET(self):
            oidc = f"http://{service.host}/oidc"
            found = {"/.well-known/databricks-config": {"oidc_endpoint": oidc},
                     "/oidc/.well-known/oauth-authorization-server": {
                         "issuer": oidc, "token_endpoint": oidc + "/v1/token",
                         "authorization_endpoint": oidc + "/v1/authorize"}}.get(self.path)
            if found:
                return self.answer(200, json.dumps(found).encode(),
                                   {"Content-Type": "application/json"})
            self.files_call()

        def do_POST(self):
            body = self.body()
            if self.path != "/oidc/v1/token":
                return self.answer(*error_reply(404, "ENDPOINT_NOT_FOUND",
                                                f"No API found for {self.path}"))
            reply = service.issue_token(self.headers, dict(urllib.parse.parse_qsl(
                body.decode())))
            if reply is None:
                return self.answer(401, b'{"error": "invalid_client"}',
                                   {"Content-Type": "application/json"})
            self.answer(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})

        def do_PUT(self):
            self.files_call(self.body())

        def do_HEAD(self):
            self.files_call()

        def do_DELETE(self):
            self.files_call()

        def files_call(self, data=None):
            """Check the URL, the token, planned refusals and the path; carry the call
            out; answer it, or drop the reply when a fault says so."""
            found = self.route()
            if found is None:
                return self.answer(*error_reply(404, "ENDPOINT_NOT_FOUND",
                                                f"No API found for {self.path}"))
            refused = service.check_token(self.headers.get("Authorization", ""))
            if refused:
                return self.answer(*error_reply(*refused))
            refusal = service.take_refusal(self.command, self.path)
            if refusal:
                status, wait = refusal
                code = {429: "REQUEST_LIMIT_EXCEEDED", 403: "PERMISSION_DENIED"}.get(
                    status, "TEMPORARILY_UNAVAILABLE")
                return self.answer(*error_reply(status, code, "planned refusal", {
                    "Retry-After": str(wait)} if wait is not None else {}))
            api, path, query = found
            bad = service.check_path(path.rstrip("/") if api == "directories" else path)
            if bad:
                return self.answer(*error_reply(*bad))
            reply = getattr(self, f"{self.command.lower()}_{api}")(path, query, data)
            if service.take_fault(self.command, path) == "drop_reply":
                with service.lock:
                    service.requests.append((self.command, self.path, "dropped"))
                self.close_connection = True
                return
            self.answer(*reply)

        def put_files(self, path, query, data):
            refused = service.put_file(path, data, query.get("overwrite", "true") != "false")
            return error_reply(*refused) if refused else (204, b"", {})

        def head_files(self, path, query, data):
            with service.lock:
                found = service.files.get(path)
            if found is None:
                return 404, b"", {}
            return 200, b"", {"Content-Length": str(len(found[0])),
                              "Content-Type": "application/octet-stream",
                              "Last-Modified": email.utils.format_datetime(found[1],
                                                                           usegmt=True)}

        def get_files(self, path, query, data):
            with service.lock:
                found = service.files.get(path)
            if found is None:
                return error_reply(404, "NOT_FOUND", f"The file {path} does not exist")
            return 200, found[0], {"Content-Type": "application/octet-stream"}

        def delete_files(self, path, query, data):
            with service.lock:
                if service.files.pop(path, None) is None:
                    return error_reply(404, "NOT_FOUND", f"The file {path} does not exist")
            return 204, b"", {}

        def delete_directories(self, path, query, data):
            path = path.rstrip("/")
            with service.lock:
                if path not in service.folders:
                    return error_reply(404, "NOT_FOUND", f"The directory {path} does not exist")
                if any(p.startswith(path + "/") for p in list(service.files) +
                       list(service.folders)):
                    return error_reply(400, "DIRECTORY_NOT_EMPTY", f"{path} is not empty")
                service.folders.discard(path)
            return 204, b"", {}

        def put_directories(self, path, query, data):
            with service.lock:
                if path.rstrip("/") in service.files:
                    return error_reply(409, "ALREADY_EXISTS", f"{path} is a file")
                service.make_folders(path.rstrip("/"))
            return 204, b"", {}

        def get_directories(self, path, query, data):
            page = service.listing(path.rstrip("/"), query.get("page_token"),
                                   query.get("page_size"))
            if page is None:
                return error_reply(404, "NOT_FOUND", f"The directory {path} does not exist")
            return 200, json.dumps(page).encode(), {"Content-Type": "application/json"}

    return Handler
