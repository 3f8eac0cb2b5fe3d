"""The API client: every outcome maps to one result; retries only where they should happen."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from support import FAKE_KEY
from support.factories import mutate, run_json

from watcher.api import (
    RETRY_AFTER_CAP,
    RUN_BODY_CAP,
    ConnectionStack,
    LoopsClient,
    RateLimiter,
    parse_retry_after,
)
from watcher.model import RETRIED_RESULTS, Failed, Fetched, Result


def run_body(run_id: str = "k4q95w5", status: str = "ACTIVE") -> dict[str, Any]:
    return {"run": run_json(run_id, status)}


class Recorder:
    def __init__(self) -> None:
        self.codes: list[str] = []
        self.retries: list[tuple[Result, int, float]] = []

    def attempt_finished(self, code: str, seconds: float) -> None:
        assert seconds >= 0
        self.codes.append(code)

    def retrying(self, result: Result, detail: str, attempt: int, delay: float) -> None:
        self.retries.append((result, attempt, delay))


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


Handler = Callable[[httpx.Request], httpx.Response]


def make_client(
    handler: Handler | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    api_url: str = "http://loops.test",
    **options: Any,
) -> tuple[LoopsClient, Recorder, Sleeps]:
    recorder, sleeps = Recorder(), Sleeps()
    settings: dict[str, Any] = {
        "auth_scheme": "bearer",
        "request_timeout": 2.0,
        "max_retries": 3,
        "max_concurrency": 4,
        "max_requests_per_second": 10_000.0,
    }
    settings.update(options)
    if handler is not None:  # otherwise `transport`, or with neither the real stack
        transport = httpx.MockTransport(handler)
    client = LoopsClient(
        api_url=api_url,
        api_key=FAKE_KEY,
        observer=recorder,
        transport=transport,
        sleep=sleeps,
        **settings,
    )
    return client, recorder, sleeps


def sequence(*responses: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses[min(len(seen), len(responses)) - 1]
        if isinstance(item, Exception):
            raise item
        return item

    return handler, seen


async def test_ok_sends_auth_and_parses_the_run() -> None:
    handler, seen = sequence(httpx.Response(200, json=run_body()))
    client, recorder, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert outcome.value.sampler is not None
    assert outcome.value.sampler.status == "ACTIVE"
    assert outcome.attempts == 1
    assert seen[0].url.path == "/v1/loops/runs/k4q95w5"
    assert seen[0].headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert seen[0].headers["user-agent"].startswith("loops-watcher/")
    assert recorder.codes == ["200"]


async def test_api_key_scheme() -> None:
    handler, seen = sequence(httpx.Response(200, json=run_body()))
    client, _, _ = make_client(handler, auth_scheme="api-key")
    await client.get_run("k4q95w5")
    assert seen[0].headers["authorization"] == f"Api-Key {FAKE_KEY}"


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (401, Result.UNAUTHORIZED),
        (403, Result.FORBIDDEN),
        (404, Result.NOT_FOUND),
        (400, Result.INVALID_RESPONSE),
        (501, Result.SERVER_ERROR),
    ],
)
async def test_final_statuses_are_not_retried(status: int, result: Result) -> None:
    handler, seen = sequence(httpx.Response(status, json={"error": "nope"}))
    client, recorder, sleeps = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is result
    assert outcome.attempts == 1
    assert isinstance(outcome, Failed)
    assert len(seen) == 1
    assert recorder.retries == []
    assert sleeps.calls == []
    assert "nope" in outcome.detail


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_transient_statuses_are_retried_then_succeed(status: int) -> None:
    handler, seen = sequence(
        httpx.Response(status), httpx.Response(status), httpx.Response(200, json=run_body())
    )
    client, recorder, sleeps = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.OK
    assert outcome.attempts == 3
    assert len(seen) == 3
    expected = Result.RATE_LIMITED if status == 429 else Result.SERVER_ERROR
    assert [(reason, attempt) for reason, attempt, _ in recorder.retries] == [
        (expected, 1),
        (expected, 2),
    ]
    assert expected in RETRIED_RESULTS, "its retry counter is not exported from the start"
    assert recorder.codes == [str(status), str(status), "200"]
    assert len(sleeps.calls) == 2
    assert all(0 < delay <= 8.5 for delay in sleeps.calls)


async def test_retries_stop_at_max_retries() -> None:
    handler, seen = sequence(httpx.Response(503, json={"message": "maintenance"}))
    client, recorder, _ = make_client(handler, max_retries=2)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.SERVER_ERROR
    assert outcome.attempts == 3
    assert isinstance(outcome, Failed)
    assert len(seen) == 3
    assert len(recorder.retries) == 2
    assert "maintenance" in outcome.detail


async def test_zero_retries() -> None:
    handler, seen = sequence(httpx.Response(503))
    client, _, _ = make_client(handler, max_retries=0)
    assert (await client.get_run("k4q95w5")).attempts == 1
    assert len(seen) == 1


async def test_retry_after_seconds_is_honoured() -> None:
    handler, _ = sequence(
        httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200, json=run_body())
    )
    client, _, sleeps = make_client(handler)
    assert (await client.get_run("k4q95w5")).result is Result.OK
    assert sleeps.calls == [7.0]


async def test_retry_after_is_capped() -> None:
    handler, _ = sequence(
        httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200, json=run_body())
    )
    client, _, sleeps = make_client(handler)
    await client.get_run("k4q95w5")
    assert sleeps.calls == [RETRY_AFTER_CAP]


async def test_retry_after_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    handler, _ = sequence(
        httpx.Response(429, headers={"Retry-After": when}), httpx.Response(200, json=run_body())
    )
    client, _, sleeps = make_client(handler)
    await client.get_run("k4q95w5")
    assert 17 <= sleeps.calls[0] <= 20


async def test_final_retry_after_is_reported_for_the_next_poll() -> None:
    handler, _ = sequence(httpx.Response(429, headers={"Retry-After": "45"}))
    client, _, _ = make_client(handler, max_retries=0)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.RATE_LIMITED
    assert isinstance(outcome, Failed)
    assert outcome.retry_after == 45


def test_parse_retry_after() -> None:
    now = time.time()
    assert parse_retry_after("0", now) == 0
    assert parse_retry_after("2.5", now) == 2.5
    assert parse_retry_after("-4", now) == 0
    assert parse_retry_after("999", now) == RETRY_AFTER_CAP
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("inf", now) is None
    assert parse_retry_after(None, now) is None
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(past, now) == 0


@pytest.mark.parametrize(
    ("response", "detail"),
    [
        (httpx.Response(200, text="<html>oops</html>"), "bad body"),
        (httpx.Response(200, json={"runs": []}), "no 'run' object"),
        (httpx.Response(200, json={"run": {"id": "k4q95w5"}}), "is missing"),
        (httpx.Response(200, json=run_body(run_id="other12")), "asked for run"),
        (
            httpx.Response(302, headers={"Location": "http://elsewhere.invalid/"}),
            "not followed",
        ),
    ],
)
async def test_invalid_responses_are_not_retried(response: httpx.Response, detail: str) -> None:
    handler, seen = sequence(response)
    client, _, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.INVALID_RESPONSE
    assert isinstance(outcome, Failed)
    assert detail in outcome.detail
    assert len(seen) == 1


async def test_missing_sampler_status_is_invalid() -> None:
    body = run_body()
    del body["run"]["sampler"]["status"]
    handler, _ = sequence(httpx.Response(200, json=body))
    client, _, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.INVALID_RESPONSE
    assert isinstance(outcome, Failed)
    assert "sampler.status" in outcome.detail


async def test_schema_drift_is_tolerated() -> None:
    body = run_body(status="HIBERNATING")
    body["run"]["brand_new_field"] = {"nested": [1, 2]}
    body["run"]["sampler"]["node_count"] = "many"
    handler, _ = sequence(httpx.Response(200, json=body))
    client, _, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert outcome.value.sampler is not None
    assert outcome.value.sampler.status == "HIBERNATING"


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (httpx.ConnectError("refused"), Result.CONNECTION_ERROR),
        (httpx.ReadError("reset"), Result.CONNECTION_ERROR),
        (httpx.RemoteProtocolError("truncated"), Result.CONNECTION_ERROR),
        (httpx.ReadTimeout("slow"), Result.TIMEOUT),
        (httpx.ConnectTimeout("slow"), Result.TIMEOUT),
    ],
)
async def test_transport_failures_are_retried(error: Exception, result: Result) -> None:
    handler, seen = sequence(error)
    client, recorder, _ = make_client(handler, max_retries=1)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is result
    assert outcome.code == "error"
    assert len(seen) == 2
    assert recorder.codes == ["error", "error"]
    assert [reason for reason, _, _ in recorder.retries] == [result]
    assert result in RETRIED_RESULTS, "its retry counter is not exported from the start"


async def test_declared_oversized_body_is_refused() -> None:
    handler, _ = sequence(
        httpx.Response(200, headers={"Content-Length": str(RUN_BODY_CAP + 1)}, content=b"{}")
    )
    client, _, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.INVALID_RESPONSE
    assert isinstance(outcome, Failed)
    assert "cap" in outcome.detail


async def test_streamed_oversized_body_is_refused_without_buffering_it() -> None:
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 64 * 1024
            yield b" " * (64 * 1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    client, _, _ = make_client(handler)
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.INVALID_RESPONSE
    assert produced <= RUN_BODY_CAP + 128 * 1024


async def test_list_runs_passes_filters() -> None:
    body = {"runs": [run_body("a1")["run"], run_body("b2", "FAILED")["run"]]}
    handler, seen = sequence(httpx.Response(200, json=body))
    client, _, _ = make_client(handler)
    outcome = await client.list_runs(scope="org", base_model="Qwen/Qwen3-8B")
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert [run.id for run in outcome.value.runs] == ["a1", "b2"]
    assert seen[0].url.params["scope"] == "org"
    assert seen[0].url.params["base_model"] == "Qwen/Qwen3-8B"
    handler, seen = sequence(httpx.Response(200, json={"runs": []}))
    client, _, _ = make_client(handler)
    await client.list_runs(scope=None, base_model=None)
    assert "scope" not in seen[0].url.params


async def test_cancellation_is_never_retried() -> None:
    started = asyncio.Event()
    calls = 0

    class Hanging(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            started.set()
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    client, recorder, _ = make_client(transport=Hanging())
    task = asyncio.create_task(client.get_run("k4q95w5"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert recorder.retries == []


async def test_rate_limiter_paces_attempts() -> None:
    limiter = RateLimiter(50.0)
    start = time.monotonic()
    for _ in range(11):
        await limiter.wait()
    assert time.monotonic() - start >= 0.19


# --- a real socket: deadlines and the connection pool ------------------------------------


class MisbehavingServer:
    """A loopback HTTP server whose behaviour the test switches between modes."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MisbehavingServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                body = json.dumps(run_body(path.rsplit("/", 1)[1])).encode()
                mode = self.mode
                if mode == "stall":
                    await asyncio.sleep(3600)
                header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                writer.write(header)
                if mode == "trickle":
                    for byte in body:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.02)
                else:
                    writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


def real_client(
    url: str,
    *,
    request_timeout: float,
    max_concurrency: int,
    transport: ConnectionStack | None = None,
) -> LoopsClient:
    """A client with httpx's real transports and connections."""
    return LoopsClient(
        api_url=url,
        transport=transport,
        api_key=FAKE_KEY,
        auth_scheme="bearer",
        request_timeout=request_timeout,
        max_retries=0,
        max_concurrency=max_concurrency,
        max_requests_per_second=100_000,
        observer=Recorder(),
    )


async def test_trickled_body_hits_the_hard_deadline() -> None:
    async with MisbehavingServer() as server:
        server.mode = "trickle"
        client = real_client(server.url, request_timeout=0.5, max_concurrency=2)
        start = time.monotonic()
        outcome = await client.get_run("k4q95w5")
        elapsed = time.monotonic() - start
        await client.aclose()
    assert outcome.result is Result.TIMEOUT
    # httpx's per-read timeout alone would let this body run for ~7 s.
    assert 0.45 <= elapsed < 1.0


async def test_hundreds_of_deadline_hits_leave_the_pool_healthy() -> None:
    async with MisbehavingServer() as server:
        stack = ConnectionStack()
        client = real_client(server.url, request_timeout=0.05, max_concurrency=4, transport=stack)
        results: list[Result] = []
        for mode in ("stall", "trickle"):
            server.mode = mode
            outcomes = await asyncio.gather(*(client.get_run(f"r{i}") for i in range(160)))
            results += [outcome.result for outcome in outcomes]
        # Cancellations from outside too, as at shutdown, while requests queue for slots.
        tasks = [asyncio.create_task(client.get_run(f"c{i}")) for i in range(40)]
        await asyncio.sleep(0.03)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        # The same connections, through a client whose deadline a busy machine cannot miss: a
        # request that answers in a millisecond here may still be paused for 300 ms.
        server.mode = "ok"
        checker = real_client(server.url, request_timeout=5.0, max_concurrency=4, transport=stack)
        healthy = await asyncio.wait_for(
            asyncio.gather(*(checker.get_run(f"ok{i}") for i in range(40))), timeout=10
        )
        await checker.aclose()
        await client.aclose()
    assert results.count(Result.TIMEOUT) == 320
    assert [outcome.result for outcome in healthy] == [Result.OK] * 40
    assert 1 <= len(stack) <= 4  # one connection per request in flight, never more


async def test_a_deadline_between_connect_and_send_costs_no_slot_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # httpcore keeps a connection whose request was cancelled after it connected and before it
    # was sent in its pool for good (encode/httpcore#1099). A busy machine lands deadlines there
    # now and then; this makes the first one land there.
    send = httpcore.AsyncHTTP11Connection.handle_async_request
    parked: list[object] = []

    async def park_the_first(self: httpcore.AsyncHTTP11Connection, request: Any) -> Any:
        if not parked:
            parked.append(self)
            await asyncio.sleep(3600)
        return await send(self, request)

    monkeypatch.setattr(httpcore.AsyncHTTP11Connection, "handle_async_request", park_the_first)
    async with MisbehavingServer() as server:
        stack = ConnectionStack()
        client = real_client(server.url, request_timeout=0.5, max_concurrency=1, transport=stack)
        first = await client.get_run("p1")
        later = [await client.get_run(f"p{i}") for i in range(2, 5)]
        await client.aclose()
    assert first.result is Result.TIMEOUT
    assert parked
    assert [outcome.result for outcome in later] == [Result.OK] * 3
    assert len(stack) == 1


async def test_connections_are_kept_alive_and_opened_only_as_concurrency_needs() -> None:
    async with MisbehavingServer() as server:
        stack = ConnectionStack()
        client = real_client(server.url, request_timeout=2.0, max_concurrency=8, transport=stack)
        one_by_one = [await client.get_run(f"s{i}") for i in range(5)]
        after_one_by_one = server.connections
        together = await asyncio.gather(*(client.get_run(f"t{i}") for i in range(50)))
        await client.aclose()
    assert [outcome.result for outcome in one_by_one + together] == [Result.OK] * 55
    assert after_one_by_one == 1
    assert server.connections == len(stack) <= 8


async def test_lone_surrogate_in_a_run_name_is_replaced_not_fatal() -> None:
    body = {"run": {**run_json(), "name": "x\udc80"}}  # json.dumps sends it as "\udc80"
    client, _, _ = make_client(sequence(httpx.Response(200, content=json.dumps(body)))[0])
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert outcome.value.name == "x\ufffd"


@pytest.mark.parametrize("path", ["run", "list"])
async def test_deeply_nested_body_is_an_invalid_response(path: str) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    content = b'{"run": ' + deep + b"}" if path == "run" else b'{"runs": [' + deep + b"]}"
    client, _, _ = make_client(sequence(httpx.Response(200, content=content))[0])
    outcome = await (
        client.get_run("k4q95w5")
        if path == "run"
        else client.list_runs(scope="org", base_model=None)
    )
    assert outcome.result is Result.INVALID_RESPONSE
    assert isinstance(outcome, Failed)
    assert "recursion" in outcome.detail


async def test_any_exception_while_parsing_is_an_invalid_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(body: Any) -> Any:
        raise ZeroDivisionError("parser bug")

    monkeypatch.setattr("watcher.api.parse_run_response", explode)
    client, _, _ = make_client(sequence(httpx.Response(200, json=run_body()))[0])
    outcome = await client.get_run("k4q95w5")
    assert outcome.result is Result.INVALID_RESPONSE
    assert isinstance(outcome, Failed)
    assert "parser bug" in outcome.detail


async def test_fuzzed_run_bodies_end_in_ok_or_invalid_response() -> None:
    rng = random.Random(88)
    valid = json.dumps(run_body()).encode()
    bodies = [mutate(valid, rng) for _ in range(500)]
    client, _, _ = make_client(
        lambda request: httpx.Response(200, content=bodies.pop()), max_retries=0
    )
    accepted = 0
    while bodies:
        outcome = await client.get_run("k4q95w5")
        assert outcome.result in (Result.OK, Result.INVALID_RESPONSE)
        if isinstance(outcome, Fetched):
            accepted += 1
            sampler = outcome.value.sampler
            kept = (outcome.value.name, outcome.value.base_model, sampler and sampler.status)
            "".join(text for text in kept if text).encode()  # exportable, whatever came in
    assert accepted > 20  # the mutations leave enough bodies whole to reach the parser's end


async def test_one_bad_list_entry_fails_only_that_entry() -> None:
    bad = run_json("b2")
    bad["sampler"] = {**bad["sampler"], "status": None}
    serverless = run_json("c3")
    serverless["sampler"] = {**serverless["sampler"], "model_id": None, "deployment_id": None}
    body = {"runs": [run_json("a1"), bad, serverless]}
    client, _, _ = make_client(sequence(httpx.Response(200, json=body))[0])
    outcome = await client.list_runs(scope="org", base_model=None)
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert [run.id for run in outcome.value.runs] == ["a1", "c3"]
    assert [entry.run_id for entry in outcome.value.invalid] == ["b2"]


async def test_list_body_cap_is_fixed_not_per_watched_run() -> None:
    # About 6 MB, like an org of 8,000 runs with longer names and more fields than these.
    runs = [{**run_json(f"r{i:05d}"), "name": "n" * 400} for i in range(8000)]
    body = json.dumps({"runs": runs}).encode()
    assert len(body) > 5_000_000
    client, _, _ = make_client(sequence(httpx.Response(200, content=body))[0])
    outcome = await client.list_runs(scope="org", base_model=None)
    assert outcome.result is Result.OK
    assert isinstance(outcome, Fetched)
    assert len(outcome.value.runs) == 8000
    small, _, _ = make_client(
        sequence(httpx.Response(200, content=body))[0], list_body_cap=4 * 1024 * 1024
    )
    refused = await small.list_runs(scope="org", base_model=None)
    assert refused.result is Result.INVALID_RESPONSE
    assert isinstance(refused, Failed)
    assert "4194304-byte cap" in refused.detail


async def test_an_answer_carries_when_its_attempt_was_sent() -> None:
    handler, _ = sequence(httpx.Response(503), httpx.Response(200, json=run_body()))
    client, _, _ = make_client(handler)
    before = time.monotonic()
    outcome = await client.get_run("k4q95w5")
    assert outcome.attempts == 2
    assert isinstance(outcome, Fetched)
    assert before <= outcome.requested <= time.monotonic()


async def test_connection_errors_name_the_host() -> None:
    client, _, _ = make_client(
        transport=None, api_url="http://127.0.0.1:9", max_retries=0, request_timeout=5.0
    )
    outcome = await client.get_run("k4q95w5")
    await client.aclose()
    assert outcome.result is Result.CONNECTION_ERROR
    assert isinstance(outcome, Failed)
    assert "cannot reach 127.0.0.1:9" in outcome.detail


class CannedServer:
    """A loopback HTTP/1.1 server answering every request with one run body, recording what
    was asked; stands in for the API behind TLS, or for a forward proxy."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, tls: Any = None) -> CannedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head.split(b"\r\n", 1)[0].decode())
        body = json.dumps(run_body()).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_http_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await CannedServer().start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # Nothing listens at the API's address: only the proxy can answer.
    client, _, _ = make_client(transport=None, api_url="http://127.0.0.2:9", max_retries=0)
    outcome = await client.get_run("k4q95w5")
    await client.aclose()
    await proxy.close()
    assert outcome.result is Result.OK
    assert proxy.requests == ["GET http://127.0.0.2:9/v1/loops/runs/k4q95w5 HTTP/1.1"]


async def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy, api = await CannedServer().start(), await CannedServer().start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    client, _, _ = make_client(transport=None, api_url=f"http://localhost:{api.port}")
    outcome = await client.get_run("k4q95w5")
    await client.aclose()
    await proxy.close()
    await api.close()
    assert outcome.result is Result.OK
    assert (proxy.requests, api.requests) == ([], ["GET /v1/loops/runs/k4q95w5 HTTP/1.1"])


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA bundle trusts, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.process  # openssl makes the certificate
async def test_ssl_cert_file_is_trusted(
    monkeypatch: pytest.MonkeyPatch, self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    api = await CannedServer().start(tls)
    url = f"https://127.0.0.1:{api.port}"
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    trusting, _, _ = make_client(transport=None, api_url=url, max_retries=0)
    trusted = await trusting.get_run("k4q95w5")
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default, _, _ = make_client(transport=None, api_url=url, max_retries=0)
    refused = await default.get_run("k4q95w5")
    for client in (trusting, default):
        await client.aclose()
    await api.close()
    assert trusted.result is Result.OK
    assert refused.result is Result.CONNECTION_ERROR
    assert isinstance(refused, Failed)
    assert "CERTIFICATE_VERIFY_FAILED" in refused.detail
