"""The Loops API client: HTTP, the wire format and the retry policy; nothing about metrics.

Every call ends in an `Outcome`: `Fetched` with the value, or `Failed` whose `result` is one of
a small closed set (the contract's `result` label values); no exception escapes for anything
the network or the server can do.
Attempts and retries are reported to an observer, which is where metrics and logs happen.

Deadlines: `request_timeout` bounds a whole attempt, body included, with `asyncio.timeout`
(httpx's own read timeout is per chunk, so a trickling body would never hit it). httpcore
leaks pool slots when a request is cancelled while it waits for a connection
(encode/httpcore#1093), so attempts pass through a semaphore as wide as the pool: a request
never waits inside the pool. A deadline that lands between connect and send still leaves its
connection in the pool for good (encode/httpcore#1099), so a transport whose request failed
before its response is closed and dropped, never lent again.

Connections: one long-lived `httpx.AsyncClient` carries every request, but its transport is
a stack of httpx transports with one connection each. httpcore 1.0's pool rescans every
pooled connection, polling each idle socket, whenever a request starts or ends
(encode/httpcore#1035, #928); with 32 connections in one pool that about doubles the CPU of
a request (`make bench` measures both ways with bare httpx loops). A transport is lent to one
request until its response is closed; the warmest is lent first, and past the first (made
with the client, see `ConnectionStack`) transports are made only as concurrency calls for
them, so there are never more than `max_concurrency`.

Proxies: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY are read the way any httpx client
reads them (httpx's own table of URL patterns; a proxied pattern gets a stack of its own), and
SSL_CERT_FILE/SSL_CERT_DIR through httpx's TLS context.

Bodies: a run body is capped at `RUN_BODY_CAP`; a list body at a fixed ceiling that does not
depend on how many runs are watched (a large org's list must be readable before its runs are),
decoded as it arrives, keeping of each entry what the caller's `keep_listed` says. Whatever
a body holds, decoding and parsing it ends in an outcome: `invalid_response` for that poll,
never an exception.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import quote

import anyio
import httpx
from httpx._utils import get_environment_proxies  # the table every httpx client builds
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    wait_exponential_jitter,
)

from watcher import __version__
from watcher.model import (
    Failed,
    Fetched,
    InvalidRun,
    ListDecoder,
    Outcome,
    Result,
    Run,
    RunList,
    parse_run_response,
)

T = TypeVar("T")

RUN_BODY_CAP = 1024 * 1024
LIST_BODY_CAP = 64 * 1024 * 1024
ERROR_BODY_CAP = 16 * 1024
RETRY_AFTER_CAP = 60.0
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Attempt(Generic[T]):
    """One HTTP attempt, already classified."""

    result: Result
    code: str  # the HTTP status, or "error" when none came back
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None
    value: T | None = None  # set exactly when the result is ok
    requested: float = 0.0  # time.monotonic() when the attempt was sent


class ClientObserver(Protocol):
    def attempt_finished(self, code: str, seconds: float) -> None: ...

    def retrying(self, result: Result, detail: str, attempt: int, delay: float) -> None: ...


class RateLimiter:
    """A global pace: at most `rate` attempts a second, handed out in order of arrival."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0

    async def wait(self) -> None:
        now = self._clock()
        slot = max(self._next, now)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def _error_message(body: bytearray) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str):
                return _printable(data[key])
    return ""


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


def _classify_status(status: int) -> Result:
    if status == 401:
        return Result.UNAUTHORIZED
    if status == 403:
        return Result.FORBIDDEN
    if status == 404:
        return Result.NOT_FOUND
    if status == 429:
        return Result.RATE_LIMITED
    if 500 <= status <= 599:
        return Result.SERVER_ERROR
    return Result.INVALID_RESPONSE


class BodyTooLarge(Exception):
    pass


def _refuse_declared(response: httpx.Response, cap: int) -> None:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the {cap}-byte cap")


async def _read_capped(response: httpx.Response, cap: int) -> bytearray:
    """Read a body up to `cap` bytes (decoded); refuse more without buffering it.

    The buffer itself is returned, not a copy; no generator wraps the chunks (this is every
    poll's path)."""
    _refuse_declared(response, cap)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > cap:
            raise BodyTooLarge(f"body exceeds the {cap}-byte cap")
    return body


async def _read_json(response: httpx.Response, cap: int) -> Any:
    return json.loads(await _read_capped(response, cap))


async def _read_list(
    response: httpx.Response, cap: int, keep: Callable[[Run], Run | None]
) -> RunList:
    """Decode a list body as it arrives, up to `cap` bytes; only the unread tail is held."""
    _refuse_declared(response, cap)
    decoder = ListDecoder(keep)
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(f"body exceeds the {cap}-byte cap")
        decoder.feed(chunk)
    return decoder.finish()


class _LentStream(httpx.AsyncByteStream):
    """A response body that gives its transport back once the body is closed."""

    def __init__(self, body: httpx.AsyncByteStream, give_back: Callable[[], None]) -> None:
        self._body = body
        self._give_back: Callable[[], None] | None = give_back

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._body.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            if self._give_back is not None:
                self._give_back()
                self._give_back = None


class ConnectionStack(httpx.AsyncBaseTransport):
    """httpx's own transport, one connection per transport, each lent to one request at a time.

    The caller bounds how many requests are in flight; this makes a transport per request in
    flight at most, never waits for one, and lends the most recently used first.
    """

    def __init__(self, proxy: httpx.Proxy | None = None) -> None:
        # One TLS context for every connection: loading the CA bundle is slow and large.
        self._tls = httpx.create_ssl_context()
        self._proxy = proxy
        self._limits = httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=30.0
        )
        self._transports: list[httpx.AsyncHTTPTransport] = []
        # Made now, not in the first attempt: httpx imports httpcore when it makes its first
        # transport, and anyio (httpcore's network layer) loads its event loop backend on the
        # first connection. On a busy machine those imports take seconds, blocking the loop
        # inside the first attempt's deadline, so the first polls after a start timed out.
        self._idle: list[httpx.AsyncHTTPTransport] = [self._new_transport()]
        anyio.get_available_backends()

    def __len__(self) -> int:
        return len(self._transports)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._idle.pop() if self._idle else self._new_transport()
        try:
            response = await transport.handle_async_request(request)
        except BaseException:
            # Its one connection is lost either way, and a deadline that lands between connect
            # and send leaves it in the pool for good, neither usable nor closed, so every later
            # request lent this transport would wait for it (encode/httpcore#1099).
            self._transports.remove(transport)
            await transport.aclose()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_LentStream(response.stream, lambda: self._idle.append(transport)),
            extensions=response.extensions,
        )

    def _new_transport(self) -> httpx.AsyncHTTPTransport:
        transport = httpx.AsyncHTTPTransport(
            verify=self._tls, limits=self._limits, proxy=self._proxy
        )
        self._transports.append(transport)
        return transport

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()


class LoopsClient:
    """Reads runs from the Loops API through one long-lived `httpx.AsyncClient`."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        auth_scheme: str,
        request_timeout: float,
        max_retries: int,
        max_concurrency: int,
        max_requests_per_second: float,
        observer: ClientObserver,
        list_body_cap: int = LIST_BODY_CAP,
        keep_listed: Callable[[Run], Run | None] = lambda run: run,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        scheme = "Bearer" if auth_scheme == "bearer" else "Api-Key"
        self._api_url = api_url.rstrip("/")
        self._host = httpx.URL(self._api_url).netloc.decode("ascii", "replace")
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if transport is None:
            transport = ConnectionStack()
            mounts = {
                pattern: None if proxy is None else ConnectionStack(httpx.Proxy(proxy))
                for pattern, proxy in get_environment_proxies().items()
            }
        headers = {
            "Authorization": f"{scheme} {api_key}",
            "Accept": "application/json",
            "User-Agent": f"loops-watcher/{__version__}",
        }
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(request_timeout),
            follow_redirects=False,
            transport=transport,
            mounts=mounts,
        )
        self._timeout = request_timeout
        self._list_body_cap = list_body_cap
        self._keep_listed = keep_listed
        self._max_retries = max_retries
        self._slots = asyncio.Semaphore(max_concurrency)
        self._limiter = RateLimiter(max_requests_per_second)
        self._observer = observer
        self._sleep = sleep
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_run(self, run_id: str) -> Outcome[Run]:
        async def read(response: httpx.Response) -> Run:
            run = parse_run_response(await _read_json(response, RUN_BODY_CAP))
            if run.id != run_id:
                raise InvalidRun(f"asked for run {run_id!r}, got {run.id[:80]!r}")
            return run

        return await self._fetch(f"/v1/loops/runs/{quote(run_id, safe='')}", {}, read)

    async def list_runs(self, *, scope: str | None, base_model: str | None) -> Outcome[RunList]:
        """The listed runs, each as `keep_listed` returns it while the list arrives (see
        `ListDecoder`), and the entries that are no usable run."""

        async def read(response: httpx.Response) -> RunList:
            return await _read_list(response, self._list_body_cap, self._keep_listed)

        params = {"scope": scope, "base_model": base_model}
        return await self._fetch(
            "/v1/loops/runs", {key: value for key, value in params.items() if value}, read
        )

    async def _fetch(
        self, path: str, params: dict[str, str], read: Callable[[httpx.Response], Awaitable[T]]
    ) -> Outcome[T]:
        # A fresh retrying object per call: tenacity keeps per-call statistics on it.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait,
            retry=retry_if_result(lambda attempt: attempt.retryable),
            before_sleep=self._before_sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
            sleep=self._sleep,
        )
        final: Attempt[T] = await retrying(self._attempt, path, params, read)
        attempts = retrying.statistics.get("attempt_number", 1)
        if final.value is not None:
            return Fetched(final.value, attempts, final.code, final.requested)
        return Failed(final.result, final.detail, attempts, final.code, final.retry_after)

    def _wait(self, state: RetryCallState) -> float:
        assert state.outcome is not None
        attempt: Attempt[Any] = state.outcome.result()
        if attempt.retry_after is not None:
            return attempt.retry_after
        return float(self._backoff(state))

    def _before_sleep(self, state: RetryCallState) -> None:
        assert state.outcome is not None
        assert state.next_action is not None
        attempt: Attempt[Any] = state.outcome.result()
        self._observer.retrying(
            attempt.result, attempt.detail, state.attempt_number, state.next_action.sleep
        )

    async def _attempt(
        self, path: str, params: dict[str, str], read: Callable[[httpx.Response], Awaitable[T]]
    ) -> Attempt[T]:
        async with self._slots:
            await self._limiter.wait()
            started = time.monotonic()
            code = "error"
            try:
                async with asyncio.timeout(self._timeout):
                    # An absolute URL and no empty params: httpx's URL merging is slow.
                    url = self._api_url + path
                    request = self._http.build_request("GET", url, params=params or None)
                    response = await self._http.send(request, stream=True)
                    try:
                        code = str(response.status_code)
                        attempt = await self._classify(response, read)
                    finally:
                        await response.aclose()
                return replace(attempt, requested=started)
            except (TimeoutError, httpx.TimeoutException):
                return Attempt(
                    Result.TIMEOUT,
                    code,
                    f"no complete response from {self._host} within {self._timeout:g} s",
                    retryable=True,
                )
            except httpx.DecodingError as exc:
                return Attempt(Result.INVALID_RESPONSE, code, f"undecodable body: {exc}")
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                detail = _printable(f"cannot reach {self._host}: {reason}")
                return Attempt(Result.CONNECTION_ERROR, code, detail, retryable=True)
            finally:
                self._observer.attempt_finished(code, time.monotonic() - started)

    async def _classify(
        self, response: httpx.Response, read: Callable[[httpx.Response], Awaitable[T]]
    ) -> Attempt[T]:
        status = response.status_code
        code = str(status)
        if status == 200:
            try:
                value = await read(response)
            except BodyTooLarge as exc:
                return Attempt(Result.INVALID_RESPONSE, code, str(exc))
            except httpx.HTTPError:
                raise  # the transport failed while the body came in: classified by the caller
            except Exception as exc:
                # Whatever a body can make a decoder or parser raise (bad JSON, a missing field,
                # nesting deep enough for RecursionError) is this poll's invalid_response.
                reason = str(exc) or type(exc).__name__
                return Attempt(Result.INVALID_RESPONSE, code, _printable(f"bad body: {reason}"))
            return Attempt(Result.OK, code, value=value)

        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        if 300 <= status <= 399:
            target = _printable(response.headers.get("location", "?"))
            detail = f"redirect ({status}) to {target} not followed"
        else:
            try:
                message = _error_message(await _read_capped(response, ERROR_BODY_CAP))
            except BodyTooLarge:
                message = ""
            detail = f"HTTP {status}" + (f": {message}" if message else "")
        return Attempt(
            _classify_status(status),
            code,
            detail,
            retryable=status in RETRYABLE_STATUS,
            retry_after=retry_after,
        )
