"""Pacing as the channel enforces it, in virtual time: Teams windows per Teams conversation,
an adaptive rate per Teams tenant, background traffic that yields to replies."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from shared.ratelimit import Pacer, PacingTimeout, Scope, conversation_key
from shared.room import ROOM_SECONDS, room_within
from shared.tenant_rate import AdaptiveRate
from shared.windows import TEAMS_CONVERSATION_WINDOWS, SlidingWindowLog, Window


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
                    future = heapq.heappop(self._sleepers)[2]
                    if not future.done():  # a sleeper cancelled meanwhile is skipped
                        future.set_result(None)
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

    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) >= 1 / 48.5 - 1e-9  # 97 % of 50/s, evenly spaced: never a burst
    assert max_in_window(grants, 1.0) <= 49
    # The share is used, not wasted: 1000 at 48.5/s take about 20.6 s.
    assert 20.0 <= max(grants) <= 21.0
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
    assert 9.5 <= done["t1"] <= 10.5 and 9.5 <= done["t2"] <= 10.5  # 480 at 48.5/s each


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


async def test_a_reply_does_not_wait_behind_a_background_send_to_its_own_conversation():
    # The broadcast's message to the user waits its turn in the tenant's line; the bot's
    # answer to the user's message, meanwhile, waits only for the conversation's windows.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    granted: dict[str, float] = {}

    async def proactive(conversation: str):
        await pacer.acquire(teams(conversation), background=True)
        granted.setdefault(conversation, time.now)

    async def reply():
        await time.sleep(0.2)
        await pacer.acquire(teams("a:user"))
        granted["reply"] = time.now

    await time.run(*(proactive(f"a:{n}") for n in range(100)), proactive("a:user"), reply())

    assert granted["reply"] == 0.2
    assert granted["a:user"] > 2.0  # still in its turn, after the 100 queued before it


async def test_a_background_send_whose_window_replies_filled_does_not_hold_the_line():
    # Seven replies fill the conversation's 1-s window while its proactive message waits
    # in the line: it waits for the window outside the line, the requests behind it do not.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    granted: dict[str, float] = {}

    async def proactive(conversation: str, after: float = 0.0):
        await time.sleep(after)
        await pacer.acquire(teams(conversation), background=True)
        granted[conversation] = time.now

    async def replies():
        await time.sleep(0.05)
        for _ in range(7):
            await pacer.acquire(teams("a:user"))
        granted["replies"] = time.now

    await time.run(
        *(proactive(f"a:{n}") for n in range(5)),
        proactive("a:user", after=0.01),
        *(proactive(f"b:{n}", after=0.02) for n in range(5)),
        replies(),
    )

    assert granted["replies"] == 0.05
    assert max(granted[f"b:{n}"] for n in range(5)) < 0.5  # 11 grants at 48.5/s
    assert granted["a:user"] >= 1.05  # once the replies' window let it


async def busy_chats_during_a_broadcast(
    replies_at: Sequence[float], send_at: float, until: float
) -> list[float]:
    """Six busy chats, each sent replies at `replies_at`, and a proactive send to each at
    `send_at`, while a broadcast keeps about half a second queued in the tenant's line
    until `until`: when each background request left."""
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    left: list[float] = []
    chats = [f"19:hot{i}@thread.v2" for i in range(6)]

    async def background(conversation: str, after: float = 0.0):
        await time.sleep(after)
        scope = teams(conversation)
        granted = await pacer.acquire(scope, background=True)
        if time.now > granted:  # the client tells the pacer when it left
            pacer.left(scope, granted, time.now)
        left.append(time.now)

    async def reply(conversation: str, at: float):
        await time.sleep(at)
        await pacer.acquire(teams(conversation))

    async def broadcast():
        sends, n = [], 0
        while time.now < until:
            while sum(not send.done() for send in sends) < 25:
                n += 1
                sends.append(asyncio.ensure_future(background(f"b:{n}")))
            await time.sleep(0.02)
        await asyncio.gather(*sends)

    await time.run(
        broadcast(),
        *(background(chat, after=send_at) for chat in chats),
        *(reply(chat, at) for chat in chats for at in replies_at),
    )
    return left


async def test_sends_waiting_over_a_second_outside_the_line_stay_in_the_tenants_window():
    # Replies fill six busy chats' 2-s windows while a proactive send to each waits in the
    # line: each takes its turn, then waits 1-2 s outside it. Counted from its turn, it
    # dropped out of the tenant's 1-s window before it left, and the broadcast behind it
    # refilled the window: background alone sent 53 in one second.
    left = await busy_chats_during_a_broadcast([10.45] * 7, send_at=10.0, until=20.0)
    assert max_in_window(left, 1.0) <= 50


async def test_a_send_whose_wait_grows_after_its_turn_stays_in_the_tenants_window():
    # As above, with 51 replies to each chat over the 30 s before, then one more after the
    # send's turn: 59 in 30 s, so the send waits for the 30-s window, about 8 s longer,
    # still holding its turn. Counted until its first expected departure only, it dropped
    # out of the tenant's window again and the six left on top of a full one: 53 in 1 s.
    earlier = [0.3 * k for k in range(51)]
    replies = [*earlier, *[20.05] * 7, 21.8]
    left = await busy_chats_during_a_broadcast(replies, send_at=20.0, until=40.0)
    assert max_in_window(left, 1.0) <= 50
    assert max(left) > 29.0  # the six waited for the 30-s window


async def test_a_deferred_sends_429_is_judged_by_its_turn_not_by_when_it_left():
    # Its turn came before another request's 429 cut the rate: its own 429, answered
    # after the cut, is at the old rate and must not cut again (it halved the rate).
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    granted: dict[str, float] = {}

    async def deferred():
        await time.sleep(0.01)
        granted["hot"] = await pacer.acquire(teams("19:hot"), background=True)

    async def reply(after: float):
        await time.sleep(after)
        await pacer.acquire(teams("19:hot"))

    async def cut_then_429():
        await time.sleep(0.6)
        pacer.throttled(teams("b:1"), 1.0, sent_at=0.5)  # the first cut
        while "hot" not in granted:
            await time.sleep(0.01)
        await time.sleep(0.2)
        cuts = pacer.cuts
        pacer.throttled(teams("19:hot"), 1.0, sent_at=granted["hot"], left_at=granted["hot"])
        granted["cut again"] = pacer.cuts > cuts

    background = (pacer.acquire(teams(f"b:{n}"), background=True) for n in range(20))
    await time.run(*background, *(reply(0.05) for _ in range(7)), deferred(), cut_then_429())
    assert pacer.cuts == 1 and granted["cut again"] is False
    assert granted["hot"] > 2.0  # it waited for its chat's 2-s window


async def test_two_sends_deferred_to_the_same_moment_each_keep_their_turn():
    # Two chats' windows blocked by replies recorded at one clock reading: both sends are
    # deferred to the same moment. Remembered by that moment alone, one turn stood for
    # both, and the second 429 (turns before the cut) cut the rate again.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    granted: dict[str, float] = {}
    cut_again: dict[str, bool] = {}

    async def deferred(chat: str):
        await time.sleep(0.01)
        granted[chat] = await pacer.acquire(teams(chat), background=True)

    async def reply(chat: str):
        await time.sleep(0.05)
        await pacer.acquire(teams(chat))

    async def cut_then_429s():
        await time.sleep(1.5)
        pacer.throttled(teams("b:1"), 1.0, sent_at=1.4)  # the cut, after both turns
        while len(granted) < 2:
            await time.sleep(0.01)
        for chat in ("19:a", "19:b"):
            cuts = pacer.cuts
            pacer.throttled(teams(chat), 1.0, sent_at=granted[chat], left_at=granted[chat])
            cut_again[chat] = pacer.cuts > cuts

    background = (pacer.acquire(teams(f"b:{n}"), background=True) for n in range(20))
    replies = [reply(chat) for chat in ("19:a", "19:b") for _ in range(7)]
    await time.run(*background, *replies, deferred("19:a"), deferred("19:b"), cut_then_429s())
    assert granted["19:a"] != granted["19:b"]  # the same moment, told apart by one float
    assert abs(granted["19:a"] - granted["19:b"]) < 1e-9
    assert cut_again == {"19:a": False, "19:b": False} and pacer.cuts == 1


def test_each_deferred_request_is_judged_by_its_own_turn():
    # A (turn 1.0) and B (turn 2.0, after a cut at 1.5) deferred to the same moment; A
    # leaves and succeeds (nothing more is told of it), B is answered 429. Looked up by
    # the moment alone, B took A's turn (before the cut) and its 429 cut nothing.
    lane = AdaptiveRate(50, 0.97)
    lane.record(1.0, True)
    a = lane.defer(1.0, 3.0)
    lane.record(1.2, True)
    assert lane.throttled(1.5, 1.0, 1.2)  # the cut
    lane.record(2.0, True)
    b = lane.defer(2.0, 3.0)
    assert a == 3.0 and 3.0 < b < 3.0001  # told apart by their times
    lane.left(a, 3.01)  # A left
    assert lane.throttled(3.2, 1.0, b, left_at=3.02)  # B's own turn came after the cut


@pytest.mark.parametrize("ending", ["timeout", "cancelled"])
async def test_a_send_that_never_leaves_after_its_turn_is_not_counted(ending):
    # Its wait after the turn grows past its max_wait (PacingTimeout), or its task is
    # cancelled: the tenant's window must not count a request that never went out.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    seen: dict[str, object] = {}

    async def deferred():
        try:
            max_wait = 3.0 if ending == "timeout" else None
            await pacer.acquire(teams("19:hot"), background=True, max_wait=max_wait)
        except (PacingTimeout, asyncio.CancelledError) as error:
            seen["ended"] = type(error).__name__
            raise

    async def reply(at: float):
        await time.sleep(at)
        await pacer.acquire(teams("19:hot"))

    async def line_then_send():
        await time.sleep(20.0)
        # A line to wait in, so that the replies fill the chat's windows meanwhile.
        line = [
            asyncio.ensure_future(pacer.acquire(teams(f"b:{n}"), background=True))
            for n in range(25)
        ]
        task = asyncio.ensure_future(deferred())
        await time.sleep(5.0)  # past the 59th reply (21.8): it now waits for ~30 s
        if ending == "cancelled":
            task.cancel()
        with contextlib.suppress(PacingTimeout, asyncio.CancelledError):
            await task
        await asyncio.gather(*line)
        seen["counted"] = [t for t in pacer.lane(teams()).counted if t > 21.9]  # not replies

    replies = [reply(0.3 * k) for k in range(51)] + [reply(20.05) for _ in range(7)]
    await time.run(*replies, reply(21.8), line_then_send())
    assert seen["ended"] == ("PacingTimeout" if ending == "timeout" else "CancelledError")
    assert seen["counted"] == [], seen  # it was counted from about 22.1 while it waited


async def keep_the_line_busy(
    pacer: Pacer, time: VirtualScheduler, busy: Callable[[], bool], seconds: float = 3.0
) -> None:
    """A broadcast that keeps about `seconds` of background sends queued in tenant-a's line
    while `busy()`, each to a conversation of its own."""
    queued = [0]

    async def one(n: int):
        try:
            await pacer.acquire(teams(f"b:{n}"), background=True)
        finally:
            queued[0] -= 1

    sends, n = [], 0
    while busy():
        while queued[0] < seconds * 48.5:
            queued[0] += 1
            n += 1
            sends.append(asyncio.ensure_future(one(n)))
        await time.sleep(0.05)
    await asyncio.gather(*sends)


@pytest.mark.parametrize("offset", [0.0, 1.25, 2.5, 3.75])
async def test_bursts_of_replies_do_not_starve_a_background_send_to_their_conversation(offset):
    # 8 replies every 5 s (within Teams' limits) while a broadcast keeps the tenant's line
    # about 3 s long: the proactive message to that conversation still goes within its
    # budget, whenever in the bursts' cycle it comes.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    outcome: list[float | str] = []

    async def bursts():
        replies = []
        while not outcome:
            await time.sleep(5.0)
            replies += [asyncio.ensure_future(pacer.acquire(teams("a:user"))) for _ in range(8)]
        await asyncio.gather(*replies)

    async def proactive():
        await time.sleep(30.0 + offset)
        try:
            await pacer.acquire(teams("a:user"), background=True, max_wait=7.0)
            outcome.append(time.now - 30.0 - offset)
        except PacingTimeout:
            outcome.append("timed out")

    await time.run(keep_the_line_busy(pacer, time, lambda: not outcome), bursts(), proactive())

    assert outcome[0] != "timed out" and outcome[0] < 7.0


async def test_a_background_send_never_leaves_long_after_its_turn_of_the_tenant_rate():
    # 60 replies in 25 s fill the conversation's 30-s window. Its proactive message does not
    # take a turn of the tenant's rate and leave seconds later, when the tenant's window
    # could no longer count it: it waits outside the line without one, then queues again.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    late: list[float] = []

    async def chat():
        for _ in range(60):
            await pacer.acquire(teams("a:hot"))
            await time.sleep(25.0 / 60)

    async def proactive():
        await time.sleep(24.0)
        granted = await pacer.acquire(teams("a:hot"), background=True)
        late.append(time.now - granted)

    await time.run(keep_the_line_busy(pacer, time, lambda: time.now < 45.0), chat(), proactive())

    assert late and late[0] <= 1.0, late


async def test_background_sends_to_one_conversation_keep_their_call_order():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    order: list[int] = []

    async def send(n: int):
        await pacer.acquire(teams("a:1"), background=True)
        order.append(n)

    await time.run(*(send(n) for n in range(20)))
    assert order == list(range(20))


async def test_room_for_replies_is_kept_for_a_minute_after_the_last_reply():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []

    async def broadcast():
        n = 0
        while time.now < 70.0:
            n += 1
            await pacer.acquire(teams(f"a:{n}"), background=True)
            grants.append(time.now)

    await pacer.acquire(teams("a:user"))  # a reply at 0 s
    await time.run(*(broadcast() for _ in range(8)))

    def most_in_a_second(start: float, end: float) -> int:
        return max_in_window([t for t in grants if start <= t < end], 1.0)

    assert most_in_a_second(1.0, 59.0) == 48  # 2 of Teams' 50 kept for replies
    assert most_in_a_second(61.0, 70.0) == 49  # then 1, for the next reply after the quiet


async def test_replies_faster_than_a_cut_rate_hold_background_back_only_while_they_last():
    # Other instances filled the tenant: 429s cut this lane to its floor; then replies
    # came faster than that rate for a minute. A proactive send right after goes within
    # its budget (it waited most of an hour behind the replies' debt).
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    for n in range(6):
        time.now += 0.01
        pacer.throttled(teams(f"a:q{n}"), 1.0, time.now - 0.005)
    stop = time.now + 60.0
    n = 0
    while time.now < stop:
        await pacer.acquire(teams(f"a:user{n}"))
        n += 1
        time.now += 1 / 20
    stopped = time.now

    async def proactive() -> float:
        await pacer.acquire(teams("a:p"), background=True, max_wait=7.0)
        return time.now - stopped

    [waited] = await time.run(proactive())
    assert waited < 7.0


def test_background_does_not_make_up_for_the_slot_a_reply_took():
    lane = AdaptiveRate(50.0, 0.97)
    interval = 1 / 48.5
    lane.record(0.0, True, late=True)
    lane.record(0.05, False)  # a reply, while the next background request was late
    # The next background request (woken at 0.06) waits one full interval after the
    # reply: the reply's slot is not made up for, as a late background one's would be.
    assert lane.background_wait(0.06) == pytest.approx(0.05 + 1 / 50 - 0.06)
    lane.record(0.08, True, late=True)  # late by 0.01 s: made up for from there
    assert lane.background_wait(0.08) == pytest.approx(0.07 + interval - 0.08)


def test_a_request_withdrawn_before_it_left_no_longer_fills_the_window():
    # A background send that took its turn, then timed out waiting for its conversation's
    # window (replies kept it full), never left: the tenant's window must not count it.
    lane = AdaptiveRate(50.0, 0.97)
    for n in range(49):
        lane.record(n / 100, True)
    lane.record(0.6, True)
    lane.left(0.6, 1.4)  # counted from when it will leave
    assert lane.counted[-1] == 1.4
    lane.withdraw(1.4)
    assert 1.4 not in lane.counted and len(lane.counted) == 49


def test_a_limit_set_high_to_lift_pacing_keeps_no_window_log():
    # BOT_CONNECTOR_RATE_LIMIT=1e9: a log of the last 1e9 requests per lane grew for ever.
    lane = AdaptiveRate(1e9, 0.97)
    for n in range(20_000):
        lane.record(n / 1e6, n % 2 == 0)
    assert lane.counted == ()
    assert lane.background_wait(0.02) <= 1e-6  # only the spacing, at that rate
    teams = AdaptiveRate(50.0, 0.97)
    for n in range(200):
        teams.record(n / 50, True)
    assert len(teams.counted) == 50


def test_a_late_background_request_is_made_up_for_but_an_idle_line_is_not():
    lane = AdaptiveRate(50.0, 0.97)
    interval = 1 / 48.5
    lane.record(0.0, True, late=True)
    lane.record(0.08, True, late=True)  # woken 0.06 s late: the next may go at once
    assert lane.background_wait(0.08) < 0
    idle = AdaptiveRate(50.0, 0.97)
    idle.record(0.0, True, late=True)
    idle.record(0.08, True)  # arrived at an idle line: spacing starts again from it
    assert idle.background_wait(0.08) == pytest.approx(interval)


async def test_a_batch_arriving_at_an_idle_line_is_spaced_from_its_first():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    await pacer.acquire(teams("a:0"), background=True)
    time.now = 0.09  # the line stood empty for 0.07 s after the next slot

    grants = await time.run(
        *(pacer.acquire(teams(f"a:{n}"), background=True) for n in range(1, 17))
    )

    gaps = [b - a for a, b in itertools.pairwise(sorted(grants))]
    assert min(gaps) == pytest.approx(1 / 48.5)  # no burst making up for the idle time


async def test_a_pause_after_a_429_is_not_made_up_for_with_a_burst():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    grants: list[float] = []
    fresh = itertools.count()

    async def broadcast():
        while time.now < 3.0:
            grants.append(await pacer.acquire(teams(f"a:{next(fresh)}"), background=True))

    async def throttled():
        await time.sleep(1.0)
        pacer.throttled(teams("a:x"), 1.0, 0.99)  # cuts, pauses 0.25 s
        await time.sleep(0.08)
        pacer.throttled(teams("a:y"), 1.0, 0.98)  # granted before the cut: pauses, no cut

    await time.run(*(broadcast() for _ in range(8)), throttled())
    resumed = [t for t in grants if t >= 1.08]
    assert resumed[0] == pytest.approx(1.33)  # the second pause, 0.25 s from 1.08 s
    gaps = [b - a for a, b in itertools.pairwise(resumed[:8])]
    assert min(gaps) > 0.02  # then evenly spaced at the cut rate, not a burst


# --- learning the tenant's limit from 429s ------------------------------------------------


def through(lane: AdaptiveRate, start: float, seconds: float, rate: float) -> float:
    """``rate`` requests per second from ``start`` for ``seconds``, each leaving 1 ms after
    its grant (and counted by the channel); returns the time after the last."""
    now = start
    while now < start + seconds:
        lane.record(now, True)
        lane.left(now, now + 0.001)
        now += 1.0 / rate
    return now


def test_a_lone_429_at_the_ceiling_cuts_a_little_and_recovers_fully():
    # Nearly all of the last second got through: one 429 that says little (a reply that
    # found the window full, a brief burst from elsewhere), not N instances overshooting.
    lane = AdaptiveRate(50.0)
    now = through(lane, 9.0, 1.0, 49.0)
    assert lane.throttled(now, 1.0, sent_at=now - 0.01)
    assert lane.rate(now) == pytest.approx(45.0)  # 10 % off, not 30
    assert lane.background_wait(now) == pytest.approx(0.25)  # a quarter of Retry-After
    assert lane.rate(now + 5.0) == pytest.approx(50.0)  # back at the ceiling in 5 s


def test_a_429_when_less_got_through_cuts_to_what_did():
    # 2 instances at 50/s each on a 50/s tenant: this one got about 25 of its 50 through.
    lane = AdaptiveRate(50.0)
    through(lane, 9.01, 0.98, 25.0)  # 25 requests in the last second
    assert lane.throttled(10.0, 1.0, sent_at=9.99)
    assert lane.rate(10.0) == pytest.approx(25.0)
    # 429s for requests sent before the cut were sent at the old rate: no second cut.
    assert not lane.throttled(10.1, 1.0, sent_at=9.995)
    assert lane.rate(10.1) < 26.0
    # Back halfway towards where the 429 came within 5 s, then probing upwards slowly, by
    # a share of its own rate (N instances together probe as fast as one would), faster
    # the longer no 429 comes (its pace doubles every 30 s).
    assert lane.rate(15.0) == pytest.approx(37.5)
    doubling = 30.0 / math.log(2)  # 10 s of probing count as 11.2 s, 30 s as 43 s
    assert lane.rate(25.0) == pytest.approx(37.5 * (1 + 0.004 * doubling * (2 ** (1 / 3) - 1)))
    assert lane.rate(45.0) == pytest.approx(37.5 * (1 + 0.004 * doubling))
    # Each 429 that comes takes it down to what got through again.
    through(lane, 25.01, 0.98, 20.0)
    assert lane.throttled(26.0, 1.0, sent_at=25.99)
    assert lane.rate(26.0) == pytest.approx(20.0)


def test_a_429_cuts_at_most_60_percent_however_little_got_through():
    lane = AdaptiveRate(15.0)
    now = through(lane, 0.0, 2.0, 3.0)  # 3/s through of the 15/s it tried
    assert lane.throttled(now, 1.0, sent_at=now - 0.01)
    assert lane.rate(now) == pytest.approx(6.0)
    assert lane.rate(now + 5.0) == pytest.approx(10.5)


@pytest.mark.parametrize(("ceiling", "lowest"), [(50.0, 0.25), (15.0, 0.075)])
def test_429_after_429_takes_a_lane_down_to_a_200th_of_its_ceiling(ceiling, lowest):
    # A floor of its own per instance: 200 instances on one tenant still fit under its
    # limit (a fixed 0.5/s floor let 100 instances at 50/s, or 30 at 15/s, exceed it
    # however often they were answered 429).
    lane = AdaptiveRate(ceiling)
    now = 0.0
    for _ in range(30):
        rate = lane.rate(now)
        now = through(lane, now, 1.0, rate)
        lane.throttled(now, 1.0, sent_at=now - 0.001)
        now += 0.01
    assert lane.rate(now - 0.01) == pytest.approx(lowest)  # as the last 429 left it


async def test_a_tenant_answered_429_once_still_sends_hours_later():
    # The probe's pace doubles every 30 s without a 429: after about 8.5 h of it,
    # 2 ** (t / 30) no longer fits in a float. A lane that is busy (or the only one, so
    # never forgotten) must still grant sends, at its ceiling, however long ago its last
    # 429 was.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    scope = teams("a:1")
    granted = await pacer.acquire(scope, background=True)
    time.now += 0.01
    pacer.throttled(scope, 1.0, granted)
    assert pacer.cuts == 1
    for hours in (1, 9, 24 * 30):
        time.now = hours * 3600.0
        await pacer.acquire(teams(f"a:{hours}"), background=True)
        assert pacer.lane(scope).rate(time.now) == 50.0
    pacer.throttled(scope, 1.0, time.now)  # and a 429 then still cuts it
    assert pacer.cuts == 2 and pacer.lane(scope).rate(time.now) < 50.0


def test_a_request_that_left_late_holds_back_the_ones_after_it():
    # 15/s, evenly spaced at 97 %: 16 grants span 1.03 s, so a strict 1-s window at the
    # Connector tolerates only 31 ms of difference in how long requests take to get there.
    lane = AdaptiveRate(15.0, 0.97)
    arrivals = []
    now = 0.0
    for n in range(40):
        now += max(0.0, lane.background_wait(now))
        lane.record(now, True)
        # Every tenth one waited 150 ms on a busy event loop before it left.
        left = now + (0.15 if n % 10 == 5 else 0.0)
        arrivals.append(left + 0.002)
        lane.left(now, left)
    assert max_in_window(arrivals, 1.0) <= 15
    assert now < 40 / 15 / 0.97 + 0.3  # it cost a few waits, not the rate


def test_a_request_answered_429_does_not_hold_back_the_window():
    lane = AdaptiveRate(15.0)
    for n in range(15):
        lane.record(n * 0.01, True)
    lane.throttled(0.2, 1.0, sent_at=0.05)  # the channel did not count it
    wait_at = 0.5
    # Only 14 counted in the window: the 16th waits for its spacing and pause, not a second.
    assert lane.background_wait(wait_at) < 0.5


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


class Jitter:
    """The delays a real host adds, drawn from what the broadcast benchmark's pacing trace
    measured (benchmarks/pacing_report.py, 1 and 4 host processes on 2 busy cores): from
    a grant to the request's arrival at the Connector about 1 ms, 1 in 250 late by
    30-150 ms; a wake-up from a pacing wait about 1 ms late, 1 in 100 by 10-80 ms.
    Without it, requests leave at their grant and take 5-15 ms to arrive."""

    def __init__(self, rng: random.Random, on: bool) -> None:
        self.rng, self.on = rng, on

    def leaving(self) -> float:
        """From the grant until the request is written to the connection."""
        if not self.on:
            return 0.0
        late = self.rng.expovariate(1 / 0.0015)
        if self.rng.random() < 0.004:
            late += self.rng.uniform(0.03, 0.15)
        return late

    def to_connector(self) -> float:
        return 0.001 if self.on else 0.005 + self.rng.random() * 0.01

    def wake_up(self) -> float:
        if not self.on:
            return 0.0
        late = self.rng.expovariate(1 / 0.001)
        if self.rng.random() < 0.01:
            late += self.rng.uniform(0.01, 0.08)
        return late


class BusyJitter(Jitter):
    """A host busier than the traced one: 5 % of wake-ups later still, by up to 60 ms (the
    lone host of the broadcast benchmark lost 4.5 % of its pace to waits woken late)."""

    def wake_up(self) -> float:
        late = super().wake_up()
        if self.rng.random() < 0.05:
            late += self.rng.uniform(0.0, 0.06)
        return late


class StrictWindow:
    """A tenant's limit as the channel keeps it: at most ``limit`` arrivals in any second;
    an arrival it refuses (429) is not counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._arrivals: deque[float] = deque()

    def admit(self, now: float) -> bool:
        while self._arrivals and self._arrivals[0] <= now - 1.0:
            self._arrivals.popleft()
        if len(self._arrivals) >= self.limit:
            return False
        self._arrivals.append(now)
        return True


UNSAID = -1.0  # what `refuse` returns for a 429 that says no Retry-After


async def run_senders(
    time: VirtualScheduler, pacer: Pacer, end: float, refuse: Callable[[float], float | None]
) -> None:
    """One instance's 48 invocations sending background requests to new conversations until
    `end`, with 0.2 s round trips; `refuse(arrived)` is a 429's Retry-After (UNSAID: none
    given), or None (delivered)."""
    fresh = itertools.count()

    async def sender() -> None:
        while time.now < end:
            scope = teams(f"a:{next(fresh)}")
            try:
                granted = await pacer.acquire(scope, background=True, max_wait=7.0)
            except PacingTimeout as timeout:
                await time.sleep(timeout.wait)
                continue
            pacer.left(scope, granted, time.now)
            arrived = time.now + 0.1
            await time.sleep(0.2)
            wait = refuse(arrived)
            if wait is not None:
                said = None if wait == UNSAID else wait
                pacer.throttled(scope, said, granted, granted)
                await time.sleep(said or 1.0)  # requeued for its Retry-After

    await time.run(*(sender() for _ in range(48)))


@pytest.mark.parametrize("unsaid", [0, 10])  # in 10, one 429 says no Retry-After
async def test_a_tenant_refusing_everything_for_seconds_costs_one_cut_not_minutes(unsaid):
    # The tenant answers every request 429 for 10 s, each saying how long is left (or
    # nothing); then it has room again (50/s). Cut again for each of those 429s, the rate
    # fell to its floor and took minutes to climb back.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    channel = StrictWindow(50)
    delivered = [0, 0, 0, 0]  # per 30 s
    refusals = itertools.count(1)

    def refuse(arrived: float) -> float | None:
        if 10.0 <= arrived < 20.0:
            if unsaid and next(refusals) % unsaid == 0:
                return UNSAID
            return max(20.0 - arrived, 1.0)
        if not channel.admit(arrived):
            return 1.0
        delivered[int(arrived // 30)] += 1
        return None

    await run_senders(time, pacer, 90.0, refuse)
    assert delivered[1] >= 0.8 * 50 * 30, delivered  # back near the limit within 10 s of it


async def test_a_threads_long_429_leaves_the_tenants_adaptation_on():
    # One thread's own limit answers 429 with 30 s to wait, just before the tenant's room
    # for this instance shrinks from 25/s to 10/s: the tenant's short 429s must still cut.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    channel = StrictWindow(25)
    refused_later = 0
    thread_refused = False

    def refuse(arrived: float) -> float | None:
        nonlocal refused_later, thread_refused
        if arrived >= 12.0:
            channel.limit = 10
        if arrived >= 10.0 and not thread_refused:
            thread_refused = True
            return 30.0
        if channel.admit(arrived):
            return None
        refused_later += 15.0 <= arrived < 40.0
        return 1.0

    await run_senders(time, pacer, 40.0, refuse)
    assert refused_later < 40, refused_later


async def send_once(
    time: VirtualScheduler,
    noise: Jitter,
    channel: StrictWindow,
    pacer: Pacer,
    scope: Scope,
    background: bool = True,
    max_wait: float | None = None,
) -> tuple[bool, float]:
    """One request (background unless told) through ``pacer`` into ``channel``, with a
    host's delays: whether the channel admitted it, and when it arrived. A refused one is
    told to the pacer and waits its Retry-After (1 s), as the Connector client's retry does."""
    granted = await pacer.acquire(scope, background=background, max_wait=max_wait)
    await time.sleep(noise.leaving())
    left = time.now
    pacer.left(scope, granted, left)
    await time.sleep(noise.to_connector())
    arrived = time.now
    if channel.admit(arrived):
        return True, arrived
    await time.sleep(0.002)  # the answer on its way back
    pacer.throttled(scope, 1.0, granted, left)
    await time.sleep(1.0)  # the client's retry waits the Retry-After
    return False, arrived


async def instances_sharing_a_tenant(
    count: int,
    seconds: float = 100.0,
    limit: int = 50,
    jitter: bool = False,
    seed: int = 0,
    conversations: int | None = None,
    joining_every: float = 0.0,
    busy: bool = False,
):
    """``count`` pacers (each its own process) broadcast into one tenant whose Connector
    allows ``limit`` requests in any second and answers 429 (Retry-After: 1) above it.
    Each send goes to a conversation of its own, and after a 429 to the same one again;
    with ``conversations``, each instance sends to that many conversations of its own in
    turn instead (a bot posting into a few busy channels). With ``joining_every``, the
    instances start that many seconds apart (the host scaling out). Returns the rate
    achieved (a share of ``limit``) and the share of requests answered 429, over the
    whole run and after its first 10 seconds."""
    time = VirtualScheduler()
    noise = (BusyJitter if busy else Jitter)(random.Random(count * 1000 + limit + seed), jitter)
    channel = StrictWindow(limit)
    outcome = {"sent_early": 0, "throttled_early": 0, "sent_later": 0, "throttled_later": 0}
    fresh = itertools.count()

    async def sleep(seconds: float) -> None:
        await time.sleep(seconds + noise.wake_up())

    async def sender(pacer: Pacer, instance: int, first: int):
        if conversations is None:
            names = (f"a:{n}" for n in fresh)
        else:
            names = (f"{instance}:{n % conversations}" for n in itertools.count(first))
        scope = teams(next(names))
        await time.sleep(instance * joining_every)
        while time.now < seconds:
            admitted, arrived = await send_once(time, noise, channel, pacer, scope)
            when = "_later" if arrived >= 10.0 else "_early"
            if not admitted:
                outcome["throttled" + when] += 1
            else:
                outcome["sent" + when] += 1
                scope = teams(next(names))

    pacers = [Pacer(limit, clock=time.clock, sleep=sleep) for _ in range(count)]
    await time.run(*(sender(p, i, n) for i, p in enumerate(pacers) for n in range(8)))
    sent = outcome["sent_early"] + outcome["sent_later"]
    throttled = outcome["throttled_early"] + outcome["throttled_later"]
    later = outcome["throttled_later"] / (outcome["sent_later"] + outcome["throttled_later"])
    return sent / seconds / limit, throttled / (sent + throttled), later


async def test_one_instance_uses_the_tenant_limit_without_a_429():
    achieved, share_429, _ = await instances_sharing_a_tenant(1)
    assert achieved >= 0.95 and share_429 == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_one_instance_with_a_real_hosts_jitter_still_draws_no_429(seed):
    # The tenant's strict 1-s window counts arrivals, not grants: a request that left
    # late must not arrive bunched with the ones granted after it.
    achieved, share_429, _ = await instances_sharing_a_tenant(1, limit=15, jitter=True, seed=seed)
    assert share_429 == 0.0
    assert achieved >= 0.95


async def test_a_lone_instance_on_a_busy_event_loop_makes_up_for_waits_woken_late():
    # Late wake-ups delay the grants after them; made up for within 0.1 s (the window
    # still keeps a reply's room), they cost little: 95.4-95.6 % of the limit over these
    # seeds, against 89.1-90.0 % with one interval of catch-up.
    outcomes = [
        await instances_sharing_a_tenant(1, jitter=True, busy=True, seed=seed) for seed in range(3)
    ]
    assert min(achieved for achieved, _, _ in outcomes) >= 0.94
    assert sum(share_429 for _, share_429, _ in outcomes) == 0.0


@pytest.mark.parametrize("count", [2, 4])
async def test_instances_sharing_a_tenant_approach_its_limit_without_a_429_storm(count):
    achieved, share_429, _ = await instances_sharing_a_tenant(count)
    # Each started at the whole limit; together they settle close under it.
    assert achieved >= 0.88
    assert share_429 < 0.02


@pytest.mark.parametrize("count", [16, 32])
async def test_many_instances_sharing_a_tenant_settle_without_a_429_storm(count):
    # The Functions host scales a queue out to about one instance per few dozen queued
    # messages: a broadcast's backlog of 1,000 can bring twenty. Each instance probing
    # upwards by a share of the tenant's whole limit, 32 of them probed 32 times as fast as
    # one, and 8.2 % of their requests after the first 10 s were answered 429 (16: 3.5 %).
    achieved, _share_429, later = await instances_sharing_a_tenant(count, jitter=True)
    assert achieved >= 0.9
    assert later < 0.02


@pytest.mark.parametrize(("threads", "retry_after"), [(2, 10.0), (4, 30.0)])
async def test_threads_held_by_limits_of_their_own_leave_the_tenant_near_its_limit(
    threads, retry_after
):
    # A broadcast into a tenant with room for it, beside a few busy threads each held by a
    # limit of its own (one request per `retry_after` seconds, each 429 asking for that
    # long), interleaving their 429s. A rule that took each long 429 after a request the
    # tenant took (answered 2xx) for the tenant full again, tried against a 429 storm,
    # cut the rate again and again: 21 % and 22 % of the limit for the broadcast (91 %
    # and 94 % without it).
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    tenant = StrictWindow(50)
    taken = [deque() for _ in range(threads)]  # when each thread last took a request
    fresh = itertools.count()
    broadcast = 0

    async def send(scope: Scope, thread: int | None) -> float:
        while True:
            granted = await pacer.acquire(scope, background=True)
            await time.sleep(0.05)
            arrived, wait = time.now, None
            if thread is not None:
                log = taken[thread]
                while log and log[0] <= arrived - retry_after:
                    log.popleft()
                wait = retry_after if log else None
            if wait is None and not tenant.admit(arrived):
                wait = 1.0
            await time.sleep(0.05)
            if wait is None:
                if thread is not None:
                    taken[thread].append(arrived)
                return arrived
            pacer.throttled(scope, wait, granted)
            await time.sleep(wait)

    async def broadcaster() -> None:
        nonlocal broadcast
        while time.now < 120.0:
            arrived = await send(teams(f"a:{next(fresh)}"), None)
            broadcast += 10.0 <= arrived < 120.0
            await time.sleep(0.1)

    async def busy(thread: int) -> None:
        await time.sleep(thread * 0.7)
        while time.now < 120.0:
            await send(teams(f"19:busy{thread}@thread.v2"), thread)
            await time.sleep(1.0)

    await time.run(*(broadcaster() for _ in range(16)), *(busy(n) for n in range(threads)))
    assert broadcast / 110.0 / 50 >= 0.85, broadcast / 110.0 / 50


async def test_instances_joining_one_by_one_settle_without_a_429_storm():
    # The host scales out one instance at a time, and each starts at the whole limit,
    # into a tenant the others already fill: 32 joining 5 s apart drew 429s for 8.2 % of
    # their requests when each probed by a share of the tenant's limit, 5.3 % now.
    achieved, _share_429, later = await instances_sharing_a_tenant(
        32, seconds=200.0, jitter=True, joining_every=5.0
    )
    assert achieved >= 0.9
    assert later < 0.065


async def instance_left_after_a_scale_in(
    count: int = 20, stop_at: float = 60.0, until: float = 300.0, limit: int = 50
) -> list[float]:
    """``count`` instances share a tenant (with a real host's jitter) until ``stop_at``,
    when all but one stop (the host scales in). Returns the share of ``limit`` the one
    left got through in each half minute from then until ``until``."""
    time = VirtualScheduler()
    noise = Jitter(random.Random(7), True)
    channel = StrictWindow(limit)
    fresh = itertools.count()
    sent = [0] * int((until - stop_at) // 30)

    async def sleep(seconds: float) -> None:
        await time.sleep(seconds + noise.wake_up())

    async def sender(pacer: Pacer, end: float, counted: bool):
        scope = teams(f"a:{next(fresh)}")
        while time.now < end:
            admitted, arrived = await send_once(time, noise, channel, pacer, scope)
            if admitted:
                half_minute = int((arrived - stop_at) // 30)
                if counted and 0 <= half_minute < len(sent):
                    sent[half_minute] += 1
                scope = teams(f"a:{next(fresh)}")

    pacers = [Pacer(limit, clock=time.clock, sleep=sleep) for _ in range(count)]
    senders = [
        sender(pacer, until if i == 0 else stop_at, i == 0)
        for i, pacer in enumerate(pacers)
        for _ in range(8)
    ]
    await time.run(*senders)
    return [n / 30.0 / limit for n in sent]


async def test_the_instance_left_when_the_host_scales_in_takes_the_tenant_back():
    # 20 instances share a 50/s tenant for a minute, then 19 stop. Probing by a share of
    # its own rate alone, the one left (at 1/20 of the tenant) had 7 % of it 4 minutes
    # later; the probe's pace doubling every 30 s without a 429 brings it back.
    shares = await instance_left_after_a_scale_in()
    assert shares[-1] >= 0.5


TWO_TENANTS = {"t0": 5000, "t1": 5000}


@dataclass(slots=True)
class Broadcast:
    """What :func:`broadcast_through_instances` measured."""

    share: float  # of the tenants' limits together, from the start to the last outcome
    share_429: float  # of the requests sent
    put_back: int  # messages put back on the queue
    finished: dict[str, float]  # when each tenant's last outcome was written
    timed_out: int = 0  # sends requeued for no slot within the wait a send may spend


async def broadcast_through_instances(
    count: int,
    messages: dict[str, int],
    *,
    put_back: bool,
    limits: dict[str, int] | None = None,
    seed: int = 0,
    slot_wait: float | None = None,
    room: bool = False,
) -> Broadcast:
    """``count`` instances (each its own 50/s pacer) take a broadcast's queue messages, each
    for one tenant in ``messages`` (how many for each, shuffled), as the Functions host's
    queue listener does (tools/devhost/queue.py): up to 32 at once whenever 16 or fewer are
    in flight, backing off from 0.1 s to 2 s while none is visible. An invocation claims its
    target (20-60 ms of storage), sends (through the channel's strict window, ``limits`` per
    tenant, 50/s unless given; a 429's Retry-After waited as the Connector client does),
    writes the outcome, and the message is deleted (20-60 ms each). With ``put_back``, one
    the pacer says to put back (``Pacer.crowded_wait``) is queued again, visible after its
    delay as the engine jitters it, before anything is claimed. With ``slot_wait``, a send
    that would wait longer for its slot is requeued (a throttled attempt, visible after the
    wait it was told); with ``room``, a message first waits in its lane's room
    (``Pacer.admission``, as the engine does: within ``slot_wait`` less ROOM_MARGIN, for
    ROOM_SECONDS at most) and is put back when it is not let out."""
    time = VirtualScheduler()
    rng = random.Random(seed)
    noise = Jitter(random.Random(seed + 7), True)
    limits = limits or dict.fromkeys(messages, 50)
    channels = {tenant: StrictWindow(limit) for tenant, limit in limits.items()}
    order = itertools.count()
    tenants = [tenant for tenant, n in messages.items() for _ in range(n)]
    rng.shuffle(tenants)
    queue = [(0.0, next(order), tenant) for tenant in tenants]  # (visible at, order, tenant)
    counts = {"sent": 0, "throttled": 0, "put_back": 0, "timed_out": 0}
    finished: dict[str, float] = {}

    async def sleep(seconds: float) -> None:
        await time.sleep(seconds + noise.wake_up())

    async def storage() -> None:
        await time.sleep(rng.uniform(0.02, 0.06))

    async def again(tenant: str, wait: float, counted: str) -> None:
        counts[counted] += 1
        await storage()  # the copy
        delay = min(wait, 15.0) * (1 + 0.2 * rng.random()) + rng.random()
        heapq.heappush(queue, (time.now + delay, next(order), tenant))

    async def send(pacer: Pacer, tenant: str, scope: Scope) -> None:
        await storage()  # the claim
        while True:
            try:
                admitted, _ = await send_once(
                    time, noise, channels[tenant], pacer, scope, max_wait=slot_wait
                )
            except PacingTimeout as timeout:
                await again(tenant, max(timeout.wait, 1.0), "timed_out")
                return
            if admitted:
                break
            counts["throttled"] += 1
        counts["sent"] += 1
        await storage()  # the outcome
        finished[tenant] = time.now

    async def invocation(pacer: Pacer, tenant: str, in_flight: list[int]) -> None:
        scope = teams(f"a:{next(order)}", tenant)
        wait = pacer.crowded_wait(scope) if put_back else 0.0
        if wait > 0:
            await again(tenant, wait, "put_back")
        elif room:
            assert slot_wait is not None
            async with pacer.admission(scope, room_within(slot_wait), ROOM_SECONDS) as wait:
                if wait:
                    await again(tenant, wait, "put_back")
                else:
                    await send(pacer, tenant, scope)
        else:
            await send(pacer, tenant, scope)
        await storage()  # the delete
        in_flight[0] -= 1

    async def listener(pacer: Pacer) -> None:
        in_flight, backoff, running = [0], 0.1, []
        while queue or in_flight[0]:
            if in_flight[0] > 16:
                await time.sleep(0.01)
                continue
            await storage()  # the receive
            batch = 0
            while batch < 32 and queue and queue[0][0] <= time.now:
                in_flight[0] += 1
                batch += 1
                tenant = heapq.heappop(queue)[2]
                running.append(asyncio.ensure_future(invocation(pacer, tenant, in_flight)))
            backoff = 0.1 if batch else min(backoff * 2, 2.0)
            if not batch:
                await time.sleep(backoff)
        await asyncio.gather(*running)

    pacers = [Pacer(50, clock=time.clock, sleep=sleep) for _ in range(count)]
    await time.run(*(listener(p) for p in pacers))
    sent = counts["sent"]
    return Broadcast(
        share=sent / max(finished.values()) / sum(limits.values()),
        share_429=counts["throttled"] / (sent + counts["throttled"]),
        put_back=counts["put_back"],
        finished=finished,
        timed_out=counts["timed_out"],
    )


async def test_one_tenant_over_eight_instances_waits_in_the_room_not_in_a_line_it_outlasts():
    # One tenant (50/s) over 8 instances of 48 invocations each: every instance's line held
    # about 8 s of sends, and those past the 7 s a send may wait for its slot were requeued
    # as throttled attempts (383 of 3,000). Waiting in the room first, before anything is
    # claimed, no send outlasts its wait, at about the same pace.
    lined = await broadcast_through_instances(8, {"tenant-a": 3000}, put_back=True, slot_wait=7.0)
    roomed = await broadcast_through_instances(
        8, {"tenant-a": 3000}, put_back=True, slot_wait=7.0, room=True
    )
    assert lined.timed_out > 300
    assert roomed.timed_out < 10 and roomed.put_back < 100
    assert roomed.share > lined.share - 0.05
    assert roomed.share_429 < 0.02


def room_pacer(start: float = 16.0) -> tuple[VirtualScheduler, Pacer]:
    # Started past 0: a clock on which now + 1e-15 == now (a rounding left over) is one a
    # wait must not spin on.
    time = VirtualScheduler(start)
    return time, Pacer(2, clock=time.clock, sleep=time.sleep, margin=0.0)  # 1.94/s of background


async def test_the_room_lets_out_in_order_once_the_line_would_take_each_within_its_bound():
    # At 1.94 background sends a second, 4 sends in the line hold it for about 2 s. One
    # that may wait 1 s in it is let out of the room once the line has drained enough;
    # one behind it that may wait 100 s would go at once, but waits its turn behind it.
    time, pacer = room_pacer()
    start = time.now
    let_out: list[tuple[str, float]] = []

    async def request(name: str, within: float) -> None:
        async with pacer.admission(teams(), within, 60.0) as wait:
            assert wait == 0.0
            let_out.append((name, time.now - start))
            await pacer.acquire(teams(f"a:{name}"), background=True)

    line = [pacer.acquire(teams(f"a:{n}"), background=True) for n in range(4)]
    async with asyncio.timeout(10):  # out of order, the virtual clock can run on for ever
        await time.run(*line, request("short", 1.0), request("patient", 100.0))

    assert [name for name, _ in let_out] == ["short", "patient"]
    [(_, short_at), (_, patient_at)] = let_out
    assert 0.5 < short_at < 2.5
    assert patient_at == short_at  # not before it, and at once after it
    assert pacer.lane(teams()).joining == 0 and not pacer.lane(teams()).room


async def test_six_let_out_in_turn_on_a_clock_far_from_zero_all_go():
    # At 16 s on the clock a wait computed as 1.8e-15 s (a rounding left over) was slept
    # over and over: now + 1.8e-15 == now, so the clock never moved and the room hung.
    time, pacer = room_pacer()

    async def request(n: int) -> None:
        async with pacer.admission(teams(), 2.0, 60.0) as wait:
            assert wait == 0.0
            await pacer.acquire(teams(f"a:{n}"), background=True)

    async with asyncio.timeout(10):
        await time.run(*(request(n) for n in range(6)))
    assert pacer.granted_background == 6


async def test_sends_in_the_line_that_never_passed_the_room_count_too():
    # 12 sends joined the line without the room (requests that carry no reference, or a
    # child whose reference was dropped); 20 children arrive at once. Counting only the
    # larger of those in the line and those let out, children were let out too far and
    # 4 waited in the line longer than a send may (7 s), to be requeued as throttled.
    time = VirtualScheduler(16.0)
    pacer = Pacer(3, clock=time.clock, sleep=time.sleep, margin=0.0)
    timed_out = []

    async def child(n: int) -> None:
        async with pacer.admission(teams(), room_within(7.0), 60.0) as wait:
            assert wait == 0.0
            await time.sleep(0.05)  # its claim
            try:
                await pacer.acquire(teams(f"c:{n}"), background=True, max_wait=7.0)
            except PacingTimeout:
                timed_out.append(n)

    line = [pacer.acquire(teams(f"a:{n}"), background=True) for n in range(12)]
    await time.run(*line, *(child(n) for n in range(20)))

    assert timed_out == []
    assert pacer.lane(teams()).joining == 0 and not pacer.lane(teams()).room


async def test_a_request_let_out_joins_its_own_tenants_line_not_another():
    # Let out of tenant-a's room, a call for tenant-b in the same task (a lookup, say)
    # does not count as joining tenant-a's line: tenant-a still counts it as on its way.
    _time, pacer = room_pacer()
    async with pacer.admission(teams(), 2.0, 60.0):
        await pacer.acquire(teams("b:1", tenant="tenant-b"), background=True)
        assert pacer.lane(teams()).joining == 1
        await pacer.acquire(teams("a:1"), background=True)
        assert pacer.lane(teams()).joining == 0
    assert pacer.lane(teams(tenant="tenant-b")).joining == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_task_destroyed_while_let_out_leaves_no_request_counted_on_its_way():
    # A let-out request whose task is dropped while pending (its process's loop let go of
    # it) ends its block in another context. Counted for ever as on its way, it would sit
    # ahead of every later request of its tenant here, and keep the lane from being let go.
    _time, pacer = room_pacer()

    async def let_out_then_stuck() -> None:
        async with pacer.admission(teams(), 100.0, 60.0):
            await asyncio.get_running_loop().create_future()  # never done

    task = asyncio.ensure_future(let_out_then_stuck())
    await asyncio.sleep(0)
    lane = pacer.lane(teams())
    assert lane.joining == 1
    del task  # nothing holds the task: destroyed while pending
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0)
    assert lane.joining == 0


async def test_a_request_the_room_does_not_let_out_waits_its_whole_bound_and_is_told_the_line():
    # The line stays long (those let out before it have not joined it yet: slow storage):
    # one in the room is not put back at once (each put-back's freed invocation would
    # take the next message, and put it back too, as fast as the queue answers); it waits
    # the room's whole bound, then is told how long the line would hold it.
    time, pacer = room_pacer()
    start = time.now
    told: list[tuple[float, float]] = []
    release = asyncio.Event()

    async def holding() -> None:
        async with pacer.admission(teams(), 100.0, 60.0) as wait:
            assert wait == 0.0
            await release.wait()

    async def waiting(bound: float) -> None:
        async with pacer.admission(teams(), 2.0, bound) as wait:
            told.append((time.now - start, wait))

    holders = [asyncio.ensure_future(holding()) for _ in range(10)]
    await asyncio.sleep(0)
    await time.run(waiting(5.0), waiting(7.0))
    release.set()
    await asyncio.gather(*holders)

    [(first_at, first_wait), (second_at, second_wait)] = told
    assert (first_at, second_at) == (5.0, 7.0)  # the second, behind it, its own bound too
    assert first_wait == pytest.approx(11 / 1.94, rel=0.02)  # 10 ahead and itself
    assert second_wait == pytest.approx(11 / 1.94, rel=0.02)
    assert pacer.lane(teams()).joining == 0 and not pacer.lane(teams()).room


async def test_the_room_holds_nothing_back_without_a_rate_and_releases_on_failure():
    # Other channels have no tenant rate: let out at once, however many. One let out is
    # counted once when it joins the line (not again on a retry), and a block that ends
    # without joining (raises) is not counted after; one cancelled in the room leaves it
    # in order for the next.
    time, pacer = room_pacer()
    for n in range(50):
        async with pacer.admission(webchat(f"c:{n}"), 0.1, 60.0) as wait:
            assert wait == 0.0
    async with pacer.admission(teams(), 2.0, 60.0):
        assert pacer.lane(teams()).joining == 1
        await pacer.acquire(teams("a:1"), background=True)
        assert pacer.lane(teams()).joining == 0
        await time.run(pacer.acquire(teams("a:1"), background=True))  # a retry
    assert pacer.lane(teams()).joining == 0
    with pytest.raises(RuntimeError):
        async with pacer.admission(teams(), 2.0, 60.0):
            raise RuntimeError("the claim failed")
    assert pacer.lane(teams()).joining == 0

    release = asyncio.Event()

    async def holding() -> None:
        async with pacer.admission(teams(), 100.0, 60.0):
            await release.wait()

    holders = [asyncio.ensure_future(holding()) for _ in range(10)]
    await asyncio.sleep(0)
    cancelled = asyncio.ensure_future(pacer.admission(teams(), 2.0, 60.0).__aenter__())
    await asyncio.sleep(0)
    assert len(pacer.lane(teams()).room) == 1
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert not pacer.lane(teams()).room
    release.set()
    await asyncio.gather(*holders)
    async with asyncio.timeout(5), pacer.admission(teams(), 2.0, 60.0) as wait:
        assert wait == 0.0  # at once: the line is empty and nothing else waits


async def test_instances_sharing_two_tenants_put_back_what_would_wait_in_a_crowded_line():
    # 4 instances take a broadcast to two tenants as the host's queue listener does. Waiting,
    # an instance's invocations fill with the tenant it holds the smallest share of, while
    # its line for the other stands empty: 84-86 % of the limits over three seeds. Put back
    # instead: 90-91 %, for 11-15 % more queue messages.
    waited = [
        await broadcast_through_instances(4, TWO_TENANTS, put_back=False, seed=seed)
        for seed in range(3)
    ]
    put = [
        await broadcast_through_instances(4, TWO_TENANTS, put_back=True, seed=seed)
        for seed in range(3)
    ]
    assert statistics.mean(b.share for b in put) >= statistics.mean(b.share for b in waited) + 0.03
    assert min(b.share for b in put) >= 0.89
    assert max(b.put_back for b in put) <= 0.2 * sum(TWO_TENANTS.values())
    assert max(b.share_429 for b in put) < 0.01


async def test_a_lone_instance_puts_nothing_back_when_its_lines_keep_up():
    broadcast = await broadcast_through_instances(1, TWO_TENANTS, put_back=True)
    assert broadcast.put_back == 0 and broadcast.share_429 == 0.0
    assert broadcast.share >= 0.89  # the run's start and end included


async def test_put_backs_never_outnumber_the_sends_they_make_way_for():
    # A lone instance whose tenant A lets it through at 10/s (another app takes the rest)
    # while tenant B has 20 messages: every A message that arrives while B's line stood
    # empty could be put back, 1,583 of them for 1,220 sends (which fetched B's last message
    # at 12 s instead of 142 s) before each put-back had to be paid for by a send to the
    # other line. Now at most one per B send, and A's broadcast ends no later: put-backs
    # share out a tenant's limit, they are not a way to reorder the queue.
    messages, limits = {"A": 1200, "B": 20}, {"A": 10, "B": 50}
    waited = await broadcast_through_instances(1, messages, put_back=False, limits=limits)
    put = await broadcast_through_instances(1, messages, put_back=True, limits=limits)
    assert put.put_back <= 20
    assert put.finished["A"] <= waited.finished["A"] + 1.0


async def test_a_line_is_crowded_only_while_another_stands_nearly_empty():
    time = VirtualScheduler()
    pacer = Pacer(10, clock=time.clock, sleep=time.sleep)  # background: 9.7/s
    seen: dict[str, float] = {}

    async def line_of_eighty():
        await asyncio.gather(*(pacer.acquire(teams(), background=True) for _ in range(80)))

    async def look():
        await time.sleep(0.01)  # 79 wait in tenant-a's line (the first was granted at 0)
        seen["alone"] = pacer.crowded_wait(teams())
        await pacer.acquire(teams(tenant="tenant-c"))  # a reply: not background work
        seen["beside a reply"] = pacer.crowded_wait(teams())
        await pacer.acquire(teams(tenant="tenant-b"), background=True)
        seen["beside an empty line"] = pacer.crowded_wait(teams())
        seen["again, its one grant spent"] = pacer.crowded_wait(teams())
        seen["the empty line"] = pacer.crowded_wait(teams(tenant="tenant-b"))
        seen["a lane never used"] = pacer.crowded_wait(teams(tenant="tenant-d"))
        await pacer.acquire(webchat("c:1"), background=True)
        seen["webchat"] = pacer.crowded_wait(webchat("c:2"))
        await pacer.acquire(teams(tenant="tenant-b"), background=True)
        await time.sleep(5.1)  # tenant-b's background traffic stopped 5 s ago
        seen["tenant-b gone quiet"] = pacer.crowded_wait(teams())

    await time.run(line_of_eighty(), look())

    # The next grant 0.093 s away, then one interval for each of the 79.
    assert seen["beside an empty line"] == pytest.approx(0.093 + 79 / 9.7, abs=0.001)
    assert seen["alone"] == seen["beside a reply"] == 0.0
    assert seen["again, its one grant spent"] == 0.0
    assert seen["the empty line"] == seen["a lane never used"] == seen["webchat"] == 0.0
    assert seen["tenant-b gone quiet"] == 0.0


@pytest.mark.parametrize(
    ("line_a", "line_b"),
    [(10, 3), (20, 10)],  # 9 wait in a's line (0.93 s); 19 (1.96 s) beside 9 in b's (0.93 s)
)
async def test_a_line_is_not_crowded_while_short_or_while_the_others_are_long_too(line_a, line_b):
    time = VirtualScheduler()
    pacer = Pacer(10, clock=time.clock, sleep=time.sleep)  # background: 9.7/s
    seen: list[float] = []

    async def line(tenant: str, count: int):
        await asyncio.gather(
            *(pacer.acquire(teams(tenant=tenant), background=True) for _ in range(count))
        )

    async def look():
        await time.sleep(0.01)
        seen.append(pacer.crowded_wait(teams(tenant="tenant-a")))
        seen.append(pacer.crowded_wait(teams(tenant="tenant-b")))

    await time.run(line("tenant-a", line_a), line("tenant-b", line_b), look())
    assert seen == [0.0, 0.0]


@pytest.mark.parametrize("count", [2, 4])
async def test_instances_with_jitter_and_a_small_limit_settle_without_a_429_storm(count):
    # The broadcast benchmark's paced run: 15/s per tenant, so each of 4 instances sends
    # 3-4 requests in a second and their even streams line up now and then. Most 429s
    # come in the first seconds, when each instance starts at the whole limit (4 instances:
    # 1.9 % of 100 s here, 1.2 % after the first 10; the old fixed 30 % cut: 4.4 %).
    achieved, share_429, later = await instances_sharing_a_tenant(count, limit=15, jitter=True)
    assert achieved >= 0.86
    assert share_429 < 0.025 and later < 0.015


@pytest.mark.parametrize(("count", "limit", "conversations"), [(8, 50, 4), (4, 15, 2)])
async def test_instances_each_sending_to_a_few_conversations_settle_without_a_429_storm(
    count, limit, conversations
):
    # A full tenant answers 429 to whichever request comes next: when each instance sends
    # to a few conversations, each of them draws 429 after 429. Taken every time for that
    # conversation's own limit (its 429 within a minute of its last), they stopped cutting
    # the instances' rates: 19.4 % of the requests answered 429 (8 instances with 4
    # conversations each at 50/s) and 30.9 % (4 with 2 at 15/s, 75 % of the limit). Now
    # only a conversation that no other has drawn a 429 between is: 2.0 and 3.2 %
    # (1.7 and 1.9 % when every 429 counted as the tenant's).
    achieved, share_429, later = await instances_sharing_a_tenant(
        count, limit=limit, jitter=True, conversations=conversations
    )
    assert share_429 < 0.04 and later < 0.03
    assert achieved >= 0.9


async def one_lane_far_from_its_connector(senders: int, seed: int, request):
    """``senders`` broadcast for 60 s through one pacer into a tenant that allows 50
    requests in any second (429 with Retry-After: 1 above it). ``request(rng)`` gives each
    request's (time from its grant until it left, time to reach the channel, time for its
    answer to come back). Returns the share of the limit that reached the channel from 10 s
    on, and how many requests were answered 429."""
    time = VirtualScheduler()
    rng = random.Random(seed)
    channel = StrictWindow(50)
    accepted: list[float] = []
    throttled = 0
    scope = teams()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)

    async def sender():
        nonlocal throttled
        while time.now < 60.0:
            late, there, back = request(rng)
            granted = await pacer.acquire(scope, background=True)
            await time.sleep(late)
            left = time.now  # the Connector client tells the pacer as the request is written
            pacer.left(scope, granted, left)
            await time.sleep(there)
            if not channel.admit(time.now):
                throttled += 1
                pacer.throttled(scope, 1.0, granted, left)
                await time.sleep(1.0)
                continue
            accepted.append(time.now)
            await time.sleep(back)

    await time.run(*(sender() for _ in range(senders)))
    sent = sum(1 for arrived in accepted if 10.0 <= arrived < 60.0)
    return sent / 50.0 / 50, throttled


async def test_a_distant_connector_does_not_cost_the_lane_its_rate():
    # Teams answers in some hundreds of milliseconds. Counting each request from its
    # answer would hold every window a round trip longer: 77 % of the rate at 300 ms.
    def request(rng):  # 150 ms there, 100-200 ms back, less evenly
        return 0.0, 0.15 + rng.random() * 0.005, 0.1 + rng.random() * 0.1

    achieved, throttled = await one_lane_far_from_its_connector(64, 7, request)
    assert achieved >= 0.95 and throttled == 0


async def test_operations_with_different_round_trips_do_not_cost_the_lane_its_rate():
    # Sending to users creates each conversation, then sends to it, in the same tenant:
    # createConversation taking longer to answer than a send (the channel's work, after
    # the request reached it) is not lateness. Judged from round trips against one usual
    # one for both, every slow one held the window longer: 86 % of the rate.
    def request(rng):
        slow = rng.random() < 0.5
        return 0.0, 0.1 + rng.random() * 0.005, (0.7 if slow else 0.1) + rng.random() * 0.005

    achieved, throttled = await one_lane_far_from_its_connector(96, 11, request)
    assert achieved >= 0.95 and throttled == 0


@pytest.mark.parametrize("spread", [0.4, 0.8])
async def test_answers_that_come_back_at_varying_times_do_not_cost_the_lane_its_rate(spread):
    # A far Connector answers a request that reached it on time anywhere from 50 ms to
    # 50 ms + spread later (the server's own jitter): round trips of 0.1-0.5 s or 0.1-0.9 s
    # against a steady 0.3 s. Judged from the round trip, a slow answer read as a request
    # that left late and held the window for nothing: 91.6 % of the limit at a 0.4-s
    # spread, 87.0 % at 0.8, against 97 % with steady answers. Counted from when each
    # request left, nothing is lost.
    def steady(rng):
        return 0.0, 0.05, 0.25

    def jittery(rng):
        return 0.0, 0.05, 0.05 + rng.random() * spread

    without, throttled_without = await one_lane_far_from_its_connector(96, 3, steady)
    achieved, throttled = await one_lane_far_from_its_connector(96, 3, jittery)
    assert without >= 0.96 and throttled_without == 0
    assert achieved >= without - 0.01 and throttled == 0


@pytest.mark.parametrize("spread", [0.4, 0.8, 1.4])
async def test_requests_that_left_late_hold_back_a_far_lane_without_a_429(spread):
    # One request in 20 left 100-200 ms after its grant (a busy event loop, a descheduled
    # process, a wait for a pooled connection), answered 0.1 s to 0.1 s + spread after it
    # left: counted from when it left, the ones granted after it wait instead of arriving
    # bunched with it in the channel's strict window. Told only once answered, the lane
    # counted a request from its grant until then: with answers up to 0.9 s, 2-3 429s a
    # minute (95 % of the limit); up to 1.5 s, 2-6 (86-89 %).
    def request(rng):
        late = rng.uniform(0.1, 0.2) if rng.random() < 0.05 else 0.0
        return late, 0.05, 0.05 + rng.random() * spread

    achieved, throttled = await one_lane_far_from_its_connector(160, 5, request)
    assert throttled == 0 and achieved >= 0.93


async def broadcast_beside_replies(limit: int, reply_rate: float, seed: int, seconds=100.0):
    """One instance broadcasts into a tenant that allows ``limit`` requests in any second
    (with a real host's jitter), while users' messages bring replies at random, on average
    ``reply_rate`` a second, each into a conversation of its own. Returns the share of the
    limit the broadcast got through, and how many replies there were and were answered 429."""
    time = VirtualScheduler()
    rng = random.Random(seed)
    noise = Jitter(rng, True)
    channel = StrictWindow(limit)
    sent = 0
    replies: list[bool] = []
    fresh = itertools.count()

    async def sleep(seconds: float) -> None:
        await time.sleep(seconds + noise.wake_up())

    pacer = Pacer(limit, clock=time.clock, sleep=sleep)

    async def broadcast():
        nonlocal sent
        scope = teams(f"a:{next(fresh)}")
        while time.now < seconds:
            admitted, _ = await send_once(time, noise, channel, pacer, scope)
            if admitted:
                sent += 1
                scope = teams(f"a:{next(fresh)}")

    async def reply(scope: Scope):  # interactive: never waits for the tenant
        admitted, _ = await send_once(time, noise, channel, pacer, scope, background=False)
        replies.append(admitted)

    async def users():
        pending = []
        while time.now < seconds:
            await time.sleep(rng.expovariate(reply_rate))
            pending.append(asyncio.ensure_future(reply(teams(f"user:{len(pending)}"))))
        await asyncio.gather(*pending)

    await time.run(*(broadcast() for _ in range(8)), users())
    return sent / seconds / limit, len(replies), replies.count(False)


@pytest.mark.parametrize(
    ("limit", "reply_rate", "most_throttled"), [(50, 3.0, 0.003), (15, 0.3, 0.05)]
)
async def test_replies_beside_a_broadcast_find_room_in_the_tenants_window(
    limit, reply_rate, most_throttled
):
    # While replies come, background keeps ceil(limit x 3 %) of every second free,
    # counting the replies already in it: 0 of 905 replies answered 429 at 50/s, 3 of 103
    # at 15/s (each run's first reply, after a quiet spell, when 15/s keeps no room).
    # Spacing alone (at 97 % of the rate) left the window to chance: 10 of 906 (1.1 %)
    # and 14 of 100, whose cuts took the broadcast at 15/s down to 84 % of the limit.
    outcomes = [await broadcast_beside_replies(limit, reply_rate, seed) for seed in range(3)]
    replies = sum(count for _, count, _ in outcomes)
    throttled = sum(refused for _, _, refused in outcomes)
    assert replies > 200 * reply_rate  # they did come, throughout the runs
    assert throttled / replies < most_throttled
    assert min(achieved for achieved, _, _ in outcomes) >= 0.87  # the broadcast still runs


async def broadcast_beside_a_throttled_thread(busy_rate: float, thread_seconds: float):
    """One instance broadcasts for 120 s into a tenant that allows 50 requests in any
    second, while a proactive stream sends ``busy_rate`` per second to one conversation the
    channel holds to 1 request per ``thread_seconds`` (a thread limit the pacer does not
    know), answering 429 (Retry-After: 1) above it; each is sent again after its wait.
    Returns the share of the limit the broadcast reached from 10 s on, and how many of
    its requests the tenant's window refused."""
    time = VirtualScheduler()
    rng = random.Random(1)
    tenant, thread = StrictWindow(50), deque()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    conversations = itertools.count()
    outcome = {"broadcast": 0, "tenant_429": 0}

    async def send(scope: Scope, busy: bool) -> float:
        while True:
            granted = await pacer.acquire(scope, background=True)
            await time.sleep(0.05)  # on the way
            while thread and thread[0] <= time.now - thread_seconds:
                thread.popleft()
            if busy and thread:
                refused = True
            else:
                refused = not tenant.admit(time.now)
                outcome["tenant_429"] += refused
            if refused:
                await time.sleep(0.05)
                pacer.throttled(scope, 1.0, granted)
                await time.sleep(1.0)
                continue
            if busy:
                thread.append(time.now)
            arrived = time.now
            await time.sleep(0.1 + rng.random() * 0.1)
            return arrived

    async def broadcast():
        while time.now < 120.0:
            if 10.0 <= await send(teams(f"a:{next(conversations)}"), False) < 120.0:
                outcome["broadcast"] += 1

    async def busy():
        while time.now < 120.0:
            await send(teams("19:busy@thread.v2"), True)
            await time.sleep(1.0 / busy_rate)

    await time.run(*(broadcast() for _ in range(16)), busy())
    return outcome["broadcast"] / 110.0 / 50, outcome["tenant_429"]


@pytest.mark.parametrize(("busy_rate", "thread_seconds"), [(2.0, 1.0), (0.5, 5.0)])
async def test_one_conversation_answered_429_again_and_again_does_not_cut_the_tenant(
    busy_rate, thread_seconds
):
    # Teams limits a thread in ways the pacer does not model. Each such 429 cut the whole
    # tenant (up to 60 % a time, cuts upon cuts): the broadcast beside it got 53 % of the
    # limit (a conversation held to 1 send per second, sent 2) or 15 % (1 per 5 s, sent
    # one every 2 s). Its first 429 may still cut; its next ones are its own limit.
    achieved, tenant_429 = await broadcast_beside_a_throttled_thread(busy_rate, thread_seconds)
    assert achieved >= 0.93 and tenant_429 == 0


def test_a_conversation_answered_429_again_cuts_nothing_but_another_one_does():
    lane = AdaptiveRate(50.0)
    now = through(lane, 0.0, 1.0, 49.0)
    assert lane.throttled(now, 1.0, sent_at=now - 0.01, conversation="a:busy")
    now = through(lane, now + 10.0, 1.0, 49.0)  # back at the ceiling
    # The same conversation again, 11 s later: its own limit, not the tenant's.
    assert not lane.throttled(now, 1.0, sent_at=now - 0.01, conversation="a:busy")
    assert lane.rate(now) == 50.0 and lane.background_wait(now) < 0.1  # no pause either
    # Another conversation's 429 is taken as the tenant's, as is one for no conversation.
    assert lane.throttled(now + 0.1, 1.0, sent_at=now, conversation="a:other")
    later = through(lane, now + 10.0, 1.0, 49.0)
    assert lane.throttled(later, 1.0, sent_at=later - 0.01)
    # Others have drawn 429s since its last: the tenant is full, and its next 429 says so.
    again = through(lane, later + 10.0, 1.0, 49.0)
    assert lane.throttled(again, 1.0, sent_at=again - 0.01, conversation="a:busy")


def test_a_conversation_told_to_wait_long_is_its_own_limit_when_answered_429_again():
    # A thread's limit may ask for minutes (Retry-After: 120): the request is sent again
    # only after that wait (the client's retry, the proactive engine's requeue), and its
    # next 429 is still that thread's, not the tenant's.
    lane = AdaptiveRate(50.0)
    now = through(lane, 0.0, 1.0, 49.0)
    assert lane.throttled(now, 120.0, sent_at=now - 0.01, conversation="a:busy")
    now = through(lane, now + 120.0, 1.0, 49.0)
    assert not lane.throttled(now, 120.0, sent_at=now - 0.01, conversation="a:busy")
    assert lane.rate(now) == 50.0 and lane.background_wait(now) < 0.1
    # A minute after the wait it asked for, it is forgotten.
    now = through(lane, now + 181.0, 1.0, 49.0)
    assert lane.throttled(now, 1.0, sent_at=now - 0.01, conversation="a:busy")


async def test_background_waits_after_a_429_but_replies_do_not():
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    granted = await pacer.acquire(teams("a:1"), background=True)
    pacer.throttled(teams("a:1"), 2.0, granted)
    assert await pacer.acquire(teams("a:2")) == 0.0
    await time.run(pacer.acquire(teams("a:3"), background=True))
    # The pause, then the reply's slot at the cut rate (20/s: nothing got through, and a
    # 429 cuts at most 60 %).
    assert time.now == pytest.approx(0.25 + 1 / 20, abs=0.01)
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


async def test_a_conversation_told_to_wait_long_keeps_no_idle_conversation_in_memory():
    # One conversation answered Retry-After: 3600 stayed first in line to be forgotten,
    # and every idle conversation after it stayed too (12,001 after 10 minutes).
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep)
    granted = await pacer.acquire(teams("a:throttled"))
    pacer.throttled(teams("a:throttled"), 3600.0, sent_at=granted)
    for n in range(12_000):  # 20/s for 10 minutes, each a conversation of its own
        time.now += 0.05
        await pacer.acquire(teams(f"a:{n}"))

    assert pacer.tracked_conversations < 1000
    # ... and the one told to wait still waits.
    before = time.now
    await time.run(pacer.acquire(teams("a:throttled"), background=True))
    assert time.now >= before + 3600 - 600 - 1


async def test_a_long_wait_outlives_many_shorter_ones_forgotten_after_it():
    # The waits of forgotten conversations were dropped in the order they were forgotten:
    # shorter waits, ended, piled up behind a long one, and over the cap the long one
    # went first: its conversation was sent to an hour early (and drew another 429).
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep, max_conversations=100)
    granted = await pacer.acquire(teams("a:long"))
    pacer.throttled(teams("a:long"), 3600.0, sent_at=granted)
    for n in range(300):  # 2/s, each told to wait 40 s: about 80 waits live at a time
        time.now += 0.5
        granted = await pacer.acquire(teams(f"a:{n}"))
        pacer.throttled(teams(f"a:{n}"), 40.0, sent_at=granted)

    await time.run(pacer.acquire(teams("a:long"), background=True))
    assert time.now >= 3600.0 - 1


async def test_a_429_for_a_conversation_forgotten_meanwhile_still_holds_it():
    # Answered after its conversation was forgotten (a late answer): the wait was lost.
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep)
    granted = await pacer.acquire(teams("a:x"))
    time.now += 31.0
    await pacer.acquire(teams("a:other"))  # forgets a:x, idle
    pacer.throttled(teams("a:x"), 600.0, sent_at=granted)

    before = time.now
    await time.run(pacer.acquire(teams("a:x"), background=True))
    assert time.now >= before + 600 - 1


async def test_conversations_told_to_wait_long_are_not_walked_by_every_send():
    # Kept at the back of the forgetting line, 10,000 of them were moved again by each
    # send to a busy conversation behind them (3.5 ms of the event loop per send). Their
    # waits alone are kept; each still waits when it comes back.
    time = VirtualScheduler()
    pacer = Pacer(100_000, clock=time.clock, sleep=time.sleep)
    for n in range(1000):
        granted = await pacer.acquire(teams(f"a:{n}"))
        pacer.throttled(teams(f"a:{n}"), 3600.0, sent_at=granted)
    time.now += 60.0  # all of them idle, their waits not over
    await pacer.acquire(teams("a:busy"))

    assert pacer.tracked_conversations == 1
    await time.run(pacer.acquire(teams("a:999"), background=True))
    assert time.now >= 3600.0 - 1


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


def test_hours_of_probing_without_a_429_keep_the_lane_at_its_ceiling():
    # The probe's pace doubles every 30 s: after hours without a 429 its weight would
    # overflow a float (2.0 ** 1024) and every grant of the lane would raise.
    lane = AdaptiveRate(50.0)
    through(lane, 9.01, 0.98, 25.0)
    assert lane.throttled(10.0, 1.0, sent_at=9.99)
    assert lane.rate(10.0 + 10 * 3600.0) == pytest.approx(50.0)


async def storm_alert(time: VirtualScheduler, pacer: Pacer, at: float = 0.0) -> None:
    """One alert into "19:alerts" from `at`, requeued after each PacingTimeout, as the
    proactive engine does, until it is sent."""
    await time.sleep(at)
    while True:
        try:
            await pacer.acquire(teams("19:alerts"), background=True, max_wait=7.0)
            return
        except PacingTimeout as timeout:
            await time.sleep(timeout.wait)


async def reply_wait(time: VirtualScheduler, pacer: Pacer) -> float | str:
    """How long a reply into "19:alerts" waited for its slot, or "refused"."""
    asked = time.now
    try:
        await pacer.acquire(teams("19:alerts"), max_wait=7.0)
    except PacingTimeout:
        return "refused"
    return time.now - asked


@pytest.mark.parametrize("reply_at", [3.0, 16.0, 29.0])
async def test_background_sends_to_a_conversation_leave_room_for_a_reply_there(reply_at):
    # An alert storm into a channel (each send requeued after a PacingTimeout, as the
    # proactive engine does), then a user's @mention there: the reply is not refused.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    replied: list[float | str] = []

    async def reply() -> None:
        await time.sleep(reply_at)
        replied.append(await reply_wait(time, pacer))

    await time.run(*(storm_alert(time, pacer) for _ in range(100)), reply())
    assert replied != ["refused"] and replied[0] < 1.0


@pytest.mark.parametrize("turn_at", [20.0, 33.0, 41.0, 47.3, 52.0, 58.5])
async def test_a_storm_into_a_channel_leaves_room_for_a_turns_three_messages(turn_at):
    # Two or three messages a turn (or a reply and the apology): with one slot of the 30-s
    # window left to replies, the second waited for the storm's oldest send, seconds past
    # its budget.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    waits: list[float | str] = []

    async def turn() -> None:
        await time.sleep(turn_at)
        for _ in range(3):
            waits.append(await reply_wait(time, pacer))
            await time.sleep(0.3)

    alerts = (storm_alert(time, pacer, at=n / 20) for n in range(400))  # 20 a second
    await time.run(*alerts, turn())
    assert "refused" not in waits and max(waits) < 2.0, waits


async def test_a_conversation_that_asked_to_wait_gets_no_background_request_meanwhile():
    # Its 429 said 60 s (a limit of its own): every other queued message to it was sent
    # and refused in turn, each then requeued for the same minute.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)

    async def scenario() -> None:
        granted = await pacer.acquire(teams("19:busy"), background=True, max_wait=7.0)
        pacer.throttled(teams("19:busy"), 60.0, granted)
        with pytest.raises(PacingTimeout) as refused:
            await pacer.acquire(teams("19:busy"), background=True, max_wait=7.0)
        assert refused.value.wait == pytest.approx(60.0, abs=0.5)  # requeued for that long
        await pacer.acquire(teams("19:other"), background=True, max_wait=7.0)  # others go on
        await pacer.acquire(teams("19:busy"), max_wait=7.0)  # a user's reply is not held
        await time.sleep(60.0)
        await pacer.acquire(teams("19:busy"), background=True, max_wait=7.0)

    await time.run(scenario())


async def test_a_wait_woken_past_its_deadline_takes_no_slot():
    # A busy event loop wakes the wait late: granted then, the request would be counted in
    # the conversation's window and the tenant's rate, and its caller, out of time, sends
    # nothing.
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.3

    pacer = Pacer(50, clock=lambda: now[0], sleep=late_sleep)
    for _ in range(7):
        await pacer.acquire(teams("a:1"))
    with pytest.raises(PacingTimeout):
        await pacer.acquire(teams("a:1"), max_wait=1.2)
    assert pacer.granted == 7  # counted nowhere


async def test_a_background_send_timed_out_spends_no_turn_of_its_tenant():
    # Replies filled its conversation's window while it waited in the tenant's line.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep)
    timed_out: list[float] = []

    async def others(n: int) -> None:
        await pacer.acquire(teams(f"b:{n}"), background=True)

    async def replies() -> None:
        await time.sleep(0.3)
        for _ in range(7):
            await pacer.acquire(teams("a:user"))

    async def proactive() -> None:
        await time.sleep(0.001)
        with pytest.raises(PacingTimeout):
            await pacer.acquire(teams("a:user"), background=True, max_wait=0.8)
        timed_out.append(pacer.granted_background)

    await time.run(*(others(n) for n in range(30)), replies(), proactive())
    assert timed_out == [30]  # the others' turns only


async def test_a_conversation_s_windows_count_a_send_from_when_it_left():
    # A send that left late (a busy event loop) is counted from then: the next ones do
    # not arrive inside a window the channel still counts it in.
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    scope = teams("a:user")
    arrivals: list[float] = []

    async def sends() -> None:
        for n in range(20):
            granted = await pacer.acquire(scope)
            left = granted + (0.3 if n % 7 == 0 else 0.0)
            pacer.left(scope, granted, left)
            arrivals.append(left)

    await time.run(sends())
    assert_within(arrivals, TEAMS_CONVERSATION_WINDOWS)


async def test_a_teams_request_that_names_no_tenant_counts_against_its_conversation_s_tenant():
    # A delete has no body, a reference target may carry no tenant: with the stored sends
    # to the same tenant they took about 98 background requests in a second (limit 50).
    time = VirtualScheduler()
    pacer = Pacer(50, clock=time.clock, sleep=time.sleep, margin=0.0)
    await pacer.acquire(teams("a:known"))  # a reply named the tenant once
    grants: list[float] = []

    async def send(scope: Scope) -> None:
        await pacer.acquire(scope, background=True)
        grants.append(time.now)

    unnamed = Scope("msteams", None, "a:known", "smba.trafficmanager.net:443")
    stored = [teams(f"a:{n}") for n in range(60)]
    await time.run(*(send(unnamed) for _ in range(60)), *(send(scope) for scope in stored))
    assert max_in_window(grants, 1.0) <= 50


def test_a_send_whose_grant_fell_out_of_the_window_log_is_counted_when_it_left():
    # It waited over a second for its conversation's window, outside the tenant's line,
    # while 50 others were granted: it is counted from when it left all the same.
    lane = AdaptiveRate(50.0, 0.97)
    lane.record(0.0, True)
    for n in range(1, 51):
        lane.record(n * 0.02, True)
    lane.left(0.0, 1.5)
    assert 1.5 in lane.counted and len(lane.counted) == 50
