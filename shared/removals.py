"""What this process removed lately, so that a turn begun before the removal does not
write it back when it ends.

A slow turn (waiting on a model's answer, say) may still be running when its
conversation is removed (the bot uninstalled or removed, the team deleted, the
conversation pruned as gone) or its user's data erased (`deleteUserData`). Ending, it
would store the conversation's reference again and save the states the removal had just
deleted. The removal notes the keys it deletes: a conversation's reference key and the
state keys (a Teams channel's threads go by the channel's); a turn that began before the
note leaves them alone.

Held in the process's memory: a removal another instance handled is not known here
(README says so). Each note is kept REMEMBERED_SECONDS, longer than a turn may run (the
Functions host waits 230 s for an HTTP answer), and at most MAX_REMEMBERED of them.
"""

from __future__ import annotations

import time

REMEMBERED_SECONDS = 600.0
MAX_REMEMBERED = 10_000
_THREAD_MARKER = ";messageid="  # a Teams channel thread's own id, after its channel's

_removed: dict[str, float] = {}  # key -> when (time.monotonic()) it was removed, oldest first


def note_removed(*keys: str) -> None:
    """`keys` (reference or state keys) are being removed now."""
    now = time.monotonic()
    for key in keys:
        _removed.pop(key, None)  # moved to the end: the newest
        _removed[key] = now
    while _removed:
        oldest = next(iter(_removed))
        if len(_removed) <= MAX_REMEMBERED and now - _removed[oldest] <= REMEMBERED_SECONDS:
            break
        del _removed[oldest]


def removed_since(key: str, started: float) -> bool:
    """Whether `key` (a thread's: its channel's) was removed at or after `started`, a
    time.monotonic() reading."""
    removed = _removed.get(key.split(_THREAD_MARKER, 1)[0])
    return removed is not None and removed >= started
