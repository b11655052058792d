"""Queue trigger on `%BOT_PROACTIVE_QUEUE%`: one proactive request per message.

Thin adapter: the body goes to shared.proactive, which delivers, requeues a copy with a
delay (throttled, transient, credentials or settings to fix, a reference still landing),
poisons at once what no retry can deliver, and reports every outcome; a Blob storage
failure is requeued with a backoff too. It raises only when even that copy cannot be
queued, so the host's redelivery and `maxDequeueCount` are kept for a queue outage.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import azure.functions as func

from app import runtime
from shared.proactive import process_queue_message

log = logging.getLogger(__name__)


# The app setting the host reads over host.json's value (its configuration keys are
# case-insensitive, `__` separating the levels).
HOST_OVERRIDE = "AzureFunctionsJobHost__extensions__queues__maxDequeueCount"
_WHOLE_NUMBER = re.compile(r"\s*\+?[0-9]{1,9}\s*")


def max_dequeue_count() -> int:
    """The host's `maxDequeueCount`: the app setting `HOST_OVERRIDE` when it is a positive
    whole number, else host.json's (the host's default, 5, when neither is set)."""
    wanted = HOST_OVERRIDE.lower()
    for name, value in os.environ.items():
        if name.lower() == wanted and _WHOLE_NUMBER.fullmatch(value) and int(value) > 0:
            return int(value)
    return _host_json_max_dequeue_count()


HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


@functools.cache
def _host_json_max_dequeue_count(path: Path = HOST_JSON) -> int:
    try:
        document = json.loads(path.read_text("utf-8-sig"))  # a BOM, as the host allows
        queues = _setting(_setting(document, "extensions"), "queues")
        return int(_setting(queues, "maxDequeueCount"))
    except (OSError, ValueError, KeyError, TypeError):
        return 5


def _setting(section: Any, name: str) -> Any:
    """A host.json key in any case, as the host reads it (.NET configuration, flattened
    leaf by leaf): of keys that differ only in case the last wins, sections merge."""
    if not isinstance(section, dict):
        raise TypeError(name)
    found = [value for key, value in section.items() if key.lower() == name.lower()]
    if not found:
        raise KeyError(name)
    if all(isinstance(value, dict) for value in found):
        return {key: value for part in found for key, value in part.items()}
    return found[-1]


async def main(msg: func.QueueMessage) -> None:
    final = (msg.dequeue_count or 0) >= max_dequeue_count()
    outcome = await process_queue_message(
        msg.get_body(),
        runtime,
        final_attempt=final,
        message_id=msg.id,
        redelivered=(msg.dequeue_count or 0) > 1,
    )
    # DEBUG: the engine's own line (request id, target, outcome) is the one an operator reads.
    log.debug("queue message %s (attempt %d): %s", msg.id, msg.dequeue_count, outcome)
