"""Echo agent on the Microsoft 365 Agents SDK (1.9), as its quickstart sample builds it.

Importing this module builds the connection manager, adapter and agent application at
module level, like the sample. :func:`handle` does what the sample's aiohttp server does for
one request (the JWT middleware's ``_authorize_request``, then ``CloudAdapter.process`` via the
SDK's framework-neutral ``process_request``), without a web server.

With BENCH_APP_ID set, authentication is the SDK's own, configured against botsim (its JWT
check against botsim's JWKS, MSAL for the bot's token from the fake AAD, MSAL's instance
discovery off); otherwise the sample's local mode (no client id, anonymous allowed).
benchmarks/peers/agents_server.py serves this module's agent with the quickstart's aiohttp
server, always authenticated.

Runs in the benchmark's SDK venv (.tools/bench-sdk-venv) and in .tools/bench-agents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

if os.environ.get("BENCH_APP_ID"):
    import msal

    from benchmarks.peers.local_msal import without_instance_discovery

    without_instance_discovery(msal)

from microsoft_agents.activity import load_configuration_from_env
from microsoft_agents.authentication.msal import MsalConnectionManager
from microsoft_agents.hosting.aiohttp import CloudAdapter
from microsoft_agents.hosting.core import (
    AgentApplication,
    Authorization,
    MemoryStorage,
    TurnContext,
    TurnState,
)
from microsoft_agents.hosting.core.authorization.jwt import (
    _authorize_request,
    jwt_token_validator,
)
from microsoft_agents.hosting.core.http import HttpResponse


def _env(name: str) -> str:
    return os.environ.get(name, "")


def _environment() -> dict[str, str]:
    """The sample's .env: no client id plus ANONYMOUS_ALLOWED = local unauthenticated mode;
    with BENCH_APP_ID, its normal authentication against botsim."""
    settings = "CONNECTIONS__SERVICE_CONNECTION__SETTINGS__"
    if _env("BENCH_APP_ID"):
        jwt_token_validator.BOTFRAMEWORK_JWKS_URIS["https://api.botframework.com"] = _env(
            "BENCH_JWKS_URL"
        )
        return {
            f"{settings}CLIENTID": _env("BENCH_APP_ID"),
            f"{settings}CLIENTSECRET": _env("BENCH_APP_PASSWORD"),
            f"{settings}AUTHORITY": _env("BENCH_AAD_URL") + "/botframework.com",
            f"{settings}TENANTID": "botframework.com",
        }
    client_id = _env("MicrosoftAppId")
    env = {f"{settings}ANONYMOUS_ALLOWED": "false" if client_id else "true"}
    if client_id:
        env[f"{settings}CLIENTID"] = client_id
        env[f"{settings}CLIENTSECRET"] = _env("MicrosoftAppPassword")
        env[f"{settings}TENANTID"] = _env("MicrosoftAppTenantId")
    return env


AGENTS_SDK_CONFIG = load_configuration_from_env(_environment())
STORAGE = MemoryStorage()
CONNECTION_MANAGER = MsalConnectionManager(**AGENTS_SDK_CONFIG)
ADAPTER = CloudAdapter(connection_manager=CONNECTION_MANAGER)
AUTHORIZATION = Authorization(STORAGE, CONNECTION_MANAGER, **AGENTS_SDK_CONFIG)
AGENT_APP = AgentApplication[TurnState](
    storage=STORAGE, adapter=ADAPTER, authorization=AUTHORIZATION, **AGENTS_SDK_CONFIG
)


@AGENT_APP.activity("message")
async def on_message(context: TurnContext, _state: TurnState) -> None:
    await context.send_activity(f"Echo: {context.activity.text or ''}")


class _Request:
    """The SDK's HttpRequestProtocol over raw bytes (what its aiohttp adapter wraps)."""

    def __init__(self, body: bytes, headers: Mapping[str, str], claims: Any) -> None:
        self.method = "POST"
        self.headers = headers
        self._body = body
        self._claims = claims

    async def json(self) -> Any:
        if "application/json" not in self.headers.get("Content-Type", ""):
            raise ValueError("unsupported content type")
        return json.loads(self._body)

    def get_claims_identity(self) -> Any:
        return self._claims

    def get_path_param(self, name: str) -> str:
        raise KeyError(name)


async def handle(body: bytes, headers: Mapping[str, str]) -> int:
    """One POST /api/messages, as the sample's server handles it; returns the HTTP status."""
    auth_config = CONNECTION_MANAGER.get_default_connection_configuration()
    claims = await _authorize_request(headers.get("Authorization"), auth_config)
    if isinstance(claims, HttpResponse):
        return claims.status_code
    response = await ADAPTER.process_request(_Request(body, headers, claims), AGENT_APP)
    return response.status_code
