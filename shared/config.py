"""The bot's settings: read once from the environment, validated, passed in everywhere.

Setting names follow Azure Bot Service conventions (DESIGN.md, "Settings"), so an
existing bot's app settings map over unchanged. A missing or contradictory setting
raises :class:`SettingsError` naming it, never a stack trace from inside a library.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

AppType = Literal["MultiTenant", "SingleTenant", "UserAssignedMSI"]
ChannelService = Literal["public", "usgov"]

_APP_TYPES: dict[str, AppType] = {
    "multitenant": "MultiTenant",
    "singletenant": "SingleTenant",
    "userassignedmsi": "UserAssignedMSI",
}


@dataclass(frozen=True, slots=True)
class Cloud:
    """The URLs and identifiers that differ between the public and US Gov clouds."""

    channel_issuer: str
    openid_metadata_url: str
    emulator_openid_metadata_url: str
    login_authority: str
    oauth_scope: str
    caller_id: str


CLOUDS: dict[ChannelService, Cloud] = {
    "public": Cloud(
        channel_issuer="https://api.botframework.com",
        openid_metadata_url="https://login.botframework.com/v1/.well-known/openidconfiguration",
        emulator_openid_metadata_url=(
            "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration"
        ),
        login_authority="https://login.microsoftonline.com",
        oauth_scope="https://api.botframework.com/.default",
        caller_id="urn:botframework:azure",
    ),
    "usgov": Cloud(
        channel_issuer="https://api.botframework.us",
        openid_metadata_url="https://login.botframework.azure.us/v1/.well-known/openidconfiguration",
        emulator_openid_metadata_url=(
            "https://login.microsoftonline.us/cab8a31a-1906-4287-a0d8-4eef66b95f6e"
            "/v2.0/.well-known/openid-configuration"
        ),
        login_authority="https://login.microsoftonline.us",
        oauth_scope="https://api.botframework.us/.default",
        caller_id="urn:botframework:azureusgov",
    ),
}

DEFAULT_SCHEDULE = "0 0 9 * * *"  # daily at 09:00 UTC (6-field NCRONTAB)
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class SettingsError(Exception):
    """A setting is missing, malformed or contradicts another one."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where `AzureWebJobsStorage` points: a connection string, or identity-based URIs."""

    connection_string: str = ""
    account_name: str = ""
    blob_service_uri: str = ""
    queue_service_uri: str = ""
    credential: str = ""  # "managedidentity" or "" (DefaultAzureCredential)
    client_id: str = ""

    @property
    def configured(self) -> bool:
        return bool(
            self.connection_string
            or self.account_name
            or self.blob_service_uri
            or self.queue_service_uri
        )

    def service_uri(self, service: Literal["blob", "queue"]) -> str:
        """The endpoint of an identity-based connection (empty for connection strings)."""
        explicit = self.blob_service_uri if service == "blob" else self.queue_service_uri
        if explicit:
            return explicit
        if self.account_name:
            return f"https://{self.account_name}.{service}.core.windows.net"
        return ""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], prefix: str = "AzureWebJobsStorage"
    ) -> StorageSettings:
        def get(suffix: str) -> str:
            return env.get(f"{prefix}__{suffix}", "").strip()

        settings = cls(
            connection_string=env.get(prefix, "").strip(),
            account_name=get("accountName"),
            blob_service_uri=get("blobServiceUri"),
            queue_service_uri=get("queueServiceUri"),
            credential=get("credential"),
            client_id=get("clientId"),
        )
        if settings.connection_string and (
            settings.account_name or settings.blob_service_uri or settings.queue_service_uri
        ):
            raise SettingsError(
                prefix, "set either a connection string or the identity-based __ settings, not both"
            )
        if settings.credential and settings.credential.lower() != "managedidentity":
            raise SettingsError(
                f"{prefix}__credential", "the only supported value is managedidentity"
            )
        for name, uri in (
            ("blobServiceUri", settings.blob_service_uri),
            ("queueServiceUri", settings.queue_service_uri),
        ):
            if uri and urlsplit(uri).scheme not in ("https", "http"):
                raise SettingsError(f"{prefix}__{name}", "must be an http(s) URL")
        return settings


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of DESIGN.md, validated. Build with :meth:`from_env`."""

    app_id: str = ""
    app_type: AppType = "MultiTenant"
    tenant_id: str = ""
    app_password: str = field(default="", repr=False)
    certificate_path: str = ""
    channel_service: ChannelService = "public"
    openid_metadata_url: str = CLOUDS["public"].openid_metadata_url
    emulator_openid_metadata_url: str = CLOUDS["public"].emulator_openid_metadata_url
    login_authority: str = CLOUDS["public"].login_authority
    trusted_service_urls: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    storage: StorageSettings = field(default_factory=StorageSettings)
    references_container: str = "conversation-references"
    proactive_queue: str = "proactive-messages"
    schedule: str = DEFAULT_SCHEDULE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    connector_rate_limit: float = 50.0
    federated_token_file: str = ""

    @property
    def cloud(self) -> Cloud:
        return CLOUDS[self.channel_service]

    @property
    def channel_issuer(self) -> str:
        return self.cloud.channel_issuer

    @property
    def oauth_scope(self) -> str:
        return self.cloud.oauth_scope

    @property
    def auth_disabled(self) -> bool:
        """True only for local use: no app id and BOT_ALLOW_UNAUTHENTICATED=true."""
        return self.allow_unauthenticated and not self.app_id

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip() or default

        channel_service = get("BOT_CHANNEL_SERVICE", "public").lower()
        if channel_service not in CLOUDS:
            raise SettingsError("BOT_CHANNEL_SERVICE", "must be 'public' or 'usgov'")
        cloud = CLOUDS[channel_service]  # type: ignore[index]

        raw_type = get("MicrosoftAppType", "MultiTenant")
        app_type = _APP_TYPES.get(raw_type.lower())
        if app_type is None:
            raise SettingsError(
                "MicrosoftAppType", "must be MultiTenant, SingleTenant or UserAssignedMSI"
            )

        app_id = get("MicrosoftAppId")
        tenant_id = get("MicrosoftAppTenantId")
        allow_unauthenticated = _parse_bool(env, "BOT_ALLOW_UNAUTHENTICATED")
        if not app_id and not allow_unauthenticated:
            raise SettingsError(
                "MicrosoftAppId",
                "is required (set BOT_ALLOW_UNAUTHENTICATED=true only for local use without one)",
            )
        if app_type in ("SingleTenant", "UserAssignedMSI") and not tenant_id:
            raise SettingsError(
                "MicrosoftAppTenantId", f"is required when MicrosoftAppType={app_type}"
            )

        password = get("MicrosoftAppPassword")
        certificate_path = get("MicrosoftAppCertificatePath")
        if password and certificate_path:
            raise SettingsError(
                "MicrosoftAppCertificatePath",
                "set either MicrosoftAppPassword or MicrosoftAppCertificatePath, not both",
            )
        if app_type == "UserAssignedMSI" and (password or certificate_path):
            raise SettingsError(
                "MicrosoftAppType", "UserAssignedMSI uses no MicrosoftAppPassword or certificate"
            )

        openid = get("BOT_OPENID_METADATA_URL", cloud.openid_metadata_url)
        emulator_openid = get(
            "BOT_EMULATOR_OPENID_METADATA_URL", cloud.emulator_openid_metadata_url
        )
        authority = get("BOT_LOGIN_AUTHORITY", cloud.login_authority).rstrip("/")
        for name, url in (
            ("BOT_OPENID_METADATA_URL", openid),
            ("BOT_EMULATOR_OPENID_METADATA_URL", emulator_openid),
            ("BOT_LOGIN_AUTHORITY", authority),
        ):
            _require_https_or_loopback(name, url)

        trusted = tuple(
            _validate_trusted_prefix(p.strip())
            for p in get("BOT_TRUSTED_SERVICE_URLS").split(",")
            if p.strip()
        )

        schedule = get("BOT_SCHEDULE", DEFAULT_SCHEDULE)
        if len(schedule.split()) != 6:
            raise SettingsError(
                "BOT_SCHEDULE", "must be a 6-field NCRONTAB expression (sec min hour day month dow)"
            )

        return cls(
            app_id=app_id,
            app_type=app_type,
            tenant_id=tenant_id,
            app_password=password,
            certificate_path=certificate_path,
            channel_service=channel_service,  # type: ignore[arg-type]
            openid_metadata_url=openid,
            emulator_openid_metadata_url=emulator_openid,
            login_authority=authority,
            trusted_service_urls=trusted,
            allow_unauthenticated=allow_unauthenticated,
            storage=StorageSettings.from_env(env),
            references_container=_storage_name(
                "BOT_REFERENCES_CONTAINER",
                get("BOT_REFERENCES_CONTAINER", "conversation-references"),
            ),
            proactive_queue=_storage_name(
                "BOT_PROACTIVE_QUEUE", get("BOT_PROACTIVE_QUEUE", "proactive-messages")
            ),
            schedule=schedule,
            max_body_bytes=_parse_number(env, "BOT_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
            connector_rate_limit=_parse_number(env, "BOT_CONNECTOR_RATE_LIMIT", 50.0, float),
            federated_token_file=get("AZURE_FEDERATED_TOKEN_FILE"),
        )


def is_loopback_host(host: str | None) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts allowed over plain http."""
    if not host:
        return False
    host = host.lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_https_or_loopback(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise SettingsError(name, "must be an https URL (plain http only for loopback hosts)")


def _validate_trusted_prefix(prefix: str) -> str:
    parts = urlsplit(prefix)
    if parts.query or parts.fragment or not parts.hostname:
        raise SettingsError("BOT_TRUSTED_SERVICE_URLS", "each entry must be a URL prefix")
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        return prefix
    raise SettingsError(
        "BOT_TRUSTED_SERVICE_URLS", "entries must be https (plain http only for loopback hosts)"
    )


def _storage_name(setting: str, name: str) -> str:
    # Queue and container names share Azure's rules: 3-63 chars of a-z, 0-9 and single dashes.
    ok = (
        3 <= len(name) <= 63
        and all(c.islower() or c.isdigit() or c == "-" for c in name)
        and name[0] != "-"
        and name[-1] != "-"
        and "--" not in name
        and name.isascii()
    )
    if not ok:
        raise SettingsError(setting, "must be 3-63 lower-case letters, digits and single dashes")
    return name


def _parse_bool(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "false", "0", "no"):
        return False
    if value in ("true", "1", "yes"):
        return True
    raise SettingsError(name, "must be true or false")


def _parse_number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(name, "must be a number") from None
    if value <= 0:
        raise SettingsError(name, "must be greater than zero")
    return value


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests, and hosts that change the environment)."""
    global _settings
    _settings = None
