"""A fault-injecting HTTP proxy on loopback, put in front of the S3 endpoint: a seeded share of requests gets
a 503 SlowDown, a 500 InternalError, a reset connection or a slow answer; the rest are passed on untouched."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slow_down", "internal_error", "reset", "slow")
_ERRORS = {"slow_down": (503, "SlowDown", "Please reduce your request rate."),
           "internal_error": (500, "InternalError", "We encountered an internal error. Please try again.")}


class FaultyProxy:
    """`endpoint` is the proxy's URL. `rate` of the requests fail, each with a kind drawn from `kinds`;
    `injected` counts them by kind, `passed` the requests forwarded and `requests` lists them."""

    def __init__(self, target: str, rate: float, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 slow_s: float = 0.3):
        self.rate, self.kinds, self.slow_s = rate, kinds, slow_s
        self.injected: Counter = Counter()
        self.passed = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request passed on
        self._random, self._lock = random.Random(seed), threading.Lock()
        target_host = urlparse(target).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def _handle(self):
                body = self._body()
                fault = proxy._draw()
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                upstream = http.client.HTTPConnection(target_host, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("transfer-encoding", "expect", "content-length")}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer has no body but tells the object's size.
                self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                with proxy._lock:
                    proxy.passed += 1
                    proxy.requests.append((self.command, self.path))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hung up on a reset or slow answer

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _draw(self) -> str | None:
        with self._lock:
            if self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self.injected[kind] += 1
            return kind

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
