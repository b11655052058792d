"""Echo bot on the Bot Framework SDK 4.17 (CloudAdapter on aiohttp), as its sample app.py.

The adapter and the bot are benchmarks/sdk/botbuilder_echo.py's, built there with the
SDK's own authentication against botsim (BENCH_APP_ID is always set here: channel tokens
checked against botsim's OpenID metadata and JWKS, the bot's token from botsim's fake
AAD, MSAL's instance discovery off); this module serves them with the sample's aiohttp
server. Runs only in .tools/bench-botbuilder. Settings come from BENCH_* environment
variables (see benchmarks/warm.py).
"""

from __future__ import annotations

import os

from aiohttp import web
from botbuilder.core.integration import aiohttp_error_middleware

from benchmarks.sdk.botbuilder_echo import ADAPTER, BOT


async def messages(request: web.Request) -> web.Response:
    return await ADAPTER.process(request, BOT)


def main() -> None:
    if not os.environ.get("BENCH_APP_ID"):
        raise SystemExit("botbuilder_server: BENCH_APP_ID is not set (it always authenticates)")
    app = web.Application(middlewares=[aiohttp_error_middleware])
    app.router.add_post("/api/messages", messages)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
