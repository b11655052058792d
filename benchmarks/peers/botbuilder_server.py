"""Echo bot on the Bot Framework SDK 4.17 (CloudAdapter on aiohttp), as its sample app.py.

Authentication is the SDK's own, configured (through the settings the SDK reads) against
botsim: channel tokens checked against botsim's OpenID metadata and JWKS, the bot's own
token from botsim's fake AAD. The SDK's VALIDATE_AUTHORITY setting is set, but its
MSAL application still runs instance discovery (a Microsoft host this machine cannot
reach), so MSAL's own switch is turned off as for the other peers (local_msal.py). Runs only in
.tools/bench-botbuilder. Settings come from BENCH_* environment variables (see
benchmarks/warm.py).
"""

from __future__ import annotations

import os

import msal
from aiohttp import web

from benchmarks.peers.local_msal import without_instance_discovery

without_instance_discovery(msal)

from botbuilder.core import ActivityHandler, MessageFactory, TurnContext  # noqa: E402
from botbuilder.core.integration import aiohttp_error_middleware  # noqa: E402
from botbuilder.integration.aiohttp import (  # noqa: E402
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
)


class Config:
    APP_ID = os.environ["BENCH_APP_ID"]
    APP_PASSWORD = os.environ["BENCH_APP_PASSWORD"]
    APP_TYPE = "MultiTenant"
    VALIDATE_AUTHORITY = False
    TO_CHANNEL_FROM_BOT_LOGIN_URL = os.environ["BENCH_AAD_URL"] + "/botframework.com"
    TO_CHANNEL_FROM_BOT_OAUTH_SCOPE = "https://api.botframework.com"
    TO_BOT_FROM_CHANNEL_TOKEN_ISSUER = "https://api.botframework.com"
    TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL = os.environ["BENCH_OPENID_METADATA_URL"]
    TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL = os.environ["BENCH_EMULATOR_OPENID_METADATA_URL"]


class EchoBot(ActivityHandler):
    async def on_message_activity(self, turn_context: TurnContext) -> None:
        text = turn_context.activity.text or ""
        await turn_context.send_activity(MessageFactory.text(f"Echo: {text}"))


ADAPTER = CloudAdapter(ConfigurationBotFrameworkAuthentication(Config()))
BOT = EchoBot()


async def messages(request: web.Request) -> web.Response:
    return await ADAPTER.process(request, BOT)


def main() -> None:
    app = web.Application(middlewares=[aiohttp_error_middleware])
    app.router.add_post("/api/messages", messages)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
