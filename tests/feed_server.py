"""A local HTTP server for blocklist feeds in tests: path -> (status, body), changeable
while it runs (a feed that drops an address, one that starts failing), on a loopback
socket of the test's choosing (one made inside a network namespace, too)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from typing import Any


class FeedServer:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.hits: dict[str, int] = {}
        pages, hits = self.pages, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                status, body = pages.get(self.path, (404, b"not found\n"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        if sock is None:
            self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        else:
            sock.bind(("127.0.0.1", 0))
            self.http = http.server.ThreadingHTTPServer(
                sock.getsockname(), Handler, bind_and_activate=False
            )
            self.http.socket.close()
            self.http.socket = sock
            self.http.server_activate()
        self.port = self.http.server_address[1]
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def text(self, path: str, lines: list[str], status: int = 200) -> None:
        self.pages[path] = (status, ("\n".join(lines) + "\n").encode())

    def apiban(self, path: str, pages: list[list[str]]) -> None:
        """APIBan's paging: `path` gives the first page and an ID, `path/ID` the next,
        and after the last one the API answers 400 with "no new bans"."""
        for n, addresses in enumerate(pages):
            here = path if n == 0 else f"{path}/{1000 + n - 1}"
            body = {"ipaddress": addresses, "ID": str(1000 + n)}
            self.pages[here] = (200, json.dumps(body).encode())
        end = {"ipaddress": ["no new bans"], "ID": "none"}
        self.pages[f"{path}/{1000 + len(pages) - 1}"] = (400, json.dumps(end).encode())

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
