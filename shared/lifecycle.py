"""Keep the reference store in step with the conversations the bot is in.

The inbound pipeline calls :func:`record_activity` for every authenticated activity:

| activity                                                      | effect                 |
|---------------------------------------------------------------|------------------------|
| installationUpdate `add` / `add-upgrade`                      | add or refresh         |
| conversationUpdate with the bot in `membersAdded`             | add or refresh         |
| conversationUpdate, Teams `eventType` `teamRestored`          | add again              |
| installationUpdate `remove` / `remove-upgrade`                | remove                 |
| conversationUpdate with the bot in `membersRemoved`           | remove                 |
| ... with Teams `eventType` `channelMemberRemoved`              | remove that channel    |
|     (the bot disallowed in one shared channel)                 | only                   |
| conversationUpdate, Teams `eventType` `teamDeleted` / `teamHardDeleted` | remove       |
| conversationUpdate, Teams `eventType` `channelDeleted`        | refresh, and remove the   |
|                                                               | `channelData.channel` one |
| conversationUpdate, Teams `eventType` `channelRestored`       | refresh, and add the      |
|                                                               | `channelData.channel` one |
| invoke `composeExtension/…` (a message extension)              | nothing                |
| anything else                                                 | store when new or changed |

A removal deletes the bot state of each conversation it removes with its reference (the
state first, so a retry after a failure still finds the reference): the conversation's
state and, for a Teams channel, the state of every thread of it (``;messageid=…``, each
thread has its own). A user's own state stays: it is not the conversation's
(:mod:`shared.userdata` erases it).

"Add or refresh" bypasses the store's in-process cache (another instance may have removed
the reference meanwhile); "when new or changed" does not, so a chatty conversation costs no
storage call per message. A message extension is used in whatever chat the user is typing
in, one the bot is usually not a member of (a chat between two people included): its
invokes name that chat, so they are not recorded. Removing a Teams team's conversation
also removes the stored references of the team's channels (same `channelData.team.id`),
but for the bot disallowed in one of the team's shared channels, which Teams tells with a
`channelMemberRemoved` naming the bot and the team (:func:`removed_team`). A
Teams channel is stored once, under its channel id: the `;messageid=…` thread suffix of its
activities is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shared.activity import (
    TEAMS_CHANNEL,
    channel_data,
    conversation_reference,
    from_teams,
    is_bot_account,
    is_message_extension,
    teams_team_id,
    teams_tenant_id,
)
from shared.diagnostics import clip
from shared.references.contract import ReferenceStore, reference_key
from shared.references.keys import split_key
from shared.removals import removed_since, removing
from shared.state import conversation_state_key

if TYPE_CHECKING:
    from shared.state import StateStore

logger = logging.getLogger(__name__)

_REMOVAL_EVENTS = frozenset({"teamDeleted", "teamHardDeleted"})
TEAM_PAGE_SIZE = 25  # a removed team's channel references deleted at once
_THREAD_MARKER = ";messageid="


class Change(StrEnum):
    ADD = "add"  # make sure it is stored and current (cache bypassed)
    REMOVE = "remove"
    REFRESH = "refresh"  # store when new or materially changed


def classify(activity: Mapping[str, Any]) -> Change:
    """What `activity` means for the stored reference of its conversation."""
    kind = activity.get("type")
    if kind == "installationUpdate":
        action = str(activity.get("action") or "").lower()
        if action in ("add", "add-upgrade"):
            return Change.ADD
        if action in ("remove", "remove-upgrade"):
            return Change.REMOVE
        return Change.REFRESH
    if kind == "conversationUpdate":
        # A Teams field (elsewhere the client writes channelData), and text when it is one.
        event = channel_data(activity).get("eventType") if from_teams(activity) else None
        if not isinstance(event, str):
            event = None
        if event in _REMOVAL_EVENTS:
            return Change.REMOVE
        if event == "teamRestored":
            return Change.ADD
        if _includes_bot(activity, "membersRemoved"):
            return Change.REMOVE
        if _includes_bot(activity, "membersAdded"):
            return Change.ADD
    return Change.REFRESH


async def record_activity(
    store: ReferenceStore,
    activity: Mapping[str, Any],
    change: Change | None = None,
    *,
    state: StateStore | None = None,
    started: float | None = None,
) -> None:
    """Add, refresh or remove the activity's conversation reference (see the module table;
    `change`: what :func:`classify` said of it, when the caller already asked). A removal
    also deletes the removed conversations' state from `state`, when given. `started`
    (time.monotonic()): when the activity's turn began; a refresh of a conversation this
    process removed since then writes nothing (shared/removals.py).

    Raises StoreError (StateError) when storage fails; the pipeline logs it and still
    answers the user, but for a removal, a Teams addition and a Teams channel deleted or
    restored, which fail the answer (shared/messages.py).
    """
    if is_message_extension(activity):
        return
    reference = _reference(activity)
    try:
        key = reference_key(reference)
    except ValueError as exc:
        logger.warning("references: activity %s not recorded: %s", clip(activity.get("id")), exc)
        return
    team_id = teams_team_id(activity)
    change = classify(activity) if change is None else change
    if change is Change.REMOVE:
        shared = _named_channel(activity, key, "channelMemberRemoved")
        if shared is not None:
            # The bot disallowed in a shared channel, told in another of the team's
            # conversations (its General channel): that channel goes, not this one.
            await _forget_channel(store, state, shared)
            return
        await _remove(store, state, key, reference, removed_team(activity), activity.get("id"))
        return
    if change is Change.REFRESH and started is not None and removed_since(key, started):
        logger.info("references: %s was removed during its turn; not recorded again", clip(key))
        return
    written = await store.upsert(reference, team_id=team_id, refresh=change is Change.ADD)
    if written:
        logger.debug(
            "references: %s %s for activity %s", change.value, clip(key), clip(activity.get("id"))
        )
    restored = _named_channel(activity, key, "channelRestored")
    if restored is not None:
        # Its reference went with channelDeleted: the team's own, under the channel's id.
        try:
            planned = _channel_reference(reference, restored)
        except ValueError:  # an id no conversation of the bot's can have
            logger.debug("references: restored channel %s is no key", clip(restored))
        else:
            await store.upsert(planned, team_id=team_id, refresh=True)
            logger.debug("references: added restored channel %s", clip(restored))
    deleted = _named_channel(activity, key, "channelDeleted")
    if deleted is not None:
        # Named by the team's event (its conversation is the team's General channel): the
        # deleted channel's reference and state go, or broadcasts would keep trying it.
        await _forget_channel(store, state, deleted)


async def _forget_channel(store: ReferenceStore, state: StateStore | None, key: str) -> None:
    """Remove the Teams channel `key` (named by an event of another conversation) with its
    threads' state."""
    channel = {"channelId": TEAMS_CHANNEL, "conversation": {"conversationType": "channel"}}
    try:
        if await forget_conversation(store, state, key, channel):
            logger.debug("references: removed channel %s", clip(key))
    except ValueError:  # an id no conversation of the bot's can have: nothing stored
        logger.debug("references: channel %s is no key", clip(key))


def channel_event(activity: Mapping[str, Any]) -> str | None:
    """`channelDeleted` or `channelRestored` when `activity` is that Teams event naming one
    of the team's channels (not the team's own): its reference goes, or comes back, with
    the event, which no later activity would redo. None otherwise."""
    event = channel_data(activity).get("eventType") if from_teams(activity) else None
    if event not in ("channelDeleted", "channelRestored"):
        return None
    try:
        key = reference_key(_reference(activity))
    except ValueError:
        return None
    return event if _named_channel(activity, key, event) is not None else None


def removed_team(activity: Mapping[str, Any]) -> str | None:
    """The Teams team a removal takes the bot out of as a whole (all its channels go), or
    None. The bot disallowed in one shared channel comes as its removal from that channel
    (`membersRemoved`, eventType `channelMemberRemoved`) with the team's id alongside: the
    team, its other channels included, keeps the bot."""
    if channel_data(activity).get("eventType") == "channelMemberRemoved":
        return None
    return teams_team_id(activity)


def _named_channel(activity: Mapping[str, Any], key: str, event: str) -> str | None:
    """The key of the channel a Teams `event` (channelDeleted, channelRestored,
    channelMemberRemoved) names in
    `channelData.channel`, or None (another event; none named; the team's own channel)."""
    if not from_teams(activity) or activity.get("type") != "conversationUpdate":
        return None
    data = channel_data(activity)
    channel = data.get("channel")
    channel_id = channel.get("id") if isinstance(channel, Mapping) else None
    if data.get("eventType") != event or not isinstance(channel_id, str) or not channel_id:
        return None
    named = f"{TEAMS_CHANNEL}/{channel_id.split(_THREAD_MARKER, 1)[0]}"
    return named if named != key else None  # never the team's own conversation


def _channel_reference(team: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The reference of the team's channel `key`: the team's (the event's own
    conversation: serviceUrl, bot, tenant), its conversation the channel."""
    conversation = {"id": split_key(key)[1], "conversationType": "channel", "isGroup": True}
    tenant = team["conversation"].get("tenantId")
    if tenant:
        conversation["tenantId"] = tenant
    reference = {name: value for name, value in team.items() if name != "activityId"}
    reference["conversation"] = conversation
    return reference


def _reference(activity: Mapping[str, Any]) -> dict[str, Any]:
    """The activity's reference as stored: the channel, not the thread; tenant included."""
    reference = conversation_reference(activity)
    conversation = reference.get("conversation")
    if not isinstance(conversation, Mapping):
        return reference
    conversation = dict(conversation)
    tenant = teams_tenant_id(activity)
    if tenant and not conversation.get("tenantId"):
        conversation["tenantId"] = tenant
    conversation_id = conversation.get("id")
    if (
        reference.get("channelId") == "msteams"
        and conversation.get("conversationType") == "channel"
        and isinstance(conversation_id, str)
        and _THREAD_MARKER in conversation_id
    ):
        # Teams gives each channel thread its own id ("19:…@thread.tacv2;messageid=…").
        # Proactive messages go to the channel, so one reference per channel, not per thread.
        conversation["id"] = conversation_id.split(_THREAD_MARKER, 1)[0]
        reference.pop("activityId", None)  # it belongs to the thread
    reference["conversation"] = conversation
    return reference


async def _remove(
    store: ReferenceStore,
    state: StateStore | None,
    key: str,
    reference: Mapping[str, Any],
    team_id: str | None,
    activity_id: Any,
) -> None:
    removed = 1 if await forget_conversation(store, state, key, reference) else 0
    if team_id:
        # The bot left (or lost) a whole team: its channels' references are useless too.
        # Team ids are unique across tenants, so no tenant filter (older documents may lack it).
        # A page's deletes run side by side (a team may hold hundreds of channels).
        continuation = None
        while True:
            page = await store.list(
                channel_id=reference["channelId"],
                team_id=team_id,
                continuation=continuation,
                page_size=TEAM_PAGE_SIZE,
            )
            deleted = await asyncio.gather(
                *(
                    forget_conversation(store, state, item.key, item.reference)
                    for item in page.items
                )
            )
            removed += sum(deleted)
            continuation = page.continuation
            if continuation is None:
                break
    logger.debug(
        "references: removed %d for %s (activity %s)", removed, clip(key), clip(activity_id)
    )


async def forget_conversation(
    store: ReferenceStore,
    state: StateStore | None,
    key: str,
    reference: Mapping[str, Any],
    *,
    note: bool = True,
) -> bool:
    """Delete a conversation's state (a Teams channel's: its threads' too), then its
    reference (`reference` as stored under `key`); whether the reference was there. State
    first: should a delete fail, the caller fails and its retry still finds the reference
    to finish with. Removals and the proactive engine's pruning both come here: once the
    reference is gone, nothing can find the conversation's state again. `note`: remembered
    (shared/removals.py) so a turn still running there does not write it back; not for a
    prune (a send found it gone: no turn runs there, and thousands of prunes would crowd
    out the removals that matter)."""
    channel_id, conversation_id = split_key(key)
    state_key = conversation_state_key(channel_id, conversation_id)
    with removing(key, state_key) if note else contextlib.nullcontext():
        if state is not None:
            if _is_channel(reference):
                thread = conversation_state_key(channel_id, conversation_id + _THREAD_MARKER)
                await state.delete_prefixed(thread)
            await state.delete(state_key)
        return await store.delete(key)


def _is_channel(reference: Mapping[str, Any]) -> bool:
    """A Teams channel, whose threads each have a state of their own."""
    conversation = reference.get("conversation")
    return (
        reference.get("channelId") == TEAMS_CHANNEL
        and isinstance(conversation, Mapping)
        and conversation.get("conversationType") == "channel"
    )


def _includes_bot(activity: Mapping[str, Any], field: str) -> bool:
    recipient = activity.get("recipient")
    bot_id = recipient.get("id") if isinstance(recipient, Mapping) else None
    members = activity.get(field)
    if not isinstance(members, list):
        return False
    return any(is_bot_account(member, bot_id) for member in members)
