"""Sliding windows: at most so many events in any interval of so many seconds, and the
log of recent events that checks them (the channel's per-conversation limits; the pacer,
shared/ratelimit.py, keeps one log per conversation)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


class SlidingWindowLog:
    """The times of recent events, enough to check every window."""

    __slots__ = ("_span", "_times", "windows")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.windows = tuple(windows)
        self._times: deque[float] = deque(maxlen=max(w.limit for w in self.windows))
        self._span = max(w.seconds for w in self.windows)

    def wait_time(
        self, now: float, margin: float = 0.0, reserve: Callable[[Window], int] | None = None
    ) -> float:
        """Seconds until one more event fits in every window (0 when it fits now), with
        `reserve(window)` of each window's limit kept free (for other events than this)."""
        wait = 0.0
        count = len(self._times)
        for window in self.windows:
            limit = max(1, window.limit - (reserve(window) if reserve else 0))
            if count >= limit:
                # The window is full when the limit-th most recent event is still inside it.
                oldest = self._times[count - limit]
                wait = max(wait, oldest + window.seconds + margin - now)
        return wait

    def record(self, now: float) -> None:
        self._times.append(now)

    def moved(self, recorded: float, left_at: float) -> None:
        """The event recorded at (or just after) `recorded` happened at `left_at`, later:
        counted from then, in order."""
        times = self._times
        for index, at in enumerate(times):
            if recorded <= at <= left_at:
                del times[index]
                position = len(times)
                while position and times[position - 1] > left_at:
                    position -= 1
                times.insert(position, left_at)
                return

    def idle(self, now: float, margin: float = 0.0) -> bool:
        """True when no recorded event can constrain a future one any more."""
        return not self._times or self._times[-1] + self._span + margin <= now
