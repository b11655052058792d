"""Erasing what the bot keeps about a user: their state and their conversation references.

Called through :func:`erase_user_data` (an operator's or the bot's own request) and by the
messages pipeline on the channel's ``deleteUserData`` activity. It removes the user's
state on the channel, every stored 1:1 conversation with them (the reference, so no
later broadcast or send by conversation key finds them, and that conversation's state).
Group conversations are not the user's: they stay (their references keep nobody's
account or locale, only the conversation's and the bot's). It is not a block list: a `user` or
`reference` target names the user itself and still reaches them (a `user` target stores
the 1:1 again), and a broadcast fanned out before the erasure still reaches them (its
queued messages carry the references they were listed with).

The 1:1s are found through the user's index (:mod:`shared.references`), which lists their
most recent ``INDEX_KEYS``; when it says it overflowed (a user with more conversations than
that, e.g. a Web Chat conversation per visit), or is nearly full (conversations recorded as
the erasure starts could push one out), the channel's references are listed as well.
An erasure marks the index that way before it deletes anything and clears the mark once
all is erased: after a failure part-way (a 1:1 whose index write failed after its
document's, a delete stopped with a re-create under way), only the listing that the mark
asks for is sure to find what is left.
An aadObjectId names a user on Teams only: elsewhere the client writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.activity import TEAMS_CHANNEL, conversation_key
from shared.references.contract import INDEX_KEYS, StoredReference, is_personal, user_matches
from shared.removals import removing
from shared.state import StateStore, conversation_state_key, user_state_key

if TYPE_CHECKING:
    from shared.references.contract import ReferenceStore

logger = logging.getLogger(__name__)

MAX_CONVERSATIONS = INDEX_KEYS  # 1:1s taken from the user index per call (past it: listing)
LISTING_PAGE = 1000  # references per page when the channel is listed


@dataclass(slots=True)
class Erased:
    """What was removed."""

    user_state: bool = False  # some user state (one per user id the user goes by)
    conversations: list[str] = field(default_factory=list)  # conversation keys


async def erase_user_data(
    *,
    channel_id: str,
    user_id: str | None = None,
    aad_object_id: str | None = None,
    state: StateStore | None,
    references: ReferenceStore,
    by_owner: bool = True,
) -> Erased:
    """Remove a user's state and 1:1 conversations on `channel_id`: the user state of
    `user_id`, of every user id their 1:1s name, and (on msteams, `by_owner`: one listing
    of the channel's user states) every user state saved with `aad_object_id` as its
    owner (so an aadObjectId alone erases it too).
    Idempotent: a retry after a storage failure finishes the job. Raises StoreError /
    StateError; ValueError when nobody is named (an aadObjectId names nobody off Teams)."""
    if aad_object_id and channel_id != TEAMS_CHANNEL:
        aad_object_id = None  # written by the client there: never an identity
    if not channel_id or not (user_id or aad_object_id):
        raise ValueError(
            "erase_user_data needs channel_id and user_id (or, on msteams, aad_object_id)"
        )
    erased = Erased()
    users_done: set[str] = set()
    overflowed = False
    names = [(user_id, aad_object_id)]
    if aad_object_id and aad_object_id != user_id:
        # A 1:1 the bot opened for a `user` target named by the aadObjectId has it for its
        # user id (until the user writes in it): indexed, and matched, under that id.
        names.append((aad_object_id, None))
    for place, (named_id, named_aad) in enumerate(names):
        eraser = _Eraser(channel_id, named_id, named_aad, state, references, erased, users_done)
        overflowed = await _erase_indexed(eraser, settle_writes=place == 0) or overflowed
    if user_id:
        await eraser.user_state(user_id)
    # Saved on Teams, a user state names its owner's aadObjectId: found by it also with
    # no 1:1 to name the user id (a user of channels only, or after an uninstall).
    if (
        by_owner
        and aad_object_id
        and state is not None
        and await state.delete_user_states(channel_id, aad_object_id)
    ):
        erased.user_state = True
    logger.info(
        "userdata: erased channel=%r user state=%s conversations=%d (channel listed: %s)",
        channel_id,
        erased.user_state,
        len(erased.conversations),
        overflowed,
    )
    return erased


async def _erase_indexed(eraser: _Eraser, *, settle_writes: bool) -> bool:
    """Erase the 1:1s the user's index (by the eraser's names) lists, or the channel's
    listing finds; whether the index had overflowed. `settle_writes`: wait for this
    process's writes of the channel still under way first (once per erasure)."""
    references = eraser.references
    lookup = {
        "channel_id": eraser.channel_id,
        "user_id": eraser.user_id,
        "aad_object_id": eraser.aad_object_id,
    }
    overflowed = await references.user_index_overflowed(**lookup)
    # A 1:1 the index may not name (its index write failed after its document's): only a
    # listing finds it. The mark makes a retry list (an index nearly full, listed now, may
    # be much less full by then).
    await references.mark_user_index(**lookup)
    if settle_writes:
        await references.settle_writes(eraser.channel_id)
    if overflowed:
        await eraser.listed()
    for _ in range(MAX_CONVERSATIONS + 1):  # a full index, then the None that ends it
        found = await references.find_by_user(**lookup)
        if found is None:
            break
        if found.key in eraser.erased.conversations:
            # Stored again meanwhile (the user's new message): the index starts over with
            # it, so the rest are found by listing (which leaves that one, as it is new).
            await eraser.listed()
            break
        await eraser.one(found)
    else:  # still finding more (written meanwhile): list the channel as well
        await eraser.listed()
    # Only now, everything erased: a failure before leaves the mark for a retry. What the
    # index still lists that is no longer the user's goes with it.
    await references.settle_user_index(**lookup)
    return overflowed


@dataclass(slots=True)
class _Eraser:
    channel_id: str
    user_id: str | None
    aad_object_id: str | None
    state: StateStore | None
    references: ReferenceStore
    erased: Erased = field(default_factory=Erased)
    _users_done: set[str] = field(default_factory=set)  # user states deleted (or absent)

    async def one(self, found: StoredReference) -> None:
        """A 1:1: its state and its user's state first, then the reference, so a retry
        after a failure still finds the conversation (and the user id it names)."""
        state_key = conversation_state_key(found.channel_id, found.conversation_id)
        with removing(found.key, state_key):
            if self.state is not None:
                await self.state.delete(state_key)
            if found.user_id:
                await self.user_state(found.user_id)
            await self.references.delete(found.key)
        self.erased.conversations.append(found.key)

    async def listed(self) -> None:
        """Every 1:1 of the user among the channel's references (paged)."""
        continuation = None
        while True:
            page = await self.references.list(
                channel_id=self.channel_id, continuation=continuation, page_size=LISTING_PAGE
            )
            for stored in page.items:
                if (
                    user_matches(stored, self.user_id, self.aad_object_id, None)
                    and stored.key not in self.erased.conversations
                ):
                    await self.one(stored)
            continuation = page.continuation
            if continuation is None:
                return

    async def user_state(self, user_id: str) -> None:
        if self.state is None or user_id in self._users_done:
            return
        key = user_state_key(self.channel_id, user_id)
        with removing(key):
            deleted = await self.state.delete(key)
        if deleted:
            self.erased.user_state = True
        self._users_done.add(user_id)


async def erase_for_activity(
    activity: Mapping[str, Any], *, state: StateStore | None, references: ReferenceStore
) -> Erased:
    """Act on a ``deleteUserData`` activity: erase the data of its sender (`from`; their
    aadObjectId on Teams only, where the channel vouches for it)."""
    sender = activity.get("from") or {}
    channel_id = activity["channelId"]
    user_id = sender.get("id") if isinstance(sender.get("id"), str) else None
    aad = sender.get("aadObjectId") if isinstance(sender.get("aadObjectId"), str) else None
    if channel_id != TEAMS_CHANNEL:
        aad = None
    if not (user_id or aad):
        return Erased()  # nobody named: nothing to erase
    erased = await erase_user_data(
        channel_id=channel_id,
        user_id=user_id or None,
        aad_object_id=aad or None,
        state=state,
        references=references,
        # The sender's own user state goes by its id; a listing of every user state of
        # the channel would not fit in the channel's wait for a large bot.
        by_owner=user_id is None,
    )
    conversation = activity.get("conversation")
    conversation_id = conversation.get("id") if isinstance(conversation, Mapping) else None
    if isinstance(conversation_id, str) and conversation_id and is_personal(activity):
        # Asked in the user's own 1:1, erased whatever its index says: its reference's
        # write may have failed after its turn (only logged) while its state was saved.
        key = conversation_key(channel_id, conversation_id)
        try:
            state_key = conversation_state_key(channel_id, conversation_id)
        except ValueError:  # no state can be kept under such an id
            return erased
        if key not in erased.conversations:
            with removing(key, state_key):
                had_state = state is not None and await state.delete(state_key)
                had_reference = await references.delete(key)
            if had_reference or had_state:
                erased.conversations.append(key)
    return erased
