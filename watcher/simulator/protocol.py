"""The simulator's raw HTTP/1.1 side: a keep-alive parser on bare asyncio, replies, wire faults.

Hand-written on purpose: fault injection needs what a well-behaved server library will not do
(resets, trickled bytes, bodies without a declared length), and it must be fast enough to be
the benchmark's backend on one core. A test instrument, not the product's server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

from watcher.simulator.faults import Fault

_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>\n"
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delivery: Fault | None = None  # a fault in how the reply is sent

    def head(self, length: int | None, close: bool) -> bytes:
        lines = [
            _STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} Unknown\r\n",
            f"Content-Type: {self.content_type}\r\n",
        ]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")


def error(
    status: int,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
    delivery: Fault | None = None,
) -> Reply:
    return Reply(status, json_body({"error": message}), headers=headers, delivery=delivery)


def not_allowed(*methods: str) -> Reply:
    return error(405, "method not allowed", (("Allow", ", ".join(methods)),))


def segment_after(prefix: str, path: str) -> str | None:
    """The single, percent-decoded path segment after `prefix`; None for any other shape."""
    if not path.startswith(prefix):
        return None
    segment = unquote(path[len(prefix) :])
    return segment if segment and "/" not in segment else None


def replacement(fault: Fault) -> Reply:
    """What a fault answers instead of the real reply."""
    if fault.kind == "redirect":
        return Reply(302, b"", "text/plain", (("Location", fault.location),))
    if fault.kind == "non_json":
        return Reply(200, _PAGE, "text/html; charset=utf-8")
    headers = () if fault.retry_after is None else (("Retry-After", fault.retry_after),)
    if fault.status in (204, 304):  # statuses that never carry a body
        return Reply(fault.status, b"", headers=headers)
    phrase = HTTPStatus(fault.status).phrase if fault.status in _STATUS_LINES else "error"
    return error(fault.status, phrase, headers)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_MAX_HEAD = 16 * 1024
_MAX_BODY = 1024 * 1024
_CHUNK = b"x" * 65536


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not (method.isascii() and method.isalpha() and method.isupper()):
        raise _BadRequest(400, "malformed method")
    if not target.startswith("/"):
        raise _BadRequest(400, "request target must be a path")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    return method, target, version


def _is_loopback(peer: Any) -> bool:
    try:
        address = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Connection(asyncio.Protocol):
    """One client connection: parses requests in order and writes replies, faults included.

    Most replies are written straight from `data_received`; a slow one (delay, trickle,
    oversized) runs as a task, and requests pipelined behind it wait in the buffer.
    """

    def __init__(
        self, reply: Callable[[Request, bool], Reply], connections: set[Connection]
    ) -> None:
        self._reply = reply  # answers a request, given whether the peer is on loopback
        self._connections = connections  # every open one, so the server can close them
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loopback = False
        self._slow: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loopback = _is_loopback(transport.get_extra_info("peername"))
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        if self._slow is not None:
            self._slow.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        if self._slow is not None:
            self._slow.cancel()
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._slow is None:
            self._serve_buffered()
        elif len(self._buffer) > _MAX_HEAD + _MAX_BODY and self._transport is not None:
            self._transport.pause_reading()

    def _serve_buffered(self) -> None:
        while self._slow is None and not self._closed:
            try:
                request = self._next_request()
            except _BadRequest as exc:
                self._send(error(exc.status, exc.message), close=True)
                return
            if request is None:
                return
            self._deliver(self._reply(request, self._loopback), close=not request.keep_alive)

    def _next_request(self) -> Request | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, _MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                raise _BadRequest(400, "request head too large")
            # Refuse a garbage request line now rather than when the head is complete.
            line_end = buffer.find(b"\r\n")
            if line_end >= 0:
                _request_line(buffer[:line_end].decode("latin-1"))
            return None
        lines = buffer[:end].decode("latin-1").split("\r\n")
        method, target, version = _request_line(lines[0])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest(400, "chunked request bodies are not supported")
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            raise _BadRequest(400, "malformed Content-Length")
        length = int(length_text)
        if length > _MAX_BODY:
            raise _BadRequest(413, "request body too large")
        start = end + 4
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        connection = headers.get("connection", "").lower()
        keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
        path, _, query = target.partition("?")
        return Request(method, path, query, headers, body, keep_alive)

    def _send(self, reply: Reply, close: bool) -> None:
        assert self._transport is not None
        self._transport.write(reply.head(len(reply.body), close) + reply.body)
        if close:
            self._transport.close()
            self._closed = True

    def _deliver(self, reply: Reply, close: bool) -> None:
        assert self._transport is not None
        fault = reply.delivery
        if fault is None:
            self._send(reply, close)
        elif fault.kind == "reset":
            sock = self._transport.get_extra_info("socket")
            # Linger 0 makes close() send a RST instead of an orderly FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()
            self._closed = True
        elif fault.kind == "truncate":
            self._transport.write(reply.head(len(reply.body), close=True))
            self._transport.write(reply.body[: len(reply.body) // 2])
            self._transport.close()
            self._closed = True
        else:
            self._slow = asyncio.get_running_loop().create_task(
                self._deliver_slowly(reply, fault, close)
            )

    async def _deliver_slowly(self, reply: Reply, fault: Fault, close: bool) -> None:
        assert self._transport is not None
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay)
            self._transport.write(reply.head(len(reply.body), close) + reply.body)
        elif fault.kind == "trickle":
            self._transport.write(reply.head(len(reply.body), close))
            for index in range(len(reply.body)):
                await asyncio.sleep(fault.trickle_interval)
                self._transport.write(reply.body[index : index + 1])
        else:  # oversized: pad the JSON object with one huge string, never held in memory whole
            prefix, suffix = reply.body[:-1] + b',"padding":"', b'"}'
            padding = max(0, fault.size - len(prefix) - len(suffix))
            length = len(prefix) + padding + len(suffix) if fault.declare_length else None
            close = close or length is None  # an undeclared length ends where the connection does
            self._transport.write(reply.head(length, close) + prefix)
            while padding:
                await self._writable.wait()
                # Yield even while the socket keeps up, so other connections get served.
                await asyncio.sleep(0)
                piece = _CHUNK if padding >= len(_CHUNK) else _CHUNK[:padding]
                self._transport.write(piece)
                padding -= len(piece)
            self._transport.write(suffix)
        if close:
            self._transport.close()
            self._closed = True
            return
        self._slow = None
        self._transport.resume_reading()
        self._serve_buffered()
