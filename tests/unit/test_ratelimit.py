"""Pacing: the Teams per-conversation windows and the per-process limit, in virtual time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Sequence

import pytest

from shared.ratelimit import (
    TEAMS_CONVERSATION_WINDOWS,
    Pacer,
    PacingTimeout,
    SlidingWindowLog,
    Window,
    background_window,
    conversation_key,
    global_window,
)


class VirtualScheduler:
    """Parallel virtual time: time jumps to the next deadline only when every task sleeps."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def run(self, *coros):
        tasks = [asyncio.ensure_future(c) for c in coros]
        while not all(t.done() for t in tasks):
            for _ in range(10):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if self._sleepers:
                when = self._sleepers[0][0]
                self.now = max(self.now, when)
                while self._sleepers and self._sleepers[0][0] <= when:
                    heapq.heappop(self._sleepers)[2].set_result(None)
        return [t.result() for t in tasks]


def max_in_window(times: Sequence[float], seconds: float) -> int:
    """The most events in any half-open interval [t, t + seconds)."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def assert_within(times: Sequence[float], windows: Sequence[Window]) -> None:
    for window in windows:
        assert max_in_window(times, window.seconds) <= window.limit, window


async def test_a_burst_to_one_conversation_keeps_every_teams_window():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send():
        await pacer.acquire("19:chat@thread.v2")
        grants.append(time.now)

    await time.run(*(send() for _ in range(100)))

    assert len(grants) == 100
    assert_within(grants, TEAMS_CONVERSATION_WINDOWS)
    # The first 7 go at once; then the 8/2 s and 60/30 s windows set the pace.
    assert grants[:7] == [0.0] * 7
    assert 30.0 <= grants[-1] <= 40.0
    assert pacer.waited > 0


async def test_sends_to_one_conversation_keep_their_call_order():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep)
    order: list[int] = []

    async def send(n: int):
        await pacer.acquire("a:1")
        order.append(n)

    await time.run(*(send(n) for n in range(30)))
    assert order == list(range(30))


async def test_a_busy_conversation_does_not_hold_up_another():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep)
    other: list[float] = []

    async def busy():
        for _ in range(20):
            await pacer.acquire("a:busy")

    async def quiet():
        await time.sleep(0.5)
        await pacer.acquire("a:quiet")
        other.append(time.now)

    await time.run(busy(), quiet())
    assert other == [0.5]


async def test_a_thread_shares_its_channel_conversation_window():
    assert conversation_key("19:abc@thread.tacv2;messageid=1700") == "19:abc@thread.tacv2"
    assert conversation_key("a:1") == "a:1"


async def test_1000_requests_across_conversations_stay_under_the_global_limit():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send(n: int):
        await pacer.acquire(f"a:{n % 200}")
        grants.append(time.now)

    await time.run(*(send(n) for n in range(1000)))

    assert len(grants) == 1000
    assert max_in_window(grants, 1.0) <= 50
    # Bursts wait briefly rather than for long: 1000 at 50/s take about 20 s.
    assert 19.0 <= max(grants) <= 21.0


async def test_calls_outside_a_conversation_count_only_against_the_global_limit():
    time = VirtualScheduler()
    pacer = Pacer(10, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def call():
        await pacer.acquire(None)
        grants.append(time.now)

    await time.run(*(call() for _ in range(25)))
    assert max_in_window(grants, 1.0) <= 10
    assert grants[:10] == [0.0] * 10
    assert pacer.tracked_conversations == 0


async def test_idle_conversations_are_forgotten():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep)
    for n in range(5000):
        await pacer.acquire(f"a:{n}")
    assert pacer.tracked_conversations == 5000
    time.now += 31.0  # longer than the longest window
    await pacer.acquire("a:new")
    assert pacer.tracked_conversations == 1


async def test_memory_is_capped_even_when_conversations_are_not_idle():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep, max_conversations=100)
    for n in range(1000):
        await pacer.acquire(f"a:{n}")
    assert pacer.tracked_conversations <= 100


def test_sliding_window_log_reports_the_wait_until_the_oldest_event_leaves():
    log = SlidingWindowLog((Window(2, 1.0),))
    log.record(10.0)
    log.record(10.4)
    assert log.wait_time(10.5) == pytest.approx(0.5)
    assert log.wait_time(11.0) == 0.0
    assert log.wait_time(10.5, margin=0.1) == pytest.approx(0.6)


def test_global_window_for_fractional_rates():
    assert global_window(50) == Window(50, 1.0)
    assert global_window(0.5) == Window(1, 2.0)


async def test_a_conversation_waiting_long_does_not_stop_memory_being_reclaimed():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep, max_conversations=100)
    tracked: list[int] = []

    async def busy():  # 61 sends: the last waits about 30 s for the 60/30 s window
        for _ in range(61):
            await pacer.acquire("a:busy")

    async def many():
        await time.sleep(0.5)  # while busy's last send waits, holding its conversation
        for n in range(1000):
            await pacer.acquire(f"a:{n}")
        tracked.append(pacer.tracked_conversations)

    await time.run(busy(), many())
    assert tracked[0] <= 100


# --- deadlines --------------------------------------------------------------------------


async def test_a_wait_longer_than_max_wait_is_refused_at_once_and_takes_no_slot():
    time = VirtualScheduler()
    pacer = Pacer(1, clock=time.clock, sleep=time.sleep, margin=0.0)
    await pacer.acquire("a:1")

    with pytest.raises(PacingTimeout) as caught:
        await pacer.acquire("a:2", max_wait=0.5)

    assert caught.value.wait == pytest.approx(1.0)
    assert time.now == 0.0 and pacer.granted == 1
    await time.run(pacer.acquire("a:3", max_wait=1.0))  # the refused call took no slot
    assert time.now == pytest.approx(1.0)


async def test_a_wait_behind_other_senders_of_the_conversation_respects_max_wait():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep, margin=0.0)
    outcomes: list[str] = []

    async def send(n: int):
        try:
            await pacer.acquire("a:1", max_wait=1.5)
            outcomes.append(f"{n}@{time.now:g}")
        except PacingTimeout:
            outcomes.append(f"{n} refused@{time.now:g}")

    await time.run(*(send(n) for n in range(9)))
    # 7 at once (7 per second), the 8th at 1 s; the 9th would wait until 2 s (8 per 2 s).
    assert outcomes[:7] == [f"{n}@0" for n in range(7)]
    assert outcomes[7] == "7@1"
    assert outcomes[8] == "8 refused@1"


# --- background traffic -----------------------------------------------------------------


async def test_background_traffic_alone_never_exceeds_its_share():
    time = VirtualScheduler()
    pacer = Pacer(10, background_share=0.8, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send(n: int):
        await pacer.acquire(f"a:{n}", background=True)
        grants.append(time.now)

    await time.run(*(send(n) for n in range(100)))

    assert max_in_window(grants, 1.0) <= 8
    assert 11.0 <= max(grants) <= 13.0  # 100 at 8/s: the share is used, not wasted
    assert pacer.granted_background == 100


async def test_an_interactive_request_finds_headroom_while_background_saturates():
    time = VirtualScheduler()
    pacer = Pacer(10, background_share=0.8, clock=time.clock, sleep=time.sleep)
    background: list[float] = []
    interactive: list[tuple[float, float]] = []

    async def proactive(n: int):
        await pacer.acquire(f"a:{n}", background=True)
        background.append(time.now)

    async def reply(at: float):
        await time.sleep(at)
        asked = time.now
        await pacer.acquire("a:user")
        interactive.append((asked, time.now))

    await time.run(*(proactive(n) for n in range(200)), *(reply(at) for at in (3.0, 7.5, 12.25)))

    assert len(interactive) == 3
    assert all(granted - asked <= 0.2 for asked, granted in interactive)
    assert max(background) > 20.0  # the background burst itself keeps waiting its turn
    assert max_in_window(background + [g for _, g in interactive], 1.0) <= 10


async def test_interactive_traffic_alone_may_use_the_whole_rate():
    time = VirtualScheduler()
    pacer = Pacer(10, background_share=0.5, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send(n: int):
        await pacer.acquire(f"a:{n}")
        grants.append(time.now)

    await time.run(*(send(n) for n in range(50)))
    assert max_in_window(grants, 1.0) == 10
    assert max(grants) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("window", "share", "expected"),
    [
        (Window(50, 1.0), 0.8, Window(40, 1.0)),
        (Window(10, 1.0), 0.95, Window(9, 1.0)),  # always at least one slot for interactive
        (Window(2, 1.0), 0.8, Window(1, 1.0)),
        (Window(1, 1.0), 0.5, Window(1, 2.0)),  # one slot: background every other window
        (Window(50, 1.0), 0.01, Window(1, 2.0)),  # less than one slot per window
        (Window(50, 1.0), 1.0, Window(50, 1.0)),  # no reservation asked for
    ],
)
def test_the_background_window_keeps_headroom(window, share, expected):
    assert background_window(window, share) == expected


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_the_background_share_must_be_a_fraction(share):
    with pytest.raises(ValueError):
        Pacer(10, background_share=share)
