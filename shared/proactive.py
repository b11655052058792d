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


def parse_request(body: bytes | str) -> ProactiveRequest:
    """Validate a queue message body; raises InvalidRequest with a short reason."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the message is not JSON") from None
    if not isinstance(message, dict):
        raise InvalidRequest("the message is not a JSON object")
    request_id = message.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequest("`id` must be a non-empty string")

    if isinstance(message.get("activity"), dict):
        activity = as_activity(message["activity"])
    elif isinstance(message.get("text"), str) and message["text"]:
        activity = as_activity(message["text"])
    else:
        raise InvalidRequest("one of `activity` (an object) or `text` is required")

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
            not isinstance(reference.get("serviceUrl"), str)
            or not isinstance(reference.get("channelId"), str)
            or not isinstance(conversation, dict)
            or not isinstance(conversation.get("id"), str)
        ):
            raise InvalidRequest("`to.reference` needs serviceUrl, channelId and conversation.id")
        key = conversation_key(reference["channelId"], conversation["id"])
        return ProactiveRequest(request_id, key, reference, activity)
    kind = next(iter(target))
    if kind in ("user", "broadcast"):
        raise InvalidRequest(f"`to.{kind}` is not supported by this version")
    raise InvalidRequest("`to` must name a conversation, reference, user or broadcast")


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
    logger.warning("proactive message poisoned: %s", reason)
    return Outcome.POISONED


def poison_message(body: bytes | str, reason: str) -> str:
    """The poison queue's copy: the request with `poisonReason` added (or the raw text)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if isinstance(message, dict):
        return json.dumps({**message, "poisonReason": reason})
    return json.dumps({"poisonReason": reason, "body": text})


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
