"""The watcher's own HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and routes added to it.

HTTP/1.1 itself (framing, keep-alive, what a malformed request is) is h11's state machine;
this module only reads and writes bytes for it on asyncio streams, in the same event loop as
the poll loop, so a handler reads state without locks. What it adds is what a client may cost:
idle keep-alive connections close silently after `KEEPALIVE_TIMEOUT`, a request must arrive
whole within `REQUEST_TIMEOUT` of its first byte, a response write that makes no progress for
`WRITE_TIMEOUT` ends the connection, and at most `MAX_CONNECTIONS` are open at once.

Routes are GET (and HEAD) handlers in a table: `Server.route("/path", handler)`. Behind a proxy
that keeps a path prefix (`--web-external-url`), every route also answers under that prefix.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from watcher.logs import get_logger

# Longer than a 60 s scrape interval, so Prometheus's next scrape reuses the connection.
KEEPALIVE_TIMEOUT = 75.0
# From the first byte of a request to its last.
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 16 * 1024
MAX_REQUEST_BODY = 64 * 1024
READ_SIZE = 64 * 1024
# Bodies go out in pieces of this size, each written only once the last one has mostly left,
# so a client that does not read holds at most about two pieces of the watcher's memory.
WRITE_CHUNK = 64 * 1024
GZIP_MIN_SIZE = 1024
TEXT = "text/plain; charset=utf-8"

# A response body: one piece, or pieces sent one after the other (a scrape is never joined).
Body = bytes | Sequence[bytes]


class Endpoints(Protocol):
    """What the server asks of the watcher."""

    def render_metrics(self, accept: str) -> tuple[list[bytes], str]: ...

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query; also for absolute-form targets
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "

    def param(self, name: str) -> str | None:
        """The first value of query parameter `name`, if given."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Body
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


def text(status: int, message: str, **headers: str) -> Response:
    return Response(status, f"{message}\n".encode(), TEXT, headers)


class _Refused(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Server:
    def __init__(self, endpoints: Endpoints, *, prefix: str = "") -> None:
        self._endpoints = endpoints
        self._prefix = prefix  # "" or "/some/path", without a trailing slash
        self._routes: dict[str, Handler] = {}
        self.route("/metrics", self._metrics)
        self.route("/healthz", lambda _request: _probe(endpoints.health()))
        self.route("/readyz", lambda _request: _probe(endpoints.readiness()))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def route(self, path: str, handler: Handler) -> None:
        """Answer GET and HEAD of `path` with `handler`.

        A path ending in `/` (other than `/` itself) also answers every path below it, unless a
        longer route matches: `route("/api/v1/runs/", h)` serves `/api/v1/runs/abc`.
        """
        self._routes[path] = handler

    def _handler(self, path: str) -> Handler | None:
        found = self._routes.get(path)
        if found is not None:
            return found
        prefixes = [p for p in self._routes if p != "/" and p.endswith("/") and path.startswith(p)]
        return self._routes[max(prefixes, key=len)] if prefixes else None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE)

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

    # --- answers --------------------------------------------------------------------------

    def _metrics(self, request: Request) -> Response:
        parts, content_type = self._endpoints.render_metrics(request.headers.get("accept", ""))
        headers = {"Vary": "Accept, Accept-Encoding"}
        if _accepts_gzip(request.headers.get("accept-encoding", "")) and (
            _length(parts) > GZIP_MIN_SIZE
        ):
            return Response(
                200, _gzipped(parts), content_type, headers | {"Content-Encoding": "gzip"}
            )
        return Response(200, parts, content_type, headers)

    def _answer(self, request: Request) -> Response:
        path = request.path
        if self._prefix and (path == self._prefix or path.startswith(self._prefix + "/")):
            request = replace(request, path=path.removeprefix(self._prefix) or "/")
        handler = self._handler(request.path)
        if handler is None:
            return text(404, "not found; try /metrics")
        if request.method not in ("GET", "HEAD"):
            return text(405, "only GET and HEAD", Allow="GET, HEAD")
        try:
            return handler(request)
        except Exception:
            get_logger().exception("endpoint_failed", path=request.path)
            return text(500, "internal error; see the watcher's log")

    # --- one connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            while True:
                try:
                    request = await _read_request(conn, reader)
                except _Refused as refused:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _send(conn, writer, text(refused.status, str(refused)), close=True)
                    return
                if request is None:
                    return
                await _send(conn, writer, self._answer(request), head=request.method == "HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError):
            return
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
    """The next request, read whole; None when the client closes or an idle connection expires."""
    request: h11.Request | None = None
    body = 0
    started = bool(conn.trailing_data[0])  # a pipelined request already (partly) read
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT if started else KEEPALIVE_TIMEOUT) as deadline:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(READ_SIZE)
                    if data and not started:
                        started = True
                        deadline.reschedule(asyncio.get_running_loop().time() + REQUEST_TIMEOUT)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > MAX_REQUEST_BODY:
                        raise _Refused(413, "request body too large")
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    return _request(request)
                else:  # ConnectionClosed: the client is gone, between requests or within one
                    return None
    except h11.RemoteProtocolError as exc:
        if reader.at_eof():
            return None  # the client left in the middle of a request: nobody to answer
        raise _Refused(exc.error_status_hint, f"bad request: {exc}") from None
    except TimeoutError:
        if started:
            raise _Refused(408, "request not received in time") from None
        return None  # an idle keep-alive connection: closed without a word


def _request(event: h11.Request) -> Request:
    if not event.http_version.startswith(b"1."):
        raise _Refused(505, "only HTTP/1.x")
    target = urlsplit(event.target.decode("ascii", "replace"))
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii")
        decoded = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {decoded}" if key in headers else decoded
    return Request(
        method=event.method.decode("ascii"),
        path=unquote(target.path) or "/",
        query=parse_qs(target.query),
        headers=headers,
    )


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: Response,
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    parts = [response.body] if isinstance(response.body, bytes) else response.body
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(_length(parts)),
        "Cache-Control": "no-store",
        **response.headers,
    }
    if close:
        headers["Connection"] = "close"
    writer.write(
        conn.send(
            h11.Response(
                status_code=response.status,
                headers=list(headers.items()),
                reason=HTTPStatus(response.status).phrase,
            )
        )
    )
    if not head:
        for piece in _pieces(parts):
            writer.write(conn.send(h11.Data(data=piece)))
            await writer.drain()
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


def _probe(state: tuple[bool, str]) -> Response:
    ok, message = state
    return text(200 if ok else 503, message)


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _length(parts: Iterable[bytes]) -> int:
    return sum(len(part) for part in parts)


def _pieces(parts: Iterable[bytes]) -> Iterator[bytes]:
    """The parts as pieces of about WRITE_CHUNK bytes: small ones joined, large ones cut."""
    batch: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) > WRITE_CHUNK:
            if batch:
                yield b"".join(batch)
                batch, size = [], 0
            for start in range(0, len(part), WRITE_CHUNK):
                yield part[start : start + WRITE_CHUNK]
            continue
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
