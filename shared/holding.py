"""Queue messages kept while the app settings are unusable.

The proactive trigger runs on the storage settings alone; when the rest of the app's
settings do not validate (a missing MicrosoftAppId, say), a message must neither be sent
nor drained into the poison queue by the host's retries: :func:`hold_for_settings` puts
it back with a capped backoff, counting its attempts in the engine's field but not its
age (docs/proactive.md). What the engine would refuse with no report to write (not UTF-8
text nor JSON; JSON in UTF-16 or -32 too large once written as UTF-8) is poisoned at
once with its reason; anything else the engine judges, and reports, once the settings
work.
"""

from __future__ import annotations

import logging
import random

from shared.config import Settings
from shared.delivery import Outcome
from shared.engine import LONGEST_HOLD, settings_backoff
from shared.logs import log_repeated
from shared.proactive_schema import (
    RESERVED,
    InvalidRequest,
    carried,
    claim_marks,
    kept_identity,
    parse_request,
    retry_token,
)
from shared.queues import (
    MAX_QUEUE_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    MessageQueue,
    StorageQueue,
    compact_json,
    json_object,
    text_as_it_came,
)

logger = logging.getLogger(__name__)


async def hold_for_settings(
    body: bytes | str,
    error: Exception,
    *,
    queue: MessageQueue | None = None,
    redelivered: str | None = None,
    message_id: str | None = None,
) -> Outcome:
    """Put the message back with a capped backoff: a settings mistake must not drain the
    queue into the poison queue (the host's dequeue budget is not touched either).
    `redelivered`: the host's id of the message when this is a redelivery (an earlier
    attempt may have kept its target's claim): the held copy goes on as that message
    (`claimedBy`, as a copy kept for storage does). `message_id`: the host's id of the
    message, on any attempt: a copy held for an operator's retry names the retry
    (`retryOf`), as the engine's own copies do.

    Needs only the storage settings (the trigger itself runs on them).
    """
    if queue is None:
        queue = _holding_queue()
    as_it_came = text_as_it_came(body)
    try:
        message = parse_request(body).message  # read as the engine reads it
    except InvalidRequest as invalid:
        reason = f"invalid request: {invalid}"
        if as_it_came is not None:
            text = as_it_came
        elif (readable := json_object(body)) is not None:
            text = compact_json(readable)  # UTF-16 or -32 JSON: held as the JSON it is
        else:
            # Nor JSON: held as text, it would have U+FFFD in it, maybe a valid request.
            # Refused now, as the engine would (no id to report under).
            return await _poison_held(queue, body, reason)
        # Kept as it came, to be refused once the settings work (its report needs them);
        # with nowhere to count its attempts, held for the longest backoff.
        attempt = LONGEST_HOLD
    else:
        reason = f"invalid request: larger than {MAX_REQUEST_BYTES} bytes as JSON"
        engine_field = dict(message.get(RESERVED) or {})
        attempt = engine_field.get("attempt", 0)
        identity = kept_identity(
            message, redelivered, redelivered=redelivered is not None, records=False
        )
        engine_field.pop("claimedBy", None)
        engine_field.pop("claimedRetry", None)
        engine_field.update(claim_marks(message, identity))
        token = retry_token(message, identity or message_id)
        if token is not None:
            if "poisonReason" in message and engine_field.get("outcome") == "failed":
                # An operator's retry of a kept failure: set aside, as the engine sets it
                # aside (else the held copy would read as a new retry of its own).
                engine_field.pop("outcome")
                engine_field.pop("reason", None)
            engine_field["retryOf"] = token
        # Held for the settings: not the message's age (see Engine.requeue's `held`).
        text = compact_json(
            {**carried(message), RESERVED: {**engine_field, "attempt": attempt + 1, "since": None}}
        )
    if len(text.encode("utf-8")) > MAX_QUEUE_MESSAGE_BYTES:
        if as_it_came is None or len(as_it_came.encode()) > MAX_QUEUE_MESSAGE_BYTES:
            # Written as UTF-8 (it came as UTF-16 or -32), too large for a queue message:
            # the engine would refuse it too, so refused now, not lost to a failing put.
            return await _poison_held(queue, body, reason)
        # The held copy's bookkeeping made it too large: the message goes back as it came,
        # to be judged (and reported) once the settings work.
        text, attempt = as_it_came, LONGEST_HOLD
    delay = settings_backoff(attempt) * (1 + 0.2 * random.random())
    await queue.put(text, delay=delay)
    # SettingsError messages name the setting and never carry a value.
    log_repeated(
        logger,
        logging.WARNING,
        f"held for settings: {error}",
        "proactive: the app settings are not usable (%s); message kept, retried in %.0f s",
        error,
        delay,
    )
    return Outcome.REQUEUED


async def _poison_held(queue: MessageQueue, body: bytes | str, reason: str) -> Outcome:
    await queue.poison(body, reason)
    logger.warning("proactive: a message was poisoned while holding: %s", reason)
    return Outcome.POISONED


def _holding_queue() -> StorageQueue:
    """The trigger's own queue from the two settings it runs on, and nothing else: any
    other setting (the container's name included) may be the one that is broken."""
    import os

    from shared.config import StorageSettings, _storage_name

    name = os.environ.get("BOT_PROACTIVE_QUEUE", "").strip() or "proactive-messages"
    settings = Settings(
        storage=StorageSettings.from_env(os.environ),
        proactive_queue=_storage_name("BOT_PROACTIVE_QUEUE", name),
        allow_unauthenticated=True,  # unused: holding a message sends nothing
    )
    return StorageQueue(settings)
