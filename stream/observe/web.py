"""Health and metrics endpoints of a gruflow process: ``/metrics``, ``/livez``, ``/readyz`` (and, on a
worker, the recommendation requests of ``stream/worker/http_api.py``).

A tiny aiohttp server started before faust connects to anything, so ``/livez`` answers 200 as long as
the process works — also while the broker is unreachable (a liveness probe must not restart a worker
because Kafka is down); a worker's fails once its stream's loop stops turning (``heartbeat.py``).
``/readyz`` answers 200 only once the table recovery has finished and a model is loaded, else 503 with
the reason. faust's own web server stays disabled (it only starts after recovery,
and its Prometheus sensor uses non-base units). A worker serves them, with its requests, from a thread
and event loop of their own (``WebServerThread``), apart from the stream's loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.observe.metrics import Metrics

ReadyFn = Callable[[], "tuple[bool, str]"]
LiveFn = ReadyFn  # (alive, reason): a worker's says whether the stream's loop still turns


class Routes(Protocol):
    def add_routes(self, app: web.Application) -> None: ...


def make_web_app(metrics: Metrics, ready: ReadyFn, extra: Routes | None = None, *,
                 with_ready_gauge: bool = True, live: LiveFn | None = None) -> web.Application:
    """The endpoints over ``metrics``' registry; its gruflow_ready gauge (a worker's) follows ``ready()``;
    ``/livez`` answers 503 with ``live()``'s reason when it says the process no longer works."""
    registry = metrics.registry

    def check() -> tuple[bool, str]:
        ok, reason = ready()
        if with_ready_gauge:
            metrics.ready.set(1 if ok else 0)
        return ok, reason

    async def metrics_handler(_: web.Request) -> web.Response:
        check()
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        ok, reason = live() if live is not None else (True, "ok")
        return web.Response(text=reason + "\n", status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = check()
        return web.Response(text=reason + "\n", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    if extra is not None:
        extra.add_routes(app)
    return app


class WebServer:
    """Start/stop the endpoints on the running event loop."""

    def __init__(self, metrics: Metrics, ready: ReadyFn, host: str, port: int, extra: Routes | None = None, *,
                 with_ready_gauge: bool = True, live: LiveFn | None = None) -> None:
        self.host, self.port = host, port
        app = make_web_app(metrics, ready, extra, with_ready_gauge=with_ready_gauge, live=live)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot serve /metrics on {self.host}:{self.port} ({exc.strerror}); set GRUFLOW_WEB_PORT "
                          "to a free port (each worker needs its own)") from None

    async def stop(self) -> None:
        await self._runner.cleanup()


class WebServerThread:
    """The same endpoints served by a daemon thread that runs an event loop of its own: for a process
    without one (the trainer), or to keep the requests off the loop of a worker's stream."""

    def __init__(self, metrics: Metrics, ready: ReadyFn, host: str, port: int, extra: Routes | None = None, *,
                 with_ready_gauge: bool = False, on_stop: Callable[[], Awaitable[None]] | None = None,
                 live: LiveFn | None = None) -> None:
        """``on_stop``: run on the thread's loop after the server stops (``extra``'s own clean-up); ``live``:
        ``/livez``'s check (stream/observe/heartbeat.py). The loop is of the kind the event loop policy makes
        (uvloop in a worker)."""
        self._args = (metrics, ready, host, port, extra, with_ready_gauge, live)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gruflow-http", daemon=True)
        self._server: WebServer | None = None
        self._on_stop = on_stop

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> None:
        metrics, ready, host, port, extra, with_ready_gauge, live = self._args
        server = WebServer(metrics, ready, host, port, extra, with_ready_gauge=with_ready_gauge, live=live)
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._on_stop is not None:
            await self._on_stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
