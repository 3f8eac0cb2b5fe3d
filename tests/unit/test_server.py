"""The endpoints server: whole scrapes, keep-alive without surprises, malformed requests refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import re
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from structlog.testing import capture_logs

from watcher import server as server_module
from watcher.server import WRITE_CHUNK, Request, Response, Server

# Enough small parts to make several write pieces, as 10,000 runs do.
PARTS = [f'series{{run_id="r{n:06d}"}} {n}.0\n'.encode() for n in range(3 * WRITE_CHUNK // 25)]
GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n"


class Endpoints:
    def render_metrics(self, accept: str) -> tuple[list[bytes], str]:
        return PARTS, "text/plain; version=0.0.4; charset=utf-8"

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    served = Server(Endpoints())
    await served.start("127.0.0.1", 0)
    try:
        yield served
    finally:
        await served.close()


async def exchange(server: Server, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_scrape_of_many_parts_arrives_whole(server: Server, encoding: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with client.stream("GET", url, headers={"Accept-Encoding": encoding}) as reply:
            raw = b"".join([chunk async for chunk in reply.aiter_raw()])
        head = await client.head(url, headers={"Accept-Encoding": encoding})
    assert reply.headers.get("content-encoding", "identity") == encoding
    assert int(reply.headers["content-length"]) == len(raw)
    assert (gzip.decompress(raw) if encoding == "gzip" else raw) == b"".join(PARTS)
    assert head.headers["content-length"] == reply.headers["content-length"]
    assert head.content == b""


async def test_an_idle_keep_alive_connection_is_closed_without_a_word(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prometheus's client takes anything arriving on an idle connection as an unsolicited
    # response (and a racing scrape may take it as its answer): silence, then a close.
    monkeypatch.setattr(server_module, "KEEPALIVE_TIMEOUT", 0.5)
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(GET_HEALTHZ)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(3) == b"ok\n"
            assert await reader.read(-1) == b""  # closed, and nothing else was sent
    finally:
        writer.close()


async def test_a_request_that_stalls_halfway_gets_408(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.2)
    answer = await exchange(server, b"GET /healthz HTTP/1.1\r\nHo")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\nContent-Length: 30\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost : w\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1x\r\nHost: w\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: w\r\nX-Note: a\x00b\r\n\r\n",
        b"\x16\x03\x01 this is not HTTP\r\n\r\n",
    ],
    ids=["two-content-lengths", "space-before-colon", "no-host", "bad-version", "nul", "tls"],
)
async def test_a_malformed_request_gets_one_400_and_a_close(server: Server, head: bytes) -> None:
    # What follows could pass for a request of its own: it must never be answered.
    answer = await exchange(server, head + GET_HEALTHZ)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in answer.lower()


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    answer = await exchange(
        server,
        GET_HEALTHZ + b"GET /nope HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404"]


async def test_absolute_form_targets_and_query_strings_are_served(server: Server) -> None:
    seen: list[Request] = []

    def echo(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"{}", "application/json")

    server.route("/api/v1/runs/", echo)
    answer = await exchange(
        server,
        b"GET http://watcher:9877/healthz?verbose=1 HTTP/1.1\r\nHost: watcher\r\n\r\n"
        b"GET /api/v1/runs/abc%20d?limit=5&limit=6 HTTP/1.1\r\nHost: w\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert [(r.path, r.param("limit"), r.query["limit"]) for r in seen] == [
        ("/api/v1/runs/abc d", "5", ["5", "6"])
    ]


async def test_a_failing_handler_is_a_500_not_a_dropped_connection(server: Server) -> None:
    def broken(_request: Request) -> Response:
        raise RuntimeError("boom")

    server.route("/broken", broken)
    answer = await exchange(
        server,
        b"GET /broken HTTP/1.1\r\nHost: w\r\n\r\n"
        + GET_HEALTHZ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    )
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert b"HTTP/1.1 200 " in answer  # the connection carried on


async def test_routes_also_answer_under_the_external_path_prefix() -> None:
    served = Server(Endpoints(), prefix="/team/watcher")
    served.route("/", lambda request: Response(200, request.path.encode()))
    await served.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as client:
            assert (await client.get("/team/watcher/healthz")).text == "ok\n"
            assert (await client.get("/team/watcher")).text == "/"
            assert (await client.get("/team/watcher/")).text == "/"
            assert (await client.get("/healthz")).status_code == 200  # a proxy that strips it
            assert (await client.get("/team/watcherx/healthz")).status_code == 404
    finally:
        await served.close()


# --- what a client can cost -----------------------------------------------------------------

BIG = [b"x" * 99 + b"\n"] * 160_000  # 16 MB: far more than the socket buffers hold
GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: w\r\n\r\n"


class Counting(Endpoints):
    """Endpoints whose rendering takes `cost` seconds and is counted."""

    def __init__(self, parts: list[bytes], cost: float = 0.0) -> None:
        self.parts = parts
        self.cost = cost
        self.renders = 0

    def render_metrics(self, accept: str) -> tuple[list[bytes], str]:
        self.renders += 1
        time.sleep(self.cost)  # rendering runs on the event loop, as the watcher's does
        return self.parts, "text/plain; version=0.0.4; charset=utf-8"


@contextlib.asynccontextmanager
async def serving(endpoints: Endpoints) -> AsyncIterator[Server]:
    served = Server(endpoints)
    await served.start("127.0.0.1", 0)
    try:
        yield served
    finally:
        await served.close()


async def stalled_client(server: Server, request: bytes) -> socket.socket:
    """A connection that sends `request` and then does not read (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    await loop.sock_sendall(sock, request)
    return sock


async def read_all(sock: socket.socket) -> bytes:
    """Whatever arrives until the connection ends, by a close or a reset."""
    received = bytearray()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 2**20):
                received += chunk
    return bytes(received)


async def test_a_write_that_makes_no_progress_ends_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "WRITE_TIMEOUT", 0.5)
    async with serving(Counting(BIG)) as server:
        with await stalled_client(server, GET_METRICS) as stalled:
            await asyncio.sleep(2.0)
            received = await read_all(stalled)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(received) < sum(map(len, BIG)) // 2  # given up on, not waited for


async def test_concurrent_scrapes_share_one_rendering() -> None:
    endpoints = Counting(PARTS, cost=0.2)
    async with serving(endpoints) as server, httpx.AsyncClient(trust_env=False) as client:
        url = f"http://127.0.0.1:{server.port}/metrics"
        replies = await asyncio.gather(*(client.get(url) for _ in range(20)))
    assert all(reply.content == b"".join(PARTS) for reply in replies)
    assert endpoints.renders <= 2  # one, or two if the 20 straddle a rendering's sharing window


async def test_pipelined_gzip_scrapes_are_compressed_once() -> None:
    endpoints = Counting(PARTS, cost=0.2)
    request = b"GET /metrics HTTP/1.1\r\nHost: w\r\nAccept-Encoding: gzip\r\n\r\n"
    async with serving(endpoints) as server:
        answer = await exchange(
            server, request * 39 + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
    assert answer.count(b"HTTP/1.1 200 ") == 40
    assert endpoints.renders <= 2


async def test_at_the_connection_cap_the_longest_idle_connection_gives_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 4)
    async with serving(Counting(PARTS)) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        await asyncio.sleep(0.2)  # all four accepted, in this order
        with capture_logs() as logs:
            answer = await exchange(
                server, GET_HEALTHZ + GET_HEALTHZ.replace(b"w\r\n", b"w\r\nConnection: close\r\n")
            )
            async with asyncio.timeout(5):
                assert await idle[0][0].read(-1) == b""  # the oldest was closed, silently
        for _, writer in idle:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [log["event"] for log in logs] == ["connection_limit_reached"]


async def test_at_the_connection_cap_with_none_idle_a_new_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 4)
    async with serving(Counting(BIG)) as server:
        busy = [await stalled_client(server, GET_METRICS) for _ in range(4)]
        await asyncio.sleep(0.2)
        try:
            answer = await exchange(server, GET_HEALTHZ)
        except ConnectionError:
            answer = b""  # refused before the answer could be read: as good
        finally:
            for sock in busy:
                sock.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503 ")


async def test_running_out_of_descriptors_on_accept_is_one_log_line(server: Server) -> None:
    loop = asyncio.get_running_loop()
    failure = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(errno.EMFILE, "Too many open files"),
    }
    with capture_logs() as logs:
        for _ in range(3):  # asyncio retries once a second while it lasts
            loop.call_exception_handler(failure)
        await exchange(server, GET_HEALTHZ.replace(b"w\r\n", b"w\r\nConnection: close\r\n"))
    assert [(log["event"], log["log_level"]) for log in logs] == [
        ("accept_failed", "error"),
        ("accept_recovered", "info"),
    ]
    assert "Too many open files" in logs[0]["error"]
