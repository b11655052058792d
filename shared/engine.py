"""The proactive engine's working parts: the runtime, the bookkeeping, the queue, its clock.

:class:`Engine` is what the queue trigger (shared/proactive.py) and the fan-out
(shared/fanout.py) work with, and how a copy of a request goes back on the queue.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared.delivery import Outcome, Parts
from shared.ledger import BlobLedger, Ledger, iso
from shared.proactive_schema import RESERVED, ProactiveRequest, carried, retry_token
from shared.queues import MessageQueue, StorageQueue, compact_json
from shared.reports import Final, report_reason, started_name


@dataclass(slots=True)
class Engine:
    """What the queue trigger works with: the runtime, the bookkeeping store, the queue."""

    runtime: Parts
    ledger: Ledger
    queue: MessageQueue
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    max_age: float = 3600.0  # throttled / transient requeues stop after this long
    unknown_window: float = 60.0  # an unknown conversation key is retried this long
    claim_seconds: float = 45.0
    fanout_page_size: int = 250
    fanout_seconds: float = 20.0  # one invocation fans out at most this long, then continues
    fanout_parallel: int = 32
    # A broadcast adds no page while this many of its children are queued (shared/fanout.py).
    fanout_backlog: int = 1000
    # The host's id of the queue message being handled (its redeliveries share it; a copy
    # the engine puts back is a new message): written into the claims it takes.
    message_id: str | None = None
    # The host delivers that message again (its dequeueCount above 1): an earlier attempt
    # may have claimed its target and died after the send began.
    redelivered: bool = False
    # The host's id of the message as delivered, which `message_id` is not for a copy kept
    # to go on as another message (`claimedBy`): the message the host gives up on.
    delivered_as: str | None = None

    @classmethod
    def for_runtime(cls, runtime: Parts) -> Engine:
        settings = runtime.settings
        return cls(
            runtime,
            BlobLedger(settings),
            StorageQueue(settings),
            max_age=settings.proactive_max_age,
            claim_seconds=settings.proactive_claim_seconds,
        )

    def jitter(self, delay: float) -> float:
        """Spread requeued copies so a burst does not come back all at once."""
        return delay * (1 + 0.2 * self.rand()) + self.rand()

    async def requeue(
        self,
        request: ProactiveRequest,
        delay: float,
        *,
        count: bool = True,
        mark: bool = True,
        age: bool = True,
        held: bool = False,
        unrecorded: tuple[Final, str | None] | None = None,
        keep_reference: bool = False,
        resumed: bool = False,
    ) -> Outcome:
        """Put a copy back with a visibility delay; the original then completes normally.

        `count`: an attempt (it drives backoff). `age`: start the request's age, which
        bounds how long it is requeued, if it has none yet. `held`: kept for the bot's own
        credentials or storage, a wait that is not the message's to spend: its age is
        cleared, and starts again at its next throttled or failing send. `unrecorded`: the
        target's outcome (and reason) that storage refused to record; the copy records it
        on arrival and sends nothing. `keep_reference`: a counted copy of a broadcast child
        still carries its reference (nothing was sent: the pacer held it back).
        `resumed`: the copy waits out a claim its message's earlier attempt kept after its
        send began (it says so; a copy that finds its own claim again reports it).
        """
        now = self.clock()
        engine = request.engine
        since = None if held else engine.since
        if since is None and age and not held:
            since = now
        bookkeeping = replace(
            engine,
            attempt=engine.attempt + (1 if count else 0),
            since=since,
            # Every copy of an operator's retry is that retry (its token), whichever queue
            # message it is: none retries the failure another one recorded.
            retry_of=retry_token(request.message, self.message_id),
        )
        if count and bookkeeping.reference is not None and not keep_reference:
            # A broadcast child tried and put back (throttled, for up to `max_age`) reads the
            # conversation's reference again: it may have moved to another serviceUrl, or gone.
            bookkeeping = replace(bookkeeping, reference=None)
        if resumed:
            # A message of its own: it takes the kept claim over once it has ended.
            bookkeeping = replace(
                bookkeeping,
                resumed=True,
                resumed_retry="poisonReason" in request.message,
                claimed_by=None,
                claimed_retry=False,
            )
        if unrecorded is not None:
            # Its `poisonReason` is dropped below: one found on it later is an operator's.
            bookkeeping = replace(
                bookkeeping,
                outcome=unrecorded[0],
                reason=None if unrecorded[1] is None else report_reason(unrecorded[1]),
                resumed_retry=False,
            )
        # An operator's retry keeps its `poisonReason` until it has an outcome again; a copy
        # kept to record its outcome has one (and must not read as an operator's retry).
        copy = {**carried(request.message), RESERVED: bookkeeping.to_json()}
        if unrecorded is not None:
            copy.pop("poisonReason", None)
        if mark and count and not engine.child and request.broadcast is None:
            await self.ledger.create(started_name(request.id), {"at": iso(now)})  # "running"
        # Written after the mark: a failure before the put leaves only the original, which
        # the host redelivers; never a copy and a raise (two copies) for one failure.
        await self.queue.put(compact_json(copy), delay=delay)
        return Outcome.REQUEUED

    def age(self, request: ProactiveRequest) -> float:
        since = request.engine.since
        return 0.0 if since is None else max(0.0, self.clock() - since)


LONGEST_HOLD = 5  # attempts after which settings_backoff waits its longest (600 s)


def settings_backoff(attempt: int) -> float:
    """5, 15, 45, 135, 405, then every 600 s (each spread by up to a fifth more, plus up to
    a second): a fixed setting is picked up within about 12 min."""
    return min(600.0, 5.0 * 3 ** min(attempt, 10))
