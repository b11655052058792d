"""Schedules as the Functions timer reads them: NCRONTAB expressions and TimeSpans.

Both the settings check (`BOT_SCHEDULE`, :mod:`shared.config`) and the schedule documents
(:mod:`shared.schedules`) judge expressions here, so they cannot drift apart.
"""

from __future__ import annotations

import re

# NCRONTAB, as the Functions host's parser (NCrontab) reads a field: numbers, `*`, ranges
# `a-b`, lists, and steps `/n` (n >= 1); month and day of week also take names, any prefix
# of the English name (`Mon`, `Monday`, `M`: the first name it begins), in any case. A
# reversed range `5-1` is read with its ends swapped, a range of one value `5-5` (stepped
# or not) as that value, a value stepped `a/n` as `a` to the field's end by n, except by
# 1, which NCrontab's releases read differently (the one value; to the field's end).
# croniter's extensions (`R` random, `H` hashed, `L`, `#`, `W`, `?`, day of week 7) are
# not NCRONTAB. The schedule documents are run by croniter, which reads some of these
# otherwise (`5-1` wraps around, `5-5` is `*`) and names only as 3 letters: they take
# NCRONTAB as NCrontab reads it, written as croniter reads it (`croniter_form`), all but
# `a/1` (`portable`), whose meaning depends on the host's release.
_MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip
_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_NCRONTAB_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)
# A value or name has at most 9 characters (September, Wednesday): never more digits than
# int() takes (a ValueError, not a reason).
_NCRONTAB_ITEM = re.compile(
    r"(\*|[0-9A-Za-z]{1,9}|[0-9A-Za-z]{1,9}-[0-9A-Za-z]{1,9})(?:/([0-9]{1,9}))?"
)


def ncrontab_problem(expression: str, *, portable: bool = True) -> str | None:
    """What keeps `expression` from being a 6-field NCRONTAB (sec min hour day month
    day-of-week), in a few words naming the field; None when it is one. `portable`: not
    `a/1` either, which NCrontab's releases read differently (see above)."""
    fields = expression.split()
    if len(fields) != 6:
        return "must be a 6-field NCRONTAB expression (sec min hour day month day-of-week)"
    for text, (name, low, high, names) in zip(fields, _NCRONTAB_FIELDS, strict=True):
        items = [_ncrontab_item(item, low, high, names) for item in text.split(",")]
        if None in items:
            words = f"{low}-{high}" + (" or names" if names else "")
            return f"its {name} field takes {words}, *, ranges a-b, lists and /steps"
        stepped_by_1 = [i for i in items if i and i[0] is not None and i[1] is None and i[2] == 1]
        if portable and stepped_by_1:
            return (
                f"its {name} field has a value stepped by 1 (`a/1`), which the host's "
                "releases read differently: write `a` alone, or the range `a-b`"
            )
    return None


def croniter_form(expression: str) -> str:
    """A 6-field NCRONTAB (ncrontab_problem finds nothing in it) as croniter reads it in
    NCrontab's meaning: names as numbers, a range of one value as that value, a reversed
    range with its ends swapped."""
    fields = []
    for text, (_, low, high, names) in zip(expression.split(), _NCRONTAB_FIELDS, strict=True):
        items = []
        for item in text.split(","):
            parsed = _ncrontab_item(item, low, high, names)
            assert parsed is not None, "croniter_form takes a valid expression"
            first, last, step = parsed
            if first is None:
                items.append(item)  # `*` or `*/n`: read alike
            elif last is None:
                items.append(f"{first}/{step}" if step else f"{first}")
            elif first == last:
                items.append(f"{first}")  # stepped or not: the one value
            else:
                low_end, high_end = sorted((first, last))
                items.append(f"{low_end}-{high_end}" + (f"/{step}" if step else ""))
        fields.append(",".join(items))
    return " ".join(fields)


def _ncrontab_item(
    item: str, low: int, high: int, names: tuple[str, ...]
) -> tuple[int | None, int | None, int | None] | None:
    """An item of a list as NCrontab reads it: (first, last or None for a value alone,
    step or None), (None, None, step) for `*`; None when NCrontab refuses it."""
    match = _NCRONTAB_ITEM.fullmatch(item)
    if match is None or (match[2] is not None and int(match[2]) < 1):
        return None
    step = int(match[2]) if match[2] is not None else None
    if match[1] == "*":
        return None, None, step
    bounds = [_ncrontab_value(text.lower(), low, high, names) for text in match[1].split("-")]
    if None in bounds:
        return None
    return bounds[0], bounds[1] if len(bounds) == 2 else None, step


def _ncrontab_value(text: str, low: int, high: int, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text) if low <= int(text) <= high else None
    for index, name in enumerate(names):
        if name.startswith(text):
            return index + low
    return None


# A TimeSpan as the timer reads one ([d.]hh:mm[:ss[.fffffff]], ASCII digits; .NET's
# TimeSpan holds up to 10,675,199 days): not on Flex Consumption (_NO_TIMESPAN_PLANS).
_TIMESPAN = re.compile(
    r"(?:(\d{1,8})\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.(\d{1,7}))?)?", re.ASCII
)
_TIMESPAN_MAX_TICKS = 2**63 - 1  # .NET's TimeSpan.MaxValue, in ticks of 100 ns
_NOT_A_TIMESPAN = "must be a TimeSpan like 00:05:00, over zero"
# The plans (by WEBSITE_SKU) whose timer takes no TimeSpan. (Linux Consumption, the only
# Consumption a Python app has, runs one: its host only warns.)
_NO_TIMESPAN_PLANS = {"flexconsumption": "Flex Consumption"}


def timer_schedule_problem(schedule: str, sku: str = "") -> str | None:
    """What the Functions timer would refuse in `schedule` (a BOT_SCHEDULE), in a few
    words; None when it runs it. The timer reads 6 NCRONTAB fields, 5 (no seconds: they
    fire at second 0), or a TimeSpan such as 00:05:00 (not on a plan of `sku`, a
    WEBSITE_SKU, in _NO_TIMESPAN_PLANS)."""
    fields = [text for text in schedule.split(" ") if text]  # the host splits on spaces only
    if len(fields) == 1 and ":" in schedule:
        match = _TIMESPAN.fullmatch(schedule)
        if match is None:
            return _NOT_A_TIMESPAN
        days, hours, minutes, seconds, fraction = match.groups(default="0")
        whole = int(days) * 86_400 + int(hours) * 3_600 + int(minutes) * 60 + int(seconds)
        ticks = whole * 10**7 + int(fraction.ljust(7, "0"))
        out_of_range = int(hours) > 23 or int(minutes) > 59 or int(seconds) > 59
        if out_of_range or not 0 < ticks <= _TIMESPAN_MAX_TICKS:
            return _NOT_A_TIMESPAN
        if sku.lower() in _NO_TIMESPAN_PLANS:
            return (
                f"is a TimeSpan, which the timer of a {_NO_TIMESPAN_PLANS[sku.lower()]} plan "
                "(this app's) does not run: give an NCRONTAB expression"
            )
        return None
    if len(fields) not in (5, 6) or any(text.isspace() or "\t" in text for text in fields):
        return (
            "must be an NCRONTAB expression of 6 fields (sec min hour day month day-of-week) "
            "or 5 (no seconds), fields separated by spaces, or a TimeSpan like 00:05:00"
        )
    # The host's own parser reads it: all that NCrontab reads, not only the portable part.
    return ncrontab_problem("0 " + schedule if len(fields) == 5 else schedule, portable=False)
