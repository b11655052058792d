"""Outbound pacing that follows what the channel enforces, and learns from its 429s.

The model (README, "Pacing"):

- **Per conversation, only where the channel has limits.** Teams allows a bot 7 sends per
  second, 8 per 2 seconds and 60 per 30 seconds in one conversation: those windows are
  kept per Teams conversation (a sliding-window log). Other channels publish no such
  limits, so their conversations are not held back at all.
- **Per app and tenant, not per process.** Teams also allows about 50 requests per second
  per app per tenant, across every instance of the app, counted in a strict 1-s window.
  Each process keeps one :class:`AdaptiveRate` per Teams tenant. It starts at that
  ceiling (a lone instance gets the whole tenant) and keeps to the window by when
  requests left (the Connector client measures it as each request is written), not when
  they were granted: one that left late holds back those after it rather than arriving
  bunched with them. On a 429 the request waits the server's ``Retry-After``, and the
  rate is cut by what the 429 says: a lone 429 at the ceiling with nearly all of the last
  second through cuts a little and recovers fully; otherwise others share the tenant,
  and the rate drops to what the channel let through from this instance in the last
  second (30-60 % off), recovers halfway within 5 s, then probes upwards, by a share of
  its own rate (so N instances together probe as fast as one), faster the longer no 429
  comes. N instances that
  share a tenant so settle near 1/N of the limit each, together close to it, with a 429
  now and then rather than a storm. A conversation answered 429 again
  within a minute of the wait its last 429 asked for, none other in between, is held by
  a limit of its own (a Teams thread's): its 429s no longer cut the tenant. Other
  channels get a lane per (channel, service host) with no ceiling that only honours
  ``Retry-After``.
- **Replies are never held behind broadcasts.** Interactive requests (a reply in a user's
  turn) wait only for their conversation's windows, never for a tenant rate; they are
  counted in it, so background traffic yields to them. Background requests (proactive
  sends, broadcasts) wait in a FIFO line per tenant, evenly spaced at ``background_share``
  of the tenant's current rate, which keeps headroom for replies.

Sends to one conversation go out one at a time in call order (a FIFO lock per
conversation), so replies arrive in the order the bot wrote them; within a conversation,
order wins over class.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from shared.thread_limits import ThreadLimits

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

TEAMS = "msteams"
DEFAULT_TENANT_RATE = 50.0  # Teams: about 50 requests per second per app per tenant
# Of a tenant's rate; the rest is headroom for replies (at 50/s, 1.5 requests/s: any
# second of a broadcast holds 48 or 49, so a reply still fits in the window).
DEFAULT_BACKGROUND_SHARE = 0.97
DEFAULT_RETRY_AFTER = 1.0  # a 429 that did not say how long to wait
# A lane is never cut below this share of its ceiling (0.25/s of Teams' 50/s; a lane
# without a ceiling is never cut, only paused): the Functions host may run a hundred or
# more instances on one broadcast's queue, and a floor that many instances together
# exceed would be a 429 storm nothing could cut. The price, with a small ceiling shared
# by several instances: a lane cut that low spaces its background requests far apart
# (tests/unit/test_ratelimit.py's simulation, 8 instances on a 5/s tenant: lanes cut to
# 0.06-0.09/s, 12-17 s between two of their requests, 69 % of the limit and 7 % of the
# requests answered 429 after the first 10 s; with a fixed 0.5/s floor 80 %, but 24 %).
MIN_SHARE = 0.005
# The throttled request itself waits the whole Retry-After (the Connector client's retry,
# or the proactive engine's requeue); the rest of its tenant's background traffic pauses
# for this share of it, at most MAX_PAUSE, then goes on at the cut rate. A whole-second
# pause of every instance at once costs more sends than the cut saves (measured:
# tests/unit/test_ratelimit.py, N instances on one tenant), and a long Retry-After is
# more likely one conversation's limit than the tenant's.
PAUSE_SHARE = 0.25
MAX_PAUSE = 0.25  # seconds
# What a 429 does to the rate (AdaptiveRate.throttled). At the ceiling, with at least
# 1 - LONE_CUT of it through in the last second, a 429 says little (a reply that found
# the window full, a brief burst from elsewhere): LONE_CUT off, back within
# RECOVERY_SECONDS. Otherwise other instances share the tenant: the rate drops to what
# got through from this one in the last second, at least CUT_MIN and at most CUT_MAX off,
# climbs halfway back within RECOVERY_SECONDS, then grows by PROBE_SHARE of where it
# climbed back to per second, a pace that doubles every PROBE_DOUBLING seconds without a
# 429. By a share of its own rate: an instance at 1/N of the tenant probes at 1/N of one
# alone's pace, so N instances together probe as one would, however many the host runs.
# Faster the longer no 429 comes: the instance left when the host scales in (or whose
# peers moved on) takes the tenant back within minutes. Measured in
# tests/unit/test_ratelimit.py's simulation with a real host's jitter, 100 s on a 50/s
# tenant, against the alternatives (a fixed 30 % cut, a full quick recovery, faster or
# accelerating probes by a share of the ceiling, a probe by a share of its own rate that
# does not accelerate): 2-32 instances at 92-95 % of the limit, 0.1-1.8 % of their
# requests answered 429 after the first 10 s (by 0.2 % of the ceiling, as before: 0.4 /
# 1.1 / 3.5 / 8.2 % with 4 / 8 / 16 / 32 instances); most 429s come in the first seconds,
# when every instance starts at the whole limit. 20 instances, then 1: the one left had
# 71 % of the limit in the fourth minute after (before: 46 %; not accelerating: 7 %).
LONE_CUT = 0.1
CUT_MIN = 0.3
CUT_MAX = 0.6
RECOVERY_SECONDS = 5.0
PROBE_SHARE = 0.004
PROBE_DOUBLING = 30.0
# The channel counts a tenant's requests in a strict 1-s window, by when they arrive.
# Besides spacing its grants, a lane keeps the times of its last `ceiling` requests, each
# from when it left (the grant until then), and grants no background request while that
# many fall inside WINDOW_SECONDS + WINDOW_MARGIN: a request that was late leaving (a busy
# event loop, a descheduled process, a wait for a pooled connection) delays the ones after
# it instead of arriving bunched with them. The way to the channel takes about as long
# for every request, so it changes nothing; how long the answer takes does not count at
# all. Even spacing alone tolerated only ~1/share - 1 s (42 ms at 96 %) of lateness; the
# benchmark's hosts were late by up to 100-200 ms.
WINDOW_SECONDS = 1.0
WINDOW_MARGIN = 0.01


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` events in any interval of ``seconds``."""

    limit: int
    seconds: float


# Teams "per bot per thread" limits (1800/hour is left to the channel: a bot that sends
# that much to one conversation has a product problem, not a pacing one).
TEAMS_CONVERSATION_WINDOWS: tuple[Window, ...] = (
    Window(7, 1.0),
    Window(8, 2.0),
    Window(60, 30.0),
)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a request goes, as far as pacing is concerned.

    ``channel_id`` and ``tenant_id`` select the limits (Teams: per conversation and per
    tenant); ``service`` (the serviceUrl's host) groups requests when no tenant is known;
    ``conversation`` is the pacing key of the conversation (None for other calls).
    """

    channel_id: str | None = None
    tenant_id: str | None = None
    conversation: str | None = None
    service: str = ""

    @property
    def teams(self) -> bool:
        return self.channel_id == TEAMS

    @property
    def lane(self) -> tuple[str, str]:
        if self.teams:
            return (TEAMS, f"tenant:{self.tenant_id}" if self.tenant_id else self.service)
        return (self.channel_id or "", self.service)


class PacingTimeout(Exception):
    """No slot within the caller's ``max_wait``; nothing was recorded.

    ``wait`` is how much longer the caller would have had to wait (an estimate when it
    was still queued behind other callers).
    """

    def __init__(self, wait: float) -> None:
        super().__init__(f"no request slot in time (next in about {wait:.2f} s)")
        self.wait = wait


class SlidingWindowLog:
    """The times of recent events, enough to check every window."""

    __slots__ = ("_span", "_times", "windows")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.windows = tuple(windows)
        self._times: deque[float] = deque(maxlen=max(w.limit for w in self.windows))
        self._span = max(w.seconds for w in self.windows)

    def wait_time(self, now: float, margin: float = 0.0) -> float:
        """Seconds until one more event fits in every window (0 when it fits now)."""
        wait = 0.0
        count = len(self._times)
        for window in self.windows:
            if count >= window.limit:
                # The window is full when the limit-th most recent event is still inside it.
                oldest = self._times[count - window.limit]
                wait = max(wait, oldest + window.seconds + margin - now)
        return wait

    def record(self, now: float) -> None:
        self._times.append(now)

    def idle(self, now: float, margin: float = 0.0) -> bool:
        """True when no recorded event can constrain a future one any more."""
        return not self._times or self._times[-1] + self._span + margin <= now


class AdaptiveRate:
    """One app-wide request rate (a Teams tenant), learnt from the channel's 429s.

    Before any 429 the rate is ``ceiling`` (None: no ceiling, only pauses). A 429 pauses
    background traffic for PAUSE_SHARE of the server's Retry-After (at most MAX_PAUSE)
    and cuts the rate (:meth:`_cut`); from there it follows a concave cubic curve up to
    the peak :meth:`_cut` chose, reached after RECOVERY_SECONDS, then grows past it by
    PROBE_SHARE of that peak per second, a pace that doubles every PROBE_DOUBLING
    seconds. 429s for requests granted before the last cut do not cut again: they were
    sent at the old rate. Background grants are evenly spaced
    (no bursts a sliding window would count twice), with one interval of catch-up when
    the caller was late, and never more than ``ceiling`` of them, replies included, in
    the channel's window by when they left, as :meth:`left` tells.
    """

    __slots__ = (
        "_counted",
        "_cut_at",
        "_floor",
        "_lowest",
        "_next",
        "_paused_until",
        "_peak",
        "_thread_limits",
        "_window_limit",
        "ceiling",
        "line",
        "used_at",
    )

    def __init__(self, ceiling: float | None) -> None:
        self.ceiling = ceiling
        self.line = _LoopLock()  # background requests queue here, in order
        self._next = float("-inf")  # earliest time of the next background grant
        self._paused_until = float("-inf")
        self._peak = ceiling or 0.0
        self._floor = self._peak
        self._cut_at: float | None = None
        self._thread_limits = ThreadLimits()
        self.used_at = float("-inf")
        # The last `ceiling` requests the channel counted (or may yet count): the grant
        # time, replaced by when the request left once that is known; 429s are dropped
        # (not counted). Kept sorted: the earliest leaves the channel's window first.
        self._counted: list[float] = []
        self._window_limit = max(1, int(ceiling)) if ceiling else 0
        self._lowest = ceiling * MIN_SHARE if ceiling else 0.0

    def rate(self, now: float) -> float | None:
        """Requests per second this instance may send now (None: not limited)."""
        if self._cut_at is None:
            return self.ceiling
        elapsed = now - self._cut_at
        if elapsed < RECOVERY_SECONDS:  # concave: quickly most of the way, then carefully
            left = 1.0 - elapsed / RECOVERY_SECONDS  # 1 at the cut, 0 back at the peak
            rate = self._peak - (self._peak - self._floor) * left**3
        else:
            probing = elapsed - RECOVERY_SECONDS
            rate = self._peak * (1.0 + PROBE_SHARE * _accelerating(probing))
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        return max(self._lowest, rate)

    def background_wait(self, now: float) -> float:
        wait = max(self._paused_until, self._next) - now
        if self._window_limit and len(self._counted) >= self._window_limit:
            wait = max(wait, self._counted[0] + WINDOW_SECONDS + WINDOW_MARGIN - now)
        return wait

    @property
    def counted(self) -> tuple[float, ...]:
        """When the requests the channel's window may still hold left (or were granted)."""
        return tuple(self._counted)

    def left(self, sent_at: float, left_at: float) -> None:
        """The request counted from ``sent_at`` (its grant, or an earlier ``left_at``) left
        at ``left_at``.

        Counted from then, so the ones after it wait for it to leave the window. Not from
        its answer: that would count every request a round trip late (at 300 ms, a fifth
        of the rate), and a slow answer would hold the window for nothing. Told as it
        leaves, not once answered: until then it would be counted from its grant.
        """
        if left_at > sent_at and self._forget(sent_at):
            insort(self._counted, left_at)

    def _forget(self, sent_at: float) -> bool:
        counted = self._counted
        index = bisect_left(counted, sent_at)
        if index < len(counted) and counted[index] == sent_at:
            del counted[index]
            return True
        return False  # already out of the window's reach

    def record(self, now: float, background: bool, share: float) -> None:
        self.used_at = now
        if self._window_limit:
            if len(self._counted) >= self._window_limit:
                del self._counted[0]
            insort(self._counted, now)
        rate = self.rate(now)
        if rate is None:
            return
        interval = 1.0 / (rate * share) if background else 1.0 / rate
        # A caller late by less than one interval may catch up; after a longer gap the
        # spacing starts again from now: never a burst.
        base = self._next if self._next > now - interval else now
        self._next = base + interval

    def throttled(
        self,
        now: float,
        retry_after: float | None,
        sent_at: float,
        *,
        left_at: float | None = None,
        conversation: str | None = None,
    ) -> bool:
        """Take a 429 for the request granted at ``sent_at`` (that :meth:`left` at
        ``left_at``, if it was told) into account; True when it cut the rate.

        A conversation answered 429 again within CONVERSATION_429_SECONDS after the wait
        its last 429 asked for, no other answered 429 in between, is held by a limit of
        its own (a Teams thread's): that 429 neither pauses nor cuts the tenant
        (shared/thread_limits.py).
        """
        self._forget(sent_at if left_at is None else left_at)  # the channel did not count it
        wait = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        if self.ceiling is not None and self._thread_limits.own_limit(now, conversation, wait):
            return False
        pause = min(wait * PAUSE_SHARE, MAX_PAUSE)
        self._paused_until = max(self._paused_until, now + pause)
        if self._cut_at is not None and sent_at < self._cut_at:
            return False  # sent at the old rate, already cut for
        current = self.rate(now)
        if current is None:
            return False
        floor, peak = self._cut(now, current)
        self._peak = peak
        self._floor = floor
        self._cut_at = now
        self._next = max(self._next, now + pause)
        return True

    def _cut(self, now: float, current: float) -> tuple[float, float]:
        """Where a 429 takes the rate (the floor), and where it recovers to (the peak)."""
        since = now - WINDOW_SECONDS
        through = (len(self._counted) - bisect_right(self._counted, since)) / WINDOW_SECONDS
        ceiling = self.ceiling or current
        if current >= ceiling and through >= current * (1.0 - LONE_CUT):
            # At the ceiling, and the channel took nearly all of the last window: one 429
            # that says little (a reply in a full window, a brief burst elsewhere).
            return current * (1.0 - LONE_CUT), current
        # Others share the tenant: down to what the channel let through from this lane,
        # within [CUT_MIN, CUT_MAX] below where it was.
        floor = max(
            self._lowest,
            min(current * (1.0 - CUT_MIN), max(through, current * (1.0 - CUT_MAX))),
        )
        return floor, (floor + current) / 2.0

    def idle(self, now: float) -> bool:
        """Nothing learnt that still matters: the lane can be forgotten."""
        recovered = self._cut_at is None or now - self._cut_at > 4 * RECOVERY_SECONDS
        return recovered and self._paused_until <= now and self.used_at + 60.0 <= now


class _LoopLock:
    """A FIFO asyncio lock, one per event loop (a process may run several: tests, hosts)."""

    __slots__ = ("_lock", "_loop")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock


class _Conversation:
    __slots__ = ("lock", "log", "users")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.log = SlidingWindowLog(windows)
        self.lock = _LoopLock()
        self.users = 0  # callers holding or waiting for the lock: never forget it then


class Pacer:
    """Pacing for outbound Connector requests (the module docstring has the model).

    ``await pacer.acquire(scope)`` returns the time at which one more request to
    ``scope`` may be sent: at once for most. ``background=True`` marks traffic that keeps
    to ``background_share`` of its tenant's rate and yields to interactive requests.
    ``max_wait`` bounds the wait: :class:`PacingTimeout` instead of a later slot.
    :meth:`left` tells the pacer when a request left, :meth:`throttled` about a 429.
    Memory stays bounded: conversations and lanes are forgotten when idle, and at most
    ``max_conversations`` are kept.
    """

    def __init__(
        self,
        tenant_rate: float = DEFAULT_TENANT_RATE,
        *,
        background_share: float = DEFAULT_BACKGROUND_SHARE,
        windows: Sequence[Window] = TEAMS_CONVERSATION_WINDOWS,
        margin: float = 0.05,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_conversations: int = 100_000,
    ) -> None:
        if tenant_rate <= 0:
            raise ValueError("tenant_rate must be greater than zero")
        if not 0 < background_share <= 1:
            raise ValueError("background_share must be greater than 0 and at most 1")
        self.tenant_rate = tenant_rate
        self.background_share = background_share
        self.windows = tuple(windows)
        self.margin = margin
        self._clock = clock
        self._sleep = sleep
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._lanes: OrderedDict[tuple[str, str], AdaptiveRate] = OrderedDict()
        self._max_conversations = max_conversations
        self.granted = 0
        self.granted_background = 0
        self.throttled_count = 0
        self.cuts = 0
        self.waited = 0.0

    @property
    def tracked_conversations(self) -> int:
        return len(self._conversations)

    def lane(self, scope: Scope) -> AdaptiveRate:
        """The app-wide rate ``scope`` counts against (created on first use)."""
        key = scope.lane
        lane = self._lanes.get(key)
        if lane is None:
            now = self._clock()
            while self._lanes:  # forget lanes nothing is waiting in and nothing learnt
                oldest_key, oldest = next(iter(self._lanes.items()))
                if not (oldest.idle(now) and not oldest.line.get().locked()):
                    break
                del self._lanes[oldest_key]
            lane = self._lanes[key] = AdaptiveRate(self.tenant_rate if scope.teams else None)
        else:
            self._lanes.move_to_end(key)
        return lane

    async def acquire(
        self, scope: Scope, *, background: bool = False, max_wait: float | None = None
    ) -> float:
        """Wait until one more request to ``scope`` is allowed; return the grant time."""
        if not background and not (scope.teams and scope.conversation):
            return self._grant(self.lane(scope), None, background, self._clock())
        deadline = None if max_wait is None else self._clock() + max_wait
        if not (scope.teams and scope.conversation):
            return await self._take_slot(self.lane(scope), None, background, deadline)
        conversation = self._conversation(scope.conversation)
        conversation.users += 1
        try:
            async with self._holding(conversation.lock.get(), deadline):
                # The conversation's own windows first, outside the tenant's line, so one
                # busy conversation never holds up requests to the others.
                await self._wait_until(
                    lambda now: conversation.log.wait_time(now, self.margin), deadline
                )
                return await self._take_slot(self.lane(scope), conversation, background, deadline)
        finally:
            conversation.users -= 1

    def now(self) -> float:
        """The pacer's clock: grant times and :meth:`left` times are read from it."""
        return self._clock()

    def left(self, scope: Scope, sent_at: float, left_at: float) -> None:
        """A request to ``scope`` granted at ``sent_at`` (or told to have left then) left at
        ``left_at``, on the pacer's clock: the channel counts it from then, unless it
        answers 429 (:meth:`throttled`). A request never told of stays counted from its
        grant."""
        self.lane(scope).left(sent_at, left_at)

    def throttled(
        self,
        scope: Scope,
        retry_after: float | None,
        sent_at: float,
        left_at: float | None = None,
    ) -> None:
        """A request to ``scope`` granted at ``sent_at`` (told to have :meth:`left` at
        ``left_at``, if it was) was answered 429."""
        self.throttled_count += 1
        lane = self.lane(scope)
        now = self._clock()
        if lane.throttled(
            now, retry_after, sent_at, left_at=left_at, conversation=scope.conversation
        ):
            self.cuts += 1

    async def _take_slot(
        self,
        lane: AdaptiveRate,
        conversation: _Conversation | None,
        background: bool,
        deadline: float | None,
    ) -> float:
        def wait_time(now: float) -> float:
            wait = lane.background_wait(now) if background else 0.0
            if conversation is not None:
                wait = max(wait, conversation.log.wait_time(now, self.margin))
            return wait

        if not background:
            now = await self._wait_until(wait_time, deadline)
            return self._grant(lane, conversation, background, now)
        async with self._holding(lane.line.get(), deadline):
            now = await self._wait_until(wait_time, deadline)
            return self._grant(lane, conversation, background, now)

    def _grant(
        self,
        lane: AdaptiveRate,
        conversation: _Conversation | None,
        background: bool,
        now: float,
    ) -> float:
        # Checked and recorded with no await in between: the event loop cannot interleave
        # another caller, so no window is ever overbooked.
        lane.record(now, background, self.background_share)
        if conversation is not None:
            conversation.log.record(now)
        if background:
            self.granted_background += 1
        self.granted += 1
        return now

    async def _wait_until(
        self, wait_time: Callable[[float], float], deadline: float | None
    ) -> float:
        """Sleep until ``wait_time(now)`` is 0; return that ``now``. Never past ``deadline``."""
        while True:
            now = self._clock()
            wait = wait_time(now)
            if wait <= 0:
                return now
            if deadline is not None and now + wait > deadline:
                raise PacingTimeout(wait)
            self.waited += wait
            await self._sleep(wait)

    @asynccontextmanager
    async def _holding(self, lock: asyncio.Lock, deadline: float | None) -> AsyncIterator[None]:
        if deadline is None:
            await lock.acquire()
        else:
            remaining = deadline - self._clock()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await lock.acquire()
            except TimeoutError:
                raise PacingTimeout(max(remaining, 0.0)) from None
        try:
            yield
        finally:
            lock.release()

    def _conversation(self, key: str) -> _Conversation:
        now = self._clock()
        self._forget_idle(now)
        conversation = self._conversations.get(key)
        if conversation is None:
            conversation = self._conversations[key] = _Conversation(self.windows)
        else:
            self._conversations.move_to_end(key)
        return conversation

    def _forget_idle(self, now: float) -> None:
        # Least recently used first; stop at the first one still needed. A conversation
        # someone is waiting for is never dropped: over the cap it goes to the back, so
        # one long wait cannot keep every idle conversation behind it in memory.
        skipped = 0
        while len(self._conversations) > skipped:
            key, oldest = next(iter(self._conversations.items()))
            over_cap = len(self._conversations) >= self._max_conversations
            if oldest.users:
                if not over_cap:
                    return
                self._conversations.move_to_end(key)
                skipped += 1
                continue
            if not (over_cap or oldest.log.idle(now, self.margin)):
                return
            del self._conversations[key]


def conversation_key(conversation_id: str) -> str:
    """The pacing key of a conversation: Teams threads (``;messageid=``) share their channel's."""
    return conversation_id.split(";", 1)[0]


def _accelerating(seconds: float) -> float:
    """Seconds of probing, weighted so the probe's pace doubles every PROBE_DOUBLING.

    Counted up to 20 doublings (a weight of millions, past any ceiling from a lane's
    lowest rate): hours without a 429 would otherwise overflow a float.
    """
    doublings = min(seconds / PROBE_DOUBLING, 20.0)
    return PROBE_DOUBLING / math.log(2.0) * (2.0**doublings - 1.0)
