"""What the logs may say about an exception: its type and where it was raised, never its text.

Exception messages can carry what must not reach a log: a token in a URL, a SAS
signature, a user's message. The frames (file, line, function) are enough for an
operator to find the fault in the code.
"""

from __future__ import annotations

import traceback
from pathlib import PurePath

MAX_FRAMES = 6


def describe(error: BaseException) -> str:
    """``"ValueError at shared/bot.py:27 in echo <- shared/router.py:250 in dispatch"``.

    The innermost frames first, each file shown by its last two path parts.
    """
    frames = traceback.extract_tb(error.__traceback__)[-MAX_FRAMES:]
    where = " <- ".join(
        f"{'/'.join(PurePath(frame.filename).parts[-2:])}:{frame.lineno} in {frame.name}"
        for frame in reversed(frames)
    )
    return f"{type(error).__name__} at {where}" if where else type(error).__name__
