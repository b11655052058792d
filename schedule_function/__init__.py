"""Timer trigger (`%BOT_SCHEDULE%`): scheduled proactive sends, which it only enqueues.

Each run enqueues every schedule document's due times since its last run (see
shared/schedules.py), with ids that are the same for the same due time, so an
overlapping, retried or past-due run never sends twice. Delivery always goes through
the proactive queue, so every scheduled send gets its retries, reports and poison handling.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.schedules import run_timer

log = logging.getLogger(__name__)


async def main(timer: func.TimerRequest) -> None:
    # Storage settings only (as a producer's): a bot credential mistake must not stop
    # the schedules, whose sends then wait on the queue until it is fixed.
    from shared.producer import producer_settings
    from shared.queues import QueueAuthFailed, QueueError
    from shared.references.contract import StorageAuthFailed, StoreError

    try:
        enqueued = await run_timer(producer_settings())
    except (StorageAuthFailed, QueueAuthFailed):
        raise  # a credential to fix, not an outage: the host records the run as failed
    except (StoreError, QueueError) as error:
        # Storage unreachable, or its answer unreadable: one line that says so (their text
        # names no secret, nor quotes the answer), not a traceback a minute. Nothing is
        # lost: the next run enqueues what was due since.
        log.error("schedules: not run, the next run catches up: %s", error)
        return
    # Most minutes nothing is due, and the host already logs every run.
    level = logging.INFO if enqueued or timer.past_due else logging.DEBUG
    log.log(
        level,
        "schedules: %d due send(s) enqueued%s",
        len(enqueued),
        " (past due)" if timer.past_due else "",
    )
