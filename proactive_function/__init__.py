"""Queue trigger on `%BOT_PROACTIVE_QUEUE%`: one proactive request per message.

Thin adapter: the body goes to shared.proactive, which delivers, requeues a copy with a
delay (throttled, transient, credentials or settings to fix, a reference still landing),
poisons at once what no retry can deliver, and reports every outcome. Only a storage
outage raises, so the host's redelivery and `maxDequeueCount` are kept for that.
"""

from __future__ import annotations

import logging

import azure.functions as func

from app import runtime
from shared.proactive import process_queue_message

log = logging.getLogger(__name__)


async def main(msg: func.QueueMessage) -> None:
    outcome = await process_queue_message(msg.get_body(), runtime)
    log.info("queue message %s (attempt %d): %s", msg.id, msg.dequeue_count, outcome)
