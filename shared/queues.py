"""The proactive queue as the engine and producers use it: put (with a delay), poison, depth.

Messages are base64-encoded, as the Functions host expects of every queue message, and
never expire (only taking one removes it); a queue that does not exist yet is created on
first use. :class:`MemoryQueue` records what would have been sent, for unit tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.activity import strict_loads
from shared.config import POISON_SUFFIX, Settings

logger = logging.getLogger(__name__)

# A queue message is at most 64 KiB once base64-encoded, so this many bytes before encoding.
MAX_QUEUE_MESSAGE_BYTES = 48 * 1024
# The largest request a producer may enqueue: the engine adds its bookkeeping (and the
# poison queue a reason) to copies of it, which must still fit.
MAX_REQUEST_BYTES = MAX_QUEUE_MESSAGE_BYTES - 512
MAX_DELAY_SECONDS = 7 * 24 * 3600 - 60  # Azure's largest visibility timeout is 7 days
NEVER_EXPIRES = -1  # a message's time to live (Put Message `messagettl`): until it is taken


class QueueError(Exception):
    """A queue call failed, or its answer could not be read. The message names the queue,
    the operation and the status or the error's type, never the storage SDK's text (which
    may carry a SAS URL, the service's answer, or a token endpoint's)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MessageQueue(Protocol):
    async def put(self, text: str, *, delay: float = 0.0) -> None: ...

    async def poison(self, body: bytes | str, reason: str) -> None: ...

    async def depth(self) -> int | None: ...


class StorageQueue:
    """`queue_name` (default `BOT_PROACTIVE_QUEUE`) and its `-poison` queue on storage."""

    def __init__(self, settings: Settings, queue_name: str | None = None) -> None:
        self._settings = settings
        self.name = queue_name or settings.proactive_queue

    def check(self) -> None:
        """SettingsError now (no I/O) when the settings cannot reach the queue."""
        _queue_client(self._settings, self.name)

    async def put(self, text: str, *, delay: float = 0.0) -> None:
        await _send(self._settings, self.name, text, delay)

    async def poison(self, body: bytes | str, reason: str) -> None:
        await _send(
            self._settings, f"{self.name}{POISON_SUFFIX}", poison_message(body, reason), 0.0
        )

    async def depth(self) -> int | None:
        """About how many messages the queue holds, delayed ones included (None: unknown).

        The service's approximate count, never below the true one. Only a hint for flow
        control (shared/fanout.py): a queue that cannot say is treated as not full.
        """
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        from shared.storage import unreadable_answer

        queue = _queue_client(self._settings, self.name)
        try:
            properties = await queue.get_queue_properties()
        except ResourceNotFoundError:
            return 0
        except Exception as error:
            if not isinstance(error, AzureError) and not unreadable_answer(error):
                raise
            logger.warning("queue %r: depth unknown (%s)", self.name, type(error).__name__)
            return None
        return properties.approximate_message_count


@dataclass(slots=True)
class MemoryQueue:
    """What the engine put on the queue (text, delay) and poisoned (copy), in order."""

    sent: list[tuple[str, float]] = field(default_factory=list)
    poisoned: list[dict[str, Any]] = field(default_factory=list)

    async def put(self, text: str, *, delay: float = 0.0) -> None:
        if len(text.encode("utf-8")) > MAX_QUEUE_MESSAGE_BYTES:
            # Refused as the service (and Azurite) refuse it: 64 KiB once base64-encoded.
            raise ValueError("the message is larger than a queue message may be")
        self.sent.append((text, delay))

    async def poison(self, body: bytes | str, reason: str) -> None:
        self.poisoned.append(json.loads(poison_message(body, reason)))

    async def depth(self) -> int | None:
        return len(self.sent)  # put and not taken yet

    def take(self) -> list[tuple[str, float]]:
        sent, self.sent = self.sent, []
        return sent


def _queue_client(settings: Settings, queue_name: str) -> Any:
    from azure.storage.queue import TextBase64EncodePolicy

    from shared.storage import get_queue_service

    return get_queue_service(settings.storage).get_queue_client(
        queue_name, message_encode_policy=TextBase64EncodePolicy()
    )


async def _send(settings: Settings, queue_name: str, text: str, delay: float) -> None:
    from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

    from shared.storage import unreadable_answer

    queue = _queue_client(settings, queue_name)
    visibility = min(MAX_DELAY_SECONDS, max(0, math.ceil(delay))) or None
    # Never expires: the service's default time to live (7 days from the put) would delete
    # a message delayed nearly that long a minute after it became visible, unprocessed
    # and unreported, and a poison copy before an operator looked.
    options = {"visibility_timeout": visibility, "time_to_live": NEVER_EXPIRES}
    try:
        try:
            await queue.send_message(text, **options)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):  # created meanwhile by another
                await queue.create_queue()
            await queue.send_message(text, **options)
    except Exception as error:
        # Any other error as it is: the SDK's UnicodeEncodeError (text it cannot encode)
        # was raised before anything was sent, and the producer counts it as refused.
        if not isinstance(error, AzureError | OSError) and not unreadable_answer(error):
            raise
        raise _queue_error(queue_name, error) from None


class QueueAuthFailed(QueueError):
    """Storage was given no credential for the queue, or refused it: a setting to fix,
    not an outage."""


def _queue_error(queue_name: str, error: BaseException) -> QueueError:
    from shared.references.contract import refused_credential, storage_auth_message
    from shared.storage import storage_error_code, unreadable_answer, unreadable_message

    where = f"queue {queue_name!r}: put"
    if unreadable_answer(error):
        # The put was answered (with a success status, or its body would be an error's):
        # it may well have landed. No status: not an HTTP failure.
        return QueueError(unreadable_message(where, error))
    status = getattr(error, "status_code", None)
    if refused_credential(error):
        return QueueAuthFailed(storage_auth_message(where, error), status=status)
    if status is not None:
        code = storage_error_code(error)
        shown = f" {code}" if code else ""
        return QueueError(f"{where} failed: HTTP {status}{shown}", status=status)
    return QueueError(f"{where} failed: storage unreachable ({type(error).__name__})")


def text_as_it_came(body: bytes | str) -> str | None:
    """A queue message's `body` as text, exactly: None for bytes that are not UTF-8 (their
    text, decoded with U+FFFD for what is not, would be another message)."""
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def json_object(body: bytes | str, *, exact: bool = False) -> dict[str, Any] | None:
    """The JSON object a queue message's `body` holds (bytes in any encoding json reads:
    UTF-8, -16 or -32), or None. `exact`: None too when written out again it would not
    read as it came: a name given twice (the last one kept), a number no float or int here
    holds as written (NaN, the infinities, 1e999, over 4,300 digits)."""
    try:
        found = strict_loads(body) if exact else json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def json_fields(body: bytes | str) -> dict[str, Any] | None:
    """The JSON object a queue message holds, read for its names, strings and flags only
    (a request's id, its target): numbers are not read, so one Python cannot read (over
    4,300 digits) does not hide the id its report is written under."""
    try:
        found = json.loads(
            body, parse_int=_a_number, parse_float=_a_number, parse_constant=_a_number
        )
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


class _Number:
    """A number json_fields leaves unread: never taken for text (an `id` of 7 is no "7")."""


_NUMBER = _Number()


def _a_number(_text: str) -> _Number:
    return _NUMBER


def poison_message(body: bytes | str, reason: str) -> str:
    """The poison queue's copy: the request with `poisonReason` added (or the raw text).

    A request that is not a JSON object becomes ``{"poisonReason", "body"}``. When the copy
    would not fit in a queue message, the reason is cut short until it does; failing that,
    the original text is kept unchanged instead (it fitted
    once, and a copy that cannot be queued would cost the request); the reason is in the log.
    Bytes json reads as UTF-16 or -32 are read so; written as UTF-8 they may no longer fit,
    and their text is not the original: then the copy keeps as much of the request as
    fits, with ``bodyCut``.
    """
    as_it_came = text_as_it_came(body)
    text = as_it_came if as_it_came is not None else body.decode("utf-8", "replace")
    # A request written out again only when it reads back as it came; else kept as text.
    message = json_object(body, exact=True)
    if message is not None:
        copy: Any = {**message, "poisonReason": reason}
    else:
        copy = {"poisonReason": reason, "body": text}
    encoded = compact_json(copy)
    if len(encoded.encode("utf-8")) <= MAX_QUEUE_MESSAGE_BYTES:
        return encoded
    if message is not None:
        # The reason cut short rather than dropped: a copy without one, put back as it is,
        # is no retry (the engine finds the target failed and sends nothing).
        cut = reason
        while len(cut) > 40:
            cut = cut[: len(cut) * 3 // 4]
            encoded = compact_json({**message, "poisonReason": f"{cut}..."})
            if len(encoded.encode("utf-8")) <= MAX_QUEUE_MESSAGE_BYTES:
                return encoded
    if as_it_came is not None and len(as_it_came.encode("utf-8")) <= MAX_QUEUE_MESSAGE_BYTES:
        return as_it_came
    kept = compact_json(message) if message is not None else text
    reason = reason[:1000]  # with an empty body, the copy then fits whatever the reason
    while True:  # escapes make the JSON longer than the text: cut until it fits
        kept = kept[: len(kept) * 9 // 10]
        copy = compact_json({"poisonReason": reason, "body": kept, "bodyCut": True})
        if len(copy.encode("utf-8")) <= MAX_QUEUE_MESSAGE_BYTES:
            return copy


def compact_json(value: Any, *, allow_nan: bool = True) -> str:
    """`value` as compact JSON. `allow_nan=False`: ValueError for NaN and the infinities,
    which json writes as `NaN`/`Infinity`, text no JSON parser but Python's accepts."""
    # Non-ASCII text stays as it is: \uXXXX escapes would make it up to three times longer.
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=allow_nan)
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid as a JSON escape, not as UTF-8)
        # Only the surrogates escaped: the whole text in \uXXXX escapes would no longer
        # fit in a queue message the request (or a copy of it) fitted in.
        encoded = _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", encoded)
    return encoded


_SURROGATE = re.compile("[\ud800-\udfff]")


def earlier_json(value: Any) -> bytes:
    """`value` as compact JSON in UTF-8 as earlier versions wrote it: with a lone surrogate
    in it, all of its text in \\uXXXX escapes (compact_json escapes the surrogates alone)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def request_size(value: Any) -> int:
    """`value`'s size as JSON in bytes, as a request's size is judged: as earlier versions
    wrote it (:func:`earlier_json`), so that no instance still running one refuses, as too
    large, a request (or a child, or a copy of one) an instance of this version accepted.
    Its text, compact_json's, is never larger."""
    return len(earlier_json(value))


def cut_json(text: str, max_bytes: int, suffix: str = "") -> str:
    """`text` cut short, `suffix` after it, to at most `max_bytes` bytes as JSON in UTF-8
    (as compact_json writes it); `text` as it is when that fits. Cut again, it stays."""
    while len(compact_json(text + suffix).encode("utf-8")) > max_bytes and text:
        text = text[: len(text) * 9 // 10]
    return text + suffix
