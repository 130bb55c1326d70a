"""The bench's light HTTP load: answers are read by Content-Length on kept-alive connections, statuses and
latencies are counted, and an answer it cannot delimit is an error, not a hang."""

from __future__ import annotations

import asyncio

from aiohttp import web

from stream.lab.http_load import get_request, open_loop, post_request


async def _serve() -> tuple[web.AppRunner, int, list[object]]:
    seen: list[object] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.transport)
        return web.Response(body=b'{"items": []}', content_type="application/json")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), status=201)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"no length")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_post("/echo", echo)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port, seen


def test_counts_statuses_and_reuses_connections() -> None:
    async def main() -> None:
        runner, port, seen = await _serve()
        try:
            host = f"127.0.0.1:{port}"
            requests = [get_request(host, "/ok")] * 20 + [post_request(host, "/echo", b'{"a": 1}'),
                                                          get_request(host, "/missing")]
            # three connections for 22 requests sent faster than one is answered: they must be reused
            log, span = await open_loop(f"http://{host}", requests, rate=2000.0, max_connections=3)
        finally:
            await runner.cleanup()
        assert log.statuses == {"200": 20, "201": 1, "404": 1}
        assert len(log.latencies_ms) == 22 and min(log.latencies_ms) >= 0.0
        assert span > 0
        assert 1 <= len({id(t) for t in seen}) <= 3  # kept alive, whatever the machine's load

    asyncio.run(main())


def test_an_answer_without_content_length_is_an_error() -> None:
    async def main() -> None:
        runner, port, _ = await _serve()
        try:
            host = f"127.0.0.1:{port}"
            log, _ = await open_loop(f"http://{host}", [get_request(host, "/chunked"), get_request(host, "/ok")],
                                     rate=100.0)
        finally:
            await runner.cleanup()
        assert log.statuses == {"NoContentLength": 1, "200": 1}

    asyncio.run(main())
