"""Inbound authentication: is this request really from the Bot Framework (or the Emulator)?

Two token kinds reach the messages endpoint:

- channel tokens, issued by the Bot Framework (`iss` the cloud's channel issuer) and signed
  with a key from the Bot Framework OpenID metadata; the key's `endorsements` list the
  channels it may speak for, and the `serviceurl` claim pins the activity's serviceUrl;
- Emulator tokens, issued by AAD to the bot's own app id (v1: `appid`, v2: `azp`).

The path is chosen by the unverified `iss`, then everything is verified. Every failure
raises :class:`AuthError` whose message is an internal reason (for the log, never the
user, never the token); no other exception escapes :meth:`InboundAuthenticator.authenticate`.
When the signing keys cannot be fetched (and none are cached) it is :class:`KeysUnavailable`,
an outage rather than a verdict on the token.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from shared.auth.keys import KeySourceError, OpenIdKeyCache, SigningKey
from shared.config import CLOUDS, Settings
from shared.diagnostics import clip
from shared.serviceurl import ServiceTarget, parse_service_url
from shared.urls import is_loopback_host

if TYPE_CHECKING:
    import aiohttp

CLOCK_SKEW = 300.0  # seconds of leeway on exp and nbf (Bot Framework: 5 minutes)
MAX_TOKEN_CHARS = 16 * 1024
ALGORITHM = "RS256"  # the only algorithm the Bot Framework and AAD sign with
VERIFIED_TOKENS = 256  # signatures remembered (the channel reuses a token for an hour)

# Tenants whose AAD tokens the Bot Framework SDKs accept from the Emulator, per cloud.
BOT_FRAMEWORK_TENANTS: dict[str, tuple[str, ...]] = {
    "public": (
        "d6d49420-f39b-4df7-a1dc-d59a935871db",  # botframework.com (auth v3.1)
        "f8cdef31-a31e-4b4a-93e4-5f571e91255a",  # auth v3.2
    ),
    "usgov": ("cab8a31a-1906-4287-a0d8-4eef66b95f6e",),
}


class AuthError(Exception):
    """The request is not authenticated. `str(e)` is the internal reason: log it, never send it."""


class KeysUnavailable(AuthError):
    """The signing keys could not be fetched and none are cached: the token could not be
    checked, which says nothing against it. Raised only for a failed fetch of the keys,
    never for a fault of the token (an unknown key id after a successful fetch is one)."""


class NotLoopback(AuthError):
    """Local unauthenticated mode refused a serviceUrl off this machine. Only this refusal
    may be explained to the client (see shared.messages), and only in that mode."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent the request, once verified."""

    authenticated: bool
    kind: Literal["channel", "emulator", "anonymous"]
    app_id: str  # the app id the token was issued for ("" for anonymous)
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


ANONYMOUS = Identity(authenticated=False, kind="anonymous", app_id="")


def emulator_issuers(settings: Settings) -> frozenset[str]:
    """The AAD issuers accepted on Emulator tokens: the Bot Framework tenants and the bot's own."""
    v2_host = CLOUDS[settings.channel_service].login_authority.rstrip("/")
    tenants = list(BOT_FRAMEWORK_TENANTS[settings.channel_service])
    if settings.tenant_id:
        tenants.append(settings.tenant_id)  # SingleTenant bots get tokens from their own tenant
    issuers: set[str] = set()
    for tenant in tenants:
        issuers.add(f"https://sts.windows.net/{tenant}/")  # v1 tokens
        issuers.add(f"{v2_host}/{tenant}/v2.0")  # v2 tokens
    return frozenset(issuers)


class InboundAuthenticator:
    """Validates the `Authorization` header of each activity POSTed to the bot."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._caches: dict[str, OpenIdKeyCache] = {}
        self._emulator_issuers = emulator_issuers(settings)
        self._parsed = _ParsedTokens(VERIFIED_TOKENS)

    async def authenticate(
        self, authorization: str | None, activity: Mapping[str, Any]
    ) -> Identity:
        """The verified identity of the sender; raises AuthError for every failure."""
        try:
            return await self._authenticate(authorization, activity)
        except AuthError:
            raise
        except Exception as exc:
            # Never a 500 for an auth problem. Only the type: a message might quote input.
            raise AuthError(f"unexpected {type(exc).__name__} while authenticating") from None

    def caller_id(self, identity: Identity) -> str | None:
        """The activity's `callerId` (spec, appendix V): set only for a verified Bot Framework
        channel. Emulator tokens are signed by AAD, not the Bot Framework metadata, so they
        get none, and neither do anonymous requests."""
        if identity.authenticated and identity.kind == "channel":
            return self._settings.cloud.caller_id
        return None

    async def close(self) -> None:
        for cache in self._caches.values():
            await cache.close()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # -- the checks ------------------------------------------------------------------------

    async def _authenticate(
        self, authorization: str | None, activity: Mapping[str, Any]
    ) -> Identity:
        settings = self._settings
        if settings.auth_disabled:
            # Local use only: without credentials, talk to nothing but this machine.
            if not _is_loopback_url(activity.get("serviceUrl")):
                raise NotLoopback("unauthenticated mode accepts only loopback serviceUrls")
            return ANONYMOUS
        if not settings.app_id:
            raise AuthError("MicrosoftAppId is not configured")
        token = _bearer_token(authorization)
        parsed = self._parsed.get(token)
        if parsed is None:
            parsed = _ParsedToken(_unverified_kid(token), _unverified_claims(token).get("iss"))
            self._parsed.put(token, parsed)
        kid, issuer = parsed.kid, parsed.issuer
        if issuer == settings.channel_issuer:
            return await self._channel_identity(token, kid, activity)
        if isinstance(issuer, str) and issuer in self._emulator_issuers:
            return await self._emulator_identity(token, kid, activity)
        raise AuthError("token issuer is not trusted")

    async def _channel_identity(
        self, token: str, kid: str, activity: Mapping[str, Any]
    ) -> Identity:
        settings = self._settings
        key = await self._key_or_token_fault(
            settings.openid_metadata_url, token, kid, self._channel_claims, activity
        )
        claims = self._verified(token, key)
        if claims.get("iss") != settings.channel_issuer:
            raise AuthError("token issuer is not the channel issuer")
        self._channel_claims(claims, activity)
        channel_id = activity.get("channelId")
        if not isinstance(channel_id, str) or channel_id not in (key.endorsements or ()):
            raise AuthError(f"signing key {kid} is not endorsed for channel {clip(channel_id, 80)}")
        return Identity(True, "channel", settings.app_id, claims)

    def _channel_claims(self, claims: Mapping[str, Any], activity: Mapping[str, Any]) -> str:
        """What a channel token must say whatever its signature (AuthError otherwise)."""
        self._check_audience_and_lifetime(claims)
        # The serviceUrl the bot will send its token to must be the one the channel signed.
        service_url = claims.get("serviceurl")
        if not isinstance(service_url, str) or not service_url:
            raise AuthError("channel token has no serviceurl claim")
        # Both parsed as the Connector client will (shared.serviceurl): case, the default
        # port and a trailing slash do not matter; anything it would refuse never matches.
        target = _service_target(activity)
        if parse_service_url(service_url) != target:
            raise AuthError("serviceurl claim does not match the activity's serviceUrl")
        return self._settings.app_id

    async def _emulator_identity(
        self, token: str, kid: str, activity: Mapping[str, Any]
    ) -> Identity:
        settings = self._settings
        key = await self._key_or_token_fault(
            settings.emulator_openid_metadata_url, token, kid, self._emulator_claims, activity
        )
        claims = self._verified(token, key)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._emulator_issuers:
            raise AuthError("token issuer is not an accepted AAD issuer")
        caller = self._emulator_claims(claims, activity)
        channel_id = activity.get("channelId")
        if key.endorsements is not None and (
            not isinstance(channel_id, str) or channel_id not in key.endorsements
        ):
            raise AuthError(f"signing key {kid} is not endorsed for channel {clip(channel_id, 80)}")
        return Identity(True, "emulator", caller, claims)

    def _emulator_claims(self, claims: Mapping[str, Any], activity: Mapping[str, Any]) -> str:
        """What an Emulator token must say whatever its signature (AuthError otherwise):
        the calling app, which is the bot itself."""
        self._check_audience_and_lifetime(claims)
        # The Emulator gets an app token (client credentials). `scp` marks a user's delegated
        # token, which any user who can sign in to the bot's own app registration could get.
        if "scp" in claims:
            raise AuthError("AAD token is a user token (scp), not an app token")
        # The Emulator signs in as the bot itself: v1 names the caller in appid, v2 in azp.
        version = claims.get("ver")
        if version == "1.0":
            caller = claims.get("appid")
        elif version == "2.0":
            caller = claims.get("azp")
        else:
            raise AuthError("AAD token has no known ver claim")
        if not isinstance(caller, str) or not caller:
            raise AuthError(f"AAD v{version} token names no calling app")
        if caller != self._settings.app_id:
            raise AuthError("AAD token was issued to another app (skills are not supported)")
        # No serviceurl claim to pin it: at least the shape the Connector client accepts.
        _service_target(activity)
        return caller

    def _verified(self, token: str, key: SigningKey) -> Mapping[str, Any]:
        """The token's claims once its signature verified with ``key``, checked once per
        token and key: the same token with the same published key object verifies the same.
        A key refreshed or withdrawn since is a new (or no) object, so it is checked again.
        Every claim check runs on each use, on a read-only copy."""
        parsed = self._parsed.get(token)
        if parsed is not None and parsed.key is key and parsed.claims is not None:
            return parsed.claims
        claims = MappingProxyType(_verified_claims(token, key))
        if parsed is not None:
            parsed.key, parsed.claims = key, claims
        return claims

    def _check_audience_and_lifetime(self, claims: Mapping[str, Any]) -> None:
        audience = claims.get("aud")
        app_id = self._settings.app_id
        if not (audience == app_id or (isinstance(audience, list) and app_id in audience)):
            raise AuthError("token audience is not this bot's app id")
        now = self._clock()
        expires = claims.get("exp")
        if not _is_number(expires):
            raise AuthError("token has no exp")
        if now > expires + CLOCK_SKEW:
            raise AuthError("token expired")
        not_before = claims.get("nbf")
        if not_before is not None:
            if not _is_number(not_before):
                raise AuthError("token nbf is not a number")
            if not_before > now + CLOCK_SKEW:
                raise AuthError("token not valid yet (nbf)")

    async def _key_or_token_fault(
        self,
        metadata_url: str,
        token: str,
        kid: str,
        check: Callable[[Mapping[str, Any], Mapping[str, Any]], str],
        activity: Mapping[str, Any],
    ) -> SigningKey:
        """The signing key; when it cannot be fetched, a token that would be refused
        whatever its signature (another audience, expired, another serviceUrl, another
        app's: `check` on its claims) is still refused as such, not answered 503."""
        try:
            return await self._key(metadata_url, kid)
        except KeysUnavailable:
            check(_unverified_claims(token), activity)
            raise

    async def _key(self, metadata_url: str, kid: str) -> SigningKey:
        cache = self._caches.get(metadata_url)
        if cache is None:
            cache = OpenIdKeyCache(metadata_url, self._http_session, clock=self._clock)
            self._caches[metadata_url] = cache
        try:
            key = await cache.get(kid)
        except KeySourceError as exc:
            raise KeysUnavailable(f"signing keys unavailable: {exc}") from None
        if key is None:
            raise AuthError(f"token signed with an unknown key id {kid!r}")
        return key

    async def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session


@dataclass(slots=True)
class _ParsedToken:
    """What one token string says before and after its signature is checked."""

    kid: str
    issuer: Any
    key: SigningKey | None = None  # the key its signature verified with
    claims: Mapping[str, Any] | None = None


class _ParsedTokens:
    """The most recent tokens, parsed (and, once verified, their claims), LRU-bounded."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[str, _ParsedToken] = OrderedDict()
        self._size = size

    def get(self, token: str) -> _ParsedToken | None:
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        return entry

    def put(self, token: str, entry: _ParsedToken) -> None:
        self._entries[token] = entry
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("Authorization scheme is not Bearer")
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_CHARS or " " in token:
        raise AuthError("bearer token is empty, too long or malformed")
    return token


def _unverified_kid(token: str) -> str:
    import jwt

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("token header is not a JWT header") from None
    # Decide the algorithm before touching any key: no `none`, no HMAC keyed with a public key.
    if header.get("alg") != ALGORITHM:
        raise AuthError(f"token algorithm {str(header.get('alg'))[:20]!r} is not {ALGORITHM}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise AuthError("token header has no kid")
    return kid


def _unverified_claims(token: str) -> dict[str, Any]:
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuthError("token payload is not a JWT payload") from None


def _verified_claims(token: str, key: SigningKey) -> dict[str, Any]:
    import jwt

    try:
        # Signature only; the claims are checked here against the injected clock.
        return jwt.decode(
            token,
            key.public_key,
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise AuthError(f"signature does not verify with key {key.kid}") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"token rejected: {type(exc).__name__}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_loopback_url(url: object) -> bool:
    # No userinfo and nothing parsers disagree on: `http://evil.example\@127.0.0.1/` is
    # 127.0.0.1 to urlsplit but evil.example to a WHATWG parser.
    target = parse_service_url(url)
    return target is not None and is_loopback_host(target.host)


def _service_target(activity: Mapping[str, Any]) -> ServiceTarget:
    url = activity.get("serviceUrl")
    if not isinstance(url, str) or not url:
        raise AuthError("serviceUrl missing")
    target = parse_service_url(url)
    if target is None:
        raise AuthError("serviceUrl is not a plain https URL (http only for loopback hosts)")
    return target
