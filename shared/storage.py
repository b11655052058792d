"""Async Blob and Queue service clients built from `AzureWebJobsStorage`.

Two ways to connect, as the Functions host does:

- a connection string (`AzureWebJobsStorage`, including `UseDevelopmentStorage=true`
  for Azurite on its default ports);
- identity-based (`AzureWebJobsStorage__blobServiceUri` / `__queueServiceUri` /
  `__accountName`) with azure-identity: `ManagedIdentityCredential(client_id=__clientId)`
  when `__credential=managedidentity`, else `DefaultAzureCredential`.

Retries and timeouts are deliberately short (a bot turn has 15 s) and configurable through
:class:`StorageOptions`. The azure packages are imported on first use (cold start).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from shared.config import SettingsError, StorageSettings

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient
    from azure.storage.queue.aio import QueueServiceClient

logger = logging.getLogger(__name__)

SETTING = "AzureWebJobsStorage"
Service = Literal["blob", "queue"]


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """Retry and timeout settings of the storage clients (seconds).

    The SDK's defaults (15 s first backoff, 20 s connect, 60 s read) would outlast the
    channel's 15 s answer window; these fail fast enough for a turn to still answer.
    """

    retry_total: int = 3
    initial_backoff: float = 0.5
    increment_base: float = 1.5
    jitter: float = 0.2
    connection_timeout: float = 5.0
    read_timeout: float = 10.0
    operation_timeout: float = 10.0  # bound on one store call, all retries included


DEFAULT_OPTIONS = StorageOptions()


def create_blob_service(
    storage: StorageSettings, options: StorageOptions = DEFAULT_OPTIONS
) -> BlobServiceClient:
    """A new async BlobServiceClient; the caller owns it (close with :func:`close_client`)."""
    from azure.storage.blob.aio import BlobServiceClient

    return _create(storage, options, "blob", BlobServiceClient)


def create_queue_service(
    storage: StorageSettings, options: StorageOptions = DEFAULT_OPTIONS
) -> QueueServiceClient:
    """A new async QueueServiceClient; the caller owns it (close with :func:`close_client`)."""
    from azure.storage.queue.aio import QueueServiceClient

    return _create(storage, options, "queue", QueueServiceClient)


def check_storage_settings(storage: StorageSettings, service: Service = "blob") -> None:
    """Raise SettingsError now (no I/O) when `service` cannot be reached with `storage`."""
    if storage.connection_string:
        return
    if not storage.configured:
        raise SettingsError(
            SETTING,
            "is not set: give a connection string (UseDevelopmentStorage=true for Azurite) "
            f"or {SETTING}__accountName / __{service}ServiceUri",
        )
    if not storage.service_uri(service):
        raise SettingsError(
            f"{SETTING}__{service}ServiceUri", f"is required to reach {service} storage"
        )


# The storage SDK logs every request's and answer's headers at INFO, and the Functions
# worker passes INFO records on to the host: two header dumps per blob call, every turn.
_SDK_HTTP_LOG = "azure.core.pipeline.policies.http_logging_policy"


def _create(storage, options, service, client_class):
    check_storage_settings(storage, service)
    sdk_http_log = logging.getLogger(_SDK_HTTP_LOG)
    if sdk_http_log.level == logging.NOTSET:  # unless an operator set a level on purpose
        sdk_http_log.setLevel(logging.WARNING)
    kwargs: dict[str, Any] = {
        # The clients build their ExponentialRetry policy from these.
        "initial_backoff": options.initial_backoff,
        "increment_base": options.increment_base,
        "retry_total": options.retry_total,
        "random_jitter_range": options.jitter,
        "connection_timeout": options.connection_timeout,
        "read_timeout": options.read_timeout,
        # aiohttp trusting the environment looks up ~/.netrc and the proxy variables in
        # a worker thread on every request: two thread hops per blob call. Only worth it
        # when a proxy is configured at all.
        "use_env_settings": _proxy_configured(),
    }
    if storage.connection_string:
        try:
            return client_class.from_connection_string(storage.connection_string, **kwargs)
        except ValueError:
            # The SDK's message may quote the string, which holds the account key.
            raise SettingsError(SETTING, "is not a valid storage connection string") from None
    uri = storage.service_uri(service)
    try:
        return client_class(uri, credential=_credential(storage), **kwargs)
    except ValueError:
        raise SettingsError(
            f"{SETTING}__{service}ServiceUri",
            "is not usable with an identity credential (it must be an https URL)",
        ) from None


_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY")


def _proxy_configured() -> bool:
    """Is any proxy variable set (either case), as aiohttp would read it?"""
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in _PROXY_VARIABLES)


def _credential(storage: StorageSettings):
    if storage.credential.lower() == "managedidentity":
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=storage.client_id or None)
    from azure.identity.aio import DefaultAzureCredential

    if storage.client_id:
        return DefaultAzureCredential(managed_identity_client_id=storage.client_id)
    return DefaultAzureCredential()


async def close_client(client: Any) -> None:
    """Close a client made here and, for identity-based ones, its credential's session."""
    credential = getattr(client, "credential", None)
    await client.close()
    close = getattr(credential, "close", None)
    if close is not None and inspect.iscoroutinefunction(close):
        await close()


# One shared client per (event loop, settings, options): async clients are bound to the loop
# that opened their connections. The Functions worker runs one loop, so that is one per process.
_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, Any]] = (
    weakref.WeakKeyDictionary()
)


def get_blob_service(
    storage: StorageSettings, options: StorageOptions = DEFAULT_OPTIONS
) -> BlobServiceClient:
    """The process's shared BlobServiceClient for these settings (created on first use)."""
    return _shared_client("blob", storage, options, create_blob_service)


def get_queue_service(
    storage: StorageSettings, options: StorageOptions = DEFAULT_OPTIONS
) -> QueueServiceClient:
    """The process's shared QueueServiceClient for these settings (created on first use)."""
    return _shared_client("queue", storage, options, create_queue_service)


def _shared_client(service, storage, options, factory):
    loop = asyncio.get_running_loop()
    clients = _shared.setdefault(loop, {})
    key = (service, storage, options)
    client = clients.get(key)
    if client is None:
        client = clients[key] = factory(storage, options)
        _reuse_child_clients(client, service)
        logger.debug("storage: opened shared %s client", service)
    return client


# Container / queue clients the shared service clients hand out, kept per name.
MAX_CHILD_CLIENTS = 64
# Queue client arguments that are stateless policy objects: one client per policy class.
_POLICY_ARGUMENTS = frozenset({"message_encode_policy", "message_decode_policy"})


def _reuse_child_clients(client: Any, service: Service) -> None:
    """Make the shared client hand out one container (queue) client per name.

    Building one builds a new pipeline, which costs more CPU than the request made with
    it (about 0.3 ms, per ledger or queue call); they share the service's transport and
    hold no per-request state, so one per name serves every caller. Only the shared
    clients do this: a client the caller owns (``create_*``) is left as the SDK makes it.
    """
    name = "get_container_client" if service == "blob" else "get_queue_client"
    build = getattr(client, name)
    children: dict[tuple, Any] = {}

    def reused(*args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or not isinstance(args[0], str) or not set(kwargs) <= _POLICY_ARGUMENTS:
            return build(*args, **kwargs)  # by keyword, by properties object, other options
        child_name = args[0]
        key = (child_name, *sorted((k, type(v)) for k, v in kwargs.items()))
        child = children.get(key)
        if child is None:
            if len(children) >= MAX_CHILD_CLIENTS:
                children.pop(next(iter(children)))
            child = children[key] = build(child_name, **kwargs)
        return child

    setattr(client, name, reused)


async def close_shared_clients() -> None:
    """Close the shared clients of the running loop (host shutdown, test teardown)."""
    clients = _shared.pop(asyncio.get_running_loop(), {})
    for client in clients.values():
        await close_client(client)


# Modules whose frames mark an error as raised while the storage SDK read an answer.
_SDK_MODULES = ("azure.core.", "azure.storage.")


# Storage's error codes are names ("LeaseIdMissing", "ContainerNotFound").
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
UNRECOGNISED_CODE = "UnrecognisedErrorCode"


def storage_error_code(error: Any) -> str | None:
    """Storage's error code for `error` (its `x-ms-error-code`), the value of the SDK's
    enum when it is one; UNRECOGNISED_CODE for a header that is not a code's name: a
    gateway or proxy in between may put anything there, the request's URL with its SAS
    included, and the code goes into errors and logs."""
    code = getattr(error, "error_code", None)
    if not code:
        return None
    text = str(getattr(code, "value", code))
    return text if _ERROR_CODE.fullmatch(text) else UNRECOGNISED_CODE


def unreadable_answer(error: BaseException) -> bool:
    """Whether a storage SDK error says storage answered, but with what the SDK cannot
    read: XML cut short or broken, a proxy's HTML page, a body that is not UTF-8, a
    success status the call does not expect. Not an HTTP failure (a status it has is a
    success) and not storage unreachable: the answer came.

    The SDK raises its DecodeError, or an HttpResponseError with a 2xx/3xx status, for
    some of these; for others its DeserializationError (a ValueError, not an AzureError)
    or XML's ParseError (a SyntaxError), from wherever it reads the body; and a
    UnicodeDecodeError, counted only when raised in the SDK's code (the request is
    encoded, never decoded: only an answer is). That one comes before the SDK looks at
    the status, whatever it was, a refusal included: Azure Storage answers in UTF-8, so
    such an answer came from something else on the way (a proxy), whose status says
    nothing of what storage did, and it is read as unreadable too. So is an IndexError,
    KeyError or TypeError raised where the SDK reads an answer (its deserialisers and
    response handlers: a proxy's header it takes for its own), not where it checks our
    arguments.
    """
    from xml.etree.ElementTree import ParseError

    from azure.core.exceptions import DecodeError, DeserializationError, HttpResponseError

    if isinstance(error, HttpResponseError):
        status = error.status_code
        return isinstance(error, DecodeError) if status is None else status < 400
    if isinstance(error, DeserializationError | ParseError):
        return True
    if isinstance(error, IndexError | KeyError | TypeError):
        # The SDK reading headers it takes for its own (any name with "or-" in it for
        # object replication's, an error code's on a 200 from a proxy): raised where the SDK
        # reads an answer, not where it checks our arguments or in code of ours it called.
        return _raised_reading_an_answer(error)
    return isinstance(error, UnicodeDecodeError) and _raised_in_sdk(error)


@contextlib.contextmanager
def reading_download() -> Iterator[None]:
    """Around a blob's download and read: the SDK raises a plain ValueError for an answer
    it cannot read there (a 200 without the Content-Range its ranged GET asks for, as a
    proxy's page comes), raised here as its DecodeError, which the guards report as an
    answer that could not be read. Only one the SDK raised itself: the download's own
    arguments are the caller's, and a mistake in them stays what it is."""
    from azure.core.exceptions import DecodeError

    try:
        yield
    except ValueError as error:
        if unreadable_answer(error) or not _raised_in_sdk(error):
            raise
        raise DecodeError(f"the download could not be read ({type(error).__name__})") from None


def unreadable_message(where: str, error: BaseException) -> str:
    """What an :func:`unreadable_answer` says: the operation (`where`) and the error's type,
    never its text (the SDK's quotes the answer's body)."""
    return f"{where} failed: the answer could not be read ({type(error).__name__})"


def _raised_reading_an_answer(error: BaseException) -> bool:
    """Whether the frame that raised `error` is the storage SDK's, reading an answer: its
    deserialisers and response handlers (a wrong argument of ours raises elsewhere: in its
    request builders, serialisers or checks)."""
    frames = _frames(error)
    if not frames:
        return False
    module, function = frames[-1]
    reading = module.endswith(("._deserialize", ".response_handlers")) or "deserializ" in function
    return module.startswith(_SDK_MODULES) and reading


def _raised_in_sdk(error: BaseException) -> bool:
    return any(module.startswith(_SDK_MODULES) for module, _ in _frames(error))


def _frames(error: BaseException) -> list[tuple[str, str]]:
    """The module and (lower-cased) function of each frame `error` passed through, the
    one that raised it last."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        frames.append((frame.f_globals.get("__name__", ""), frame.f_code.co_name.lower()))
        traceback = traceback.tb_next
    return frames
