"""botsim identity: OpenID metadata + JWKS, and tokens minted like the Bot Framework's and AAD's.

One :class:`IdentityService` plays the Bot Framework channel (issuer
`https://api.botframework.com`, keys carrying `endorsements`), another plays AAD for
Emulator tokens (v1 / v2 access tokens issued to the bot's own app id). Both serve:

- ``GET <metadata_path>``: OpenID metadata (`issuer`, `jwks_uri`, supported algorithms);
- ``GET /keys``: the JWKS of the published RSA-2048 keys (`kid`, `x5t`, `n`, `e`, ...).

Tests point `BOT_OPENID_METADATA_URL` / `BOT_EMULATOR_OPENID_METADATA_URL` at them
(:func:`identity_env`), mint valid and deliberately broken tokens, rotate keys, switch
an outage on, and read how often the endpoints were fetched.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tools.botsim.server import BackgroundServer

CHANNEL_METADATA_PATH = "/v1/.well-known/openidconfiguration"
AAD_METADATA_PATH = "/common/v2.0/.well-known/openid-configuration"
JWKS_PATH = "/keys"
CHANNEL_JWKS_ALIAS = "/v1/.well-known/keys"
DEFAULT_ENDORSEMENTS = ("msteams", "webchat", "emulator", "directline", "test")
BROKEN_KINDS = ("alg_none", "hs256_public_key", "garbage", "unpublished_key", "unknown_kid")

BrokenKind = Literal["alg_none", "hs256_public_key", "garbage", "unpublished_key", "unknown_kid"]


@dataclass(frozen=True, slots=True)
class CloudProfile:
    """What differs between the public and US Gov clouds, as far as tokens go."""

    channel_issuer: str
    aad_host: str  # v2 issuers: <aad_host>/<tenant>/v2.0
    bot_framework_tenant: str  # the tenant the Emulator's tokens come from


CLOUD_PROFILES = {
    "public": CloudProfile(
        "https://api.botframework.com",
        "https://login.microsoftonline.com",
        "d6d49420-f39b-4df7-a1dc-d59a935871db",
    ),
    "usgov": CloudProfile(
        "https://api.botframework.us",
        "https://login.microsoftonline.us",
        "cab8a31a-1906-4287-a0d8-4eef66b95f6e",
    ),
}

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class SigningKeyPair:
    """One generated key: private half for minting, JWK for publishing."""

    kid: str
    private_key: rsa.RSAPrivateKey
    jwk: dict[str, Any]

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def generate_key(endorsements: Sequence[str] | None) -> SigningKeyPair:
    """An RSA-2048 key with a self-signed certificate; kid = x5t, as the Bot Framework does."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "botsim identity")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(private_key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    x5t = _b64url(hashlib.sha1(der).digest())  # x5t is defined as a SHA-1 thumbprint
    numbers = private_key.public_key().public_numbers()
    jwk: dict[str, Any] = {
        "kty": "RSA",
        "use": "sig",
        "kid": x5t,
        "x5t": x5t,
        "n": _b64url_uint(numbers.n),
        "e": _b64url_uint(numbers.e),
        "x5c": [base64.b64encode(der).decode()],
    }
    if endorsements is not None:
        jwk["endorsements"] = list(endorsements)
    return SigningKeyPair(x5t, private_key, jwk)


class IdentityService:
    """An OpenID metadata + JWKS server with token minting, served on a loopback port."""

    def __init__(
        self,
        *,
        issuer: str = CLOUD_PROFILES["public"].channel_issuer,
        metadata_path: str = CHANNEL_METADATA_PATH,
        endorsements: Sequence[str] | None = DEFAULT_ENDORSEMENTS,
        cloud: Literal["public", "usgov"] = "public",
    ) -> None:
        self.issuer = issuer
        self.metadata_path = metadata_path
        self.endorsements = tuple(endorsements) if endorsements is not None else None
        self.profile = CLOUD_PROFILES[cloud]
        self.metadata_requests = 0
        self.jwks_requests = 0
        self._lock = threading.Lock()
        self._initial = generate_key(self.endorsements)
        self._published: list[SigningKeyPair] = [self._initial]  # newest (signing) last
        self._retired: dict[str, SigningKeyPair] = {}  # still mintable, no longer published
        self._unpublished: SigningKeyPair | None = None
        self._outage = False
        self.metadata_overrides: dict[str, Any] = {}  # e.g. a bad jwks_uri, for tests
        self.app = web.Application()
        self.app.router.add_get(metadata_path, self._metadata)
        self.app.router.add_get(JWKS_PATH, self._jwks)
        if metadata_path == CHANNEL_METADATA_PATH:
            # Where the real service keeps them too: clients that derive the keys' address
            # from the metadata's (the Teams SDK does) find them there.
            self.app.router.add_get(CHANNEL_JWKS_ALIAS, self._jwks)
        self.server: BackgroundServer | None = None

    # -- the two roles ---------------------------------------------------------------------

    @classmethod
    def channel(cls, cloud: Literal["public", "usgov"] = "public") -> IdentityService:
        """The Bot Framework channel's token service (keys endorsed for the usual channels)."""
        return cls(issuer=CLOUD_PROFILES[cloud].channel_issuer, cloud=cloud)

    @classmethod
    def aad(cls, cloud: Literal["public", "usgov"] = "public") -> IdentityService:
        """AAD's common v2.0 metadata, as the Emulator's tokens are checked against it.

        Like AAD's keys, these carry no endorsements.
        """
        return cls(
            issuer=f"{CLOUD_PROFILES[cloud].aad_host}/{{tenantid}}/v2.0",
            metadata_path=AAD_METADATA_PATH,
            endorsements=None,
            cloud=cloud,
        )

    # -- serving ---------------------------------------------------------------------------

    def start(self) -> IdentityService:
        self.server = BackgroundServer(self.app).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> IdentityService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("IdentityService is not started")
        return self.server.url

    @property
    def metadata_url(self) -> str:
        return self.url + self.metadata_path

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    def metadata_document(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.url + "/authorize",
            "jwks_uri": self.jwks_url,
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            **self.metadata_overrides,
        }

    def jwks_document(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(key.jwk) for key in self._published]}

    async def _metadata(self, request: web.Request) -> web.Response:
        self.metadata_requests += 1
        if self._outage:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response(self.metadata_document())

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        if self._outage:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response(self.jwks_document())

    # -- keys ------------------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKeyPair:
        """The key new tokens are signed with (the newest published key)."""
        with self._lock:
            return self._published[-1]

    @property
    def signing_kid(self) -> str:
        return self.signing_key.kid

    @property
    def published_kids(self) -> list[str]:
        with self._lock:
            return [key.kid for key in self._published]

    @property
    def unpublished_key(self) -> SigningKeyPair:
        """A key that is never in the JWKS (generated on first use)."""
        with self._lock:
            if self._unpublished is None:
                self._unpublished = generate_key(self.endorsements)
            return self._unpublished

    def rotate_key(
        self, endorsements: Sequence[str] | None = _UNSET, *, retire_old: bool = False
    ) -> str:
        """Publish a new key and sign with it from now on; returns its kid.

        `retire_old` takes the previous keys out of the JWKS (tokens can still be minted
        with them by kid, and must then fail).
        """
        chosen = self.endorsements if endorsements is _UNSET else endorsements
        key = generate_key(tuple(chosen) if chosen is not None else None)
        with self._lock:
            if retire_old:
                self._retired.update((old.kid, old) for old in self._published)
                self._published = []
            self._published.append(key)
        return key.kid

    def set_outage(self, down: bool = True) -> None:
        """While down, metadata and JWKS answer 503."""
        self._outage = down

    def reset(self) -> None:
        """Back to the state after construction: the initial key, no outage, zero counters."""
        with self._lock:
            self._published = [self._initial]
            self._retired.clear()
        self._outage = False
        self.metadata_overrides.clear()
        self.metadata_requests = 0
        self.jwks_requests = 0

    def _key(self, kid: str | None) -> SigningKeyPair:
        with self._lock:
            if kid is None:
                return self._published[-1]
            for key in self._published:
                if key.kid == kid:
                    return key
            if kid in self._retired:
                return self._retired[kid]
        if self._unpublished is not None and self._unpublished.kid == kid:
            return self._unpublished
        raise KeyError(f"no key with kid {kid!r}")

    # -- minting ---------------------------------------------------------------------------

    def mint_channel_token(
        self,
        app_id: str,
        service_url: str | None,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        kid: str | None = None,
        lifetime: float = 3600,
        iat: float | None = None,
        nbf: float | None = None,
        exp: float | None = None,
        claims: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
        now: float | None = None,
    ) -> str:
        """A token as the Bot Framework sends with each activity.

        `service_url=None` leaves the `serviceurl` claim out; `drop=("exp",)` removes claims.
        """
        payload = self._channel_claims(
            app_id, service_url, issuer, audience, lifetime, iat, nbf, exp, now
        )
        return self._sign(_finish(payload, claims, drop), self._key(kid))

    def mint_emulator_token(
        self,
        app_id: str,
        *,
        version: Literal["1.0", "2.0"] = "1.0",
        tenant: str | None = None,
        caller: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        kid: str | None = None,
        lifetime: float = 3600,
        iat: float | None = None,
        nbf: float | None = None,
        exp: float | None = None,
        claims: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
        now: float | None = None,
    ) -> str:
        """An AAD access token as the Emulator gets with the bot's own credentials.

        v1: `iss` https://sts.windows.net/<tenant>/, caller in `appid`; v2: `iss`
        <aad host>/<tenant>/v2.0, caller in `azp`. `caller` defaults to `app_id`.
        """
        tenant = tenant or self.profile.bot_framework_tenant
        caller = app_id if caller is None else caller
        payload = _times(now, lifetime, iat, nbf, exp, with_iat=True)
        payload["aud"] = app_id if audience is None else audience
        object_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"botsim:{tenant}:{caller}"))
        if version == "1.0":
            payload["iss"] = issuer or f"https://sts.windows.net/{tenant}/"
            payload.update(appid=caller, appidacr="1", idp=f"https://sts.windows.net/{tenant}/")
        else:
            payload["iss"] = issuer or f"{self.profile.aad_host}/{tenant}/v2.0"
            payload.update(azp=caller, azpacr="1")
        payload.update(
            oid=object_id,
            sub=object_id,
            tid=tenant,
            uti=secrets.token_urlsafe(16),
            ver=version,
        )
        return self._sign(_finish(payload, claims, drop), self._key(kid))

    def mint_broken(
        self,
        kind: BrokenKind,
        app_id: str,
        service_url: str | None,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        lifetime: float = 3600,
        claims: Mapping[str, Any] | None = None,
        drop: Iterable[str] = (),
        now: float | None = None,
    ) -> str:
        """A channel token with otherwise valid claims, broken in one way:

        - ``alg_none``: unsigned, header ``alg: none``;
        - ``hs256_public_key``: HS256 keyed with the signing key's public PEM;
        - ``garbage``: three segments of random base64url;
        - ``unpublished_key``: RS256 by a key that is not in the JWKS (its own kid);
        - ``unknown_kid``: RS256 by the published key, under a kid nobody publishes.
        """
        if kind == "garbage":
            return ".".join(secrets.token_urlsafe(n) for n in (24, 96, 64))
        payload = _finish(
            self._channel_claims(
                app_id, service_url, issuer, audience, lifetime, None, None, None, now
            ),
            claims,
            drop,
        )
        key = self._key(None)
        if kind == "alg_none":
            header = {"alg": "none", "typ": "JWT", "kid": key.kid}
            return f"{_b64json(header)}.{_b64json(payload)}."
        if kind == "hs256_public_key":
            header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
            signing_input = f"{_b64json(header)}.{_b64json(payload)}"
            mac = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
            return f"{signing_input}.{_b64url(mac)}"
        if kind == "unpublished_key":
            return self._sign(payload, self.unpublished_key)
        if kind == "unknown_kid":
            return self._sign(payload, key, kid=f"unknown-{secrets.token_hex(8)}")
        raise ValueError(f"unknown broken token kind {kind!r}; one of {BROKEN_KINDS}")

    def _channel_claims(
        self,
        app_id: str,
        service_url: str | None,
        issuer: str | None,
        audience: str | None,
        lifetime: float,
        iat: float | None,
        nbf: float | None,
        exp: float | None,
        now: float | None,
    ) -> dict[str, Any]:
        payload = _times(now, lifetime, iat, nbf, exp, with_iat=iat is not None)
        payload["iss"] = issuer or self.issuer
        payload["aud"] = app_id if audience is None else audience
        if service_url is not None:
            payload["serviceurl"] = service_url
        return payload

    @staticmethod
    def _sign(payload: Mapping[str, Any], key: SigningKeyPair, *, kid: str | None = None) -> str:
        headers = {"kid": kid or key.kid, "x5t": kid or key.kid, "typ": "JWT"}
        return jwt.encode(dict(payload), key.private_key, algorithm="RS256", headers=headers)


@dataclass(slots=True)
class IdentityServices:
    """The channel's and AAD's identity services, started together."""

    channel: IdentityService
    emulator: IdentityService

    def env(self) -> dict[str, str]:
        return identity_env(self.channel, self.emulator)

    def reset(self) -> None:
        self.channel.reset()
        self.emulator.reset()

    def stop(self) -> None:
        self.channel.stop()
        self.emulator.stop()

    def __enter__(self) -> IdentityServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_identity_services(cloud: Literal["public", "usgov"] = "public") -> IdentityServices:
    """Start both services on loopback ports; stop them with `.stop()` or `with`."""
    channel = IdentityService.channel(cloud).start()
    try:
        emulator = IdentityService.aad(cloud).start()
    except BaseException:
        channel.stop()
        raise
    return IdentityServices(channel, emulator)


def identity_env(channel: IdentityService, emulator: IdentityService) -> dict[str, str]:
    """The settings that point the bot's inbound authentication at these services."""
    return {
        "BOT_OPENID_METADATA_URL": channel.metadata_url,
        "BOT_EMULATOR_OPENID_METADATA_URL": emulator.metadata_url,
    }


def _times(
    now: float | None,
    lifetime: float,
    iat: float | None,
    nbf: float | None,
    exp: float | None,
    *,
    with_iat: bool,
) -> dict[str, Any]:
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {}
    if with_iat:
        payload["iat"] = int(iat) if iat is not None else issued
    payload["nbf"] = int(nbf) if nbf is not None else issued
    payload["exp"] = int(exp) if exp is not None else int(issued + lifetime)
    return payload


def _finish(
    payload: dict[str, Any], claims: Mapping[str, Any] | None, drop: Iterable[str]
) -> dict[str, Any]:
    if claims:
        payload.update(claims)
    for name in drop:
        payload.pop(name, None)
    return payload


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _b64json(value: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())
