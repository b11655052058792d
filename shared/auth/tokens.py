"""Outbound tokens for the Bot Connector, from Microsoft Entra ID through MSAL.

One :class:`MsalTokenProvider` per process holds one MSAL application and the current
token. The token is reused until shortly before it expires; acquisition runs in a worker
thread (MSAL is synchronous) so the event loop never blocks, and concurrent callers share
one acquisition. Credentials, in order: certificate (``MicrosoftAppCertificatePath``),
client secret (``MicrosoftAppPassword``), workload-identity federation
(``AZURE_FEDERATED_TOKEN_FILE``); ``MicrosoftAppType=UserAssignedMSI`` uses MSAL's
managed identity client instead. msal is imported on first use (cold start).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.config import Settings
from shared.logs import log_repeated

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# The tenant a multi-tenant bot asks for channel tokens, per cloud (Azure Government has
# its own; the Bot Framework SDKs use the same values).
CHANNEL_AUTH_TENANTS = {"public": "botframework.com", "usgov": "MicrosoftServices.onmicrosoft.us"}

# Refresh this long before expiry (capped at half the lifetime for short-lived tokens).
REFRESH_MARGIN_SECONDS = 300.0
# If a refresh fails, keep using the current token while it has at least this long left.
STALE_TOKEN_GRACE_SECONDS = 30.0
# After a failed refresh, a token still valid is used this long before the next attempt.
REFRESH_RETRY_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 10.0

# Entra error codes worth a hint about which setting to check.
_AADSTS_HINTS = {
    "7000215": "MicrosoftAppPassword",  # invalid client secret
    "7000222": "MicrosoftAppPassword",  # expired client secret
    "700027": "MicrosoftAppCertificatePath",  # assertion signature / unknown certificate
    "700016": "MicrosoftAppId",  # application not found in the directory
    "90002": "MicrosoftAppTenantId",  # tenant not found
    "700211": "AZURE_FEDERATED_TOKEN_FILE",  # no matching federated identity record
    "700024": "AZURE_FEDERATED_TOKEN_FILE",  # assertion outside its validity window
}


class TokenError(Exception):
    """No token could be obtained. The message names the setting or the Entra error code."""

    def __init__(
        self,
        message: str,
        *,
        setting: str | None = None,
        code: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.setting = setting
        self.code = code
        self.transient = transient


class TokenProvider(Protocol):
    async def get_token(self, *, force_refresh: bool = False) -> str: ...


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = ""
    expires_at: float = 0.0
    refresh_at: float = 0.0


def create_token_provider(
    settings: Settings, *, clock: Clock = time.time
) -> MsalTokenProvider | None:
    """The process's token provider; None without an app id (local, unauthenticated).

    Cheap and never raises: configuration problems surface as :class:`TokenError` from
    the first :meth:`MsalTokenProvider.get_token`, naming the setting.
    """
    if not settings.app_id:
        return None
    return MsalTokenProvider(settings, clock=clock)


class MsalTokenProvider:
    """Tokens for ``settings.oauth_scope`` via MSAL, cached until shortly before expiry."""

    def __init__(self, settings: Settings, *, clock: Clock = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._token = _Token()
        self._client: Callable[[], dict[str, Any]] | None = None
        self._msal_cache: Any = None
        self._thread_lock = threading.Lock()
        self._inflight: asyncio.Task[_Token] | None = None
        self._inflight_loop: asyncio.AbstractEventLoop | None = None
        self._prefetched = False
        self._retry_at = 0.0  # no background refresh before then (one just failed)
        self._last_error: TokenError | None = None  # why the latest refresh failed
        self._reported: TokenError | None = None  # the last failure a caller was given

    @property
    def credential_kind(self) -> str:
        """Which credential the settings select: certificate, secret, federated or msi."""
        settings = self._settings
        if settings.app_type == "UserAssignedMSI":
            return "msi"
        if settings.certificate_path:
            return "certificate"
        if settings.app_password:
            return "secret"
        if settings.federated_token_file:
            return "federated"
        return "none"

    @property
    def authority(self) -> str:
        settings = self._settings
        if settings.app_type == "MultiTenant":
            tenant = CHANNEL_AUTH_TENANTS[settings.channel_service]
        else:
            tenant = settings.tenant_id
        return f"{settings.login_authority.rstrip('/')}/{tenant}"

    async def get_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token. ``force_refresh`` after the Connector rejected the current one.

        A token in its last minutes (past ``refresh_at``) with more than the grace left is
        returned at once while a new one is acquired in the background: a slow or failing
        Entra ID then holds up no call (MSAL waits up to HTTP_TIMEOUT_SECONDS, most of a
        call's budget). After a failed background refresh, the next one waits
        REFRESH_RETRY_SECONDS; so does the next request after Entra ID refused the
        credential (its error is raised again meanwhile). Only a token missing, expiring
        within the grace or refused by the Connector is waited for.
        """
        token = self._token
        if not force_refresh and token.value:
            now = self._clock()
            if now < token.refresh_at:
                return token.value
            if token.expires_at - now > STALE_TOKEN_GRACE_SECONDS:
                if now >= self._retry_at:
                    self._shared_refresh()
                return token.value
        # Entra ID refused the credential to a caller moments ago (a setting to fix): asked
        # again after REFRESH_RETRY_SECONDS, not by every call meanwhile (a broadcast's
        # every message would be a token request and a warning), a refresh after the
        # Connector refused the token included. A refusal no caller saw (the prefetch's,
        # a background refresh's) is asked again at once.
        error = self._last_error
        refused = error is not None and not error.transient and self._clock() < self._retry_at
        if refused and error is self._reported:
            raise error.with_traceback(None)
        # Shielded: one caller giving up must not cancel the acquisition the others share.
        try:
            fresh = (await asyncio.shield(self._shared_refresh())).value
        except TokenError as failed:
            self._reported = failed
            raise
        if force_refresh and fresh == token.value and self._last_error is not None:
            # The refresh failed and kept the token the Connector refused.
            self._reported = self._last_error
            raise self._last_error
        return fresh

    def _shared_refresh(self) -> asyncio.Task[_Token]:
        """The refresh in flight on this loop, or a new one (nobody may wait for it)."""
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or self._inflight_loop is not loop:
            task = loop.create_task(self._refresh())
            task.add_done_callback(_retrieve)
            self._inflight, self._inflight_loop = task, loop
        return task

    def prefetch(self) -> None:
        """Start acquiring the token in the background, once in the provider's lifetime.

        For the first request of a process, before it is authenticated, so that MSAL's
        import and the token request overlap the inbound checks instead of following
        them. Safe before authentication: the token is only cached, never sent (the
        Connector client sends it, to trusted serviceUrls, after the request is
        verified), and whatever the requests, this asks Entra ID at most once. A failure
        is not reported here: the next :meth:`get_token` asks again and raises it.
        """
        if self._prefetched:
            return
        self._prefetched = True
        if self._token.value or (self._inflight is not None and not self._inflight.done()):
            return
        self._shared_refresh()

    async def _refresh(self) -> _Token:
        previous = self._token
        try:
            token = await asyncio.to_thread(self._acquire_blocking)
        except TokenError as error:
            self._retry_at = self._clock() + REFRESH_RETRY_SECONDS
            self._last_error = error
            if previous.value and previous.expires_at - self._clock() > STALE_TOKEN_GRACE_SECONDS:
                log_repeated(
                    log,
                    logging.WARNING,
                    f"refresh {error.setting} {error.code} {error.transient}",
                    "token refresh for app %s failed (%s); still using the current token",
                    self._settings.app_id,
                    error,
                )
                return previous
            # The app's one line for it (MSAL is silent): what Entra ID said, by code and
            # status, and the setting to check; never the endpoint's answer. Once a minute
            # per cause: a transient failure is asked again by every call.
            log_repeated(
                log,
                logging.WARNING,
                f"token {error.setting} {error.code} {error.transient}",
                "token request for app %s failed: %s",
                self._settings.app_id,
                error,
            )
            raise
        self._token = token
        self._last_error = None
        return token

    # --- blocking part, runs in a worker thread -------------------------------------

    def _acquire_blocking(self) -> _Token:
        with self._thread_lock:
            if self._client is None:
                self._client = self._build_client()
            # The provider is the cache: when it asks, it wants a fresh token, so MSAL's
            # own cache must not answer (MSAL refuses force_refresh for client credentials).
            self._purge_msal_cache()
            started = self._clock()
            try:
                result = self._client()
            except TokenError:
                raise
            except OSError as error:  # requests' connection errors are OSErrors too
                raise self._network_error(error) from None
            except ValueError as error:
                raise self._config_error(error) from None
            except Exception as error:  # MSAL's own errors; never echo their text (may hold URLs)
                status = getattr(getattr(error, "response", None), "status_code", None)
                if status is None:
                    found = re.search(r"HTTP Error: (\d{3})", str(error))
                    status = int(found.group(1)) if found else None
                if status is not None:
                    raise TokenError(
                        f"Entra ID answered HTTP {status}; retry later",
                        setting="BOT_LOGIN_AUTHORITY",
                        code=f"HTTP{status}",
                        transient=True,
                    ) from None
                raise TokenError(
                    f"token request failed ({type(error).__name__}); "
                    "check BOT_LOGIN_AUTHORITY and the app's credentials",
                    setting="BOT_LOGIN_AUTHORITY",
                    transient=True,
                ) from None
        return self._token_from(result, started)

    def _token_from(self, result: dict[str, Any], started: float) -> _Token:
        value = result.get("access_token") if isinstance(result, dict) else None
        if not value:
            raise _aad_error(result if isinstance(result, dict) else {}, self.credential_kind)
        lifetime = float(result.get("expires_in") or 3600)
        margin = min(REFRESH_MARGIN_SECONDS, lifetime / 2)
        log.info(
            "token acquired for app %s (%s), expires in %d s",
            self._settings.app_id,
            self.credential_kind,
            lifetime,
        )
        return _Token(str(value), started + lifetime, started + lifetime - margin)

    def _purge_msal_cache(self) -> None:
        cache = self._msal_cache
        if cache is None:
            return
        for entry in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(entry)

    def _build_client(self) -> Callable[[], dict[str, Any]]:
        import msal  # heavy: imported on first token request, not at cold start

        self._msal_cache = msal.TokenCache()
        settings = self._settings
        if settings.app_type == "UserAssignedMSI":
            client = msal.ManagedIdentityClient(
                msal.UserAssignedManagedIdentity(client_id=settings.app_id),
                http_client=_session_with_timeout(),
                token_cache=self._msal_cache,
            )
            resource = _scope_to_resource(settings.oauth_scope)
            return lambda: client.acquire_token_for_client(resource=resource)

        credential = self._credential()
        known_host = _is_microsoft_login_host(settings.login_authority)
        try:
            app = msal.ConfidentialClientApplication(
                settings.app_id,
                client_credential=credential,
                authority=self.authority,
                validate_authority=known_host,
                instance_discovery=known_host,
                token_cache=self._msal_cache,
                timeout=HTTP_TIMEOUT_SECONDS,
            )
        except ValueError as error:
            raise self._config_error(error) from None
        except OSError as error:
            raise self._network_error(error) from None
        scopes = [settings.oauth_scope]
        return lambda: app.acquire_token_for_client(scopes=scopes)

    def _credential(self) -> Any:
        settings = self._settings
        kind = self.credential_kind
        if kind == "certificate":
            return _certificate_credential(settings.certificate_path)
        if kind == "secret":
            return settings.app_password
        if kind == "federated":
            path = settings.federated_token_file
            # A callable: MSAL asks for a fresh assertion on every request, and the file is
            # rotated by the platform, so it is read again each time.
            return {"client_assertion": lambda: _read_federated_assertion(path)}
        raise TokenError(
            "no credential for MicrosoftAppId: set MicrosoftAppPassword, "
            "MicrosoftAppCertificatePath or AZURE_FEDERATED_TOKEN_FILE",
            setting="MicrosoftAppPassword",
        )

    def _network_error(self, error: BaseException) -> TokenError:
        host = urlsplit(self._settings.login_authority).hostname
        if self._settings.app_type == "UserAssignedMSI":
            where, setting = "the managed identity endpoint", "MicrosoftAppType"
        else:
            where, setting = f"the login authority {host}", "BOT_LOGIN_AUTHORITY"
        return TokenError(
            f"cannot reach {where} ({type(error).__name__}); check {setting}",
            setting=setting,
            transient=True,
        )

    def _config_error(self, error: ValueError) -> TokenError:
        if self.credential_kind == "certificate":
            setting = "MicrosoftAppCertificatePath"
        elif self._settings.app_type == "UserAssignedMSI":
            setting = "MicrosoftAppType"
        else:
            setting = "BOT_LOGIN_AUTHORITY"
        return TokenError(
            f"token request failed ({type(error).__name__}); check {setting}",
            setting=setting,
        )


def _retrieve(task: asyncio.Task[_Token]) -> None:
    """Mark a refresh's failure as seen when nobody waited for it (a prefetch, a refresh in
    the background): a later get_token reports its own."""
    if not task.cancelled():
        task.exception()


def _aad_error(result: dict[str, Any], kind: str) -> TokenError:
    error = str(result.get("error") or "")
    if not _OAUTH_ERROR.fullmatch(error):
        error = "unknown_error"  # not an OAuth error code: never quoted (it may echo the form)
    description = str(result.get("error_description") or "")
    match = re.search(r"AADSTS(\d+)", description)
    codes = result.get("error_codes")
    number = match.group(1) if match else ""
    if not number and isinstance(codes, list) and codes:
        first = str(codes[0]) if isinstance(codes[0], int | str) else ""
        # A number only: the text of a proxy's page may echo the form, secret included.
        number = first if first.isascii() and first.isdigit() and len(first) <= 10 else ""
    code = f"AADSTS{number}" if number else error
    setting = _AADSTS_HINTS.get(number) or {
        "certificate": "MicrosoftAppCertificatePath",
        "secret": "MicrosoftAppPassword",
        "federated": "AZURE_FEDERATED_TOKEN_FILE",
        "msi": "MicrosoftAppId",
    }.get(kind, "MicrosoftAppId")
    transient = error in ("temporarily_unavailable", "server_error")
    return TokenError(
        f"Entra ID refused the token request: {error} {code}; check {setting}",
        setting=setting,
        code=code,
        transient=transient,
    )


_OAUTH_ERROR = re.compile(r"[a-z_]{1,64}")  # RFC 6749's codes: invalid_client, …

_PEM_KEY = re.compile(
    r"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _certificate_credential(path: str) -> dict[str, str]:
    """MSAL's credential for a PEM holding the private key and the certificate.

    With ``public_certificate`` MSAL signs with the certificate's SHA-256 thumbprint
    (``x5t#S256``) and sends the certificate in ``x5c``, so subject-name/issuer
    authentication works as well as a registered certificate.
    """
    setting = "MicrosoftAppCertificatePath"
    try:
        with open(path, encoding="ascii") as file:
            pem = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenError(
            f"cannot read {setting} ({type(error).__name__})", setting=setting
        ) from None
    key = _PEM_KEY.search(pem)
    certificate = _PEM_CERT.search(pem)
    if key is None:
        raise TokenError(f"{setting} holds no PEM private key", setting=setting)
    if "ENCRYPTED" in key.group(1):
        raise TokenError(f"{setting}: encrypted private keys are not supported", setting=setting)
    if certificate is None:
        raise TokenError(f"{setting} holds no PEM certificate", setting=setting)
    _check_signing_key(key.group(0), setting)
    return {"private_key": key.group(0), "public_certificate": certificate.group(0)}


def _check_signing_key(pem: str, setting: str) -> None:
    """The key must be one MSAL can sign the client assertion with (RS256): an encrypted
    key in the older PEM form, a damaged one or an EC key would otherwise fail inside
    MSAL, as if Entra ID were unreachable."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode("ascii"), password=None)
    except TypeError:  # the key asks for a password
        raise TokenError(
            f"{setting}: encrypted private keys are not supported", setting=setting
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TokenError(f"{setting}: the private key cannot be read", setting=setting) from None
    if not isinstance(key, RSAPrivateKey):
        raise TokenError(f"{setting}: the private key is not an RSA key", setting=setting)


def _read_federated_assertion(path: str) -> str:
    setting = "AZURE_FEDERATED_TOKEN_FILE"
    try:
        with open(path, encoding="utf-8") as file:
            assertion = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenError(
            f"cannot read {setting} ({type(error).__name__})", setting=setting
        ) from None
    if not assertion:
        raise TokenError(f"{setting} is empty", setting=setting)
    return assertion


def _scope_to_resource(scope: str) -> str:
    return scope[: -len("/.default")] if scope.endswith("/.default") else scope


def _is_microsoft_login_host(authority: str) -> bool:
    """True for the Entra hosts MSAL knows; others get validation and discovery off."""
    from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS

    return (urlsplit(authority).hostname or "") in WELL_KNOWN_AUTHORITY_HOSTS


def _session_with_timeout() -> Any:
    """A requests session with a default timeout (MSAL's managed identity client has none)."""
    import requests

    class _Session(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", HTTP_TIMEOUT_SECONDS)
            return super().request(*args, **kwargs)

    return _Session()
