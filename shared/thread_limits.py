"""Which of a Teams tenant's 429s are one conversation's own limit, not the tenant's.

Teams also limits threads in ways the pacer (shared/ratelimit.py) does not model: one
conversation can draw 429 after 429 while the tenant is far from full, and each used to
cut the tenant (to 15-53 % of the limit in tests/unit/test_ratelimit.py's simulation). A
conversation answered 429 again within CONVERSATION_429_SECONDS after the Retry-After its
last 429 asked for (it is sent again only then), with no other conversation answered 429
in between, is taken to be held by a limit of its own: the request still waits its
Retry-After, the tenant neither pauses nor cuts. Its first 429 counts as usual: waiting
for 429s on two conversations before any cut let N instances draw 3-8 % 429s. A full
tenant's 429s fall on whichever conversations come next: ignoring every repeat let
instances that each send to a few conversations draw 19-31 % 429s. Two conversations
thread-limited at once interleave their 429s, and each counts for the tenant.
"""

from __future__ import annotations

CONVERSATION_429_SECONDS = 60.0
CONVERSATIONS_REMEMBERED = 64  # per tenant lane, the most recent
MAX_REMEMBERED_WAIT = 3600.0  # a Retry-After longer than this is remembered as this


class ThreadLimits:
    """One tenant lane's memory of its conversations' 429s."""

    __slots__ = ("_throttled",)

    def __init__(self) -> None:
        # When each conversation (None: a request for none) last drew a 429, and until
        # when that 429 asked it to wait; latest last.
        self._throttled: dict[str | None, tuple[float, float]] = {}

    def own_limit(self, now: float, conversation: str | None, wait: float) -> bool:
        """Whether this 429 (which asked to ``wait``) is ``conversation``'s own limit: it
        drew one within CONVERSATION_429_SECONDS after the wait that one asked for, and no
        other conversation (nor a request for none) has drawn one since. A full tenant
        answers 429 to whichever request comes next, so its 429s fall on several
        conversations in turn, each of them again and again when an instance sends to
        only a few."""
        throttled = self._throttled
        earlier, until = throttled.pop(conversation, (None, 0.0))
        # Kept in the order they were answered: the last is the latest other 429.
        other = next(reversed(throttled.values()), (None, 0.0))[0]
        throttled[conversation] = (now, now + min(wait, MAX_REMEMBERED_WAIT))
        if len(throttled) > CONVERSATIONS_REMEMBERED:
            del throttled[next(iter(throttled))]
        return (
            conversation is not None
            and earlier is not None
            and now - until <= CONVERSATION_429_SECONDS
            and (other is None or other < earlier)
        )
