"""Erasing what the bot keeps about a user: their state and their conversation references.

Called through :func:`erase_user_data` (an operator's or the bot's own request) and by the
messages pipeline on the channel's ``deleteUserData`` activity. It removes the user's
state on the channel, every stored 1:1 conversation with them (the reference, so no
proactive message reaches them, and that conversation's state). Group conversations are
not the user's: they stay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.state import StateStore, conversation_state_key, user_state_key

if TYPE_CHECKING:
    from shared.references.contract import ReferenceStore

logger = logging.getLogger(__name__)

MAX_CONVERSATIONS = 256  # 1:1 conversations erased per call (a user has a few at most)


@dataclass(slots=True)
class Erased:
    """What was removed."""

    user_state: bool = False
    conversations: list[str] = field(default_factory=list)  # conversation keys


async def erase_user_data(
    *,
    channel_id: str,
    user_id: str | None = None,
    aad_object_id: str | None = None,
    state: StateStore | None,
    references: ReferenceStore,
) -> Erased:
    """Remove a user's state and 1:1 conversations on `channel_id`. Idempotent: a retry
    after a storage failure finishes the job. Raises StoreError / StateError."""
    if not channel_id or not (user_id or aad_object_id):
        raise ValueError("erase_user_data needs channel_id and user_id or aad_object_id")
    erased = Erased()
    for _ in range(MAX_CONVERSATIONS):
        found = await references.find_by_user(
            channel_id=channel_id, user_id=user_id, aad_object_id=aad_object_id
        )
        if found is None or found.key in erased.conversations:
            break
        # The conversation's state first: if the reference delete then fails, a retry
        # still finds the conversation and finishes.
        if state is not None:
            await state.delete(conversation_state_key(found.channel_id, found.conversation_id))
        await references.delete(found.key)
        erased.conversations.append(found.key)
    if state is not None and user_id:
        erased.user_state = await state.delete(user_state_key(channel_id, user_id))
    logger.info(
        "userdata: erased channel=%r user state=%s conversations=%d",
        channel_id,
        erased.user_state,
        len(erased.conversations),
    )
    return erased


async def erase_for_activity(
    activity: Mapping[str, Any], *, state: StateStore | None, references: ReferenceStore
) -> Erased:
    """Act on a ``deleteUserData`` activity: erase the data of its sender (`from`)."""
    sender = activity.get("from") or {}
    user_id = sender.get("id") if isinstance(sender.get("id"), str) else None
    aad = sender.get("aadObjectId") if isinstance(sender.get("aadObjectId"), str) else None
    if not (user_id or aad):
        return Erased()  # nobody named: nothing to erase
    return await erase_user_data(
        channel_id=activity["channelId"],
        user_id=user_id or None,
        aad_object_id=aad or None,
        state=state,
        references=references,
    )
