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
  ``Retry-After`` (the request answered 429 waits all of it; the lane's other background
  traffic pauses for a quarter of it, at most 0.25 s, since the 429 may be one
  conversation's limit).
- **Replies are never held behind broadcasts.** Interactive requests (a reply in a user's
  turn) wait only for their conversation's windows, never for a tenant rate; they are
  counted in it, so background traffic yields to them, and background requests leave one
  of each conversation window to them. Background requests (proactive
  sends, broadcasts) wait in a FIFO line per tenant, evenly spaced at ``background_share``
  of the tenant's current rate, and leave room for replies in every 1-s window (the rest
  of the share, rounded up while replies are being sent, rounded down otherwise). One
  that a busy event loop woke late is made up for by the ones after it, within that
  window.

- **An instance's invocations are shared by its tenants.** A broadcast child whose
  tenant's line here is long while another line stands nearly empty is better put back on
  the queue than waited for: :meth:`Pacer.crowded_wait` says so, and for how long. One
  tenant spread over many instances gets a small share on each, and a line holding all
  of an instance's invocations would outlast a send's wait for its slot: broadcast
  children first wait in the tenant's room (:meth:`Pacer.admission`), holding nothing,
  and are let out in order as the line can take them in time.

Sends to one Teams conversation are granted in call order within each class (a FIFO
lock per conversation and class), so replies arrive in the order the bot wrote them, and
so do background sends; a reply does not wait for a background send to its conversation
that waits in its tenant's line (it goes first). A background send whose conversation's
window the replies filled while it waited in the line takes its turn of the tenant's rate
and waits for the window outside the line (up to 2 s: the 1-s and 2-s windows), so
it never holds up the line, nor loses its turn to the replies; a longer wait (the 30-s
window) it spends outside the line without its turn, then queues again. Other channels'
conversations have no published limits and are not serialised.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from shared import room
from shared.tenant_rate import WINDOW_SECONDS, AdaptiveRate, LoopLock
from shared.windows import TEAMS_CONVERSATION_WINDOWS, SlidingWindowLog, Window

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

TEAMS = "msteams"
DEFAULT_TENANT_RATE = 50.0  # Teams: about 50 requests per second per app per tenant
# Of a tenant's rate; the rest is headroom for replies (at 50/s, 1.5 requests/s: any
# second of a broadcast holds 48 or 49, so a reply still fits in the window).
DEFAULT_BACKGROUND_SHARE = 0.97
# Pacer.crowded_wait: a line a background request would wait in over this long, while another
# line of the process used by background requests in the last ACTIVE_SECONDS would take
# one in under OTHER_LINE_SHARE of that. The queue listener fetches 32 messages once 16 or
# fewer are in flight, so a batch arriving finds at most about 16 in a line: over 1 s that
# is only a line under 16/s (4 or more instances on a 50/s tenant: 3 get 16.2/s each). Simulated
# (tests/unit/test_ratelimit.py, `broadcast_through_instances`, 10,000 messages to two
# tenants, three seeds): 4 instances went from 84-86 % of the limits to 90-91 %, 8 from
# 81-86 % to 86-89 %, with 11-16 % of the messages put back once more; 2 put nothing back
# (85-88 %). At 0.5 s, 2 reached 87-89 % in the simulation (9-13 % put back), but
# through the local host (benchmarks/README.md) 83-86 % against 85-89 % without.
CROWDED_SECONDS = 1.0
ACTIVE_SECONDS = 5.0
OTHER_LINE_SHARE = 0.25
# Teams conversations whose tenant the pacer remembers (the most recently used), for the
# requests to them that name none: a delete shortly after a send finds it.
TENANTS_KEPT = 10_000
# Background sends to a Teams conversation leave this many of each of its windows to
# replies (6 of 7 per second, 7 of 8 per 2 s): a short window frees a slot within 2 s...
BACKGROUND_RESERVE = 1
# ... and this many of a longer one (57 of 60 per 30 s): an alert storm into a channel
# never makes a turn's two or three messages there (or a reply and the apology after a
# failed turn) wait for the 30-s window's oldest send, seconds past their budget.
BACKGROUND_RESERVE_LONG = 3
# A background send that waited its turn in the tenant's line, then finds its conversation's
# 1-s or 2-s window full (replies), takes the turn and waits outside the line for this
# long at most; a longer wait (the 30-s window) gives the turn up and queues again.
SHORT_WINDOW_WAIT = 2 * WINDOW_SECONDS


def background_reserve(window: Window) -> int:
    """How much of a conversation's `window` background sends leave to replies."""
    return BACKGROUND_RESERVE_LONG if window.seconds > SHORT_WINDOW_WAIT else BACKGROUND_RESERVE


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


class _Conversation:
    __slots__ = ("background_lock", "lock", "log", "not_before", "users")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.log = SlidingWindowLog(windows)
        self.lock = LoopLock()  # interactive requests, granted in call order
        self.background_lock = LoopLock()  # background requests, granted in call order
        self.users = 0  # callers holding or waiting for a lock: never forget it then
        # Until when its latest 429 asked to wait: background requests to it wait as well
        # (each would be answered 429 in turn, and requeued to come back all together).
        self.not_before = float("-inf")

    def wait_time(
        self, now: float, margin: float, reserve: Callable[[Window], int] | None
    ) -> float:
        """Seconds until a request fits its windows; a background one (`reserve` given)
        also waits out the conversation's latest Retry-After."""
        wait = self.log.wait_time(now, margin, reserve)
        return max(wait, self.not_before - now) if reserve is not None else wait


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
        # The waits of conversations forgotten while told to wait (a long Retry-After):
        # their `not_before` alone, restored if they come back before it ends.
        self._held: dict[str, float] = {}
        self._held_ends: list[tuple[float, str]] = []  # a heap of (wait's end, key)
        self._lanes: OrderedDict[tuple[str, str], AdaptiveRate] = OrderedDict()
        # Teams conversation -> its tenant, from requests that named both: a request that
        # names none (a delete has no body; a reference target may carry no tenant) counts
        # against its tenant all the same, not in a lane of its own beside it.
        self._tenants: OrderedDict[str, str] = OrderedDict()
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
        key = self._lane_key(scope)
        lane = self._lanes.get(key)
        if lane is None:
            now = self._clock()
            while self._lanes:  # forget lanes nothing is waiting in and nothing learnt
                oldest_key, oldest = next(iter(self._lanes.items()))
                busy = oldest.line.get().locked() or oldest.room
                if busy or oldest.joining or not oldest.idle(now):
                    break
                del self._lanes[oldest_key]
            ceiling = self.tenant_rate if scope.teams else None
            lane = self._lanes[key] = AdaptiveRate(ceiling, self.background_share)
        else:
            self._lanes.move_to_end(key)
        return lane

    def _lane_key(self, scope: Scope) -> tuple[str, str]:
        """`scope`'s lane: a Teams conversation's tenant's, learnt when the scope names none."""
        conversation = scope.conversation
        if not (scope.teams and conversation):
            return scope.lane
        tenants = self._tenants
        if scope.tenant_id:
            if tenants.get(conversation) != scope.tenant_id:
                tenants[conversation] = scope.tenant_id
                if len(tenants) > TENANTS_KEPT:
                    tenants.popitem(last=False)
            tenants.move_to_end(conversation)
            return scope.lane
        tenant = tenants.get(conversation)
        return (TEAMS, f"tenant:{tenant}") if tenant else scope.lane

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
        # One line per class: a reply never queues behind a background request that waits
        # for its tenant's rate (the windows are checked and recorded at each grant).
        lock = conversation.background_lock if background else conversation.lock
        try:
            async with self._holding(lock.get(), deadline):
                # The conversation's own windows first, outside the tenant's line, so one
                # busy conversation never holds up requests to the others.
                reserve = background_reserve if background else None
                await self._wait_until(
                    lambda now: conversation.wait_time(now, self.margin, reserve), deadline
                )
                return await self._take_slot(self.lane(scope), conversation, background, deadline)
        finally:
            conversation.users -= 1

    def crowded_wait(self, scope: Scope) -> float:
        """Seconds to put a background request to ``scope`` back for, so that the invocation
        holding it serves another line instead; 0.0: send it.

        Nonzero when its tenant's line here would hold it over CROWDED_SECONDS while another
        line of this process, granted background requests in the last ACTIVE_SECONDS, would
        take one in under OTHER_LINE_SHARE of that, and has grants not yet spent on a
        put-back (at most tenant_rate.CREDIT_CAP): each nonzero answer spends one, so
        put-backs never outnumber the requests they make way for.

        Why: each instance takes queue messages for every tenant into a fixed number of
        invocations, and requests stay longest where this instance's share of the tenant is
        smallest. Left alone, an instance's invocations fill with its slowest tenant's
        requests while its line for another stands empty, and that share goes unused
        (README, "Pacing").
        """
        lane = self._lanes.get(self._lane_key(scope))
        if lane is None:
            return 0.0
        now = self._clock()
        wait = lane.line_seconds(now)
        if wait <= CROWDED_SECONDS:
            return 0.0
        for other in reversed(self._lanes.values()):  # the most recently used first
            if other is lane or not other.credit:
                continue
            if now - other.background_at > ACTIVE_SECONDS:
                continue
            if other.line_seconds(now) < wait * OTHER_LINE_SHARE:
                other.credit -= 1
                return wait
        return 0.0

    def admission(
        self, scope: Scope, within: float, max_wait: float
    ) -> AbstractAsyncContextManager[float]:
        """Wait in the room of ``scope``'s lane before joining its line, for ``max_wait``
        at most (shared/room.py has the model): yields 0.0 once let out, while the line
        would take one more within ``within`` seconds; else about how long the line
        would hold it (the caller puts its request back for that long)."""
        return room.admission(
            self.lane(scope), within, max_wait, clock=self._clock, sleep=self._sleep
        )

    def now(self) -> float:
        """The pacer's clock: grant times and :meth:`left` times are read from it."""
        return self._clock()

    def left(self, scope: Scope, sent_at: float, left_at: float) -> None:
        """A request to ``scope`` granted at ``sent_at`` (or told to have left then) left at
        ``left_at``, on the pacer's clock: the channel counts it from then, unless it
        answers 429 (:meth:`throttled`). A request never told of stays counted from its
        grant."""
        self.lane(scope).left(sent_at, left_at)
        conversation = self._conversations.get(scope.conversation) if scope.teams else None
        if conversation is not None and scope.conversation is not None:
            # Its windows count it from then too: one that left late would otherwise let
            # the next arrive inside a window the channel still counts it in.
            conversation.log.moved(sent_at, left_at)

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
        conversation = self._conversations.get(scope.conversation or "")
        if scope.teams and scope.conversation and (retry_after or 0.0) > WINDOW_SECONDS:
            # A wait longer than the windows (a thread's own limit, a tenant refusing all):
            # the conversation's other background requests would be refused until then.
            if conversation is not None:
                conversation.not_before = max(conversation.not_before, now + retry_after)
            else:  # forgotten while its request was out (a late answer): its wait kept
                self._hold(scope.conversation, now + retry_after)
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
        reserve = background_reserve if background else None

        def window_wait(now: float) -> float:  # the conversation's own windows
            if conversation is None:
                return 0.0
            return conversation.wait_time(now, self.margin, reserve)

        if not background:
            now, _ = await self._wait_until(window_wait, deadline)
            return self._grant(lane, conversation, background, now)
        line = lane.line.get()
        queued = line.locked()  # behind others in the line, not arriving at an idle one
        lane.waiting += 1
        room.joining_line(lane)  # a request the room let out: counted in the line now
        try:
            while True:
                async with self._holding(line, deadline):
                    now, slept = await self._wait_until(lane.background_wait, deadline)
                    wait = window_wait(now)
                    if wait <= 0:
                        return self._grant(
                            lane, conversation, background, now, late=queued or slept
                        )
                    if deadline is not None and now + wait > deadline:
                        raise PacingTimeout(wait)  # before its turn is taken: nothing spent
                    if wait <= SHORT_WINDOW_WAIT:
                        # Replies to its conversation filled the window while it waited in
                        # the line: it takes its turn of the tenant's rate now and waits for
                        # the window outside the line, which no other conversation's request
                        # should wait behind. The tenant's window counts it from when it
                        # will leave, and until then (a turn counted from now would drop
                        # out of a 1-s window before a wait of over a second ended);
                        # Pacer.left moves it should it leave later still.
                        self._grant(lane, None, background, now, late=queued or slept)
                        break
                # A longer wait (the 30-s window): out of the line without its turn, which
                # the tenant's window could no longer count when it left; queued again.
                await self._wait_until(window_wait, deadline)
                queued = True
        finally:
            lane.waiting -= 1
        granted, now = await self._leave_when_room(lane, now, window_wait, deadline)
        if conversation is not None:  # always: only its window can be full
            conversation.log.record(now)
        return granted

    async def _leave_when_room(
        self,
        lane: AdaptiveRate,
        turn: float,
        window_wait: Callable[[float], float],
        deadline: float | None,
    ) -> tuple[float, float]:
        """After its turn, wait for the conversation's window; return when the tenant's
        window counts the request from (its grant, for Pacer.left and Pacer.throttled)
        and the time it may leave. Counted from when it will leave, and until then,
        whenever that moves later (more replies: another window). One that never leaves
        (timed out, cancelled) is withdrawn."""
        counted = turn

        def keep_counted(now: float, wait: float) -> None:
            nonlocal counted
            if now + wait > counted:
                counted = lane.defer(counted, now + wait)

        try:
            now, _ = await self._wait_until(window_wait, deadline, keep_counted)
        except BaseException:
            lane.withdraw(counted)
            raise
        return counted, now

    def _grant(
        self,
        lane: AdaptiveRate,
        conversation: _Conversation | None,
        background: bool,
        now: float,
        late: bool = False,
    ) -> float:
        # Checked and recorded with no await in between: the event loop cannot interleave
        # another caller, so no window is ever overbooked.
        lane.record(now, background, late)
        if conversation is not None:
            conversation.log.record(now)
        if background:
            self.granted_background += 1
        self.granted += 1
        return now

    async def _wait_until(
        self,
        wait_time: Callable[[float], float],
        deadline: float | None,
        before_sleep: Callable[[float, float], None] | None = None,
    ) -> tuple[float, bool]:
        """Sleep until ``wait_time(now)`` is 0; return that ``now`` and whether it slept.
        Never past ``deadline``. ``before_sleep(now, wait)`` is told of each wait."""
        slept = False
        while True:
            now = self._clock()
            wait = wait_time(now)
            if wait <= 0:
                if slept and deadline is not None and now > deadline:
                    # Woken late: granted now, the slot would be counted for a request its
                    # caller no longer has the time to send.
                    raise PacingTimeout(0.0)
                return now, slept
            if deadline is not None and now + wait > deadline:
                raise PacingTimeout(wait)
            if before_sleep is not None:
                before_sleep(now, wait)
            self.waited += wait
            slept = True
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
            held = self._held.pop(key, None)
            if held is not None:
                conversation.not_before = held
        else:
            self._conversations.move_to_end(key)
        return conversation

    def _hold(self, key: str, not_before: float) -> None:
        """Remember the wait of a conversation not kept (idle, or not seen since its
        request was granted), for when it comes back."""
        end = max(self._held.get(key, not_before), not_before)
        self._held[key] = end
        heapq.heappush(self._held_ends, (end, key))

    def _forget_idle(self, now: float) -> None:
        # Least recently used first; stop at the first one still needed. A conversation
        # someone is waiting for is never dropped: over the cap it goes to the back, so
        # one long wait cannot keep every idle conversation behind it in memory.
        held, ends = self._held, self._held_ends
        # Waits that ended, and over the cap those ending soonest, go first.
        while ends and (ends[0][0] <= now or len(held) > self._max_conversations):
            end, key = heapq.heappop(ends)
            if held.get(key) == end:  # else restored or held again since: stale
                del held[key]
        if len(ends) > 2 * len(held) + 64:  # the stale entries of restored ones
            self._held_ends = ends = [(end, key) for key, end in held.items()]
            heapq.heapify(ends)
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
            if oldest.not_before > now:
                # Idle, but told to wait (a long Retry-After): forgotten all the same (kept,
                # it kept every idle conversation after it in memory until its wait ended),
                # its wait alone remembered.
                self._hold(key, oldest.not_before)
            del self._conversations[key]


def conversation_key(conversation_id: str) -> str:
    """The pacing key of a conversation: Teams threads (``;messageid=``) share their channel's."""
    return conversation_id.split(";", 1)[0]
