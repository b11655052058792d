"""Scheduled sends: schedule documents in Blob storage, enqueued when due, never sent here.

A schedule is a JSON blob ``schedules/<name>.json`` in `BOT_REFERENCES_CONTAINER`::

    {"schedule": "0 0 9 * * Mon-Fri", "request": {<a proactive request without id>},
     "enabled": true}

Each timer run (`BOT_SCHEDULE`; the template and the example settings run it every
minute) enqueues, for every enabled
schedule, each due time since that schedule's last run, with the id
``schedule:<name>:<YYYY-MM-DDTHH:MMZ>``. The last run is a small ETag'd blob per schedule
(``proactive-schedules/<encoded name>.json``, with the document's ETag that run read;
marked removed, not deleted, with the schedule), so a missed (past-due) run catches up
once; a document written since its last run (edited, or deleted and created again)
counts from that write instead, so nothing from before it is sent, and never sends in the
latest minute a run enqueued (its id may be the document before's). Two runs that overlap, or a run
retried after a crash before its bookkeeping was written, enqueue the same ids again:
delivery dedupes by id, so each due time is sent once. A schedule fires at most once a
minute (due times are per minute), never before its first due second in that minute
(within EARLY_RUN: the host may fire a run a moment early).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.activity import is_unicode_text
from shared.config import Settings, SettingsError
from shared.ledger import Entry, Ledger, NotJson, Record
from shared.proactive_schema import (
    POISON_REASON,
    RESERVED,
    InvalidRequest,
    field_name,
    parse_request,
)
from shared.producer import request_text
from shared.queues import MessageQueue, QueueAuthFailed, compact_json
from shared.references.contract import StorageAuthFailed, StoreError
from shared.references.keys import encode_segment
from shared.timer_syntax import croniter_form, ncrontab_problem

logger = logging.getLogger(__name__)

SCHEDULES_PREFIX = "schedules/"
STATE_PREFIX = "proactive-schedules/"
MAX_CATCH_UP = timedelta(days=1)  # a schedule missed for longer catches up on this much
MAX_DUE_PER_RUN = 60  # due times enqueued per schedule per run, the latest ones
MAX_DOCUMENT_BYTES = 64 * 1024  # a request is at most 48,640 bytes as JSON
MAX_EXPRESSION_CHARS = 256
# The host may fire a run a few ms before the minute it is for: a due second at most this
# far ahead counts as come, rather than wait for the next run.
EARLY_RUN = timedelta(seconds=1)
# A last run recorded up to this far ahead of a run's clock is the clocks of two instances
# disagreeing a little: nothing falls due before it, and the record stands. Further ahead
# of both this run's clock and storage's when the record was written (a clock that ran
# ahead, a hand edit), the schedule restarts from the run that finds it.
AHEAD_TOLERATED = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    expression: str
    request: dict[str, Any]
    enabled: bool = True


def parse_schedule(name: str, document: Any) -> Schedule:
    """Validate a schedule document; InvalidRequest with a short reason."""
    from croniter import croniter  # imported when a schedule is read (cold start)

    if not isinstance(document, dict):
        raise InvalidRequest("a schedule document is a JSON object")
    unknown = sorted(set(document) - {"schedule", "request", "enabled"})
    if unknown:
        raise InvalidRequest(f"unknown field `{field_name(unknown[0])}`")
    expression = document.get("schedule")
    if isinstance(expression, str) and len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidRequest(f"`schedule` is longer than {MAX_EXPRESSION_CHARS} characters")
    if not isinstance(expression, str) or len(expression.split()) != 6:
        raise InvalidRequest("`schedule` must be a 6-field NCRONTAB expression (UTC)")
    problem = ncrontab_problem(expression)
    if problem is not None:
        raise InvalidRequest(f"`schedule` must be a 6-field NCRONTAB expression (UTC): {problem}")
    if not croniter.is_valid(croniter_form(expression), second_at_beginning=True):
        raise InvalidRequest("`schedule` must be a 6-field NCRONTAB expression (UTC)")
    if not _ever_due(expression):
        raise InvalidRequest("`schedule` never falls due (a date no month has, such as 30 Feb)")
    enabled = document.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidRequest("`enabled` must be true or false")
    request = document.get("request")
    if not isinstance(request, dict) or {"id", RESERVED, POISON_REASON} & request.keys():
        # (Each due time is enqueued again under its id by design: with a poison copy's
        # reason, every such copy would retry a failure, a 500 that may have been posted.)
        raise InvalidRequest(
            f"`request` must be a proactive request without `id`, `{RESERVED}` or `{POISON_REASON}`"
        )
    # The producer's own rules, size included: every due time's message is this long.
    parse_request(request_text({**request, "id": schedule_id(name, _EPOCH)}))
    return Schedule(name, expression, request, enabled)


_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _ever_due(expression: str) -> bool:
    """Whether the expression names a time that comes (`0 0 0 30 2 *` parses, never does)."""
    from croniter import CroniterBadDateError, croniter

    cron = croniter_form(expression)
    try:
        croniter(cron, _EPOCH, second_at_beginning=True, day_or=False).get_next(datetime)
    except CroniterBadDateError:
        return False
    return True


def schedule_id(name: str, due: datetime) -> str:
    return f"schedule:{name}:{due.astimezone(UTC).strftime('%Y-%m-%dT%H:%MZ')}"


def due_times(expression: str, after: datetime, until: datetime) -> list[datetime]:
    """Due minutes, latest MAX_DUE_PER_RUN of them, oldest first (see :func:`_due`)."""
    return _due(expression, after, until)[0]


def _due(expression: str, after: datetime, until: datetime) -> tuple[list[datetime], bool]:
    """Due minutes, latest MAX_DUE_PER_RUN of them, oldest first, and whether a due minute
    after `after` was left out (older than MAX_CATCH_UP, or past MAX_DUE_PER_RUN).

    A minute is due once the first second of it the expression names has come, in
    (after, until]: never before (a run at 09:00:00 does not send `45 0 9 * * *`; the
    next run does, as 09:00). The walk goes back from `until` one due minute per step, so
    it costs at most MAX_DUE_PER_RUN steps whatever the window or the expression's seconds
    (`* * * * * *` included).
    """
    from croniter import croniter

    form = croniter_form(expression)  # NCrontab's meaning, as croniter reads it

    def cron(start: datetime) -> croniter:
        return croniter(form, start, second_at_beginning=True, day_or=False)

    capped = max(after, until - MAX_CATCH_UP)
    latest = cron(until.replace(microsecond=0) + timedelta(seconds=1))  # until's second counts
    due: list[datetime] = []
    while True:
        minute = latest.get_prev(datetime).replace(second=0, microsecond=0)
        came = cron(minute - timedelta(seconds=1)).get_next(datetime)  # its first due second
        if came <= capped or len(due) == MAX_DUE_PER_RUN:
            # Came by the last run (that run had it), or a minute the caps leave out.
            return due[::-1], came > after
        due.append(minute)
        latest.set_current(minute)  # the next step starts before this minute


@dataclass(frozen=True, slots=True)
class Listed:
    """A blob under ``schedules/``: its schedule, or why the timer skips it (`problem`)."""

    name: str
    schedule: Schedule | None
    problem: str | None = None
    modified: float = 0.0  # when its document was last written (epoch seconds)
    blob: str = ""  # its full name
    version: str = ""  # its document's ETag


async def read_schedules(ledger: Ledger) -> AsyncIterator[Listed]:
    """Every blob under ``schedules/``, in name order, read and checked as the timer does.
    Raises StoreError when storage fails to read one (not the document's fault)."""
    entries = [entry async for entry in ledger.list(SCHEDULES_PREFIX)]
    for entry in entries:
        found = await _check(ledger, entry)
        if found is not None:
            yield found


async def _check(ledger: Ledger, entry: Entry) -> Listed | None:
    """The listed blob's schedule, or why the timer skips it; None when it is gone.
    Raises StoreError when storage fails to read it."""
    found = await _checked(ledger, entry)
    return None if found is None else replace(found, blob=entry.name)


async def _checked(ledger: Ledger, entry: Entry) -> Listed | None:
    blob = entry.name
    name = blob[len(SCHEDULES_PREFIX) :]
    if not blob.endswith(".json"):
        return Listed(name, None, "a schedule document's name ends in .json")
    # The blob's name under schedules/, less .json, folders included: "team/daily".
    name = name[: -len(".json")]
    if not name:
        return Listed(name, None, "a schedule document's name is empty")
    if entry.size > MAX_DOCUMENT_BYTES:
        return Listed(name, None, f"the document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        record = await ledger.read(blob)
        if record is None:
            return None  # removed since the listing
        schedule = parse_schedule(name, record.data)
        return Listed(name, schedule, None, record.modified, version=record.etag)
    except NotJson:
        return Listed(name, None, "the document is not valid JSON or unreadable")
    except InvalidRequest as error:
        return Listed(name, None, str(error))
    except ValueError:  # croniter's own refusals, whose text may quote the document
        return Listed(name, None, "`schedule` is not an expression croniter reads")


async def run_schedules(ledger: Ledger, queue: MessageQueue, now: datetime) -> list[str]:
    """Enqueue every schedule's due times since its last run; the ids enqueued.

    One bad document, or one schedule's failed read or put, never stops the others.
    """
    enqueued: list[str] = []
    entries = [entry async for entry in ledger.list(SCHEDULES_PREFIX)]
    for entry in entries:
        try:
            found = await _check(ledger, entry)
            if found is None:
                continue  # removed since the listing
            if found.schedule is None:
                # Never the document's content: only which one, and the rule it breaks.
                logger.warning("schedule %r skipped: %s", found.name[:200], found.problem)
                continue
            enqueued += await _run_one(
                ledger, queue, found.schedule, now, found.modified, found.version
            )
        except (StorageAuthFailed, QueueAuthFailed, SettingsError):
            # A credential or a setting to fix: every schedule would fail alike (the run
            # fails, and the host counts it).
            raise
        except Exception as error:  # its type only: the text may quote a document or a SAS
            # Its last run is not moved on: the next run enqueues what fell due meanwhile
            # (unless its document is written before: an edited schedule starts afresh).
            logger.warning(
                "schedule %r: not run this time (%s); the next run catches up",
                entry.name[len(SCHEDULES_PREFIX) :].removesuffix(".json")[:200],
                type(error).__name__,
            )
    return enqueued


def check_name(name: Any) -> str:
    """A name the schedule commands write: InvalidRequest unless it is 1-100 letters,
    digits, '.', '_' or '-' starting with a letter or digit (it is a blob name and part
    of every due time's request id)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            "a schedule's name is 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_WRITE_ATTEMPTS = 3


async def write_schedule(ledger: Ledger, name: str, document: Any) -> Schedule:
    """Write the schedule `name` (replacing one of that name), checked first as the timer
    checks it: InvalidRequest (nothing written) for a document the timer would skip.

    A replaced schedule starts afresh from this write, as any edited document does."""
    schedule = parse_schedule(check_name(name), document)
    data = {
        "schedule": schedule.expression,
        "request": schedule.request,
        "enabled": schedule.enabled,
    }
    blob = schedule_blob(name)
    for _ in range(_WRITE_ATTEMPTS):
        if await ledger.create(blob, data) is not None:
            return schedule
        try:
            found = await ledger.read(blob)
        except NotJson:  # a broken document of that name: this one replaces it
            await ledger.delete(blob)
            continue
        if found is not None and await ledger.replace(blob, data, found.etag) is not None:
            return schedule
    raise StoreError(f"schedules: {name} changed each time it was about to be written")


async def remove_schedule(ledger: Ledger, name: str) -> bool:
    """Delete the schedule `name` (``schedules/<name>.json``), or the blob `name` names
    when it starts with ``schedules/`` (each listed blob's `blob`, one the timer skips
    included); False when the listing of ``schedules/`` holds no such blob. Only a listed
    blob is deleted: a name such as ``../x`` never reaches another blob. Due times already
    enqueued are still delivered. Its last-run record is marked removed (see
    _mark_removed)."""
    if not isinstance(name, str) or not name or not is_unicode_text(name):
        raise InvalidRequest("give a schedule's name, or a blob name under schedules/")
    blob = name if name.startswith(SCHEDULES_PREFIX) else schedule_blob(name)
    if not [entry async for entry in ledger.list(blob) if entry.name == blob]:
        return False
    removed = await ledger.delete(blob)
    if blob.endswith(".json"):
        await _mark_removed(ledger, _state_name(blob[len(SCHEDULES_PREFIX) : -len(".json")]))
    return removed


async def _mark_removed(ledger: Ledger, name: str) -> None:
    """Mark a removed schedule's last-run record: a schedule created again under the name
    starts afresh, but not in a minute whose id the removed one may have sent."""
    try:
        state = await ledger.read(name)
    except NotJson:
        await ledger.delete(name)
        return
    if state is not None and isinstance(state.data, dict):
        await ledger.replace(name, {**state.data, "removed": True}, state.etag)


def schedule_blob(name: str) -> str:
    return f"{SCHEDULES_PREFIX}{name}.json"


def _state_name(name: str) -> str:
    return f"{STATE_PREFIX}{encode_segment(name, 400)}.json"


def _moment(value: Any) -> datetime | None:
    """An aware datetime from a record's ISO text, or None."""
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def _last_run(state: Record | None) -> datetime | None:
    """The last run a state blob records, or None when it records none usable."""
    data = state.data if state is not None and isinstance(state.data, dict) else {}
    return _moment(data.get("last"))


def _ahead(last: datetime, until: datetime, state: Record | None) -> bool:
    """Whether a last run is recorded further ahead than clocks disagree: ahead of this
    run's clock and of storage's when it was written (its Last-Modified, when known). A
    record written by an instance whose clock is right stands for one whose clock is
    behind, which waits for it instead of rewriting it on every run."""
    if last - until <= AHEAD_TOLERATED:
        return False
    written = state.modified if state is not None else 0.0
    return not written or last - datetime.fromtimestamp(written, UTC) > AHEAD_TOLERATED


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _minute_before(moment: datetime) -> datetime:
    """Just before `moment`'s minute: due times from then on count that minute."""
    return moment.replace(second=0, microsecond=0) - timedelta(microseconds=1)


async def _run_one(
    ledger: Ledger,
    queue: MessageQueue,
    schedule: Schedule,
    now: datetime,
    written: float,
    version: str = "",
) -> list[str]:
    """Enqueue the schedule's due times since its last run, or since its document was
    last written (`written`, epoch seconds, 0 when unknown) when that is later.

    `version` (the document's ETag) is recorded with the run: a document changed since,
    or removed and written again, never sends a due time in the minute of the last run,
    whose id the document before may have sent (ids are per minute, each sent once)."""
    state_name = _state_name(schedule.name)
    until = now.astimezone(UTC)
    try:
        state = await ledger.read(state_name)
    except NotJson:  # its content is unusable: replaced below, as if it were new
        state = Record(None, "*")
    # Any other storage error reading it goes to run_schedules: this schedule is skipped
    # this run, its record untouched, and the next run catches up on what is due.
    last = _last_run(state)
    recorded = state.data if state is not None and isinstance(state.data, dict) else {}
    seen = recorded.get("seen")
    written_at = datetime.fromtimestamp(written, UTC)
    changed = seen != version if isinstance(seen, str) else last is not None and last < written_at
    # The latest minute whose id a run enqueued (ids up to it may be the document before's);
    # a record that does not say (an earlier version's) counts its whole last run.
    enqueued = _moment(recorded.get("enqueued")) if "enqueued" in recorded else last
    used = enqueued if changed else None
    if enqueued is not None and enqueued - until > AHEAD_TOLERATED:
        # No run enqueues a minute ahead of its clock: edited by hand (or unusable, as
        # year 9999 is), like a last run recorded far ahead it restarts the schedule.
        last = max(last, enqueued) if last is not None else enqueued
    if last is not None and _ahead(last, until, state):
        # Written by a clock that ran ahead (or edited by hand): kept, it would hold the
        # schedule back until then. It restarts as from an unusable record; a due time the
        # record's run enqueued already is enqueued with its id again, sent once.
        logger.warning(
            "schedule %r: its last run is recorded %d s ahead of this run's clock; restarts now",
            schedule.name,
            (last - until).total_seconds(),
        )
        last = used = None
    elif last is None and state is not None:
        logger.warning("schedule %r: its last-run record was unusable; restarts now", schedule.name)
    if recorded.get("removed") is True:
        last = None  # removed, then written again: a new schedule
    written_minute = _minute_before(written_at)
    fresh = last is None
    if last is None:
        # A new schedule starts now (a run a moment late still counts this minute); one
        # written in the minute before this run's, from its write: a due second after the
        # write came before this run, which has to send it (none from before the write).
        last = _minute_before(until)
        if last - timedelta(minutes=1) <= written_minute < last:
            last = written_at - timedelta(microseconds=1)
    if not schedule.enabled:
        # A disabled schedule moves its last run on, so enabling it again does not send
        # what fell due meanwhile.
        last = until
    elif recorded.get("enabled") is False and changed:
        # Enabled since the last run saw it disabled: from the write that enabled it (as a
        # new schedule written in the minute before), not from the start of its minute:
        # a due second between that run and the write fell due while it was off.
        last = max(last, written_at - timedelta(microseconds=1))
    # A document written since (edited, or deleted and created again under this name) is
    # a schedule that starts afresh: nothing that fell due before it is sent.
    since = max(last, written_minute)
    if used is not None:
        since = max(since, _minute(used) + timedelta(minutes=1) - timedelta(microseconds=1))
    if fresh:
        state = await _record_start(ledger, state_name, state, since, version, until)
        if state is None:
            return []  # recorded and removed meanwhile: the next run starts it again
    ids = []
    latest = enqueued if not fresh else None
    due_minutes, left_out = _due(schedule.expression, since, until)
    if left_out:
        logger.warning(
            "schedule %r: due times before %s not sent: a run sends at most the latest %d of "
            "the last day (runs were missed, or BOT_SCHEDULE runs less often than that)",
            schedule.name,
            due_minutes[0].strftime("%Y-%m-%dT%H:%MZ") if due_minutes else until.isoformat(),
            MAX_DUE_PER_RUN,
        )
    for due in due_minutes:
        request_id = schedule_id(schedule.name, due)
        await queue.put(compact_json({**schedule.request, "id": request_id}))
        ids.append(request_id)
        latest = due
        logger.info("schedule %r: enqueued %s", schedule.name, request_id)
    if last <= until:
        data = {
            "last": until.isoformat(),
            "seen": version,
            "enqueued": latest.isoformat() if latest is not None else None,
            "enabled": schedule.enabled,
        }
        await ledger.replace(state_name, data, state.etag)  # lost to an overlapping run: fine
    return ids


async def _record_start(
    ledger: Ledger,
    name: str,
    state: Record | None,
    since: datetime,
    version: str,
    until: datetime,
) -> Record | None:
    """Record where a schedule with no usable last run (new, or its record unusable)
    starts, before anything is enqueued, so that a run failing part-way is caught up by
    the next from there, as for any other (and as if it enqueued up to `until`, until it
    says what it did). The record as written, or as an overlapping run wrote it first
    (this run then enqueues the same ids too); None when it is gone."""
    data = {"last": since.isoformat(), "seen": version, "enqueued": until.isoformat()}
    if state is not None and state.etag == "*":  # not JSON: replaced
        await ledger.delete(name)
        state = None
    if state is None:
        etag = await ledger.create(name, data)
    else:
        etag = await ledger.replace(name, data, state.etag)
    return Record(data, etag) if etag is not None else await ledger.read(name)


async def run_timer(settings: Settings, now: datetime | None = None) -> list[str]:
    """The timer function's one call: enqueue what is due, on the app's storage."""
    from shared.ledger import BlobLedger
    from shared.queues import StorageQueue

    moment = (now or datetime.now(UTC)) + EARLY_RUN
    return await run_schedules(BlobLedger(settings), StorageQueue(settings), moment)
