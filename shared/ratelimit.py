"""Outbound pacing: stay under the Teams limits so bursts wait briefly instead of drawing 429s.

Teams allows a bot 7 sends per second, 8 per 2 seconds and 60 per 30 seconds in one
conversation, and about 50 requests per second per app and tenant overall. The
:class:`Pacer` keeps a sliding-window log per conversation and one for the whole
process; a caller that would exceed a window sleeps until the oldest event leaves it.
Sends to one conversation go out one at a time in call order (a FIFO lock per
conversation), so replies also arrive in the order the bot wrote them.

Traffic comes in two classes. Interactive requests (replies to a user's turn) may use
the whole per-process rate; background requests (proactive sends) are held to a share
of it (80 % by default), so a large proactive burst never leaves a reply waiting for
the global window. Each class waits in its own FIFO line for the global window. Within
one conversation order wins over class: a reply queues behind earlier sends to the
same conversation, background ones included.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

DEFAULT_BACKGROUND_SHARE = 0.8


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


class PacingTimeout(Exception):
    """No slot within the caller's ``max_wait``; nothing was recorded.

    ``wait`` is how much longer the caller would have had to wait (an estimate when it
    was still queued behind other callers).
    """

    def __init__(self, wait: float) -> None:
        super().__init__(f"no request slot in time (next in about {wait:.2f} s)")
        self.wait = wait


def global_window(rate: float) -> Window:
    """The sliding window for a per-process limit of ``rate`` requests per second."""
    limit = max(1, int(rate))
    return Window(limit, limit / rate)


def background_window(window: Window, share: float) -> Window:
    """The window background traffic keeps to: ``share`` of ``window``, leaving headroom.

    Same length as the global window, so whatever background traffic does, every
    global window keeps at least one slot free for interactive requests; when the share
    is less than one slot per window, background gets one slot per longer window.
    """
    if share >= 1.0:
        return window
    slots = math.floor(window.limit * share + 1e-9)
    if slots >= 1 and window.limit >= 2:
        return Window(min(slots, window.limit - 1), window.seconds)
    return Window(1, window.seconds / (window.limit * share))


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
    """Per-conversation and per-process sliding-window pacing for outbound requests.

    ``await pacer.acquire(key)`` returns when one more request may be sent: ``key`` is
    the conversation for sends (per-conversation windows and the global limit apply) or
    ``None`` for other calls (global limit only). ``background=True`` marks traffic that
    must leave headroom for interactive requests (at most ``background_share`` of the
    global rate). ``max_wait`` bounds the wait: :class:`PacingTimeout` instead of a slot
    that would come later. Memory stays bounded: a conversation is forgotten once it has
    been idle longer than the longest window, and at most ``max_conversations`` are kept.
    """

    def __init__(
        self,
        rate_limit: float = 50.0,
        *,
        background_share: float = DEFAULT_BACKGROUND_SHARE,
        windows: Sequence[Window] = TEAMS_CONVERSATION_WINDOWS,
        margin: float = 0.05,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_conversations: int = 100_000,
    ) -> None:
        if rate_limit <= 0:
            raise ValueError("rate_limit must be greater than zero")
        if not 0 < background_share <= 1:
            raise ValueError("background_share must be greater than 0 and at most 1")
        self.windows = tuple(windows)
        self.margin = margin
        self._clock = clock
        self._sleep = sleep
        window = global_window(rate_limit)
        self._global = SlidingWindowLog((window,))
        self._background = SlidingWindowLog((background_window(window, background_share),))
        self._lines = {False: _LoopLock(), True: _LoopLock()}  # interactive, background
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._max_conversations = max_conversations
        self.granted = 0
        self.granted_background = 0
        self.waited = 0.0

    @property
    def tracked_conversations(self) -> int:
        return len(self._conversations)

    async def acquire(
        self,
        key: str | None = None,
        *,
        background: bool = False,
        max_wait: float | None = None,
    ) -> None:
        """Wait until one more request (to conversation ``key``, if given) is allowed."""
        deadline = None if max_wait is None else self._clock() + max_wait
        if key is None:
            await self._take_slot(None, background, deadline)
            return
        conversation = self._conversation(key)
        conversation.users += 1
        try:
            async with self._holding(conversation.lock.get(), deadline):
                # The conversation's own windows first, outside the class line, so one
                # busy conversation never holds up requests to the others.
                await self._wait_until(
                    lambda now: conversation.log.wait_time(now, self.margin), deadline
                )
                await self._take_slot(conversation, background, deadline)
        finally:
            conversation.users -= 1

    async def _take_slot(
        self, conversation: _Conversation | None, background: bool, deadline: float | None
    ) -> None:
        def wait_time(now: float) -> float:
            wait = self._global.wait_time(now, self.margin)
            if background:
                wait = max(wait, self._background.wait_time(now, self.margin))
            if conversation is not None:
                wait = max(wait, conversation.log.wait_time(now, self.margin))
            return wait

        async with self._holding(self._lines[background].get(), deadline):
            now = await self._wait_until(wait_time, deadline)
            # Checked and recorded with no await in between: the event loop cannot
            # interleave another caller, so no window is ever overbooked.
            self._global.record(now)
            if background:
                self._background.record(now)
                self.granted_background += 1
            if conversation is not None:
                conversation.log.record(now)
            self.granted += 1

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
