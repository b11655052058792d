"""Argument types the local tools share, checked as the command line is parsed: a bad value
is argparse's usage line and one error line naming the option (exit 2), before anything
starts (a port over 65535 was a traceback, some tools' only after starting Azurite)."""

from __future__ import annotations

import argparse
import re
from urllib.parse import urlsplit

EXAMPLE_URL = "http://127.0.0.1:7071/api/messages"


def tcp_port(text: str) -> int:
    """A TCP port, 1-65535."""
    return _port(text, lowest=1)


def tcp_port_or_any(text: str) -> int:
    """A TCP port, or 0 for any free one."""
    return _port(text, lowest=0)


def _port(text: str, *, lowest: int) -> int:
    meaning = "; 0: any free port" if lowest == 0 else ""
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port ({lowest}-65535{meaning})")
    return value


def http_url(text: str) -> str:
    """An http or https URL with a host (a bot's endpoint, say)."""
    value = text.strip()
    # The authority, however the rest is written: after a scheme and any slashes, up to
    # the path, query or fragment.
    rest = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*:", "", value).lstrip("/\\")
    authority = re.split(r"[/\\?#]", rest, maxsplit=1)[0]
    if "@" in authority or any(c.isspace() or not c.isprintable() for c in value):
        # Not echoed: it may hold a password. urllib would not send it either.
        raise argparse.ArgumentTypeError(
            f"a URL with a user name or password, spaces or control characters cannot be "
            f"sent to; give one such as {EXAMPLE_URL}"
        )
    try:
        parts = urlsplit(value)
        _ = parts.port  # a ValueError for a port that is not one
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL with a host, such as {EXAMPLE_URL}"
        )
    return value
