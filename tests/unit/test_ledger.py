"""The engine's bookkeeping primitives: one contract, in memory and on Blob storage (Azurite)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.config import Settings, StorageSettings
from shared.ledger import BlobLedger, MemoryLedger
from shared.storage import close_shared_clients
from tests.fixtures.storage import ANSWER_TEXT, UNREADABLE_ANSWERS, unreadable_storage


@pytest.fixture(params=["memory", pytest.param("blob", marks=pytest.mark.integration)])
async def ledger(request, unique_name):
    if request.param == "memory":
        yield MemoryLedger()
        return
    azurite = request.getfixturevalue("azurite")
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("ledger"),
    )
    yield BlobLedger(settings)
    await close_shared_clients()


async def test_create_is_create_only(ledger):
    assert await ledger.read("a/b.json") is None
    etag = await ledger.create("a/b.json", {"n": 1})
    assert etag
    assert await ledger.create("a/b.json", {"n": 2}) is None
    record = await ledger.read("a/b.json")
    assert (record.data, record.etag) == ({"n": 1}, etag)
    # When it was last written, by the store's clock: schedules start afresh from an edit,
    # and a claim's length is counted from it (shared/schedules.py, shared/idempotency.py).
    assert abs(record.modified - time.time()) < 60


async def test_concurrent_creates_have_exactly_one_winner(ledger):
    results = await asyncio.gather(*(ledger.create("race.json", {"n": i}) for i in range(8)))
    assert sum(result is not None for result in results) == 1


async def test_replace_needs_the_current_etag(ledger):
    first = await ledger.create("doc.json", {"v": 1})
    second = await ledger.replace("doc.json", {"v": 2}, first)
    assert second and second != first
    assert await ledger.replace("doc.json", {"v": 3}, first) is None  # a lost update refused
    assert (await ledger.read("doc.json")).data == {"v": 2}
    assert await ledger.replace("missing.json", {"v": 1}, first) is None


async def test_replace_writes_the_whole_blob_metadata_included(ledger):
    # A target's slot turns from a claim into its outcome in one write (shared/idempotency.py).
    claim = await ledger.create("s/t.json", {"owner": "me"}, metadata={"claim": "1"})
    assert await ledger.replace(
        "s/t.json", {"outcome": "delivered"}, claim, metadata={"outcome": "delivered"}
    )
    [entry] = [e async for e in ledger.list("s/")]
    assert entry.metadata == {"outcome": "delivered"}
    record = await ledger.read("s/t.json")
    assert await ledger.replace("s/t.json", {"v": 2}, record.etag)
    [entry] = [e async for e in ledger.list("s/")]
    assert entry.metadata == {}


async def test_delete_with_and_without_etag(ledger):
    etag = await ledger.create("x.json", {})
    assert await ledger.delete("x.json", '"not-it"') is False
    assert await ledger.delete("x.json", etag) is True
    assert await ledger.delete("x.json") is False
    await ledger.create("y.json", {})
    assert await ledger.delete("y.json") is True


async def test_list_gives_names_under_a_prefix_with_metadata(ledger):
    assert [e async for e in ledger.list("p/")] == []  # nothing yet (no container either)
    await ledger.create("p/1.json", {}, metadata={"outcome": "delivered"})
    await ledger.create("p/2.json", {})
    await ledger.create("q/1.json", {})
    entries = [e async for e in ledger.list("p/")]
    assert [e.name for e in entries] == ["p/1.json", "p/2.json"]
    assert entries[0].metadata == {"outcome": "delivered"} and entries[1].metadata == {}
    assert all(e.modified > 0 for e in entries)


@pytest.mark.integration
async def test_a_long_listing_is_timed_per_page_not_as_a_whole(azurite, unique_name, monkeypatch):
    # A 100,000-target broadcast's report is one listing of ~20 pages of 5,000: each call
    # gets the operation timeout, not the whole listing (which would time out the report).
    import shared.ledger

    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("ledger"),
    )
    ledger = BlobLedger(settings, page_size=1)
    try:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                await ledger.create(f"p/{i:04d}.json", {})

        await asyncio.gather(*(one(i) for i in range(80)))
        wholes = []
        for _ in range(2):  # the slower of two, so that one quick run sets no tight bound
            started = asyncio.get_running_loop().time()
            assert len([entry async for entry in ledger.list("p/")]) == 80
            wholes.append(asyncio.get_running_loop().time() - started)
        # Each page well within the timeout (about 40 times an average page, so a loaded
        # machine's hiccup does not fail it), the whole listing about twice beyond it.
        monkeypatch.setattr(shared.ledger, "OPERATION_TIMEOUT", max(wholes) / 2)
        assert len([entry async for entry in ledger.list("p/")]) == 80
    finally:
        await close_shared_clients()


@pytest.mark.parametrize("status", [None, 403])
def test_a_storage_authentication_failure_names_the_setting_never_the_errors_text(status):
    # No token (azure-identity raises without an HTTP status) or a token storage refused:
    # both stores say which setting to check, and never "HTTP None" or the error's text.
    from azure.core.exceptions import ClientAuthenticationError

    from shared.references.contract import storage_auth_failed

    error = ClientAuthenticationError(message="token endpoint said: secret-abc123")
    error.status_code = status
    failure = storage_auth_failed("proactive ledger: write out/x.json", error)
    text = str(failure)
    assert "storage authentication failed" in text and "AzureWebJobsStorage" in text
    assert "None" not in text and "secret-abc123" not in text
    assert failure.status == status
    assert ("HTTP 403" in text) == (status == 403)


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_listing_answered_with_what_no_client_can_read_is_a_store_error_naming_it(answer):
    # A proxy's page, or XML cut short, answered with 200: the SDK's DeserializationError
    # (a ValueError, not an AzureError) escaped as it was, and a report, the schedules'
    # listing or the engine's bookkeeping failed with a traceback; or it said "HTTP 200".
    import traceback

    from shared.references.contract import StoreError

    async with unreadable_storage(answer) as storage:
        settings = Settings(
            storage=StorageSettings(connection_string=storage.connection_string),
            references_container="ledger",
        )
        try:
            with pytest.raises(StoreError) as raised:
                [entry async for entry in BlobLedger(settings).list("requests/r1/")]
        finally:
            await close_shared_clients()

    assert any("comp=list" in request for request in storage.requests)
    text = str(raised.value)
    assert text.startswith(
        "proactive ledger: list requests/r1/ failed: the answer could not be read ("
    ), text
    assert raised.value.status is None  # not an HTTP failure
    assert ANSWER_TEXT not in "".join(traceback.format_exception(raised.value))


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_read_answered_without_its_content_range_is_a_store_error_naming_it(answer):
    # A proxy's page answering a blob's ranged GET with 200: the SDK's plain ValueError
    # escaped, and the timer took a schedule document so read for a bad expression.
    import traceback

    from shared.references.contract import StoreError

    async with unreadable_storage(answer, downloads=True) as storage:
        settings = Settings(
            storage=StorageSettings(connection_string=storage.connection_string),
            references_container="ledger",
        )
        try:
            with pytest.raises(StoreError) as raised:
                await BlobLedger(settings).read("schedules/daily.json")
        finally:
            await close_shared_clients()

    assert any(r.startswith("GET /devstoreaccount1/ledger/schedules/") for r in storage.requests)
    text = str(raised.value)
    assert text.startswith(
        "proactive ledger: read schedules/daily.json failed: the answer could not be read ("
    ), text
    assert raised.value.status is None
    assert ANSWER_TEXT not in "".join(traceback.format_exception(raised.value))


async def test_an_outcome_for_a_target_with_a_very_long_name_is_recorded_and_reported(ledger):
    # A request may name a conversation id of 40,000 characters; blob metadata holds 8 KiB.
    # Refused, the outcome never landed and the request went round the queue for ever.
    from shared.reports import MAX_LABEL_CHARS, ensure_head, read_report, record_outcome

    label = "msteams/a:" + "x" * 14_000
    await ensure_head(ledger, "long", "single", 0.0)
    recorded = await record_outcome(
        ledger, "long", "target", "failed", 0.0, reason="not deliverable", label=label
    )

    report = await read_report(ledger, "long")
    assert recorded and (report["state"], report["failed"]) == ("done", 1)
    assert report["failures"][0]["target"] == label[:MAX_LABEL_CHARS]


async def test_a_report_lists_failed_targets_up_to_its_limit_and_counts_them_all(
    ledger, monkeypatch
):
    from shared import reports

    monkeypatch.setattr(reports, "MAX_FAILURES_LISTED", 2)
    await reports.ensure_head(ledger, "b1", "broadcast", 0.0)
    for n in range(3):
        key = f"msteams/a:{n}"
        await reports.record_outcome(ledger, "b1", key, "failed", 0.0, reason="blocked")

    report = await reports.read_report(ledger, "b1")
    assert report["failed"] == 3
    assert len(report["failures"]) == 2


@pytest.mark.parametrize(
    ("held", "wait"),
    [
        (None, 45),
        (True, 45),
        (float("nan"), 45),
        (-5, 45),
        ("9999", 45),
        (120, 120),
        (float("inf"), 3600),
        (10**400, 3600),
    ],
)
async def test_a_claim_lasts_its_holders_length_within_an_hour(held, wait):
    # A claim keeps its holder's length (BOT_PROACTIVE_CLAIM_SECONDS may differ between
    # instances while a change rolls out); whatever a slot says there, a reader neither
    # takes it for longer than an hour nor fails on it (10**400 raised OverflowError).
    from shared.idempotency import Busy, take_claim

    now = [1000.0]
    ledger = MemoryLedger(clock=lambda: now[0])
    claim = {"owner": "another", "expiresAt": 1e12}
    if held is not None:
        claim["seconds"] = held
    await ledger.create("slot", claim)
    busy = await take_claim(ledger, "slot", 1000.0, seconds=45.0)
    assert isinstance(busy, Busy)
    assert busy.wait == pytest.approx(wait + 1.0, abs=1.0)
