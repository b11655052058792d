"""Storage connections for queue triggers, resolved like the Functions host does.

A binding's `connection` names an app setting holding a connection string (also
tried as `AzureWebJobs<name>`), `UseDevelopmentStorage=true` included, or the
identity-based `<name>__queueServiceUri` / `<name>__serviceUri` / `<name>__accountName`
(+ `__credential=managedidentity`, `__clientId`). azure.storage.queue is imported
only when a queue trigger exists, to keep startup fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tools.azurite import ACCOUNT, ACCOUNT_KEY, DEFAULT_PORTS
from tools.devhost.settings import HostError

if TYPE_CHECKING:
    from azure.storage.queue.aio import QueueServiceClient


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a queue lives: a connection string, or an account URL reached with an identity."""

    setting: str
    connection_string: str = ""
    account_url: str = ""
    managed_identity: bool = False
    client_id: str = ""


def resolve_connection(name: str, settings: Mapping[str, str], *, where: str) -> Connection:
    """The connection named by a binding; a missing setting is a HostError naming it."""
    for setting in (name, f"AzureWebJobs{name}"):
        # Empty `;` segments skipped, as the Functions host (and shared.config) skip them.
        value = settings.get(setting, "").strip()
        value = ";".join(part for part in value.split(";") if part.strip())
        if value:
            return Connection(setting, connection_string=_expand_development_storage(value))
    account_url = (
        settings.get(f"{name}__queueServiceUri", "").strip()
        or settings.get(f"{name}__serviceUri", "").strip()
    )
    account = settings.get(f"{name}__accountName", "").strip()
    if not account_url and account:
        account_url = f"https://{account}.queue.core.windows.net"
    if account_url:
        try:
            scheme = urlsplit(account_url).scheme
        except ValueError:  # e.g. an unclosed [ of an IPv6 host
            scheme = ""
        if scheme not in ("http", "https"):
            raise HostError(f"{where}: app setting {name}__queueServiceUri must be an http(s) URL")
        credential = settings.get(f"{name}__credential", "").strip().lower()
        return Connection(
            name,
            account_url=account_url,
            managed_identity=credential == "managedidentity",
            client_id=settings.get(f"{name}__clientId", "").strip(),
        )
    raise HostError(
        f"{where}: storage connection '{name}' is not configured: set the app setting {name} "
        f"(a connection string or UseDevelopmentStorage=true) or {name}__queueServiceUri"
    )


def queue_service_client(connection: Connection, *, where: str) -> QueueServiceClient:
    """An async queue service client without message encoding (the host decodes itself).

    Retries are short: the listener's own polling loop retries, and a storage emulator
    that is not running should show up as a warning within seconds, not minutes.
    """
    from urllib.request import getproxies  # loaded with aiohttp, which the client needs

    from azure.storage.queue.aio import QueueServiceClient

    # Passed through to the client's default (async) exponential retry policy.
    options: dict[str, Any] = {
        "retry_total": 2,
        "initial_backoff": 1,
        "increment_base": 2,
        "random_jitter_range": 1,
        "connection_timeout": 10,
        # Trusting the environment makes aiohttp look up ~/.netrc and the proxy variables in
        # a worker thread on every request: a thread hop per receive and per delete.
        "use_env_settings": bool(getproxies()),
    }
    if connection.connection_string:
        try:
            return QueueServiceClient.from_connection_string(
                connection.connection_string, **options
            )
        except ValueError:
            raise HostError(
                f"{where}: app setting {connection.setting} is not a valid connection string"
            ) from None
    return QueueServiceClient(connection.account_url, credential=_credential(connection), **options)


def _credential(connection: Connection) -> Any:
    if connection.managed_identity:
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=connection.client_id or None)
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


def _expand_development_storage(value: str) -> str:
    """`UseDevelopmentStorage=true[;DevelopmentStorageProxyUri=...]` as a full emulator string."""
    parts = dict(item.split("=", 1) for item in value.split(";") if "=" in item)
    if parts.get("UseDevelopmentStorage", "").lower() != "true":
        return value
    proxy = parts.get("DevelopmentStorageProxyUri", "http://127.0.0.1").rstrip("/")
    base = urlsplit(proxy)
    host = f"{base.scheme or 'http'}://{base.hostname or '127.0.0.1'}"
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint={host}:{DEFAULT_PORTS['blob']}/{ACCOUNT};"
        f"QueueEndpoint={host}:{DEFAULT_PORTS['queue']}/{ACCOUNT};"
    )
