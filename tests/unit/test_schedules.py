"""Schedule documents and due times (the timer runs end to end in test_proactive_engine_e2e)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from shared.ledger import MemoryLedger
from shared.proactive import InvalidRequest
from shared.queues import MemoryQueue, QueueError, compact_json
from shared.references import encode_segment
from shared.schedules import (
    EARLY_RUN,
    STATE_PREFIX,
    due_times,
    parse_schedule,
    run_schedules,
    schedule_id,
)
from tests.fixtures.storage import ANSWER_TEXT, UNREADABLE_ANSWERS, unreadable_storage

REQUEST = {"to": {"conversation": "msteams/a:1"}, "text": "tick"}
NAN = float("nan")
T0 = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)


def test_due_times_are_minutes_after_the_last_run_up_to_now():
    last = datetime(2030, 1, 1, 11, 59, tzinfo=UTC)
    assert due_times("0 */5 * * * *", last, T0 + timedelta(minutes=11)) == [
        datetime(2030, 1, 1, 12, m, tzinfo=UTC) for m in (0, 5, 10)
    ]
    # Seconds in the expression fire at most once a minute.
    assert len(due_times("*/10 * * * * *", last, T0)) == 1


def test_a_long_outage_catches_up_on_at_most_a_day_and_the_latest_sixty():
    due = due_times("0 * * * * *", T0 - timedelta(days=30), T0)
    assert len(due) == 60 and due[-1] == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_catching_up_a_day_of_a_schedule_due_every_second_is_cheap():
    # The walk steps per due minute, never per second: the timer's event loop is not held.
    import time

    started = time.process_time()
    due = due_times("* * * * * *", T0 - timedelta(days=2), T0)
    assert time.process_time() - started < 0.2  # stepping per second took about 1.8 s
    assert len(due) == 60 and due[-1] == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression",
    ["* * * * * *", "45 * * * * *", "0 */7 * * * *", "0 0 * * * *", "5,10-20/5 3/17 * * * *"],
)
def test_due_minutes_are_those_whose_first_named_second_came_since_the_last_run(expression):
    from croniter import croniter

    def first_second(minute: datetime) -> datetime | None:
        start = minute - timedelta(microseconds=1)
        iterator = croniter(expression, start, second_at_beginning=True, day_or=False)
        first = iterator.get_next(datetime)
        return first if first < minute + timedelta(minutes=1) else None

    for after, until in [
        (T0 - timedelta(hours=3), T0),  # more than 60 due: the latest 60
        (T0 - timedelta(minutes=1, seconds=10), T0),  # a run in a minute's middle
        (datetime(2030, 1, 1, 11, 58, 59, 999999, tzinfo=UTC), T0),
        (T0 - timedelta(minutes=1), T0 + timedelta(seconds=15)),  # 12:00:45 has come
    ]:
        minutes = [T0.replace(second=0) - timedelta(minutes=m) for m in range(-1, 200)]
        expected = sorted(
            m for m in minutes if (first := first_second(m)) and after < first <= until
        )[-60:]
        assert due_times(expression, after, until) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "0 30 9 * Jan Mon",
        "0 0 9 * * MON-fri",
        "5,10-20/5 0 0 1-31/2 * *",
        "0 5/15 * * * *",
        "0 0 9 * * 0",
        "0 0 9 * * 6",
        "0 0 9 5-6 */2 sun,sat",
    ],
)
def test_ncrontab_forms_are_accepted(expression):
    assert parse_schedule("s", {"schedule": expression, "request": REQUEST}).expression


@pytest.mark.parametrize(
    ("expression", "same_as"),
    [
        # Read as the Functions host's parser (NCrontab) reads them, where croniter alone
        # would not: a reversed range has its ends swapped (croniter wraps around), a range
        # of one value is that value (croniter: every hour), names are any prefix of the
        # English name (croniter: 3 letters only), the first name it begins.
        ("0 0 9 * * 5-1", "0 0 9 * * 1-5"),
        ("0 0 22-2/2 * * *", "0 0 2,4,6,8,10,12,14,16,18,20,22 * * *"),
        ("0 0 9-9 * * *", "0 0 9 * * *"),
        ("0 0 9 * * Mon-Mon", "0 0 9 * * 1"),
        ("0 0 9 1 6-6/2 *", "0 0 9 1 6 *"),
        ("0 0 9 * * Monday", "0 0 9 * * 1"),
        ("0 0 9 * * monDAY,Fri", "0 0 9 * * 1,5"),
        ("0 0 9 * * T-f", "0 0 9 * * 2-5"),  # T: Tuesday before Thursday
        ("0 0 9 * * s", "0 0 9 * * 0"),  # S: Sunday before Saturday
        ("0 0 9 1 Ma *", "0 0 9 1 3 *"),  # Ma: March before May
        ("0 0 9 1 September *", "0 0 9 1 9 *"),
    ],
)
def test_ncrontab_forms_croniter_reads_otherwise_fall_due_as_the_host_reads_them(
    expression, same_as
):
    assert parse_schedule("s", {"schedule": expression, "request": REQUEST}).expression == (
        expression  # kept as written
    )
    days = [datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=n) for n in range(366)]
    expected = [due_times(same_as, day, day + timedelta(days=1)) for day in days]
    assert any(expected)
    assert [due_times(expression, day, day + timedelta(days=1)) for day in days] == expected


def test_ids_name_the_schedule_and_the_due_minute():
    assert schedule_id("daily", T0) == "schedule:daily:2030-01-01T12:00Z"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], "JSON object"),
        ({"schedule": "0 * * * *", "request": REQUEST}, "6-field"),
        ({"schedule": "0 0 25 * * *", "request": REQUEST}, "6-field"),
        ({"schedule": "0 * * * * *", "request": {**REQUEST, "id": "x"}}, "without `id`"),
        (
            {"schedule": "0 * * * * *", "request": {**REQUEST, "poisonReason": "x"}},
            "`poisonReason`",
        ),
        ({"schedule": "0 * * * * *", "request": {"to": {}, "text": "x"}}, "`to`"),
        ({"schedule": "0 * * * * *", "request": REQUEST, "enabled": "yes"}, "`enabled`"),
        ({"schedule": "0 * * * * *", "request": REQUEST, "when": 1}, "unknown field"),
    ],
)
def test_bad_schedule_documents_are_refused_with_a_reason(document, reason):
    with pytest.raises(InvalidRequest) as raised:
        parse_schedule("s", document)
    assert reason in str(raised.value)


async def test_runs_enqueue_each_due_time_once_and_skip_disabled_or_broken_schedules():
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/every5.json", {"schedule": "0 */5 * * * *", "request": REQUEST})
    await ledger.create(
        "schedules/off.json", {"schedule": "0 * * * * *", "request": REQUEST, "enabled": False}
    )
    await ledger.create("schedules/broken.json", {"schedule": "nope", "request": REQUEST})

    assert await run_schedules(ledger, queue, T0) == ["schedule:every5:2030-01-01T12:00Z"]
    assert await run_schedules(ledger, queue, T0 + timedelta(seconds=20)) == []
    later = await run_schedules(ledger, queue, T0 + timedelta(minutes=10))
    assert later == ["schedule:every5:2030-01-01T12:05Z", "schedule:every5:2030-01-01T12:10Z"]
    sent = [json.loads(text) for text, _ in queue.sent]
    assert [m["id"] for m in sent] == ["schedule:every5:2030-01-01T12:00Z", *later]
    assert all(m["to"] == REQUEST["to"] and m["text"] == "tick" for m in sent)


def test_importing_the_timer_and_queue_functions_loads_no_heavy_package():
    # Cold start: croniter and the storage SDKs are imported when first used, not on import.
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("croniter", "azure.storage.blob", "azure.storage.queue", "azure.identity", "msal")
    code = (
        "import sys, schedule_function, proactive_function, shared.producer\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


async def test_a_document_that_is_not_json_is_skipped_with_a_log_and_the_others_still_run(caplog):
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a-first.json", {"schedule": "0 * * * * *", "request": REQUEST})
    ledger.blobs["schedules/b-broken.json"] = (b"{not json", {}, '"x"', 0.0)
    await ledger.create("schedules/c-last.json", {"schedule": "0 * * * * *", "request": REQUEST})

    ids = await run_schedules(ledger, queue, T0)

    assert ids == ["schedule:a-first:2030-01-01T12:00Z", "schedule:c-last:2030-01-01T12:00Z"]
    assert "b-broken" in caplog.text and "not valid JSON" in caplog.text


@pytest.mark.parametrize("damaged", ["schedule", "record"])
async def test_json_nested_deeper_than_the_parser_goes_is_skipped_like_any_broken_json(
    caplog, damaged
):
    # A document (or a last-run record) of "[[[[…]]]]": the parser's RecursionError
    # escaped the run, and no schedule was enqueued while the blob stayed.
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a-first.json", {"schedule": "0 * * * * *", "request": REQUEST})
    await ledger.create("schedules/b-deep.json", {"schedule": "0 * * * * *", "request": REQUEST})
    await ledger.create("schedules/c-last.json", {"schedule": "0 * * * * *", "request": REQUEST})
    deep = b"[" * 200_000 + b"]" * 200_000
    name = (
        "schedules/b-deep.json"
        if damaged == "schedule"
        else f"proactive-schedules/{encode_segment('b-deep', 400)}.json"
    )
    ledger.blobs[name] = (deep, {}, '"x"', 0.0)

    ids = await run_schedules(ledger, queue, T0)

    expected = ["schedule:a-first:2030-01-01T12:00Z", "schedule:c-last:2030-01-01T12:00Z"]
    if damaged == "record":  # an unusable record: that schedule restarts now, as documented
        expected.insert(1, "schedule:b-deep:2030-01-01T12:00Z")
    assert ids == expected
    assert "b-deep" in caplog.text


async def test_a_document_in_a_folder_is_named_by_its_path_under_schedules():
    # The contract: the blob's name under schedules/, less .json, is the schedule's name.
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create(
        "schedules/team/daily.json", {"schedule": "0 * * * * *", "request": REQUEST}
    )
    await ledger.create("schedules/daily.json", {"schedule": "0 * * * * *", "request": REQUEST})

    expected = ["schedule:daily:2030-01-01T12:00Z", "schedule:team/daily:2030-01-01T12:00Z"]
    assert await run_schedules(ledger, queue, T0) == expected
    assert sorted(json.loads(text)["id"] for text, _ in queue.sent) == expected
    # Its last run is its own: the next minute sends each once more, no more.
    assert len(await run_schedules(ledger, queue, T0 + timedelta(minutes=1))) == 2
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=1)) == []


@pytest.mark.parametrize("blob", ["schedules/daily", "schedules/Daily.JSON", "schedules/d.txt"])
async def test_a_document_not_named_json_is_skipped_with_a_log_naming_it(caplog, blob):
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create(blob, {"schedule": "0 * * * * *", "request": REQUEST})

    assert await run_schedules(ledger, queue, T0) == []
    assert f"{blob.removeprefix('schedules/')!r} skipped" in caplog.text
    assert "ends in .json" in caplog.text


async def test_a_damaged_last_run_record_restarts_that_schedule_now_without_stopping_others():
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    await ledger.create("schedules/b.json", {"schedule": "0 * * * * *", "request": REQUEST})
    await ledger.create(f"proactive-schedules/{encode_segment('a', 400)}.json", {"last": "?"})

    ids = await run_schedules(ledger, queue, T0)

    assert ids == ["schedule:a:2030-01-01T12:00Z", "schedule:b:2030-01-01T12:00Z"]
    assert await run_schedules(ledger, queue, T0 + timedelta(seconds=10)) == []


async def test_a_last_run_recorded_far_ahead_of_the_clock_restarts_the_schedule_now(caplog):
    # A record from an instance whose clock ran a day ahead, or edited by hand: kept, it
    # would hold the schedule back until then, an edit of the document included.
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    record = f"proactive-schedules/{encode_segment('a', 400)}.json"
    ahead = (T0 + timedelta(days=1)).isoformat()
    await ledger.create(record, {"last": ahead})

    with caplog.at_level(logging.WARNING, logger="shared.schedules"):
        assert await run_schedules(ledger, queue, T0) == ["schedule:a:2030-01-01T12:00Z"]
    assert "'a': its last run is recorded 86400 s ahead of this run's clock" in caplog.text
    assert ahead not in caplog.text
    assert (await ledger.read(record)).data["last"] == T0.isoformat()
    later = T0 + timedelta(minutes=2)
    assert await run_schedules(ledger, queue, later) == [
        "schedule:a:2030-01-01T12:01Z",
        "schedule:a:2030-01-01T12:02Z",
    ]


async def test_a_last_run_recorded_minutes_ahead_of_the_clock_and_its_write_restarts_now(caplog):
    # Five minutes ahead of this run and of storage's time when it was written is more than
    # two instances' clocks disagree: kept, it would hold the schedule back until then.
    ledger, queue = MemoryLedger(clock=StoreClock(T0)), MemoryQueue()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    record = f"proactive-schedules/{encode_segment('a', 400)}.json"
    await ledger.create(record, {"last": (T0 + timedelta(minutes=5)).isoformat()})

    with caplog.at_level(logging.WARNING, logger="shared.schedules"):
        assert await run_schedules(ledger, queue, T0) == ["schedule:a:2030-01-01T12:00Z"]
    assert "'a': its last run is recorded 300 s ahead of this run's clock" in caplog.text


async def test_an_instance_whose_clock_is_behind_waits_for_the_record_instead_of_rewriting_it(
    caplog,
):
    # The record was written at storage's time by an instance whose clock is right: for
    # one whose clock is 10 minutes behind it is far ahead, yet no restart (which each of
    # its runs would repeat, and the other instance undo, enqueueing its window again).
    clock = StoreClock(T0)
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    clock.now = T0 + timedelta(minutes=1)
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=1)) == [
        "schedule:a:2030-01-01T12:01Z"
    ]
    record = f"proactive-schedules/{encode_segment('a', 400)}.json"
    written = await ledger.read(record)

    with caplog.at_level(logging.WARNING, logger="shared.schedules"):
        assert await run_schedules(ledger, queue, T0 - timedelta(minutes=9)) == []
    assert caplog.text == ""
    assert (await ledger.read(record)).etag == written.etag
    clock.now = T0 + timedelta(minutes=2)
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=2)) == [
        "schedule:a:2030-01-01T12:02Z"
    ]


async def test_a_last_run_recorded_a_little_ahead_by_another_instance_stands(caplog):
    # Two instances' clocks 30 s apart: the record stands and nothing is sent twice.
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    record = f"proactive-schedules/{encode_segment('a', 400)}.json"
    ahead = T0 + timedelta(seconds=30)  # 12:01:00: the 12:01 minute was enqueued by its run
    await ledger.create(record, {"last": ahead.isoformat()})

    with caplog.at_level(logging.WARNING, logger="shared.schedules"):
        assert await run_schedules(ledger, queue, T0) == []
    assert caplog.text == ""
    assert (await ledger.read(record)).data == {"last": ahead.isoformat()}
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=1)) == []
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=2)) == [
        "schedule:a:2030-01-01T12:02Z"
    ]


@pytest.mark.integration
async def test_a_queue_that_refuses_the_credential_fails_the_run(azurite, unique_name):
    # Blob storage takes the credential, the queue refuses it (an identity with a Blob
    # data role but no Queue one): each schedule logged "retried at the next run" and the
    # run counted a success every minute while nothing was ever sent.
    from shared.config import Settings, StorageSettings
    from shared.ledger import BlobLedger
    from shared.queues import QueueAuthFailed, StorageQueue
    from shared.storage import close_shared_clients

    container = unique_name("sched")
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=container,
    )
    wrong_key = azurite.connection_string.replace("AccountKey=", "AccountKey=AAAA", 1)
    refused = Settings(storage=StorageSettings(connection_string=wrong_key))
    ledger = BlobLedger(settings)
    try:
        await ledger.create("schedules/tick.json", {"schedule": "0 * * * * *", "request": REQUEST})
        with pytest.raises(QueueAuthFailed, match="check AzureWebJobsStorage"):
            await run_schedules(ledger, StorageQueue(refused, unique_name("sched")), T0)
    finally:
        await close_shared_clients()


@pytest.mark.integration
async def test_a_failed_read_of_a_last_run_record_loses_none_of_its_catch_up(
    azurite, unique_name, caplog
):
    # The timer is down 12:01-12:40; its first run back cannot read one schedule's last-run
    # record (storage unreachable for that read: a ledger on a dead endpoint). That schedule
    # is skipped this run, its record kept; the next run sends all it missed, once.
    from azure.storage.queue import QueueClient

    from shared.config import Settings, StorageSettings
    from shared.ledger import BlobLedger
    from shared.queues import StorageQueue
    from shared.storage import close_shared_clients
    from tests.fixtures.storage import FAST_STORAGE
    from tools.azurite import connection_string, free_port

    container, queue_name = unique_name("sched"), unique_name("sched")
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=container,
    )
    dead = Settings(
        storage=StorageSettings(connection_string=connection_string(free_port(), free_port())),
        references_container=container,
    )

    state_name = f"{STATE_PREFIX}{encode_segment('flaky', 400)}.json"

    class StateReadFails(BlobLedger):
        failing = False

        async def read(self, name):
            if self.failing and name == state_name:
                return await BlobLedger(dead, options=FAST_STORAGE).read(name)
            return await super().read(name)

    ledger, queue = StateReadFails(settings), StorageQueue(settings, queue_name)
    document = {"schedule": "0 */10 * * * *", "request": REQUEST}
    T12 = T0.replace(second=0)
    try:
        await ledger.create("schedules/flaky.json", document)
        await ledger.create("schedules/steady.json", document)
        assert len(await run_schedules(ledger, queue, T12)) == 2
        state = await ledger.read(state_name)

        ledger.failing = True
        caplog.set_level(logging.WARNING)
        first = await run_schedules(ledger, queue, T12 + timedelta(minutes=40))
        assert [i for i in first if ":flaky:" in i] == []
        assert len([i for i in first if ":steady:" in i]) == 4  # the others still run
        assert "'flaky': not run this time (StoreError)" in caplog.text
        assert "unusable" not in caplog.text

        ledger.failing = False
        assert (await ledger.read(state_name)).etag == state.etag  # left alone
        second = await run_schedules(ledger, queue, T12 + timedelta(minutes=41))
        assert second == [f"schedule:flaky:2030-01-01T12:{m}0Z" for m in (1, 2, 3, 4)]
    finally:
        await close_shared_clients()
    client = QueueClient.from_connection_string(azurite.connection_string, queue_name)
    try:
        on_queue = [
            json.loads(base64.b64decode(m.content))["id"]
            for m in client.receive_messages(max_messages=32)
        ]
    finally:
        client.close()
    flaky = sorted(i for i in on_queue if ":flaky:" in i)
    assert flaky == [f"schedule:flaky:2030-01-01T12:{m}0Z" for m in (0, 1, 2, 3, 4)]


async def test_a_re_enabled_schedule_does_not_send_what_fell_due_while_it_was_disabled():
    ledger, queue = MemoryLedger(), MemoryQueue()
    document = {"schedule": "0 * * * * *", "request": REQUEST}
    await ledger.create("schedules/s.json", document)
    assert await run_schedules(ledger, queue, T0) == ["schedule:s:2030-01-01T12:00Z"]
    record = await ledger.read("schedules/s.json")
    await ledger.replace("schedules/s.json", {**document, "enabled": False}, record.etag)
    for minute in range(1, 30):
        assert await run_schedules(ledger, queue, T0 + timedelta(minutes=minute)) == []
    record = await ledger.read("schedules/s.json")
    await ledger.replace("schedules/s.json", document, record.etag)

    ids = await run_schedules(ledger, queue, T0 + timedelta(minutes=30))

    assert ids == ["schedule:s:2030-01-01T12:30Z"]


async def test_the_timer_enqueues_with_only_the_storage_settings(
    monkeypatch, azurite, unique_name, caplog
):
    # Scheduling needs storage only: a bot credential mistake must not stop the timer
    # (its due times would pile up and all go at once when the setting is fixed).
    import os

    from azure.functions.timer import TimerRequest  # the host's own type
    from azure.storage.queue import QueueClient

    import schedule_function
    from shared.config import reset_settings
    from shared.ledger import BlobLedger
    from shared.producer import producer_settings
    from shared.runtime import reset_runtime
    from shared.storage import close_shared_clients

    queue, container = unique_name("sched"), unique_name("sched")
    for name in ("MicrosoftAppId", "MicrosoftAppPassword", "BOT_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    monkeypatch.setenv("BOT_PROACTIVE_QUEUE", queue)
    monkeypatch.setenv("BOT_REFERENCES_CONTAINER", container)
    monkeypatch.chdir(os.path.dirname(__file__))  # no local.settings.json here
    reset_settings()
    reset_runtime()
    try:
        ledger = BlobLedger(producer_settings())
        await ledger.create("schedules/tick.json", {"schedule": "* * * * * *", "request": REQUEST})
        caplog.set_level(logging.INFO)
        # Both runs in one minute (as the timer sees the clock): one after the next minute
        # began would find its first second due, and enqueue it.
        seen = datetime.now(UTC) + EARLY_RUN
        if seen.second >= 50:
            await asyncio.sleep(60.5 - seen.second - seen.microsecond / 1e6)
        await schedule_function.main(TimerRequest())
        assert "schedules: 1 due send(s) enqueued" in caplog.text
        # A run with nothing due (every minute, most of the time) says nothing at INFO:
        # the host already logs each run.
        caplog.clear()
        await schedule_function.main(TimerRequest())
        assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    finally:
        reset_settings()
        reset_runtime()
        await close_shared_clients()
    client = QueueClient.from_connection_string(azurite.connection_string, queue)
    try:
        assert client.get_queue_properties().approximate_message_count == 1
    finally:
        client.close()


async def timer_error_line(monkeypatch, caplog, connection_string: str) -> logging.LogRecord:
    """Run the timer function on `connection_string`: its one line of the run (it must
    not raise)."""
    import os

    from azure.functions.timer import TimerRequest

    import schedule_function
    from shared.config import reset_settings
    from shared.storage import close_shared_clients

    monkeypatch.setenv("AzureWebJobsStorage", connection_string)
    monkeypatch.chdir(os.path.dirname(__file__))  # no local.settings.json here
    reset_settings()
    try:
        with caplog.at_level(logging.INFO):
            await schedule_function.main(TimerRequest())  # does not raise
    finally:
        reset_settings()
        await close_shared_clients()
    [record] = [r for r in caplog.records if r.name == "schedule_function"]
    assert record.levelno == logging.ERROR and record.exc_info is None
    return record


async def test_the_timer_with_storage_unreachable_logs_one_line_not_a_traceback(
    monkeypatch, caplog
):
    # A traceback a minute while the emulator (or storage) is down: the next run catches
    # up anyway, since each schedule keeps its own record.
    from tools.azurite import connection_string, free_port

    unreachable = connection_string(free_port(), free_port())
    record = await timer_error_line(monkeypatch, caplog, unreachable)
    assert "schedules: not run, the next run catches up" in record.getMessage()
    assert "storage unreachable" in record.getMessage()


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_the_timer_whose_listing_cannot_be_read_logs_one_line_not_a_traceback(
    monkeypatch, caplog, answer
):
    # The schedules' listing answered 200 with what the storage SDK cannot read (a proxy's
    # page, XML cut short): its DeserializationError, a ValueError, failed the run with a
    # traceback, or the line said "HTTP 200". The next run catches up, as for an outage.
    async with unreadable_storage(answer) as storage:
        record = await timer_error_line(monkeypatch, caplog, storage.connection_string)
    assert record.getMessage().startswith(
        "schedules: not run, the next run catches up: proactive ledger: list schedules/ "
        "failed: the answer could not be read ("
    ), record.getMessage()
    assert ANSWER_TEXT not in caplog.text


async def test_the_timer_with_a_refused_storage_key_fails_the_run(azurite, monkeypatch):
    # A credential to fix, not an outage: logged as "the next run catches up", every run
    # counted a success by the host while nothing ever ran.
    import os

    from azure.functions.timer import TimerRequest

    import schedule_function
    from shared.config import reset_settings
    from shared.references.contract import StorageAuthFailed
    from shared.storage import close_shared_clients

    wrong_key = azurite.connection_string.replace("AccountKey=", "AccountKey=AAAA", 1)
    monkeypatch.setenv("AzureWebJobsStorage", wrong_key)
    monkeypatch.chdir(os.path.dirname(__file__))  # no local.settings.json here
    reset_settings()
    try:
        with pytest.raises(StorageAuthFailed, match="check AzureWebJobsStorage"):
            await schedule_function.main(TimerRequest())
    finally:
        reset_settings()
        await close_shared_clients()


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        # Valid NCRONTAB fields, but 30 February (31 April, a 31 February Monday) never comes.
        ({"schedule": "0 0 0 30 2 *", "request": REQUEST}, "never falls due"),
        ({"schedule": "0 0 9 31 4 *", "request": REQUEST}, "never falls due"),
        ({"schedule": "0 0 0 31 2 Mon", "request": REQUEST}, "never falls due"),
        # What the producer would refuse: its copies would not fit in a queue message.
        ({"schedule": "0 * * * * *", "request": {**REQUEST, "text": "x" * 60_000}}, "larger than"),
        # Python's json writes and reads NaN; the Connector's parser (any JSON one) does not.
        (
            {"schedule": "0 * * * * *", "request": {"to": REQUEST["to"], "activity": {"v": NAN}}},
            "finite",
        ),
        # croniter's extensions, not NCRONTAB: the Functions host's parser refuses each.
        ({"schedule": "0 R * * * *", "request": REQUEST}, "minute field"),  # random minute
        ({"schedule": "0 H * * * *", "request": REQUEST}, "minute field"),  # hashed
        ({"schedule": "0 0 9 L * *", "request": REQUEST}, "day field"),
        ({"schedule": "0 0 9 15W * *", "request": REQUEST}, "day field"),
        ({"schedule": "0 0 9 ? * *", "request": REQUEST}, "day field"),
        ({"schedule": "0 0 9 * * 1#2", "request": REQUEST}, "day-of-week field"),
        ({"schedule": "0 0 9 * * 7", "request": REQUEST}, "day-of-week field"),
        ({"schedule": "0 0 9 * * Mox", "request": REQUEST}, "day-of-week field"),  # no name
        ({"schedule": "0 0 9 * * Mon-Sonday", "request": REQUEST}, "day-of-week field"),
        # A single value stepped by 1: NCrontab's releases read it alone, or to the end.
        ({"schedule": "0 0 9 * * Mon/1", "request": REQUEST}, "stepped by 1"),
        ({"schedule": "0 0 9 1/1 * *", "request": REQUEST}, "stepped by 1"),
        ({"schedule": "0 */0 * * * *", "request": REQUEST}, "minute field"),
    ],
)
async def test_a_schedule_that_could_never_be_sent_is_skipped_and_the_others_run(
    caplog, document, reason
):
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a-bad.json", document)
    await ledger.create("schedules/b-good.json", {"schedule": "0 * * * * *", "request": REQUEST})

    ids = await run_schedules(ledger, queue, T0)

    assert ids == ["schedule:b-good:2030-01-01T12:00Z"]
    assert [json.loads(text)["id"] for text, _ in queue.sent] == ids
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'a-bad' skipped" in warning.getMessage() and reason in warning.getMessage()
    assert "xxxx" not in caplog.text  # the document's content is never logged
    # Every minute the same: the bad one skipped, the good one run.
    later = await run_schedules(ledger, queue, T0 + timedelta(minutes=1))
    assert later == ["schedule:b-good:2030-01-01T12:01Z"]


def test_a_schedule_whose_request_just_fits_is_accepted():
    # The limit is the producer's (the request with its schedule id, as JSON).
    from shared.queues import MAX_REQUEST_BYTES

    name = "fits"
    overhead = len(compact_json({**REQUEST, "text": "", "id": schedule_id(name, T0)}))
    text = "x" * (MAX_REQUEST_BYTES - overhead)
    assert parse_schedule(name, {"schedule": "0 * * * * *", "request": {**REQUEST, "text": text}})
    with pytest.raises(InvalidRequest, match="larger than"):
        parse_schedule(
            name, {"schedule": "0 * * * * *", "request": {**REQUEST, "text": text + "x"}}
        )


async def test_a_failed_put_for_one_schedule_does_not_stop_the_others(caplog):
    # The queue service fails one schedule's put: that schedule is retried at the next run,
    # with everything that fell due meanwhile. Simulated: Azurite cannot be made to drop
    # one message's connection, so the in-memory queue raises what StorageQueue raises then.
    ledger, queue = MemoryLedger(), QueueFailingOnce()
    await ledger.create("schedules/a-flaky.json", {"schedule": "0 * * * * *", "request": REQUEST})
    await ledger.create("schedules/b-good.json", {"schedule": "0 * * * * *", "request": REQUEST})
    assert len(await run_schedules(ledger, queue, T0)) == 2

    queue.failing = ":a-flaky:"
    ids = await run_schedules(ledger, queue, T0 + timedelta(minutes=1))
    assert ids == ["schedule:b-good:2030-01-01T12:01Z"]
    assert "'a-flaky'" in caplog.text and "QueueError" in caplog.text

    ids = await run_schedules(ledger, queue, T0 + timedelta(minutes=2))
    assert ids == [
        "schedule:a-flaky:2030-01-01T12:01Z",
        "schedule:a-flaky:2030-01-01T12:02Z",
        "schedule:b-good:2030-01-01T12:02Z",
    ]


class StoreClock:
    """The store's clock (what it stamps as a blob's last write), set by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


async def test_a_schedule_written_between_two_runs_sends_a_due_second_that_came_after_it():
    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(nine - timedelta(minutes=5))
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await ledger.create("schedules/old.json", {"schedule": "45 * * * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, nine + timedelta(seconds=0.1)) == []

    clock.now = nine + timedelta(seconds=10)  # written after that run, before 09:00:45
    await ledger.create("schedules/new.json", {"schedule": "45 0 9 * * *", "request": REQUEST})

    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=0.1)) == [
        "schedule:new:2030-01-01T09:00Z",
        "schedule:old:2030-01-01T09:00Z",
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("0 0 9 * * *", []), ("0 * * * * *", ["schedule:s:2030-01-01T09:01Z"])],
)
async def test_a_schedule_written_between_two_runs_sends_nothing_due_before_its_write(
    expression, expected
):
    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(nine + timedelta(seconds=30))  # after the 09:00 run
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await ledger.create("schedules/s.json", {"schedule": expression, "request": REQUEST})

    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=0.1)) == expected


class QueueFailingOnce(MemoryQueue):
    """A queue whose next put of a message holding `failing` fails, once, as storage would
    (Azurite cannot be made to drop one message's connection)."""

    failing = ""  # e.g. ":name:" (a schedule's ids); "" fails nothing

    async def put(self, text: str, *, delay: float = 0.0) -> None:
        if self.failing and self.failing in text:
            self.failing = ""
            # What StorageQueue raises when the SDK's connection was reset.
            raise QueueError("queue 'q': put failed: storage unreachable (ServiceResponseError)")
        await super().put(text, delay=delay)


async def test_a_new_schedule_whose_first_run_failed_is_caught_up_by_the_next():
    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    ledger, queue = MemoryLedger(clock=StoreClock(nine + timedelta(seconds=30))), QueueFailingOnce()
    await ledger.create("schedules/s.json", {"schedule": "0 1 9 * * *", "request": REQUEST})
    queue.failing = ":s:"
    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=0.1)) == []

    assert await run_schedules(ledger, queue, nine + timedelta(minutes=2, seconds=0.1)) == [
        "schedule:s:2030-01-01T09:01Z"
    ]


@pytest.mark.parametrize("record", [b"garbage", b'{"last": "yesterday"}'])
async def test_a_schedule_whose_record_was_unusable_and_whose_run_failed_is_caught_up(record):
    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    ledger, queue = MemoryLedger(clock=StoreClock(nine - timedelta(days=1))), QueueFailingOnce()
    await ledger.create("schedules/s.json", {"schedule": "0 0 9 * * *", "request": REQUEST})
    ledger.blobs[f"proactive-schedules/{encode_segment('s', 400)}.json"] = (record, {}, '"x"', 0)
    queue.failing = ":s:"
    assert await run_schedules(ledger, queue, nine + timedelta(seconds=0.1)) == []

    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=0.1)) == [
        "schedule:s:2030-01-01T09:00Z"
    ]


async def test_a_schedule_created_again_sends_nothing_from_before_it_existed():
    T8 = datetime(2030, 1, 1, 8, 0, 30, tzinfo=UTC)
    clock = StoreClock(T8)
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await ledger.create("schedules/hourly.json", {"schedule": "0 0 * * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, T8) == ["schedule:hourly:2030-01-01T08:00Z"]
    clock.now = T8 + timedelta(minutes=5)
    await ledger.delete("schedules/hourly.json")  # the operator removes it
    for hour in range(1, 10):  # the timer keeps running, with nothing to do
        assert await run_schedules(ledger, queue, T8 + timedelta(hours=hour)) == []

    # At 17:20 the operator adds a schedule by that name again, with another request.
    clock.now = T8 + timedelta(hours=9, minutes=20)
    await ledger.create(
        "schedules/hourly.json",
        {"schedule": "0 0 * * * *", "request": {**REQUEST, "text": "new"}},
    )
    assert await run_schedules(ledger, queue, clock.now) == []
    ids = await run_schedules(ledger, queue, T8 + timedelta(hours=10))
    assert ids == ["schedule:hourly:2030-01-01T18:00Z"]
    assert [json.loads(text)["text"] for text, _ in queue.sent] == ["tick", "new"]


async def test_an_edited_schedule_starts_afresh_and_an_unchanged_one_catches_up():
    clock = StoreClock(T0)
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    document = {"schedule": "0 */10 * * * *", "request": REQUEST}
    await ledger.create("schedules/edited.json", document)
    await ledger.create("schedules/same.json", document)
    assert len(await run_schedules(ledger, queue, T0)) == 2  # both due at 12:00

    # The timer is down from 12:01 to 13:00; at 12:35 the operator edits one schedule.
    clock.now = T0 + timedelta(minutes=35)
    record = await ledger.read("schedules/edited.json")
    await ledger.replace("schedules/edited.json", {**document, "enabled": True}, record.etag)
    ids = await run_schedules(ledger, queue, T0 + timedelta(minutes=60))

    assert ids == [
        # Edited: only what fell due after the edit.
        "schedule:edited:2030-01-01T12:40Z",
        "schedule:edited:2030-01-01T12:50Z",
        "schedule:edited:2030-01-01T13:00Z",
        # Unchanged: everything the timer missed, once.
        *(f"schedule:same:2030-01-01T{t}Z" for t in ("12:10", "12:20", "12:30", "12:40")),
        "schedule:same:2030-01-01T12:50Z",
        "schedule:same:2030-01-01T13:00Z",
    ]


@pytest.mark.parametrize("how", ["edited", "removed and written again"])
@pytest.mark.parametrize("after", [0.3, 0.9, 20.0])  # seconds after the run fired
async def test_a_schedule_written_after_a_run_in_that_minute_starts_at_the_next(how, after):
    # The run at 09:00 sent minute 09:00's id for the old document; the new one's 09:00:30
    # would have had that id too, and been dropped as a duplicate, reported delivered. The
    # timer's runs count up to a second ahead (EARLY_RUN): an edit in that second too.
    from shared.schedules import EARLY_RUN, remove_schedule, write_schedule

    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(nine - timedelta(minutes=10))
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await write_schedule(ledger, "s", {"schedule": "0 * * * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, nine - timedelta(minutes=1) + EARLY_RUN) != []
    assert await run_schedules(ledger, queue, nine + EARLY_RUN) == ["schedule:s:2030-01-01T09:00Z"]

    clock.now = nine + timedelta(seconds=after)
    if how != "edited":
        assert await remove_schedule(ledger, "s")
    new = {"schedule": "30 * * * * *", "request": {**REQUEST, "text": "new"}}
    await write_schedule(ledger, "s", new)
    ids = await run_schedules(ledger, queue, nine + timedelta(minutes=1) + EARLY_RUN)
    ids += await run_schedules(ledger, queue, nine + timedelta(minutes=2) + EARLY_RUN)

    assert ids == ["schedule:s:2030-01-01T09:01Z"]  # never 09:00's id again
    assert json.loads(queue.sent[-1][0])["text"] == "new"


async def test_a_schedule_edited_before_its_due_second_in_the_last_runs_minute_still_sends_it():
    # The run at 09:00:01 enqueued nothing of 09:00 yet (due at 09:00:30): that minute's id
    # is free, and the edited document's 09:00:30 is sent.
    from shared.schedules import EARLY_RUN, write_schedule

    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(nine - timedelta(days=1))
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await write_schedule(ledger, "s", {"schedule": "30 0 9 * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, nine - timedelta(minutes=1) + EARLY_RUN) == []
    assert await run_schedules(ledger, queue, nine + EARLY_RUN) == []
    clock.now = nine + timedelta(seconds=10)
    fixed = {"schedule": "30 0 9 * * *", "request": {**REQUEST, "text": "fixed"}}
    await write_schedule(ledger, "s", fixed)

    ids = await run_schedules(ledger, queue, nine + timedelta(minutes=1) + EARLY_RUN)
    assert ids == ["schedule:s:2030-01-01T09:00Z"]
    assert json.loads(queue.sent[-1][0])["text"] == "fixed"


async def test_a_schedule_removed_and_written_again_later_sends_nothing_from_before_its_write():
    from shared.schedules import remove_schedule, write_schedule

    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(nine - timedelta(minutes=40))
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    await write_schedule(ledger, "s", {"schedule": "0 * * * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, nine - timedelta(minutes=30)) != []
    assert await remove_schedule(ledger, "s")
    clock.now = nine + timedelta(seconds=40)  # written again half an hour later
    await write_schedule(ledger, "s", {"schedule": "0 * * * * *", "request": REQUEST})

    # As a new schedule: 09:00:00 came before the write.
    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=1)) == [
        "schedule:s:2030-01-01T09:01Z"
    ]


async def test_a_schedule_with_seconds_is_enqueued_by_the_first_run_after_them_never_before():
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/s.json", {"schedule": "45 0 9 * * *", "request": REQUEST})
    nine = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    assert await run_schedules(ledger, queue, nine - timedelta(minutes=1)) == []

    assert await run_schedules(ledger, queue, nine + timedelta(seconds=0.1)) == []  # 45 s early
    assert await run_schedules(ledger, queue, nine + timedelta(minutes=1, seconds=0.1)) == [
        "schedule:s:2030-01-01T09:00Z"
    ]
    assert await run_schedules(ledger, queue, nine + timedelta(minutes=2, seconds=0.1)) == []


async def test_a_schedule_written_in_the_minute_it_falls_due_still_fires_that_minute():
    # As a new schedule always has: the run counts its own minute (the timer fires at
    # second 0 and may run a moment late, or the document may be written a moment early).
    clock = StoreClock(T0)
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    document = {"schedule": "0 0 * * * *", "request": REQUEST}
    await ledger.create("schedules/s.json", document)
    assert await run_schedules(ledger, queue, T0 - timedelta(minutes=1)) == []
    clock.now = T0.replace(minute=0, second=5)
    record = await ledger.read("schedules/s.json")
    await ledger.replace("schedules/s.json", {**document, "enabled": True}, record.etag)

    assert await run_schedules(ledger, queue, T0) == ["schedule:s:2030-01-01T12:00Z"]


async def test_a_written_schedule_is_run_by_the_timer_and_a_removed_one_no_longer():
    from shared.schedules import read_schedules, remove_schedule, write_schedule

    ledger, queue = MemoryLedger(), MemoryQueue()
    await write_schedule(ledger, "tick", {"schedule": "0 * * * * *", "request": REQUEST})
    assert await run_schedules(ledger, queue, T0) == ["schedule:tick:2030-01-01T12:00Z"]
    [listed] = [found async for found in read_schedules(ledger)]
    assert (listed.name, listed.schedule.enabled, listed.problem) == ("tick", True, None)

    assert await remove_schedule(ledger, "tick") is True
    assert [n for n in ledger.blobs if n.startswith("schedules/")] == []  # its record stays
    assert await run_schedules(ledger, queue, T0 + timedelta(minutes=5)) == []
    assert await remove_schedule(ledger, "tick") is False


@pytest.mark.parametrize("name", ["", "a/b", "-lead", "sp ace", "é", "x" * 101, None])
async def test_a_schedule_name_the_command_cannot_write_is_refused_before_storage(name):
    from shared.schedules import write_schedule

    ledger = MemoryLedger()
    with pytest.raises(InvalidRequest, match="schedule's name is"):
        await write_schedule(ledger, name, {"schedule": "0 * * * * *", "request": REQUEST})
    assert ledger.blobs == {}


async def test_writing_over_a_document_that_is_not_json_replaces_it():
    from shared.schedules import write_schedule

    ledger = MemoryLedger()
    ledger.blobs["schedules/tick.json"] = (b"{not json", {}, '"x"', 0.0)
    await write_schedule(ledger, "tick", {"schedule": "0 * * * * *", "request": REQUEST})
    record = await ledger.read("schedules/tick.json")
    assert record.data == {"schedule": "0 * * * * *", "request": REQUEST, "enabled": True}


async def test_a_write_racing_other_writers_each_time_fails_and_says_so():
    from shared.references.contract import StoreError
    from shared.schedules import write_schedule

    class Contended(MemoryLedger):
        async def replace(self, name, data, etag, *, metadata=None):
            await super().replace(name, {"changed": "meanwhile"}, etag)  # another writer
            return None

    ledger = Contended()
    await ledger.create("schedules/tick.json", {"schedule": "0 * * * * *", "request": REQUEST})
    with pytest.raises(StoreError, match="changed each time"):
        await write_schedule(ledger, "tick", {"schedule": "0 0 * * * *", "request": REQUEST})
    assert (await ledger.read("schedules/tick.json")).data == {"changed": "meanwhile"}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        # Python will not turn 5,000 digits into an int: its ValueError stopped the run.
        ({"schedule": "1" * 5000 + " 0 9 * * *", "request": REQUEST}, "longer than"),
        # 40 KB of a valid list: half a second of the event loop per run.
        ({"schedule": "0," * 20_000 + "0 0 9 * * *", "request": REQUEST}, "longer than"),
        ({"schedule": "0 0 9 * * *", "request": REQUEST, "pad": "x" * 70_000}, "larger than"),
    ],
)
async def test_a_schedule_too_large_to_read_or_run_is_skipped_and_the_others_run(
    caplog, document, problem
):
    from shared.schedules import read_schedules

    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/a-bad.json", document)
    await ledger.create("schedules/b-good.json", {"schedule": "0 * * * * *", "request": REQUEST})

    assert await run_schedules(ledger, queue, T0) == ["schedule:b-good:2030-01-01T12:00Z"]
    assert "'a-bad' skipped" in caplog.text and problem in caplog.text
    [bad, good] = [found async for found in read_schedules(ledger)]
    assert bad.schedule is None and problem in bad.problem and good.schedule is not None


async def test_a_timer_firing_a_moment_early_still_sends_that_minute(
    monkeypatch, azurite, unique_name
):
    # The host may fire `0 * * * * *` a few ms before the minute: the 09:00 send waited for
    # the 09:01 run.
    from azure.storage.queue import QueueClient

    from shared.ledger import BlobLedger
    from shared.producer import producer_settings
    from shared.schedules import run_timer
    from shared.storage import close_shared_clients

    queue = unique_name("sched")
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_PROACTIVE_QUEUE": queue,
        "BOT_REFERENCES_CONTAINER": unique_name("sched"),
    }
    settings = producer_settings(env)
    document = {"schedule": "0 0 9 * * *", "request": REQUEST}
    try:
        await BlobLedger(settings).create("schedules/standup.json", document)
        early = datetime(2030, 1, 7, 8, 59, 59, 995_000, tzinfo=UTC)
        ids = await run_timer(settings, early)
        again = await run_timer(settings, early + timedelta(minutes=1, seconds=0.01))
    finally:
        await close_shared_clients()
    assert (ids, again) == (["schedule:standup:2030-01-07T09:00Z"], [])
    client = QueueClient.from_connection_string(azurite.connection_string, queue)
    with client:
        assert client.get_queue_properties().approximate_message_count == 1


@pytest.mark.parametrize(
    ("expression", "every", "enabled_at", "expected"),
    [
        # 09:00:30 fell due after the run that saw it disabled, before the write enabling it.
        ("30 0 9 * * *", 1, timedelta(seconds=45), []),
        # 09:03:00 likewise, in the minute of the write.
        ("0 * * * * *", 5, timedelta(minutes=3, seconds=30), ["09:04", "09:05"]),
    ],
)
async def test_a_schedule_enabled_again_sends_nothing_that_fell_due_before_the_write(
    expression, every, enabled_at, expected
):
    start = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    clock = StoreClock(start - timedelta(minutes=every, seconds=-10))
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    document = {"schedule": expression, "request": REQUEST}
    await ledger.create("schedules/s.json", document)
    await run_schedules(ledger, queue, start - timedelta(minutes=every))  # it starts
    record = await ledger.read("schedules/s.json")
    clock.now += timedelta(seconds=10)
    await ledger.replace("schedules/s.json", {**document, "enabled": False}, record.etag)
    assert await run_schedules(ledger, queue, start) == []
    clock.now = start + enabled_at
    record = await ledger.read("schedules/s.json")
    await ledger.replace("schedules/s.json", document, record.etag)

    ids = await run_schedules(ledger, queue, start + timedelta(minutes=every))

    assert ids == [f"schedule:s:2030-01-01T{minute}Z" for minute in expected]


@pytest.mark.parametrize(
    ("expression", "gap", "sent", "first", "then"),
    [
        # The latest sixty; then a run a minute later.
        ("0 * * * * *", timedelta(hours=2), 60, "2030-01-01T13:01Z", timedelta(minutes=1)),
        # The last day's; then a run a day later.
        ("0 0 9 * * *", timedelta(days=3), 1, "2030-01-04T09:00Z", timedelta(days=1)),
    ],
)
async def test_due_times_a_run_leaves_out_are_said_in_a_warning(
    expression, gap, sent, first, then, caplog
):
    # They were dropped silently: runs missed, or a BOT_SCHEDULE firing less often than
    # the catch-up's bounds (a weekly timer never sent a weekday schedule).
    ledger, queue = MemoryLedger(), MemoryQueue()
    await ledger.create("schedules/s.json", {"schedule": expression, "request": REQUEST})
    await run_schedules(ledger, queue, T0)  # it starts
    caplog.set_level(logging.WARNING, logger="shared.schedules")

    ids = await run_schedules(ledger, queue, T0 + gap)

    assert len(ids) == sent and ids[0] == f"schedule:s:{first}"
    [line] = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert line.startswith(f"schedule 's': due times before {first} not sent")
    caplog.clear()
    # A run within the bounds says nothing.
    assert len(await run_schedules(ledger, queue, T0 + gap + then)) == 1
    assert not [r for r in caplog.records if "not sent" in r.getMessage()]


class Busy(MemoryLedger):
    """Storage answers 503 to every read of the blobs named in `failing`."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    async def read(self, name):
        if name in self.failing:
            from shared.references import StoreError

            raise StoreError(
                f"proactive ledger: read {name} failed: HTTP 503 ServerBusy", status=503
            )
        return await super().read(name)


async def test_a_document_storage_fails_to_read_is_not_called_broken_and_is_caught_up(caplog):
    # A 503 on one document read as "the document is not valid JSON or unreadable": the
    # timer skipped it as broken, and `schedule list` showed a healthy schedule so.
    from shared.references import StoreError
    from shared.schedules import read_schedules

    ledger, queue = Busy(), MemoryQueue()
    document = {"schedule": "0 */10 * * * *", "request": REQUEST}
    await ledger.create("schedules/a.json", document)
    await ledger.create("schedules/b.json", document)
    T12 = T0.replace(second=0)
    assert len(await run_schedules(ledger, queue, T12)) == 2

    ledger.failing.add("schedules/b.json")
    caplog.set_level(logging.WARNING)
    ran = await run_schedules(ledger, queue, T12 + timedelta(minutes=20))
    assert [i for i in ran if ":b:" in i] == [] and len(ran) == 2  # a's two due times
    assert "'b': not run this time (StoreError)" in caplog.text
    assert "not valid JSON" not in caplog.text
    with pytest.raises(StoreError):
        [found async for found in read_schedules(ledger)]

    ledger.failing.clear()
    caught_up = await run_schedules(ledger, queue, T12 + timedelta(minutes=21))
    assert [i for i in caught_up if ":b:" in i] == [
        "schedule:b:2030-01-01T12:10Z",
        "schedule:b:2030-01-01T12:20Z",
    ]


@pytest.mark.parametrize("enqueued", ["9999-12-31T23:59:00+00:00", "9999-12-31T23:59:59-01:00"])
async def test_a_last_run_record_enqueued_far_ahead_restarts_its_schedule_alone(caplog, enqueued):
    # Its changed document's next minute overflowed (OverflowError): every run failed
    # before the schedules after it in name order, every minute.
    ledger, queue = MemoryLedger(), MemoryQueue()
    document = {"schedule": "0 * * * * *", "request": REQUEST}
    await ledger.create("schedules/a.json", document)
    await ledger.create("schedules/b.json", document)
    state = f"{STATE_PREFIX}{encode_segment('a', 400)}.json"
    last = (T0 - timedelta(minutes=5)).isoformat()
    await ledger.create(state, {"last": last, "seen": "another", "enqueued": enqueued})

    ran = await run_schedules(ledger, queue, T0)

    assert ran == ["schedule:a:2030-01-01T12:00Z", "schedule:b:2030-01-01T12:00Z"]
    assert "'a': its last run is recorded" in caplog.text


async def test_a_queue_setting_to_fix_fails_the_run_rather_than_each_schedule_quietly():
    # Identity-based storage with no queue endpoint: each schedule was logged as "not run
    # this time" and the run succeeded, every minute, until a day of due times was lost.
    from shared.config import SettingsError

    class Unconfigured(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            raise SettingsError("AzureWebJobsStorage__queueServiceUri", "is required")

    ledger = MemoryLedger()
    await ledger.create("schedules/a.json", {"schedule": "0 * * * * *", "request": REQUEST})
    with pytest.raises(SettingsError):
        await run_schedules(ledger, Unconfigured(), T0)
