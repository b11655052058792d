"""The proactive engine's bookkeeping: small JSON blobs with create-only and ETag'd writes.

Everything the engine remembers about a request (its delivery report, each target's
slot: claim, then outcome, the broadcast fan-out cursor, the schedules' last runs) is a small blob
in `BOT_REFERENCES_CONTAINER`, written with the only primitives that stay correct when
many function instances work at once:

- :meth:`create` — ``If-None-Match: *``: exactly one writer wins (and gets the ETag); the
  rest get None.
- :meth:`replace` — ``If-Match`` on the ETag read: a concurrent change is never lost. It
  writes the whole blob: the metadata given, or none.
- :meth:`list` — names under a prefix with their metadata, so a report is aggregated
  from one listing instead of one read per blob.

:class:`BlobLedger` is the storage implementation, :class:`MemoryLedger` the in-process
one for unit tests; both honour the same contract (tests/unit/test_ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from shared import listing
from shared.blob_clients import BlobClients
from shared.config import LEDGER_CALL_SECONDS, Settings
from shared.references.contract import StoreError, refused_credential, storage_auth_failed
from shared.storage import (
    DEFAULT_OPTIONS,
    StorageOptions,
    get_blob_service,
    reading_download,
    storage_error_code,
    unreadable_answer,
    unreadable_message,
)

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobClient, ContainerClient


OPERATION_TIMEOUT = LEDGER_CALL_SECONDS  # one ledger call, the client's retries included
BLOB_CLIENTS = 1024  # blob clients kept for reuse, the least recently used dropped first


@dataclass(slots=True)
class Entry:
    """One listed blob: its name, metadata and when it was last written (epoch seconds)."""

    name: str
    metadata: dict[str, str]
    modified: float
    size: int = 0  # bytes


@dataclass(slots=True)
class Record:
    """One read blob: its JSON document and ETag."""

    data: Any
    etag: str
    modified: float = 0.0


class Ledger(Protocol):
    async def create(
        self, name: str, data: Any, *, metadata: Mapping[str, str] | None = None
    ) -> str | None: ...

    async def read(self, name: str) -> Record | None: ...

    async def replace(
        self, name: str, data: Any, etag: str, *, metadata: Mapping[str, str] | None = None
    ) -> str | None: ...

    async def delete(self, name: str, etag: str | None = None) -> bool: ...

    def list(self, prefix: str) -> AsyncIterator[Entry]: ...


class NotJson(StoreError):
    """A blob was read, and its content is not JSON: the document itself is unusable
    (any other StoreError is the storage call failing, and says nothing of the document)."""


def _body(data: Any) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: valid as a JSON escape, not as UTF-8
        return json.dumps(data, separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------------------- in memory


@dataclass(slots=True)
class MemoryLedger:
    """The in-process ledger: same contract as Blob (ETags included), for tests."""

    clock: Callable[[], float] = time.time
    blobs: dict[str, tuple[bytes, dict[str, str], str, float]] = field(default_factory=dict)
    _version: int = 0

    def _etag(self) -> str:
        self._version += 1
        return f'"m{self._version}"'

    async def create(
        self, name: str, data: Any, *, metadata: Mapping[str, str] | None = None
    ) -> str | None:
        if name in self.blobs:
            return None
        etag = self._etag()
        self.blobs[name] = (_body(data), dict(metadata or {}), etag, self.clock())
        return etag

    async def read(self, name: str) -> Record | None:
        found = self.blobs.get(name)
        if found is None:
            return None
        try:
            data = json.loads(found[0])
        except (ValueError, RecursionError):
            raise NotJson(f"proactive ledger: {name} is not valid JSON") from None
        return Record(data, found[2], found[3])

    async def replace(
        self, name: str, data: Any, etag: str, *, metadata: Mapping[str, str] | None = None
    ) -> str | None:
        found = self.blobs.get(name)
        if found is None or found[2] != etag:
            return None
        new = self._etag()
        self.blobs[name] = (_body(data), dict(metadata or {}), new, self.clock())
        return new

    async def delete(self, name: str, etag: str | None = None) -> bool:
        found = self.blobs.get(name)
        if found is None or (etag is not None and found[2] != etag):
            return False
        del self.blobs[name]
        return True

    async def list(self, prefix: str) -> AsyncIterator[Entry]:
        for name in sorted(self.blobs):
            if name.startswith(prefix):
                body, metadata, _, modified = self.blobs[name]
                yield Entry(name, dict(metadata), modified, len(body))


# ---------------------------------------------------------------------------- Blob storage


class BlobLedger:
    """The ledger in `settings.references_container` (created on first write)."""

    def __init__(
        self,
        settings: Settings,
        *,
        options: StorageOptions = DEFAULT_OPTIONS,
        page_size: int = 5000,
    ) -> None:
        self._settings = settings
        self._options = options
        self._page_size = page_size
        self._blobs = BlobClients(BLOB_CLIENTS)

    def _container(self) -> ContainerClient:
        # The process's shared client (one per event loop), as the poison queue uses.
        service = get_blob_service(self._settings.storage, self._options)
        return service.get_container_client(self._settings.references_container)

    def _blob(self, name: str) -> BlobClient:
        """The blob's client, reused for the next call on the same name (a target's slot is
        claimed, then settled): building one costs about as much CPU as a request."""
        return self._blobs.get(self._container(), name)

    async def create(
        self, name: str, data: Any, *, metadata: Mapping[str, str] | None = None
    ) -> str | None:
        from azure.core.exceptions import ResourceExistsError

        async with _guard("create", name):
            try:
                result = await self._upload(name, data, metadata, overwrite=False)
            except ResourceExistsError:
                return None
            return result["etag"]

    async def read(self, name: str) -> Record | None:
        from azure.core.exceptions import ResourceNotFoundError

        async with _guard("read", name):
            try:
                with reading_download():
                    downloader = await self._blob(name).download_blob()
                    body = await downloader.readall()
            except ResourceNotFoundError:
                return None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than it parses
            raise NotJson(f"proactive ledger: {name} is not valid JSON") from None
        modified = downloader.properties.last_modified
        return Record(data, downloader.properties.etag, modified.timestamp() if modified else 0.0)

    async def replace(
        self, name: str, data: Any, etag: str, *, metadata: Mapping[str, str] | None = None
    ) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        async with _guard("replace", name):
            try:
                result = await self._upload(
                    name, data, metadata, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            except ResourceNotFoundError:
                return None
            except HttpResponseError as error:
                if error.status_code == 412:  # changed since it was read (the SDK's class varies)
                    return None
                raise
            return result["etag"]

    async def delete(self, name: str, etag: str | None = None) -> bool:
        from azure.core import MatchConditions
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        conditions: dict[str, Any] = {}
        if etag is not None:
            conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        async with _guard("delete", name):
            try:
                await self._blob(name).delete_blob(**conditions)
            except ResourceNotFoundError:
                return False
            except HttpResponseError as error:
                if error.status_code == 412:
                    return False
                raise
            return True

    async def list(self, prefix: str) -> AsyncIterator[Entry]:
        from azure.core.exceptions import ResourceNotFoundError

        container = self._container()
        marker: str | None = None
        while True:
            # Each page is one call with its own timeout: a report of a large broadcast
            # is many pages, and must not time out as a whole.
            async with _guard("list", prefix):
                try:
                    blobs, marker = await listing.page(container, prefix, marker, self._page_size)
                except ResourceNotFoundError:
                    return  # no container yet: nothing recorded
            for blob in blobs:
                yield Entry(blob.name, blob.metadata, blob.modified, blob.size)
            if marker is None:
                return

    async def _upload(self, name: str, data: Any, metadata, **conditions: Any) -> dict:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        blob = self._blob(name)
        kwargs = {
            "metadata": dict(metadata) if metadata else None,
            "content_settings": ContentSettings(content_type="application/json"),
            **conditions,
        }
        try:
            return await blob.upload_blob(_body(data), **kwargs)
        except ResourceNotFoundError as error:
            if getattr(error, "error_code", None) != "ContainerNotFound":
                raise
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            await self._container().create_container()
        return await blob.upload_blob(_body(data), **kwargs)


@contextlib.asynccontextmanager
async def _guard(operation: str, name: str):
    """Storage failures, and answers the storage SDK cannot read, become StoreError: status
    and code only, never the service's text."""
    from azure.core.exceptions import AzureError, HttpResponseError

    try:
        async with asyncio.timeout(OPERATION_TIMEOUT):
            yield
    except StoreError:
        raise
    except TimeoutError:
        raise StoreError(f"proactive ledger: {operation} {name} timed out") from None
    except HttpResponseError as error:
        if unreadable_answer(error):  # a success status, its body unreadable
            where = f"proactive ledger: {operation} {name}"
            raise StoreError(unreadable_message(where, error)) from None
        if refused_credential(error):
            raise storage_auth_failed(f"proactive ledger: {operation} {name}", error) from None
        code = storage_error_code(error)
        raise StoreError(
            f"proactive ledger: {operation} {name} failed: HTTP {error.status_code} {code or ''}",
            status=error.status_code,
            code=code,
        ) from None
    except (AzureError, OSError) as error:
        raise StoreError(
            f"proactive ledger: {operation} {name} failed: storage unreachable "
            f"({type(error).__name__})"
        ) from None
    except Exception as error:
        if not unreadable_answer(error):
            raise  # not the storage SDK's reading: our own code's error, as it is
        where = f"proactive ledger: {operation} {name}"
        raise StoreError(unreadable_message(where, error)) from None


def iso(epoch: float) -> str:
    """An epoch time as the reports and documents write it (UTC, milliseconds, Z)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
