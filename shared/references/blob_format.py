"""A reference as a blob: the document's body, and the metadata stored beside it (the
schema version, the tenant and team a listing filters on, and a compressed copy of the
document that a listing reads instead of downloading each body). Layout in
:mod:`shared.references`."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

from shared.references.contract import (
    SCHEMA_VERSION,
    StoredReference,
    UnreadableDocument,
    to_document,
)
from shared.references.keys import encode_segment

METADATA_DOC_LIMIT = 7000  # Azure allows 8 KiB of metadata in all


def document_body(stored: StoredReference) -> bytes:
    return json.dumps(to_document(stored), separators=(",", ":")).encode()


def meta_value(value: str | None) -> str | None:
    return None if value is None else encode_segment(value, 200)


def blob_metadata(stored: StoredReference, body: bytes) -> dict[str, str]:
    metadata = {"schema": str(SCHEMA_VERSION)}
    if stored.tenant_id is not None:
        metadata["tenant"] = meta_value(stored.tenant_id)  # type: ignore[assignment]
    if stored.team_id is not None:
        metadata["team"] = meta_value(stored.team_id)  # type: ignore[assignment]
    packed = base64.urlsafe_b64encode(compress(body)).decode("ascii")
    if len(packed) <= METADATA_DOC_LIMIT:
        metadata["doc"] = packed
    return metadata


def compress(body: bytes) -> bytes:
    """zlib with an 8 KiB window: a document copy must fit in metadata (a few KiB) anyway,
    and the default 32 KiB window costs several times the CPU to set up. Any zlib reader
    decompresses it (the window size is in the header)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 13, 5)
    return compressor.compress(body) + compressor.flush()


def unpack_copy(packed: str) -> Any:
    try:
        return json.loads(zlib.decompress(base64.urlsafe_b64decode(packed)))
    except (ValueError, RecursionError, zlib.error):
        raise UnreadableDocument(
            "reference store: unreadable document copy in blob metadata"
        ) from None
