"""The in-process reference store: the same contract as the Blob store, for tests and tools."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping
from typing import Any

from shared.references.contract import (
    Filters,
    Page,
    StoredReference,
    UserIndex,
    check_page_size,
    copied,
    decode_token,
    encode_token,
    including,
    index_entries,
    listed_by,
    marked,
    plan,
    reference_key,
    settled,
    to_front,
    user_lookups,
    user_matches,
    without,
)
from shared.references.keys import (
    split_key,
)


class MemoryReferenceStore:
    """The in-process store: same contract as Blob (ETags included), for tests and tools.

    `writes` and `deletes` count document writes, so tests can see that a message which
    changes nothing material costs nothing.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._docs: dict[str, StoredReference] = {}
        self._users: dict[tuple[str, str, str], UserIndex] = {}  # (channel, kind, id)
        self._sorted: list[str] | None = None
        self._version = 0
        self.writes = 0
        self.deletes = 0

    async def get(self, key: str) -> StoredReference | None:
        split_key(key)
        stored = self._docs.get(key)
        return copied(stored) if stored else None

    async def upsert(
        self, reference: Mapping[str, Any], *, team_id: str | None = None, refresh: bool = False
    ) -> bool:
        key = reference_key(reference)
        previous = self._docs.get(key)
        planned = plan(previous, reference, team_id, self._clock())
        if planned is None:
            return False
        self._version += 1
        planned.etag = f'"m{self._version}"'
        if previous is not None:  # entries it no longer has (its user id changed) go
            kept = set(index_entries(planned))
            for kind, value in index_entries(previous, any_channel=True):
                if (kind, value) not in kept:
                    self._change_index((previous.channel_id, kind, value), without(key))
        for kind, value in index_entries(planned):
            entry = (planned.channel_id, kind, value)
            self._users[entry] = to_front(key)(self._users.get(entry, UserIndex()))
        if key not in self._docs:
            self._sorted = None
        self._docs[key] = copied(planned)
        self.writes += 1
        return True

    async def reindex(self, key: str) -> None:
        stored = self._docs.get(key)
        for kind, value in index_entries(stored) if stored else ():
            self._change_index((stored.channel_id, kind, value), including(key))

    async def delete(self, key: str) -> bool:
        split_key(key)
        stored = self._docs.pop(key, None)
        if stored is None:
            return False
        self._sorted = None
        self.deletes += 1
        for kind, value in index_entries(stored, any_channel=True):
            self._change_index((stored.channel_id, kind, value), without(key))
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
        check_page_size(page_size)
        filters = Filters(channel_id, tenant_id, team_id)
        after = decode_token(continuation, filters).get("a")
        if self._sorted is None:
            self._sorted = sorted(self._docs)
        start = bisect.bisect_right(self._sorted, after) if after is not None else 0
        items: list[StoredReference] = []
        for key in self._sorted[start:]:
            stored = self._docs.get(key)
            if stored is None or not filters.matches(stored):
                continue
            items.append(copied(stored))
            if len(items) == page_size:
                return Page(items, encode_token(filters, a=key))
        return Page(items, None)

    async def find_by_user(
        self,
        *,
        channel_id: str,
        user_id: str | None = None,
        aad_object_id: str | None = None,
        tenant_id: str | None = None,
    ) -> StoredReference | None:
        for kind, value in user_lookups(channel_id, user_id, aad_object_id):
            for key in self._users.get((channel_id, kind, value), UserIndex()).keys:
                stored = self._docs.get(key)
                if stored and user_matches(stored, user_id, aad_object_id, tenant_id):
                    return copied(stored)
        return None

    async def user_index_overflowed(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> bool:
        return any(
            self._users.get((channel_id, kind, value), UserIndex()).nearly_full
            for kind, value in user_lookups(channel_id, user_id, aad_object_id)
        )

    async def mark_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None:
        for kind, value in user_lookups(channel_id, user_id, aad_object_id):
            self._change_index((channel_id, kind, value), marked)

    async def settle_writes(self, channel_id: str) -> None:
        return None  # a write here is whole before anything else runs

    async def settle_user_index(
        self, *, channel_id: str, user_id: str | None = None, aad_object_id: str | None = None
    ) -> None:
        for kind, value in user_lookups(channel_id, user_id, aad_object_id):
            entry = (channel_id, kind, value)
            stale = {
                key
                for key in self._users.get(entry, UserIndex()).keys
                if key not in self._docs or not listed_by(self._docs[key], kind, value)
            }
            self._change_index(entry, settled(stale))

    def _change_index(
        self, entry: tuple[str, str, str], change: Callable[[UserIndex], UserIndex]
    ) -> None:
        index = change(self._users.get(entry, UserIndex()))
        if index.empty:
            self._users.pop(entry, None)  # kept while overflowed: erasure must see that
        else:
            self._users[entry] = index

    async def close(self) -> None:
        return None
