"""The HTTP front of ``nav.serve``: every HTTP request reaches tritonserver through it, and an inference request
only once its declared shapes are within the served bounds (:mod:`navdeploy.serving.bounds`).

tritonserver listens on a loopback port of its own; the guard listens where the user asked (``host``, the HTTP
port) and forwards each request as it came (headers included, so Triton's restricted endpoints stay restricted)
and each response as it went. It runs an aiohttp server and client in one thread of the serving process."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from typing import Any, Optional

from navdeploy.errors import NavdeployError
from navdeploy.serving.bounds import RequestBounds

log = logging.getLogger("navdeploy")


# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarded body changes: they are not passed on.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}

_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")


class RequestGuard:
    """Listens on ``host:port`` and forwards to tritonserver's HTTP endpoint at ``127.0.0.1:upstream_port``,
    answering an inference request of ``model`` that exceeds ``bounds`` with a 400 error itself.
    ``start()`` it, ``stop()`` it (idempotent)."""

    def __init__(self, bounds: RequestBounds, model: str, host: str, port: int, upstream_port: int,
                 shutdown_timeout: float = 10.0):
        self.bounds, self.model, self.host, self.port = bounds, model, host, port
        self.shutdown_timeout = shutdown_timeout  # how long stop() lets in-flight requests finish
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.refused = 0  # requests answered here (over the bounds, malformed, too large)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Any = None
        self._session: Any = None

    def start(self) -> None:
        """Listen; raises :class:`NavdeployError` when the port cannot be bound."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="navdeploy-request-guard", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout=30)
        except OSError as exc:
            self.stop()
            raise NavdeployError(f"nav.serve: cannot listen on {self.host}:{self.port} ({exc}); pass another "
                                 "ports= or free that port.") from exc
        except BaseException:
            self.stop()
            raise

    async def _start(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        # The client sends what the caller sent: no Accept-Encoding or User-Agent of its own, bodies as they come.
        self._session = ClientSession(connector=TCPConnector(limit=0, force_close=False), auto_decompress=False,
                                      timeout=ClientTimeout(total=None, sock_connect=10),
                                      skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"))
        # client_max_size bounds the decoded body (aiohttp decompresses gzip/deflate bodies as it reads them).
        app = web.Application(client_max_size=self.bounds.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import ClientError, web

        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(413, f"the request body is over {self.bounds.max_request_bytes} bytes "
                                     "(nav.serve's max_request_bytes); send less, or raise max_request_bytes.")
        match = _INFER.match(request.path) if request.method == "POST" else None
        if match:
            problem = self._infer_problem(match["model"], request.headers, body)
            if problem:
                return self._refuse(400, problem)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers.pop("Content-Encoding", None)  # the body was decoded while it was read
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                             data=body, allow_redirects=False) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
                return web.Response(status=upstream.status, headers=out, body=payload)
        except (ClientError, asyncio.TimeoutError) as exc:
            return self._refuse(502, f"the inference server did not answer ({type(exc).__name__}: {exc}).")

    def _infer_problem(self, model: str, headers: Any, body: bytes) -> Optional[str]:
        if model != self.model:
            return f"unknown model {model!r}; this server serves {self.model!r}."
        length = headers.get("Inference-Header-Content-Length")
        if length is not None:
            if not length.isdigit() or int(length) > len(body):
                return f"Inference-Header-Content-Length {length!r} does not fit the body ({len(body)} bytes)."
            head = body[:int(length)]
        else:
            head = body
        try:
            header = json.loads(head)
        except (ValueError, RecursionError) as exc:
            return f"the inference request header is not valid JSON ({exc})."
        return self.bounds.request_problem(header, len(body) - len(head))

    def _refuse(self, status: int, message: str) -> Any:
        from aiohttp import web

        self.refused += 1
        return web.json_response({"error": message}, status=status)

    def stop(self) -> None:
        """Stop listening and end the thread; requests still in flight get their connection closed."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=self.shutdown_timeout + 10)
            except Exception as exc:  # noqa: BLE001 - stopping goes on: the thread and loop still end
                log.warning("navdeploy: the HTTP request guard did not close cleanly: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not loop.is_running():
            loop.close()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
