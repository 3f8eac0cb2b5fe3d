"""The endpoints server: whole scrapes, keep-alive without surprises, malformed requests refused."""

from __future__ import annotations

import asyncio
import gzip
import re
from collections.abc import AsyncIterator

import httpx
import pytest

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
