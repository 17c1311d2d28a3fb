"""uvicorn's httptools protocol with the request-head bounds nginx and Envoy have by default.

uvicorn bounds connections (limit_concurrency) and idle keep-alive time, but not the request
head: a client could take forever to send its headers, or send a megabyte of them, holding a
connection and memory either way. This protocol adds, per request:
- a deadline for the head: it must be complete within `VAE_HEADER_TIMEOUT_S` of its first
  byte, else 408 and the connection is closed;
- a size limit: a head over `VAE_MAX_HEADER_BYTES` gets 431 and the connection is closed;
- an idle deadline for a new connection that sends nothing: the keep-alive timeout, as uvicorn
  already applies between requests.
Everything after the head (body size and time, in-flight limits) is app/middleware.py's.
vae-serve selects it (`http="app.server:GuardedHttpToolsProtocol"`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import get_settings

STATUS_LINES = {408: b"HTTP/1.1 408 Request Timeout\r\n", 431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n"}


class HeadRefused(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One sweep per connection set checks the heads' deadlines (every quarter of the timeout, at
    most a second): no timer per request, which under load costs more than the whole check."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s, self.max_header_bytes = settings.header_timeout_s, settings.max_header_bytes
        self.head_since: float | None = None  # loop time of the current head's first byte, while incomplete
        self.head_bytes = 0  # bytes received while the current head is incomplete
        self.chunk_bytes = 0
        self.refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        if not getattr(self.server_state, "head_sweep", False):
            self.server_state.head_sweep = True  # type: ignore[attr-defined]
            self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return min(1.0, self.header_timeout_s / 4)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            since = getattr(conn, "head_since", None)
            if since is not None and now - since > conn.header_timeout_s:
                conn._head_too_slow()
        if self.connections:
            self.loop.call_later(self._sweep_interval(), self._sweep)
        else:
            self.server_state.head_sweep = False  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head's size counted and its refusals answered."""
        self._unset_keepalive_if_required()
        self.chunk_bytes = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self.refusal is not None:
                self._refuse(*self.refusal)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.head_since is not None:  # the head is still arriving
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_bytes:
                self._refuse(431, "request header fields too large", self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        self.head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.head_since = None
        # Only when this chunk could hold a head over the limit is the head measured exactly.
        if self.head_bytes + self.chunk_bytes > self.max_header_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16
            if size > self.max_header_bytes:
                self.refusal = (431, "request header fields too large", self._too_large())
                raise HeadRefused  # stops the parser; data_received answers
        super().on_headers_complete()

    def _too_large(self) -> str:
        return f"the request head is over {self.max_header_bytes} bytes (VAE_MAX_HEADER_BYTES)"

    def _head_too_slow(self) -> None:
        self._refuse(408, "request timeout", f"the request head did not arrive within {self.header_timeout_s:g} s "
                     "(VAE_HEADER_TIMEOUT_S)")

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """A JSON error, as the app's, then close: what is left of this request is never read."""
        self.head_since = None
        if self.transport.is_closing():
            return
        body = json.dumps({"error": error, "detail": detail}).encode()
        self.transport.write(b"".join([STATUS_LINES[status], b"content-type: application/json\r\n",
                                       b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()
