"""One Blob container of the bot's storage account, connected on first use.

Stores built on Blob storage hold one of these: it creates the service client lazily
(importing the storage SDK then, not at import time), makes a new one when the host
runs a new event loop (an async client belongs to the loop that opened its connections),
creates the container when a write finds it missing, and closes what it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from shared.config import StorageSettings
from shared.storage import DEFAULT_OPTIONS, StorageOptions, close_client, create_blob_service

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient, ContainerClient

logger = logging.getLogger(__name__)


class LazyContainer:
    """The container `name`; pass `client` to share a BlobServiceClient (not closed here)."""

    def __init__(
        self,
        storage: StorageSettings,
        name: str,
        *,
        client: BlobServiceClient | None = None,
        options: StorageOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.name = name
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

    async def create(self) -> None:
        """Create the container (another writer having created it first is fine)."""
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            await self.get().create_container()
            logger.info("storage: created container %s", self.name)

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            self._container = None
            await close_client(client)
