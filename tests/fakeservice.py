"""A local HTTP service on 127.0.0.1 for tests of the code that talks to survey and catalogue services.

Routes map a path to a function of the parsed query that returns ``(status, content type, body)``;
``fail`` makes every answer an HTTP error, a hang (longer than the client's timeout) or an empty
body. Every request is counted per path, so that a test can check a rerun asks nothing.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[dict[str, str]], tuple[int, str, bytes]]


class FakeService:
    """A threaded HTTP server answering ``routes``; use as a context manager.

    Attributes
    ----------
    url : str
        Base URL (``http://127.0.0.1:<port>``).
    requests : collections.Counter
        Requests received per path.
    fail : str or None
        None (answer normally), ``'500'``, ``'hang'`` (sleep ``hang_s`` first) or ``'empty'``.
    """

    def __init__(self, routes: dict[str, Route], *, hang_s: float = 3.0):
        self.routes = routes
        self.requests: Counter[str] = Counter()
        self.fail: str | None = None
        self.hang_s = hang_s
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parsed = urllib.parse.urlsplit(self.path)
                service.requests[parsed.path] += 1
                query = dict(urllib.parse.parse_qsl(parsed.query))
                if service.fail == "hang":
                    time.sleep(service.hang_s)
                if service.fail == "500":
                    status, ctype, body = 500, "text/plain", b"internal error"
                elif parsed.path not in service.routes:
                    status, ctype, body = 404, "text/plain", b"not found"
                else:
                    status, ctype, body = service.routes[parsed.path](query)
                if service.fail == "empty":
                    body = b""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeService:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
