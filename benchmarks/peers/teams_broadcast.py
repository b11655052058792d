"""Broadcast with the Microsoft Teams SDK for Python 2.1: ``app.send(conversation_id, ...)``.

As the SDK's proactive-messaging docs show: ``await app.initialize()`` (credentials and
token manager, no HTTP server), then ``app.send(conversation_id, activity)`` per stored
conversation. The SDK keeps only the conversation id: the serviceUrl is the App's own
(its ``SERVICE_URL`` setting, the global Teams endpoint by default), set by the
benchmark to botsim's Connector; the reference's serviceUrl is not used. The App is the
echo server's (teams_server.py), so authentication is configured exactly as there.

The body names no tenant (only the conversation id): the fake Connector is told each
conversation's tenant by the benchmark, as Teams knows it. No server runs: only the
loop (broadcast_loop.py). Runs only in .tools/bench-teams.
"""

from __future__ import annotations

from typing import Any

from benchmarks.peers import broadcast_loop
from benchmarks.peers.teams_server import app


async def send(reference: dict[str, Any], text: str) -> None:
    await app.send(reference["conversation"]["id"], text)


if __name__ == "__main__":
    broadcast_loop.main(send, setup=app.initialize)
