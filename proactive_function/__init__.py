"""Queue trigger on `%BOT_PROACTIVE_QUEUE%`: one proactive request per message.

Thin adapter: the body goes to shared.proactive, which delivers, requeues a copy with a
delay (throttled, transient, credentials or settings to fix, a reference still landing),
poisons at once what no retry can deliver, and reports every outcome; a Blob storage
failure is requeued with a backoff too. It raises only when even that copy cannot be
queued, so the host's redelivery and `maxDequeueCount` are kept for a queue outage.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.proactive import process_queue_message

log = logging.getLogger(__name__)


async def main(msg: func.QueueMessage) -> None:
    outcome = await process_queue_message(msg.get_body())
    log.info("queue message %s (attempt %d): %s", msg.id, msg.dequeue_count, outcome)
