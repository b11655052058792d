"""Timer trigger (`%BOT_SCHEDULE%`): scheduled proactive sends, which it only enqueues.

Each run enqueues every schedule document's due times since its last run (see
shared/schedules.py), with ids that are the same for the same due time, so an
overlapping, retried or past-due run never sends twice. Delivery always goes through
the proactive queue, so every scheduled send gets its retries, reports and poison handling.
"""

from __future__ import annotations

import logging

import azure.functions as func

from app import runtime
from shared.schedules import run_timer

log = logging.getLogger(__name__)


async def main(timer: func.TimerRequest) -> None:
    enqueued = await run_timer(runtime().settings)
    log.info(
        "schedules: %d due send(s) enqueued%s",
        len(enqueued),
        " (past due)" if timer.past_due else "",
    )
