"""What this process removed lately, so that a turn begun before the removal does not
write it back when it ends.

A slow turn (waiting on a model's answer, say) may still be running when its
conversation is removed (the bot uninstalled or removed, the team deleted) or its user's
data erased (`deleteUserData`). Ending, it would store the conversation's reference
again and save the states the removal had just deleted. The removal notes the keys it
deletes: a conversation's reference key and the state keys (a Teams channel's threads go
by the channel's); a turn that began before the note leaves them alone, but for what the
turn removed itself and read again after (a handler erasing its user's data, then
loading and saving a new state: what it had read before would bring the data back).

Held in the process's memory: a removal another instance handled is not known here
(README says so). Each note is kept REMEMBERED_SECONDS, longer than a turn may run (the
Functions host waits 230 s for an HTTP answer), and at most MAX_REMEMBERED of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

REMEMBERED_SECONDS = 600.0
MAX_REMEMBERED = 10_000
_THREAD_MARKER = ";messageid="  # a Teams channel thread's own id, after its channel's

# A token of the turn running in this context (set by the messages pipeline around its
# handlers).
current_turn: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "current_turn", default=None
)
# key -> when (time.monotonic()) it was removed and by which turn (None: no turn's), oldest
# first.
_removed: dict[str, tuple[float, object | None]] = {}


def note_removed(*keys: str) -> None:
    """`keys` (reference or state keys) are being removed now."""
    now, by = time.monotonic(), current_turn.get()
    for key in keys:
        _removed.pop(key, None)  # moved to the end: the newest
        _removed[key] = (now, by)
    while _removed:
        oldest = next(iter(_removed))
        if len(_removed) <= MAX_REMEMBERED and now - _removed[oldest][0] <= REMEMBERED_SECONDS:
            break
        del _removed[oldest]


@contextlib.contextmanager
def removing(*keys: str) -> Iterator[None]:
    """`keys`, deleted in the block, noted before it and again after it: a read begun
    while they were being deleted is from before the removal. (A block that fails is noted
    once, as the removal began.)"""
    note_removed(*keys)
    yield
    note_removed(*keys)


def removed_since(key: str, started: float, read_at: float | None = None) -> bool:
    """Whether `key` (a thread's: its channel's) was removed at or after `started`, a
    time.monotonic() reading, but by the turn running in this context when what it would
    write was read after that (`read_at`): written before, it would bring the removed
    data back."""
    found = _removed.get(key.split(_THREAD_MARKER, 1)[0])
    if found is None:
        return False
    removed, by = found
    own = by is not None and by is current_turn.get() and read_at is not None
    return removed >= started and not (own and read_at > removed)
