"""Listing a channel's reference documents on Blob storage, page by page.

A listing is a prefix listing of the channel's documents; the tenant and team filters
are matched on each blob's metadata, and each reference is read from the compressed copy
its metadata carries (the document itself only when it was too big for that), so a page
of a broadcast reads no documents. The continuation token is the store's own
(:func:`shared.references.contract.encode_token`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared import listing
from shared.listing import Listed
from shared.references.blob_format import meta_value, unpack_copy
from shared.references.contract import (
    MAX_PAGE_SIZE,
    Filters,
    Page,
    StoredReference,
    UnreadableDocument,
    encode_token,
    from_document,
    same_id,
)
from shared.references.keys import channel_prefix, decode_segment

if TYPE_CHECKING:
    from azure.storage.blob.aio import ContainerClient

logger = logging.getLogger("shared.references")  # the package logs under one name

ReadJson = Callable[[str], Awaitable[tuple[Any, str, dict[str, str]] | None]]


async def list_page(
    container: ContainerClient,
    read_json: ReadJson,
    filters: Filters,
    state: dict[str, Any],
    page_size: int,
    batch: int,
    time_slice: float,
) -> Page:
    """One page: Azure pages fetched from a marker, skipping names up to `after`; with a
    tenant or team filter, `batch` names are fetched per Azure page (most do not match).

    The token holds Azure's marker of the page being consumed and the last name handed
    out from it, so a page that ends mid-listing-page resumes exactly after that name.
    Once `time_slice` seconds are spent, the page ends with the next Azure page, however
    few it found: a filter that matches little in a large channel (a team's channels among
    tens of thousands of conversations) is walked in calls that each end well within the
    store's operation timeout, its caller paging on.
    """
    from azure.core.exceptions import ResourceNotFoundError

    filtered = filters.tenant_id is not None or filters.team_id is not None
    fetch = min(MAX_PAGE_SIZE, batch) if filtered else page_size
    tenant, tenant_meta = filters.tenant_id, meta_value(filters.tenant_id)
    team = meta_value(filters.team_id)
    marker: str | None = state.get("m")
    after: str | None = state.get("a")
    found: list[tuple[str, Listed]] = []
    ends = time.monotonic() + time_slice
    while True:
        try:
            blobs, next_marker = await listing.page(
                container, channel_prefix(filters.channel_id), marker, fetch
            )
        except ResourceNotFoundError:
            blobs, next_marker = [], None  # no container yet: nothing stored
        for index, blob in enumerate(blobs):
            metadata = blob.metadata
            if after is not None and blob.name <= after:
                continue
            if tenant is not None and not _same_tenant(metadata.get("tenant"), tenant, tenant_meta):
                continue
            if team is not None and metadata.get("team") != team:
                continue
            found.append((blob.name, blob))
            if len(found) == page_size:
                if index + 1 < len(blobs):
                    token = encode_token(filters, m=marker, a=blob.name)
                else:
                    token = encode_token(filters, m=next_marker) if next_marker else None
                return Page(await _materialize(read_json, found, filters), token)
        if not next_marker:
            return Page(await _materialize(read_json, found, filters), None)
        if time.monotonic() >= ends:  # `after` kept, as below
            token = encode_token(filters, m=next_marker, a=after)
            return Page(await _materialize(read_json, found, filters), token)
        # `after` stays: names handed out before may reappear on a later listing page
        # when conversations were added in front of them meanwhile.
        marker = next_marker


async def _materialize(
    read_json: ReadJson, found: list[tuple[str, Listed]], filters: Filters
) -> list[StoredReference]:
    """Listed blobs → references, from metadata; a document too big for it is read.

    A document this version cannot read (a newer `schemaVersion` after a rollback, a
    blob someone else wrote under the prefix) is left out with a warning: one such blob
    must not stop every broadcast and erasure that lists its channel. Reading it
    directly (`get`, an upsert) still fails, so nothing ever rewrites it."""
    semaphore = asyncio.Semaphore(16)

    async def one(name: str, blob: Listed) -> StoredReference | None:
        try:
            doc = blob.metadata.get("doc")
            if doc:
                stored = from_document(unpack_copy(doc), blob.etag)
            else:
                async with semaphore:
                    found_json = await read_json(name)
                if found_json is None:
                    return None  # deleted since it was listed
                stored = from_document(found_json[0], found_json[1])
        except UnreadableDocument as unreadable:  # storage failing is not this
            logger.warning("references: listing left out %s: %s", name[-80:], unreadable)
            return None
        return stored if filters.matches(stored) else None

    results = await asyncio.gather(*(one(name, blob) for name, blob in found))
    return [stored for stored in results if stored is not None]


def _same_tenant(stored: str | None, wanted: str, encoded: str | None) -> bool:
    """Whether a blob's `tenant` metadata names the filter's tenant (`encoded`: its
    metadata form, computed once per call), without case (a GUID); a hashed value (a
    tenant id over 200 characters) only exactly."""
    if stored is None:
        return False
    if stored == encoded:
        return True
    try:
        value = decode_segment(stored)
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return False
    return value is not None and same_id(value, wanted)
