"""How references are named in storage: the conversation key and the blob names.

A conversation key is ``"<channelId>/<conversation.id>"`` (:func:`shared.activity.conversation_key`,
read back by :func:`split_key`). A name segment is ``b`` +
base64url(UTF-8, no padding) of the id (reversible, safe for any character), or ``h`` +
SHA-256 hex when that would exceed the segment's budget. See :mod:`shared.references`.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

from shared.activity import split_key

__all__ = [
    "channel_prefix",
    "decode_segment",
    "document_name",
    "encode_segment",
    "split_key",
    "user_index_name",
]

_CHANNEL_BUDGET = 96  # characters of a channel-id segment
_ID_BUDGET = 800  # characters of a conversation / user id segment
_DOC_PREFIX = "refs/"
_USER_PREFIX = "users/"


def encode_segment(value: str, budget: int = _ID_BUDGET) -> str:
    """A blob-name segment for any string: reversible when short, a hash when too long."""
    raw = value.encode("utf-8", "surrogatepass")
    encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    if len(encoded) < budget:
        return "b" + encoded
    return "h" + hashlib.sha256(raw).hexdigest()


def decode_segment(segment: str) -> str | None:
    """The id behind :func:`encode_segment`; None for hashed segments (read the document)."""
    if segment.startswith("b"):
        data = segment[1:]
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        return raw.decode("utf-8", "surrogatepass")
    if segment.startswith("h") and len(segment) == 65:
        return None
    raise ValueError("not an encoded name segment")


def document_name(key: str) -> str:
    channel_id, conversation_id = split_key(key)
    return f"{channel_prefix(channel_id)}{encode_segment(conversation_id)}.json"


def user_index_name(channel_id: str, kind: Literal["id", "aad"], value: str) -> str:
    channel = encode_segment(channel_id, _CHANNEL_BUDGET)
    return f"{_USER_PREFIX}{channel}/{kind}/{encode_segment(value)}.json"


def channel_prefix(channel_id: str | None) -> str:
    if channel_id is None:
        return _DOC_PREFIX
    return f"{_DOC_PREFIX}{encode_segment(channel_id, _CHANNEL_BUDGET)}/"
