"""Proactive delivery: one queue message, one send (DESIGN.md, "Proactive queue message").

This is the delivery core the proactive engine builds on. It sends to the two targets
that name one known conversation, `{"conversation": "<key>"}` (a stored reference) and
`{"reference": {...}}`, and keeps the store honest: a conversation the channel says is
gone is pruned, not retried. Anything that may succeed later (storage down, throttled or
transient Connector errors) raises, so the queue redelivers the message instead of
losing it. A message no retry can fix (malformed, an untrusted serviceUrl, an activity
the Connector refuses) goes to `<queue>-poison` at once with the reason, instead of
after five useless attempts. `user` and `broadcast` targets, idempotency by `id` and
delivery reports come with the proactive engine; until then such a request is refused
with a clear reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.activity import apply_conversation_reference, as_activity, conversation_key
from shared.config import Settings
from shared.connector import ConnectorError, ErrorKind
from shared.references import split_key
from shared.runtime import Runtime

logger = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The queue message is not a proactive request this bot can deliver."""


class Outcome(StrEnum):
    DELIVERED = "delivered"
    PRUNED = "pruned"  # the channel said the conversation is gone; its reference was removed
    UNKNOWN = "unknown"  # no stored reference for the conversation key
    POISONED = "poisoned"  # no retry can deliver it: moved to the poison queue with the reason


@dataclass(frozen=True, slots=True)
class ProactiveRequest:
    id: str
    key: str  # the conversation key ("<channelId>/<conversation.id>")
    reference: Mapping[str, Any] | None  # an explicit reference target
    activity: dict[str, Any]


# Activity types a bot may send to a conversation on its own initiative. Inbound-only types
# (invoke, conversationUpdate, ...) would only be refused by the Connector after a token and
# a round trip.
SENDABLE_TYPES = frozenset({"message", "typing", "event", "endOfConversation"})
# Where the activity goes is the reference's to decide, never the producer's: these fields of
# a producer's activity are dropped, then filled from the reference.
ADDRESSING_FIELDS = ("channelId", "serviceUrl", "conversation", "from", "recipient")
MAX_ID_CHARS = 1024
# A queue message is at most 64 KiB once base64-encoded, so this many bytes before encoding.
MAX_QUEUE_MESSAGE_BYTES = 48 * 1024


def parse_request(body: bytes | str) -> ProactiveRequest:
    """Validate a queue message body; raises InvalidRequest with a short reason.

    The content is either `activity` (an object; `type` defaults to message) or `text`
    (shorthand for a message with that text), never both: a request carrying both is
    ambiguous and refused. The activity's addressing fields (channelId, serviceUrl,
    conversation, from, recipient) always come from the target's reference.
    """
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the message is not JSON") from None
    if not isinstance(message, dict):
        raise InvalidRequest("the message is not a JSON object")
    request_id = message.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest(f"`id` must be a non-empty string of at most {MAX_ID_CHARS} chars")
    activity = _content(message.get("activity"), message.get("text"))

    target = message.get("to")
    if not isinstance(target, dict) or len(target) != 1:
        raise InvalidRequest("`to` must be an object with exactly one target")
    if "conversation" in target:
        try:
            split_key(target["conversation"])
        except ValueError:
            raise InvalidRequest(
                "`to.conversation` must be a conversation key '<channelId>/<conversation.id>'"
            ) from None
        return ProactiveRequest(request_id, target["conversation"], None, activity)
    if isinstance(target.get("reference"), dict):
        reference = target["reference"]
        conversation = reference.get("conversation")
        if (
            not _non_empty_string(reference.get("serviceUrl"))
            or not _non_empty_string(reference.get("channelId"))
            or not isinstance(conversation, dict)
            or not _non_empty_string(conversation.get("id"))
        ):
            raise InvalidRequest("`to.reference` needs serviceUrl, channelId and conversation.id")
        for account in ("bot", "user"):
            if not isinstance(reference.get(account), dict | None):
                raise InvalidRequest(f"`to.reference.{account}` must be an object")
        key = conversation_key(reference["channelId"], conversation["id"])
        return ProactiveRequest(request_id, key, reference, activity)
    kind = next(iter(target))
    if kind == "reference":
        raise InvalidRequest("`to.reference` must be an object")
    if kind in ("user", "broadcast"):
        raise InvalidRequest(f"`to.{kind}` is not supported by this version")
    raise InvalidRequest("`to` must name a conversation, reference, user or broadcast")


def _content(activity: Any, text: Any) -> dict[str, Any]:
    """The activity to send, from the request's `activity` or `text` (see parse_request)."""
    if activity is not None and text is not None:
        raise InvalidRequest("give either `activity` or `text`, not both")
    if activity is not None:
        if not isinstance(activity, dict):
            raise InvalidRequest("`activity` must be an object")
        outgoing = as_activity(activity)
        kind = outgoing["type"]
        if not isinstance(kind, str) or kind not in SENDABLE_TYPES:
            raise InvalidRequest(
                "`activity.type` must be one of " + ", ".join(sorted(SENDABLE_TYPES))
            )
        for name in ADDRESSING_FIELDS:
            outgoing.pop(name, None)
        return outgoing
    if isinstance(text, str) and text:
        return as_activity(text)
    if text is not None:
        raise InvalidRequest("`text` must be a non-empty string")
    raise InvalidRequest("one of `activity` (an object) or `text` is required")


def _non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


async def deliver(body: bytes | str, runtime: Runtime) -> Outcome:
    """Send one proactive request. Raises what a retry may fix (StoreError, ConnectorError)."""
    request = parse_request(body)
    reference = request.reference
    if reference is None:
        stored = await runtime.references.get(request.key)  # StoreError → redelivery
        if stored is None:
            logger.warning("proactive %r: no stored reference for %r", request.id, request.key)
            return Outcome.UNKNOWN
        reference = stored.reference

    activity = apply_conversation_reference(request.activity, reference)
    try:
        await runtime.connector.background().send_to_conversation(
            reference["serviceUrl"], reference["conversation"]["id"], activity
        )
    except ConnectorError as error:
        if error.kind is not ErrorKind.GONE:
            raise
        await runtime.references.delete(request.key)
        logger.info(
            "proactive %r: conversation %r is gone (%s); reference pruned",
            request.id,
            request.key,
            error.code or error.status,
        )
        return Outcome.PRUNED
    logger.info("proactive %r: delivered to %r", request.id, request.key)
    return Outcome.DELIVERED


Poison = Callable[[bytes | str, str], Awaitable[None]]


async def handle_queue_message(
    body: bytes | str, runtime: Runtime, *, poison: Poison | None = None
) -> Outcome:
    """Deliver one queue message; poison at once what no retry can deliver.

    Raises only what a retry may fix, so the host's redelivery (and, after
    `maxDequeueCount`, its own poisoning) is left to transient trouble.
    """
    try:
        return await deliver(body, runtime)
    except InvalidRequest as error:
        reason = f"invalid request: {error}"
    except ConnectorError as error:
        if error.retryable:
            raise
        reason = f"not deliverable: {error.kind} (status {error.status}, code {error.code})"
    if poison is None:
        await send_to_poison_queue(runtime.settings, body, reason)
    else:
        await poison(body, reason)
    logger.warning("proactive %r poisoned: %s", _request_id(body), reason)
    return Outcome.POISONED


def _request_id(body: bytes | str) -> str | None:
    """The request's `id` for the log, when there is a usable one (never any other content)."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id[:MAX_ID_CHARS] if isinstance(request_id, str) else None


def poison_message(body: bytes | str, reason: str) -> str:
    """The poison queue's copy: the request with `poisonReason` added (or the raw text).

    A request that is not a JSON object becomes ``{"poisonReason", "body"}``. When the copy
    would not fit in a queue message, the original text is kept unchanged instead (it fitted
    once, and a copy that cannot be queued would cost the request); the reason is in the log.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        message = None
    if isinstance(message, dict):
        copy: Any = {**message, "poisonReason": reason}
    else:
        copy = {"poisonReason": reason, "body": text}
    encoded = _compact_json(copy)
    if len(encoded.encode("utf-8")) <= MAX_QUEUE_MESSAGE_BYTES:
        return encoded
    return text


def _compact_json(value: Any) -> str:
    # Non-ASCII text stays as it is: \uXXXX escapes would make it up to three times longer.
    try:
        encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        encoded.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid as a JSON escape, not as UTF-8)
        encoded = json.dumps(value, separators=(",", ":"))
    return encoded


async def send_to_poison_queue(settings: Settings, body: bytes | str, reason: str) -> None:
    """Put a copy on `<BOT_PROACTIVE_QUEUE>-poison`, base64-encoded like the host's own."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.queue import TextBase64EncodePolicy

    from shared.storage import get_queue_service

    queue = get_queue_service(settings.storage).get_queue_client(
        f"{settings.proactive_queue}-poison", message_encode_policy=TextBase64EncodePolicy()
    )
    message = poison_message(body, reason)
    try:
        await queue.send_message(message)
    except ResourceNotFoundError:
        await queue.create_queue()
        await queue.send_message(message)
