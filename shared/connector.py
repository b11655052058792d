"""Async client for the Bot Connector REST API v3: all 15 operations, resilient.

- The bot's token goes only to trusted serviceUrls (https on the Bot Framework and Teams
  hosts of the configured cloud, plus ``BOT_TRUSTED_SERVICE_URLS``); anything else is
  refused before any connection is made or token acquired. The URL is parsed once,
  strictly, and the request goes to exactly what was checked.
- Redirects are followed only for attachment views, and the token never follows one
  outside the trusted set. Answers are read up to a size limit.
- Path parameters are percent-encoded (Teams ids contain ``:``, ``@``, ``;`` and ``/``).
- 412, 429, 502, 503, 504 and connection errors are retried on every method, POST included,
  honouring ``Retry-After``, otherwise with capped exponential backoff and jitter, within a
  bounded number of attempts and a bounded total time (pacing, token and every attempt
  included); 500 and other 4xx are not retried.
- A 401 refreshes the token once and retries; calls that saw the same rejected token
  share one refresh.
- Requests are paced as the channel enforces (:mod:`shared.ratelimit`): Teams
  conversations under Teams' windows, Teams tenants at an app-wide rate that adapts to
  429s; :meth:`background` gives the same client for proactive traffic, which yields to
  replies and leaves them headroom.
- Every failure is a :class:`ConnectorError` with the status, the service's code and a
  classification the caller can act on (retry later, prune the conversation, give up).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import yarl

from shared.activity import tenant_id
from shared.auth.tokens import TokenError, TokenProvider
from shared.config import Settings
from shared.ratelimit import TEAMS, Pacer, PacingTimeout, Scope, conversation_key
from shared.urls import HOST_NAME, PATH_CHARS, has_dot_segment, is_ip_address, is_loopback_host

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

# Teams' Connector hosts: a request there is paced as Teams traffic even when its body
# does not say which channel it is for (a delete, a createConversation).
TEAMS_HOSTS = (
    "smba.trafficmanager.net",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
    "smba.infra.dod.teams.microsoft.us",
)

# Hosts the bot's token may be sent to (exact host or a subdomain of it), per cloud. GCC
# tenants use commercial Azure bots; GCC High and DoD bots live in Azure Government.
TRUSTED_HOSTS: dict[str, tuple[str, ...]] = {
    "public": (
        "botframework.com",
        "smba.trafficmanager.net",  # Teams, public cloud
        "smba.infra.gcc.teams.microsoft.com",  # Teams, GCC
    ),
    "usgov": (
        "botframework.us",
        "botframework.azure.us",
        "smba.infra.gov.teams.microsoft.us",  # Teams, GCC High
        "smba.infra.dod.teams.microsoft.us",  # Teams, DoD
    ),
}

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=5, sock_read=15)
MAX_RETRY_AFTER = 3600.0  # a longer Retry-After is reported as this (callers requeue)
MAX_REDIRECTS = 5  # attachment views only
MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # a larger answer is refused, not read into memory
MAX_ERROR_BODY_BYTES = 64 * 1024  # enough for any error document; the rest is not read
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_MESSAGE_CHARS = 300
_MAX_CODE_CHARS = 100


class ErrorKind(StrEnum):
    THROTTLED = "throttled"  # 429: retry after retry_after
    TRANSIENT = "transient"  # 412, 502, 503, 504, connection errors: retry later
    GONE = "gone"  # the bot can no longer reach this conversation: prune, do not retry
    INVALID = "invalid"  # the request is wrong: do not retry
    UNTRUSTED = "untrusted"  # serviceUrl outside the trusted set: nothing was sent
    # 500 and other unexpected 5xx: the service failed and may have acted (a message may be
    # posted), so resending is not safe; report it and let an operator decide.
    UNCERTAIN = "uncertain"
    # The bot's own credentials or settings were refused (no token, a second 401): nothing
    # is wrong with the request; keep it and fix the setting named in ``setting``.
    CREDENTIALS = "credentials"


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
        setting: str | None = None,
    ) -> None:
        self.kind = kind
        self.setting = setting
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
        self._http = _Http(session, timeout)
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self.pacer = pacer or Pacer(settings.connector_rate_limit, clock=clock, sleep=sleep)
        self._trusted_hosts = TRUSTED_HOSTS[settings.channel_service]
        self._trusted_prefixes = _trusted_prefixes(settings.trusted_service_urls)
        self._background = False
        self._background_view: ConnectorClient | None = None

    def background(self) -> ConnectorClient:
        """This client for background traffic (proactive sends, broadcasts).

        Same session, token provider, pacer and retry policy; its requests are held to
        the pacer's background share of the global rate, so replies to users always
        find headroom. Closing the view does nothing: the client that made it owns the
        session.
        """
        if self._background:
            return self
        if self._background_view is None:
            view = copy.copy(self)
            view._background = True
            view._background_view = view
            self._background_view = view
        return self._background_view

    # --- trust ------------------------------------------------------------------------

    def is_trusted(self, service_url: str) -> bool:
        """May the bot send its token to ``service_url``? Decided on the URL alone."""
        return self._trusted_target(service_url) is not None

    def _trusted_target(self, service_url: str) -> ServiceTarget | None:
        target = parse_service_url(service_url)
        if target is None:
            return None
        if self._settings.auth_disabled:
            # Local, unauthenticated mode: only loopback Connectors (botsim) are reachable.
            return target if is_loopback_host(target.host) else None
        if (
            target.scheme == "https"
            and target.port == 443
            and _host_in(target.host, self._trusted_hosts)
        ):
            return target
        if any(_prefix_admits(prefix, target) for prefix in self._trusted_prefixes):
            return target
        return None

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
        if not self._background:
            await self._http.close()

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
        target = self._require_trusted(operation, service_url)
        policy = retry or self._retry
        url = _build_url(target, path, query)
        data = _encode_body(operation, body)
        scope = _pacing_scope(target, pace, body)
        # One budget for everything: the token, pacing waits, every attempt, every backoff.
        deadline = self._clock() + policy.max_total_seconds
        attempt = failures = 0
        rejected: str | None = None
        failure: ConnectorError | None = None
        while True:
            if failure is not None and self._clock() >= deadline:
                raise failure
            token = await self._token(operation, rejected, deadline)
            if self._clock() >= deadline:  # the token took the whole budget
                raise failure or _budget_spent(operation)
            granted = await self._pace(operation, scope, deadline)
            attempt += 1
            answer = await self._attempt(
                operation, method, url, _headers(token, data), data, attempt, deadline, expect
            )
            if isinstance(answer, ConnectorError):
                failure = answer
            else:
                status, response_headers, content = answer
                if 200 <= status < 300:
                    return _result(operation, expect, content)
                if status == 401 and token is not None and rejected is None:
                    # The token was rejected (revoked, rotated secret): one fresh token, once.
                    rejected = token
                    continue
                failure = error_from_response(
                    operation, status, response_headers, content, secrets=(token or "",)
                )
                if status == 429:
                    self.pacer.throttled(scope, failure.retry_after, granted)
                if status not in RETRY_STATUSES:
                    raise failure
            failures += 1
            delay = failure.retry_after
            if delay is None:
                delay = policy.backoff(failures)
            if failures >= policy.max_attempts or self._clock() + delay > deadline:
                raise failure
            await self._sleep(delay)

    def _require_trusted(self, operation: str, service_url: str) -> ServiceTarget:
        # Checked before any token is acquired or connection opened (docs/architecture.md,
        # trust model: never send the bot's token to a serviceUrl outside the trusted set).
        target = self._trusted_target(service_url)
        if target is not None:
            return target
        log.warning(
            "connector %s refused: untrusted serviceUrl host=%s",
            operation,
            _host_for_log(service_url),
        )
        raise ConnectorError(
            ErrorKind.UNTRUSTED, "serviceUrl is not trusted; nothing was sent", operation=operation
        )

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - self._clock())

    async def _token(self, operation: str, rejected: str | None, deadline: float) -> str | None:
        """The token for the next attempt; a fresh one if ``rejected`` is still current."""
        if self._tokens is None:
            return None
        try:
            async with asyncio.timeout(self._remaining(deadline)):
                token = await self._tokens.get_token()
                if rejected is not None and token == rejected:
                    # Nobody has replaced the rejected token yet. Calls that saw the same
                    # 401 get here in the same instant and share this one refresh.
                    token = await self._tokens.get_token(force_refresh=True)
        except TokenError as error:
            kind = ErrorKind.TRANSIENT if error.transient else ErrorKind.CREDENTIALS
            raise ConnectorError(
                kind,
                f"no token: {error}",
                code=error.code or "TokenError",
                operation=operation,
                setting=error.setting,
            ) from error
        except TimeoutError:
            raise ConnectorError(
                ErrorKind.TRANSIENT,
                "no token within the time budget; nothing was sent",
                code="TokenTimeout",
                operation=operation,
            ) from None
        return token

    async def _pace(self, operation: str, scope: Scope, deadline: float) -> float:
        try:
            return await self.pacer.acquire(
                scope, background=self._background, max_wait=self._remaining(deadline)
            )
        except PacingTimeout as error:
            raise ConnectorError(
                ErrorKind.THROTTLED,
                "rate limited here: no send slot within the time budget; nothing was sent",
                code="PacingTimeout",
                retry_after=error.wait,
                operation=operation,
            ) from None

    async def _attempt(
        self,
        operation: str,
        method: str,
        url: yarl.URL,
        headers: dict[str, str],
        data: bytes | None,
        attempt: int,
        deadline: float,
        expect: Expect,
    ) -> tuple[int, Mapping[str, str], bytes] | ConnectorError:
        """One request: the answer, or a retryable ConnectorError for a connection failure."""
        try:
            async with asyncio.timeout(self._remaining(deadline)):
                status, response_headers, content = await self._send(
                    operation, method, url, headers, data, expect
                )
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
        except aiohttp.ClientError as error:  # e.g. a malformed answer: not worth a retry
            raise ConnectorError(
                ErrorKind.INVALID, f"request failed ({type(error).__name__})", operation=operation
            ) from None
        log.info(
            "connector %s %s %s status=%d attempt=%d", method, url.host, operation, status, attempt
        )
        return status, response_headers, content

    async def _send(
        self,
        operation: str,
        method: str,
        url: yarl.URL,
        headers: dict[str, str],
        data: bytes | None,
        expect: Expect,
    ) -> tuple[int, Mapping[str, str], bytes]:
        session = self._http.get()
        # Attachment views redirect to where the bytes live; nothing else may redirect
        # (a 3xx is an error), and redirects are followed here, not by aiohttp, so the
        # token is dropped unless the next hop is still inside the trusted set.
        follow = expect == "bytes"
        for _ in range(MAX_REDIRECTS + 1):
            async with session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            ) as response:
                location = response.headers.get("Location")
                if follow and response.status in _REDIRECT_STATUSES and location:
                    url, headers = self._redirect(operation, url, location, headers)
                    continue
                ok = 200 <= response.status < 300
                content = await _read_body(operation, response, ok)
                return response.status, response.headers, content
        raise ConnectorError(
            ErrorKind.INVALID, f"more than {MAX_REDIRECTS} redirects", operation=operation
        )

    def _redirect(
        self, operation: str, url: yarl.URL, location: str, headers: dict[str, str]
    ) -> tuple[yarl.URL, dict[str, str]]:
        try:
            target = url.join(yarl.URL(location))
            host = target.host
        except (ValueError, TypeError):
            target, host = None, None
        secure = target is not None and (
            target.scheme == "https" or (target.scheme == "http" and is_loopback_host(host))
        )
        if target is None or not host or not secure:
            raise ConnectorError(
                ErrorKind.INVALID,
                "redirected to a location that is not an https URL",
                operation=operation,
            )
        headers = dict(headers)
        same_origin = target.origin() == url.origin()
        if not (same_origin and self.is_trusted(str(target.with_query(None).with_fragment(None)))):
            headers.pop("Authorization", None)
        log.info("connector %s redirected to host=%s", operation, _host_for_log(str(target)))
        return target, headers


class _Http:
    """The process's one aiohttp session (per event loop), created on first use."""

    __slots__ = ("_loop", "_owned", "_session", "_timeout")

    def __init__(self, session: aiohttp.ClientSession | None, timeout: aiohttp.ClientTimeout):
        self._session = session
        self._owned = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and not (self._owned and (session.closed or self._loop is not loop)):
            return session
        # First use, or the loop that owned the old session is gone (tests, some hosts).
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),  # no state carried between calls
        )
        self._loop = loop
        self._owned = True
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owned and not session.closed:
            await session.close()


def _pacing_scope(
    target: ServiceTarget, conversation_id: str | None, body: Mapping[str, Any] | None
) -> Scope:
    """Which limits a request falls under: the channel and tenant the body names (a
    Teams host counts as Teams when it names none), the conversation it goes to."""
    channel = body.get("channelId") if body is not None else None
    if not isinstance(channel, str) or not channel:
        channel = TEAMS if _host_in(target.host, TEAMS_HOSTS) else None
    tenant = None
    if channel == TEAMS and body is not None:
        tenant = tenant_id(body) or body.get("tenantId")  # createConversation: tenantId
    return Scope(
        channel_id=channel,
        tenant_id=tenant if isinstance(tenant, str) and tenant else None,
        conversation=conversation_key(conversation_id) if conversation_id else None,
        service=f"{target.host}:{target.port}",
    )


def _budget_spent(operation: str) -> ConnectorError:
    return ConnectorError(
        ErrorKind.TRANSIENT, "the time budget was spent; nothing was sent", operation=operation
    )


def _headers(token: str | None, data: bytes | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json; charset=utf-8"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _encode_body(operation: str, body: Mapping[str, Any] | None) -> bytes | None:
    if body is None:
        return None
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise ConnectorError(
            ErrorKind.INVALID,
            f"the request body is not JSON ({type(error).__name__}); nothing was sent",
            operation=operation,
        ) from None


async def _read_body(operation: str, response: aiohttp.ClientResponse, ok: bool) -> bytes:
    """The answer's body, up to a limit: errors are cut short, oversized results refused."""
    limit = MAX_RESPONSE_BYTES if ok else MAX_ERROR_BODY_BYTES
    if ok and (response.content_length or 0) > limit:
        raise _too_large(operation, limit)
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            if ok:
                raise _too_large(operation, limit)
            return bytes(body[:limit])  # leaving unread: aiohttp closes the connection
    return bytes(body)


def _too_large(operation: str, limit: int) -> ConnectorError:
    return ConnectorError(
        ErrorKind.INVALID, f"the answer is larger than {limit} bytes", operation=operation
    )


# --- errors ---------------------------------------------------------------------------


def error_from_response(
    operation: str,
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    secrets: Sequence[str] = (),
) -> ConnectorError:
    """The ConnectorError for a non-2xx answer, classified per the Teams error table.

    ``secrets`` (the token that was sent) are removed should the service echo them.
    """
    code, message, teams_code = parse_error_body(content, secrets)
    kind = classify(status, code, teams_code)
    return ConnectorError(
        kind,
        message or f"HTTP {status}",
        status=status,
        code=code,
        retry_after=parse_retry_after(headers.get("Retry-After")),
        operation=operation,
        # The Connector refused the bot's token even after a refresh: the app id (or its
        # registration with the Bot Service) is what to check.
        setting="MicrosoftAppId" if kind is ErrorKind.CREDENTIALS else None,
    )


def classify(status: int, code: str | None, teams_code: int | None = None) -> ErrorKind:
    folded = (code or "").lower()
    if status == 429:
        return ErrorKind.THROTTLED
    if status in RETRY_STATUSES:
        return ErrorKind.TRANSIENT
    if status >= 500:
        return ErrorKind.UNCERTAIN
    if status == 401:
        return ErrorKind.CREDENTIALS
    if status == 403 and (folded in GONE_403_CODES or teams_code == TEAMS_BLOCKED_ERROR_CODE):
        return ErrorKind.GONE
    if status == 404 and folded == "conversationnotfound":
        return ErrorKind.GONE
    return ErrorKind.INVALID


def parse_error_body(
    content: bytes, secrets: Sequence[str] = ()
) -> tuple[str | None, str, int | None]:
    """(code, message, Teams errorCode) from any of the Connector's error body shapes.

    Shapes: ``{"error": {"code", "message"}}``; Teams'
    ``{"errorCode": 209, "message": "{\\"subCode\\": \\"MessageWritesBlocked\\", ...}"}``
    (a JSON document inside the message string); ``{"code", "message"}``; plain text.
    Code and message come back short, on one line, with tokens and ``secrets`` removed.
    """
    text = content.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None, _clean(text, secrets), None
    if not isinstance(data, dict):
        return None, _clean(text, secrets), None
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
    code_text = _clean(str(code), secrets, _MAX_CODE_CHARS) if code else None
    return code_text, _clean(str(message), secrets), numeric


_DELTA_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    Always finite, between 0 and :data:`MAX_RETRY_AFTER`; None when absent or unreadable
    (``inf``, ``nan``, a date without a zone, garbage).
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return MAX_RETRY_AFTER if seconds > 0 else None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BEARER = re.compile(r"(?i)bearer\s+[^\s,;\"']+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def _clean(text: str, secrets: Sequence[str] = (), limit: int = _MAX_MESSAGE_CHARS) -> str:
    """Service text made safe to carry and log: no secrets or tokens, one line, short."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _BEARER.sub("Bearer [redacted]", text)
    text = _JWT.sub("[redacted]", text)
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


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
    """One path segment, percent-encoded: ``/``, ``:``, ``@`` and ``;`` included.

    An id that is not valid Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes
    can carry) cannot be encoded: an ``invalid`` error, never a UnicodeEncodeError.
    """
    try:
        return quote(value, safe="")
    except UnicodeEncodeError:
        raise ConnectorError(
            ErrorKind.INVALID, "an id in the request path is not valid Unicode; nothing was sent"
        ) from None


def _build_url(
    target: ServiceTarget, path: str, query: Mapping[str, str | None] | None
) -> yarl.URL:
    params = {k: v for k, v in (query or {}).items() if v is not None}
    qs = f"?{urlencode(params, quote_via=quote, safe='')}" if params else ""
    # encoded=True: the URL is exactly the checked one plus already-encoded segments;
    # yarl must not decode %2F or resolve anything.
    return yarl.URL(f"{target.base}{path}{qs}", encoded=True)


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A serviceUrl that passed the strict parse: what is checked is what is called."""

    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int
    path: str  # percent-encoded as given, without a trailing slash ("" for the root)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


# Encoded "/", "\\", "." and NUL: servers that decode them could walk out of a path prefix.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[fFeE]|5[cC]|00)")


def parse_service_url(service_url: str) -> ServiceTarget | None:
    """The target of a well-formed absolute http(s) URL, else None.

    Strict on purpose: ASCII only (an IDN must come as punycode), no whitespace, control
    characters or backslashes, no userinfo, query or fragment, a plain DNS name or IP
    address (no trailing dot, no percent-encoding), a path without dot segments or
    encoded separators, and plain http only for loopback hosts.
    """
    if not isinstance(service_url, str) or not service_url.isascii():
        return None
    if any(c.isspace() or not c.isprintable() or c in "\\?#" for c in service_url):
        return None
    try:
        parts = urlsplit(service_url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("https", "http") or "@" in parts.netloc:  # https://trusted@evil
        return None
    if not (HOST_NAME.fullmatch(host) or is_ip_address(host)):
        return None
    if port is not None and not 0 < port < 65536:
        return None
    if scheme == "http" and not is_loopback_host(host):
        return None
    path = parts.path
    if not PATH_CHARS.fullmatch(path) or _ENCODED_SEPARATOR.search(path):
        return None
    if has_dot_segment(path):
        return None
    default = 443 if scheme == "https" else 80
    return ServiceTarget(scheme, host, port or default, path.rstrip("/"))


def _trusted_prefixes(prefixes: Sequence[str]) -> tuple[ServiceTarget, ...]:
    """BOT_TRUSTED_SERVICE_URLS, parsed as strictly as the serviceUrls they must match."""
    parsed = []
    for prefix in prefixes:
        target = parse_service_url(prefix)
        if target is None:
            log.warning(
                "BOT_TRUSTED_SERVICE_URLS entry ignored (not a plain URL prefix): host=%s",
                _host_for_log(prefix),
            )
            continue
        parsed.append(target)
    return tuple(parsed)


def _host_in(host: str, trusted: tuple[str, ...]) -> bool:
    return any(host == name or host.endswith("." + name) for name in trusted)


def _prefix_admits(prefix: ServiceTarget, target: ServiceTarget) -> bool:
    """A BOT_TRUSTED_SERVICE_URLS prefix: scheme, host and port exact, path on whole segments."""
    if (prefix.scheme, prefix.host, prefix.port) != (target.scheme, target.host, target.port):
        return False
    return (
        not prefix.path or target.path == prefix.path or target.path.startswith(prefix.path + "/")
    )


def _host_for_log(service_url: str) -> str:
    try:
        host = urlsplit(service_url).hostname or "?"
    except (ValueError, TypeError, AttributeError):
        return "?"
    host = host.encode("ascii", "backslashreplace").decode("ascii")
    return _CONTROL.sub("?", host)[:100]
