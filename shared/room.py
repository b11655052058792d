"""The room before a tenant's background line (``Pacer.admission``; README, "Pacing").

The Functions host gives each instance a fixed number of invocations, and one tenant
spread over many instances gets a small share of its rate on each: a line holding every
invocation would be longer than a send may wait for its slot (the Connector client's
budget), and the sends at its end would time out and be requeued as throttled, again and
again. So a broadcast's request first waits here, holding nothing (no claim, no slot, no
queue call), in order, and is let out while the line would take it in time: those in the
line count, and so do those let out before it that have not joined the line yet (their
first background acquire for the lane, in the task the room let out; shared/ratelimit.py
calls :func:`joining_line` there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from shared.tenant_rate import AdaptiveRate

# As the proactive engine uses the room: a broadcast's request is let out while its line
# would take it within the wait a send may spend for its slot less ROOM_MARGIN (its
# claim's storage calls, a late wake-up), and waits for ROOM_SECONDS at most before it is
# put back on the queue. Simulated (tests/unit/test_ratelimit.py,
# `broadcast_through_instances`, one tenant at 50/s, 5,000 messages, five seeds): 16
# instances requeued 3,565-3,681 sends that had waited 7 s for a slot in vain, at 85-87 %
# of the limit; with the room and 10 s, 118-123 such (the first seconds, every instance
# starting at the whole limit) and 669-740 put-backs, at 86-89 %. A longer stay puts fewer
# back but ends later (three seeds; 15 s: 133-174, 83-85 %; 30 s: 0-5, 83-84 %): at the
# end of a broadcast each instance works through its own room at its share, where a
# message put back goes to whichever instance has room. 8 instances (three seeds):
# 611-668 timeouts at 89-90 %; with the room 0-2 and no put-back, at 89 %. Up to 4
# nothing changes: a line holding all of an instance's 48 stays under 5 s.
ROOM_MARGIN = 2.0
ROOM_SECONDS = 10.0
ROUNDING = 1e-9  # seconds: a wait this short is none

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


def room_within(slot_wait: float) -> float:
    """How long a line may hold a request let out of the room, for sends that wait at most
    ``slot_wait`` for their slot (half of it when that is short: a test's quick budget)."""
    return max(slot_wait - ROOM_MARGIN, slot_wait / 2)


@dataclass(slots=True)
class _LetOut:
    """A request let out of its lane's room, until it joins the line."""

    lane: AdaptiveRate
    waiting: bool = True

    def joined(self) -> None:
        if self.waiting:
            self.waiting = False
            self.lane.joining -= 1


# The request the running task's admission let out, if any.
_LET_OUT: ContextVar[_LetOut | None] = ContextVar("let_out", default=None)


def joining_line(lane: AdaptiveRate) -> None:
    """A background request joins ``lane``'s line: if the room let it out (this task's),
    it is counted in the line from now on, no longer as on its way."""
    let_out = _LET_OUT.get()
    if let_out is not None and let_out.lane is lane:
        let_out.joined()


@asynccontextmanager
async def admission(
    lane: AdaptiveRate, within: float, max_wait: float, *, clock: Clock, sleep: Sleep
) -> AsyncIterator[float]:
    """Wait in ``lane``'s room until a background request let out now would wait no longer
    than ``within`` seconds in its line, for ``max_wait`` at most (on ``clock``, sleeping
    with ``sleep``). Yields 0.0 when it was let out, else about how long its line would
    hold it. The request it lets out counts as ahead of the next ones from then on: until
    it joins the line, then as one in the line."""
    if not await _let_out(lane, within, max_wait, clock, sleep):
        yield max(lane.admission_seconds(clock()), within)
        return
    let_out = _LetOut(lane)
    lane.joining += 1
    token = _LET_OUT.set(let_out)
    try:
        yield 0.0
    finally:
        let_out.joined()  # if it never did (its target settled, a failure before)
        # Last: it raises when the block ends in another context (a task destroyed
        # while pending), and the count must be released all the same.
        _LET_OUT.reset(token)


async def _let_out(
    lane: AdaptiveRate, within: float, max_wait: float, clock: Clock, sleep: Sleep
) -> bool:
    def wait_time(now: float) -> float:
        if not (lane.joining or lane.waiting):
            return 0.0  # nothing ahead: the line alone bounds its wait
        wait = lane.admission_seconds(now) - within
        # A wait left over from rounding (1e-15 s) would be slept without end on a clock
        # where now + wait == now.
        return wait if wait > ROUNDING else 0.0

    room = lane.room
    if not room and wait_time(clock()) <= 0:
        return True
    deadline = clock() + max_wait
    turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    room.append(turn)  # in order: only the one at the head is let out
    if room[0] is turn:
        turn.set_result(None)
    try:
        while True:  # till the deadline even when it will not do: never at once
            now = clock()
            if now >= deadline:
                return False
            if not turn.done():
                await _first(turn, deadline - now, sleep)
                continue
            wait = wait_time(now)
            if wait <= 0:
                return True
            await sleep(min(wait, deadline - now))
    finally:
        head = room[0] is turn
        room.remove(turn)
        if head and room:
            room[0].set_result(None)  # the next one's turn at the head


async def _first(turn: asyncio.Future[None], seconds: float, sleep: Sleep) -> None:
    """Until ``turn`` is done or ``seconds`` have passed on the room's clock."""
    timer = asyncio.ensure_future(sleep(seconds))
    try:
        await asyncio.wait((turn, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
