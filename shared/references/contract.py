"""The reference store's contract: errors, the stored shape, the store protocol, and the
document rules both stores share (merge, what is material, the JSON document, paging).

See :mod:`shared.references` for the layout and the write rules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from shared.activity import TEAMS_CHANNEL, conversation_key, is_bot_account, teams_tenant_id
from shared.diagnostics import clip
from shared.references.keys import (
    split_key,
)
from shared.storage import storage_error_code

logger = logging.getLogger("shared.references")  # the package logs under one name

SCHEMA_VERSION = 1
VOLATILE_FIELDS = frozenset({"activityId"})  # change every message; never worth a write
MAX_PAGE_SIZE = 5000  # Azure's largest listing page
# Conversations a user index lists (a 1:1 per tenant; a Web Chat conversation per visit).
# Past that the oldest key is dropped and the index says it overflowed: erasure then lists
# the channel as well (shared/userdata.py), so no conversation escapes it.
INDEX_KEYS = 256
INDEX_MARGIN = 16  # see UserIndex.nearly_full


class StoreError(Exception):
    """A storage call failed. The message names the operation, never a credential."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


# What storage answers a credential it refuses, or an identity without a data role on it.
_REFUSED = frozenset({401, 403})


def refused_credential(error: Any) -> bool:
    """Whether a storage SDK error is a missing or refused credential: no token (a
    ClientAuthenticationError), or a key or token storage answered 401/403."""
    from azure.core.exceptions import ClientAuthenticationError

    return isinstance(error, ClientAuthenticationError) or (
        getattr(error, "status_code", None) in _REFUSED
    )


def storage_auth_message(where: str, error: Any) -> str:
    """What a missing or refused storage credential (:func:`refused_credential`) says to an
    operator: no token (the identity endpoint's or Entra ID's refusal, without an HTTP
    status of storage's), or a key or token storage refused (401/403). Names the setting to
    check; never the error's text, which may quote a token endpoint's answer."""
    status = getattr(error, "status_code", None)
    shown = f", HTTP {status}" if status is not None else ""
    return (
        f"{where}: storage authentication failed ({type(error).__name__}{shown}); check "
        "AzureWebJobsStorage (the connection string, or the identity's __clientId, sign-in "
        "and role on the storage account)"
    )


class StorageAuthFailed(StoreError):
    """Storage was given no credential, or refused it: a setting to fix, not an outage."""


def storage_auth_failed(where: str, error: Any) -> StoreError:
    """A missing or refused storage credential as StoreError (:func:`storage_auth_message`)."""
    return StorageAuthFailed(
        storage_auth_message(where, error),
        status=getattr(error, "status_code", None),
        code=storage_error_code(error),
    )


class UnreadableDocument(StoreError):
    """A stored document this version cannot read (not JSON, not a reference document, or
    a newer `schemaVersion` after a rollback): storage answered, the content is the fault."""


class StoreConflict(StoreError):
    """Concurrent writers kept changing a document; the change was not applied."""


@dataclass(slots=True)
class StoredReference:
    """One conversation's stored reference and what is indexed about it."""

    key: str
    reference: dict[str, Any]
    tenant_id: str | None = None
    etag: str | None = None
    channel_id: str = ""
    conversation_id: str = ""
    team_id: str | None = None
    personal: bool = False
    user_id: str | None = None
    aad_object_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


@dataclass(slots=True)
class Page:
    """Up to `page_size` references, and the token of the next page (None: the listing is
    through). A page may hold fewer, or none, while a token follows: a filtered listing
    returns what it found when its time slice is spent (see BlobReferenceStore)."""

    items: list[StoredReference]
    continuation: str | None = None


class ReferenceStore(Protocol):
    async def get(self, key: str) -> StoredReference | None: ...

    async def upsert(
        self, reference: Mapping[str, Any], *, team_id: str | None = None, refresh: bool = False
    ) -> bool: ...

    async def delete(self, key: str) -> bool: ...

    async def list(
        self,
        *,
        channel_id: str | None = None,
        tenant_id: str | None = None,
        team_id: str | None = None,
        continuation: str | None = None,
        page_size: int = 100,
    ) -> Page: ...

    async def find_by_user(
        self,
        *,
        channel_id: str,
        user_id: str | None = None,
        aad_object_id: str | None = None,
        tenant_id: str | None = None,
    ) -> StoredReference | None: ...

    async def user_index_overflowed(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> bool:
        """Whether an erasure must list the channel: an index of the user's overflowed or
        is nearly full (UserIndex.nearly_full)."""
        ...

    async def mark_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None:
        """An erasure begins: mark the user's index (one with keys) as overflowed, so that
        should it fail part-way, its retry lists the channel for what the index lost."""
        ...

    async def settle_writes(self, channel_id: str) -> None:
        """Wait a while (an erasure's, once) for this store's writes of the channel's
        conversations still under way, so that a conversation it stored just before is
        in its user's index when the erasure looks."""
        ...

    async def settle_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None: ...

    async def reindex(self, key: str) -> None:
        """Put the stored conversation `key` back in its user's indexes (lost by an index
        write that failed after its document's), writing nothing else; nothing when it is
        not stored."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- documents


def reference_key(reference: Mapping[str, Any]) -> str:
    """The conversation key of a reference; ValueError when it cannot be stored."""
    channel_id = reference.get("channelId")
    conversation = reference.get("conversation")
    conversation_id = conversation.get("id") if isinstance(conversation, Mapping) else None
    if not isinstance(channel_id, str) or not channel_id or "/" in channel_id:
        raise ValueError("reference.channelId must be a non-empty string without '/'")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ValueError("reference.conversation.id must be a non-empty string")
    if not isinstance(reference.get("serviceUrl"), str) or not reference["serviceUrl"]:
        raise ValueError("reference.serviceUrl must be a non-empty string")
    return conversation_key(channel_id, conversation_id)


def is_personal(reference: Mapping[str, Any]) -> bool:
    """A 1:1 conversation: Teams `personal`, or no `isGroup` and no group/channel type."""
    conversation = reference.get("conversation") or {}
    kind = conversation.get("conversationType")
    if kind is not None:
        return kind == "personal"
    return conversation.get("isGroup") is not True


def _merge(stored: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    """Incoming fields win; fields it lacks are kept; objects with the same id merge."""
    merged = dict(stored)
    for name, value in incoming.items():
        if value is None:
            continue
        previous = merged.get(name)
        if (
            isinstance(value, Mapping)
            and isinstance(previous, Mapping)
            and previous.get("id") == value.get("id")
        ):
            merged[name] = {**previous, **value}
        else:
            merged[name] = value
    return merged


PARTY_FIELDS = ("user", "bot")


def _names_someone(party: Any) -> bool:
    return isinstance(party, Mapping) and isinstance(party.get("id"), str) and bool(party["id"])


def _material(reference: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reference.items() if k not in VOLATILE_FIELDS}


# In a group the reference's user (and their client's locale) is whoever spoke last: not
# kept, so that nothing of a person stays stored in a conversation they only spoke in
# (an erasure leaves group conversations stored). A document an earlier version wrote
# with them loses them at its conversation's next activity.
SPEAKER_FIELDS = ("user", "locale")


def plan(
    current: StoredReference | None,
    reference: Mapping[str, Any],
    team_id: str | None,
    now: float,
) -> StoredReference | None:
    """The document to write for `reference`, or None when `current` already says it."""
    key = reference_key(reference)
    incoming = json.loads(json.dumps(reference))  # a deep, JSON-clean copy
    for name in PARTY_FIELDS:
        if name in incoming and not _names_someone(incoming[name]):
            # An activity with `from: {}` names nobody: it must not replace the stored
            # user, which links a 1:1 to its user (their erasure finds it by them).
            del incoming[name]
    bot = incoming.get("bot")
    if "user" in incoming and is_bot_account(incoming["user"], (bot or {}).get("id")):
        del incoming["user"]  # the bot's own account speaking is not the conversation's user
    merged = _merge(current.reference, incoming) if current else incoming
    if not is_personal(merged):
        for name in SPEAKER_FIELDS:
            merged.pop(name, None)
    # Tenant and team filters of a broadcast must match only what Teams said: another
    # channel's reference may carry a tenant its client made up.
    teams = merged.get("channelId") == TEAMS_CHANNEL
    tenant = teams_tenant_id(merged)
    team = (team_id or (current.team_id if current else None)) if teams else None
    if (
        current is not None
        and tenant == current.tenant_id
        and team == current.team_id
        and _material(merged) == _material(current.reference)
    ):
        return None
    personal = is_personal(merged)
    user = merged.get("user") if isinstance(merged.get("user"), Mapping) else {}
    channel_id, conversation_id = split_key(key)
    stamp = timestamp(now)
    return StoredReference(
        key=key,
        reference=merged,
        tenant_id=tenant,
        channel_id=channel_id,
        conversation_id=conversation_id,
        team_id=team,
        personal=personal,
        user_id=str_or_none(user.get("id")) if personal else None,
        # Another channel's client writes from.aadObjectId itself: never an identity there.
        aad_object_id=str_or_none(user.get("aadObjectId")) if personal and teams else None,
        created_at=current.created_at if current else stamp,
        updated_at=stamp,
    )


def to_document(stored: StoredReference) -> dict[str, Any]:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "key": stored.key,
        "channelId": stored.channel_id,
        "conversationId": stored.conversation_id,
        "tenantId": stored.tenant_id,
        "teamId": stored.team_id,
        "personal": stored.personal,
        "userId": stored.user_id,
        "aadObjectId": stored.aad_object_id,
        "reference": stored.reference,
        "createdAt": stored.created_at,
        "updatedAt": stored.updated_at,
    }


def from_document(document: Any, etag: str | None = None) -> StoredReference:
    if not isinstance(document, dict) or not isinstance(document.get("reference"), dict):
        raise UnreadableDocument("reference store: a stored document is not a reference document")
    version = document.get("schemaVersion")
    if version != SCHEMA_VERSION:
        # Never rewrite a document a newer version of the bot wrote.
        raise UnreadableDocument(f"reference store: unsupported schemaVersion {version!r}")
    if not isinstance(document.get("key"), str):
        raise UnreadableDocument("reference store: a stored document has no key")
    # A document edited by hand (or another program) with a field of another type is
    # unreadable here, never a crash further on (an int user id in a blob name, say).
    texts = ("tenantId", "teamId", "userId", "aadObjectId", "createdAt", "updatedAt")
    if any(
        document.get(name) is not None and not isinstance(document[name], str) for name in texts
    ):
        raise UnreadableDocument("reference store: a stored document has a field of another type")
    if not isinstance(document.get("personal", False), bool):
        raise UnreadableDocument("reference store: a stored document has a field of another type")
    try:
        channel_id, conversation_id = split_key(document["key"])
    except ValueError:
        raise UnreadableDocument("reference store: a stored document's key is no key") from None
    return StoredReference(
        key=document["key"],
        reference=document["reference"],
        tenant_id=document.get("tenantId"),
        etag=etag,
        channel_id=channel_id,
        conversation_id=conversation_id,
        team_id=document.get("teamId"),
        personal=document.get("personal", False),
        user_id=document.get("userId"),
        aad_object_id=document.get("aadObjectId"),
        created_at=document.get("createdAt"),
        updated_at=document.get("updatedAt"),
    )


def timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def short_key(key: str) -> str:
    """A key for log lines and messages: quoted and cut short, since its conversation id
    is whatever the client chose (a line break in it would fake a log line; it may be
    1,000+ chars)."""
    return clip(key)


def user_matches(
    stored: StoredReference, user_id: str | None, aad_object_id: str | None, tenant: str | None
) -> bool:
    """A 1:1 with this user (in `tenant` when given). The aadObjectId counts on Teams only:
    elsewhere the client writes it (documents stored before that rule may still carry one)."""
    if not stored.personal or (tenant is not None and not same_id(stored.tenant_id, tenant)):
        return False
    return (user_id is not None and stored.user_id == user_id) or (
        aad_object_id is not None
        and stored.channel_id == TEAMS_CHANNEL
        and same_id(stored.aad_object_id, aad_object_id)
    )


def same_id(stored: str | None, given: str) -> bool:
    """Tenant ids and aadObjectIds are GUIDs, whatever their case: Teams writes them in
    lower case, a program naming a user or a tenant may not."""
    return stored is not None and stored.lower() == given.lower()


def listed_by(stored: StoredReference, kind: Literal["id", "aad"], value: str) -> bool:
    """Whether the user index `kind`/`value` should list `stored`: a 1:1 of that user id,
    or of that aadObjectId on Teams."""
    if kind == "id":
        return user_matches(stored, value, None, None)
    return user_matches(stored, None, value, None)


def user_lookups(
    channel_id: str, user_id: str | None, aad_object_id: str | None
) -> list[tuple[Literal["id", "aad"], str]]:
    """The user indexes to read; an aadObjectId is indexed on Teams only (none elsewhere)."""
    if not channel_id or (user_id is None and aad_object_id is None):
        raise ValueError("find_by_user needs channel_id and user_id or aad_object_id")
    lookups: list[tuple[Literal["id", "aad"], str]] = []
    if user_id is not None:
        lookups.append(("id", user_id))
    if aad_object_id is not None and channel_id == TEAMS_CHANNEL:
        lookups.append(("aad", aad_object_id.lower()))  # a GUID: indexed in lower case
    return lookups


# ---------------------------------------------------------------------------- paging


@dataclass(frozen=True, slots=True)
class Filters:
    channel_id: str | None
    tenant_id: str | None
    team_id: str | None

    def matches(self, stored: StoredReference) -> bool:
        teams_only = self.tenant_id is not None or self.team_id is not None
        if teams_only and stored.channel_id != TEAMS_CHANNEL:
            return False  # recorded by an earlier version from another channel's channelData
        return (
            (self.channel_id is None or stored.channel_id == self.channel_id)
            and (self.tenant_id is None or same_id(stored.tenant_id, self.tenant_id))
            and (self.team_id is None or stored.team_id == self.team_id)
        )

    def fingerprint(self) -> str:
        text = json.dumps([self.channel_id, self.tenant_id, self.team_id])
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def encode_token(filters: Filters, **state: Any) -> str:
    payload = json.dumps({"v": 1, "f": filters.fingerprint(), **state}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode("utf-8", "surrogatepass")).decode("ascii")


def decode_token(token: str | None, filters: Filters) -> dict[str, Any]:
    if token is None:
        return {}
    if not isinstance(token, str):
        raise ValueError("invalid continuation token")
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, RecursionError):
        raise ValueError("invalid continuation token") from None
    if (
        not isinstance(state, dict)
        or state.get("v") != 1
        or not all(isinstance(state.get(k), str | None) for k in ("a", "m"))
    ):
        raise ValueError("invalid continuation token")
    if state.get("f") != filters.fingerprint():
        raise ValueError("the continuation token belongs to a listing with other filters")
    return state


def check_page_size(page_size: int) -> None:
    if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")


def copied(stored: StoredReference) -> StoredReference:
    return replace(stored, reference=json.loads(json.dumps(stored.reference)))


@dataclass(frozen=True, slots=True)
class UserIndex:
    """A user index: their conversation keys, most recent first, and whether a key was ever
    dropped for lack of room (then erasure lists the channel; see INDEX_KEYS)."""

    keys: tuple[str, ...] = ()
    overflowed: bool = False

    @property
    def empty(self) -> bool:
        """Nothing worth keeping: no key, and no overflow for erasure to act on."""
        return not self.keys and not self.overflowed

    @property
    def nearly_full(self) -> bool:
        """Overflowed, or close enough to INDEX_KEYS that conversations recorded while an
        erasure starts could push one out unseen: the erasure lists the channel too."""
        return self.overflowed or len(self.keys) > INDEX_KEYS - INDEX_MARGIN


IndexChange = Callable[[UserIndex], UserIndex]


def to_front(key: str) -> IndexChange:
    """Index change: `key` becomes the user's most recent conversation; the oldest key
    goes when there is no room, and the index then says it overflowed."""

    def change(index: UserIndex) -> UserIndex:
        keys = (key, *(k for k in index.keys if k != key))
        overflowed = index.overflowed or len(keys) > INDEX_KEYS
        return UserIndex(keys[:INDEX_KEYS], overflowed)

    return change


def including(key: str) -> IndexChange:
    """Index change: `key` is listed (at the front when it was missing), else unchanged."""
    return lambda index: index if key in index.keys else to_front(key)(index)


def without(key: str) -> IndexChange:
    """Index change: `key` is no longer listed (an overflow mark stays)."""
    return lambda index: UserIndex(tuple(k for k in index.keys if k != key), index.overflowed)


def settled(stale: Collection[str] = ()) -> IndexChange:
    """Index change once an erasure is done: the overflow is dealt with (it listed the
    channel), and the `stale` keys, no longer the user's, are dropped."""
    return lambda index: UserIndex(tuple(k for k in index.keys if k not in stale), False)


def marked(index: UserIndex) -> UserIndex:
    """Index change as an erasure begins: an index with keys says it overflowed (a retry
    after a failure part-way then lists the channel); one with none stays as it is."""
    return UserIndex(index.keys, True) if index.keys else index


_LEGACY_INDEX_KEYS = 8  # what the index held before INDEX_KEYS, with no overflow mark


def readable_index(document: Any) -> bool:
    """Whether `document` is a user index this version reads (see :func:`read_index`)."""
    return (
        isinstance(document, dict)
        and document.get("schemaVersion", SCHEMA_VERSION) == SCHEMA_VERSION
    )


def read_index(document: Any, channel_id: str, kind: Literal["id", "aad"]) -> UserIndex:
    """A user index document: ``{"key": most recent, "older": [...], "overflowed": bool}``
    (an overflowed index whose keys were all deleted has no key).

    A document with no ``overflowed`` was written by an earlier version, which kept 8 keys
    and dropped the oldest without a word: it counts as overflowed when it is full, and off
    Teams whatever its length (a full one may have lost keys since, and there one user
    often has many conversations; on Teams a user has one 1:1 per tenant), so erasure
    lists the channel rather than miss a conversation it dropped. An aadObjectId index off
    Teams is never read any more, only emptied: never overflowed.

    A document that is no index this version reads (`document` None when it is not JSON;
    another shape; a newer `schemaVersion`) lists nothing and counts as overflowed: an
    erasure then lists the channel instead of stopping at it, and its next change
    replaces it."""
    if not readable_index(document):
        return UserIndex((), overflowed=True)
    first = document.get("key")
    older = document.get("older")
    older = [key for key in older if isinstance(key, str)] if isinstance(older, list) else []
    keys = (first, *older) if isinstance(first, str) else ()
    overflowed = document.get("overflowed")
    if not isinstance(overflowed, bool) and channel_id == TEAMS_CHANNEL:
        overflowed = len(keys) >= _LEGACY_INDEX_KEYS
    elif not isinstance(overflowed, bool):
        overflowed = kind == "id"
    return UserIndex(keys, overflowed)


def index_body(index: UserIndex) -> bytes:
    """The document of a user index; ``overflowed`` always written (its absence marks a
    document of an earlier version, see :func:`read_index`)."""
    document: dict[str, Any] = {"schemaVersion": SCHEMA_VERSION}
    if index.keys:
        document["key"] = index.keys[0]
    if len(index.keys) > 1:
        document["older"] = list(index.keys[1:])
    document["overflowed"] = index.overflowed
    return json.dumps(document, separators=(",", ":")).encode()


def index_entries(
    stored: StoredReference, *, any_channel: bool = False
) -> list[tuple[Literal["id", "aad"], str]]:
    """The user indexes that list a stored 1:1: by user id, and by aadObjectId (in lower
    case) on Teams only (another channel's client writes that field itself). `any_channel`,
    for removals: also the entries earlier versions wrote, so that a delete takes them out
    too: the aadObjectId a document carries off Teams, and in the case it was given."""
    entries: list[tuple[Literal["id", "aad"], str]] = []
    if stored.personal and stored.user_id:
        entries.append(("id", stored.user_id))
    teams = stored.channel_id == TEAMS_CHANNEL
    aad = stored.aad_object_id
    if stored.personal and aad and (teams or any_channel):
        entries.append(("aad", aad.lower()))
        if any_channel and aad != aad.lower():
            entries.append(("aad", aad))
    return entries
