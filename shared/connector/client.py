"""Async client for the Bot Connector REST API v3: all 15 operations, resilient.

- The bot's token goes only to trusted serviceUrls (https on the Bot Framework and Teams
  hosts of the configured cloud, plus ``BOT_TRUSTED_SERVICE_URLS``); anything else is
  refused before any connection is made or token acquired. The URL is parsed once,
  strictly, and the request goes to exactly what was checked.
- Redirects are followed only for attachment views, and the token never follows one
  outside the trusted set. Answers are read up to a size limit.
- Path parameters are percent-encoded (Teams ids contain ``:``, ``@``, ``;`` and ``/``).
- 412, 429, 502, 503, 504 and connection errors are retried on every method, POST included
  (but a POST of an activity whose request was written is ``uncertain``, never sent again),
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
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from shared.auth.tokens import TokenError, TokenProvider
from shared.config import Settings
from shared.connector.errors import (
    RETRY_STATUSES,
    ConnectorError,
    ErrorKind,
    RetryPolicy,
    budget_spent,
    error_from_response,
)
from shared.connector.scope import pacing_scope
from shared.connector.transport import (
    Departure,
    Expect,
    Http,
    build_url,
    encode_body,
    request_headers,
    result,
    send_once,
)
from shared.connector.transport import quote_segment as _q
from shared.ratelimit import Pacer, PacingTimeout, Scope
from shared.serviceurl import ServiceTarget, TrustPolicy, host_for_log

log = logging.getLogger("shared.connector")  # the package logs under one name

Sleep = Callable[[float], Awaitable[object]]
Clock = Callable[[], float]

# Of a call's budget, never spent waiting before a request: the request's own time to
# answer (a message answered later may have been posted; it is never sent again).
REQUEST_RESERVE_SECONDS = 5.0


def _request_reserve(policy: RetryPolicy) -> float:
    return min(REQUEST_RESERVE_SECONDS, policy.max_total_seconds / 2)


# Operations whose POST delivers an activity: one left without an answer after it was
# written may have been posted (createConversation only when it carries a first activity).
POSTS_ACTIVITIES = frozenset({"sendToConversation", "replyToActivity", "sendConversationHistory"})
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5, sock_connect=5, sock_read=15)


class ConnectorClient:
    """The Bot Connector REST v3 operations (all 15), one method each."""

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
        self._http = Http(session, timeout)
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self.pacer = pacer or Pacer(settings.connector_rate_limit, clock=clock, sleep=sleep)
        self._trust = TrustPolicy.configured(
            settings.channel_service,
            settings.trusted_service_urls,
            loopback_only=settings.auth_disabled,
        )
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

    def retry_within(self, seconds: float) -> RetryPolicy:
        """This client's retry policy with its whole budget (token, pacing waits, attempts,
        backoffs) cut to at most `seconds`."""
        return dataclasses.replace(
            self._retry, max_total_seconds=min(self._retry.max_total_seconds, seconds)
        )

    @property
    def slot_wait(self) -> float:
        """The longest a call waits for its send slot (its budget less what is kept for the
        request itself): past that it fails as throttled, nothing sent."""
        return self._retry.max_total_seconds - _request_reserve(self._retry)

    # --- trust ------------------------------------------------------------------------

    def is_trusted(self, service_url: str) -> bool:
        """May the bot send its token to ``service_url``? Decided on the URL alone."""
        return self.trusted_target(service_url) is not None

    def trusted_target(self, service_url: str) -> ServiceTarget | None:
        """Where ``service_url`` points, when the bot may send its token there; else None."""
        return self._trust.target(service_url)

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
        if isinstance(activity_id, str) and activity_id.lower() == "history":
            # The URL of sendConversationHistory: no encoding tells the two apart (a server
            # decodes %68istory), so the reply could be taken for a transcript upload.
            raise ConnectorError(
                ErrorKind.INVALID,
                "an activity id 'history' names another operation; nothing was sent",
                operation="replyToActivity",
            )
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
        if page_size is not None and (type(page_size) is not int or page_size < 1):
            raise ConnectorError(
                ErrorKind.INVALID,
                "pageSize is a whole number from 1; nothing was sent",
                operation="getConversationPagedMembers",
            )
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
        url = build_url(target, path, query, operation)
        data = encode_body(operation, body)
        accept = "*/*" if expect == "bytes" else "application/json"  # an attachment's bytes
        scope = pacing_scope(target, pace, body)
        posts = operation in POSTS_ACTIVITIES or (
            operation == "createConversation" and bool(body and body.get("activity"))
        )
        # One budget for everything: the token, pacing waits, every attempt, every backoff.
        deadline = self._clock() + policy.max_total_seconds
        # Kept for the request itself: one cut short after it was written may have been
        # posted, and a retry would post it again. Waits end early enough to leave it.
        reserve = _request_reserve(policy)
        attempt = failures = 0
        # A DELETE whose earlier attempt may have been carried out (written, then no answer,
        # here or inside aiohttp; or a gateway's 502/504): a 404 to the retry means it is
        # gone, as asked.
        maybe_done = False
        rejected: str | None = None
        failure: ConnectorError | None = None
        while True:
            if failure is not None and self._clock() >= deadline:
                raise failure
            token = await self._token(operation, rejected, deadline)
            if self._clock() >= deadline:  # the token took the whole budget
                raise failure or budget_spent(operation)
            granted = await self._pace(operation, scope, deadline - reserve)
            if self._remaining(deadline) < reserve:
                raise failure or budget_spent(operation)
            attempt += 1
            departure = self._departure(scope, granted)
            answer = await send_once(
                self._http.get(),
                operation,
                method,
                url,
                request_headers(token, data, accept=accept),
                data,
                attempt=attempt,
                seconds=self._remaining(deadline),
                follow=expect == "bytes",
                departure=departure,
                is_trusted=self.is_trusted,
                posts=posts,
            )
            if isinstance(answer, ConnectorError):
                failure = answer
                maybe_done = maybe_done or departure.at is not None
            elif 200 <= answer.status < 300:
                value = result(operation, expect, answer.content, posted=posts)
                if not isinstance(value, ConnectorError):
                    return value
                if not value.retryable:
                    raise value
                failure = value  # what was asked for did not arrive readable: tried again
            else:
                connector = not answer.redirected  # else the host a redirect led to
                maybe_done = maybe_done or departure.writes > 1
                if answer.status == 404 and method == "DELETE" and maybe_done:
                    log.info(
                        "connector %s answered 404 after an attempt that may have done it: done",
                        operation,
                    )
                    return None
                maybe_done = maybe_done or answer.status in (502, 504)
                if answer.status == 401 and connector and token is not None and rejected is None:
                    # The token was rejected (revoked, rotated secret): one fresh token, once.
                    rejected = token
                    continue
                failure = error_from_response(
                    operation,
                    answer.status,
                    answer.headers,
                    answer.content,
                    secrets=(token or "",),
                    redirected=answer.redirected,
                )
                if answer.status == 429 and connector:
                    self.pacer.throttled(scope, failure.retry_after, granted, departure.at)
                if answer.status not in RETRY_STATUSES:
                    raise failure
            failures += 1
            delay = failure.retry_after or 0.0
            if delay < policy.base_delay:
                # None given, 0, or a moment (an HTTP-date about now): retried that soon, a
                # 429 would come straight back, each one cutting the tenant's rate.
                delay = max(delay, policy.backoff(failures))
            if failures >= policy.max_attempts or self._clock() + delay > deadline - reserve:
                raise failure
            await self._sleep(delay)

    def _require_trusted(self, operation: str, service_url: str) -> ServiceTarget:
        # Checked before any token is acquired or connection opened (docs/architecture.md,
        # trust model: never send the bot's token to a serviceUrl outside the trusted set).
        target = self.trusted_target(service_url)
        if target is not None:
            return target
        log.warning(
            "connector %s refused: untrusted serviceUrl host=%s",
            operation,
            host_for_log(service_url),
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

    def _departure(self, scope: Scope, granted: float) -> Departure:
        """When the next request leaves, told to the pacer as it happens (README, "Pacing")."""
        pacer = self.pacer

        def left(previous: float | None, at: float) -> None:
            pacer.left(scope, granted if previous is None else previous, at)

        return Departure(pacer.now, left)
