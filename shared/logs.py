"""What the app logs in production, decided here rather than left to the host.

The Python worker forwards every record at INFO and above to the Functions host (DEBUG
too with the app setting `PYTHON_ENABLE_DEBUG_LOGGING=1`). At INFO the Azure SDK logs
every storage request and response with its headers, and MSAL every token step: noise and
ingestion cost, nothing an operator of the bot acts on (failures surface through the
app's own log lines). So the Azure SDK logs warnings and errors only, wherever the app
runs, and MSAL nothing: its error lines quote the token endpoint's answer as it came
(a proxy's page may echo the request's form, client secret or assertion included), and
the app reports every failed token request itself, without that text. The app's own
loggers log one line per anomaly at INFO and above, and the detail of
each activity at DEBUG; an anomaly every message meets while one cause lasts (a refused
credential, storage down, a refused request) is logged once a minute per cause
(:func:`log_repeated`), with how many like it were held back.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

QUIET_LIBRARIES = ("azure",)  # "azure" covers azure.core's HTTP logging policy
SILENT_LIBRARIES = ("msal",)


def quiet_libraries() -> None:
    """Hold the Azure SDK's loggers at WARNING and MSAL's above CRITICAL."""
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


class Repeated:
    """A warning that comes with every message while one cause lasts (a setting to fix,
    storage down): logged once a minute per cause, with how many were held back since,
    so that the line saying what to fix is not lost among thousands like it."""

    def __init__(self, every: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._causes: OrderedDict[str, tuple[float, int]] = OrderedDict()  # last line, held

    def clear(self) -> None:
        """Forget every cause: the next line of each is logged."""
        self._causes.clear()

    def due(self, cause: str) -> int | None:
        """How many lines of `cause` were held back since the last one, when one is due
        now; None while it is not (this one is counted as held back)."""
        now = self._clock()
        last = self._causes.get(cause)
        if last is not None and now - last[0] < self._every:
            self._causes[cause] = (last[0], last[1] + 1)
            return None
        self._causes[cause] = (now, 0)
        self._causes.move_to_end(cause)
        while len(self._causes) > 256:  # causes are few; a flood of distinct ones is cut
            self._causes.popitem(last=False)
        return 0 if last is None else last[1]


def storage_cause(failure: Exception) -> str:
    """What a storage failure says, alike for every message that meets it: its type,
    status and code, an HTTP status its text gives, and its text without what differs
    from one message to the next (a key as the stores quote it, whatever its words; a
    blob's path; numbers)."""
    text = _QUOTED.sub("…", str(failure))
    http = _HTTP_STATUS.search(text)
    words = " ".join(_VARYING.sub("…", text).split())
    status, code = getattr(failure, "status", None), getattr(failure, "code", None)
    return f"{type(failure).__name__} {status} {code} {http and http[0]} {words}"


# A value as the stores quote it: repr(), escapes inside, perhaps cut short by clip() (an
# escape's backslash may be the last character before the cut).
_QUOTED = re.compile(
    r"""'(?:[^'\\]|\\.)*(?:'|\\?\.\.\.\(\d+ chars\))|"(?:[^"\\]|\\.)*(?:"|\\?\.\.\.\(\d+ chars\))"""
)
_HTTP_STATUS = re.compile(r"HTTP \d{3}")
_VARYING = re.compile(r"\S*/\S*|\d+")  # a path, a number


def held_back(count: int) -> str:
    """The end of a repeated line: how many like it were not logged since the last one."""
    return f" ({count} more like this since the last such line)" if count else ""


def log_repeated(
    logger: logging.Logger,
    level: int,
    cause: str,
    message: str,
    *args: object,
    repeated: Repeated | None = None,
) -> None:
    """Log `message` at `level` once a minute per `cause` (in `repeated`, by default
    :data:`REPEATED`, created below), saying how many like it were held back; at DEBUG
    in between."""
    count = (repeated or REPEATED).due(cause)
    level = logging.DEBUG if count is None else level
    logger.log(level, message + "%s", *args, held_back(count or 0))


# The process's repeated warnings (shared/proactive.py, holding.py, outcomes.py, messages.py);
# refused requests apart (anyone can send them: their causes must not push the others out).
REPEATED = Repeated()
REFUSALS = Repeated()
