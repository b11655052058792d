"""Queue trigger: one proactive send request per message (DESIGN.md, "Proactive queue message").

Thin adapter: the message body goes to the proactive engine in `shared`.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

log = logging.getLogger(__name__)


async def main(msg: func.QueueMessage) -> None:
    # Placeholder until the proactive engine lands: it accepts only JSON objects, so a
    # malformed message fails (and the host retries, then poisons it) instead of vanishing.
    request = json.loads(msg.get_body())
    if not isinstance(request, dict):
        raise ValueError("a proactive request must be a JSON object")
    log.info(
        "proactive request %s received (queue message %s, attempt %d)",
        request.get("id"),
        msg.id,
        msg.dequeue_count,
    )
