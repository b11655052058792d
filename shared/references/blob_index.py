"""The user indexes of the Blob reference store: lookups of a user's 1:1s, and the
erasure's mark and settling (layout in :mod:`shared.references`).

A mixin of :class:`shared.references.blob.BlobReferenceStore`, which gives it the
storage primitives (`_store`, `_guard`, `_read`, `_read_readable`, `_put`, `_remove`,
`_backoff`, `_max_attempts`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from shared.references.contract import (
    IndexChange,
    StoreConflict,
    StoredReference,
    UnreadableDocument,
    UserIndex,
    including,
    index_body,
    index_entries,
    listed_by,
    marked,
    read_index,
    readable_index,
    settled,
    short_key,
    user_lookups,
    user_matches,
)
from shared.references.keys import document_name, user_index_name

logger = logging.getLogger("shared.references")  # the package logs under one name


class UserIndexes:
    """A user's index documents: who their 1:1s are, read and changed under ETags."""

    async def find_by_user(
        self,
        *,
        channel_id: str,
        user_id: str | None = None,
        aad_object_id: str | None = None,
        tenant_id: str | None = None,
    ) -> StoredReference | None:
        lookups = user_lookups(channel_id, user_id, aad_object_id)
        async with self._guard("find_by_user", channel_id):
            for kind, value in lookups:
                index = await self._read_index(channel_id, kind, value)
                for key in index.keys if index else ():
                    stored = await self._read_readable(*document_of(key))
                    if stored and user_matches(stored, user_id, aad_object_id, tenant_id):
                        return stored
        return None

    async def user_index_overflowed(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> bool:
        lookups = user_lookups(channel_id, user_id, aad_object_id)
        async with self._guard("user_index_overflowed", channel_id):
            for kind, value in lookups:
                index = await self._read_index(channel_id, kind, value)
                if index and index.nearly_full:
                    return True
        return False

    async def _read_index(
        self, channel_id: str, kind: Literal["id", "aad"], value: str
    ) -> UserIndex | None:
        """A user's index on `channel_id` as stored, or None when there is none."""
        found = await self._read_index_blob(user_index_name(channel_id, kind, value))
        return read_index(found[0], channel_id, kind) if found else None

    async def _read_index_blob(self, name: str) -> tuple[Any, str] | None:
        """A user index's document (None when it is not JSON) and ETag, or None when there
        is no index. One this version cannot read is logged and read as overflowed
        (:func:`read_index`): it must not stop the erasure, lookups and removals it is
        part of, and an erasure then lists the channel."""
        blob = await self._store.read(name)
        if blob is None:
            return None
        try:
            document = json.loads(blob.body)
        except (ValueError, RecursionError):
            document = None
        if not readable_index(document):
            logger.warning(
                "references: user index %s cannot be read; taken as overflowed", name[-80:]
            )
        return document, blob.etag

    async def mark_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None:
        await self._change_indexes("mark_user_index", channel_id, user_id, aad_object_id, marked)

    async def settle_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None:
        lookups = user_lookups(channel_id, user_id, aad_object_id)
        async with self._guard("settle_user_index", channel_id):
            for kind, value in lookups:
                index = await self._read_index(channel_id, kind, value)
                if index is None:
                    continue
                # What is still listed after an erasure is not the user's any more (a
                # document since deleted, or now naming another user id): dropped, so no
                # index of the user's is left behind naming their conversations.
                stale = set()
                for key in index.keys:
                    name, _ = document_of(key)
                    try:
                        stored = await self._read(name, key) if name else None
                    except UnreadableDocument:
                        continue  # not this version's to judge: kept for one that can read it
                    if stored is None or not listed_by(stored, kind, value):
                        stale.add(key)
                await self._update_index(channel_id, kind, value, settled(stale))
                # A dropped conversation the user wrote in meanwhile (its document written
                # after it was read above) goes back: its own index write may have come
                # before the one above. After this read, that write comes after it.
                for key in stale:
                    stored = await self._read_readable(*document_of(key))
                    if stored is not None and listed_by(stored, kind, value):
                        await self._update_index(channel_id, kind, value, including(key))

    async def reindex(self, key: str) -> None:
        name, _ = document_of(key)
        if name is None:
            return
        async with self._guard("reindex", key):
            stored = await self._read_readable(name, key)
            if stored is None:
                return
            # An erasure running whole between the read and the writes leaves the key in
            # the erased user's index, naming a document gone (as an upsert that found
            # nothing to write does in that race): lookups skip it, the user's next
            # erasure drops it. Undoing it here took live entries out (README).
            for kind, value in index_entries(stored):
                await self._update_index(stored.channel_id, kind, value, including(key))

    async def _change_indexes(
        self,
        operation: str,
        channel_id: str,
        user_id: str | None,
        aad_object_id: str | None,
        change: IndexChange,
    ) -> None:
        lookups = user_lookups(channel_id, user_id, aad_object_id)
        async with self._guard(operation, channel_id):
            for kind, value in lookups:
                await self._update_index(channel_id, kind, value, change)

    async def _update_index(
        self,
        channel_id: str,
        kind: Literal["id", "aad"],
        value: str,
        change: IndexChange,
        *,
        likely_absent: bool = False,
    ) -> None:
        """Apply `change` to a user index (read, then conditional write or delete; an index
        left with no key is removed, unless it says it overflowed: erasure must see that).

        ``likely_absent``: try creating the index first (one call instead of two when the
        user has none yet; one wasted call when they have).
        """
        name = user_index_name(channel_id, kind, value)
        if likely_absent:
            # A new user's first conversation: create the index straight away (If-None-
            # Match: *), no read first; if it exists after all, read and apply as usual.
            wanted = change(UserIndex())
            if not wanted.empty and await self._put(name, index_body(wanted), None) is not None:
                return
        for attempt in range(self._max_attempts):
            found = await self._read_index_blob(name)
            current = read_index(found[0], channel_id, kind) if found else UserIndex()
            wanted = change(current)
            if wanted == current and (found is None or not wanted.empty):
                return  # already so (an empty index is removed below)
            if not wanted.empty:
                etag = found[1] if found else None
                done = await self._put(name, index_body(wanted), etag) is not None
            else:
                done = await self._remove(name, found[1]) is not None  # type: ignore[index]
            if done:
                return
            await self._backoff(attempt)
        raise StoreConflict(
            f"reference store: user index of {short_key(value)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )


def document_of(key: str) -> tuple[str | None, str]:
    """The document name of an index entry's key and the key; None for a key this store
    did not write."""
    try:
        return document_name(key), key
    except ValueError:
        return None, key
