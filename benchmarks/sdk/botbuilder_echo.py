"""Echo bot on the Bot Framework SDK (botbuilder 4.17, CloudAdapter), as its samples build it.

Importing this module builds the adapter and the bot, like the sample's ``app.py`` does at
module level. :func:`handle` does what ``CloudAdapter.process`` does with an aiohttp request
(content-type check, JSON parse, ``Activity().deserialize``, ``process_activity`` with the
Authorization header), without a web server, so the benchmark times the SDK, not aiohttp's.

With BENCH_APP_ID set, authentication is the SDK's own, configured against botsim (channel
tokens checked against botsim's OpenID metadata, the bot's token from its fake AAD; MSAL's
instance discovery is turned off, since the SDK's VALIDATE_AUTHORITY setting does not stop
it and it would ask a Microsoft host this machine cannot reach); otherwise the sample's
local mode (no app id: no authentication). benchmarks/peers/botbuilder_server.py serves
this module's adapter and bot with the sample's aiohttp server, always authenticated.

Runs in the benchmark's SDK venv (.tools/bench-sdk-venv) and in .tools/bench-botbuilder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

if os.environ.get("BENCH_APP_ID"):
    import msal

    from benchmarks.peers.local_msal import without_instance_discovery

    without_instance_discovery(msal)

from botbuilder.core import ActivityHandler, MessageFactory, TurnContext
from botbuilder.integration.aiohttp import (
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
)
from botbuilder.schema import Activity


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


class LocalConfig:
    """The sample's config.py: empty app id and password = authentication disabled (local)."""

    APP_ID = _env("MicrosoftAppId", "")
    APP_PASSWORD = _env("MicrosoftAppPassword", "")
    APP_TYPE = _env("MicrosoftAppType", "MultiTenant")
    APP_TENANTID = _env("MicrosoftAppTenantId", "")


class AuthConfig:
    """Its normal authentication, pointed at botsim."""

    APP_ID = _env("BENCH_APP_ID")
    APP_PASSWORD = _env("BENCH_APP_PASSWORD")
    APP_TYPE = "MultiTenant"
    VALIDATE_AUTHORITY = False
    TO_CHANNEL_FROM_BOT_LOGIN_URL = _env("BENCH_AAD_URL") + "/botframework.com"
    TO_CHANNEL_FROM_BOT_OAUTH_SCOPE = "https://api.botframework.com"
    TO_BOT_FROM_CHANNEL_TOKEN_ISSUER = "https://api.botframework.com"
    TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL = _env("BENCH_OPENID_METADATA_URL")
    TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL = _env("BENCH_EMULATOR_OPENID_METADATA_URL")


Config = AuthConfig if _env("BENCH_APP_ID") else LocalConfig


class EchoBot(ActivityHandler):
    async def on_message_activity(self, turn_context: TurnContext) -> None:
        text = turn_context.activity.text or ""
        await turn_context.send_activity(MessageFactory.text(f"Echo: {text}"))


async def on_error(context: TurnContext, error: Exception) -> None:
    await context.send_activity("The bot encountered an error or bug.")


ADAPTER = CloudAdapter(ConfigurationBotFrameworkAuthentication(Config()))
ADAPTER.on_turn_error = on_error
BOT = EchoBot()


async def handle(body: bytes, headers: Mapping[str, str]) -> int:
    """One POST /api/messages, as CloudAdapter.process handles it; returns the HTTP status."""
    if "application/json" not in headers.get("Content-Type", ""):
        return 415
    activity = Activity().deserialize(json.loads(body))
    if not activity.type:
        return 400
    try:
        invoke_response = await ADAPTER.process_activity(
            headers.get("Authorization", ""), activity, BOT.on_turn
        )
    except PermissionError:
        return 401
    return invoke_response.status if invoke_response else 201
