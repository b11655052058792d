"""Queue trigger on `%BOT_PROACTIVE_QUEUE%`: one proactive send request per message.

Thin adapter: the body goes to shared.proactive. What no retry can deliver is poisoned at
once there; an exception (storage down, throttled) makes the host redeliver the message,
and poison it after `maxDequeueCount` attempts, so nothing is lost.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.proactive import handle_queue_message
from shared.runtime import get_runtime

log = logging.getLogger(__name__)


async def main(msg: func.QueueMessage) -> None:
    outcome = await handle_queue_message(msg.get_body(), get_runtime())
    log.info("queue message %s (attempt %d): %s", msg.id, msg.dequeue_count, outcome)
