"""Health and metrics endpoints of a gruflow process: ``/metrics``, ``/livez``, ``/readyz`` (and, on a
worker, the recommendation requests of ``stream/worker/http_api.py``).

A tiny aiohttp server started before faust connects to anything, so ``/livez`` answers 200 as long as
the process's event loop runs — also while the broker is unreachable (a liveness probe must not
restart a worker because Kafka is down). ``/readyz`` answers 200 only once the table recovery has
finished and a model is loaded, else 503 with the reason. faust's own web server stays disabled
(it only starts after recovery, and its Prometheus sensor uses non-base units).
"""

from __future__ import annotations

from typing import Callable, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.observe.metrics import Metrics

ReadyFn = Callable[[], "tuple[bool, str]"]


class Routes(Protocol):
    def add_routes(self, app: web.Application) -> None: ...


def make_web_app(metrics: Metrics, ready: ReadyFn, extra: Routes | None = None) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        ok, _reason = ready()
        metrics.ready.set(1 if ok else 0)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = ready()
        metrics.ready.set(1 if ok else 0)
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

    def __init__(self, metrics: Metrics, ready: ReadyFn, host: str, port: int, extra: Routes | None = None) -> None:
        self.host, self.port = host, port
        self._runner = web.AppRunner(make_web_app(metrics, ready, extra), access_log=None)

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
