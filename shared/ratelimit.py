"""Outbound pacing: stay under the Teams limits so bursts wait briefly instead of drawing 429s.

Teams allows a bot 7 sends per second, 8 per 2 seconds and 60 per 30 seconds in one
conversation, and about 50 requests per second per app and tenant overall. The
:class:`Pacer` keeps a sliding-window log per conversation and one for the whole
process; a caller that would exceed a window sleeps until the oldest event leaves it.
Sends to one conversation go out one at a time in call order (a FIFO lock per
conversation), so replies also arrive in the order the bot wrote them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


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


def global_window(rate: float) -> Window:
    """The sliding window for a per-process limit of ``rate`` requests per second."""
    limit = max(1, int(rate))
    return Window(limit, limit / rate)


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


class _Conversation:
    __slots__ = ("lock", "log", "loop")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.log = SlidingWindowLog(windows)
        self.lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def lock_for(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        # asyncio locks belong to one event loop; a process that runs several loops
        # (tests, some hosts) gets a fresh lock per loop.
        if self.lock is None or self.loop is not loop:
            self.lock, self.loop = asyncio.Lock(), loop
        return self.lock

    @property
    def busy(self) -> bool:
        return self.lock is not None and self.lock.locked()


class Pacer:
    """Per-conversation and per-process sliding-window pacing for outbound requests.

    ``await pacer.acquire(key)`` returns when one more request may be sent: ``key`` is
    the conversation for sends (per-conversation windows and the global limit apply) or
    ``None`` for other calls (global limit only). Memory stays bounded: a conversation
    is forgotten once it has been idle longer than the longest window.
    """

    def __init__(
        self,
        rate_limit: float = 50.0,
        *,
        windows: Sequence[Window] = TEAMS_CONVERSATION_WINDOWS,
        margin: float = 0.05,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_conversations: int = 100_000,
    ) -> None:
        if rate_limit <= 0:
            raise ValueError("rate_limit must be greater than zero")
        self.windows = tuple(windows)
        self.margin = margin
        self._clock = clock
        self._sleep = sleep
        self._global = SlidingWindowLog((global_window(rate_limit),))
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._max_conversations = max_conversations
        self.granted = 0
        self.waited = 0.0

    @property
    def tracked_conversations(self) -> int:
        return len(self._conversations)

    async def acquire(self, key: str | None = None) -> None:
        """Wait until one more request (to conversation ``key``, if given) is allowed."""
        if key is None:
            await self._wait_for(None)
            return
        conversation = self._conversation(key)
        lock = conversation.lock_for(asyncio.get_running_loop())
        async with lock:
            await self._wait_for(conversation)

    async def _wait_for(self, conversation: _Conversation | None) -> None:
        while True:
            now = self._clock()
            wait = self._global.wait_time(now, self.margin)
            if conversation is not None:
                wait = max(wait, conversation.log.wait_time(now, self.margin))
            if wait <= 0:
                # Check and record with no await in between: the event loop cannot
                # interleave another caller, so no window is ever overbooked.
                self._global.record(now)
                if conversation is not None:
                    conversation.log.record(now)
                self.granted += 1
                return
            self.waited += wait
            await self._sleep(wait)

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
        # Least recently used first: stop at the first conversation still in use.
        while self._conversations:
            key, oldest = next(iter(self._conversations.items()))
            over_cap = len(self._conversations) >= self._max_conversations
            if oldest.busy or not (over_cap or oldest.log.idle(now, self.margin)):
                return
            del self._conversations[key]


def conversation_key(conversation_id: str) -> str:
    """The pacing key of a conversation: Teams threads (``;messageid=``) share their channel's."""
    return conversation_id.split(";", 1)[0]
