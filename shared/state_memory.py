"""Bot state in this process (the contract is in :mod:`shared.state`): the Blob store's
contract, ETags and owners included, with no storage, for tests and local tools."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared.state import (
    MAX_STATE_BYTES,
    StateDocument,
    aad_label,
    copy_data,
    encode_data,
    from_document,
    owner_label,
    split_state_key,
    to_document,
)


class MemoryStateStore:
    """State in this process: the Blob store's contract (ETags included), no storage."""

    def __init__(
        self, *, max_bytes: int = MAX_STATE_BYTES, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._docs: dict[str, StateDocument] = {}
        self._owners: dict[str, str] = {}  # user state key -> its owner's aadObjectId label
        self._version = 0
        self.writes = 0  # successful writes, so tests can see a turn that wrote nothing

    async def read(self, key: str) -> StateDocument | None:
        split_state_key(key)
        stored = self._docs.get(key)
        if stored is None:
            return None
        return StateDocument(
            stored.key,
            copy_data(stored.data),
            stored.etag,
            stored.updated_at,
            stored.write_ids,
            self._owners.get(key),
        )

    async def write(
        self,
        key: str,
        data: Mapping[str, Any],
        *,
        etag: str | None,
        write_ids: Sequence[str] = (),
        aad_object_id: str | None = None,
    ) -> str | None:
        split_state_key(key)
        body = encode_data(data, self.max_bytes)
        current = self._docs.get(key)
        if (current.etag if current else None) != etag:
            return None
        self._version += 1
        document = to_document(key, json.loads(body), self._clock(), write_ids)
        stored = from_document(document, f'"s{self._version}"')
        self._docs[key] = stored
        if (label := owner_label(key, aad_object_id)) is not None:
            self._owners[key] = label
        else:
            self._owners.pop(key, None)
        self.writes += 1
        return stored.etag

    async def delete(self, key: str) -> bool:
        split_state_key(key)
        self._owners.pop(key, None)
        return self._docs.pop(key, None) is not None

    async def delete_user_states(self, channel_id: str, aad_object_id: str) -> int:
        """Delete every user state on `channel_id` saved with `aad_object_id` as its owner;
        how many were deleted."""
        prefix, label = f"user/{channel_id}/", aad_label(aad_object_id)
        keys = [k for k, owner in self._owners.items() if k.startswith(prefix) and owner == label]
        for key in keys:
            await self.delete(key)
        return len(keys)

    async def delete_prefixed(self, prefix: str) -> int:
        """Delete every document whose key starts with `prefix` (``"<scope>/<channel>/"``
        and the start of an id); how many were deleted."""
        split_state_key(prefix)
        keys = [key for key in self._docs if key.startswith(prefix)]
        for key in keys:
            del self._docs[key]
        return len(keys)

    async def close(self) -> None:
        return None
