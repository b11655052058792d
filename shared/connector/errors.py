"""The Connector's error model: :class:`ConnectorError`, what each answer means, and
:class:`RetryPolicy`, how long a transient failure is retried.

Every failed call is a ConnectorError whose ``kind`` says what the caller should do
(retry later, prune the conversation, fix a setting, give up), classified per the Teams
error table from the status and whichever error body shape the service answered with;
service text is kept short, on one line, with tokens removed.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

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

MAX_RETRY_AFTER = 3600.0  # a longer Retry-After is reported as this (callers requeue)
_MAX_MESSAGE_CHARS = 300
_MAX_CODE_CHARS = 100


class ErrorKind(StrEnum):
    THROTTLED = "throttled"  # 429: retry after retry_after
    # 412, 502, 503, 504, connection errors before a message's POST was written (and any
    # for a request that posts no message): retry later
    TRANSIENT = "transient"
    GONE = "gone"  # the bot can no longer reach this conversation: prune, do not retry
    INVALID = "invalid"  # the request is wrong: do not retry
    UNTRUSTED = "untrusted"  # serviceUrl outside the trusted set: nothing was sent
    # 500 and other unexpected 5xx, or a message's POST left without an answer after it was
    # written (timed out, connection dropped): the service may have acted (a message may be
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
    def no_token(self) -> bool:
        """The call failed for want of the bot's token: Entra ID refused it or could not
        give one (``setting`` names what to check), or not in time. Every call fails
        alike meanwhile."""
        return self.setting is not None or (self.code == "TokenTimeout" and self.status is None)

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT)

    @property
    def terminal(self) -> bool:
        return self.kind is ErrorKind.GONE


def error_from_response(
    operation: str,
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    secrets: Sequence[str] = (),
    redirected: bool = False,
) -> ConnectorError:
    """The ConnectorError for a non-2xx answer, classified per the Teams error table.

    ``secrets`` (the token that was sent) are removed should the service echo them.
    ``redirected``: the answer came from where a redirect led (an attachment's bytes), not
    from the Connector; a refusal there is ``invalid`` and names no setting (the bot's token
    was not sent there), and only its throttling and transient statuses are retried.
    """
    code, message, teams_code = parse_error_body(content, secrets)
    kind = classify(status, code, teams_code)
    if redirected:
        if kind not in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT, ErrorKind.UNCERTAIN):
            kind = ErrorKind.INVALID
        message = f"the host it was redirected to answered: {message or f'HTTP {status}'}"
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
    except (ValueError, RecursionError):
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
        except (ValueError, RecursionError):
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


# --- how long to retry -------------------------------------------------------------


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


def budget_spent(operation: str) -> ConnectorError:
    """A request whose deadline ran out before anything was sent (safe to retry)."""
    return ConnectorError(
        ErrorKind.TRANSIENT, "the time budget was spent; nothing was sent", operation=operation
    )
