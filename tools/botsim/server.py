"""Run an aiohttp application on a loopback port in a background thread.

Tests, benchmarks and the chat command use this to stand up botsim's services
(OpenID/JWKS, fake Connector, fake AAD) beside the code under test, whatever
event loop that code runs on.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


class BackgroundServer:
    """An aiohttp app served on 127.0.0.1 from a daemon thread with its own event loop."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._started = False

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.call(self._start()).result(timeout=30)
        self._started = True
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]

    def call(self, coro: Awaitable[Any]):
        """Run a coroutine on the server's loop (thread-safe); returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the server's loop and wait for its result."""

        async def wrapper():
            return fn()

        return self.call(wrapper()).result(timeout=30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            self.call(self._runner.cleanup()).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
