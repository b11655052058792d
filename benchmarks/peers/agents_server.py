"""Echo agent on the Microsoft 365 Agents SDK 1.9 with its aiohttp hosting, as its quickstart.

The agent application, adapter and connection manager are benchmarks/sdk/agents_echo.py's,
built there with the SDK's own authentication against botsim (BENCH_APP_ID is always set
here): its JWT middleware on every request, checked against botsim's JWKS (the SDK keeps
the JWKS address per Bot Framework issuer in a module-level map, which has no setting),
and MSAL for the bot's token from the fake AAD, with MSAL's instance discovery off (it
asks a Microsoft host, which this machine cannot reach). This module serves them with the
quickstart's aiohttp server. Runs only in .tools/bench-agents; settings come from BENCH_*
environment variables.
"""

from __future__ import annotations

import os

from aiohttp.web import Application, Request, Response, run_app
from microsoft_agents.hosting.aiohttp import jwt_authorization_middleware, start_agent_process

from benchmarks.sdk.agents_echo import ADAPTER, AGENT_APP, CONNECTION_MANAGER


async def entry_point(request: Request) -> Response:
    return await start_agent_process(request, request.app["agent_app"], request.app["adapter"])


def main() -> None:
    if not os.environ.get("BENCH_APP_ID"):
        raise SystemExit("agents_server: BENCH_APP_ID is not set (it always authenticates)")
    app = Application(middlewares=[jwt_authorization_middleware])
    app.router.add_post("/api/messages", entry_point)
    app["agent_configuration"] = CONNECTION_MANAGER.get_default_connection_configuration()
    app["agent_app"] = AGENT_APP
    app["adapter"] = ADAPTER
    run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
