"""Timer triggers: 6-field NCRONTAB schedules (or TimeSpan intervals) on the host's loop.

NCRONTAB is `second minute hour day month day-of-week` (the timer extension also takes
the 5 fields without seconds, firing at second 0), read as the timer's parser (NCrontab)
reads it and evaluated with croniter in UTC, or in `WEBSITE_TIME_ZONE` when set to an
IANA zone. Like NCrontab, a day must match both the
day and the day-of-week fields (croniter's default ORs them). Runs of one function
never overlap: the next occurrence is computed after a run ends, skipping occurrences
missed meanwhile. `past_due` is false for every scheduled run, late or not, as the timer
extension passes it (only its schedule monitor, which this host does not keep, sets it,
for an occurrence missed while the host was down).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from types import ModuleType
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from azure.functions.timer import TimerRequest

from tools.devhost.app import Function, TimerTrigger
from tools.devhost.invoker import Invoker, Outcome
from tools.devhost.settings import HostError, parse_timespan

logger = logging.getLogger(__name__)

LONGEST_SLEEP = 30.0  # re-check the wall clock at least this often
NEVER = "0001-01-01T00:00:00"
NEVER_DUE = datetime.max.replace(tzinfo=UTC)  # the next run of a schedule that never comes


class Schedule(Protocol):
    def next_after(self, when: datetime) -> datetime: ...


@dataclass(frozen=True, slots=True)
class CronSchedule:
    expression: str
    zone: tzinfo = UTC

    def next_after(self, when: datetime) -> datetime:
        """The next time after `when`; NEVER_DUE for a date no month has (30 February),
        which the timer takes and never fires."""
        from croniter import CroniterBadDateError, croniter

        local = when.astimezone(self.zone)
        schedule = croniter(self.expression, local, second_at_beginning=True, day_or=False)
        try:
            return schedule.get_next(datetime).astimezone(UTC)
        except CroniterBadDateError:
            return NEVER_DUE


@dataclass(frozen=True, slots=True)
class IntervalSchedule:
    seconds: float

    def next_after(self, when: datetime) -> datetime:
        return when + timedelta(seconds=self.seconds)


def parse_schedule(
    text: str, settings: Mapping[str, str], *, where: str, shown: str | None = None
) -> Schedule:
    """A schedule from an NCRONTAB expression or a TimeSpan such as 00:05:00. Errors
    quote `text`, or say `shown` instead (the %Setting% it came from)."""
    if ":" in text:
        try:
            seconds = parse_timespan(text, where=where)
        except HostError:
            if shown is None:
                raise
            raise HostError(f"{where}: {shown} is not a TimeSpan like 00:05:00") from None
        if seconds <= 0:
            raise HostError(f"{where}: the interval must be positive")
        return IntervalSchedule(seconds)
    fields = [field for field in text.split(" ") if field]  # the timer splits on spaces only
    expression = " ".join(["0", *fields] if len(fields) == 5 else fields)
    syntax = _ncrontab()
    if (
        len(fields) not in (5, 6)
        or any(not field.isprintable() for field in fields)  # a tab, a line break
        or syntax.ncrontab_problem(expression, portable=False)
    ):
        raise HostError(
            f"{where}: {shown or repr(text)} is not an NCRONTAB expression "
            "(second minute hour day month day-of-week, or the last five, separated by "
            "spaces)"
        )
    # Run by croniter in the timer's meaning: NCrontab swaps a reversed range's ends,
    # reads a one-value range as that value and takes any prefix of a name.
    schedule = CronSchedule(syntax.croniter_form(expression), _zone(settings))
    if schedule.next_after(datetime.now(UTC)) == NEVER_DUE:
        logger.warning("%s: %s never falls due (a date no month has)", where, shown or repr(text))
    return schedule


@functools.cache
def _ncrontab() -> ModuleType:
    """The repo's reader of NCRONTAB as the timer reads it (shared/timer_syntax.py, which
    imports nothing of the bot's), loaded under a name of the host's own: imported as
    `shared.timer_syntax`, the bot's `shared` package would stand in for the `shared` of
    an app served with --root."""
    path = Path(__file__).resolve().parents[2] / "shared" / "timer_syntax.py"
    spec = importlib.util.spec_from_file_location("tools.devhost._timer_syntax", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _zone(settings: Mapping[str, str]) -> tzinfo:
    name = settings.get("WEBSITE_TIME_ZONE", "").strip()
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HostError(f"app setting WEBSITE_TIME_ZONE: unknown time zone {name!r}") from None


class TimerListener:
    """Fires one timer function on its schedule until stopped."""

    def __init__(
        self,
        function: Function,
        schedule: Schedule,
        invoker: Invoker,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        trigger = function.spec.trigger
        assert isinstance(trigger, TimerTrigger)
        self.function = function
        self.schedule = schedule
        self.run_on_startup = trigger.run_on_startup
        self._invoker = invoker
        self._clock = clock
        self._stopping = asyncio.Event()
        self._last: datetime | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        now = self._clock()
        if self.run_on_startup:
            await self._fire(now, past_due=False)
        due = self.schedule.next_after(now)
        while await self._sleep_until(due):
            await self._fire(due, past_due=False)
            due = self.schedule.next_after(max(due, self._clock()))

    async def invoke_manually(self, _text: str = "") -> Outcome:
        """Run the function now, outside its schedule (admin endpoint)."""
        request = self._request(self._clock(), False)
        return await self._invoker.invoke(self.function, lambda: request)

    async def _fire(self, scheduled: datetime, *, past_due: bool) -> None:
        request = self._request(scheduled, past_due)
        self._last = scheduled
        task = self._invoker.spawn(self._invoker.invoke(self.function, lambda: request))
        # Shielded: stopping the timer must not cancel a run in progress.
        await asyncio.shield(task)

    def _request(self, scheduled: datetime, past_due: bool) -> TimerRequest:
        following = self.schedule.next_after(max(scheduled, self._clock()))
        return TimerRequest(
            past_due=past_due,
            schedule_status={
                "Last": self._last.isoformat() if self._last else NEVER,
                "Next": following.isoformat(),
                "LastUpdated": self._clock().isoformat(),
            },
            schedule={"AdjustForDST": True},
        )

    async def _sleep_until(self, due: datetime) -> bool:
        """Wait for `due`; False when stopped first."""
        while not self._stopping.is_set():
            remaining = (due - self._clock()).total_seconds()
            if remaining <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(remaining, LONGEST_SLEEP))
        return False
