"""The conversation-reference store: the bot's memory of where it can send proactively.

Two implementations honour one contract (tests/unit/test_references.py runs against both):
:class:`BlobReferenceStore` (Azure Blob storage, async; :mod:`shared.references.blob`) and
:class:`MemoryReferenceStore` (:mod:`shared.references.memory`). The contract and the
document rules are in :mod:`shared.references.contract`, the names in
:mod:`shared.references.keys`; the names below are re-exported from here.

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
         "createdAt": "2025-01-01T00:00:00.000000Z", "updatedAt": "2025-01-01T00:00:00.000000Z"}

    Blob metadata (written in the same request as the body, so never out of step):
    ``schema``, ``tenant`` and ``team`` (encoded like a name segment) and ``doc`` (the
    document, zlib + base64url, when under 7,000 characters). Listing by channel is a
    prefix listing; tenant and team filters read the metadata that comes with the listing,
    so neither filtering nor paging reads the documents themselves. Tenant and team are
    indexed for Teams conversations only: another channel's client can write anything
    into its channelData.

``users/<channel>/id/<user id>.json`` and ``users/<channel>/aad/<aadObjectId>.json``
    Small index documents ``{"schemaVersion": 1, "key": "<conversation key>"}`` pointing at
    a user's 1:1 conversation, plus ``"older": [...]`` (most recent first, at most
    ``INDEX_KEYS`` = 256 in all) when the user has more than one (a guest's 1:1 in each
    tenant; several Web Chat sessions), so a lookup narrowed to a tenant, or made after the
    latest one was deleted, still finds the others. A write that drops the oldest key for
    lack of room adds ``"overflowed": true``, which later writes keep, and the document is
    kept while it says so, even with no key left: erasure (:mod:`shared.userdata`) then
    lists the channel too, and clears the mark (``settle_user_index``) once all is erased.
    An erasure sets the same mark before it deletes anything (``mark_user_index``), so
    that one stopped part-way is finished by a retry that lists the channel.
    ``overflowed`` is always written; a document without it comes from an earlier
    version, which kept 8 keys unmarked, and counts as overflowed when full (on Teams) or
    always (elsewhere).
    The ``aad`` index is kept for msteams only: elsewhere the client writes aadObjectId.
    Changed with ETags like the documents; brought up to date
    after every document write (a delete takes its entries out before it removes the
    document, so the last word is always the writer's), and that write finishes even when
    the caller stopped waiting (a turn's recording budget); every entry is verified against
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
    then :class:`StoreConflict`). While most conversations this process has not cached
    turn out new (a moving average), an upsert creates the document straight away instead
    of reading its absence first; a refused create falls back to the read and merge. A new
    conversation then costs two calls (document, then user index; one more with an
    aadObjectId). ``upsert`` merges the incoming reference into the stored
    one (top-level fields; nested objects with the same ``id`` merge too) and writes only
    when something material changed: ``activityId`` never forces a write. A group
    conversation's reference keeps no ``user`` (whoever spoke last) nor their ``locale``
    (a document an earlier version wrote with them is rewritten without them at its next
    activity), so nothing of a person stays where an erasure leaves it. ``delete``
    deletes the document at the ETag it read (re-reading when it changed meanwhile), then
    takes the key out of the user index, then reads the document again and puts the key
    back if a re-create stored it meanwhile: a delete racing a re-create never leaves a
    stored conversation its user cannot be found by, and one stopped halfway leaves only
    index entries naming no document (checked by every lookup, dropped by an erasure);
    the steps after the document's delete run to the end even when the caller stops
    waiting, like an upsert's index write. An upsert that changes nothing still
    checks (when it read the document) that the user index lists the conversation and
    puts it back if not, which repairs an upsert whose index write failed after its
    document write (such an upsert raises and is not cached, so the conversation's next
    activity reads the document).

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

from shared.references.blob import BLOB_CLIENTS, BlobReferenceStore, create_reference_store
from shared.references.contract import (
    INDEX_KEYS,
    MAX_PAGE_SIZE,
    SCHEMA_VERSION,
    TEAMS_CHANNEL,
    VOLATILE_FIELDS,
    Page,
    ReferenceStore,
    StoreConflict,
    StoredReference,
    StoreError,
    UnreadableDocument,
    from_document,
    is_personal,
    reference_key,
    to_document,
)
from shared.references.keys import (
    decode_segment,
    document_name,
    encode_segment,
    split_key,
    user_index_name,
)
from shared.references.memory import MemoryReferenceStore

__all__ = [
    "BLOB_CLIENTS",
    "INDEX_KEYS",
    "MAX_PAGE_SIZE",
    "SCHEMA_VERSION",
    "TEAMS_CHANNEL",
    "VOLATILE_FIELDS",
    "BlobReferenceStore",
    "MemoryReferenceStore",
    "Page",
    "ReferenceStore",
    "StoreConflict",
    "StoreError",
    "StoredReference",
    "UnreadableDocument",
    "create_reference_store",
    "decode_segment",
    "document_name",
    "encode_segment",
    "from_document",
    "is_personal",
    "reference_key",
    "split_key",
    "to_document",
    "user_index_name",
]
