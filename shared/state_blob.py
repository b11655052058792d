"""Bot state in Azure Blob storage (the contract is in :mod:`shared.state`).

Layout, in container ``BOT_REFERENCES_CONTAINER`` (created on first write)::

    state/conversation/<channel>/<conversation id>.json
    state/user/<channel>/<user id>.json

Name segments are encoded as the reference store's are (``b`` + base64url of the UTF-8
id, or ``h`` + SHA-256 for an id too long), and each document keeps its full key, so a
hashed name never answers for another key. A document is plain JSON::

    {"schemaVersion": 1, "key": "user/msteams/29:…", "updatedAt": "…", "data": {…},
     "writeIds": [...]}

(``writeIds``: the ids of the write that stored it and of those it was written over,
newest first; see :class:`shared.state.StateStore`.) A user state saved on Teams has its
owner's aadObjectId in its metadata (``aad``), for an erasure by that id to find it.

Writes create with ``If-None-Match: *`` and update with ``If-Match`` on the ETag read.
Storage failures become :class:`shared.state.StateError` naming the operation, never the
SDK's text (which may carry a SAS URL). The storage SDK is imported on first use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from shared.blob_container import ContainerVanished, LazyContainer
from shared.config import Settings
from shared.references.contract import refused_credential, storage_auth_message
from shared.references.keys import decode_segment, encode_segment
from shared.state import (
    MAX_STATE_BYTES,
    StateDocument,
    StateError,
    aad_label,
    encode_data,
    from_document,
    owner_label,
    split_state_key,
    to_document,
)
from shared.storage import (
    DEFAULT_OPTIONS,
    StorageOptions,
    unreadable_answer,
    unreadable_message,
)

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient

logger = logging.getLogger(__name__)

STATE_PREFIX = "state/"
_CHANNEL_BUDGET = 96  # characters of a channel-id segment, as for references
_LISTING_PAGE = 1000  # names per listing call of delete_prefixed and delete_user_states
OWNER_METADATA = "aad"  # a user state's owner, Teams' aadObjectId (state.owner_label)
_PARALLEL_DELETES = 16


def state_blob_name(key: str) -> str:
    scope, channel_id, owner_id = split_state_key(key)
    channel = encode_segment(channel_id, _CHANNEL_BUDGET)
    return f"{STATE_PREFIX}{scope}/{channel}/{encode_segment(owner_id)}.json"


class BlobStateStore:
    """State documents in Blob storage. Cheap to build: nothing connects until first use."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: BlobServiceClient | None = None,
        options: StorageOptions = DEFAULT_OPTIONS,
        max_bytes: int = MAX_STATE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = max_bytes
        self._container = LazyContainer(
            settings.storage, settings.references_container, client=client, options=options
        )
        self._options = options
        self._clock = clock

    async def read(self, key: str) -> StateDocument | None:
        name = state_blob_name(key)
        async with self._guard("read"):
            found = await self._container.read(name)
        if found is None:
            return None  # no document, or no container yet
        try:
            stored = from_document(json.loads(found.body), found.etag)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than it parses
            raise StateError("state store: a stored document is not valid JSON") from None
        if stored.key != key:
            return None  # a hashed name's other key: absent
        return replace(stored, owner=owner_label(key, found.metadata.get(OWNER_METADATA)))

    async def write(
        self,
        key: str,
        data: Mapping[str, Any],
        *,
        etag: str | None,
        write_ids: Sequence[str] = (),
        aad_object_id: str | None = None,
    ) -> str | None:
        name = state_blob_name(key)
        data = json.loads(encode_data(data, self.max_bytes))
        document = to_document(key, data, self._clock(), write_ids)
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        owner = owner_label(key, aad_object_id)
        metadata = {OWNER_METADATA: owner} if owner is not None else None
        async with self._guard("write"):
            return await self._container.put(name, body, etag, metadata=metadata)

    async def delete(self, key: str) -> bool:
        name = state_blob_name(key)
        async with self._guard("delete"):
            return bool(await self._container.remove(name))

    async def delete_prefixed(self, prefix: str) -> int:
        """Delete every document whose key starts with `prefix` (``"<scope>/<channel>/"``
        and the start of an id); how many were deleted. A prefix listing: base64 of the
        prefix's whole 3-byte groups starts the name of every id that starts with it, and
        each name found is decoded and checked. Ids stored under a hashed name (over about
        600 bytes) are not found this way."""
        scope, channel_id, start = split_state_key(prefix)
        folder = f"{STATE_PREFIX}{scope}/{encode_segment(channel_id, _CHANNEL_BUDGET)}/"
        raw = start.encode("utf-8", "surrogatepass")
        whole = base64.urlsafe_b64encode(raw[: len(raw) // 3 * 3]).decode("ascii")
        return await self._delete_listed(
            f"{folder}b{whole}", lambda name: _owner(name, folder).startswith(start)
        )

    async def delete_user_states(self, channel_id: str, aad_object_id: str) -> int:
        """Delete every user state on `channel_id` saved with `aad_object_id` as its owner
        (the blob's metadata says so); how many were deleted. One listing of the channel's
        user states, with their metadata: an erasure's, not a turn's, cost."""
        label = aad_label(aad_object_id)
        if label is None:
            return 0
        folder = f"{STATE_PREFIX}user/{encode_segment(channel_id, _CHANNEL_BUDGET)}/"
        return await self._delete_listed(folder, owner=label)

    async def _delete_listed(
        self,
        prefix: str,
        wanted: Callable[[str], bool] = lambda name: True,
        *,
        owner: str | None = None,
    ) -> int:
        """Delete the blobs listed under `prefix` (those whose owner is `owner`, when
        given) whose names are `wanted`, a page at a time, a few at once; how many were
        deleted."""
        semaphore = asyncio.Semaphore(_PARALLEL_DELETES)

        async def remove(name: str) -> bool:
            async with semaphore, self._guard("delete"):
                return bool(await self._container.remove(name))

        deleted, marker = 0, None
        while True:
            async with self._guard("list"):
                names, marker = await self._names(prefix, marker, owner=owner)
            chosen = [name for name in names if wanted(name)]
            deleted += sum(await asyncio.gather(*(remove(name) for name in chosen)))
            if marker is None:
                return deleted

    async def _names(
        self, prefix: str, marker: str | None, *, owner: str | None = None
    ) -> tuple[list[str], str | None]:
        """One listing page of blob names under `prefix` (those whose owner is `owner`,
        when given), and the marker of the next."""
        from azure.core.exceptions import ResourceNotFoundError

        pages = (
            self._container.get()
            .list_blobs(
                name_starts_with=prefix,
                include=["metadata"] if owner is not None else None,
                results_per_page=_LISTING_PAGE,
            )
            .by_page(continuation_token=marker)
        )
        try:
            names = [
                blob.name
                async for blob in await pages.__anext__()
                if owner is None or (blob.metadata or {}).get(OWNER_METADATA) == owner
            ]
        except (StopAsyncIteration, ResourceNotFoundError):
            return [], None  # no container yet: nothing stored
        return names, pages.continuation_token or None

    async def close(self) -> None:
        await self._container.close()

    @contextlib.asynccontextmanager
    async def _guard(self, operation: str):
        """Bound the call in time; storage failures, and answers the storage SDK cannot
        read, become StateError (status, no text)."""
        from azure.core.exceptions import AzureError, HttpResponseError

        timeout = self._options.operation_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except StateError:
            raise
        except ContainerVanished:
            raise StateError(
                f"state store: container {self._container.name} keeps vanishing"
            ) from None
        except TimeoutError:
            raise StateError(f"state store: {operation} timed out after {timeout:g}s") from None
        except HttpResponseError as exc:
            if unreadable_answer(exc):  # a success status, its body unreadable
                raise StateError(unreadable_message(f"state store: {operation}", exc)) from None
            if refused_credential(exc):
                raise StateError(storage_auth_message(f"state store: {operation}", exc)) from None
            raise StateError(
                f"state store: {operation} failed: HTTP {exc.status_code} ({type(exc).__name__})"
            ) from None
        except (AzureError, OSError) as exc:
            raise StateError(
                f"state store: {operation} failed: storage unreachable ({type(exc).__name__})"
            ) from None
        except Exception as exc:
            if not unreadable_answer(exc):
                raise  # not the storage SDK's reading: our own code's error, as it is
            raise StateError(unreadable_message(f"state store: {operation}", exc)) from None


def _owner(name: str, folder: str) -> str:
    """The id a listed ``<folder>b….json`` name stands for ("" when it is not one)."""
    segment = name[len(folder) : -len(".json")] if name.endswith(".json") else ""
    try:
        return decode_segment(segment) or ""
    except (ValueError, UnicodeError):
        return ""


def create_state_store(settings: Settings) -> BlobStateStore:
    """The Blob state store for `settings` (nothing connects until first use)."""
    return BlobStateStore(settings)
