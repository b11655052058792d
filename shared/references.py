"""The conversation-reference store: the bot's memory of where it can send proactively.

Two implementations honour one contract (tests/unit/test_references.py runs against both):
:class:`BlobReferenceStore` (Azure Blob storage, async) and :class:`MemoryReferenceStore`.

Blob layout (container `BOT_REFERENCES_CONTAINER`, created on first write)
-------------------------------------------------------------------------
``refs/<channel>/<conversation>.json``
    One plain JSON document per conversation, keyed by the conversation key
    ``"<channelId>/<conversation.id>"``::

        {"schemaVersion": 1, "key": "msteams/19:abc@thread.tacv2",
         "channelId": "msteams", "conversationId": "19:abc@thread.tacv2",
         "tenantId": "…" | null, "teamId": "…" | null, "personal": false,
         "userId": "29:…" | null, "aadObjectId": "…" | null,   # only for 1:1 conversations
         "reference": {…ConversationReference…},
         "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:00Z"}

    Blob metadata (written in the same request as the body, so never out of step):
    ``schema``, ``tenant`` and ``team`` (encoded like a name segment) and ``doc`` (the
    document, zlib + base64url, when under 7,000 characters). Listing by channel is a
    prefix listing; tenant and team filters read the metadata that comes with the listing,
    so neither filtering nor paging reads the documents themselves. Tenant and team are
    indexed for Teams conversations only: another channel's client can write anything
    into its channelData.

``users/<channel>/id/<user id>.json`` and ``users/<channel>/aad/<aadObjectId>.json``
    Small index documents ``{"schemaVersion": 1, "key": "<conversation key>"}`` pointing at
    a user's 1:1 conversation, plus ``"older": [...]`` (most recent first, at most 8 in all)
    when the user has more than one (a guest's 1:1 in each tenant; several Web Chat
    sessions), so a lookup narrowed to a tenant, or made after the latest one was deleted,
    still finds the others. Changed with ETags like the documents; brought up to date
    before a document write and checked again after it; every entry is verified against
    its document when read, so a stale or orphaned entry is never returned.

Name segments
    ``b`` + base64url(UTF-8, no padding) of the id: reversible (:func:`decode_segment`),
    safe for any character (`/`, `:`, `@`, `;`, unicode), case-sensitive like blob names.
    An id whose encoding would exceed the segment's length budget becomes ``h`` + SHA-256
    hex instead; the full key is kept inside the document, so it stays recoverable. Names
    stay under 1,024 characters and 4 path segments.

Writes
    Create with ``If-None-Match: *``, update with ``If-Match`` on the ETag read; on a
    conflict the document is re-read and the change re-applied (bounded, jittered retries,
    then :class:`StoreConflict`). ``upsert`` merges the incoming reference into the stored
    one (top-level fields; nested objects with the same ``id`` merge too) and writes only
    when something material changed: ``activityId`` never forces a write, nor do the
    speaking ``user`` of a group conversation and that speaker's ``locale``. ``delete``
    takes the key out of the user index first, then deletes the document at the ETag it
    read (re-reading when it changed meanwhile), so a delete racing a re-create never
    leaves a stored conversation its user cannot be found by. An upsert that changes nothing
    still checks (when it read the document) that the user index lists the conversation
    and puts it back if not, which repairs a delete interrupted between its two steps.

Cache
    A bounded in-process LRU remembers what was last read or written per key (5 minutes),
    so a chatty conversation costs no storage call per message. It only ever spares a
    write: ``get``, ``list`` and ``find_by_user`` always read storage, ``refresh=True``
    (install, bot added, team restored) bypasses it, and a delete in this process makes
    it forget the key, including what a concurrent read or write would have remembered.
    A delete by another instance can therefore delay re-storing a conversation by at most
    the cache's lifetime, and only until the next install or bot-added event.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import hashlib
import json
import logging
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from shared.activity import tenant_id as activity_tenant_id
from shared.config import Settings
from shared.storage import (
    DEFAULT_OPTIONS,
    StorageOptions,
    check_storage_settings,
    close_client,
    create_blob_service,
)

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VOLATILE_FIELDS = frozenset({"activityId"})  # change every message; never worth a write
MAX_PAGE_SIZE = 5000  # Azure's largest listing page

_CHANNEL_BUDGET = 96  # characters of a channel-id segment
_ID_BUDGET = 800  # characters of a conversation / user id segment
_METADATA_DOC_LIMIT = 7000  # Azure allows 8 KiB of metadata in all
_INDEX_KEYS = 8  # conversations a user index remembers (e.g. one 1:1 per tenant)
TEAMS_CHANNEL = "msteams"  # the only channel whose tenant and team are indexed (verified data)
BLOB_CLIENTS = 64  # blob clients kept for reuse (see BlobReferenceStore._blob)
_DOC_PREFIX = "refs/"
_USER_PREFIX = "users/"


class StoreError(Exception):
    """A storage call failed. The message names the operation, never a credential."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


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

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- keys and names


def split_key(key: str) -> tuple[str, str]:
    """``"<channelId>/<conversation.id>"`` → (channel id, conversation id)."""
    if not isinstance(key, str):
        raise ValueError("a conversation key must be a string")
    channel_id, sep, conversation_id = key.partition("/")
    if not sep or not channel_id or not conversation_id:
        raise ValueError("a conversation key looks like '<channelId>/<conversation id>'")
    return channel_id, conversation_id


def encode_segment(value: str, budget: int = _ID_BUDGET) -> str:
    """A blob-name segment for any string: reversible when short, a hash when too long."""
    raw = value.encode("utf-8", "surrogatepass")
    encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    if len(encoded) < budget:
        return "b" + encoded
    return "h" + hashlib.sha256(raw).hexdigest()


def decode_segment(segment: str) -> str | None:
    """The id behind :func:`encode_segment`; None for hashed segments (read the document)."""
    if segment.startswith("b"):
        data = segment[1:]
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        return raw.decode("utf-8", "surrogatepass")
    if segment.startswith("h") and len(segment) == 65:
        return None
    raise ValueError("not an encoded name segment")


def document_name(key: str) -> str:
    channel_id, conversation_id = split_key(key)
    return f"{_channel_prefix(channel_id)}{encode_segment(conversation_id)}.json"


def user_index_name(channel_id: str, kind: Literal["id", "aad"], value: str) -> str:
    channel = encode_segment(channel_id, _CHANNEL_BUDGET)
    return f"{_USER_PREFIX}{channel}/{kind}/{encode_segment(value)}.json"


def _channel_prefix(channel_id: str | None) -> str:
    if channel_id is None:
        return _DOC_PREFIX
    return f"{_DOC_PREFIX}{encode_segment(channel_id, _CHANNEL_BUDGET)}/"


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
    return f"{channel_id}/{conversation_id}"


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


def _material(reference: Mapping[str, Any]) -> dict[str, Any]:
    material = {k: v for k, v in reference.items() if k not in VOLATILE_FIELDS}
    if not is_personal(reference):
        # In a group the reference's user (and their client's locale) is whoever spoke
        # last: not worth a write.
        material.pop("user", None)
        material.pop("locale", None)
    return material


def _plan(
    current: StoredReference | None,
    reference: Mapping[str, Any],
    team_id: str | None,
    now: float,
) -> StoredReference | None:
    """The document to write for `reference`, or None when `current` already says it."""
    key = reference_key(reference)
    incoming = json.loads(json.dumps(reference))  # a deep, JSON-clean copy
    merged = _merge(current.reference, incoming) if current else incoming
    # Tenant and team filters of a broadcast must match only what Teams said: another
    # channel's reference may carry a tenant its client made up.
    teams = merged.get("channelId") == TEAMS_CHANNEL
    tenant = activity_tenant_id(merged) if teams else None
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
    stamp = _timestamp(now)
    return StoredReference(
        key=key,
        reference=merged,
        tenant_id=tenant,
        channel_id=channel_id,
        conversation_id=conversation_id,
        team_id=team,
        personal=personal,
        user_id=_str_or_none(user.get("id")) if personal else None,
        aad_object_id=_str_or_none(user.get("aadObjectId")) if personal else None,
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
        raise StoreError("reference store: a stored document is not a reference document")
    version = document.get("schemaVersion")
    if version != SCHEMA_VERSION:
        # Never rewrite a document a newer version of the bot wrote.
        raise StoreError(f"reference store: unsupported schemaVersion {version!r}")
    if not isinstance(document.get("key"), str):
        raise StoreError("reference store: a stored document has no key")
    return StoredReference(
        key=document["key"],
        reference=document["reference"],
        tenant_id=document.get("tenantId"),
        etag=etag,
        channel_id=document.get("channelId", ""),
        conversation_id=document.get("conversationId", ""),
        team_id=document.get("teamId"),
        personal=bool(document.get("personal")),
        user_id=document.get("userId"),
        aad_object_id=document.get("aadObjectId"),
        created_at=document.get("createdAt"),
        updated_at=document.get("updatedAt"),
    )


def _timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(key: str) -> str:
    """A key for log lines and messages: ids are not secret, but may be 1,000+ chars."""
    return key if len(key) <= 120 else key[:100] + "…"


def _user_matches(
    stored: StoredReference, user_id: str | None, aad_object_id: str | None, tenant: str | None
) -> bool:
    if not stored.personal or (tenant is not None and stored.tenant_id != tenant):
        return False
    return (user_id is not None and stored.user_id == user_id) or (
        aad_object_id is not None and stored.aad_object_id == aad_object_id
    )


def _user_lookups(
    channel_id: str, user_id: str | None, aad_object_id: str | None
) -> list[tuple[Literal["id", "aad"], str]]:
    if not channel_id or (user_id is None and aad_object_id is None):
        raise ValueError("find_by_user needs channel_id and user_id or aad_object_id")
    lookups: list[tuple[Literal["id", "aad"], str]] = []
    if user_id is not None:
        lookups.append(("id", user_id))
    if aad_object_id is not None:
        lookups.append(("aad", aad_object_id))
    return lookups


# ---------------------------------------------------------------------------- paging


@dataclass(frozen=True, slots=True)
class _Filters:
    channel_id: str | None
    tenant_id: str | None
    team_id: str | None

    def matches(self, stored: StoredReference) -> bool:
        return (
            (self.channel_id is None or stored.channel_id == self.channel_id)
            and (self.tenant_id is None or stored.tenant_id == self.tenant_id)
            and (self.team_id is None or stored.team_id == self.team_id)
        )

    def fingerprint(self) -> str:
        text = json.dumps([self.channel_id, self.tenant_id, self.team_id])
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _encode_token(filters: _Filters, **state: Any) -> str:
    payload = json.dumps({"v": 1, "f": filters.fingerprint(), **state}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode("utf-8", "surrogatepass")).decode("ascii")


def _decode_token(token: str | None, filters: _Filters) -> dict[str, Any]:
    if token is None:
        return {}
    if not isinstance(token, str):
        raise ValueError("invalid continuation token")
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError):
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


def _check_page_size(page_size: int) -> None:
    if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")


# ---------------------------------------------------------------------------- in-memory


class MemoryReferenceStore:
    """The in-process store: same contract as Blob (ETags included), for tests and tools.

    `writes` and `deletes` count document writes, so tests can see that a message which
    changes nothing material costs nothing.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._docs: dict[str, StoredReference] = {}
        self._users: dict[tuple[str, str, str], list[str]] = {}  # (channel, kind, id) -> keys
        self._sorted: list[str] | None = None
        self._version = 0
        self.writes = 0
        self.deletes = 0

    async def get(self, key: str) -> StoredReference | None:
        split_key(key)
        stored = self._docs.get(key)
        return _copy(stored) if stored else None

    async def upsert(
        self, reference: Mapping[str, Any], *, team_id: str | None = None, refresh: bool = False
    ) -> bool:
        key = reference_key(reference)
        planned = _plan(self._docs.get(key), reference, team_id, self._clock())
        if planned is None:
            return False
        self._version += 1
        planned.etag = f'"m{self._version}"'
        for kind, value in _index_entries(planned):
            entry = (planned.channel_id, kind, value)
            self._users[entry] = _to_front(key)(self._users.get(entry, []))
        if key not in self._docs:
            self._sorted = None
        self._docs[key] = _copy(planned)
        self.writes += 1
        return True

    async def delete(self, key: str) -> bool:
        split_key(key)
        stored = self._docs.pop(key, None)
        if stored is None:
            return False
        self._sorted = None
        self.deletes += 1
        for kind, value in _index_entries(stored):
            entry = (stored.channel_id, kind, value)
            if keys := _without(key)(self._users.get(entry, [])):
                self._users[entry] = keys
            else:
                self._users.pop(entry, None)
        return True

    async def list(
        self,
        *,
        channel_id: str | None = None,
        tenant_id: str | None = None,
        team_id: str | None = None,
        continuation: str | None = None,
        page_size: int = 100,
    ) -> Page:
        _check_page_size(page_size)
        filters = _Filters(channel_id, tenant_id, team_id)
        after = _decode_token(continuation, filters).get("a")
        if self._sorted is None:
            self._sorted = sorted(self._docs)
        start = bisect.bisect_right(self._sorted, after) if after is not None else 0
        items: list[StoredReference] = []
        for key in self._sorted[start:]:
            stored = self._docs.get(key)
            if stored is None or not filters.matches(stored):
                continue
            items.append(_copy(stored))
            if len(items) == page_size:
                return Page(items, _encode_token(filters, a=key))
        return Page(items, None)

    async def find_by_user(
        self,
        *,
        channel_id: str,
        user_id: str | None = None,
        aad_object_id: str | None = None,
        tenant_id: str | None = None,
    ) -> StoredReference | None:
        for kind, value in _user_lookups(channel_id, user_id, aad_object_id):
            for key in self._users.get((channel_id, kind, value), []):
                stored = self._docs.get(key)
                if stored and _user_matches(stored, user_id, aad_object_id, tenant_id):
                    return _copy(stored)
        return None

    async def close(self) -> None:
        return None


def _copy(stored: StoredReference) -> StoredReference:
    return replace(stored, reference=json.loads(json.dumps(stored.reference)))


def _to_front(key: str) -> Callable[[list[str]], list[str]]:
    """Index change: `key` becomes the user's most recent conversation."""
    return lambda keys: [key, *(k for k in keys if k != key)][:_INDEX_KEYS]


def _including(key: str) -> Callable[[list[str]], list[str]]:
    """Index change: `key` is listed (at the front when it was missing), else unchanged."""
    return lambda keys: keys if key in keys else _to_front(key)(keys)


def _without(key: str) -> Callable[[list[str]], list[str]]:
    return lambda keys: [k for k in keys if k != key]


def _index_keys(document: Any) -> list[str]:
    """The conversation keys of a user index document, most recent first."""
    if not isinstance(document, dict) or not isinstance(document.get("key"), str):
        return []
    older = document.get("older")
    older = [key for key in older if isinstance(key, str)] if isinstance(older, list) else []
    return [document["key"], *older]


def _index_body(keys: list[str]) -> bytes:
    document: dict[str, Any] = {"schemaVersion": SCHEMA_VERSION, "key": keys[0]}
    if len(keys) > 1:
        document["older"] = keys[1:]
    return json.dumps(document, separators=(",", ":")).encode()


def _index_entries(stored: StoredReference) -> list[tuple[Literal["id", "aad"], str]]:
    entries: list[tuple[Literal["id", "aad"], str]] = []
    if stored.personal and stored.user_id:
        entries.append(("id", stored.user_id))
    if stored.personal and stored.aad_object_id:
        entries.append(("aad", stored.aad_object_id))
    return entries


# ---------------------------------------------------------------------------- recent cache


@dataclass(slots=True)
class _RecentCache:
    """What this process last read or wrote per key, for a bounded time (LRU)."""

    size: int
    ttl: float
    clock: Callable[[], float]
    entries: OrderedDict[str, tuple[float, StoredReference]] = field(default_factory=OrderedDict)

    def get(self, key: str) -> StoredReference | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry[1]

    def put(self, stored: StoredReference) -> None:
        if self.size <= 0:
            return
        self.entries[stored.key] = (self.clock() + self.ttl, _copy(stored))
        self.entries.move_to_end(stored.key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)


# ---------------------------------------------------------------------------- Blob storage


class BlobReferenceStore:
    """References in Azure Blob storage (layout in the module docstring).

    Cheap to build: the client is created on first use, the container on first write.
    Pass `client` to share a BlobServiceClient (then the store does not close it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: BlobServiceClient | None = None,
        options: StorageOptions = DEFAULT_OPTIONS,
        cache_size: int = 1024,
        cache_ttl: float = 300.0,
        max_attempts: int = 16,
        listing_batch: int = 1000,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._options = options
        self._container_name = settings.references_container
        self._container_client: ContainerClient | None = None
        self._blobs: OrderedDict[str, BlobClient] = OrderedDict()
        self._blobs_of: ContainerClient | None = None  # the container they belong to
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cache = _RecentCache(cache_size, cache_ttl, clock)
        self._max_attempts = max_attempts
        self._listing_batch = listing_batch
        self._deletions = 0  # bumped by every delete: a read from before it is not cached
        self._clock = clock
        self._sleep = sleep

    # -- public API

    async def get(self, key: str) -> StoredReference | None:
        name = document_name(key)
        generation = self._deletions
        async with self._guard("get", key):
            stored = await self._read(name, key)
        if stored is None:
            self._cache.drop(key)
        else:
            self._remember(stored, generation)
        return stored

    async def upsert(
        self, reference: Mapping[str, Any], *, team_id: str | None = None, refresh: bool = False
    ) -> bool:
        key = reference_key(reference)
        cached = None if refresh else self._cache.get(key)
        if cached is not None and _plan(cached, reference, team_id, self._clock()) is None:
            return False
        name = document_name(key)
        generation = self._deletions
        async with self._guard("upsert", key):
            for attempt in range(self._max_attempts):
                current = await self._read(name, key)
                planned = _plan(current, reference, team_id, self._clock())
                if planned is None:
                    assert current is not None
                    # Nothing to write, but the user index may have lost this key (a delete
                    # interrupted after its first step): put it back, so a `user` target
                    # finds the conversation again. One small read per uncached activity.
                    for kind, value in _index_entries(current):
                        await self._update_index(current.channel_id, kind, value, _including(key))
                    self._remember(current, generation)
                    return False
                # The user index is brought up to date before the document (an entry
                # without its document is ignored on lookup, so a crash in between harms
                # nothing) and checked again after it, because a delete that ran meanwhile
                # may have taken this key out of it.
                entries = _index_entries(planned)
                for kind, value in entries:
                    await self._update_index(
                        planned.channel_id,
                        kind,
                        value,
                        _to_front(key),
                        likely_absent=current is None and attempt == 0,
                    )
                etag = await self._put(
                    name,
                    _document_body(planned),
                    current.etag if current else None,
                    metadata_for=planned,
                )
                if etag is not None:
                    for kind, value in entries:
                        await self._update_index(planned.channel_id, kind, value, _to_front(key))
                    planned.etag = etag
                    self._remember(planned, generation)
                    logger.info(
                        "references: %s %s", "updated" if current else "created", _short(key)
                    )
                    return True
                self._cache.drop(key)
                await self._backoff(attempt)
        raise StoreConflict(
            f"reference store: upsert of {_short(key)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )

    async def delete(self, key: str) -> bool:
        name = document_name(key)
        self._forget(key)
        try:
            async with self._guard("delete", key):
                deleted = await self._delete(name, key)
        finally:
            # Again at the end: an upsert or get that read the document before it was
            # deleted must not leave it in the cache as stored.
            self._forget(key)
        if deleted:
            logger.info("references: deleted %s", _short(key))
        return deleted

    async def list(
        self,
        *,
        channel_id: str | None = None,
        tenant_id: str | None = None,
        team_id: str | None = None,
        continuation: str | None = None,
        page_size: int = 100,
    ) -> Page:
        _check_page_size(page_size)
        filters = _Filters(channel_id, tenant_id, team_id)
        state = _decode_token(continuation, filters)
        async with self._guard("list", channel_id or "*"):
            return await self._list(filters, state, page_size)

    async def find_by_user(
        self,
        *,
        channel_id: str,
        user_id: str | None = None,
        aad_object_id: str | None = None,
        tenant_id: str | None = None,
    ) -> StoredReference | None:
        lookups = _user_lookups(channel_id, user_id, aad_object_id)
        async with self._guard("find_by_user", channel_id):
            for kind, value in lookups:
                index = await self._read_json(user_index_name(channel_id, kind, value))
                for key in _index_keys(index[0]) if index else []:
                    try:
                        name = document_name(key)
                    except ValueError:
                        continue  # not an index entry this store wrote: treat as absent
                    stored = await self._read(name, key)
                    if stored and _user_matches(stored, user_id, aad_object_id, tenant_id):
                        return stored
        return None

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            self._container_client = None
            self._blobs.clear()
            await close_client(client)

    # -- storage primitives (called inside _guard)

    def _container(self) -> ContainerClient:
        loop = asyncio.get_running_loop()
        if self._owns_client and self._client is not None and self._loop is not loop:
            # An async client belongs to the loop that opened its connections; a host that
            # runs a new loop gets a new client (the old loop's connections died with it).
            self._client = self._container_client = None
        if self._container_client is None:
            if self._client is None:
                self._client = create_blob_service(self._settings.storage, self._options)
                self._loop = loop
            self._container_client = self._client.get_container_client(self._container_name)
        return self._container_client

    def _blob(self, name: str) -> BlobClient:
        """The client of one blob, reused for the next call on the same name (a new
        conversation's document is read, then written; an index written, then read):
        building one costs more CPU than the request it makes."""
        container = self._container()
        blob = self._blobs.get(name)
        if blob is None or self._blobs_of is not container:
            if self._blobs_of is not container:
                self._blobs.clear()
                self._blobs_of = container
            blob = self._blobs[name] = container.get_blob_client(name)
            if len(self._blobs) > BLOB_CLIENTS:
                self._blobs.popitem(last=False)
        else:
            self._blobs.move_to_end(name)
        return blob

    async def _read_json(self, name: str) -> tuple[Any, str, dict[str, str]] | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            downloader = await self._blob(name).download_blob()
            body = await downloader.readall()
        except ResourceNotFoundError:
            return None  # no blob, or no container yet
        try:
            document = json.loads(body)
        except ValueError:
            raise StoreError(f"reference store: {name} is not valid JSON") from None
        return document, downloader.properties.etag, downloader.properties.metadata or {}

    async def _read(self, name: str, key: str) -> StoredReference | None:
        found = await self._read_json(name)
        if found is None:
            return None
        stored = from_document(found[0], found[1])
        return stored if stored.key == key else None  # a hashed name's other key: absent

    async def _put(
        self,
        name: str,
        body: bytes,
        etag: str | None,
        *,
        metadata_for: StoredReference | None = None,
    ) -> str | None:
        """Write `name` if it is still at `etag` (absent when None): the new ETag, or None
        when another writer changed or removed it first."""
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )
        from azure.storage.blob import ContentSettings

        if etag is None:
            conditions: dict[str, Any] = {"overwrite": False}  # If-None-Match: *
        else:
            conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        metadata = _metadata(metadata_for, body) if metadata_for else None
        for _ in range(2):
            blob = self._blob(name)
            try:
                result = await blob.upload_blob(
                    body,
                    metadata=metadata,
                    content_settings=ContentSettings(content_type="application/json"),
                    **conditions,
                )
                return result["etag"]
            except (ResourceExistsError, ResourceModifiedError):
                return None
            except ResourceNotFoundError as exc:
                if exc.error_code != "ContainerNotFound":
                    return None  # If-Match on a blob deleted meanwhile
                await self._create_container()
        raise StoreError(f"reference store: container {self._container_name} keeps vanishing")

    async def _remove(self, name: str, etag: str) -> bool | None:
        """Delete `name` if it is still at `etag`: True; False when it is gone already;
        None when another writer changed it first."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            await self._blob(name).delete_blob(
                etag=etag, match_condition=MatchConditions.IfNotModified
            )
        except ResourceNotFoundError:
            return False  # 404 on delete is fine: it is gone either way
        except ResourceModifiedError:
            return None
        return True

    async def _delete(self, name: str, key: str) -> bool:
        """Index entries first, then the document at the ETag they were read from."""
        for attempt in range(self._max_attempts):
            current = await self._read(name, key)
            if current is None:
                return False
            for kind, value in _index_entries(current):
                await self._update_index(current.channel_id, kind, value, _without(key))
            removed = await self._remove(name, current.etag)  # type: ignore[arg-type]
            if removed is not None:
                return removed
            await self._backoff(attempt)  # updated meanwhile: its index entries may differ
        raise StoreConflict(
            f"reference store: delete of {_short(key)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )

    async def _update_index(
        self,
        channel_id: str,
        kind: Literal["id", "aad"],
        value: str,
        change: Callable[[list[str]], list[str]],
        *,
        likely_absent: bool = False,
    ) -> None:
        """Apply `change` to a user index's keys (read, then conditional write or delete).

        ``likely_absent``: try creating the index first (one call instead of two when the
        user has none yet; one wasted call when they have).
        """
        name = user_index_name(channel_id, kind, value)
        if likely_absent:
            # A new user's first conversation: create the index straight away (If-None-
            # Match: *), no read first; if it exists after all, read and apply as usual.
            wanted = change([])
            if wanted and await self._put(name, _index_body(wanted), None) is not None:
                return
        for attempt in range(self._max_attempts):
            found = await self._read_json(name)
            keys = _index_keys(found[0]) if found else []
            wanted = change(keys)
            if wanted == keys and (found is None or wanted):
                return  # already so (an index left with no key is removed below)
            if wanted:
                etag = found[1] if found else None
                done = await self._put(name, _index_body(wanted), etag) is not None
            else:
                done = await self._remove(name, found[1]) is not None  # type: ignore[index]
            if done:
                return
            await self._backoff(attempt)
        raise StoreConflict(
            f"reference store: user index of {_short(value)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )

    async def _backoff(self, attempt: int) -> None:
        await self._sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))

    def _remember(self, stored: StoredReference, generation: int) -> None:
        """Cache what was read or written, unless a delete ran since it was read."""
        if generation == self._deletions:
            self._cache.put(stored)

    def _forget(self, key: str) -> None:
        self._deletions += 1
        self._cache.drop(key)

    async def _create_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            await self._container().create_container()
            logger.info("references: created container %s", self._container_name)

    async def _list(self, filters: _Filters, state: dict[str, Any], page_size: int) -> Page:
        """One page: Azure pages fetched from a marker, skipping names up to `after`.

        The token holds Azure's marker of the page being consumed and the last name handed
        out from it, so a page that ends mid-listing-page resumes exactly after that name.
        """
        from azure.core.exceptions import ResourceNotFoundError

        filtered = filters.tenant_id is not None or filters.team_id is not None
        batch = max(page_size, self._listing_batch)
        fetch = min(MAX_PAGE_SIZE, batch) if filtered else page_size
        tenant = _meta_value(filters.tenant_id)
        team = _meta_value(filters.team_id)
        marker: str | None = state.get("m")
        after: str | None = state.get("a")
        found: list[tuple[str, Any]] = []
        while True:
            pages = (
                self._container()
                .list_blobs(
                    name_starts_with=_channel_prefix(filters.channel_id),
                    include=["metadata"],
                    results_per_page=fetch,
                )
                .by_page(continuation_token=marker)
            )
            try:
                blobs = [blob async for blob in await pages.__anext__()]
                next_marker = pages.continuation_token or None
            except (StopAsyncIteration, ResourceNotFoundError):
                blobs, next_marker = [], None  # no container yet: nothing stored
            for index, blob in enumerate(blobs):
                metadata = blob.metadata or {}
                if after is not None and blob.name <= after:
                    continue
                if tenant is not None and metadata.get("tenant") != tenant:
                    continue
                if team is not None and metadata.get("team") != team:
                    continue
                found.append((blob.name, blob))
                if len(found) == page_size:
                    if index + 1 < len(blobs):
                        token = _encode_token(filters, m=marker, a=blob.name)
                    else:
                        token = _encode_token(filters, m=next_marker) if next_marker else None
                    return Page(await self._materialize(found, filters), token)
            if not next_marker:
                return Page(await self._materialize(found, filters), None)
            # `after` stays: names handed out before may reappear on a later listing page
            # when conversations were added in front of them meanwhile.
            marker = next_marker

    async def _materialize(
        self, found: list[tuple[str, Any]], filters: _Filters
    ) -> list[StoredReference]:
        """Listed blobs → references, from metadata; a document too big for it is read."""
        semaphore = asyncio.Semaphore(16)

        async def one(name: str, blob: Any) -> StoredReference | None:
            doc = (blob.metadata or {}).get("doc")
            if doc:
                stored = from_document(_unpack(doc), blob.etag)
            else:
                async with semaphore:
                    found_json = await self._read_json(name)
                if found_json is None:
                    return None  # deleted since it was listed
                stored = from_document(found_json[0], found_json[1])
            return stored if filters.matches(stored) else None

        results = await asyncio.gather(*(one(name, blob) for name, blob in found))
        return [stored for stored in results if stored is not None]

    @contextlib.asynccontextmanager
    async def _guard(self, operation: str, key: str):
        """Bound the call in time and turn storage failures into StoreError (no secrets)."""
        from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

        timeout = self._options.operation_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except StoreError:
            raise
        except TimeoutError:
            raise StoreError(
                f"reference store: {operation} {_short(key)} timed out after {timeout:g}s"
            ) from None
        except ClientAuthenticationError as exc:
            raise StoreError(
                f"reference store: {operation} {_short(key)}: storage authentication failed "
                f"({type(exc).__name__}, HTTP {exc.status_code}); check AzureWebJobsStorage "
                "(the connection string, or the managed identity's __clientId and its role "
                "on the storage account)",
                status=exc.status_code,
            ) from None
        except HttpResponseError as exc:
            code = _error_code(exc)
            raise StoreError(
                f"reference store: {operation} {_short(key)} failed: HTTP {exc.status_code} "
                f"{code or ''}".rstrip(),
                status=exc.status_code,
                code=code,
            ) from None
        except (AzureError, OSError) as exc:
            raise StoreError(
                f"reference store: {operation} {_short(key)} failed: storage unreachable "
                f"({type(exc).__name__})"
            ) from None


def _error_code(exc: Any) -> str | None:
    """Storage's own error code ("LeaseIdMissing"), not the SDK enum's name."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code)) if code else None


def _document_body(stored: StoredReference) -> bytes:
    return json.dumps(to_document(stored), separators=(",", ":")).encode()


def _meta_value(value: str | None) -> str | None:
    return None if value is None else encode_segment(value, 200)


def _metadata(stored: StoredReference, body: bytes) -> dict[str, str]:
    metadata = {"schema": str(SCHEMA_VERSION)}
    if stored.tenant_id is not None:
        metadata["tenant"] = _meta_value(stored.tenant_id)  # type: ignore[assignment]
    if stored.team_id is not None:
        metadata["team"] = _meta_value(stored.team_id)  # type: ignore[assignment]
    packed = base64.urlsafe_b64encode(_compress(body)).decode("ascii")
    if len(packed) <= _METADATA_DOC_LIMIT:
        metadata["doc"] = packed
    return metadata


def _compress(body: bytes) -> bytes:
    """zlib with an 8 KiB window: a document copy must fit in metadata (a few KiB) anyway,
    and the default 32 KiB window costs several times the CPU to set up. Any zlib reader
    decompresses it (the window size is in the header)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 13, 5)
    return compressor.compress(body) + compressor.flush()


def _unpack(packed: str) -> Any:
    try:
        return json.loads(zlib.decompress(base64.urlsafe_b64decode(packed)))
    except (ValueError, zlib.error):
        raise StoreError("reference store: unreadable document copy in blob metadata") from None


def create_reference_store(settings: Settings) -> ReferenceStore:
    """The Blob store for `settings`; SettingsError now when AzureWebJobsStorage is unusable."""
    check_storage_settings(settings.storage, "blob")
    return BlobReferenceStore(settings)
