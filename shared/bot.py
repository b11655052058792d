"""The bot: what it says and does. This is the file a bot author edits.

The shipped bot echoes every message and welcomes people who join. Everything else is
done for it before a handler runs: the request is authenticated and validated, and the
conversation is remembered (its reference stored) so proactive messages can reach it
later. Add handlers with the decorators of :class:`shared.router.Router`; routes are
tried in the order they appear here and the first match wins.
"""

from __future__ import annotations

from shared.router import Router
from shared.turn import TurnContext

router = Router()


@router.members_added()
async def welcome(turn: TurnContext) -> None:
    """Greet people added to the conversation (the bot joining is not greeted)."""
    names = ", ".join(member.get("name") or "there" for member in turn.members_added)
    await turn.send(f"Welcome, {names}! Send me a message and I will echo it.")


@router.message()
async def echo(turn: TurnContext) -> None:
    """Answer every message with a reply that repeats its text."""
    await turn.reply(f"Echo: {turn.text}")
