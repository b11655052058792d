"""One proactive send to one target, without bookkeeping (shared/proactive.py adds that).

The target's reference comes from the store (`conversation`), the request (`reference`),
or, for a Teams `user`, their stored 1:1 in that tenant or a new one created through the
Connector and remembered. A conversation the channel says is gone is pruned, but only
the reference that was actually tried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from shared.activity import (
    TEAMS_CHANNEL,
    apply_conversation_reference,
    conversation_key,
    path_id_problem,
)
from shared.config import Settings
from shared.connector.errors import ConnectorError, ErrorKind
from shared.connector.scope import pacing_scope
from shared.diagnostics import clip
from shared.lifecycle import forget_conversation
from shared.proactive_schema import (
    AAD_OBJECT_ID,
    InvalidRequest,
    ProactiveRequest,
    UserTarget,
    parse_request,
)
from shared.references.contract import StoreError, UnreadableDocument
from shared.state import StateError

if TYPE_CHECKING:
    from shared.connector import ConnectorClient
    from shared.ratelimit import Scope
    from shared.references import ReferenceStore
    from shared.state import StateStore

# The engine's logger: one name for every line an operator follows a request by.
logger = logging.getLogger("shared.proactive")


class Parts(Protocol):
    """What delivery uses of the process's runtime, and nothing else (a Runtime has them)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def connector(self) -> ConnectorClient: ...
    @property
    def references(self) -> ReferenceStore: ...
    @property
    def state(self) -> StateStore | None: ...


class Outcome(StrEnum):
    DELIVERED = "delivered"
    PRUNED = "pruned"  # the channel said the conversation is gone; its reference was removed
    UNKNOWN = "unknown"  # no stored reference for the conversation key
    POISONED = "poisoned"  # no retry can deliver it: poison queue with the reason, reported
    # Reported failed; a poison copy holds the request and the reason (but for the failures
    # docs/proactive.md lists without one: an ended fan-out, a removed broadcast child ...).
    FAILED = "failed"
    DUPLICATE = "duplicate"  # the target already had an outcome: nothing sent
    REQUEUED = "requeued"  # a copy was put back on the queue with a delay
    FANNED_OUT = "fanned-out"  # a broadcast enqueued its last page of targets


# ---------------------------------------------------------------------------- one send


async def deliver(body: bytes | str, runtime: Parts) -> Outcome:
    """Parse and send one request, without bookkeeping (the engine adds that).

    Raises InvalidRequest, and what the Connector or the store raised.
    """
    request = parse_request(body)
    if request.broadcast is not None:
        raise InvalidRequest("a broadcast is fanned out, not delivered")
    return await send_one(request, runtime)


async def send_one(request: ProactiveRequest, runtime: Parts) -> Outcome:
    """Send to the request's one target. Raises ConnectorError / StoreError."""
    try:
        target = await resolve(request, runtime)
    except ConnectorError as error:
        if not opening_refused(request, error):
            raise
        return Outcome.PRUNED
    if target is None:
        return Outcome.UNKNOWN
    return await post(request, runtime, target)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a send goes: the reference, and the stored one's key when it came from the store."""

    reference: Mapping[str, Any]
    stored_key: str | None = None


async def resolve(request: ProactiveRequest, runtime: Parts) -> Target | None:
    """The request's target reference (a `user` target's 1:1 is created when it has none);
    None when no reference is stored under the key. Raises ConnectorError / StoreError."""
    if request.user is not None:
        stored_key, reference = await _user_reference(request.user, runtime)
        return Target(reference, stored_key)
    if request.reference is not None:
        return Target(request.reference)
    assert request.key is not None
    stored = await runtime.references.get(request.key)
    return None if stored is None else Target(stored.reference, stored.key)


def opening_refused(request: ProactiveRequest, error: ConnectorError) -> bool:
    """Whether `error`, raised while resolving the request's target, is the channel
    refusing to open a `user` target's 1:1 as gone (the user blocked the bot, the app is
    not installed for them): as final as a stored conversation answering so, and reported
    the same way (pruned, with nothing stored to prune), not as a failure each time."""
    if request.user is None or error.kind is not ErrorKind.GONE:
        return False
    logger.info(
        "proactive %r: the channel will not open a 1:1 with %s (%s); nothing sent",
        request.id,
        request.logged,
        clip(error.code) if error.code else error.status,
    )
    return True


def child_scope(request: ProactiveRequest, runtime: Parts) -> Scope | None:
    """The scope a request that carries its reference (a broadcast child) will be paced
    under, known before anything is claimed; None for other requests, and for a serviceUrl
    the send refuses (and says why)."""
    reference = request.reference
    if reference is None or not request.engine.child:
        return None
    target = runtime.connector.trusted_target(reference["serviceUrl"])
    if target is None:
        return None
    conversation_id = reference["conversation"]["id"]
    activity = apply_conversation_reference(request.activity, reference)
    # The scope the send itself will be paced under (ConnectorClient, its one request path).
    return pacing_scope(target, conversation_id, activity)


async def post(request: ProactiveRequest, runtime: Parts, target: Target) -> Outcome:
    """Send the activity to the resolved target. Raises ConnectorError / StoreError.

    Gone: only the reference that was tried is pruned. For an inline `reference` target
    that is the stored one only when it names the same serviceUrl and conversation (the
    producer's copy may be stale while the stored one, under the same key, works).
    """
    stored_key, reference = target.stored_key, target.reference
    activity = apply_conversation_reference(request.activity, reference)
    try:
        await runtime.connector.background().send_to_conversation(
            reference["serviceUrl"], reference["conversation"]["id"], activity
        )
    except ConnectorError as error:
        if error.kind is not ErrorKind.GONE:
            raise
        pruned = await _prune(runtime, stored_key, request.key, reference)
        logger.info(
            "proactive %r: %s is gone (%s); %s",
            request.id,
            request.logged,
            clip(error.code) if error.code else error.status,
            "reference pruned" if pruned else "no stored reference of it to prune",
        )
        return Outcome.PRUNED
    return Outcome.DELIVERED


async def _prune(
    runtime: Parts, stored_key: str | None, key: str | None, tried: Mapping[str, Any]
) -> bool:
    """Remove the conversation tried, its state with it (as a removal does). A state
    store failure is a storage failure like the reference store's (StoreError)."""
    try:
        return await _forget_tried(runtime, stored_key, key, tried)
    except StateError as error:
        raise StoreError(str(error)) from None


async def _forget_tried(
    runtime: Parts, stored_key: str | None, key: str | None, tried: Mapping[str, Any]
) -> bool:
    if stored_key is None:
        if key is None:
            return False
        try:
            stored = await runtime.references.get(key)
        except UnreadableDocument:
            return False  # another version's: not this one's to judge or remove
        if stored is None or not _same_conversation(stored.reference, tried):
            return False  # the stored reference is not the one tried: keep it (docs/proactive.md)
        stored_key, tried = key, stored.reference
    return await forget_conversation(
        runtime.references, runtime.state, stored_key, tried, note=False
    )


def _same_conversation(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def where(reference: Mapping[str, Any]) -> tuple[str, Any]:
        conversation = reference.get("conversation") or {}
        service_url = str(reference.get("serviceUrl") or "").rstrip("/").lower()
        return service_url, conversation.get("id")

    return where(a) == where(b)


def _user_account(user: UserTarget) -> dict[str, str]:
    """The user of a 1:1 the bot opened: on Teams a target named by the aadObjectId (a
    GUID) is stored as that too, so that erasing the user by it finds the conversation."""
    if user.channel_id == TEAMS_CHANNEL and AAD_OBJECT_ID.fullmatch(user.user_id):
        return {"id": user.user_id, "aadObjectId": user.user_id}
    return {"id": user.user_id}


async def _user_reference(user: UserTarget, runtime: Parts) -> tuple[str, Mapping[str, Any]]:
    """The user's stored 1:1 in that tenant, or a new one (created, then remembered)."""
    if runtime.connector.trusted_target(user.service_url) is None:
        # Refused whether or not a 1:1 is stored (whose own serviceUrl would be used): a
        # target naming an untrusted serviceUrl is bad input, and nothing is sent.
        raise ConnectorError(
            ErrorKind.UNTRUSTED,
            "serviceUrl is not trusted; nothing was sent",
            operation="createConversation",
        )
    store = runtime.references
    for lookup in ({"user_id": user.user_id}, {"aad_object_id": user.user_id}):
        stored = await store.find_by_user(
            channel_id=user.channel_id, tenant_id=user.tenant_id, **lookup
        )
        if stored is not None:
            return stored.key, stored.reference
    settings = runtime.settings
    bot = {"id": f"28:{settings.app_id}" if settings.app_id else "28:bot"}
    parameters = {
        "bot": bot,
        "members": [{"id": user.user_id}],
        "channelData": {"tenant": {"id": user.tenant_id}},
        "tenantId": user.tenant_id,
        "isGroup": False,
    }
    created = await runtime.connector.background().create_conversation(user.service_url, parameters)
    conversation_id = created.get("id") if isinstance(created, dict) else None
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ConnectorError(
            ErrorKind.INVALID, "createConversation answered without an id", status=200
        )
    if path_id_problem(conversation_id):
        # Held to what an activity's conversation.id is held to: stored, it would be the
        # user's 1:1 that every later send fails on.
        raise ConnectorError(
            ErrorKind.INVALID,
            "createConversation answered an id the bot cannot use",
            status=200,
            code="UnusableConversationId",
            operation="createConversation",
        )
    # The serviceUrl stored is the one that was checked and called, never one the answer
    # suggests: the bot's token only goes to trusted serviceUrls.
    reference = {
        "channelId": user.channel_id,
        "serviceUrl": user.service_url,
        "conversation": {
            "id": conversation_id,
            "conversationType": "personal",
            "tenantId": user.tenant_id,
        },
        "bot": bot,
        "user": _user_account(user),
    }
    key = conversation_key(user.channel_id, conversation_id)
    try:
        stored = await store.get(key)
        if stored is not None:
            # The channel answered with a 1:1 already recorded, which the target named
            # otherwise (a tenant or aadObjectId in another case, a user id for an aad
            # one), or which its user's index lost (an index write that failed after its
            # document's): what the channel's own activities recorded is kept, and used,
            # and its user's index entries are put back should they be lost (or every
            # send to the user would open the 1:1 again, and erasing them would miss it).
            await _reindex(store, key)
            return key, stored.reference
        await store.upsert(reference, refresh=True)
    except UnreadableDocument:
        # Recorded by a version that this one cannot read (after a rollback): the send
        # needs no record, and that document is left for the version that wrote it.
        logger.warning("proactive: 1:1 %s is stored unreadably; sent, not recorded", clip(key))
        return key, reference
    logger.info("proactive: created 1:1 %s for a user target", clip(key))
    return key, reference


async def _reindex(store: ReferenceStore, key: str) -> None:
    """Best effort: the send does not need it, and the next activity in the 1:1 repairs
    the index too. Nothing but the index is written: the document read a moment ago may
    have changed or gone since (an erasure), and is not written back."""
    try:
        await store.reindex(key)
    except StoreError as error:
        logger.warning("proactive: the index of 1:1 %s was not checked: %s", clip(key), error)
