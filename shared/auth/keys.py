"""Signing keys from an OpenID metadata document, fetched asynchronously and cached.

One :class:`OpenIdKeyCache` per metadata URL. Keys are refreshed at least daily and on an
unknown `kid` at most once a minute (every 5 s while the last fetch failed, the pause a
503's Retry-After names); concurrent callers share one refresh. A fetch that
fails while keys are cached keeps the cached keys, so an outage of the metadata or JWKS
endpoint does not stop valid traffic. The parsed RSA public keys are cached, so a
validation with a known `kid` costs no parsing and no I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shared.urls import is_loopback_host

if TYPE_CHECKING:
    import aiohttp
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 24 * 3600.0  # refresh at least daily
MIN_REFRESH_INTERVAL = 60.0  # an unknown kid refetches at most once a minute
COLD_RETRY_INTERVAL = 5.0  # with no keys cached, a failed fetch is retried after this
FETCH_TIMEOUT = 5.0  # seconds for the whole fetch (metadata, then JWKS)
MAX_DOCUMENT_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048

SessionFactory = Callable[[], Awaitable["aiohttp.ClientSession"]]


class KeySourceError(Exception):
    """The metadata or JWKS could not be fetched or parsed, or its URL is not allowed."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One published RSA signing key, parsed once."""

    kid: str
    public_key: RSAPublicKey
    endorsements: frozenset[str] | None  # channel ids; None when the key carries none


def require_https_or_loopback(url: str, what: str) -> None:
    """Refuse anything but https, except plain http to a loopback host (local simulators)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise KeySourceError(f"{what} is not a valid URL") from None
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and is_loopback_host(host):
        return
    raise KeySourceError(f"{what} must be https (plain http only for loopback hosts)")


def shown(url: str) -> str:
    """`url` as logs and errors show it: scheme, host, port and path; never a query (a
    function key, a signature) nor a user name or password."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(not a valid URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


class OpenIdKeyCache:
    """The signing keys published behind one OpenID metadata URL."""

    def __init__(
        self,
        metadata_url: str,
        session: SessionFactory,
        *,
        clock: Callable[[], float] = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
        min_refresh_interval: float = MIN_REFRESH_INTERVAL,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.metadata_url = metadata_url
        self._session = session
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._min_refresh_interval = min_refresh_interval
        self._timeout = timeout
        self._keys: dict[str, SigningKey] | None = None
        self._fetched_at = float("-inf")  # last successful fetch
        self._attempted_at = float("-inf")  # last fetch, successful or not
        self._miss_refreshed_at = float("-inf")  # last refetch caused by an unknown kid
        self._last_error = ""
        self._generation = 0  # bumped after every fetch; lets waiters share one
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def get(self, kid: str) -> SigningKey | None:
        """The key published under `kid`, or None when the source does not publish it.

        Raises :class:`KeySourceError` when no keys could ever be fetched, and for a kid
        not cached while the source's last fetch failed: it may be a key the issuer has just
        rolled out, which this process cannot see until the source answers again.
        """
        fetched = False  # keys fetched for this very call: an unknown kid is not refetched
        if self._keys is None:
            # Nothing cached yet: fetch, but after a failure wait a little before trying again
            # so an outage at cold start does not turn every request into two fetches.
            if self._lock.locked() or self._clock() - self._attempted_at >= COLD_RETRY_INTERVAL:
                await self._refresh()
                fetched = True
            if self._keys is None:
                raise KeySourceError(self._last_error or "no signing keys")
        elif self._due(self._refresh_interval):
            # Stale but usable: answer from the cache, refresh beside the request.
            self._refresh_in_background()
        key = self._keys.get(kid)
        if key is None and not fetched and (self._lock.locked() or self._miss_refresh_allowed()):
            # An unknown kid may be a key the issuer has just rolled out: refetch, but at
            # most once a minute (every 5 s while fetches fail), so made-up kids cannot
            # turn us into a fetch amplifier.
            self._miss_refreshed_at = self._clock()
            await self._refresh()
            key = self._keys.get(kid)
        if key is None and self._last_error:
            raise KeySourceError(f"unknown key id while the key source fails: {self._last_error}")
        return key

    async def close(self) -> None:
        """Cancel a background refresh still running (before the session is closed)."""
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _due(self, interval: float) -> bool:
        now = self._clock()
        return now - self._fetched_at >= interval and now - self._attempted_at >= (
            self._min_refresh_interval
        )

    def _miss_refresh_allowed(self) -> bool:
        if self._last_error:
            # The last fetch failed: tried again after the pause the 503's Retry-After
            # tells the channel, or its retries would all find the same failure.
            return self._clock() - self._attempted_at >= COLD_RETRY_INTERVAL
        return self._clock() - self._miss_refreshed_at >= self._min_refresh_interval

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            refresh = self._refresh(self._generation)
            self._background = asyncio.get_running_loop().create_task(refresh)

    async def _refresh(self, seen: int | None = None) -> None:
        """Fetch the keys once; callers arriving during a fetch share its result."""
        if seen is None:
            seen = self._generation
        async with self._lock:
            if self._generation != seen:
                return
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
            except KeySourceError as exc:
                # Counted from the failure: an attempt that hung until the fetch timeout
                # must not leave the pause between attempts already spent.
                self._attempted_at = self._clock()
                self._last_error = str(exc)
                log.warning(
                    "signing keys refresh failed url=%s cached=%d reason=%s",
                    shown(self.metadata_url),
                    len(self._keys or {}),
                    exc,
                )
            else:
                self._keys = keys
                self._fetched_at = self._clock()
                self._last_error = ""
                log.info(
                    "signing keys refreshed url=%s kids=%s", shown(self.metadata_url), sorted(keys)
                )
            finally:
                self._generation += 1

    async def _fetch(self) -> dict[str, SigningKey]:
        require_https_or_loopback(self.metadata_url, "OpenID metadata URL")
        try:
            session = await self._session()
        except Exception as exc:
            raise KeySourceError(f"no HTTP session: {type(exc).__name__}") from None
        try:
            async with asyncio.timeout(self._timeout):
                metadata = await self._get_json(session, self.metadata_url)
                jwks_uri = metadata.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri:
                    raise KeySourceError("OpenID metadata has no jwks_uri")
                require_https_or_loopback(jwks_uri, "jwks_uri")
                jwks = await self._get_json(session, jwks_uri)
        except TimeoutError:
            raise KeySourceError(f"fetching keys took longer than {self._timeout:g} s") from None
        return parse_jwks(jwks)

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> Mapping[str, Any]:
        import aiohttp

        try:
            async with session.get(url, headers={"Accept": "application/json"}) as response:
                # A redirect must not lead off https either, at any step of the way.
                for step in (*response.history, response):
                    require_https_or_loopback(str(step.url), "redirected URL")
                if response.status != 200:
                    raise KeySourceError(f"GET {shown(url)} answered HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise KeySourceError(f"GET {shown(url)} answered too large a document")
            document = json.loads(body)
        except KeySourceError:
            raise
        except (aiohttp.ClientError, ValueError, RuntimeError) as exc:
            # RuntimeError: a closed session. ValueError: invalid JSON or encoding.
            raise KeySourceError(f"GET {shown(url)} failed: {type(exc).__name__}") from None
        if not isinstance(document, dict):
            raise KeySourceError(f"GET {shown(url)} did not answer a JSON object")
        return document


def parse_jwks(jwks: Mapping[str, Any]) -> dict[str, SigningKey]:
    """The usable RSA signing keys of a JWKS document, by kid."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise KeySourceError("JWKS has no keys array")
    keys: dict[str, SigningKey] = {}
    for jwk in entries:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
            continue
        try:
            numbers = RSAPublicNumbers(_b64_int(jwk.get("e")), _b64_int(jwk.get("n")))
            public_key = numbers.public_key()
        except (TypeError, ValueError):
            log.warning("skipping malformed JWK kid=%s", kid)
            continue
        if public_key.key_size < MIN_RSA_BITS:
            log.warning("skipping weak JWK kid=%s bits=%d", kid, public_key.key_size)
            continue
        keys[kid] = SigningKey(kid, public_key, _endorsements(jwk.get("endorsements")))
    if not keys:
        raise KeySourceError("JWKS has no usable RSA signing key")
    return keys


def _b64_int(value: object) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("missing JWK number")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big")


def _endorsements(value: object) -> frozenset[str] | None:
    if not isinstance(value, list):
        return None
    return frozenset(item for item in value if isinstance(item, str))
