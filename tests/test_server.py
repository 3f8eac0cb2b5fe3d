"""The endpoints server sends a scrape made of many parts whole, plain or gzipped."""

from __future__ import annotations

import gzip

import httpx
import pytest

from watcher.server import WRITE_CHUNK, Server

# Enough small parts to make several write pieces, as 10,000 runs do.
PARTS = [f'series{{run_id="r{n:06d}"}} {n}.0\n'.encode() for n in range(3 * WRITE_CHUNK // 25)]


class Endpoints:
    def render_metrics(self, accept: str) -> tuple[list[bytes], str]:
        return PARTS, "text/plain; version=0.0.4; charset=utf-8"

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_scrape_of_many_parts_arrives_whole(encoding: str) -> None:
    server = Server(Endpoints())
    await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            url = f"http://127.0.0.1:{server.port}/metrics"
            async with client.stream("GET", url, headers={"Accept-Encoding": encoding}) as reply:
                raw = b"".join([chunk async for chunk in reply.aiter_raw()])
            head = await client.head(url, headers={"Accept-Encoding": encoding})
    finally:
        await server.close()
    assert reply.headers.get("content-encoding", "identity") == encoding
    assert int(reply.headers["content-length"]) == len(raw)
    assert (gzip.decompress(raw) if encoding == "gzip" else raw) == b"".join(PARTS)
    assert head.headers["content-length"] == reply.headers["content-length"]
    assert head.content == b""
