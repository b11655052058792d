"""One page of a Blob prefix listing with metadata, read from the XML the SDK parsed.

The storage SDK's ``list_blobs`` turns every listed blob into a ``BlobProperties``
through its generic model deserializer, about 280 µs of CPU per blob here: 2.7-3.2 s
for the 10,000 outcomes of a large broadcast's report, read while the broadcast's
sends wait on the same event loop. Its own ``list_blob_names`` avoids that step by
reading the names from the XML its pipeline has already parsed; :func:`page` does
the same for the few fields the stores read (name, metadata, Last-Modified, size,
ETag), about 30 µs per blob, through the container's own pipeline (credentials,
retries, timeouts) and the SDK's own error mapping. Both lean on parts the SDK does not
publish (its generated client, the deserializer ``list_blob_names`` swaps in); where
this SDK version lacks them, the page is read with ``list_blobs`` instead, field for
field the same (tests/unit/test_listing.py compares the two on the same blobs).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from azure.storage.blob.aio import ContainerClient


@dataclass(frozen=True, slots=True)
class Listed:
    """A listed blob: what the stores read of it."""

    name: str
    metadata: dict[str, str]
    modified: float  # Last-Modified, seconds since the epoch (0.0: not given)
    size: int
    etag: str


# The generated client each container lists through, with the deserializer that leaves
# the parsed XML as it is (the container's own client deserializes every other answer).
_RAW_CLIENTS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


async def page(
    container: ContainerClient, prefix: str, marker: str | None, page_size: int
) -> tuple[list[Listed], str | None]:
    """The page of blobs under `prefix` that `marker` starts (None: the first), and the
    marker of the next (None: the last). Raises what the SDK's ``list_blobs`` raises (its
    ResourceNotFoundError for a missing container, ...), and its DecodeError for an
    answer that is not a listing."""
    raw = _raw_client(container)
    if raw is None:
        return await _sdk_page(container, prefix, marker, page_size)
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob._shared.response_handlers import (
        process_storage_error,
        return_raw_deserialized,
    )

    try:
        _, root = await raw.container.list_blob_flat_segment(
            prefix=prefix,
            marker=marker,
            maxresults=page_size,
            include=["metadata"],
            cls=return_raw_deserialized,
        )
    except HttpResponseError as error:
        process_storage_error(error)  # raises the SDK's own error, as list_blobs would
    return _read_listing(root)


def _raw_client(container: ContainerClient) -> Any:
    """The container's listing client that keeps the XML (None: not in this SDK)."""
    raw = _RAW_CLIENTS.get(container)
    if raw is not None:
        return raw
    try:
        from azure.storage.blob._list_blobs_helper import IgnoreListBlobsDeserializer
        from azure.storage.blob._shared.response_handlers import (  # noqa: F401
            process_storage_error,
            return_raw_deserialized,
        )

        raw = container._build_generated_client()
        raw.container._deserialize = IgnoreListBlobsDeserializer()
    except (ImportError, AttributeError):
        return None
    _RAW_CLIENTS[container] = raw
    return raw


def _read_listing(root: Any) -> tuple[list[Listed], str | None]:
    from xml.etree.ElementTree import Element

    from azure.core.exceptions import DecodeError

    if not isinstance(root, Element) or root.tag != "EnumerationResults":
        raise DecodeError("the answer to a blob listing is not a listing")
    listed = []
    blobs = root.find("Blobs")
    for blob in blobs.iterfind("Blob") if blobs is not None else ():
        name_element = blob.find("Name")
        properties = blob.find("Properties")
        if name_element is None or name_element.text is None or properties is None:
            raise DecodeError("a listed blob has no name or no properties")
        name = name_element.text
        if name_element.get("Encoded") == "true":
            name = unquote(name)  # a name with characters XML cannot carry
        metadata = blob.find("Metadata")
        modified = properties.findtext("Last-Modified")
        listed.append(
            Listed(
                name,
                {item.tag: item.text or "" for item in metadata} if metadata is not None else {},
                _seconds(modified),
                _whole(properties.findtext("Content-Length")),
                properties.findtext("Etag") or "",
            )
        )
    return listed, root.findtext("NextMarker") or None


def _seconds(http_date: str | None) -> float:
    if not http_date:
        return 0.0
    try:
        return parsedate_to_datetime(http_date).timestamp()
    except (TypeError, ValueError) as error:
        from azure.core.exceptions import DecodeError

        raise DecodeError("a listed blob's Last-Modified is not a date") from error


def _whole(text: str | None) -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError as error:
        from azure.core.exceptions import DecodeError

        raise DecodeError("a listed blob's Content-Length is not a number") from error


async def _sdk_page(
    container: ContainerClient, prefix: str, marker: str | None, page_size: int
) -> tuple[list[Listed], str | None]:
    """The same page through the SDK's public ``list_blobs``."""
    pages = container.list_blobs(
        name_starts_with=prefix, include=["metadata"], results_per_page=page_size
    ).by_page(continuation_token=marker)
    try:
        blobs = [blob async for blob in await anext(pages)]
    except StopAsyncIteration:
        return [], None
    listed = [
        Listed(
            blob.name,
            {key: value or "" for key, value in (blob.metadata or {}).items()},
            blob.last_modified.timestamp() if blob.last_modified else 0.0,
            blob.size or 0,
            blob.etag or "",
        )
        for blob in blobs
    ]
    return listed, pages.continuation_token or None
