"""The bot's settings: read once from the environment, validated, passed in everywhere.

Setting names follow Azure Bot Service conventions (docs/contracts.md, "Settings"), so an
existing bot's app settings map over unchanged. A missing or contradictory setting
raises :class:`SettingsError` naming it, never a stack trace from inside a library.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from shared.connector.errors import RetryPolicy
from shared.serviceurl import prefix_problem
from shared.timer_syntax import timer_schedule_problem
from shared.urls import is_loopback_host

AppType = Literal["MultiTenant", "SingleTenant", "UserAssignedMSI"]
ChannelService = Literal["public", "usgov"]

_GUID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")
# The Bot Framework SDKs' `ChannelService` setting: empty for the public cloud, this URL for
# US Government. An existing bot's value maps over.
_SDK_CHANNEL_SERVICES: dict[str, ChannelService] = {"https://botframework.azure.us": "usgov"}

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

DEFAULT_SCHEDULE = "0 * * * * *"  # every minute (6-field NCRONTAB): schedules fire on time
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_QUEUE = "proactive-messages"
DEFAULT_REFERENCES_CONTAINER = "conversation-references"
# The settings the functions' bindings name (`%BOT_PROACTIVE_QUEUE%`, `%BOT_SCHEDULE%`), with
# the app's defaults. The Functions host resolves a binding only from a setting that is set
# (infra/ sets both on Azure); the local host applies these where nothing sets them.
BINDING_DEFAULTS = {"BOT_PROACTIVE_QUEUE": DEFAULT_QUEUE, "BOT_SCHEDULE": DEFAULT_SCHEDULE}
POISON_SUFFIX = "-poison"  # failed proactive requests go to `<BOT_PROACTIVE_QUEUE>-poison`
MAX_QUEUE_NAME = 63 - len(POISON_SUFFIX)  # Azure's queue names have at most 63 characters
# BOT_PROACTIVE_CLAIM_SECONDS at most: instances honour a claim's own length up to this
# (shared/idempotency.py), so a setting changed while instances run on cannot double a send.
MAX_CLAIM_SECONDS = 3600.0
# One call to the proactive ledger, the storage client's retries included (shared/ledger.py).
LEDGER_CALL_SECONDS = 15.0
# What a claim must still have when its send starts: the Connector client's whole budget for
# the send with its retries, the ledger's for the write that settles it, and 3 s for the
# instances' clocks. With less, a send whose settling write is slow could be settled after
# the claim ends, when another copy of the same request may have taken it over and sent too.
CLAIM_RESERVE_SECONDS = RetryPolicy().max_total_seconds + LEDGER_CALL_SECONDS + 3.0
# BOT_PROACTIVE_CLAIM_SECONDS at least: the reserve, and 10 s to reach the send (a `user`
# target's lookups, its new 1:1); a claim spent past its reserve is put back, not sent on.
MIN_CLAIM_SECONDS = CLAIM_RESERVE_SECONDS + 10.0

# App Service resolves `@Microsoft.KeyVault(...)` app settings before the app starts; when it
# cannot (no access to the vault, a wrong URI), the app sees the reference text itself, and
# so does a local run that copied the setting. Used as a secret it would fail deep in MSAL.
_KEY_VAULT_REFERENCE = "@microsoft.keyvault("


# Environment variables the hosting platform sets, any one of which means the app runs on
# Azure. These are the names the Functions host itself reads to tell its plans apart; only
# App Service sets WEBSITE_INSTANCE_ID, so Linux and Flex Consumption and Container Apps are
# known by the others. The host, too, takes a CONTAINER_NAME as Linux Consumption, so a
# local container that sets one must unset it to run without an app id.
AZURE_HOST_MARKERS: dict[str, str] = {
    "WEBSITE_INSTANCE_ID": "App Service: Windows plans, Linux dedicated and Premium",
    "WEBSITE_SITE_NAME": "the function app's name, on every App Service-based plan",
    "WEBSITE_SKU": "the plan's SKU (Dynamic, ElasticPremium, FlexConsumption, ...)",
    "CONTAINER_NAME": "Linux Consumption and Flex Consumption instances",
    "WEBSITE_POD_NAME": "Flex Consumption instances (before the site settings arrive)",
    "LEGION_SERVICE_HOST": "Flex Consumption (the Legion platform)",
    "MANAGED_ENVIRONMENT": "Functions on Azure Container Apps",
}


class SettingsError(Exception):
    """A setting is missing, malformed or contradicts another one."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where `AzureWebJobsStorage` points: a connection string, or identity-based URIs."""

    connection_string: str = field(default="", repr=False)  # may hold the account key
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

        # Read as the Functions host reads them, since its triggers and this app must use
        # the same account: a connection string wins over the identity-based settings
        # (which are then ignored), and its empty `;` segments are skipped.
        connection_string = ";".join(
            part for part in env.get(prefix, "").strip().split(";") if part.strip()
        )
        if connection_string:
            ignored = [name for name in _IDENTITY_SUFFIXES if get(name)]
            if ignored:
                logging.getLogger(__name__).warning(
                    "settings: %s is a connection string, so %s are ignored (as the host does)",
                    prefix,
                    ", ".join(f"{prefix}__{name}" for name in ignored),
                )
            return cls(connection_string=connection_string)
        settings = cls(
            account_name=get("accountName"),
            blob_service_uri=get("blobServiceUri"),
            queue_service_uri=get("queueServiceUri"),
            credential=get("credential"),
            client_id=get("clientId"),
        )
        if settings.credential and settings.credential.lower() != "managedidentity":
            raise SettingsError(
                f"{prefix}__credential", "the only supported value is managedidentity"
            )
        for name, uri in (
            ("blobServiceUri", settings.blob_service_uri),
            ("queueServiceUri", settings.queue_service_uri),
        ):
            try:
                scheme = urlsplit(uri).scheme
            except ValueError:  # e.g. an unclosed [ of an IPv6 host
                scheme = ""
            if uri and scheme not in ("https", "http"):
                raise SettingsError(f"{prefix}__{name}", "must be an http(s) URL")
        return settings


_IDENTITY_SUFFIXES = ("accountName", "blobServiceUri", "queueServiceUri", "credential", "clientId")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of docs/contracts.md, validated. Build with :meth:`from_env`."""

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
    references_container: str = DEFAULT_REFERENCES_CONTAINER
    proactive_queue: str = DEFAULT_QUEUE
    schedule: str = DEFAULT_SCHEDULE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Teams requests per second per app per tenant (all instances together): where each
    # tenant's adaptive rate starts and what it never probes past (shared/tenant_rate.py).
    connector_rate_limit: float = 50.0
    federated_token_file: str = ""
    # Proactive engine bounds (docs/proactive.md): how long a throttled or transiently
    # failing send keeps being requeued, and how long an instance's claim on a target lasts.
    proactive_max_age: float = 3600.0
    proactive_claim_seconds: float = 45.0

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
        _reject_unresolved_key_vault_references(env)

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip() or default

        channel_service = get("BOT_CHANNEL_SERVICE", "public").lower()
        if channel_service not in CLOUDS:
            raise SettingsError("BOT_CHANNEL_SERVICE", "must be 'public' or 'usgov'")
        explicit = bool(get("BOT_CHANNEL_SERVICE"))
        channel_service = _sdk_channel_service(get("ChannelService"), channel_service, explicit)
        cloud = CLOUDS[channel_service]  # type: ignore[index]

        raw_type = get("MicrosoftAppType", "MultiTenant")
        app_type = _APP_TYPES.get(raw_type.lower())
        if app_type is None:
            raise SettingsError(
                "MicrosoftAppType", "must be MultiTenant, SingleTenant or UserAssignedMSI"
            )

        # GUIDs, in any case: tokens carry them in lower case. (A tenant named by its
        # domain is case-blind too.)
        app_id = _lower_guid(get("MicrosoftAppId"))
        tenant_id = get("MicrosoftAppTenantId").lower()
        allow_unauthenticated = _parse_bool(env, "BOT_ALLOW_UNAUTHENTICATED")
        if not app_id and not allow_unauthenticated:
            raise SettingsError(
                "MicrosoftAppId",
                "is required (set BOT_ALLOW_UNAUTHENTICATED=true only for local use without one)",
            )
        marker = _azure_host_marker(env) if allow_unauthenticated and not app_id else None
        if marker:
            # A deployed bot without an app id would answer anyone: a mistake, not a mode.
            raise SettingsError(
                "BOT_ALLOW_UNAUTHENTICATED",
                f"is for local use only, and {marker} is set, so this runs on Azure: "
                "set MicrosoftAppId (and its credential); on a machine that is not Azure "
                f"(a container that sets {marker} for itself), start the bot without "
                f"{marker} (`env -u {marker}`; `make run` and the local host do)",
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
        _require_bare_authority(authority)

        trusted = _parse_trusted_prefixes(get("BOT_TRUSTED_SERVICE_URLS"))
        schedule = _validate_schedule(get("BOT_SCHEDULE", DEFAULT_SCHEDULE), get("WEBSITE_SKU"))

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
            references_container=references_container_name(
                get("BOT_REFERENCES_CONTAINER", DEFAULT_REFERENCES_CONTAINER)
            ),
            proactive_queue=proactive_queue_name(get("BOT_PROACTIVE_QUEUE", DEFAULT_QUEUE)),
            schedule=schedule,
            max_body_bytes=_parse_number(env, "BOT_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
            connector_rate_limit=_parse_number(env, "BOT_CONNECTOR_RATE_LIMIT", 50.0, float),
            federated_token_file=get("AZURE_FEDERATED_TOKEN_FILE"),
            proactive_max_age=_parse_number(env, "BOT_PROACTIVE_MAX_AGE_SECONDS", 3600.0, float),
            proactive_claim_seconds=_parse_claim_seconds(env),
        )


def _azure_host_marker(env: Mapping[str, str]) -> str | None:
    """The first hosting-platform variable set in `env` (None: not on Azure)."""
    return next((name for name in AZURE_HOST_MARKERS if env.get(name, "").strip()), None)


def _reject_unresolved_key_vault_references(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if _is_bot_setting(name) and value.strip().lower().startswith(_KEY_VAULT_REFERENCE):
            raise SettingsError(
                name,
                "is a Key Vault reference that was not resolved: on Azure, give the app's "
                "identity read access to the secret and check the reference; locally, put the "
                "value itself in local.settings.json",
            )


def _is_bot_setting(name: str) -> bool:
    return name.startswith(("MicrosoftApp", "BOT_", "AzureWebJobsStorage")) or name in (
        "AZURE_FEDERATED_TOKEN_FILE",
    )


def _require_https_or_loopback(name: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise SettingsError(name, "is not a valid URL") from None
    if "@" in parts.netloc:
        # aiohttp would send it as Basic credentials, and the URL is logged.
        raise SettingsError(name, "must not carry a user name or password")
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise SettingsError(name, "must be an https URL (plain http only for loopback hosts)")


def _require_bare_authority(authority: str) -> None:
    # The tenant is appended to it (`<authority>/botframework.com` or `/<tenant>`), so a
    # tenant or path given here would make MSAL ask the wrong endpoint.
    parts = urlsplit(authority)
    # A bare `?` or `#` (or a backslash) leaves no query, fragment or path to see: compared
    # whole instead.
    whole = f"{parts.scheme}://{parts.netloc}".lower()
    host = parts.hostname or ""
    if (
        authority.lower() != whole
        or not _host_name_or_ip(host)
        or parts.netloc.endswith(":")
        or "@" in parts.netloc
    ):
        raise SettingsError(
            "BOT_LOGIN_AUTHORITY",
            "must be the authority host only, without a tenant or path "
            "(e.g. https://login.microsoftonline.com)",
        )


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_name_or_ip(host: str) -> bool:
    """An IP address, or a DNS name (an underscore allowed, as in a container's name): labels
    of 1-63 characters, none empty, the last not all digits (`1.2.3.4.5` is no name)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return not labels[-1].isdigit() and all(_LABEL.fullmatch(label) for label in labels)


# Entries are judged by the Connector client's own serviceUrl parse (shared.serviceurl): an
# entry it could not use is refused here rather than ignored with only a warning.
def _parse_trusted_prefixes(raw: str) -> tuple[str, ...]:
    """Comma-separated prefixes: blanks skipped, duplicates dropped, each one validated."""
    prefixes: list[str] = []
    for position, entry in enumerate(raw.split(","), start=1):
        entry = entry.strip()
        if entry:
            problem = prefix_problem(entry)
            if problem:
                raise SettingsError("BOT_TRUSTED_SERVICE_URLS", f"entry {position} {problem}")
            if entry not in prefixes:
                prefixes.append(entry)
    return tuple(prefixes)


def _validate_schedule(schedule: str, sku: str = "") -> str:
    """Refuse what the host's timer would (it is the final word), and nothing more: every
    function answers 500 while a setting is refused (shared.timer_syntax)."""
    problem = timer_schedule_problem(schedule, sku)
    if problem is not None:
        raise SettingsError("BOT_SCHEDULE", problem)
    return schedule


def _storage_name(setting: str, name: str, longest: int = 63) -> str:
    # Queue and container names share Azure's rules: 3-63 chars of a-z, 0-9 and single dashes.
    ok = (
        3 <= len(name) <= longest
        and all(c.islower() or c.isdigit() or c == "-" for c in name)
        and name[0] != "-"
        and name[-1] != "-"
        and "--" not in name
        and name.isascii()
    )
    if not ok:
        raise SettingsError(
            setting, f"must be 3-{longest} lower-case letters, digits and single dashes"
        )
    return name


def references_container_name(name: str) -> str:
    """`BOT_REFERENCES_CONTAINER`, a name Azure Storage takes."""
    return _storage_name("BOT_REFERENCES_CONTAINER", name)


def proactive_queue_name(name: str) -> str:
    """`BOT_PROACTIVE_QUEUE`, short enough that its poison queue's name is one too."""
    if len(name) > MAX_QUEUE_NAME:
        raise SettingsError(
            "BOT_PROACTIVE_QUEUE",
            f"must be at most {MAX_QUEUE_NAME} characters: its poison queue "
            f"`<name>{POISON_SUFFIX}` must fit Azure's 63",
        )
    return _storage_name("BOT_PROACTIVE_QUEUE", name, MAX_QUEUE_NAME)


def _lower_guid(value: str) -> str:
    return value.lower() if _GUID.fullmatch(value) else value


def _sdk_channel_service(sdk_value: str, chosen: str, explicit: bool) -> ChannelService:
    """`chosen` (BOT_CHANNEL_SERVICE, checked; `explicit` when it was set), or the cloud
    the SDKs' `ChannelService` names when it is unset; both set must agree, and a
    `ChannelService` value that names no cloud is refused (it was ignored: a US Gov bot
    ran as public and refused every channel token)."""
    if not sdk_value:
        return chosen  # type: ignore[return-value]  # checked against CLOUDS
    mapped = _SDK_CHANNEL_SERVICES.get(sdk_value.rstrip("/").lower())
    if mapped is None:
        raise SettingsError(
            "ChannelService",
            "names no cloud this bot knows: https://botframework.azure.us (US Government), "
            "or leave it empty and set BOT_CHANNEL_SERVICE",
        )
    if explicit and chosen != mapped:
        raise SettingsError(
            "BOT_CHANNEL_SERVICE", f"is {chosen}, but ChannelService names {mapped}"
        )
    return mapped


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
    if isinstance(value, float) and not math.isfinite(value):  # an int of any size is
        raise SettingsError(name, "must be a finite number")  # (isfinite: OverflowError)
    if value <= 0:
        raise SettingsError(name, "must be greater than zero")
    return value


def _parse_claim_seconds(env: Mapping[str, str]) -> float:
    # A send starts only while CLAIM_RESERVE_SECONDS of its claim are left
    # (shared/proactive.py): a shorter claim would leave too little time to reach the send.
    # Other instances honour a claim's own length up to an hour (shared/idempotency.py).
    seconds = _parse_number(env, "BOT_PROACTIVE_CLAIM_SECONDS", 45.0, float)
    if seconds < MIN_CLAIM_SECONDS:
        raise SettingsError(
            "BOT_PROACTIVE_CLAIM_SECONDS",
            f"must be at least {MIN_CLAIM_SECONDS:g} seconds: a send starts only while "
            f"{CLAIM_RESERVE_SECONDS:g} s of its claim are left, for the send with its "
            "retries and the write that settles it",
        )
    if seconds > MAX_CLAIM_SECONDS:
        raise SettingsError(
            "BOT_PROACTIVE_CLAIM_SECONDS", f"must be at most {MAX_CLAIM_SECONDS:g} seconds"
        )
    return seconds


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
