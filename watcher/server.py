"""The watcher's own HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and routes added to it.

HTTP/1.1 itself (framing, keep-alive, what a malformed request is) is h11's state machine;
this module only reads and writes bytes for it on asyncio streams, in the same event loop as
the poll loop, so a handler reads state without locks. What it adds is what a client may cost:
idle keep-alive connections close silently after `KEEPALIVE_TIMEOUT`, a request must arrive
whole within `REQUEST_TIMEOUT` of its first byte, a response goes out a piece at a time and a
write that makes no progress for `WRITE_TIMEOUT` ends the connection, at most
`MAX_CONNECTIONS` are open at once, and concurrent scrapes share one rendering of `/metrics`.

Routes are GET (and HEAD) handlers in a table: `Server.route("/path", handler)`. Behind a proxy
that keeps a path prefix (`--web-external-url`), every route also answers under that prefix.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import resource
import socket
import time
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from prometheus_client.exposition import choose_encoder

from watcher.logs import get_logger

# Longer than a 60 s scrape interval, so Prometheus's next scrape reuses the connection.
KEEPALIVE_TIMEOUT = 75.0
# From the first byte of a request to its last.
REQUEST_TIMEOUT = 10.0
# A response write that makes no progress this long ends the connection.
WRITE_TIMEOUT = 30.0
# Open connections at most (or half the file-descriptor limit, if that is lower).
MAX_CONNECTIONS = 512
# A rendered /metrics body serves new scrapes for SHARE_FACTOR times as long as it took to make.
SHARE_FACTOR = 2.0
SHARE_MIN = 0.1
MAX_REQUEST_HEAD = 16 * 1024
MAX_REQUEST_BODY = 64 * 1024
READ_SIZE = 64 * 1024
# Bodies go out in pieces of this size, each written only once the last one has mostly left,
# so a client that does not read holds at most about two pieces of the watcher's memory.
WRITE_CHUNK = 64 * 1024
SEND_BUFFER = 1024 * 1024  # the kernel's, per connection (it doubles it for its bookkeeping)
# A connection sending a big body, or a scrape being compressed, lets others run this often.
TURN = 4 * 1024 * 1024
GZIP_MIN_SIZE = 1024
TEXT = "text/plain; charset=utf-8"
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"  # asyncio's words

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
# One whose body takes a while to make (`/metrics`), letting the event loop run meanwhile.
AsyncHandler = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str, **headers: str) -> Response:
    return Response(status, f"{message}\n".encode(), TEXT, headers)


class _Refused(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class _Shared:
    body: asyncio.Task[Response]
    until: float = math.inf  # monotonic time up to which a new scrape is given this body


LoopErrorHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class Server:
    def __init__(self, endpoints: Endpoints, *, prefix: str = "") -> None:
        self._endpoints = endpoints
        self._prefix = prefix  # "" or "/some/path", without a trailing slash
        self._routes: dict[str, Handler | AsyncHandler] = {}
        self.route("/metrics", self._metrics)
        self.route("/healthz", lambda _request: _probe(endpoints.health()))
        self.route("/readyz", lambda _request: _probe(endpoints.readiness()))
        self._max_connections = MAX_CONNECTIONS
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        # The connections waiting for a request not yet begun, the longest waiting first.
        self._idle: dict[_Connection, None] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._shared: dict[tuple[str, bool], _Shared] = {}
        self._at_limit = False
        self._accept_failing = False
        self._previous_handler: LoopErrorHandler | None = None

    def route(self, path: str, handler: Handler | AsyncHandler) -> None:
        """Answer GET and HEAD of `path` with `handler`.

        A path ending in `/` (other than `/` itself) also answers every path below it, unless a
        longer route matches: `route("/api/v1/runs/", h)` serves `/api/v1/runs/abc`.
        """
        self._routes[path] = handler

    def _handler(self, path: str) -> Handler | AsyncHandler | None:
        found = self._routes.get(path)
        if found is not None:
            return found
        prefixes = [p for p in self._routes if p != "/" and p.endswith("/") and path.startswith(p)]
        return self._routes[max(prefixes, key=len)] if prefixes else None

    async def start(self, host: str, port: int) -> None:
        # Half the descriptors stay for polling, the state file and the probes' own sockets.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            self._max_connections = max(1, min(self._max_connections, soft // 2))
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
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
            for connection in list(self._connections):
                connection.writer.close()
            # Let each handler see its connection close and return: one still pending when the
            # loop shuts down is cancelled, and Python 3.11 prints a traceback on stderr for it.
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
            for connection in list(self._connections):
                connection.writer.transport.abort()  # still sending to a client that does not read
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
            await self._server.wait_closed()
            asyncio.get_running_loop().set_exception_handler(self._previous_handler)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio reports a failed accept (out of file descriptors, say) with a traceback once
        # a second while it lasts, and retries by itself: one line for the episode is enough.
        if context.get("message") != ACCEPT_OUT_OF_RESOURCES:
            if self._previous_handler is not None:
                self._previous_handler(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        if not self._accept_failing:
            self._accept_failing = True
            get_logger().error(
                "accept_failed",
                error=str(context.get("exception")),
                open_connections=len(self._connections),
                note="new connections wait in the backlog; accepting resumes once it can",
            )

    # --- answers --------------------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        """One rendering, gzipped or not, serves every scrape that starts while it is made or
        soon after.

        A body is shared for twice as long as it took to make, so however many scrapes come
        in, rendering takes at most about a third of the loop's time, and concurrent scrapes
        hold one body between them instead of one each.
        """
        accept = request.headers.get("accept", "")
        compress = _accepts_gzip(request.headers.get("accept-encoding", ""))
        key = (choose_encoder(accept)[1], compress)
        now = time.monotonic()
        for stale in [k for k, shared in self._shared.items() if shared.until <= now]:
            del self._shared[stale]  # nobody new gets it: let it go with its last reader
        if key not in self._shared:
            self._shared[key] = _Shared(asyncio.create_task(self._render(key, accept, compress)))
        # Shielded: a scrape whose client leaves does not cancel the others' body.
        return await asyncio.shield(self._shared[key].body)

    async def _render(self, key: tuple[str, bool], accept: str, compress: bool) -> Response:
        began = time.monotonic()
        try:
            parts, content_type = self._endpoints.render_metrics(accept)
            headers = {"Vary": "Accept, Accept-Encoding"}
            if compress and _length(parts) > GZIP_MIN_SIZE:
                parts = await _gzipped(parts)
                headers["Content-Encoding"] = "gzip"
            # Counted once here rather than for each of the scrapes sharing it.
            headers["Content-Length"] = str(_length(parts))
            return Response(200, parts, content_type, headers)
        finally:
            ended = time.monotonic()
            self._shared[key].until = ended + max(SHARE_MIN, SHARE_FACTOR * (ended - began))

    async def answer(self, request: Request) -> Response:
        path = request.path
        if self._prefix and (path == self._prefix or path.startswith(self._prefix + "/")):
            request = replace(request, path=path.removeprefix(self._prefix) or "/")
        handler = self._handler(request.path)
        if handler is None:
            return text(404, "not found; try /metrics")
        if request.method not in ("GET", "HEAD"):
            return text(405, "only GET and HEAD", Allow="GET, HEAD")
        try:
            answer = handler(request)
            return await answer if inspect.isawaitable(answer) else answer
        except Exception:
            get_logger().exception("endpoint_failed", path=request.path)
            return text(500, "internal error; see the watcher's log")

    # --- connections ----------------------------------------------------------------------

    def _admit(self, connection: _Connection) -> bool:
        """Make room for a new connection: the longest idle one gives way, else it is refused."""
        if self._accept_failing:
            self._accept_failing = False
            get_logger().info("accept_recovered", open_connections=len(self._connections))
        if len(self._connections) < self._max_connections // 2:
            self._at_limit = False
        if len(self._connections) >= self._max_connections:
            if not self._at_limit:
                self._at_limit = True
                get_logger().warning(
                    "connection_limit_reached",
                    limit=self._max_connections,
                    note="the longest idle connection is closed to make room; "
                    "with none idle, a new connection gets 503",
                )
            if not self._idle:
                return False
            oldest = next(iter(self._idle))  # idle the longest: they are kept in that order
            del self._idle[oldest]
            self._connections.discard(oldest)
            oldest.writer.close()
        self._connections.add(connection)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        connection = _Connection(reader, writer, self.answer, self._idle)
        # Left to itself the kernel lets a socket buffer 4 MB that a client never reads (memory
        # charged to the watcher's cgroup all the same); this is plenty for loopback and LANs.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            if self._admit(connection):
                await connection.serve()
            else:
                await connection.send(text(503, "too many connections"), close=True)
        except TimeoutError:
            writer.transport.abort()  # a write made no progress: drop what it could not send
        except ConnectionError:
            pass
        finally:
            self._connections.discard(connection)
            self._idle.pop(connection, None)
            self._handlers.discard(handler)
            await connection.close()


class _Connection:
    """One client connection: h11's state machine fed from the socket and written to it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer: Callable[[Request], Awaitable[Response]],
        idle: dict[_Connection, None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._answer = answer
        self._idle = idle  # the server's: this connection is in it while it waits for a request

    async def serve(self) -> None:
        conn = self.conn
        while True:
            try:
                request = await self._read_request()
            except _Refused as refused:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self.send(text(refused.status, str(refused)), close=True)
                return
            if request is None:
                return
            response = await self._answer(request)
            await self.send(response, head=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(self) -> Request | None:
        """The next request, read whole; None when the client closes or an idle one expires."""
        conn = self.conn
        request: h11.Request | None = None
        body = 0
        started = bool(conn.trailing_data[0])  # a pipelined request already (partly) read
        if not started:
            self._idle[self] = None
        try:
            timeout = REQUEST_TIMEOUT if started else KEEPALIVE_TIMEOUT
            async with asyncio.timeout(timeout) as deadline:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await self.reader.read(READ_SIZE)
                        if data and not started:
                            started = True
                            self._idle.pop(self, None)
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
            if self.reader.at_eof():
                return None  # the client left in the middle of a request: nobody to answer
            raise _Refused(exc.error_status_hint, f"bad request: {exc}") from None
        except TimeoutError:
            if started:
                raise _Refused(408, "request not received in time") from None
            return None  # an idle keep-alive connection: closed without a word
        finally:
            self._idle.pop(self, None)

    async def send(self, response: Response, *, head: bool = False, close: bool = False) -> None:
        parts = [response.body] if isinstance(response.body, bytes) else response.body
        headers = {
            "Content-Type": response.content_type,
            "Cache-Control": "no-store",
            **response.headers,
        }
        headers.setdefault("Content-Length", str(_length(parts)))
        if close:
            headers["Connection"] = "close"
        status = h11.Response(
            status_code=response.status,
            headers=list(headers.items()),
            reason=HTTPStatus(response.status).phrase,
        )
        self.writer.write(self.conn.send(status))
        if not head:
            # A fast reader never makes drain() wait: taking turns lets the other connections
            # and the probes in all the same.
            async for piece in _taking_turns(_pieces(parts)):
                self.writer.write(self.conn.send(h11.Data(data=piece)))
                await self._drain()
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self._drain()

    async def _drain(self) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    async def close(self) -> None:
        """Close once what was written has gone out, or drop it after WRITE_TIMEOUT."""
        self.writer.close()
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except ConnectionError:
            pass


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


async def compressed(request: Request, response: Response) -> Response:
    """`response`, gzipped when the client accepts that and the body is worth it."""
    parts = [response.body] if isinstance(response.body, bytes) else response.body
    headers = {**response.headers, "Vary": "Accept-Encoding"}
    if not _accepts_gzip(request.headers.get("accept-encoding", "")) or (
        _length(parts) <= GZIP_MIN_SIZE
    ):
        return replace(response, headers=headers)
    headers["Content-Encoding"] = "gzip"
    return replace(response, body=await _gzipped(parts), headers=headers)


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


async def _taking_turns(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    """The pieces, letting the event loop run something else after every TURN bytes."""
    since = 0
    for piece in pieces:
        yield piece
        since += len(piece)
        if since >= TURN:
            since = 0
            await asyncio.sleep(0)


async def _gzipped(parts: Iterable[bytes]) -> list[bytes]:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    compressed = []
    async for piece in _taking_turns(_pieces(parts)):  # a big scrape takes a while to compress
        compressed.append(compressor.compress(piece))
    compressed.append(compressor.flush())
    return compressed
