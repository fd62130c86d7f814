"""A loopback SQL warehouse that speaks the connector's own wire protocol.

`databricks-sql-connector` talks to a warehouse in Thrift (TCLIService, binary protocol)
over HTTP POSTs. This server answers those POSTs on 127.0.0.1, so the REAL connector,
pointed at it with `_connection_uri="http://127.0.0.1:PORT/..."`, connects, runs
statements and fetches results through its own HTTP layer, retry policy and error
handling. Statements run on the engine of tests/fake_warehouse.py (`Warehouse.run`:
sqlglot parses them as Databricks SQL, DuckDB executes them), so rows read back as
in the DB-API double's tests.

Implemented (the calls the connector makes for cursor.execute and fetch*):
OpenSession (protocol V8, so named parameters travel natively as TSparkParameter),
ExecuteStatement (results inline as directResults in the column-based row set, which
is what the connector asks for when pyarrow is absent, and which it also reads when
pyarrow is present; PUT and REMOVE of volume files as staging operations: the reply
names a presigned URL on this server, which the connector then sends the file to with
an HTTP PUT, or an HTTP DELETE), GetOperationStatus, GetResultSetMetadata, FetchResults (one
page), CancelOperation, CloseOperation, CloseSession. Statement errors are replied the
way a warehouse replies them: operation state ERROR_STATE with the message, SQLSTATE
and error class, which the connector raises as ServerOperationError.

Faults a test plans (each thread-safe, each consumed once):
- `refuse(status, count, method=None, retry_after=None)`: answer the next `count`
  requests (or only those of one Thrift method, e.g. "OpenSession") with an HTTP
  status: 503 + Retry-After is a warehouse that is starting, 429 one that throttles,
  401 / 403 refusals.
- `plan("drop_reply", match)`: run the statement, commit it, then close the connection
  without answering (the connector sees a dropped connection).
- `plan("hold", match)`: accept the statement but keep it queued (PENDING) until
  `release()` runs it, whether or not its client is still there; `held` lists them.
- `plan("fail", match, message)`: refuse the statement with a server error message such
  as "[DELTA_CONCURRENT_APPEND] ... SQLSTATE: 2D521" (nothing runs).
- `restart()`: the warehouse stopped and started again: every open session is gone,
  and a request on one is answered INVALID_HANDLE ("Invalid SessionHandle").
- `tokens` (valid bearer tokens; None accepts any) and `expire(token)`: an expired token
  is answered 401 with the reason header a workspace sends.
- OAuth machine-to-machine: `clients` ({client id: secret}) may fetch tokens from
  POST /oidc/v1/token (client_credentials, Basic auth or form fields; found as
  databricks-sdk finds it: GET /.well-known/databricks-config, then
  /oidc/.well-known/oauth-authorization-server). Each token is new,
  opaque (not a JWT), valid for `token_lifetime` seconds as said in `expires_in` (the
  server does not expire it by itself: `expire(token)` does), and logged in `issued`.
`requests` logs (Thrift method, HTTP status) of every POST, `statements()` (the engine's
log) every statement run.

Not implemented: TLS, the metadata RPCs (GetTables, GetColumns...; the uploader uses plain
SQL), Arrow and CloudFetch results, LZ4, multi-page fetches, async execution, GET of
volume files, the SEA REST protocol, OAuth user-to-machine flows and refresh tokens.
"""

import datetime as dt
import http.server
import json
import os
import re
import socket
import threading
import urllib.parse
import uuid

from databricks.sql.thrift_api.TCLIService import TCLIService, ttypes
from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

from . import fake_warehouse
from .helpers import issue_client_token

# serve_forever() looks for shutdown() this often (default 0.5 s: each test would wait)
POLL = 0.05

T = ttypes
OK = T.TStatus(statusCode=T.TStatusCode.SUCCESS_STATUS)
SQLSTATE = re.compile(r"SQLSTATE:\s*([0-9A-Z]{5})")
ERROR_CLASS = re.compile(r"^\[([A-Z0-9_.]+)\]")
REASONS = {401: "Invalid access token.", 403: "PERMISSION_DENIED: the token may not use "
           "this warehouse", 429: "Too Many Requests", 503: "Service Unavailable: the "
           "warehouse is starting"}


class ThriftWarehouse:
    """An HTTP server on 127.0.0.1 answering TCLIService calls; `close()` stops it."""

    def __init__(self, root, tokens=None):
        self.engine = fake_warehouse.Warehouse(root)
        self.tokens = None if tokens is None else set(tokens)
        self.expired = set()
        self.clients, self.token_lifetime, self.issued = {}, 3600, []
        self.refusals = []   # [status, count, method, retry_after]
        self.faults = []     # (action, match, argument)
        self.requests = []   # (method, HTTP status)
        self.operations = {}
        self.sessions = set()
        self.presigned = {}  # key of a presigned URL -> the volume file it writes
        self.held = []
        self.lock = threading.Condition()
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self.http.daemon_threads = True
        self.http.handle_error = lambda request, address: None  # clients die mid-reply
        self.thread = threading.Thread(target=self.http.serve_forever, args=(POLL,), daemon=True)
        self.thread.start()

    @property
    def host(self):
        return f"127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.engine.release()

    # --- test-facing ---------------------------------------------------------------

    def refuse(self, status, count=1, method=None, retry_after=None):
        """Answer the next `count` requests (of `method`, if given) with HTTP `status`."""
        with self.lock:
            self.refusals.append([status, count, method, retry_after])

    def plan(self, action, match="", argument=None):
        """'drop_reply', 'hold' or 'fail' (with a message) the next statement with `match`."""
        with self.lock:
            self.faults.append((action, match, argument))

    def expire(self, token):
        """From now on `token` is refused with 401, as an expired token is."""
        with self.lock:
            self.expired.add(token)

    def restart(self):
        """Forget every session, as a warehouse that stopped and started again does."""
        with self.lock:
            self.sessions.clear()

    def release(self):
        """Run every held statement now (their clients may be long gone)."""
        with self.lock:
            held, self.held = self.held, []
        for op in held:
            if op["state"] == T.TOperationState.PENDING_STATE:
                self.run(op)
        with self.lock:
            self.lock.notify_all()

    def statements(self, match=""):
        """Text of every statement the engine ran, oldest first."""
        return [s["sql"] for s in self.engine.statements() if match in s["sql"]]

    def calls(self, method):
        """HTTP statuses of the requests made for one Thrift method."""
        return [status for name, status in self.requests if name == method]

    # --- HTTP level ----------------------------------------------------------------

    def refusal(self, method, token):
        """(status, headers) to answer instead of processing the request, or None."""
        with self.lock:
            if token in self.expired:
                return 401, {"x-databricks-reason-phrase": "Token is expired."}
            if not token or (self.tokens is not None and token not in self.tokens):
                return 401, {"x-databricks-reason-phrase": REASONS[401]}
            for refusal in self.refusals:
                status, count, only, retry_after = refusal
                if only in (None, method):
                    refusal[1] -= 1
                    if refusal[1] == 0:
                        self.refusals.remove(refusal)
                    headers = {"x-databricks-reason-phrase": REASONS.get(status, "")}
                    if retry_after is not None:
                        headers["Retry-After"] = str(retry_after)
                    return status, headers
        return None

    def issue_token(self, headers, form):
        """An access token for a known client (client_credentials), or None."""
        return issue_client_token(self, headers, form)

    def take_fault(self, sql):
        with self.lock:
            for i, (action, match, argument) in enumerate(self.faults):
                if match in sql:
                    del self.faults[i]
                    return action, argument
        return None, None

    # --- TCLIService ---------------------------------------------------------------

    def OpenSession(self, req):
        handle = T.TSessionHandle(sessionId=new_handle())
        with self.lock:
            self.sessions.add(handle.sessionId.guid)
        return T.TOpenSessionResp(
            status=OK, sessionHandle=handle, configuration={},
            serverProtocolVersion=T.TProtocolVersion.SPARK_CLI_SERVICE_PROTOCOL_V8)

    def CloseSession(self, req):
        return T.TCloseSessionResp(status=OK)

    def ExecuteStatement(self, req):
        if req.sessionHandle.sessionId.guid not in self.sessions:
            return T.TExecuteStatementResp(status=T.TStatus(
                statusCode=T.TStatusCode.INVALID_HANDLE_STATUS,
                errorMessage=f"Invalid SessionHandle: SessionHandle "
                             f"[{uuid.UUID(bytes=req.sessionHandle.sessionId.guid)}]"))
        op = {"handle": T.TOperationHandle(operationId=new_handle(), hasResultSet=True,
                                           operationType=T.TOperationType.EXECUTE_STATEMENT),
              "sql": req.statement, "params": parameters(req.parameters),
              "state": T.TOperationState.PENDING_STATE}
        with self.lock:
            self.operations[op["handle"].operationId.guid] = op
        action, argument = self.take_fault(req.statement)
        if action == "hold":
            with self.lock:
                self.held.append(op)
            return T.TExecuteStatementResp(status=OK, operationHandle=op["handle"])
        if action == "fail":
            op.update(state=T.TOperationState.ERROR_STATE, error=argument)
        elif STAGING.fullmatch(req.statement.strip()):
            self.stage(op)
        else:
            self.run(op)
        if action == "drop_reply":
            raise DropReply()
        return T.TExecuteStatementResp(
            status=OK, operationHandle=op["handle"], directResults=T.TSparkDirectResults(
                operationStatus=self.status_of(op), resultSetMetadata=self.metadata_of(op),
                resultSet=self.results_of(op), closeOperation=T.TCloseOperationResp(OK)))

    def run(self, op):
        """Execute one statement on the engine: one commit, as on a warehouse."""
        try:
            rows, description = self.engine.execute(op["sql"], op["params"], None)
        except fake_warehouse.Error as exc:
            op.update(state=T.TOperationState.ERROR_STATE, error=str(exc))
        else:
            op.update(state=T.TOperationState.FINISHED_STATE,
                      columns=columns_of(rows, description or []))

    def stage(self, op):
        """PUT / REMOVE: answer with the presigned URL the connector sends the file to."""
        found = STAGING.fullmatch(op["sql"].strip())
        verb, local, remote = found.group(1, 2, 3) if found.group(1) else found.group(4, 5, 6)
        self.engine.record(op["sql"], op["params"])
        try:
            path = self.engine.volume_path(fake_warehouse.unescape(remote))
        except fake_warehouse.Error as exc:
            return op.update(state=T.TOperationState.ERROR_STATE, error=str(exc))
        key = uuid.uuid4().hex
        with self.lock:
            self.presigned[key] = path
        row = (verb, f"http://{self.host}/presigned/{key}",
               fake_warehouse.unescape(local) if local else None, "{}")
        op.update(state=T.TOperationState.FINISHED_STATE, staging=True, columns=columns_of(
            [row], [("operation",), ("presignedUrl",), ("localFile",), ("headers",)]))

    def presigned_file(self, path):
        """The volume file behind a presigned URL's path, or None."""
        with self.lock:
            return self.presigned.get(path.removeprefix("/presigned/"))

    def operation(self, req):
        with self.lock:
            return self.operations.get(req.operationHandle.operationId.guid)

    def GetOperationStatus(self, req):
        op = self.operation(req)
        with self.lock:  # a long poll, as the warehouse does, instead of a busy loop
            if op and op["state"] == T.TOperationState.PENDING_STATE:
                self.lock.wait(0.5)
        return self.status_of(op)

    def status_of(self, op):
        if op is None:
            return T.TGetOperationStatusResp(status=T.TStatus(
                statusCode=T.TStatusCode.INVALID_HANDLE_STATUS, errorMessage="no operation"))
        if op["state"] != T.TOperationState.ERROR_STATE:
            return T.TGetOperationStatusResp(status=OK, operationState=op["state"])
        message = op["error"]
        state = SQLSTATE.search(message)
        error_class = ERROR_CLASS.match(message)
        return T.TGetOperationStatusResp(
            status=OK, operationState=op["state"], errorMessage=message,
            displayMessage=message, sqlState=state and state.group(1),
            errorCode=0, errorDetailsJson=error_class and (
                '{"errorClass": "%s"}' % error_class.group(1)))

    def GetResultSetMetadata(self, req):
        return self.metadata_of(self.operation(req))

    def metadata_of(self, op):
        if op is None or op["state"] != T.TOperationState.FINISHED_STATE:
            return None
        schema = T.TTableSchema(columns=[
            T.TColumnDesc(columnName=name, position=i + 1, typeDesc=T.TTypeDesc(types=[
                T.TTypeEntry(primitiveEntry=T.TPrimitiveTypeEntry(type=type_id))]))
            for i, (name, type_id, _) in enumerate(op["columns"])])
        return T.TGetResultSetMetadataResp(status=OK, schema=schema,
                                           resultFormat=T.TSparkRowSetType.COLUMN_BASED_SET,
                                           isStagingOperation=op.get("staging", False))

    def FetchResults(self, req):
        op = self.operation(req)
        return T.TFetchResultsResp(status=OK, hasMoreRows=False,
                                   results=self.results_of(op).results,
                                   resultSetMetadata=self.metadata_of(op))

    def results_of(self, op):
        if op is None or op["state"] != T.TOperationState.FINISHED_STATE:
            return None
        return T.TFetchResultsResp(status=OK, hasMoreRows=False, results=T.TRowSet(
            startRowOffset=0, rows=[], columns=[column for _, _, column in op["columns"]]))

    def CancelOperation(self, req):
        op = self.operation(req)
        with self.lock:
            if op and op["state"] == T.TOperationState.PENDING_STATE:
                op["state"] = T.TOperationState.CANCELED_STATE
        return T.TCancelOperationResp(status=OK)

    def CloseOperation(self, req):
        self.CancelOperation(req)
        return T.TCloseOperationResp(status=OK)


# PUT 'local' INTO '/Volumes/...' OVERWRITE, REMOVE '/Volumes/...'
STAGING = re.compile(r"(PUT) '((?:[^'\\]|\\.)*)' INTO '((?:[^'\\]|\\.)*)' OVERWRITE|"
                     r"(REMOVE)() '((?:[^'\\]|\\.)*)'", re.S)


class DropReply(TTransport.TTransportException):
    """Close the connection without answering (the statement has run).

    A transport error, because the generated Processor turns any other exception
    into a Thrift error reply.
    """


def new_handle():
    return T.THandleIdentifier(guid=uuid.uuid4().bytes, secret=uuid.uuid4().bytes)


def parameters(params):
    """{name: value} of native TSparkParameters, typed as the warehouse binds them."""
    out = {}
    for p in params or []:
        text = p.value.stringValue if p.value else None
        kind = (p.type or "STRING").upper()
        if text is not None and kind in ("INT", "BIGINT", "SMALLINT", "TINYINT"):
            text = int(text)
        elif text is not None and kind in ("DOUBLE", "FLOAT", "DECIMAL"):
            text = float(text)
        out[p.name] = text
    return out


# (TTypeId, TColumn field, value class, to the wire): the first non-NULL value decides
COLUMN_KINDS = [
    (bool, T.TTypeId.BOOLEAN_TYPE, "boolVal", T.TBoolColumn, bool),
    (int, T.TTypeId.BIGINT_TYPE, "i64Val", T.TI64Column, int),
    (float, T.TTypeId.DOUBLE_TYPE, "doubleVal", T.TDoubleColumn, float),
    (bytes, T.TTypeId.BINARY_TYPE, "binaryVal", T.TBinaryColumn, bytes),
]


def columns_of(rows, description):
    """[(name, TTypeId, TColumn)] of a result: column-based, NULLs in a bitmap."""
    out = []
    for i, desc in enumerate(description):
        values = [row[i] for row in rows]
        sample = next((v for v in values if v is not None), "")
        type_id, field, wrapper, convert = T.TTypeId.STRING_TYPE, "stringVal", \
            T.TStringColumn, str
        for cls, kind_id, kind_field, kind_wrapper, kind_convert in COLUMN_KINDS:
            if isinstance(sample, cls):
                type_id, field, wrapper, convert = kind_id, kind_field, kind_wrapper, \
                    kind_convert
                break
        if isinstance(sample, dt.datetime):  # as text in the session's zone, UTC
            type_id, convert = T.TTypeId.TIMESTAMP_TYPE, timestamp_text
        elif isinstance(sample, dt.date):
            type_id, convert = T.TTypeId.DATE_TYPE, dt.date.isoformat
        nulls = bytearray((len(values) + 7) // 8)
        for n, value in enumerate(values):
            if value is None:
                nulls[n // 8] |= 1 << (n % 8)
        filler = convert(sample) if sample != "" else ""
        column = wrapper(values=[filler if v is None else convert(v) for v in values],
                         nulls=bytes(nulls))
        out.append((desc[0], type_id, T.TColumn(**{field: column})))
    return out


def timestamp_text(value):
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value.isoformat(sep=" ")


def make_handler(warehouse):
    """The HTTP request handler class bound to one ThriftWarehouse."""
    processor = TCLIService.Processor(warehouse)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # what databricks-sdk reads before asking for a token
            oidc = f"http://{warehouse.host}/oidc"
            found = {"/.well-known/databricks-config": {"oidc_endpoint": oidc},
                     "/oidc/.well-known/oauth-authorization-server": {
                         "issuer": oidc, "token_endpoint": oidc + "/v1/token",
                         "authorization_endpoint": oidc + "/v1/authorize"}}.get(self.path)
            self.answer("GET " + self.path, 200 if found else 404,
                        json.dumps(found or {"error_code": "NOT_FOUND"}).encode(),
                        {"Content-Type": "application/json"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/oidc/v1/token":
                form = dict(urllib.parse.parse_qsl(body.decode()))
                reply = warehouse.issue_token(self.headers, form)
                data = json.dumps(reply or {"error": "invalid_client"}).encode()
                return self.answer("token", 200 if reply else 401, data,
                                   {"Content-Type": "application/json"})
            method = thrift_method(body)
            token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            refused = warehouse.refusal(method, token)
            if refused:
                return self.answer(method, refused[0], b"", refused[1])
            out = TTransport.TMemoryBuffer()
            try:
                processor.process(TBinaryProtocol.TBinaryProtocol(
                    TTransport.TMemoryBuffer(body)), TBinaryProtocol.TBinaryProtocol(out))
            except DropReply:
                warehouse.requests.append((method, None))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.answer(method, 200, out.getvalue(), {"Content-Type": "application/x-thrift"})

        def do_PUT(self):  # the connector uploading a staged file to its presigned URL
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = warehouse.presigned_file(self.path)
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
            self.answer("PUT presigned", 201 if path else 404, b"", {})

        def do_DELETE(self):
            path = warehouse.presigned_file(self.path)
            if path and os.path.exists(path):
                os.remove(path)
            self.answer("DELETE presigned", 204 if path else 404, b"", {})

        def answer(self, method, status, data, headers):
            warehouse.requests.append((method, status))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def thrift_method(body):
    """The method name in a binary-protocol message header."""
    size = int.from_bytes(body[4:8], "big")
    return body[8:8 + size].decode("utf-8", "replace")
