"""Echo bot on the Microsoft Teams SDK for Python 2.1 (microsoft-teams-apps), default hosting.

``App`` with the bot's client id and secret and a cloud environment (the SDK's own
setting for sovereign clouds) whose OpenID metadata and login endpoint are botsim's;
``app.start(port)`` serves it as the SDK does by default. MSAL's instance discovery,
which the SDK has no setting for, is turned off (see local_msal.py). Runs only in
.tools/bench-teams; settings come from BENCH_* environment variables.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msal

from benchmarks.peers.local_msal import without_instance_discovery

without_instance_discovery(msal)

from microsoft_teams.api import MessageActivity  # noqa: E402
from microsoft_teams.api.auth.cloud_environment import PUBLIC, with_overrides  # noqa: E402
from microsoft_teams.apps import ActivityContext, App  # noqa: E402

CLOUD = with_overrides(
    PUBLIC,
    login_endpoint=os.environ["BENCH_AAD_URL"],
    openid_metadata_url=os.environ["BENCH_OPENID_METADATA_URL"],
)
app = App(
    client_id=os.environ["BENCH_APP_ID"],
    client_secret=os.environ["BENCH_APP_PASSWORD"],
    cloud=CLOUD,
)


@app.on_message
async def on_message(ctx: ActivityContext[MessageActivity]) -> None:
    await ctx.send(f"Echo: {ctx.activity.text or ''}")


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"))
    asyncio.run(app.start(int(os.environ["BENCH_PORT"])))
