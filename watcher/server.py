"""The watcher's own HTTP endpoints: `/metrics`, `/healthz`, `/readyz` and a landing page.

A small HTTP/1.1 server on asyncio streams, in the same event loop as the poll loop, so a
scrape reads state without locks. It answers GET and HEAD, keeps connections alive as
Prometheus expects, gzips `/metrics` when asked and turns every malformed request into a
4xx answer rather than an exception.
"""

from __future__ import annotations

import asyncio
import html
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from watcher import __version__

HEADER_TIMEOUT = 10.0
MAX_LINE = 8 * 1024
MAX_HEADERS = 100
WRITE_CHUNK = 1024 * 1024
# A response body: one piece, or pieces sent one after the other (a scrape is never joined).
Body = bytes | list[bytes]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Endpoints(Protocol):
    """What the server asks of the watcher."""

    def render_metrics(self, accept: str) -> tuple[list[bytes], str]: ...

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def landing_page(links: dict[str, str]) -> bytes:
    items = "".join(
        f'<li><a href="{html.escape(path)}">{html.escape(path)}</a>: {html.escape(text)}</li>'
        for path, text in links.items()
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>loops-watcher</title></head>"
        f"<body><h1>loops-watcher {html.escape(__version__)}</h1>"
        "<p>Watches Baseten Loops runs and exports their sampler status to Prometheus.</p>"
        f"<ul>{items}</ul></body></html>\n"
    ).encode()


LINKS = {
    "/metrics": "Prometheus metrics",
    "/healthz": "liveness: the poll loop is making progress",
    "/readyz": "readiness: configuration loaded and the first poll round attempted",
}


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None  # the client closed an idle keep-alive connection
    if not line.endswith(b"\n"):
        raise BadRequest(400, "incomplete request line")
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n"):
            return Request(method, target.split("?", 1)[0], version, headers)
        if not raw.endswith(b"\n"):
            raise BadRequest(400, "incomplete header")
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise BadRequest(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    raise BadRequest(431, "too many headers")


class Server:
    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._routes: dict[str, Callable[[Request], tuple[int, Body, str, dict[str, str]]]] = {
            "/metrics": self._metrics,
            "/healthz": lambda _req: self._probe(self._endpoints.health()),
            "/readyz": lambda _req: self._probe(self._endpoints.readiness()),
            "/": lambda _req: (200, landing_page(LINKS), "text/html; charset=utf-8", {}),
        }
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Idle keep-alive connections would otherwise hold wait_closed() open.
            for writer in list(self._writers):
                writer.close()
            # Let each handler see its connection close and return: one still pending when the
            # loop shuts down is cancelled, and Python 3.11 prints a traceback on stderr for it.
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
            await self._server.wait_closed()

    def _metrics(self, request: Request) -> tuple[int, Body, str, dict[str, str]]:
        parts, content_type = self._endpoints.render_metrics(request.headers.get("accept", ""))
        extra: dict[str, str] = {}
        if "gzip" in request.headers.get("accept-encoding", "") and _length(parts) > 1024:
            parts = _gzipped(parts)
            extra["Content-Encoding"] = "gzip"
        return 200, parts, content_type, extra

    @staticmethod
    def _probe(state: tuple[bool, str]) -> tuple[int, bytes, str, dict[str, str]]:
        ok, message = state
        return (200 if ok else 503), f"{message}\n".encode(), "text/plain; charset=utf-8", {}

    def _answer(self, request: Request) -> tuple[int, Body, str, dict[str, str]]:
        route = self._routes.get(request.path)
        if route is None:
            return 404, b"not found; try /metrics\n", "text/plain; charset=utf-8", {}
        if request.method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"}
        return route(request)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(HEADER_TIMEOUT):
                        request = await _read_request(reader)
                except BadRequest as exc:
                    await _respond(writer, exc.status, f"{exc}\n".encode(), close=True)
                    return
                except (TimeoutError, ValueError):  # ValueError: line over the stream limit
                    await _respond(writer, 400, b"bad or slow request\n", close=True)
                    return
                if request is None:
                    return
                status, body, content_type, extra = self._answer(request)
                # Request bodies are never read: closing keeps one from being parsed as the
                # next request on a kept-alive connection.
                keep_alive = (
                    request.version == "HTTP/1.1"
                    and request.headers.get("connection", "").lower() != "close"
                    and request.headers.get("content-length", "0") == "0"
                    and "transfer-encoding" not in request.headers
                )
                await _respond(
                    writer,
                    status,
                    body,
                    content_type=content_type,
                    extra=extra,
                    close=not keep_alive,
                    head=request.method == "HEAD",
                )
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()


def _length(parts: Iterable[bytes]) -> int:
    return sum(len(part) for part in parts)


def _pieces(parts: Iterable[bytes]) -> Iterator[bytes]:
    """Consecutive parts joined into pieces of about WRITE_CHUNK bytes."""
    batch: list[bytes] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= WRITE_CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def _gzipped(parts: Iterable[bytes]) -> list[bytes]:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    compressed = [compressor.compress(piece) for piece in _pieces(parts)]
    compressed.append(compressor.flush())
    return compressed


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: Body,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: dict[str, str] | None = None,
    close: bool,
    head: bool = False,
) -> None:
    parts = [body] if isinstance(body, bytes) else body
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(_length(parts)),
        "Cache-Control": "no-store",
        **(extra or {}),
    }
    if close:
        headers["Connection"] = "close"
    head_text = f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    writer.write(head_text.encode("latin-1") + b"\r\n")
    # A scrape goes out a piece at a time, never joined whole: asyncio (before 3.12) also
    # copies whatever the socket does not take at once, so that copy stays small too.
    for piece in _pieces([] if head else parts):
        writer.write(piece)
        await writer.drain()
    await writer.drain()
