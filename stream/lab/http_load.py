"""An open-loop HTTP/1.1 request load for ``gruflow bench serve``, light enough to share 2 cores with the
worker it measures.

The load generator runs on the worker's machine, so every CPU cycle it takes is one the worker and the
broker do not get. aiohttp's client took about 0.5 ms of CPU per request here (a quarter of a core at 500
requests/s), as much as the worker spent answering. This one writes pre-encoded requests on kept-alive
connections and reads each answer by its ``Content-Length``: a few asyncio stream calls per request
(docs/serving-cost.md has the figures).

Open loop: request i is due at t0 + i/rate and its latency counts from that due time, so a slow answer
delays no later request and a late start is counted. A request takes an idle connection, or opens a new
one when all are busy (at most ``max_connections``; past it, the request waits for one, and that wait
counts in its latency). The worker's answers are ``web.Response`` bodies with a ``Content-Length``; an
answer without one is counted as an error and its connection dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class NoContentLength(Exception):
    """An answer without a Content-Length header: its end cannot be found on a kept-alive connection."""


@dataclass
class RequestLog:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)
        self.statuses[status] = self.statuses.get(status, 0) + 1


def get_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def post_request(host: str, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer: its status and body (found by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, await reader.readexactly(int(value))
    raise NoContentLength()


class ConnectionPool:
    """Kept-alive connections to one host:port; a connection serves one request at a time."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        self._idle: deque[_Stream] = deque()
        self._slots = asyncio.Semaphore(max_connections)

    async def exchange(self, request: bytes, timeout: float) -> int:
        async with self._slots:
            stream = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
            reader, writer = stream
            try:
                writer.write(request)
                status, _ = await asyncio.wait_for(read_answer(reader), timeout)
            except BaseException:
                writer.close()  # its state is unknown: never reused
                raise
            self._idle.append(stream)
            return status

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()


async def open_loop(url: str, requests: list[bytes], rate: float, timeout: float = 10.0,
                    max_connections: int = 256) -> tuple[RequestLog, float]:
    """Send ``requests`` (pre-encoded, in order) at ``rate`` per second; the log and the span in seconds."""
    parts = urlsplit(url)
    pool = ConnectionPool(parts.hostname or "127.0.0.1", parts.port or 80, max_connections)
    out = RequestLog()

    async def one(due: float, request: bytes) -> None:
        try:
            status = str(await pool.exchange(request, timeout))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, NoContentLength, ValueError) as exc:
            status = type(exc).__name__
        except asyncio.TimeoutError:
            status = "TimeoutError"
        out.add(status, (time.monotonic() - due) * 1000.0)

    tasks: list[Any] = []
    t0 = time.monotonic()
    for i, request in enumerate(requests):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, request)))
    await asyncio.gather(*tasks)
    span = time.monotonic() - t0
    pool.close()
    return out, span
