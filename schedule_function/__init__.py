"""Timer trigger (`%BOT_SCHEDULE%`): scheduled proactive sends, which it only enqueues.

Delivery always goes through the proactive queue, so every scheduled send gets the
queue's retries and poison handling.
"""

from __future__ import annotations

import logging

import azure.functions as func

log = logging.getLogger(__name__)


async def main(timer: func.TimerRequest) -> None:
    # Placeholder until the proactive engine lands: it records that the schedule fired.
    log.info("schedule fired%s", " (past due)" if timer.past_due else "")
