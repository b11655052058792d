"""Compact JWS tokens signed with RS256, read and verified with `cryptography` alone.

The channel and AAD tokens the bot receives are compact JWS (RFC 7515) signed with
RS256 (RFC 7518 3.3: RSASSA-PKCS1-v1_5 with SHA-256). Reading one takes a split, three
base64url decodes and two JSON documents; verifying it, one RSA verification. PyJWT does
the same, but importing it loads most of `cryptography` (X.509, SSH keys, elliptic
curves), about 20 ms of a cold start; this module needs only the RSA primitives.

Strict on purpose: exactly three segments, only the base64url alphabet (no padding, no
stray characters), JSON objects for header and payload, and no ``crit`` extension (a
recipient must reject one it does not implement; none is implemented here), which also
refuses unencoded payloads (``b64``, refused
also without ``crit``). Which algorithm and key are acceptable is the
caller's decision (shared.auth.inbound): this module only reads and verifies.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class JwsError(Exception):
    """The token is not a well-formed compact JWS. The message names the part, never the
    token's content."""


@dataclass(frozen=True, slots=True)
class Jws:
    """A token's parts, read but not verified."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes  # what the signature covers: ASCII "header.payload"
    signature: bytes


def read(token: str) -> Jws:
    """The header, claims and signature of ``token``; raises :class:`JwsError`."""
    segments = token.split(".")
    if len(segments) != 3:
        raise JwsError("token is not three dot-separated segments")
    header_b64, payload_b64, signature_b64 = segments
    header = _json_object(_decode(header_b64, "header"), "header")
    if "crit" in header:
        raise JwsError("token header has critical extensions (crit)")
    if header.get("b64", True) is not True:  # RFC 7797's unencoded payload
        raise JwsError("token header asks for an unencoded payload (b64)")
    claims = _json_object(_decode(payload_b64, "payload"), "payload")
    # Empty for `alg: none`: read, so that the caller refuses the algorithm by name.
    signature = _decode(signature_b64, "signature") if signature_b64 else b""
    return Jws(header, claims, f"{header_b64}.{payload_b64}".encode("ascii"), signature)


def verify_rs256(jws: Jws, public_key: RSAPublicKey) -> bool:
    """True when ``jws`` carries a valid RS256 signature by ``public_key``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    try:
        public_key.verify(jws.signature, jws.signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def _decode(segment: str, part: str) -> bytes:
    if not segment or not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise JwsError(f"token {part} is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise JwsError(f"token {part} is not base64url") from None


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise JwsError(f"token {part} is not JSON") from None
    if not isinstance(document, dict):
        raise JwsError(f"token {part} is not a JSON object")
    return document
