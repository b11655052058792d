"""App settings for the local host: `local.settings.json` `Values`, then the environment.

Like Core Tools, the process environment wins over `local.settings.json`, and the
merged values are put into `os.environ` before any function module is imported, so
function code reads its settings exactly as it would on Azure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

# The app's settings of local unauthenticated mode (shared/config.py), read here by name:
# importing the bot's `shared` would stand in for another app's own.
ALLOW_SETTING = "BOT_ALLOW_UNAUTHENTICATED"
APP_ID_SETTING = "MicrosoftAppId"


def encrypted(document: Mapping[str, Any]) -> bool | None:
    """A settings file's `IsEncrypted` as Core Tools read it: True or False when it says
    (true/false, as text in any case too, or a number), None when it is missing or null,
    which Core Tools take for encrypted."""
    value = document.get("IsEncrypted")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def runs_unauthenticated(settings: Mapping[str, str]) -> bool:
    """Whether the app would run the bot unauthenticated with `settings` (as it reads
    them: BOT_ALLOW_UNAUTHENTICATED true and no MicrosoftAppId). Such a bot trusts loopback
    serviceUrls: anyone reaching it could make it post to any port of this machine."""
    allow = settings.get(ALLOW_SETTING, "").strip().lower() in ("true", "1", "yes")
    return allow and not settings.get(APP_ID_SETTING, "").strip()


def as_started(name: str, local: Mapping[str, str]) -> str:
    """Setting `name` as the bot `make run` starts reads it with `local` as its file: the
    environment wins over the file. A variable set empty wins too for the local host, while
    Core Tools (which `make run` prefers when they are installed) fill it in from the file."""
    value = os.environ.get(name)
    if value is not None and (value or shutil.which("func") is None):
        return value
    return local.get(name, "")


def app_id_source(local: Mapping[str, str]) -> str:
    """Where the bot `make run` starts with `local` as its file finds a MicrosoftAppId:
    "in the environment", "in local.settings.json", or "" when it finds none."""
    if not as_started(APP_ID_SETTING, local).strip():
        return ""
    return "in the environment" if os.environ.get(APP_ID_SETTING) else "in local.settings.json"


LOCAL_SETTINGS = "local.settings.json"
_SETTING_REFERENCE = re.compile(r"%([^%\s]+)%")
_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d+):(?P<m>\d+)(?::(?P<s>\d+(?:\.\d+)?))?$")


class HostError(Exception):
    """The function app cannot be hosted; the message names the file, function or setting."""


def load_local_settings(root: Path) -> dict[str, str]:
    """`Values` of `<root>/local.settings.json`, or {} when the file does not exist."""
    path = root / LOCAL_SETTINGS
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise HostError(f"{LOCAL_SETTINGS}: not readable JSON ({json_problem(exc)})") from None
    if not isinstance(document, dict):
        raise HostError(f"{LOCAL_SETTINGS}: must be a JSON object")
    if encrypted(document):
        raise HostError(f"{LOCAL_SETTINGS}: encrypted settings are not supported; decrypt them")
    values = document.get("Values", {})
    if not isinstance(values, dict):
        raise HostError(f"{LOCAL_SETTINGS}: Values must be an object")
    settings = {str(name): _as_text(value) for name, value in values.items() if value is not None}
    if problem := values_problem(settings):
        raise HostError(f"{LOCAL_SETTINGS}: Values: {problem}")
    return settings


MAX_ENVIRONMENT_STRING = 128 * 1024  # Linux's limit for one `NAME=value`


def values_problem(values: Mapping[str, str]) -> str | None:
    """Why one of a settings file's `values` cannot be an environment variable, or None."""
    for name, value in values.items():
        if problem := environment_problem(name, value):
            return problem
    return None


def environment_problem(name: str, value: str) -> str | None:
    """Why a setting cannot be an environment variable (as the host passes settings to the
    app), or None."""
    if not name or "=" in name or "\0" in name:
        return f"{name[:60]!r} is no setting name (empty, or with '=' or a NUL character)"
    if "\0" in value:
        return f"the value of {name[:60]!r} holds a NUL character"
    try:
        size = len(os.fsencode(name)) + len(os.fsencode(value))
    except UnicodeEncodeError:  # a lone surrogate (JSON's \ud800)
        return f"{name[:60]!r}: its name or value is not valid Unicode"
    if size >= MAX_ENVIRONMENT_STRING:
        return f"the value of {name[:60]!r} is longer than an environment holds"
    return None


def json_problem(error: Exception) -> str:
    """What is wrong with a settings file, and where (a JSON error's line and column)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    return type(error).__name__


def apply_settings(
    local: Mapping[str, str], environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Put local settings into the environment where it has no value; return the merged view."""
    target = os.environ if environ is None else environ
    for name, value in local.items():
        target.setdefault(name, value)
    return dict(target)


def resolve(value: str, settings: Mapping[str, str], *, where: str) -> str:
    """Replace every `%Setting%` in `value`; an unknown setting is a :class:`HostError`."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in settings:
            raise HostError(f"{where}: app setting '{name}' (referenced as %{name}%) is not set")
        return settings[name]

    return _SETTING_REFERENCE.sub(lookup, value)


def parse_timespan(value: Any, *, where: str) -> float:
    """Seconds in a .NET TimeSpan (`[d.]hh:mm[:ss[.fff]]`).

    A JSON number is refused: Functions 1.x read it as milliseconds, while the host since
    2.x reads it as TimeSpan text, `2000` being 2,000 days (a queue polled that rarely)."""
    if isinstance(value, bool):
        raise HostError(f"{where}: expected a TimeSpan like 00:00:02, got {value!r}")
    if isinstance(value, int | float):
        raise HostError(
            f'{where}: give a TimeSpan string like "00:00:02", not the number {value!r} '
            "(the Functions host would read it as days)"
        )
    match = _TIMESPAN.match(str(value).strip())
    if match is None:
        raise HostError(f"{where}: expected a TimeSpan like 00:00:02, got {value!r}")
    seconds = (
        int(match["days"] or 0) * 86400
        + int(match["h"]) * 3600
        + int(match["m"]) * 60
        + float(match["s"] or 0)
    )
    if seconds < 0:
        raise HostError(f"{where}: must not be negative")
    return float(seconds)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
