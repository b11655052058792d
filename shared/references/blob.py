"""The reference store on Azure Blob storage, with its in-process cache of recent writes.

Layout, write rules and the cache's guarantees are described in :mod:`shared.references`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.blob_container import BLOB_CLIENTS, ContainerVanished, LazyContainer
from shared.config import Settings
from shared.references.blob_format import blob_metadata, document_body
from shared.references.blob_index import UserIndexes
from shared.references.blob_listing import list_page
from shared.references.cache import RecentCache
from shared.references.contract import (
    Filters,
    Page,
    ReferenceStore,
    StoreConflict,
    StoredReference,
    StoreError,
    UnreadableDocument,
    check_page_size,
    decode_token,
    from_document,
    including,
    index_entries,
    plan,
    reference_key,
    refused_credential,
    short_key,
    storage_auth_failed,
    to_front,
    without,
)
from shared.references.keys import (
    document_name,
)
from shared.storage import (
    DEFAULT_OPTIONS,
    StorageOptions,
    check_storage_settings,
    storage_error_code,
    unreadable_answer,
    unreadable_message,
)

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient, ContainerClient


logger = logging.getLogger("shared.references")  # the package logs under one name

_NEW_SHARE_WEIGHT = 0.2  # weight of the latest uncached upsert in the share of new ones


# How long an erasure waits for this instance's writes still under way (settle_writes).
ERASURE_WAIT = 3.0


class BlobReferenceStore(UserIndexes):
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
        listing_slice: float | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._options = options
        self._container_name = settings.references_container
        self._store = LazyContainer(
            settings.storage,
            settings.references_container,
            client=client,
            options=options,
            label="references",
            blob_clients=BLOB_CLIENTS,
        )
        self._cache = RecentCache(cache_size, cache_ttl, clock)
        self._max_attempts = max_attempts
        self._listing_batch = listing_batch
        # Seconds a listing call walks before it returns what it found (a quarter of the
        # operation timeout that bounds the call).
        self._listing_slice = (
            options.operation_timeout / 4 if listing_slice is None else listing_slice
        )
        self._deletions = 0  # bumped by every delete: a read from before it is not cached
        self._indexing: set[asyncio.Task] = set()  # writes an upsert stopped waiting for
        # Writes of a key under way (upserts and the index writes they start), by key.
        self._writing: dict[str, set[asyncio.Task]] = {}
        self._new_share = 0.0  # how often an uncached upsert found no document (see _create)
        self._clock = clock
        self._sleep = sleep

    # -- public API

    async def get(self, key: str) -> StoredReference | None:
        name = document_name(key)
        async with self._guard("get", key):
            stored = await self._read(name, key)
        # Not remembered: a cached document is one whose user index entries an upsert has
        # seen to (written, or put back); cached from here, the next activity would skip
        # that and leave an index that lost the conversation as it is.
        self._cache.drop(key)
        return stored

    async def upsert(
        self, reference: Mapping[str, Any], *, team_id: str | None = None, refresh: bool = False
    ) -> bool:
        key = reference_key(reference)
        # The cache is not trusted while this instance still writes the key (a turn that
        # stopped waiting for it): that write may change what the cache says is stored.
        cached = None if refresh or key in self._writing else self._cache.get(key)
        if cached is not None and plan(cached, reference, team_id, self._clock()) is None:
            return False
        # The document and its user index entries as one, run to the end even when the
        # caller stops waiting (a turn's recording budget): cut between the two, a stored
        # 1:1 would be missing from its user's index, and their erasure would miss it. The
        # store's own operation timeouts bound it.
        task = asyncio.ensure_future(self._upsert(key, reference, team_id))
        self._indexing.add(task)
        task.add_done_callback(self._indexing.discard)
        self._track_write(key, task)
        task.add_done_callback(lambda done: self._failed(key, done))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._unawaited)
            raise

    async def _upsert(self, key: str, reference: Mapping[str, Any], team_id: str | None) -> bool:
        name = document_name(key)
        generation = self._deletions
        async with self._guard("upsert", key):
            create_first = self._new_share > 0.5
            if create_first and await self._create(name, reference, team_id, generation):
                return True
            for attempt in range(self._max_attempts):
                current = await self._read(name, key)
                if attempt == 0 and not create_first:  # a refused create was counted
                    self._observe(new=current is None)
                planned = plan(current, reference, team_id, self._clock())
                if planned is None:
                    assert current is not None
                    # Nothing to write, but the user index may have lost this key (an index
                    # write that failed after its document's): put it back, so a `user`
                    # target finds the conversation again. One small read per uncached
                    # activity.
                    for kind, value in index_entries(current):
                        await self._update_index(current.channel_id, kind, value, including(key))
                    self._remember(current, generation)
                    return False
                etag = await self._put(
                    name,
                    document_body(planned),
                    current.etag if current else None,
                    metadata_for=planned,
                )
                if etag is not None:
                    if current is not None:
                        await self._unindex(current, planned)
                    await self._written(planned, etag, current is None, generation)
                    return True
                self._cache.drop(key)
                await self._backoff(attempt)
        raise StoreConflict(
            f"reference store: upsert of {short_key(key)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )

    async def _create(
        self, name: str, reference: Mapping[str, Any], team_id: str | None, generation: int
    ) -> bool:
        """Create the document straight away (If-None-Match: *), without reading its absence
        first: one call fewer for a new conversation, one more (the refused create) for a
        stored one, so only tried while most uncached conversations have been new."""
        planned = plan(None, reference, team_id, self._clock())
        assert planned is not None  # nothing stored: always something to write
        etag = await self._put(name, document_body(planned), None, metadata_for=planned)
        self._observe(new=etag is not None)
        if etag is None:
            return False  # stored already: read it and merge, as usual
        await self._written(planned, etag, True, generation)
        return True

    async def _unindex(self, previous: StoredReference, planned: StoredReference) -> None:
        """The user index entries a document had and no longer has (its user id changed:
        a 1:1 opened for a user by their aadObjectId, then written in by them) are removed,
        or erasing that user would leave an index naming their conversation behind."""
        kept = set(index_entries(planned))
        dropped = [e for e in index_entries(previous, any_channel=True) if e not in kept]
        for kind, value in dropped:
            await self._update_index(previous.channel_id, kind, value, without(previous.key))
        if dropped:
            # Another writer may have stored the document again for that user meanwhile
            # (its index write, a no-op then, came before ours): put those entries back.
            again = await self._read_readable(document_name(previous.key), previous.key)
            if again is not None:
                for kind, value in index_entries(again):
                    if (kind, value) in dropped:
                        await self._update_index(
                            again.channel_id, kind, value, including(again.key)
                        )

    async def _written(
        self, planned: StoredReference, etag: str, created: bool, generation: int
    ) -> None:
        """After a document write: its user index entries, then the cache.

        The document first, then the index. A delete removes the document, then takes the
        key out of the index and reads the document again, putting the key back if it is
        there (:meth:`_delete`), so the index write that follows every document write
        leaves a stored conversation findable by its user (written first, an entry could
        be removed by a delete racing a blind create, which then stores the document
        without it). The index write is not cut short when the caller
        stops waiting (a turn's recording budget): it finishes on its own, since erasure
        finds a user's 1:1s through it. Should it fail (or the process die) in between,
        nothing is remembered: the next activity reads the document, finds it unchanged
        and puts the index entry back.
        """
        task = asyncio.ensure_future(self._index(planned, created))
        self._indexing.add(task)
        task.add_done_callback(self._indexed)
        # A write of the key still, should the upsert end first (its own timeout).
        key = planned.key
        self._track_write(key, task)
        await asyncio.shield(task)
        planned.etag = etag
        self._remember(planned, generation)
        logger.debug(
            "references: %s %s", "created" if created else "updated", short_key(planned.key)
        )

    async def _index(self, planned: StoredReference, likely_absent: bool) -> None:
        async with self._guard("upsert", planned.key):
            for kind, value in index_entries(planned):
                await self._update_index(
                    planned.channel_id,
                    kind,
                    value,
                    to_front(planned.key),
                    likely_absent=likely_absent,
                )

    def _indexed(self, task: asyncio.Task) -> None:
        self._indexing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Seen by the upsert that awaited it, or by _unawaited when it stopped waiting.
            logger.debug("references: an index update failed: %s", task.exception())

    @staticmethod
    def _unawaited(task: asyncio.Task) -> None:
        """The end of an upsert its caller stopped waiting for: a failure nobody else saw."""
        error = None if task.cancelled() else task.exception()
        if error is not None:
            logger.warning(
                "references: a write finished after its caller stopped waiting, and failed: %s",
                error if isinstance(error, StoreError) else type(error).__name__,
            )

    def _failed(self, key: str, task: asyncio.Task) -> None:
        """A failed upsert leaves nothing cached: what storage holds is unknown now."""
        if task.cancelled() or task.exception() is not None:
            self._cache.drop(key)

    def _observe(self, *, new: bool) -> None:
        """Track how often an uncached conversation turns out new (a moving average)."""
        self._new_share += ((1.0 if new else 0.0) - self._new_share) * _NEW_SHARE_WEIGHT

    def _track_write(self, key: str, task: asyncio.Task) -> None:
        """`task` writes `key`: listed under it in `_writing` until it ends."""
        self._writing.setdefault(key, set()).add(task)
        task.add_done_callback(lambda done: self._written_out(key, done))

    def _written_out(self, key: str, task: asyncio.Task) -> None:
        tasks = self._writing.get(key)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._writing[key]

    async def delete(self, key: str) -> bool:
        name = document_name(key)
        writing = self._writing.get(key)
        if writing:
            # An upsert of this key still running (its caller may have stopped waiting):
            # done first, or, meeting the delete, it would store the conversation again.
            await asyncio.wait(set(writing), timeout=self._options.operation_timeout)
        self._forget(key)
        try:
            async with self._guard("delete", key):
                deleted = await self._delete(name, key)
        finally:
            # Again at the end: an upsert or get that read the document before it was
            # deleted must not leave it in the cache as stored.
            self._forget(key)
        if deleted:
            logger.debug("references: deleted %s", short_key(key))
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
        check_page_size(page_size)
        filters = Filters(channel_id, tenant_id, team_id)
        state = decode_token(continuation, filters)
        async with self._guard("list", channel_id or "*"):
            batch = max(page_size, self._listing_batch)
            return await list_page(
                self._container(),
                self._read_json,
                filters,
                state,
                page_size,
                batch,
                self._listing_slice,
            )

    async def settle_writes(self, channel_id: str) -> None:
        # A conversation this instance stored just before an erasure, whose index write
        # is still under way, would be missed by the erasure's lookups and then kept by
        # its settle (live, and the user's): this instance's writes of the channel's
        # conversations are waited for, a while (the channel waits 15 s for the erasure).
        prefix = f"{channel_id}/"
        writing = {
            t for key, tasks in self._writing.items() if key.startswith(prefix) for t in tasks
        }
        if writing:
            await asyncio.wait(writing, timeout=min(ERASURE_WAIT, self._options.operation_timeout))

    async def close(self) -> None:
        if self._indexing:  # writes still going on by themselves: ended first
            await asyncio.wait(set(self._indexing), timeout=self._options.operation_timeout)
        await self._store.close()

    # -- storage primitives (called inside _guard): the shared conditional-blob helper

    def _container(self) -> ContainerClient:
        return self._store.get()

    async def _read_json(self, name: str) -> tuple[Any, str, dict[str, str]] | None:
        blob = await self._store.read(name)
        if blob is None:
            return None  # no blob, or no container yet
        try:
            document = json.loads(blob.body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than it parses
            raise UnreadableDocument(f"reference store: {name} is not valid JSON") from None
        return document, blob.etag, blob.metadata

    async def _read(self, name: str, key: str) -> StoredReference | None:
        found = await self._read_json(name)
        if found is None:
            return None
        stored = from_document(found[0], found[1])
        return stored if stored.key == key else None  # a hashed name's other key: absent

    async def _read_readable(self, name: str | None, key: str) -> StoredReference | None:
        """:meth:`_read` for an index entry: a document this version cannot read (a newer
        `schemaVersion` after a rollback) is passed over with a warning naming it, as a
        listing does, so it stops no erasure or user target; None for no name (a key this
        store did not write: treated as absent)."""
        if name is None:
            return None
        try:
            return await self._read(name, key)
        except UnreadableDocument as unreadable:
            logger.warning("references: user index passed over %s: %s", name[-80:], unreadable)
            return None

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
        metadata = blob_metadata(metadata_for, body) if metadata_for else None
        try:
            return await self._store.put(name, body, etag, metadata=metadata)
        except ContainerVanished:
            raise StoreError(
                f"reference store: container {self._container_name} keeps vanishing"
            ) from None

    async def _remove(self, name: str, etag: str) -> bool | None:
        """Delete `name` if it is still at `etag`: True; False when it is gone already;
        None when another writer changed it first."""
        return await self._store.remove(name, etag)

    async def _delete(self, name: str, key: str) -> bool:
        """The document at the ETag it was read with, then its user index entries, which
        are put back when the document is there again (written anew meanwhile).

        In this order, a removal stopped in between (its time budget, a storage failure,
        the process ending) leaves index entries naming no document, which every lookup
        checks and an erasure drops; index entries first, it left a stored 1:1 its user's
        index no longer named, which that user's erasure then missed.
        """
        for attempt in range(self._max_attempts):
            try:
                current = await self._read(name, key)
            except UnreadableDocument as unreadable:
                removed = await self._remove_unreadable(name, unreadable)
                if removed is not None:
                    return removed
                await self._backoff(attempt)
                continue
            if current is None:
                return False
            removed = await self._remove(name, current.etag)  # type: ignore[arg-type]
            if removed is None:
                await self._backoff(attempt)  # updated meanwhile: its index entries may differ
                continue
            if index_entries(current, any_channel=True):
                # Run to the end even when the caller stops waiting (a removal's budget):
                # cut between taking the key out and the check after it, a re-create
                # indexed meanwhile would be left out of its user's index.
                task = asyncio.ensure_future(self._unindex_deleted(current, name))
                self._indexing.add(task)
                task.add_done_callback(self._indexed)
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    task.add_done_callback(self._unawaited)
                    raise
            return removed
        raise StoreConflict(
            f"reference store: delete of {short_key(key)} gave up after "
            f"{self._max_attempts} concurrent-update conflicts"
        )

    async def _unindex_deleted(self, deleted: StoredReference, name: str) -> None:
        """After a delete removed the document: its key out of its user's index, then back
        in if a document was written anew meanwhile (its writer's index write may have
        come before that)."""
        key = deleted.key
        async with self._guard("delete", key):
            for kind, value in index_entries(deleted, any_channel=True):
                await self._update_index(deleted.channel_id, kind, value, without(key))
            try:
                again = await self._read(name, key)
            except UnreadableDocument:
                return  # what wrote it indexes it, or the erasure's listing finds it
            if again is not None:
                for kind, value in index_entries(again):
                    await self._update_index(again.channel_id, kind, value, including(key))

    async def _remove_unreadable(self, name: str, unreadable: UnreadableDocument) -> bool | None:
        """Remove a document this version cannot read (the conversation it names is being
        removed, whatever wrote it): at the ETag it has now, so a concurrent write wins. Its
        user index entries, which only it could name, are dropped when its user's data is
        erased (:meth:`settle_user_index`); until then they lead nowhere."""
        blob = await self._store.read(name)
        if blob is None:
            return False
        logger.warning("references: removing %s, which cannot be read: %s", name[-80:], unreadable)
        return await self._remove(name, blob.etag)

    async def _backoff(self, attempt: int) -> None:
        await self._sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))

    def _remember(self, stored: StoredReference, generation: int) -> None:
        """Cache what was read or written, unless a delete ran since it was read."""
        if generation == self._deletions:
            self._cache.put(stored)

    def _forget(self, key: str) -> None:
        self._deletions += 1
        self._cache.drop(key)

    @contextlib.asynccontextmanager
    async def _guard(self, operation: str, key: str):
        """Bound the call in time and turn storage failures, and answers the storage SDK
        cannot read, into StoreError (no secrets, no answer text)."""
        from azure.core.exceptions import AzureError, HttpResponseError

        timeout = self._options.operation_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except StoreError:
            raise
        except TimeoutError:
            raise StoreError(
                f"reference store: {operation} {short_key(key)} timed out after {timeout:g}s"
            ) from None
        except HttpResponseError as exc:
            where = f"reference store: {operation} {short_key(key)}"
            if unreadable_answer(exc):  # a success status, its body unreadable
                raise StoreError(unreadable_message(where, exc)) from None
            if refused_credential(exc):
                raise storage_auth_failed(where, exc) from None
            code = storage_error_code(exc)
            raise StoreError(
                f"{where} failed: HTTP {exc.status_code} {code or ''}".rstrip(),
                status=exc.status_code,
                code=code,
            ) from None
        except (AzureError, OSError) as exc:
            raise StoreError(
                f"reference store: {operation} {short_key(key)} failed: storage unreachable "
                f"({type(exc).__name__})"
            ) from None
        except Exception as exc:
            if not unreadable_answer(exc):
                raise  # not the storage SDK's reading: our own code's error, as it is
            where = f"reference store: {operation} {short_key(key)}"
            raise StoreError(unreadable_message(where, exc)) from None


def create_reference_store(settings: Settings) -> ReferenceStore:
    """The Blob store for `settings`; SettingsError now when AzureWebJobsStorage is unusable."""
    check_storage_settings(settings.storage, "blob")
    return BlobReferenceStore(settings)
