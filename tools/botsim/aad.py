"""botsim's fake Microsoft Entra ID (AAD) token service, over HTTPS, for MSAL.

:class:`FakeAAD` serves what MSAL's ``ConfidentialClientApplication`` needs for the
client-credentials flow with authority ``https://127.0.0.1:<port>/<tenant>`` when
authority validation and instance discovery are off: the tenant's OpenID configuration
and its token endpoint. It accepts three grants, checked like Entra does:

- client secret (``client_secret``);
- certificate (``client_assertion``: a JWT signed with the registered certificate's key,
  ``x5t``/``x5t#S256`` its thumbprint, ``x5c`` the certificate when sent);
- federated assertion (``client_assertion``: a JWT minted by :meth:`FakeAAD.federated_assertion`,
  as a Kubernetes workload-identity token file would hold).

TLS uses a CA generated at start (trustme); its PEM is written to :attr:`FakeAAD.ca_path`
for clients to trust through ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE``.

:class:`FakeManagedIdentity` stands in for the App Service / Functions managed identity
endpoint (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``) that MSAL's ``ManagedIdentityClient``
calls.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import os
import secrets
import ssl
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import jwt
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tools.botsim.server import BackgroundServer

CLIENT_CREDENTIALS = "client_credentials"
# The audiences the Connector accepts (public and US Gov clouds).
CONNECTOR_SCOPES = frozenset(
    {"https://api.botframework.com/.default", "https://api.botframework.us/.default"}
)
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
_SECRET_FIELDS = ("client_secret", "client_assertion")


@dataclass(slots=True)
class AadError:
    """A scripted error answer of the token endpoint."""

    error: str = "invalid_client"
    code: int = 7000215
    description: str = "Invalid client secret provided."
    status: int = 401
    echo_form: bool = False  # answer plain text quoting the request's form (a proxy's page)


@dataclass(slots=True)
class _Client:
    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None
    require_x5c: bool = False
    federated_subject: str | None = None


@dataclass(slots=True)
class Issuance:
    client_id: str
    tenant: str
    scope: str
    grant: str  # "secret" | "certificate" | "federated"
    token: str
    expires_at: float
    assertion_header: dict[str, Any] = field(default_factory=dict)


def generate_certificate(common_name: str = "bot") -> tuple[bytes, bytes]:
    """(PEM with private key + certificate, PEM certificate) for a self-signed RSA cert."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    now = int(time.time())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(now - 60, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return key_pem + cert_pem, cert_pem


class _Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self._server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.directory = tempfile.mkdtemp(prefix="botsim-ca-")
        self.ca_path = os.path.join(self.directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_cert.configure_cert(context)
        return context

    def cleanup(self) -> None:
        try:
            os.remove(self.ca_path)
            os.rmdir(self.directory)
        except OSError:
            pass


class FakeAAD:
    """A local HTTPS Entra token service. ``authority(tenant)`` is what the bot is given."""

    def __init__(
        self,
        *,
        expires_in: int = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
        jwt_tokens: bool = False,
    ) -> None:
        self.expires_in = expires_in
        # Real access tokens are JWTs, and some clients read their expiry from them (the
        # Teams SDK does); by default the tokens are opaque, which is all the bot needs.
        self.jwt_tokens = jwt_tokens
        self.delay = 0.0  # seconds the token endpoint waits before answering
        self._tls = _Tls()
        self._clients: dict[str, _Client] = {}
        self._errors: deque[AadError] = deque()
        self._federation_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._lock = threading.Lock()
        self.issuances: list[Issuance] = []
        self.issued: Counter[str] = Counter()  # client_id -> tokens issued
        self.last_request: dict[str, dict[str, str]] = {}  # client_id -> params minus secrets
        self.rejections: list[tuple[str, str]] = []  # (client_id, AADSTS code)
        self.discovery_requests = 0
        self.app = web.Application(middlewares=[_close_connections])
        self.app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration
        )
        self.app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        self.server = BackgroundServer(
            self.app, host=host, port=port, ssl_context=self._tls.server_context()
        )

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca_path(self) -> str:
        """PEM of the CA that signed the server certificate (trust it to talk to FakeAAD)."""
        return self._tls.ca_path

    def authority(self, tenant: str = "botframework.com") -> str:
        return f"{self.url}/{tenant}"

    def token_endpoint(self, tenant: str) -> str:
        return f"{self.url}/{tenant}/oauth2/v2.0/token"

    def start(self) -> FakeAAD:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self._tls.cleanup()

    def __enter__(self) -> FakeAAD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self._clients.clear()
            self._errors.clear()
            self.issuances.clear()
            self.issued.clear()
            self.last_request.clear()
            self.rejections.clear()
            self.discovery_requests = 0
            self.delay = 0.0

    # --- registrations ----------------------------------------------------------------

    def register_secret(self, client_id: str, secret: str) -> None:
        with self._lock:
            self._client(client_id).secret = secret

    def register_certificate(
        self, client_id: str, certificate_pem: bytes, *, require_x5c: bool = False
    ) -> None:
        """Accept assertions signed by this certificate's key (``require_x5c``: SN+I only)."""
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        with self._lock:
            client = self._client(client_id)
            client.certificate = certificate
            client.require_x5c = require_x5c

    def register_federated(
        self, client_id: str, subject: str = "system:serviceaccount:bot:bot"
    ) -> None:
        """Trust workload-identity assertions for ``subject`` (a federated credential)."""
        with self._lock:
            self._client(client_id).federated_subject = subject

    def federated_assertion(
        self, subject: str = "system:serviceaccount:bot:bot", *, lifetime: int = 3600
    ) -> str:
        """A token as the workload-identity token file would hold it, signed by this fake."""
        now = int(time.time())
        claims = {
            "iss": f"{self.url}/federation",
            "sub": subject,
            "aud": FEDERATION_AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._federation_key, algorithm="RS256")

    def fail_next(self, error: AadError | None = None, count: int = 1) -> None:
        """Answer the next ``count`` token requests with ``error`` (default AADSTS7000215)."""
        with self._lock:
            self._errors.extend([error or AadError()] * count)

    def is_valid_token(self, token: str | None) -> bool:
        """True for an unexpired token this fake issued for the Bot Framework (use as a
        Connector auth check: the Connector refuses a token for another audience)."""
        now = time.time()
        with self._lock:
            return any(
                i.token == token and i.expires_at > now and i.scope in CONNECTOR_SCOPES
                for i in self.issuances
            )

    def _client(self, client_id: str) -> _Client:
        return self._clients.setdefault(client_id, _Client(client_id))

    # --- endpoints --------------------------------------------------------------------

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        with self._lock:
            self.discovery_requests += 1
        base = f"{self.url}/{tenant}"
        return web.json_response(
            {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{self.url}/{tenant}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                ],
                "response_types_supported": ["code", "id_token", "token"],
                "scopes_supported": ["openid"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if self.delay:
            await asyncio.sleep(self.delay)
        form = dict(await request.post())
        params = {k: str(v) for k, v in form.items()}
        client_id = params.get("client_id", "")
        with self._lock:
            self.last_request[client_id] = {
                k: v for k, v in params.items() if k not in _SECRET_FIELDS
            }
            scripted = self._errors.popleft() if self._errors else None
        if scripted is not None and scripted.echo_form:
            form_text = "&".join(f"{k}={v}" for k, v in params.items())
            return web.Response(status=scripted.status, text=f"Bad request. You sent: {form_text}")
        if scripted is not None:
            return self._error(client_id, scripted)
        if params.get("grant_type") != CLIENT_CREDENTIALS:
            return self._error(
                client_id,
                AadError("unsupported_grant_type", 70003, "The grant type is not supported.", 400),
            )
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            return self._error(
                client_id,
                AadError(
                    "unauthorized_client", 700016, "Application not found in the directory.", 400
                ),
            )
        grant, header, failure = self._authenticate(client, tenant, params)
        if failure is not None:
            return self._error(client_id, failure)
        token = f"fake-aad-{secrets.token_urlsafe(24)}"
        if self.jwt_tokens:
            now = int(time.time())
            claims = {"appid": client_id, "tid": tenant, "iat": now, "exp": now + self.expires_in}
            token = jwt.encode({**claims, "jti": token}, self._federation_key, algorithm="RS256")
        with self._lock:
            self.issuances.append(
                Issuance(
                    client_id,
                    tenant,
                    params.get("scope", ""),
                    grant,
                    token,
                    time.time() + self.expires_in,
                    header,
                )
            )
            self.issued[client_id] += 1
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": token,
            }
        )

    def _authenticate(
        self, client: _Client, tenant: str, params: dict[str, str]
    ) -> tuple[str, dict[str, Any], AadError | None]:
        if "client_secret" in params:
            if client.secret is None or not secrets.compare_digest(
                params["client_secret"], client.secret
            ):
                return "secret", {}, AadError()
            return "secret", {}, None
        assertion = params.get("client_assertion")
        if not assertion or params.get("client_assertion_type") != JWT_BEARER:
            return (
                "",
                {},
                AadError(
                    "invalid_client",
                    7000218,
                    "The request body must contain 'client_assertion' or 'client_secret'.",
                    401,
                ),
            )
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return "", {}, AadError("invalid_client", 50027, "Invalid JWT token.", 401)
        if "x5t" in header or "x5t#S256" in header or "x5c" in header:
            return "certificate", header, self._check_certificate(client, tenant, assertion, header)
        return "federated", header, self._check_federated(client, assertion)

    def _check_certificate(
        self, client: _Client, tenant: str, assertion: str, header: dict[str, Any]
    ) -> AadError | None:
        bad = AadError(
            "invalid_client", 700027, "Client assertion failed signature validation.", 401
        )
        certificate = client.certificate
        if certificate is None:
            return bad
        der = certificate.public_bytes(serialization.Encoding.DER)
        thumbprints = {
            "x5t": _b64url(hashlib.sha1(der).digest()),  # x5t is defined as SHA-1
            "x5t#S256": _b64url(hashlib.sha256(der).digest()),
        }
        if not any(
            str(header.get(name, "")).rstrip("=") == value for name, value in thumbprints.items()
        ):
            return bad
        x5c = header.get("x5c")
        if x5c is not None:
            chain = x5c if isinstance(x5c, list) else [x5c]
            if not chain or base64.b64decode("".join(str(chain[0]).split())) != der:
                return bad
        elif client.require_x5c:
            return bad
        try:
            claims = jwt.decode(
                assertion,
                certificate.public_key(),
                algorithms=["RS256", "PS256"],
                audience=self.token_endpoint(tenant),
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.PyJWTError:
            return bad
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            return bad
        return None

    def _check_federated(self, client: _Client, assertion: str) -> AadError | None:
        if client.federated_subject is None:
            return AadError(
                "invalid_client", 700211, "No matching federated identity record found.", 401
            )
        try:
            claims = jwt.decode(
                assertion,
                self._federation_key.public_key(),
                algorithms=["RS256"],
                audience=FEDERATION_AUDIENCE,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            return AadError(
                "invalid_client",
                700024,
                "Client assertion is not within its valid time range.",
                401,
            )
        except jwt.PyJWTError:
            return AadError(
                "invalid_client", 700211, "No matching federated identity record found.", 401
            )
        if claims.get("sub") != client.federated_subject:
            return AadError(
                "invalid_client", 700213, "No matching federated identity record found.", 401
            )
        return None

    def _error(self, client_id: str, error: AadError) -> web.Response:
        code = f"AADSTS{error.code}"
        with self._lock:
            self.rejections.append((client_id, code))
        return web.json_response(
            {
                "error": error.error,
                "error_description": (
                    f"{code}: {error.description} Trace ID: {secrets.token_hex(8)}"
                ),
                "error_codes": [error.code],
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            },
            status=error.status,
        )


class FakeManagedIdentity:
    """The App Service / Functions managed identity endpoint (api-version 2019-08-01).

    Set ``IDENTITY_ENDPOINT`` to :attr:`endpoint` and ``IDENTITY_HEADER`` to :attr:`secret`;
    MSAL's ManagedIdentityClient then asks this for tokens.
    """

    def __init__(self, *, expires_in: int = 3600, client_ids: tuple[str, ...] = ()) -> None:
        self.expires_in = expires_in
        self.secret = secrets.token_hex(16)
        self.client_ids = set(client_ids)
        self.issued: Counter[str] = Counter()  # client_id ("system" when none) -> tokens
        self.requests: list[dict[str, str]] = []
        self.tokens: set[str] = set()
        # App Service's endpoint answers with the token it issued last while that is valid:
        # set `reuse` to do the same (by default every request gets a new token).
        self.reuse = False
        self._last: tuple[str, int] | None = None
        self._failures: deque[int] = deque()
        self._lock = threading.Lock()
        self.app = web.Application()
        self.app.router.add_get("/msi/token", self._token)
        self.server = BackgroundServer(self.app)

    @property
    def endpoint(self) -> str:
        return f"{self.server.url}/msi/token"

    def start(self) -> FakeManagedIdentity:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def fail_next(self, status: int = 500, count: int = 1) -> None:
        """Answer the next ``count`` token requests with ``status``."""
        with self._lock:
            self._failures.extend([status] * count)

    def __enter__(self) -> FakeManagedIdentity:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _token(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        with self._lock:
            self.requests.append(query)
        if request.headers.get("X-IDENTITY-HEADER") != self.secret:
            return web.json_response(
                {"statusCode": 401, "message": "Unauthorized request"}, status=401
            )
        if query.get("api-version") != "2019-08-01" or not query.get("resource"):
            return web.json_response(
                {"statusCode": 400, "message": "api-version and resource are required"}, status=400
            )
        client_id = query.get("client_id", "system")
        if self.client_ids and client_id not in self.client_ids:
            return web.json_response(
                {"statusCode": 400, "message": "No managed identity with this client_id"},
                status=400,
            )
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
            last = self._last if self.reuse else None
        if failure is not None:
            return web.json_response(
                {"statusCode": failure, "message": "scripted failure"}, status=failure
            )
        if last is not None and last[1] > time.time() + 300:
            token, expires_on = last
        else:
            token = f"fake-msi-{secrets.token_urlsafe(24)}"
            expires_on = int(time.time()) + self.expires_in
            with self._lock:
                self.issued[client_id] += 1
                self.tokens.add(token)
                self._last = (token, expires_on)
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(expires_on),
                "resource": query["resource"],
                "token_type": "Bearer",
                "client_id": client_id,
            }
        )


@web.middleware
async def _close_connections(request: web.Request, handler) -> web.StreamResponse:
    # No keep-alive: MSAL's pooled TLS connections would outlive the server's loop.
    response = await handler(request)
    response.force_close()
    return response


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
