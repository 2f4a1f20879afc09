"""A fake API server on loopback for the client contract tests (KFP, Kubernetes): the real client
libraries serialise and send every request over HTTP, and the test's handler answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], **attributes) -> Iterator[str]:
    """Serve ``handler`` (a subclass with ``attributes`` set on it) on a free loopback port; yields the URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,), attributes))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
