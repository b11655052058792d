"""Echo agent on the Microsoft 365 Agents SDK 1.9 with its aiohttp hosting, as its quickstart.

Authentication is the SDK's own: its JWT middleware on every request, MSAL for the
bot's token. Two things the SDK has no setting for are pointed at botsim here: the JWKS
address it keeps per Bot Framework issuer (a module-level map), and MSAL's instance
discovery, which asks a Microsoft host about any authority it does not know (botsim's
fake AAD is on loopback, and this machine reaches no Microsoft host). Runs only in
.tools/bench-agents; settings come from BENCH_* environment variables.
"""

from __future__ import annotations

import os

import msal
from aiohttp.web import Application, Request, Response, run_app

from benchmarks.peers.local_msal import without_instance_discovery

without_instance_discovery(msal)

from microsoft_agents.activity import load_configuration_from_env  # noqa: E402
from microsoft_agents.authentication.msal import MsalConnectionManager  # noqa: E402
from microsoft_agents.hosting.aiohttp import (  # noqa: E402
    CloudAdapter,
    jwt_authorization_middleware,
    start_agent_process,
)
from microsoft_agents.hosting.core import (  # noqa: E402
    AgentApplication,
    Authorization,
    MemoryStorage,
    TurnContext,
    TurnState,
)
from microsoft_agents.hosting.core.authorization.jwt import (  # noqa: E402
    jwt_token_validator,
)

jwt_token_validator.BOTFRAMEWORK_JWKS_URIS["https://api.botframework.com"] = os.environ[
    "BENCH_JWKS_URL"
]

SETTINGS = "CONNECTIONS__SERVICE_CONNECTION__SETTINGS__"
CONFIG = load_configuration_from_env(
    {
        f"{SETTINGS}CLIENTID": os.environ["BENCH_APP_ID"],
        f"{SETTINGS}CLIENTSECRET": os.environ["BENCH_APP_PASSWORD"],
        f"{SETTINGS}AUTHORITY": os.environ["BENCH_AAD_URL"] + "/botframework.com",
        f"{SETTINGS}TENANTID": "botframework.com",
    }
)
STORAGE = MemoryStorage()
CONNECTION_MANAGER = MsalConnectionManager(**CONFIG)
ADAPTER = CloudAdapter(connection_manager=CONNECTION_MANAGER)
AUTHORIZATION = Authorization(STORAGE, CONNECTION_MANAGER, **CONFIG)
AGENT_APP = AgentApplication[TurnState](
    storage=STORAGE, adapter=ADAPTER, authorization=AUTHORIZATION, **CONFIG
)


@AGENT_APP.activity("message")
async def on_message(context: TurnContext, _state: TurnState) -> None:
    await context.send_activity(f"Echo: {context.activity.text or ''}")


async def entry_point(request: Request) -> Response:
    return await start_agent_process(request, request.app["agent_app"], request.app["adapter"])


def main() -> None:
    app = Application(middlewares=[jwt_authorization_middleware])
    app.router.add_post("/api/messages", entry_point)
    app["agent_configuration"] = CONNECTION_MANAGER.get_default_connection_configuration()
    app["agent_app"] = AGENT_APP
    app["adapter"] = ADAPTER
    run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
