"""The bot: what it says and does. This is the file a bot author edits.

The shipped bot echoes every message and welcomes people who join. Everything else is
done for it before a handler runs: the request is authenticated and validated, and the
conversation is remembered (its reference stored) so proactive messages can reach it
later. Add handlers with the decorators of :class:`shared.router.Router`; routes are
tried in the order they appear here and the first match wins.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.activity import is_bot_account
from shared.router import Router
from shared.turn import TurnContext

logger = logging.getLogger(__name__)

router = Router()

HINT = "Send me a message and I will echo it."
NOTHING_TO_ECHO = (
    "Your message had no text for me to echo (a card, a file or an empty message?). "
    "Type some words and I will send them back."
)
# Teams sends members without names; looking each up costs a Connector call, so only a
# few, each bounded, while the channel waits for the HTTP answer.
NAME_LOOKUPS = 3
NAME_LOOKUP_SECONDS = 2.0


@router.members_added()
async def welcome(turn: TurnContext) -> None:
    """Greet people added to the conversation by name when the channel says who they are
    (the bot joining is not greeted)."""
    members = turn.members_added
    names = [member.get("name") or "" for member in members]
    unnamed = [i for i, name in enumerate(names) if not name][:NAME_LOOKUPS]
    if unnamed and turn.activity.get("channelId") == "msteams":
        found = await asyncio.gather(*(member_name(turn, members[i]) for i in unnamed))
        for i, name in zip(unnamed, found, strict=True):
            names[i] = name
    # Plain text: a display name is anyone's to choose, and Markdown in it (a link) would
    # be shown as the bot's own.
    await turn.send({"type": "message", "text": greeting(names), "textFormat": "plain"})


def greeting(names: list[str]) -> str:
    known = [name.strip() for name in names if name and name.strip()]
    if not known:
        return f"Welcome! {HINT}"
    who = known[0] if len(known) == 1 else f"{', '.join(known[:-1])} and {known[-1]}"
    if len(known) < len(names):
        who += " and everyone else who joined"
    return f"Welcome, {who}! {HINT}"


async def member_name(turn: TurnContext, member: dict[str, Any]) -> str:
    """The member's display name from the Connector, or "" when it cannot be had quickly."""
    lookup = getattr(turn.connector, "get_conversation_member", None)
    member_id = member.get("id")
    if lookup is None or not isinstance(member_id, str) or not member_id:
        return ""
    try:
        async with asyncio.timeout(NAME_LOOKUP_SECONDS):
            found = await lookup(
                turn.activity["serviceUrl"], turn.activity["conversation"]["id"], member_id
            )
    except Exception as error:  # a greeting without the name is fine; say why at DEBUG
        logger.debug("bot: member name not looked up: %s", type(error).__name__)
        return ""
    name = found.get("name") if isinstance(found, dict) else None
    return name if isinstance(name, str) else ""


@router.message()
async def echo(turn: TurnContext) -> None:
    """Answer every message with a reply that repeats its text (or says there was none);
    not the bot's own, which a channel may pass back: echoed, it would come back again."""
    if is_bot_account(turn.activity.get("from"), turn.bot_id):
        return
    text = turn.text
    # Plain: a user's Markdown (a link saying "sign in again") is not posted as the bot's.
    reply = f"Echo: {text}" if text else NOTHING_TO_ECHO
    await turn.reply({"type": "message", "text": reply, "textFormat": "plain"})
