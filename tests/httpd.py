"""A small HTTP(S) server on 127.0.0.1 for tests that need a remote end (a channel, a
popularity file, a TLS peer): `answer(path)` says what each GET gets, and every path
asked for is kept in `requests`."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: What a GET of a path gets: status, headers and body (None: 404).
Answer = Callable[[str], "tuple[int, Mapping[str, str], bytes] | None"]


class LocalHTTP:
    def __init__(self, answer: Answer, *, tls: ssl.SSLContext | None = None):
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                answered = answer(self.path)
                if answered is None:
                    self.send_error(404)
                    return
                status, headers, body = answered
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
