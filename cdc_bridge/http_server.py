"""The observability port: ``/metrics``, ``/livez`` and ``/readyz`` over plain HTTP.

A tiny asyncio server (one request per connection, HTTP/1.0-style answers with
``Connection: close``) so that no web framework is needed. It runs on the bridge's
event loop, so ``/livez`` answering proves that loop is alive; it never asks
PostgreSQL or NATS. ``/readyz`` asks a callback whether the bridge is ready and for one
line saying so or why not. ``/metrics`` renders the injected registry in a worker thread,
because a collector may query PostgreSQL (the slot gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

#: Seconds a client may take to send its request line and headers.
REQUEST_TIMEOUT = 10.0
MAX_HEADER_LINES = 100

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


class HttpServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, str]],
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the chosen one when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await reader.readline()
                    for _ in range(MAX_HEADER_LINES):
                        line = await reader.readline()
                        if line in (b"\r\n", b"\n", b""):
                            break
            except (TimeoutError, ValueError):  # ValueError: a line over the stream limit
                return
            status, content_type, body = await self._respond(request)
            head = (
                f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("HTTP request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, request: bytes) -> tuple[int, str, bytes]:
        parts = request.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, _TEXT, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return 404, _TEXT, b"not found\n"
        if target == "/livez":
            return 200, _TEXT, b"ok\n"
        if target == "/readyz":
            ready, text = self._readiness()
            return (200 if ready else 503), _TEXT, (text.replace("\n", " ") + "\n").encode()
        if target == "/metrics":
            body = await asyncio.to_thread(generate_latest, self._registry)
            return 200, CONTENT_TYPE_LATEST, body
        return 404, _TEXT, b"not found\n"
