"""An S3-compatible server on loopback for the object-store tests, and a store that
ignores conditional writes.

    python -m tests.object_store proxy PORT UPSTREAM_PORT

runs a forwarding proxy on PORT that drops the If-None-Match header of every request
to the S3 server on UPSTREAM_PORT: the store of issue 14 that accepts a conditional
write and overwrites anyway. The server (moto's, `uv run --with 'moto[server]'`) runs
in its own process: deltalake holds the GIL in some calls, which starves a server
thread in the test process.
"""

import http.client
import http.server
import os
import socket
import subprocess
import sys
import time

BUCKET = "fleet-bucket"
DROPPED = {"if-none-match"}


def free_port():
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port, proc, timeout=30):
    """Return once something accepts connections on `port`; fail if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class S3Server:
    """moto's S3 server in a child process, with one bucket; optionally a proxy in
    front of it that drops If-None-Match (`enforcing=False`)."""

    def __init__(self, enforcing=True):
        self.enforcing = enforcing
        self.procs = []

    def start(self):
        self.moto_port = free_port()
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                     "-p", str(self.moto_port)], self.moto_port)
        self.port = self.moto_port
        if not self.enforcing:
            self.port = free_port()
            self._spawn([sys.executable, "-m", "tests.object_store", "proxy",
                         str(self.port), str(self.moto_port)], self.port)
        self.request("PUT", f"/{BUCKET}")
        return self

    def _spawn(self, argv, port):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_listening(port, proc)

    def stop(self):
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(timeout=30)
        self.procs = []

    def request(self, method, path, body=b"", headers=None):
        """One plain request to the server (moto does not check signatures)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def env(self):
        """The environment a node needs to write s3://fleet-bucket/... here."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test-key",
                "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1"}

    def keys(self, prefix=""):
        """Every object key under `prefix`, sorted."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix=""):
        """{key: size} of every object under `prefix` (ListObjectsV2, all pages)."""
        import re
        import urllib.parse
        sizes, token = {}, None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            _, body = self.request("GET", f"/{BUCKET}?{urllib.parse.urlencode(query)}")
            text = body.decode()
            for entry in re.findall(r"<Contents>(.*?)</Contents>", text, re.S):
                key = re.search(r"<Key>([^<]*)</Key>", entry).group(1)
                sizes[key] = int(re.search(r"<Size>(\d+)</Size>", entry).group(1))
            found = re.search(r"<NextContinuationToken>([^<]*)<", text)
            if not found:
                return sizes
            token = found.group(1)


class DroppingProxy(http.server.BaseHTTPRequestHandler):
    """Forward each request upstream without its If-None-Match header."""

    protocol_version = "HTTP/1.1"
    upstream = None

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in DROPPED}
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    def log_message(self, *args):
        pass


def main(argv):
    if argv[:1] != ["proxy"]:
        raise SystemExit(__doc__)
    DroppingProxy.upstream = int(argv[2])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(argv[1])), DroppingProxy)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
