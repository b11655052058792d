"""Broadcast with the Microsoft 365 Agents SDK 1.9: the adapter's ``continue_conversation``.

For each stored ConversationReference, ``CloudAdapter.continue_conversation(app_id,
reference.get_continuation_activity(), callback)`` with ``context.send_activity`` in the
callback (the 1.9 signature: app id first, then the continuation activity). The
adapter is the echo server's (agents_server.py), so authentication is configured
exactly as there (MSAL against botsim's fake AAD), and so is the adapter's default
``on_turn_error``, which the SDK installs: it catches a failed send and sends the
exception's text to the conversation instead (counted apart by the benchmark). No
server runs: only the loop (broadcast_loop.py). Runs only in .tools/bench-agents.
"""

from __future__ import annotations

import os
from typing import Any

from microsoft_agents.activity import ConversationReference
from microsoft_agents.hosting.core import TurnContext

from benchmarks.peers import broadcast_loop
from benchmarks.peers.agents_server import ADAPTER

APP_ID = os.environ["BENCH_APP_ID"]


async def send(reference: dict[str, Any], text: str) -> None:
    async def callback(context: TurnContext) -> None:
        await context.send_activity(text)

    continuation = ConversationReference.model_validate(reference).get_continuation_activity()
    await ADAPTER.continue_conversation(APP_ID, continuation, callback)


if __name__ == "__main__":
    broadcast_loop.main(send)
