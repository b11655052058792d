"""One Teams tenant's request rate in one process, learnt from the channel's 429s.

The pacer (shared/ratelimit.py, whose docstring has the whole model) keeps one
:class:`AdaptiveRate` per Teams tenant: it starts at the tenant's limit, keeps to the
channel's strict 1-s window by when requests left, and on a 429 is cut by what the 429
says, recovers, then probes upwards by a share of its own rate. The constants below say
why each value is what it is, and what the simulation in tests/unit/test_ratelimit.py
measured against the alternatives.
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque

from shared.thread_limits import ThreadLimits

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
# A 429 whose Retry-After is longer than a window holds off further cuts for that long (at
# most this many seconds): the tenant's throttle, not a new sign of the rate being high.
LONG_WAIT_CAP = 60.0
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
# 73 % of the limit in the fourth minute after (before: 46 %; not accelerating: 7 %).
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
WINDOW_LOG_LIMIT = 10_000  # requests per second: above it, no window (see AdaptiveRate)
TURNS_KEPT = 256  # deferred requests remembered for their 429s (see AdaptiveRate.defer)
# Room for replies in every window (each instance counts its own): background requests
# leave the rest of their share, ceiling x (1 - share), rounded up while replies are being
# sent (one in the last REPLY_SECONDS) and rounded down otherwise (2 and 1 of Teams' 50;
# 1 and 0 of 15/s). Counted with the replies already in the window, background never fills
# what a reply needs; evenly spaced grants alone left that to chance (the simulations in
# tests/unit/test_ratelimit.py give the figures).
REPLY_SECONDS = 60.0
# A background request woken late by a busy event loop, or queued behind one that was,
# is made up for by the ones after it, for up to this much lateness: within the window's
# count, which keeps the replies' room. A reply's slot, a pause after a 429 and an idle
# line are never made up for: one interval of catch-up at most, as before.
CATCH_UP_SECONDS = 0.1
# A line's background grants that may each let another line's request be put back
# (Pacer.crowded_wait), at most this many saved up: put-backs never outnumber the sends
# they make way for.
CREDIT_CAP = 16


class AdaptiveRate:
    """One app-wide request rate (a Teams tenant), learnt from the channel's 429s.

    Before any 429 the rate is ``ceiling`` (None: no ceiling, only pauses). A 429 pauses
    background traffic for PAUSE_SHARE of the server's Retry-After (at most MAX_PAUSE)
    and cuts the rate (:meth:`_cut`); from there it follows a concave cubic curve up to
    the peak :meth:`_cut` chose, reached after RECOVERY_SECONDS, then grows past it by
    PROBE_SHARE of that peak per second, a pace that doubles every PROBE_DOUBLING
    seconds. 429s for requests granted before the last cut do not cut again: they were
    sent at the old rate. Background grants are evenly spaced at ``background_share`` of
    the rate (no bursts a sliding window would count twice), made up for when they were
    woken late by up to CATCH_UP_SECONDS, and never so many that the replies' room in the
    channel's window is taken, replies included, each counted from when it left, as
    :meth:`left` tells.
    """

    __slots__ = (
        "_counted",
        "_cut_at",
        "_cut_until",
        "_floor",
        "_lowest",
        "_next",
        "_paused_until",
        "_peak",
        "_quiet_limit",
        "_reply_at",
        "_replying_limit",
        "_share",
        "_thread_limits",
        "_turns",
        "_window_limit",
        "background_at",
        "ceiling",
        "credit",
        "joining",
        "line",
        "room",
        "used_at",
        "waiting",
    )

    def __init__(self, ceiling: float | None, background_share: float = 1.0) -> None:
        self.ceiling = ceiling
        self._share = background_share
        self.line = LoopLock()  # background requests queue here, in order
        self.waiting = 0  # background requests in the line (or about to join it)
        # Broadcast requests waiting to join the line, in order (Pacer.admission): the turn
        # of each, done for the one at the head.
        self.room: deque[asyncio.Future[None]] = deque()
        self.joining = 0  # requests let out of the room, not in the line yet (Pacer.admission)
        self._next = float("-inf")  # earliest time of the next background grant
        self._paused_until = float("-inf")
        self._peak = ceiling or 0.0
        self._floor = self._peak
        self._cut_at: float | None = None
        self._cut_until = float("-inf")
        self._thread_limits = ThreadLimits()
        self.used_at = float("-inf")
        self.background_at = float("-inf")  # the last background grant
        self.credit = 0  # background grants not yet spent on another line's put-backs
        # The last `ceiling` requests the channel counted (or may yet count): the grant
        # time, replaced by when the request left once that is known; 429s are dropped
        # (not counted). Kept sorted: the earliest leaves the channel's window first.
        self._counted: list[float] = []
        # Requests counted from when they will leave (deferred), by that time (one each):
        # their turn, by which a 429 answered to them is judged (sent before or after the
        # last cut).
        self._turns: dict[float, float] = {}
        # Above WINDOW_LOG_LIMIT (a limit set that high to lift pacing), no window is kept:
        # its log would hold that many entries per lane. The spacing still applies.
        windowed = ceiling is not None and 0 < ceiling <= WINDOW_LOG_LIMIT
        self._window_limit = max(1, int(ceiling)) if windowed else 0
        headroom = round(ceiling * (1.0 - background_share), 9) if ceiling else 0.0
        self._replying_limit = max(1, self._window_limit - math.ceil(headroom))
        self._quiet_limit = max(1, self._window_limit - math.floor(headroom))
        self._reply_at = float("-inf")
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
        counted = self._counted
        replying = now - self._reply_at < REPLY_SECONDS
        limit = self._replying_limit if replying else self._quiet_limit
        if self._window_limit and len(counted) >= limit:
            # The window holds `limit` requests while the limit-th latest is in it.
            oldest = counted[len(counted) - limit]
            wait = max(wait, oldest + WINDOW_SECONDS + WINDOW_MARGIN - now)
        return wait

    def line_seconds(self, now: float) -> float:
        """About how long a background request joining the line now would wait: for the next
        grant (spacing, a pause, the window), then one interval for each request already
        waiting (0.0 without a ceiling)."""
        return self._behind(now, self.waiting)

    def admission_seconds(self, now: float) -> float:
        """About how long one more request let out of the room now would wait in the line:
        :meth:`line_seconds` counting those let out before it that have not joined the line
        yet, and itself (0.0 without a ceiling)."""
        return self._behind(now, self.waiting + self.joining + 1)

    def _behind(self, now: float, requests: int) -> float:
        """The wait for the next grant, then one interval for each of ``requests``."""
        rate = self.rate(now)
        if rate is None:
            return 0.0
        return max(0.0, self.background_wait(now)) + requests / (rate * self._share)

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
        if not self._window_limit or left_at <= sent_at:
            return
        # Not found: its grant already left the window's log (a wait of over a second for
        # its conversation's window, at the full rate): counted from now all the same.
        self._forget(sent_at)
        counted = self._counted
        insort(counted, left_at)
        if len(counted) > self._window_limit:
            del counted[0]

    def defer(self, sent_at: float, until: float) -> float:
        """The request counted from ``sent_at``, a turn taken before its conversation's
        window had room, will leave at ``until``: counted from then, and until then (a
        turn counted from when it was taken would drop out of the window first). Returns
        the time it is counted from now: ``until``, or the next float after it when
        another deferred request has that time (each is told apart by its time). A 429
        answered to it is judged by its turn."""
        turn = self._turns.pop(sent_at, sent_at)
        while until in self._turns:
            until = math.nextafter(until, math.inf)
        self.left(sent_at, until)
        self._turns[until] = turn
        if len(self._turns) > TURNS_KEPT:
            del self._turns[next(iter(self._turns))]
        return until

    def withdraw(self, sent_at: float) -> None:
        """The request counted from ``sent_at`` never left: the window no longer counts it."""
        self._turns.pop(sent_at, None)
        if self._window_limit:
            self._forget(sent_at)

    def _forget(self, sent_at: float) -> bool:
        counted = self._counted
        index = bisect_left(counted, sent_at)
        if index < len(counted) and counted[index] == sent_at:
            del counted[index]
            return True
        return False  # already out of the window's reach

    def record(self, now: float, background: bool, late: bool = False) -> None:
        """A request granted at ``now``; ``late``: a background grant that waited its turn
        (woken from its wait, or queued behind others), whose lateness may be made up for."""
        self.used_at = now
        if background:
            self.background_at = now
            self.credit = min(self.credit + 1, CREDIT_CAP)
        else:
            self._reply_at = now
        if self._window_limit:
            if len(self._counted) >= self._window_limit:
                del self._counted[0]
            insort(self._counted, now)
        rate = self.rate(now)
        if rate is None:
            return
        if background:
            # Late by up to CATCH_UP_SECONDS (one interval, if longer or not `late`), the
            # grants after this one come sooner until the spacing has caught up; after a
            # longer gap it starts again from now.
            interval = 1.0 / (rate * self._share)
            catch_up = max(interval, CATCH_UP_SECONDS) if late else interval
            base = self._next if self._next > now - catch_up else now
        else:
            # A reply takes a slot of its own, never made up for, but holds background
            # traffic back by at most the channel's window from now: replies faster than
            # a cut rate would otherwise run up a debt that background traffic waits out
            # long after they stopped (a minute of them: most of an hour).
            interval = 1.0 / rate
            self._next = min(max(self._next, now) + interval, now + max(interval, WINDOW_SECONDS))
            return
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
        sent_at = self._turns.pop(sent_at, sent_at)  # a deferred request: its turn
        wait = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        if self.ceiling is not None and self._thread_limits.own_limit(now, conversation, wait):
            return False
        pause = min(wait * PAUSE_SHARE, MAX_PAUSE)
        self._paused_until = max(self._paused_until, now + pause)
        self._next = max(self._next, self._paused_until)  # a pause is not made up for
        if self._cut_at is not None and sent_at < self._cut_at:
            return False  # sent at the old rate, already cut for
        if now < self._cut_until and (retry_after is None or wait > WINDOW_SECONDS):
            # Within the longer wait the last cut's 429 asked for, another asking as long
            # (or not saying): the same throttle. Cut again for each (each says "refused",
            # nothing about the rate), a few seconds of them took the rate to its floor,
            # and minutes to climb back. One asking for a second or less still cuts: the
            # tenant is full (a thread's own long 429 must not switch its adaptation off).
            return False
        current = self.rate(now)
        if current is None:
            return False
        floor, peak = self._cut(now, current)
        self._peak = peak
        self._floor = floor
        self._cut_at = now
        if wait > WINDOW_SECONDS:
            self._cut_until = now + min(wait, LONG_WAIT_CAP)
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


class LoopLock:
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


def _accelerating(seconds: float) -> float:
    """Seconds of probing, weighted so the probe's pace doubles every PROBE_DOUBLING.

    Counted up to 20 doublings (a weight of millions, past any ceiling from a lane's
    lowest rate): hours without a 429 would otherwise overflow a float.
    """
    doublings = min(seconds / PROBE_DOUBLING, 20.0)
    return PROBE_DOUBLING / math.log(2.0) * (2.0**doublings - 1.0)
