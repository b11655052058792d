"""One Blob container of the bot's storage account, connected on first use.

Stores built on Blob storage hold one of these: it creates the service client lazily
(importing the storage SDK then, not at import time), makes a new one when the host
runs a new event loop (an async client belongs to the loop that opened its connections),
creates the container when a write finds it missing, and closes what it created. Its
conditional ``read`` (body and ETag) / ``put`` (create-only, or If-Match) / ``remove``
(If-Match) are the one set of ETag primitives the stores build on (the reference store,
the state store); they raise the SDK's errors (each store turns them into its own,
without their text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.blob_clients import BlobClients
from shared.config import StorageSettings
from shared.storage import (
    DEFAULT_OPTIONS,
    StorageOptions,
    close_client,
    create_blob_service,
    reading_download,
)

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient

logger = logging.getLogger(__name__)

BLOB_CLIENTS = 64  # blob clients kept for reuse (see LazyContainer.blob)


@dataclass(slots=True)
class Blob:
    body: bytes
    etag: str
    metadata: dict[str, str]


class LazyContainer:
    """The container `name`; pass `client` to share a BlobServiceClient (not closed here)."""

    def __init__(
        self,
        storage: StorageSettings,
        name: str,
        *,
        client: BlobServiceClient | None = None,
        options: StorageOptions = DEFAULT_OPTIONS,
        label: str = "storage",
        blob_clients: int = BLOB_CLIENTS,
    ) -> None:
        self.name = name
        self._label = label  # how its log lines start
        self._blobs = BlobClients(blob_clients)
        self._storage = storage
        self._options = options
        self._client = client
        self._owns_client = client is None
        self._container: ContainerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> ContainerClient:
        loop = asyncio.get_running_loop()
        if self._owns_client and self._client is not None and self._loop is not loop:
            self._client = self._container = None  # the old loop's connections died with it
        if self._container is None:
            if self._client is None:
                self._client = create_blob_service(self._storage, self._options)
                self._loop = loop
            self._container = self._client.get_container_client(self.name)
        return self._container

    def blob(self, name: str) -> BlobClient:
        """The client of one blob, reused for the next call on the same name (a document
        read, then written): building one costs more CPU than the request it makes."""
        return self._blobs.get(self.get(), name)

    async def create(self) -> None:
        """Create the container (another writer having created it first is fine)."""
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            await self.get().create_container()
            logger.debug("%s: created container %s", self._label, self.name)

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            self._container = None
            self._blobs.clear()
            await close_client(client)

    async def read(self, name: str) -> Blob | None:
        """The blob `name`, or None when it (or the container) does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            with reading_download():
                downloader = await self.blob(name).download_blob()
                body = await downloader.readall()
        except ResourceNotFoundError:
            return None
        properties = downloader.properties
        return Blob(body, properties.etag, dict(properties.metadata or {}))

    async def put(
        self,
        name: str,
        body: bytes,
        etag: str | None,
        *,
        metadata: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> str | None:
        """Write `name` if it is still at `etag` (absent when None: If-None-Match *): the new
        ETag, or None when another writer changed, created or removed it first."""
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )
        from azure.storage.blob import ContentSettings

        if etag is None:
            conditions: dict[str, Any] = {"overwrite": False}
        else:
            conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        for _ in range(2):
            blob = self.blob(name)
            try:
                result = await blob.upload_blob(
                    body,
                    metadata=metadata,
                    content_settings=ContentSettings(content_type=content_type),
                    **conditions,
                )
                return result["etag"]
            except (ResourceExistsError, ResourceModifiedError):
                return None
            except ResourceNotFoundError as exc:
                if exc.error_code != "ContainerNotFound":
                    return None  # If-Match on a blob deleted meanwhile
                await self.create()
        raise ContainerVanished(f"container {self.name} keeps vanishing")

    async def remove(self, name: str, etag: str | None = None) -> bool | None:
        """Delete `name` (if still at `etag` when given): True; False when it was gone
        already; None when another writer changed it first."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        conditions: dict[str, Any] = {}
        if etag is not None:
            conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        try:
            await self.blob(name).delete_blob(**conditions)
        except ResourceNotFoundError:
            return False
        except ResourceModifiedError:
            return None
        return True


class ContainerVanished(Exception):
    """The container was deleted again each time it was created for a write."""
