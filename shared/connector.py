"""Async client for the Bot Connector REST API v3: all 15 operations, resilient.

- The bot's token goes only to trusted serviceUrls (https on the Bot Framework and Teams
  hosts, plus ``BOT_TRUSTED_SERVICE_URLS``); anything else is refused before any
  connection is made or token acquired.
- Path parameters are percent-encoded (Teams ids contain ``:``, ``@``, ``;`` and ``/``).
- 412, 429, 502, 503, 504 and connection errors are retried on every method, POST included,
  honouring ``Retry-After``, otherwise with capped exponential backoff and jitter, within a
  bounded number of attempts and a bounded total time; 500 and other 4xx are not retried.
- A 401 refreshes the token once and retries.
- Sends are paced under the Teams limits (:mod:`shared.ratelimit`).
- Every failure is a :class:`ConnectorError` with the status, the service's code and a
  classification the caller can act on (retry later, prune the conversation, give up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import yarl

from shared.auth.tokens import TokenError, TokenProvider
from shared.config import Settings, is_loopback_host
from shared.ratelimit import Pacer, conversation_key

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[object]]
Clock = Callable[[], float]
Expect = Literal["dict", "list", "none", "bytes"]

RETRY_STATUSES = frozenset({412, 429, 502, 503, 504})
# Teams answers these when the bot can no longer write to the conversation: stop, prune.
GONE_403_CODES = frozenset(
    {
        "botnotinconversationroster",
        "conversationblockedbyuser",
        "botdisabledbyadmin",
        "forbiddenoperationexception",
        "messagewritesblocked",
    }
)
TEAMS_BLOCKED_ERROR_CODE = 209  # {"errorCode": 209, "message": "{\"subCode\": ...}"}

# Hosts the bot's token may be sent to (exact host or a subdomain of it), per cloud.
_TEAMS_HOSTS = (
    "smba.trafficmanager.net",  # Teams, public cloud
    "smba.infra.gcc.teams.microsoft.com",  # GCC
    "smba.infra.gov.teams.microsoft.us",  # GCC High
    "smba.infra.dod.teams.microsoft.us",  # DoD
)
TRUSTED_HOSTS: dict[str, tuple[str, ...]] = {
    "public": ("botframework.com", *_TEAMS_HOSTS),
    "usgov": ("botframework.us", "botframework.azure.us", *_TEAMS_HOSTS),
}

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=5, sock_read=15)
_MAX_MESSAGE_CHARS = 300


class ErrorKind(StrEnum):
    THROTTLED = "throttled"  # 429: retry after retry_after
    TRANSIENT = "transient"  # 5xx, 412, connection errors: retry later
    GONE = "gone"  # the bot can no longer reach this conversation: prune, do not retry
    INVALID = "invalid"  # the request (or the bot's configuration) is wrong: do not retry
    UNTRUSTED = "untrusted"  # serviceUrl outside the trusted set: nothing was sent


class ConnectorError(Exception):
    """A Connector call failed. ``kind`` says what the caller should do about it."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        operation: str | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.operation = operation
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.operation or "connector", self.kind.value]
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        return f"{' '.join(parts)}: {self.message}"

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT)

    @property
    def terminal(self) -> bool:
        return self.kind is ErrorKind.GONE


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to keep trying a call that failed transiently."""

    max_attempts: int = 5
    max_total_seconds: float = 12.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.2  # each backoff is shortened by up to this fraction, at random

    def backoff(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after the ``failures``-th failure when the server gave no Retry-After."""
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return delay * (1 - self.jitter * rand())


NO_RETRY = RetryPolicy(max_attempts=1)


class ConnectorClient:
    """The Bot Connector v3 operations, one per method (see the seed OpenAPI)."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenProvider | None,
        *,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        pacer: Pacer | None = None,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._session = session
        self._owns_session = session is None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._timeout = timeout
        self.pacer = pacer or Pacer(settings.connector_rate_limit, clock=clock, sleep=sleep)
        self._trusted_hosts = TRUSTED_HOSTS[settings.channel_service]
        self._trusted_prefixes = tuple(urlsplit(p) for p in settings.trusted_service_urls)

    # --- trust ------------------------------------------------------------------------

    def is_trusted(self, service_url: str) -> bool:
        """May the bot send its token to ``service_url``? Decided on the URL alone."""
        parts = _parse_service_url(service_url)
        if parts is None:
            return False
        scheme, host, port, path = parts
        if self._settings.auth_disabled:
            # Local, unauthenticated mode: only loopback Connectors (botsim) are reachable.
            return is_loopback_host(host)
        if scheme == "https" and port == 443 and _host_in(host, self._trusted_hosts):
            return True
        return any(
            _prefix_admits(prefix, scheme, host, port, path) for prefix in self._trusted_prefixes
        )

    # --- activities -------------------------------------------------------------------

    async def send_to_conversation(
        self,
        service_url: str,
        conversation_id: str,
        activity: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/activities"
        return await self._call(
            "sendToConversation",
            "POST",
            service_url,
            path,
            body=activity,
            pace=conversation_id,
            retry=retry,
        )

    async def reply_to_activity(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        activity: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/activities/{_q(activity_id)}"
        return await self._call(
            "replyToActivity",
            "POST",
            service_url,
            path,
            body=activity,
            pace=conversation_id,
            retry=retry,
        )

    async def update_activity(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        activity: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/activities/{_q(activity_id)}"
        return await self._call(
            "updateActivity",
            "PUT",
            service_url,
            path,
            body=activity,
            pace=conversation_id,
            retry=retry,
        )

    async def delete_activity(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        path = f"/v3/conversations/{_q(conversation_id)}/activities/{_q(activity_id)}"
        await self._call(
            "deleteActivity",
            "DELETE",
            service_url,
            path,
            expect="none",
            pace=conversation_id,
            retry=retry,
        )

    async def send_conversation_history(
        self,
        service_url: str,
        conversation_id: str,
        transcript: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/activities/history"
        return await self._call(
            "sendConversationHistory",
            "POST",
            service_url,
            path,
            body=transcript,
            pace=conversation_id,
            retry=retry,
        )

    async def get_activity_members(
        self,
        service_url: str,
        conversation_id: str,
        activity_id: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> list:
        path = f"/v3/conversations/{_q(conversation_id)}/activities/{_q(activity_id)}/members"
        return await self._call(
            "getActivityMembers", "GET", service_url, path, expect="list", retry=retry
        )

    # --- conversations ----------------------------------------------------------------

    async def create_conversation(
        self, service_url: str, parameters: Mapping[str, Any], *, retry: RetryPolicy | None = None
    ) -> dict:
        return await self._call(
            "createConversation",
            "POST",
            service_url,
            "/v3/conversations",
            body=parameters,
            retry=retry,
        )

    async def get_conversations(
        self,
        service_url: str,
        continuation_token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        return await self._call(
            "getConversations",
            "GET",
            service_url,
            "/v3/conversations",
            query={"continuationToken": continuation_token},
            retry=retry,
        )

    # --- members ----------------------------------------------------------------------

    async def get_conversation_members(
        self, service_url: str, conversation_id: str, *, retry: RetryPolicy | None = None
    ) -> list:
        path = f"/v3/conversations/{_q(conversation_id)}/members"
        return await self._call(
            "getConversationMembers", "GET", service_url, path, expect="list", retry=retry
        )

    async def get_conversation_paged_members(
        self,
        service_url: str,
        conversation_id: str,
        page_size: int | None = None,
        continuation_token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/pagedmembers"
        query = {
            "pageSize": str(page_size) if page_size is not None else None,
            "continuationToken": continuation_token,
        }
        return await self._call(
            "getConversationPagedMembers", "GET", service_url, path, query=query, retry=retry
        )

    async def get_conversation_member(
        self,
        service_url: str,
        conversation_id: str,
        member_id: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/members/{_q(member_id)}"
        return await self._call("getConversationMember", "GET", service_url, path, retry=retry)

    async def delete_conversation_member(
        self,
        service_url: str,
        conversation_id: str,
        member_id: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        path = f"/v3/conversations/{_q(conversation_id)}/members/{_q(member_id)}"
        await self._call(
            "deleteConversationMember",
            "DELETE",
            service_url,
            path,
            expect="none",
            pace=conversation_id,
            retry=retry,
        )

    # --- attachments ------------------------------------------------------------------

    async def upload_attachment(
        self,
        service_url: str,
        conversation_id: str,
        upload: Mapping[str, Any],
        *,
        retry: RetryPolicy | None = None,
    ) -> dict:
        path = f"/v3/conversations/{_q(conversation_id)}/attachments"
        return await self._call(
            "uploadAttachment",
            "POST",
            service_url,
            path,
            body=upload,
            pace=conversation_id,
            retry=retry,
        )

    async def get_attachment_info(
        self, service_url: str, attachment_id: str, *, retry: RetryPolicy | None = None
    ) -> dict:
        path = f"/v3/attachments/{_q(attachment_id)}"
        return await self._call("getAttachmentInfo", "GET", service_url, path, retry=retry)

    async def get_attachment(
        self,
        service_url: str,
        attachment_id: str,
        view_id: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> bytes:
        path = f"/v3/attachments/{_q(attachment_id)}/views/{_q(view_id)}"
        return await self._call(
            "getAttachment", "GET", service_url, path, expect="bytes", retry=retry
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

    # --- the one request path -----------------------------------------------------------

    async def _call(
        self,
        operation: str,
        method: str,
        service_url: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | None] | None = None,
        expect: Expect = "dict",
        pace: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        self._require_trusted(operation, service_url)
        policy = retry or self._retry
        url = _build_url(service_url, path, query)
        pace_key = conversation_key(pace) if pace is not None else None
        started = self._clock()
        attempt = failures = 0
        refreshed = force_refresh = False
        while True:
            headers = await self._headers(operation, force_refresh)
            force_refresh = False
            await self.pacer.acquire(pace_key)
            attempt += 1
            answer = await self._attempt(operation, method, url, headers, body, attempt)
            if isinstance(answer, ConnectorError):
                failure = answer
            else:
                status, response_headers, content = answer
                if 200 <= status < 300:
                    return _result(operation, expect, content)
                if status == 401 and self._tokens is not None and not refreshed:
                    # The token was rejected (revoked, rotated secret): one fresh token, once.
                    refreshed = force_refresh = True
                    continue
                failure = error_from_response(operation, status, response_headers, content)
                if status not in RETRY_STATUSES:
                    raise failure
            failures += 1
            delay = failure.retry_after
            if delay is None:
                delay = policy.backoff(failures)
            elapsed = self._clock() - started
            if failures >= policy.max_attempts or elapsed + delay > policy.max_total_seconds:
                raise failure
            await self._sleep(delay)

    def _require_trusted(self, operation: str, service_url: str) -> None:
        # Checked before any token is acquired or connection opened (DESIGN: never send
        # the bot's token to a serviceUrl outside the trusted set).
        if self.is_trusted(service_url):
            return
        log.warning(
            "connector %s refused: untrusted serviceUrl host=%s",
            operation,
            _host_for_log(service_url),
        )
        raise ConnectorError(
            ErrorKind.UNTRUSTED, "serviceUrl is not trusted; nothing was sent", operation=operation
        )

    async def _attempt(
        self,
        operation: str,
        method: str,
        url: yarl.URL,
        headers: dict[str, str],
        body: Mapping[str, Any] | None,
        attempt: int,
    ) -> tuple[int, Mapping[str, str], bytes] | ConnectorError:
        """One request: the answer, or a retryable ConnectorError for a connection failure."""
        try:
            status, response_headers, content = await self._send(method, url, headers, body)
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            outcome = f"failed={type(error).__name__}"
            failure = ConnectorError(
                ErrorKind.TRANSIENT,
                f"connection failed ({type(error).__name__})",
                operation=operation,
            )
            log.info(
                "connector %s %s %s %s attempt=%d", method, url.host, operation, outcome, attempt
            )
            return failure
        except aiohttp.ClientError as error:  # e.g. too many redirects: not worth a retry
            raise ConnectorError(
                ErrorKind.INVALID, f"request failed ({type(error).__name__})", operation=operation
            ) from None
        log.info(
            "connector %s %s %s status=%d attempt=%d", method, url.host, operation, status, attempt
        )
        return status, response_headers, content

    async def _headers(self, operation: str, force_refresh: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._tokens is None:
            return headers
        try:
            token = await self._tokens.get_token(force_refresh=force_refresh)
        except TokenError as error:
            kind = ErrorKind.TRANSIENT if error.transient else ErrorKind.INVALID
            raise ConnectorError(
                kind, f"no token: {error}", code=error.code or "TokenError", operation=operation
            ) from error
        headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _send(
        self,
        method: str,
        url: yarl.URL,
        headers: dict[str, str],
        body: Mapping[str, Any] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        session = self._get_session()
        # Redirects are followed for reads only (attachment views live elsewhere); aiohttp
        # drops the Authorization header when a redirect leaves the origin.
        async with session.request(
            method,
            url,
            headers=headers,
            json=dict(body) if body is not None else None,
            allow_redirects=method == "GET",
        ) as response:
            content = await response.read()
            return response.status, response.headers, content

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and not (
            self._owns_session and (session.closed or self._session_loop is not loop)
        ):
            return session
        # One session per process (per event loop), created on first use.
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._session_loop = loop
        self._owns_session = True
        return self._session


# --- errors ---------------------------------------------------------------------------


def error_from_response(
    operation: str, status: int, headers: Mapping[str, str], content: bytes
) -> ConnectorError:
    """The ConnectorError for a non-2xx answer, classified per the Teams error table."""
    code, message, teams_code = parse_error_body(content)
    return ConnectorError(
        classify(status, code, teams_code),
        message or f"HTTP {status}",
        status=status,
        code=code,
        retry_after=parse_retry_after(headers.get("Retry-After")),
        operation=operation,
    )


def classify(status: int, code: str | None, teams_code: int | None = None) -> ErrorKind:
    folded = (code or "").lower()
    if status == 429:
        return ErrorKind.THROTTLED
    if status >= 500 or status == 412:
        return ErrorKind.TRANSIENT
    if status == 403 and (folded in GONE_403_CODES or teams_code == TEAMS_BLOCKED_ERROR_CODE):
        return ErrorKind.GONE
    if status == 404 and folded == "conversationnotfound":
        return ErrorKind.GONE
    return ErrorKind.INVALID


def parse_error_body(content: bytes) -> tuple[str | None, str, int | None]:
    """(code, message, Teams errorCode) from any of the Connector's error body shapes.

    Shapes: ``{"error": {"code", "message"}}``; Teams'
    ``{"errorCode": 209, "message": "{\\"subCode\\": \\"MessageWritesBlocked\\", ...}"}``
    (a JSON document inside the message string); ``{"code", "message"}``; plain text.
    """
    text = content.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None, _clip(text), None
    if not isinstance(data, dict):
        return None, _clip(text), None
    code: Any = None
    message: Any = None
    error = data.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
    elif isinstance(error, str):
        code, message = error, data.get("error_description") or data.get("message")
    teams_code = data.get("errorCode")
    if teams_code is not None:
        inner = _json_object(data.get("message"))
        sub = inner.get("subCode") or inner.get("errorSubCode") or inner.get("errorCode")
        code = code or sub or str(teams_code)
        message = message or inner.get("details") or data.get("message")
    code = code or data.get("code")
    message = message or data.get("message") or ""
    numeric = teams_code if isinstance(teams_code, int) else None
    return (str(code) if code else None), _clip(str(message)), numeric


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())


def _json_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "..."


# --- results and URLs -----------------------------------------------------------------


def _result(operation: str, expect: Expect, content: bytes) -> Any:
    if expect == "bytes":
        return content
    if expect == "none":
        return None
    empty: Any = [] if expect == "list" else {}
    if not content.strip():
        return empty
    try:
        data = json.loads(content)
    except ValueError:
        log.warning("connector %s answered 2xx with a body that is not JSON", operation)
        return empty
    if isinstance(data, list if expect == "list" else dict):
        return data
    log.warning("connector %s answered 2xx with an unexpected JSON shape", operation)
    return empty


def _q(value: str) -> str:
    """One path segment, percent-encoded: ``/``, ``:``, ``@`` and ``;`` included."""
    return quote(value, safe="")


def _build_url(service_url: str, path: str, query: Mapping[str, str | None] | None) -> yarl.URL:
    base = str(yarl.URL(service_url.strip())).rstrip("/")
    params = {k: v for k, v in (query or {}).items() if v is not None}
    qs = f"?{urlencode(params, quote_via=quote, safe='')}" if params else ""
    # encoded=True: the path segments are already encoded; yarl must not decode %2F etc.
    return yarl.URL(f"{base}{path}{qs}", encoded=True)


def _parse_service_url(service_url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of a well-formed absolute http(s) URL, else None."""
    if not isinstance(service_url, str) or not service_url.isascii():
        return None
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in service_url):
        return None
    parts = urlsplit(service_url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or parts.query or parts.fragment:
        return None
    if "@" in parts.netloc or not parts.hostname:  # userinfo tricks: https://trusted@evil
        return None
    host = parts.hostname.lower()
    if host.endswith(".") or ".." in host:
        return None
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    if scheme == "http" and not is_loopback_host(host):
        return None
    return scheme, host, port, parts.path or "/"


def _host_in(host: str, trusted: tuple[str, ...]) -> bool:
    return any(host == name or host.endswith("." + name) for name in trusted)


def _prefix_admits(prefix: Any, scheme: str, host: str, port: int, path: str) -> bool:
    """A BOT_TRUSTED_SERVICE_URLS prefix: scheme, host and port exact, path on whole segments."""
    prefix_scheme = prefix.scheme.lower()
    if prefix_scheme != scheme or (prefix.hostname or "").lower() != host:
        return False
    try:
        prefix_port = prefix.port or (443 if prefix_scheme == "https" else 80)
    except ValueError:
        return False
    if prefix_port != port:
        return False
    prefix_path = prefix.path.rstrip("/")
    return not prefix_path or path == prefix_path or path.startswith(prefix_path + "/")


def _host_for_log(service_url: str) -> str:
    try:
        return urlsplit(service_url).hostname or "?"
    except ValueError:
        return "?"
