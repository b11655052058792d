"""What the logs may say about an exception: its type and where it was raised, never its text.

Exception messages can carry what must not reach a log: a token in a URL, a SAS
signature, a user's message. The frames (file, line, function) are enough for an
operator to find the fault in the code.
"""

from __future__ import annotations

import traceback
from pathlib import Path, PurePath

MAX_FRAMES = 6
MAX_LOGGED_ID = 200  # characters of an untrusted id a log line may quote
MAX_CHAIN = 3  # the exception and at most two it was raised from or while handling

# The app's root folder (`shared/` lives in it), as imported and with links resolved.
# Installed packages may live below it too (`.python_packages` on Azure, `.venv` locally),
# so a `site-packages` path is never ours.
_ROOTS = tuple(
    {PurePath(Path(__file__).parent.parent), PurePath(Path(__file__).resolve().parent.parent)}
)
_PACKAGE_DIRS = ("site-packages", "dist-packages")


def describe(error: BaseException) -> str:
    """``"ValueError at shared/bot.py:27 in echo <- shared/router.py:250 in dispatch"``.

    Where it was raised first, then the app's own frames that led there, innermost first
    (library frames in between are left out, so a failure deep inside a package still
    shows which line of ours called it). The exceptions it was raised from (``from``) or
    while handling follow: ``"...; from KeyError at ..."``, ``"...; while handling ..."``.
    """
    parts = [_describe_one(error)]
    seen = {id(error)}
    current = error
    while len(parts) < MAX_CHAIN:
        if current.__cause__ is not None:
            current, how = current.__cause__, "from"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, how = current.__context__, "while handling"
        else:
            break
        if id(current) in seen:
            break
        seen.add(id(current))
        parts.append(f"{how} {_describe_one(current)}")
    return "; ".join(parts)


def _describe_one(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    raised = frames[-1]
    ours = [frame for frame in reversed(frames[:-1]) if _is_ours(frame.filename)]
    where = " <- ".join(
        f"{_short_path(frame.filename)}:{frame.lineno} in {frame.name}"
        for frame in [raised, *ours][:MAX_FRAMES]
    )
    return f"{type(error).__name__} at {where}"


def _is_ours(filename: str) -> bool:
    path = PurePath(filename)
    return _app_root(path) is not None and not any(part in _PACKAGE_DIRS for part in path.parts)


def _app_root(path: PurePath) -> PurePath | None:
    return next((root for root in _ROOTS if path.is_relative_to(root)), None)


def _short_path(filename: str) -> str:
    """Installed packages from their import name (``aiohttp/client.py``), others by their
    last two parts (``shared/router.py``, ``auth/tokens.py``, ``asyncio/tasks.py``)."""
    parts = PurePath(filename).parts
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in _PACKAGE_DIRS:
            return "/".join(parts[index + 1 :])
    return "/".join(parts[-2:])


def clip(value: object, limit: int = MAX_LOGGED_ID) -> str:
    """`value`'s repr, cut to `limit` characters with the length it had (an id from a
    request: quoted, so it cannot fake a log line, and short, so it cannot flood one)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
