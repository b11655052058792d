"""Bot state in Azure Blob storage (the contract is in :mod:`shared.state`).

Layout, in container ``BOT_REFERENCES_CONTAINER`` (created on first write)::

    state/conversation/<channel>/<conversation id>.json
    state/user/<channel>/<user id>.json

Name segments are encoded as the reference store's are (``b`` + base64url of the UTF-8
id, or ``h`` + SHA-256 for an id too long), and each document keeps its full key, so a
hashed name never answers for another key. A document is plain JSON::

    {"schemaVersion": 1, "key": "user/msteams/29:…", "updatedAt": "…", "data": {…}}

Writes create with ``If-None-Match: *`` and update with ``If-Match`` on the ETag read.
Storage failures become :class:`shared.state.StateError` naming the operation, never the
SDK's text (which may carry a SAS URL). The storage SDK is imported on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.blob_container import LazyContainer
from shared.config import Settings
from shared.references import encode_segment
from shared.state import (
    MAX_STATE_BYTES,
    StateDocument,
    StateError,
    encode_data,
    from_document,
    split_state_key,
    to_document,
)
from shared.storage import DEFAULT_OPTIONS, StorageOptions

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient

logger = logging.getLogger(__name__)

STATE_PREFIX = "state/"
_CHANNEL_BUDGET = 96  # characters of a channel-id segment, as for references


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
        from azure.core.exceptions import ResourceNotFoundError

        name = state_blob_name(key)
        async with self._guard("read"):
            try:
                downloader = await self._container.get().download_blob(name)
                body = await downloader.readall()
            except ResourceNotFoundError:
                return None  # no document, or no container yet
        try:
            stored = from_document(json.loads(body), downloader.properties.etag)
        except ValueError:
            raise StateError("state store: a stored document is not valid JSON") from None
        return stored if stored.key == key else None  # a hashed name's other key: absent

    async def write(self, key: str, data: Mapping[str, Any], *, etag: str | None) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )
        from azure.storage.blob import ContentSettings

        name = state_blob_name(key)
        document = to_document(key, json.loads(encode_data(data, self.max_bytes)), self._clock())
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        if etag is None:
            conditions: dict[str, Any] = {"overwrite": False}  # If-None-Match: *
        else:
            conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        async with self._guard("write"):
            for _ in range(2):
                blob = self._container.get().get_blob_client(name)
                try:
                    result = await blob.upload_blob(
                        body,
                        content_settings=ContentSettings(content_type="application/json"),
                        **conditions,
                    )
                    return result["etag"]
                except (ResourceExistsError, ResourceModifiedError):
                    return None
                except ResourceNotFoundError as exc:
                    if exc.error_code != "ContainerNotFound":
                        return None  # If-Match on a document deleted meanwhile
                    await self._container.create()
        raise StateError(f"state store: container {self._container.name} keeps vanishing")

    async def delete(self, key: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        name = state_blob_name(key)
        async with self._guard("delete"):
            try:
                await self._container.get().delete_blob(name)
            except ResourceNotFoundError:
                return False
        return True

    async def close(self) -> None:
        await self._container.close()

    @contextlib.asynccontextmanager
    async def _guard(self, operation: str):
        """Bound the call in time; storage failures become StateError (status, no text)."""
        from azure.core.exceptions import AzureError, HttpResponseError

        timeout = self._options.operation_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except StateError:
            raise
        except TimeoutError:
            raise StateError(f"state store: {operation} timed out after {timeout:g}s") from None
        except HttpResponseError as exc:
            raise StateError(
                f"state store: {operation} failed: HTTP {exc.status_code} ({type(exc).__name__})"
            ) from None
        except (AzureError, OSError) as exc:
            raise StateError(
                f"state store: {operation} failed: storage unreachable ({type(exc).__name__})"
            ) from None


def create_state_store(settings: Settings) -> BlobStateStore:
    """The Blob state store for `settings` (nothing connects until first use)."""
    return BlobStateStore(settings)
