"""Broadcast with the Bot Framework SDK 4.17: ``CloudAdapter.continue_conversation`` per reference.

As the SDK's proactive-messages sample does: for each stored ConversationReference,
``continue_conversation(reference, callback, app_id)`` with ``turn_context.send_activity``
in the callback. The adapter is the echo server's (sdk/botbuilder_echo.py), so the bot's
authentication is configured exactly as there (its token from botsim's fake AAD). No
server runs: only the loop (broadcast_loop.py). Runs only in .tools/bench-botbuilder.
"""

from __future__ import annotations

from typing import Any

from botbuilder.core import MessageFactory, TurnContext
from botbuilder.schema import ConversationReference

from benchmarks.peers import broadcast_loop
from benchmarks.sdk.botbuilder_echo import ADAPTER, Config


async def send(reference: dict[str, Any], text: str) -> None:
    async def callback(turn_context: TurnContext) -> None:
        await turn_context.send_activity(MessageFactory.text(text))

    await ADAPTER.continue_conversation(
        ConversationReference().deserialize(reference), callback, Config.APP_ID
    )


if __name__ == "__main__":
    broadcast_loop.main(send)
