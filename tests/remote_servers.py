"""Servers for the remote tests and benchmark: moto's S3 API on localhost, a faulty HTTP proxy in front
of it, and an HTTP file server with range requests, both able to answer a fraction of requests with
503, cut bodies mid-way, or deny (403) chosen paths."""

from __future__ import annotations

import http.client
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Faults:
    """What the faulty server does to requests: every ``every_503``-th request is answered 503, every
    ``every_cut``-th GET has its body cut after half of it (0: never), paths containing one of
    ``deny`` get 403. Deterministic by request count, so every run meets the same faults."""

    every_503: int = 0
    every_cut: int = 0
    deny: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._n = self._gets = 0

    def draw(self, method: str, path: str) -> str:
        with self._lock:
            self._n += 1
            self._gets += method == "GET"
            if any(d in path for d in self.deny):
                kind = "403"
            elif self.every_503 and self._n % self.every_503 == 0:
                kind = "503"
            elif method == "GET" and self.every_cut and self._gets % self.every_cut == 0:
                kind = "cut"
            else:
                kind = "ok"
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultyServer

    def log_message(self, *args):  # quiet
        pass

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = self.server.faults.draw(self.command, self.path)
        if kind in ("403", "503"):
            code = int(kind)
            msg = b"<Error><Code>%s</Code></Error>" % (b"AccessDenied" if code == 403 else b"SlowDown")
            self.send_response(code)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg if self.command != "HEAD" else b"")
            return
        status, headers, data = self.server.backend(self.command, self.path, dict(self.headers), body)
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(headers_length(headers, data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "cut" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)
        self.server.faults.bytes_sent += len(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve


def headers_length(headers, data: bytes) -> int:
    for k, v in headers:
        if k.lower() == "content-length" and not data:
            return int(v)
    return len(data)


class _FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backend, faults: Faults):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.backend, self.faults = backend, faults

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> _FaultyServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def proxy_to(host: str, port: int, faults: Faults) -> _FaultyServer:
    """An HTTP proxy forwarding every request to ``host:port`` (moto), with ``faults`` injected."""

    def backend(method, path, headers, body):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        headers = {k: v for k, v in headers.items() if k.lower() != "host"}
        headers["Host"] = f"{host}:{port}"
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), data

    return _FaultyServer(backend, faults).start()


def file_server(root: str, faults: Faults) -> _FaultyServer:
    """Files under ``root`` over HTTP with HEAD and single ``Range: bytes=a-b`` requests."""

    def backend(method, path, headers, body):
        local = os.path.join(root, path.split("?")[0].lstrip("/"))
        if not os.path.isfile(local):
            return 404, [], b"not found"
        size = os.path.getsize(local)
        rng = headers.get("Range") or headers.get("range")
        if method == "HEAD":
            return 200, [("Content-Length", str(size)), ("Accept-Ranges", "bytes")], b""
        with open(local, "rb") as f:
            if rng:
                a, b = rng.split("=", 1)[1].split("-")
                a = int(a)
                b = min(int(b) if b else size - 1, size - 1)
                f.seek(a)
                data = f.read(b - a + 1)
                return 206, [("Content-Range", f"bytes {a}-{b}/{size}"), ("Accept-Ranges", "bytes")], data
            return 200, [("Accept-Ranges", "bytes")], f.read()

    return _FaultyServer(backend, faults).start()


class S3:
    """moto's S3 server on a free localhost port, optionally behind a faulty proxy."""

    def __init__(self):
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.host, self.port = self.moto.get_host_and_port()
        self.faults = Faults()
        self.proxy = proxy_to(self.host, self.port, self.faults)

    @property
    def endpoint(self) -> str:
        """The proxy's URL: what AWS_ENDPOINT_URL names (faults off unless set on ``faults``)."""
        return self.proxy.url

    def env(self) -> dict[str, str]:
        return {**DUMMY_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()
