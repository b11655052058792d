"""Pacing as the channel enforces it, in virtual time: Teams windows per Teams conversation,
an adaptive rate per Teams tenant, background traffic that yields to replies."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import deque
from collections.abc import Sequence

import pytest

from shared.ratelimit import (
    TEAMS_CONVERSATION_WINDOWS,
    AdaptiveRate,
    Pacer,
    PacingTimeout,
    Scope,
    SlidingWindowLog,
    Window,
    conversation_key,
)


def teams(conversation: str | None = None, tenant: str = "tenant-a") -> Scope:
    return Scope("msteams", tenant, conversation, "smba.trafficmanager.net:443")


def webchat(conversation: str | None = None) -> Scope:
    return Scope("webchat", None, conversation, "webchat.botframework.com:443")


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


# --- per conversation: Teams only -------------------------------------------------------


async def test_a_burst_to_one_teams_conversation_keeps_every_teams_window():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send():
        await pacer.acquire(teams("19:chat@thread.v2"))
        grants.append(time.now)

    await time.run(*(send() for _ in range(100)))

    assert len(grants) == 100
    assert_within(grants, TEAMS_CONVERSATION_WINDOWS)
    # The first 7 go at once; then the 8/2 s and 60/30 s windows set the pace.
    assert grants[:7] == [0.0] * 7
    assert 30.0 <= grants[-1] <= 40.0
    assert pacer.waited > 0


async def test_a_webchat_conversation_is_not_held_to_teams_limits():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    grants: list[float] = []

    async def send(n: int):
        await pacer.acquire(webchat("conv-1"), background=n % 2 == 0)
        grants.append(time.now)

    await time.run(*(send(n) for n in range(100)))
    assert grants == [0.0] * 100  # no limits published for webchat: nothing waits
    assert pacer.tracked_conversations == 0


async def test_sends_to_one_conversation_keep_their_call_order():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep)
    order: list[int] = []

    async def send(n: int):
        await pacer.acquire(teams("a:1"))
        order.append(n)

    await time.run(*(send(n) for n in range(30)))
    assert order == list(range(30))


async def test_a_busy_conversation_does_not_hold_up_another():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep)
    other: list[float] = []

    async def busy():
        for _ in range(20):
            await pacer.acquire(teams("a:busy"))

    async def quiet():
        await time.sleep(0.5)
        await pacer.acquire(teams("a:quiet"))
        other.append(time.now)

    await time.run(busy(), quiet())
    assert other == [0.5]


async def test_a_thread_shares_its_channel_conversation_window():
    assert conversation_key("19:abc@thread.tacv2;messageid=1700") == "19:abc@thread.tacv2"
    assert conversation_key("a:1") == "a:1"


# --- per tenant: replies are never held, background keeps to the tenant rate ---------------


async def test_replies_across_teams_conversations_are_not_held_by_the_tenant_rate():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    grants: list[float] = []

    async def reply(n: int):
        await pacer.acquire(teams(f"a:{n}"))
        grants.append(time.now)

    await time.run(*(reply(n) for n in range(500)))
    assert grants == [0.0] * 500  # the old per-process cap made the last wait 10 s


async def test_background_traffic_keeps_to_its_share_of_the_tenant_rate_evenly_spaced():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def send(n: int):
        await pacer.acquire(teams(f"a:{n}"), background=True)
        grants.append(time.now)

    await time.run(*(send(n) for n in range(1000)))

    assert max_in_window(grants, 1.0) <= 49  # 96 % of 50/s, never a burst
    # The share is used, not wasted: 1000 at 48/s take about 20.8 s.
    assert 20.0 <= max(grants) <= 21.5
    assert pacer.granted_background == 1000


async def test_each_tenant_has_its_own_rate():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    done: dict[str, float] = {}

    async def broadcast(tenant: str):
        for n in range(480):
            await pacer.acquire(teams(f"a:{tenant}:{n}", tenant), background=True)
        done[tenant] = time.now

    await time.run(broadcast("t1"), broadcast("t2"))
    assert 9.5 <= done["t1"] <= 10.5 and 9.5 <= done["t2"] <= 10.5  # 480 at 48/s each


async def test_background_yields_to_replies_in_the_same_tenant():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    background: list[float] = []
    replies: list[tuple[float, float]] = []

    async def proactive(n: int):
        await pacer.acquire(teams(f"a:{n}"), background=True)
        background.append(time.now)

    async def reply(at: float, n: int):
        await time.sleep(at)
        asked = time.now
        await pacer.acquire(teams(f"a:user{n}"))
        replies.append((asked, time.now))

    await time.run(
        *(proactive(n) for n in range(480)),
        *(reply(2.0 + n / 20, n) for n in range(100)),  # 20 replies/s for 5 s
    )

    assert all(granted == asked for asked, granted in replies)  # never waited
    everything = background + [g for _, g in replies]
    assert max_in_window(everything, 1.0) <= 51  # the broadcast made room for them
    assert max(background) > 11.5  # 10 s alone; 100 replies cost it about 2 s more


# --- learning the tenant's limit from 429s ------------------------------------------------


def test_a_429_cuts_the_rate_then_it_recovers_and_probes_past_it():
    lane = AdaptiveRate(50.0)
    assert lane.rate(0.0) == 50.0
    assert lane.throttled(10.0, 1.0, sent_at=9.9)
    assert lane.rate(10.0) == pytest.approx(35.0)
    assert lane.background_wait(10.0) == pytest.approx(0.25)  # a quarter of Retry-After
    assert 35.0 < lane.rate(12.0) < 50.0
    assert lane.rate(15.0) == pytest.approx(50.0)  # back where the 429 came
    # 429s for requests sent before the cut were sent at the old rate: no second cut.
    assert not lane.throttled(10.1, 1.0, sent_at=9.95)
    assert lane.rate(10.1) == pytest.approx(lane.rate(10.1))
    assert lane.throttled(12.0, None, sent_at=11.0)  # a new 429: aim lower again
    assert lane.rate(12.0) < 35.0


def test_a_lane_without_a_ceiling_only_pauses():
    lane = AdaptiveRate(None)
    assert not lane.throttled(5.0, 2.0, sent_at=4.0)
    assert lane.rate(5.0) is None
    assert lane.background_wait(5.0) == pytest.approx(0.25)


def test_a_long_retry_after_pauses_the_tenant_only_briefly():
    # 60 s is more likely one conversation's limit: that request waits it (retry or
    # requeue), the rest of the tenant pauses a quarter second and goes on at the cut rate.
    lane = AdaptiveRate(50.0)
    lane.throttled(10.0, 60.0, sent_at=9.9)
    assert lane.background_wait(10.0) == pytest.approx(0.25)


async def instances_sharing_a_tenant(count: int, seconds: float = 100.0, limit: int = 50):
    """``count`` pacers (each its own process) broadcast into one tenant whose Connector
    allows ``limit`` requests in any second and answers 429 (Retry-After: 1) above it."""
    time = VirtualScheduler()
    rng = random.Random(count)
    arrivals: deque[float] = deque()
    outcome = {"sent": 0, "throttled": 0}
    scope = teams()

    async def sender(pacer: Pacer):
        while time.now < seconds:
            granted = await pacer.acquire(scope, background=True)
            await time.sleep(0.005 + rng.random() * 0.01)  # to the Connector
            while arrivals and arrivals[0] <= time.now - 1.0:
                arrivals.popleft()
            if len(arrivals) >= limit:
                outcome["throttled"] += 1
                pacer.throttled(scope, 1.0, granted)
            else:
                arrivals.append(time.now)
                outcome["sent"] += 1

    pacers = [Pacer(limit, clock=time.clock, sleep=time.sleep) for _ in range(count)]
    await time.run(*(sender(p) for p in pacers for _ in range(8)))
    rate = outcome["sent"] / seconds
    share_429 = outcome["throttled"] / (outcome["sent"] + outcome["throttled"])
    return rate / limit, share_429


async def test_one_instance_uses_the_tenant_limit_without_a_429():
    achieved, share_429 = await instances_sharing_a_tenant(1)
    assert achieved >= 0.95 and share_429 == 0.0


@pytest.mark.parametrize("count", [2, 4])
async def test_instances_sharing_a_tenant_approach_its_limit_without_a_429_storm(count):
    achieved, share_429 = await instances_sharing_a_tenant(count)
    # Each started at the whole limit; together they settle close under it.
    assert achieved >= 0.88
    assert share_429 < 0.02


async def test_background_waits_after_a_429_but_replies_do_not():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    granted = await pacer.acquire(teams("a:1"), background=True)
    pacer.throttled(teams("a:1"), 2.0, granted)
    assert await pacer.acquire(teams("a:2")) == 0.0
    await time.run(pacer.acquire(teams("a:3"), background=True))
    assert time.now == pytest.approx(0.25, abs=0.05)
    assert pacer.throttled_count == 1 and pacer.cuts == 1


# --- memory -------------------------------------------------------------------------------


async def test_idle_conversations_are_forgotten():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep)
    for n in range(5000):
        await pacer.acquire(teams(f"a:{n}"))
    assert pacer.tracked_conversations == 5000
    time.now += 31.0  # longer than the longest window
    await pacer.acquire(teams("a:new"))
    assert pacer.tracked_conversations == 1


async def test_memory_is_capped_even_when_conversations_are_not_idle():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep, max_conversations=100)
    for n in range(1000):
        await pacer.acquire(teams(f"a:{n}"))
    assert pacer.tracked_conversations <= 100


async def test_idle_tenants_are_forgotten():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    for n in range(100):
        await pacer.acquire(teams(tenant=f"t{n}"))
    time.now += 61.0
    await pacer.acquire(teams(tenant="t-new"))
    assert len(pacer._lanes) == 1


def test_sliding_window_log_reports_the_wait_until_the_oldest_event_leaves():
    log = SlidingWindowLog((Window(2, 1.0),))
    log.record(10.0)
    log.record(10.4)
    assert log.wait_time(10.5) == pytest.approx(0.5)
    assert log.wait_time(11.0) == 0.0
    assert log.wait_time(10.5, margin=0.1) == pytest.approx(0.6)


async def test_a_conversation_waiting_long_does_not_stop_memory_being_reclaimed():
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep, max_conversations=100)
    tracked: list[int] = []

    async def busy():  # 61 sends: the last waits about 30 s for the 60/30 s window
        for _ in range(61):
            await pacer.acquire(teams("a:busy"))

    async def many():
        await time.sleep(0.5)  # while busy's last send waits, holding its conversation
        for n in range(1000):
            await pacer.acquire(teams(f"a:{n}"))
        tracked.append(pacer.tracked_conversations)

    await time.run(busy(), many())
    assert tracked[0] <= 100


# --- deadlines --------------------------------------------------------------------------


async def test_a_wait_longer_than_max_wait_is_refused_at_once_and_takes_no_slot():
    time = VirtualScheduler()
    pacer = Pacer(1, clock=time.clock, sleep=time.sleep, margin=0.0)
    await pacer.acquire(teams("a:1"), background=True)

    with pytest.raises(PacingTimeout) as caught:
        await pacer.acquire(teams("a:2"), background=True, max_wait=0.5)

    assert caught.value.wait == pytest.approx(1.0, abs=0.05)
    assert time.now == 0.0 and pacer.granted == 1
    await time.run(pacer.acquire(teams("a:3"), background=True, max_wait=1.1))
    assert time.now == pytest.approx(1.0, abs=0.05)  # the refused call took no slot


async def test_a_wait_behind_other_senders_of_the_conversation_respects_max_wait():
    time = VirtualScheduler()
    pacer = Pacer(1000, clock=time.clock, sleep=time.sleep, margin=0.0)
    outcomes: list[str] = []

    async def send(n: int):
        try:
            await pacer.acquire(teams("a:1"), max_wait=1.5)
            outcomes.append(f"{n}@{time.now:g}")
        except PacingTimeout:
            outcomes.append(f"{n} refused@{time.now:g}")

    await time.run(*(send(n) for n in range(9)))
    # 7 at once (7 per second), the 8th at 1 s; the 9th would wait until 2 s (8 per 2 s).
    assert outcomes[:7] == [f"{n}@0" for n in range(7)]
    assert outcomes[7] == "7@1"
    assert outcomes[8] == "8 refused@1"


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_the_background_share_must_be_a_fraction(share):
    with pytest.raises(ValueError):
        Pacer(10, background_share=share)
