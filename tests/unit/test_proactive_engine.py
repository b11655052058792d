"""The proactive engine's outcomes, bookkeeping and fan-out, against the FakeConnector.

Sends go over HTTP to botsim's fake Connector with tokens from the fake AAD (MSAL);
references are in the in-memory store and the bookkeeping in the in-memory ledger (the
Blob ledger runs the same contract in test_ledger.py). The queue is a recorder: what the
engine put back (with which delay) and what it poisoned is what the tests read. The
queue trigger itself (`proactive_function.main`, its last attempt) runs on Azurite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest

from shared import proactive
from shared.auth.inbound import InboundAuthenticator
from shared.auth.tokens import create_token_provider
from shared.config import Settings
from shared.connector import ConnectorClient, RetryPolicy
from shared.ledger import BlobLedger, MemoryLedger
from shared.proactive import Engine, Outcome, handle_queue_message
from shared.proactive_schema import RESERVED
from shared.queues import MAX_QUEUE_MESSAGE_BYTES, MemoryQueue, QueueError, compact_json
from shared.ratelimit import Pacer, Scope
from shared.references import BlobReferenceStore, MemoryReferenceStore, StoreError
from shared.reports import (
    FANOUT_TARGET,
    ensure_head,
    head_name,
    new_head,
    outcome_name,
    read_report,
    record_outcome,
    report_reason,
    request_prefix,
)
from shared.router import Router
from shared.runtime import Runtime
from tests.fixtures.storage import sas_connection_string
from tools.botsim.connector import FakeConnector, Reply

FAST_RETRY = RetryPolicy(max_attempts=2, max_total_seconds=2.0, base_delay=0.01, max_delay=0.02)
GONE = {"error": {"code": "BotNotInConversationRoster", "message": "not in roster"}}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reference(service_url: str, conversation_id: str, **overrides: Any) -> dict[str, Any]:
    tenant = overrides.pop("tenant", "tenant-1")
    personal = overrides.pop("personal", True)
    user = overrides.pop("user", "29:ada")
    return {
        "channelId": overrides.pop("channel", "msteams"),
        "serviceUrl": service_url,
        "conversation": {
            "id": conversation_id,
            "conversationType": "personal" if personal else "channel",
            "tenantId": tenant,
        },
        "bot": {"id": "28:bot", "name": "Bot"},
        "user": {"id": user, "name": "Ada"},
        **overrides,
    }


def body(to: dict[str, Any], request_id: str = "req-1", **content: Any) -> str:
    return json.dumps({"id": request_id, "to": to, **(content or {"text": "hello"})})


def make_runtime(settings, store, clock: Clock | None = None) -> Runtime:
    # The Connector's pacer keeps real time, moved on with the engine's clock when a test
    # jumps it forward (a requeued copy comes back after its delay, and so does the tenant).
    start = clock.now if clock else 0.0
    pacer = Pacer(
        settings.connector_rate_limit,
        clock=lambda: time.monotonic() + ((clock.now - start) if clock else 0.0),
    )
    return Runtime(
        settings=settings,
        authenticator=InboundAuthenticator(settings),
        connector=ConnectorClient(
            settings, create_token_provider(settings), retry=FAST_RETRY, pacer=pacer
        ),
        references=store,
        router=Router(),
    )


@pytest.fixture
async def parts(aad_app, fake_connector):
    settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url)
    store = MemoryReferenceStore()
    await store.upsert(reference(fake_connector.url, "a:1"))
    clock = Clock()
    runtime = make_runtime(settings, store, clock)
    engine = Engine(runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, rand=lambda: 0)
    yield runtime, engine
    await runtime.close()


async def handle(engine: Engine, text: str) -> Outcome:
    return await handle_queue_message(text, engine.runtime, engine=engine)


async def drain(engine: Engine, limit: int = 500) -> list[Outcome]:
    """Process what the engine put back on the queue until it is empty (delays skipped)."""
    outcomes = []
    for _ in range(limit):
        sent = engine.queue.take()
        if not sent:
            return outcomes
        for text, _delay in sent:
            outcomes.append(await handle(engine, text))
    raise AssertionError("the queue never drained")


def sends(connector: FakeConnector) -> list[str]:
    return [r.conversation_id for r in connector.requests if r.operation == "sendToConversation"]


async def test_a_conversation_id_its_client_chose_cannot_fake_or_flood_a_log_line(
    parts, fake_connector, caplog
):
    # A channel-signed activity may carry any conversation id; its key names the target
    # in the engine's log lines, where a line break made a second line of the bot's own.
    _runtime, engine = parts
    forged = "19:a\nERROR shared.proactive: proactive 'other': FORGED" + "x" * 5_000
    await engine.runtime.references.upsert(reference(fake_connector.url, forged))
    missing = "19:gone\nERROR shared.proactive: FORGED TOO"
    with caplog.at_level(logging.DEBUG, logger="shared"):
        await handle(engine, body({"conversation": f"msteams/{forged}"}))
        assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
        await drain(engine)
        await handle(engine, body({"conversation": f"msteams/{missing}"}, "req-2"))
        engine.clock.now += 3600  # an unknown key is retried for a minute, then failed
        await drain(engine)
    assert sorted(sends(fake_connector)) == sorted([forged, forged, "a:1"])
    lines = [record.getMessage() for record in caplog.records]
    assert any("19:a\\nERROR" in line and "(5065 chars)" in line for line in lines)
    assert any("19:gone\\nERROR" in line for line in lines)
    assert not [line for line in lines if "\n" in line or len(line) > 1_000]
    report = await read_report(engine.ledger, "req-2")
    assert "19:gone\\nERROR" in report["failures"][0]["reason"]  # as the log shows it


# --- defects 1-5 -----------------------------------------------------------------------


async def test_unknown_key_is_retried_for_a_minute_then_failed_and_poisoned(parts, fake_connector):
    # Defect 1: it returned normally and was deleted: no retry, no poison copy, no report.
    _runtime, engine = parts
    assert await handle(engine, body({"conversation": "msteams/a:landing"})) is Outcome.REQUEUED
    [(copy, delay)] = engine.queue.take()
    assert 0 < delay <= 20
    assert engine.queue.poisoned == []

    engine.clock.now += 61  # the reference never landed
    assert await handle(engine, copy) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    assert "no stored reference" in poisoned["poisonReason"]
    report = await read_report(engine.ledger, "req-1")
    assert report["state"] == "done" and report["failed"] == 1
    assert report["failures"][0]["target"] == "msteams/a:landing"
    assert sends(fake_connector) == []


async def test_unknown_key_whose_reference_lands_is_delivered(parts, fake_connector):
    runtime, engine = parts
    assert await handle(engine, body({"conversation": "msteams/a:2"})) is Outcome.REQUEUED
    await runtime.references.upsert(reference(fake_connector.url, "a:2"))
    assert await drain(engine) == [Outcome.DELIVERED]
    assert sends(fake_connector) == ["a:2"]


async def test_a_long_retry_after_is_requeued_with_that_delay_not_raised(parts, fake_connector):
    # Defect 2: a 429 raised, so the host redelivered after visibilityTimeout and spent one
    # of its five dequeues each time: a conversation throttled for 60 s was poisoned.
    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "60"})
    fake_connector.script("POST", r"/activities$", [throttled] * 2)

    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(copy, delay)] = engine.queue.take()
    assert 60 <= delay <= 60 * 1.2 + 1
    assert json.loads(copy)["_proactive"] == {"attempt": 1, "since": engine.clock.now}
    assert engine.queue.poisoned == []
    assert len(sends(fake_connector)) == 1  # the client did not wait 60 s itself
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("running", 0, 0)

    engine.clock.now += 61
    assert await handle(engine, copy) is Outcome.REQUEUED  # still throttled: again
    [(copy, _)] = engine.queue.take()
    engine.clock.now += 61
    assert await handle(engine, copy) is Outcome.DELIVERED
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)


async def test_throttling_beyond_the_total_age_is_failed_and_poisoned(parts, fake_connector):
    runtime, engine = parts
    engine.max_age = 100
    fake_connector.script("POST", r"/activities$", [Reply(503, body="busy")] * 20)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(copy, _)] = engine.queue.take()
    engine.clock.now += 101
    assert await handle(engine, copy) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    assert "gave up" in poisoned["poisonReason"] and "503" in poisoned["poisonReason"]
    assert "_proactive" not in poisoned  # an operator can put the copy back as it is
    assert await runtime.references.get("msteams/a:1") is not None


async def test_a_500_is_never_resent(parts, fake_connector):
    # Defect 3: classed transient, it was redelivered and could be posted twice.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    assert engine.queue.sent == []
    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"]
    assert len(sends(fake_connector)) == 1
    report = await read_report(engine.ledger, "req-1")
    assert report["failed"] == 1 and "500" in report["failures"][0]["reason"]


async def test_a_send_answered_after_its_time_budget_is_never_resent(parts, fake_connector):
    # The POST reached the channel, which posted it and answered after the client's whole
    # budget (2 s here): it may have been posted, so it is not requeued and sent again.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(200, json={"id": "m1"}, delay=3.0)])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    assert await drain(engine) == []
    assert sends(fake_connector) == ["a:1"]
    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"]) == (0, 1)


async def test_a_slow_answer_to_creating_a_users_chat_is_retried_not_failed(parts, fake_connector):
    # Creating the 1:1 carries no message: nothing can have been posted, and Teams answers
    # the existing chat again. A slow answer is requeued like any transient failure.
    _runtime, engine = parts
    slow = Reply(200, json={"id": "a:new"}, delay=3.0)
    fake_connector.script("POST", r"/v3/conversations$", [slow])
    assert await handle(engine, body({"user": user(fake_connector)}, "u-1")) is Outcome.REQUEUED
    assert engine.queue.poisoned == [] and sends(fake_connector) == []
    assert await drain(engine) == [Outcome.DELIVERED]
    assert len(sends(fake_connector)) == 1  # to the chat the fake Connector answered now


async def test_a_500_to_creating_a_users_chat_is_retried_not_reported_as_maybe_posted(
    parts, fake_connector
):
    # Creating the 1:1 posts no message: its 500 said "the message may have been posted"
    # and failed the target, which an operator would hesitate to retry.
    _runtime, engine = parts
    fake_connector.script("POST", r"/v3/conversations$", [Reply(500, body="oops")])
    assert await handle(engine, body({"user": user(fake_connector)}, "u-1")) is Outcome.REQUEUED
    assert engine.queue.poisoned == [] and sends(fake_connector) == []
    assert await drain(engine) == [Outcome.DELIVERED]
    assert len(sends(fake_connector)) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", json.dumps({"schemaVersion": 2, "key": "msteams/a:1", "reference": {}})],
    ids=["not-json", "newer-version"],
)
async def test_a_conversation_stored_unreadably_fails_its_request_instead_of_holding_it(
    aad_app, fake_connector, azurite, unique_name, content
):
    # Taken for a storage outage, the request came back every 10 minutes for ever with
    # its report pending; such a document is never rewritten, so waiting never heals it.
    from azure.storage.blob import ContainerClient

    from shared.config import StorageSettings
    from shared.references import BlobReferenceStore, document_name

    settings = dataclasses.replace(
        aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url),
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("refs"),
    )
    store = BlobReferenceStore(settings)
    await store.upsert(reference(fake_connector.url, "a:1"))
    raw = ContainerClient.from_connection_string(
        azurite.connection_string, settings.references_container
    )
    raw.upload_blob(document_name("msteams/a:1"), content, overwrite=True)
    raw.close()
    clock = Clock()
    runtime = make_runtime(settings, store, clock)
    engine = Engine(runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, rand=lambda: 0)
    try:
        assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    finally:
        await runtime.close()
    assert engine.queue.take() == [] and sends(fake_connector) == []
    [poisoned] = engine.queue.poisoned
    assert poisoned["poisonReason"].startswith(
        "the stored conversation cannot be read by this version: "
    )
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)


async def test_a_gone_inline_reference_does_not_prune_the_stored_one_it_did_not_try(
    parts, fake_connector
):
    # Defect 4: the producer's stale serviceUrl got a 403 and the stored reference under
    # that key (another serviceUrl, never tried) was pruned.
    runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(403, json=GONE)] * 2)
    stale = reference(f"{fake_connector.url}/stale", "a:1")

    assert await handle(engine, body({"reference": stale})) is Outcome.PRUNED
    assert await runtime.references.get("msteams/a:1") is not None

    same = reference(fake_connector.url, "a:1")
    assert await handle(engine, body({"reference": same}, "req-2")) is Outcome.PRUNED
    assert await runtime.references.get("msteams/a:1") is None
    report = await read_report(engine.ledger, "req-2")
    assert (report["state"], report["pruned"]) == ("done", 1)


async def test_a_gone_inline_reference_spelt_otherwise_prunes_the_stored_one_it_tried(
    parts, fake_connector
):
    # One serviceUrl, written with and without its trailing slash and in another case: the
    # stored conversation is the one tried, and goes (kept, each send would try it again).
    runtime, engine = parts
    await runtime.references.upsert(reference(f"{fake_connector.url}/amer/", "a:1"))
    fake_connector.script("POST", r"/activities$", [Reply(403, json=GONE)])
    inline = reference(f"{fake_connector.url}/AMER", "a:1")

    assert await handle(engine, body({"reference": inline})) is Outcome.PRUNED

    assert sends(fake_connector) == ["a:1"]
    assert await runtime.references.get("msteams/a:1") is None
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["pruned"]) == ("done", 1)


def expired_secret(aad_app, fake_connector):
    """The bot's settings with a secret Entra ID refuses, the fake Connector trusted."""
    return aad_app.settings(
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url, MicrosoftAppPassword="expired-secret"
    )


async def test_refused_credentials_keep_the_message_until_the_secret_is_fixed(
    aad_app, fake_aad, fake_connector
):
    # Defect 5: an expired secret was `invalid`, so every queued message went to poison.
    store = MemoryReferenceStore()
    await store.upsert(reference(fake_connector.url, "a:1"))
    clock = Clock()
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    runtime = make_runtime(expired_secret(aad_app, fake_connector), store)
    engine = Engine(runtime, ledger, queue, clock=clock, rand=lambda: 0)
    try:
        assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
        [(copy, delay)] = queue.take()
        assert 5 <= delay <= 600 and queue.poisoned == []
        assert fake_connector.requests == []
    finally:
        await runtime.close()

    fixed = make_runtime(aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url), store)
    engine = Engine(fixed, ledger, queue, clock=clock, rand=lambda: 0)
    try:
        assert await handle(engine, copy) is Outcome.DELIVERED
    finally:
        await fixed.close()
    assert sends(fake_connector) == ["a:1"] and queue.poisoned == []


async def test_refused_credentials_cost_one_warning_and_one_token_request_not_one_per_message(
    aad_app, fake_aad, fake_connector, caplog
):
    # A broadcast's every message meeting a wrong secret: Entra ID was asked, and a warning
    # logged, for each of them (100,000 warnings an hour at 10,000 targets), burying the
    # one line saying what to fix.
    store = MemoryReferenceStore()
    for n in range(20):
        await store.upsert(reference(fake_connector.url, f"a:{n}"))
    clock = Clock()
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    runtime = make_runtime(expired_secret(aad_app, fake_connector), store)
    engine = Engine(runtime, ledger, queue, clock=clock, rand=lambda: 0)
    refused = len(fake_aad.rejections)
    try:
        with caplog.at_level(logging.INFO):
            for n in range(20):
                message = body({"conversation": f"msteams/a:{n}"}, f"req-{n}")
                assert await handle(engine, message) is Outcome.REQUEUED
    finally:
        await runtime.close()
    assert len(queue.take()) == 20 and queue.poisoned == [] and fake_connector.requests == []
    assert len(fake_aad.rejections) - refused == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    credentials = [line for line in warnings if "no usable credentials" in line]
    assert len(credentials) == 1 and "check the setting MicrosoftAppPassword" in credentials[0]


async def test_time_held_for_credentials_is_not_the_message_age(aad_app, fake_aad, fake_connector):
    # The secret was fixed two hours later: the held backlog then meets a busy Connector. The
    # age bound is for throttled and failing sends; the hold must not have started it.
    store = MemoryReferenceStore()
    await store.upsert(reference(fake_connector.url, "a:1"))
    clock = Clock()
    ledger, queue = MemoryLedger(clock=clock), MemoryQueue()
    runtime = make_runtime(expired_secret(aad_app, fake_connector), store)
    engine = Engine(runtime, ledger, queue, clock=clock, rand=lambda: 0)
    try:
        assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
        [(copy, _delay)] = queue.take()
    finally:
        await runtime.close()

    clock.now += 2 * 3600
    fixed = make_runtime(aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url), store)
    engine = Engine(fixed, ledger, queue, clock=clock, rand=lambda: 0)
    busy = Reply(503, body="busy")
    fake_connector.script("POST", r"/activities$", [busy] * FAST_RETRY.max_attempts)
    try:
        assert await handle(engine, copy) is Outcome.REQUEUED
        assert queue.poisoned == []
        [(copy, _delay)] = queue.take()
        clock.now += 60
        assert await handle(engine, copy) is Outcome.DELIVERED
    finally:
        await fixed.close()
    report = await read_report(ledger, "req-1")
    assert (report["delivered"], report["failed"]) == (1, 0)


# --- exactly once ------------------------------------------------------------------------


async def test_a_resubmitted_id_sends_nothing_new_and_is_reported_duplicate(parts, fake_connector):
    _runtime, engine = parts
    text = body({"conversation": "msteams/a:1"})
    assert await handle(engine, text) is Outcome.DELIVERED
    assert await handle(engine, text) is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert {k: report[k] for k in ("state", "targets", "delivered", "duplicate")} == {
        "state": "done",
        "targets": 1,
        "delivered": 1,
        "duplicate": 1,
    }


async def test_a_target_claimed_elsewhere_is_not_sent_at_the_same_time(parts, fake_connector):
    _runtime, engine = parts
    await engine.ledger.create(
        outcome_name("req-1", "target"), {"expiresAt": engine.clock.now + 30}
    )
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    assert sends(fake_connector) == []
    [(copy, delay)] = engine.queue.take()
    assert 0 < delay <= 16 and json.loads(copy)["_proactive"]["attempt"] == 0
    engine.clock.now += 31  # the holder crashed: its claim expires and is taken over
    assert await handle(engine, copy) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]


async def test_a_report_is_pending_until_tried_and_none_for_an_unknown_id(parts):
    _runtime, engine = parts
    assert await read_report(engine.ledger, "never-sent") is None
    await ensure_head(engine.ledger, "queued", "single", engine.clock())  # as enqueue does
    report = await read_report(engine.ledger, "queued")
    assert (report["state"], report["targets"], report["delivered"]) == ("pending", 1, 0)
    await ensure_head(engine.ledger, "b-queued", "broadcast", engine.clock())
    report = await read_report(engine.ledger, "b-queued")
    assert (report["state"], report["targets"]) == ("pending", 0)


# --- user targets --------------------------------------------------------------------------


def user(connector: FakeConnector, user_id: str = "29:grace") -> dict[str, str]:
    return {
        "channelId": "msteams",
        "id": user_id,
        "tenantId": "tenant-1",
        "serviceUrl": connector.url,
    }


async def test_a_user_target_creates_the_1to1_then_reuses_it(parts, fake_connector, aad_app):
    runtime, engine = parts
    assert await handle(engine, body({"user": user(fake_connector)}, "u-1")) is Outcome.DELIVERED
    assert await handle(engine, body({"user": user(fake_connector)}, "u-2")) is Outcome.DELIVERED

    [created] = fake_connector.requests_for("createConversation")
    assert created.json["members"] == [{"id": "29:grace"}]
    assert created.json["tenantId"] == "tenant-1"
    assert created.json["channelData"] == {"tenant": {"id": "tenant-1"}}
    assert created.json["bot"]["id"] == f"28:{aad_app.app_id}"
    conversation = created.response["id"]
    assert sends(fake_connector) == [conversation, conversation]
    stored = await runtime.references.find_by_user(channel_id="msteams", user_id="29:grace")
    assert stored is not None and stored.key == f"msteams/{conversation}"


async def test_a_1to1_opened_for_a_user_named_by_aad_object_id_is_erased_by_it(
    parts, fake_connector
):
    # Teams takes the aadObjectId as the member's id: the 1:1 is stored under it, so the
    # user's deleteUserData (their 29: id and that aadObjectId) finds it.
    from shared.userdata import erase_for_activity

    runtime, engine = parts
    aad = "00000000-0000-0000-0000-0000000000aa"
    assert await handle(engine, body({"user": user(fake_connector, aad)})) is Outcome.DELIVERED
    [created] = fake_connector.requests_for("createConversation")
    assert created.json["members"] == [{"id": aad}]
    key = f"msteams/{created.response['id']}"
    stored = await runtime.references.find_by_user(channel_id="msteams", aad_object_id=aad)
    assert stored is not None and stored.key == key

    request = {"type": "deleteUserData", "channelId": "msteams"}
    request["from"] = {"id": "29:grace", "aadObjectId": aad}
    erased = await erase_for_activity(request, state=runtime.state, references=runtime.references)

    assert erased.conversations == [key]
    assert await runtime.references.get(key) is None


async def test_a_user_target_reuses_a_stored_1to1_instead_of_creating(parts, fake_connector):
    _runtime, engine = parts
    assert await handle(engine, body({"user": user(fake_connector, "29:ada")})) is Outcome.DELIVERED
    assert fake_connector.requests_for("createConversation") == []
    assert sends(fake_connector) == ["a:1"]


AAD = "0f1e2d3c-0000-4000-8000-0000000000aa"


async def test_a_user_target_naming_ids_in_another_case_reuses_the_stored_1to1(
    parts, fake_connector
):
    # Tenant ids and aadObjectIds are GUIDs: Teams writes them in lower case, a program
    # may not (SQL Server prints them upper case).
    runtime, engine = parts
    recorded = reference(fake_connector.url, "a:ada", user="29:ada-2")
    recorded["user"]["aadObjectId"] = AAD
    await runtime.references.upsert(recorded)
    for n, named in enumerate(({"id": AAD.upper()}, {"id": "29:ada-2"})):
        target = {**user(fake_connector), **named, "tenantId": "TENANT-1"}
        assert await handle(engine, body({"user": target}, f"u-{n}")) is Outcome.DELIVERED
    assert fake_connector.requests_for("createConversation") == []
    assert sends(fake_connector) == ["a:ada", "a:ada"]
    stored = await runtime.references.get("msteams/a:ada")
    assert stored.reference["user"] == recorded["user"]
    assert stored.reference["conversation"]["tenantId"] == "tenant-1"


async def test_a_new_1to1_the_channel_answers_with_an_existing_one_keeps_what_it_recorded(
    parts, fake_connector
):
    # The target names the user by an id the stored 1:1 does not carry (no aadObjectId
    # was recorded): the channel answers with that 1:1, whose record stays as it was.
    runtime, engine = parts
    recorded = reference(fake_connector.url, "a:ada", user="29:ada-2")
    await runtime.references.upsert(recorded)
    fake_connector.script("POST", r"/v3/conversations$", [Reply(200, json={"id": "a:ada"})])
    target = {**user(fake_connector), "id": AAD}
    assert await handle(engine, body({"user": target})) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:ada"]
    stored = await runtime.references.get("msteams/a:ada")
    assert stored.reference["user"] == {"id": "29:ada-2", "name": "Ada"}  # not the aad one
    found = await runtime.references.find_by_user(channel_id="msteams", user_id="29:ada-2")
    assert found is not None and found.key == "msteams/a:ada"


@pytest.mark.parametrize("stored", [False, True])
async def test_an_untrusted_user_service_url_is_refused_and_reported(parts, fake_connector, stored):
    # With the user's 1:1 stored, it was delivered there, against the docs' outcome table.
    runtime, engine = parts
    if stored:
        await runtime.references.upsert(reference(fake_connector.url, "a:g", user="29:grace"))
    with FakeConnector() as attacker:
        target = {**user(fake_connector), "serviceUrl": attacker.url}
        assert await handle(engine, body({"user": target})) is Outcome.FAILED
        assert attacker.requests == []
    assert sends(fake_connector) == []
    report = await read_report(engine.ledger, "req-1")
    assert report["failed"] == 1 and "not trusted" in report["failures"][0]["reason"]
    assert engine.queue.poisoned[0]["to"] == {"user": target}


BLOCKED = Reply(403, json={"error": {"code": "ConversationBlockedByUser", "message": "blocked"}})


async def test_a_user_who_blocked_the_bot_is_reported_pruned_each_time_without_a_poison_copy(
    parts, fake_connector
):
    # Their stored 1:1 answering so was pruned; the next request then opened it again,
    # was refused the same way, and was failed with a poison copy, night after night.
    runtime, engine = parts
    fake_connector.script("POST", r"/v3/conversations$", [BLOCKED, BLOCKED])
    for n in (1, 2):
        request = body({"user": user(fake_connector)}, f"u-{n}")
        assert await handle(engine, request) is Outcome.PRUNED
        report = await read_report(engine.ledger, f"u-{n}")
        assert (report["state"], report["pruned"], report["failed"]) == ("done", 1, 0)
    assert len(fake_connector.requests_for("createConversation")) == 2
    assert engine.queue.poisoned == [] and engine.queue.take() == [] and sends(fake_connector) == []
    assert await runtime.references.find_by_user(channel_id="msteams", user_id="29:grace") is None


@pytest.mark.parametrize("answered", ["..", "a:\ud800"])
async def test_a_1to1_id_the_bot_cannot_use_is_refused_and_not_stored(
    parts, fake_connector, answered
):
    # Stored, it was the user's 1:1 every later request and broadcast failed on.
    runtime, engine = parts
    fake_connector.script("POST", r"/v3/conversations$", [Reply(200, json={"id": answered})])

    assert await handle(engine, body({"user": user(fake_connector)})) is Outcome.FAILED

    assert sends(fake_connector) == []
    assert await runtime.references.find_by_user(channel_id="msteams", user_id="29:grace") is None
    assert await runtime.references.get(f"msteams/{answered}") is None
    [copy] = engine.queue.poisoned
    assert copy["poisonReason"].endswith("invalid status 200 code UnusableConversationId")


async def test_a_1to1_its_users_index_lost_is_indexed_again_when_the_channel_answers_with_it(
    aad_app, fake_connector, azurite, unique_name
):
    # The index write after the 1:1's document failed once: every request to the user
    # then opened the 1:1 again, and erasing the user missed it.
    from azure.storage.blob import ContainerClient

    from shared.config import StorageSettings
    from shared.references import user_index_name

    settings = dataclasses.replace(
        aad_app.settings(BOT_TRUSTED_SERVICE_URLS=fake_connector.url),
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("refs"),
    )
    store = BlobReferenceStore(settings)
    await store.upsert(reference(fake_connector.url, "a:g", user="29:grace"))
    raw = ContainerClient.from_connection_string(
        azurite.connection_string, settings.references_container
    )
    raw.delete_blob(user_index_name("msteams", "id", "29:grace"))
    raw.close()
    fake_connector.script("POST", r"/v3/conversations$", [Reply(200, json={"id": "a:g"})])
    clock = Clock()
    runtime = make_runtime(settings, store, clock)
    engine = Engine(runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, rand=lambda: 0)
    try:
        for n in (1, 2):
            request = body({"user": user(fake_connector)}, f"u-{n}")
            assert await handle(engine, request) is Outcome.DELIVERED
        found = await store.find_by_user(channel_id="msteams", user_id="29:grace")
    finally:
        await runtime.close()
    assert len(fake_connector.requests_for("createConversation")) == 1
    assert sends(fake_connector) == ["a:g", "a:g"]
    assert found is not None and found.key == "msteams/a:g"


# --- broadcast -------------------------------------------------------------------------------


async def store_many(runtime: Runtime, url: str) -> None:
    await runtime.references.upsert(reference(url, "19:chan-t1", personal=False, user="29:x"))
    await runtime.references.upsert(reference(url, "a:t2", tenant="tenant-2", user="29:b"))
    await runtime.references.upsert(reference(url, "a:t1-other", user="29:c"))
    await runtime.references.upsert(
        reference(url, "web-1", channel="webchat", tenant=None, user="u")
    )


async def store_personal(runtime: Runtime, url: str, *conversations: str) -> None:
    """1:1 conversations in tenant-1, each with a user of its own."""
    for conversation in conversations:
        await runtime.references.upsert(reference(url, conversation, user=f"29:{conversation}"))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {"a:1", "19:chan-t1", "a:t2", "a:t1-other", "web-1"}),
        ({"tenantId": "tenant-1"}, {"a:1", "19:chan-t1", "a:t1-other"}),
        ({"tenantId": "tenant-1", "personal": True}, {"a:1", "a:t1-other"}),
        ({"channelId": "webchat"}, {"web-1"}),
        ({"personal": False}, {"19:chan-t1"}),
    ],
)
async def test_a_broadcast_reaches_each_matching_conversation_once(
    parts, fake_connector, filters, expected
):
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)
    engine.fanout_page_size = 2
    engine.fanout_seconds = 0  # one page per invocation: continuations on the queue

    outcomes = [await handle(engine, body({"broadcast": filters}, "b-1"))]
    outcomes += await drain(engine)

    assert sorted(sends(fake_connector)) == sorted(expected)
    assert Outcome.FANNED_OUT in outcomes
    report = await read_report(engine.ledger, "b-1")
    assert report["state"] == "done"
    assert report["targets"] == report["delivered"] == len(expected)


@pytest.mark.parametrize(
    "other", [{"to": {"broadcast": {"tenantId": "tenant-2"}}}, {"text": "another text"}]
)
async def test_a_broadcast_reusing_the_id_of_one_under_way_is_a_duplicate(
    parts, fake_connector, other
):
    # Other filters made every attempt raise (the checkpoint's listing is of the first's
    # filters) until the host gave up and ended the first broadcast's fan-out; other
    # content went on with the first's fan-out, sending the rest the second's text.
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)
    engine.fanout_page_size = 2
    engine.fanout_seconds = 0  # one page per invocation: continuations on the queue
    first = {"id": "b-1", "to": {"broadcast": {"tenantId": "tenant-1"}}, "text": "first"}
    assert await handle(engine, json.dumps(first)) is Outcome.REQUEUED  # a page, then goes on
    assert await handle(engine, json.dumps({**first, **other})) is Outcome.DUPLICATE
    await drain(engine)
    assert sorted(sends(fake_connector)) == ["19:chan-t1", "a:1", "a:t1-other"]
    assert {activity["text"] for activity in fake_connector.activities} == {"first"}
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["duplicate"]) == ("done", 3, 1)
    assert report["failed"] == 0 and engine.queue.poisoned == []


@pytest.mark.parametrize("head_of", ["this version", "a version keeping only its digest"])
async def test_a_broadcast_whose_own_checkpoint_cannot_be_read_ends_with_a_reason(
    parts, fake_connector, caplog, head_of
):
    # A checkpoint this version cannot read (edited by hand, or another version's token)
    # was taken for another broadcast's: the broadcast answered duplicate, nothing said
    # why, and its report stayed `running` for ever with the rest never sent.
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)
    engine.fanout_page_size = 2
    engine.fanout_seconds = 0  # one page per invocation: continuations on the queue
    message = body({"broadcast": {"tenantId": "tenant-1"}}, "b-1")
    assert await handle(engine, message) is Outcome.REQUEUED  # a page, then goes on
    head = await engine.ledger.read(head_name("b-1"))
    unreadable = {**head.data, "continuation": "not-a-token-this-version-writes"}
    if head_of != "this version":
        del unreadable["sameRequest"]  # a head written before it kept one
    assert await engine.ledger.replace(head_name("b-1"), unreadable, head.etag) is not None
    caplog.set_level(logging.WARNING, logger="shared.fanout")

    queued = [text for text, _delay in engine.queue.take()]
    [continuation] = [text for text in queued if '"broadcast"' in text]

    assert await handle(engine, continuation) is Outcome.FAILED

    for child in queued:  # the first page's children
        if child is not continuation:
            assert await handle(engine, child) is Outcome.DELIVERED
    assert engine.queue.take() == []
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["failed"], report["duplicate"]) == ("done", 1, 0)
    assert report["failures"][0]["target"] == "broadcast fan-out"
    assert report["failures"][0]["reason"].startswith(
        "the fan-out's checkpoint cannot be read by this version"
    )
    assert "fan-out ending: the fan-out's checkpoint cannot be read" in caplog.text


async def test_a_conversation_no_child_can_address_is_reported_failed_under_its_key(
    parts, fake_connector
):
    # Stored by an earlier version (inbound now refuses a lone surrogate in an id), or
    # with a user nested so deep that the child carrying it is over the parser's limit:
    # each child was poisoned as a request of its own, its failure recorded as target
    # "target", and with two of them the report stayed `running` for ever.
    runtime, engine = parts  # stores msteams/a:1
    deep: dict[str, Any] = {"id": "29:deep"}
    for _ in range(61):
        deep = {"x": deep}
    await runtime.references.upsert(reference(fake_connector.url, "c\ud800-1", user="29:s1"))
    await runtime.references.upsert(reference(fake_connector.url, "c\ud800-2", user="29:s2"))
    await runtime.references.upsert(
        {**reference(fake_connector.url, "a:deep", user="29:d"), "user": {"id": "29:d", **deep}}
    )

    await handle(engine, body({"broadcast": {}}, "b-1"))
    await drain(engine)

    assert sorted(sends(fake_connector)) == ["a:1", "a:deep"]  # read from the store instead
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"], report["delivered"]) == ("done", 4, 2)
    # Reported under their keys (the surrogate's bytes shown as replacement characters).
    failed = sorted(failure["target"] for failure in report["failures"])
    assert [(f[:9], f[-2:], "\ufffd" in f) for f in failed] == [
        ("msteams/c", "-1", True),
        ("msteams/c", "-2", True),
    ]
    assert all("not one a message can name" in failure["reason"] for failure in report["failures"])
    assert engine.queue.poisoned == []


async def test_a_single_request_reusing_a_broadcasts_id_is_a_duplicate(parts, fake_connector):
    # It was sent (a:1 got the message twice) and counted as one of the broadcast's
    # targets, so the report said `done` while a child was still queued.
    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2")
    await handle(engine, body({"broadcast": {}}, "b-1"))
    children = engine.queue.take()

    assert await handle(engine, body({"conversation": "msteams/a:1"}, "b-1")) is (Outcome.DUPLICATE)
    assert sends(fake_connector) == []
    await handle(engine, children[0][0])
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["duplicate"]) == ("running", 1, 1)
    await handle(engine, children[1][0])
    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]
    assert (await read_report(engine.ledger, "b-1"))["state"] == "done"


@pytest.mark.parametrize("head", ["absent", "written by the producer"])
async def test_a_single_sends_first_attempt_reads_its_head_only_when_one_exists(
    parts, fake_connector, head
):
    # Checking that the id is not a broadcast's costs nothing where no head exists (the
    # timer's sends, a producer with the read-only role the template grants).
    _runtime, engine = parts

    class Counting(MemoryLedger):
        calls: list[str]

        async def create(self, name, data, *, metadata=None):
            self.calls.append("create")
            return await super().create(name, data, metadata=metadata)

        async def read(self, name):
            self.calls.append("read")
            return await super().read(name)

        async def replace(self, name, data, etag, *, metadata=None):
            self.calls.append("replace")
            return await super().replace(name, data, etag, metadata=metadata)

    engine.ledger = ledger = Counting(clock=engine.clock)
    ledger.calls = []
    if head != "absent":
        await ensure_head(ledger, "req-1", "single", engine.clock())
    ledger.calls = []
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.DELIVERED
    expected = ["create", "create", "replace"]  # the head, the claim, the outcome
    assert ledger.calls == (expected if head == "absent" else ["create", "read", *expected[1:]])


async def test_an_invalid_child_is_its_conversations_failure_and_a_stray_request_none(
    parts, fake_connector
):
    # A child the parser refuses (queued by an earlier version, say) fails its own target;
    # a request of its own that reuses the broadcast's id is in no way one of its targets.
    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2")
    await handle(engine, body({"broadcast": {}}, "b-1"))
    first, second = (json.loads(text) for text, _ in engine.queue.take())
    await handle(engine, json.dumps(first))
    broken = {**second, RESERVED: {"child": True, "reference": reference("x", "a:other")}}

    assert await handle(engine, json.dumps(broken)) is Outcome.POISONED
    assert await handle(engine, body({"conversation": "not a key"}, "b-1")) is Outcome.POISONED

    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"], report["delivered"]) == ("done", 2, 1)
    [failure] = report["failures"]
    assert failure["target"] == second["to"]["conversation"]
    assert "reference" in failure["reason"]
    assert len(engine.queue.poisoned) == 2


async def test_a_fanout_stopped_after_queueing_a_page_counts_each_target_once(
    parts, fake_connector
):
    # The holder queued a page's children and stopped before its checkpoint said so; one
    # child then pruned its conversation. The next holder queues the page's keys again (as
    # written ahead), not a new listing without the pruned one, so the count stays exact
    # and the report is not `done` while a child is still queued.
    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2", "a:3", "a:4")
    engine.fanout_page_size = 2
    engine.fanout_seconds = 0
    fake_connector.script("POST", r"a%3A2/activities$", [Reply(403, json=GONE)])

    class StopsBeforeItsCheckpoint(MemoryLedger):
        stopped = False

        async def replace(self, name, data, etag, *, metadata=None):
            clearing = name.endswith("head.json") and data.get("page") and not data.get("pending")
            if clearing and not self.stopped:
                self.stopped = True
                raise StoreError("proactive ledger: unreachable (test: the holder stopped)")
            return await super().replace(name, data, etag, metadata=metadata)

    engine.ledger = StopsBeforeItsCheckpoint(clock=engine.clock)
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.REQUEUED
    queued = engine.queue.take()
    children = [text for text, _ in queued if json.loads(text)["to"].get("conversation")]
    [resumed] = [text for text, _ in queued if "broadcast" in json.loads(text)["to"]]
    for text in children:  # a:1 delivered, a:2 gone: pruned from the store
        await handle(engine, text)
    assert await runtime.references.get("msteams/a:2") is None

    assert await handle(engine, resumed) is Outcome.REQUEUED  # the page again, then page 2
    queued = engine.queue.take()
    keys = sorted(json.loads(text)["to"].get("conversation", "") for text, _ in queued)
    assert keys == ["", "msteams/a:1", "msteams/a:2", "msteams/a:3", "msteams/a:4"]
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"]) == ("running", 4)
    engine.queue.sent.extend(queued)
    await drain(engine)

    assert sorted(sends(fake_connector)) == ["a:1", "a:2", "a:3", "a:4"]
    report = await read_report(engine.ledger, "b-1")
    counts = {key: report[key] for key in ("state", "targets", "delivered", "pruned", "failed")}
    assert counts == {"state": "done", "targets": 4, "delivered": 3, "pruned": 1, "failed": 0}
    assert report["duplicate"] == 2
    assert not [name for name in engine.ledger.blobs if "/page/" in name]  # none left over


class Stopped(BaseException):
    """A holder's process stops: nothing after this point runs (not an Exception, so no
    handler in the engine sees it)."""


async def test_two_holders_of_one_page_never_lose_what_the_checkpoint_counted(
    parts, fake_connector
):
    # Holder A stalls past its claim after writing its page, B takes the claim over and
    # lists the page again after a conversation was removed, A's checkpoint lands first
    # (B's is refused), then A stops before queueing a child. The page the checkpoint
    # names must be A's, or a counted target is never queued and the report never ends.
    from shared.fanout import fan_out
    from shared.proactive_schema import parse_request

    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2", "a:3", "a:4")
    a_checkpoints, b_lists, a_puts, b_done = (asyncio.Event() for _ in range(4))

    class Interleaved(MemoryLedger):
        async def replace(self, name, data, etag, *, metadata=None):
            if name.endswith("head.json") and data.get("pending") and not a_checkpoints.is_set():
                a_checkpoints.set()
                await asyncio.wait_for(b_lists.wait(), 5)  # B has read the checkpoint
            return await super().replace(name, data, etag, metadata=metadata)

    class ListingB(MemoryReferenceStore):
        b = False

        async def list(self, **kwargs):
            if self.b:
                b_lists.set()
                await asyncio.wait_for(a_puts.wait(), 5)  # A's checkpoint has landed
            return await super().list(**kwargs)

    class StopsA(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            a_puts.set()
            await asyncio.wait_for(b_done.wait(), 5)
            raise Stopped()

    store = ListingB()
    for item in (await runtime.references.list()).items:
        await store.upsert(item.reference)
    runtime.references = store
    engine.ledger = Interleaved(clock=engine.clock)
    holders = []
    for queue in (StopsA(), MemoryQueue()):
        holder = Engine(runtime, engine.ledger, queue, clock=engine.clock, rand=lambda: 0)
        holder.fanout_page_size, holder.fanout_seconds = 2, 0
        holders.append(holder)
    text = body({"broadcast": {}}, "b-1")

    a = asyncio.create_task(fan_out(parse_request(text), holders[0]))
    await asyncio.wait_for(a_checkpoints.wait(), 5)  # A listed a:1, a:2 and wrote its page
    engine.clock.now += engine.claim_seconds + 5  # A stalled past its claim
    await store.delete("msteams/a:1")  # uninstalled meanwhile
    store.b = True
    assert await fan_out(parse_request(text), holders[1]) is Outcome.REQUEUED  # B refused
    store.b = False
    b_done.set()
    with pytest.raises(Stopped):
        await a
    assert holders[1].queue.sent == []  # B queued nothing: its checkpoint was refused

    engine.clock.now += engine.claim_seconds + 5  # the host redelivers the broadcast
    await handle(engine, text)
    await drain(engine)

    report = await read_report(engine.ledger, "b-1")
    counts = {key: report[key] for key in ("state", "targets", "delivered", "failed")}
    assert counts == {"state": "done", "targets": 4, "delivered": 3, "failed": 1}
    assert report["failures"][0]["target"] == "msteams/a:1"  # removed before it was sent
    assert sorted(sends(fake_connector)) == ["a:2", "a:3", "a:4"]


async def test_a_broadcast_fills_the_queue_to_its_backlog_then_follows_it_down(
    parts, fake_connector
):
    # A broadcast to many conversations does not put every child on the queue at once:
    # whatever is enqueued after it would wait behind all of them.
    runtime, engine = parts
    for i in range(11):
        await runtime.references.upsert(reference(fake_connector.url, f"a:n{i}", user=f"29:{i}"))
    engine.fanout_page_size = 2
    engine.fanout_backlog = 5

    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.REQUEUED
    queued = engine.queue.take()
    *children, (continuation, delay) = queued
    assert len(children) == 6  # pages of 2 until the queue held 5 or more
    assert json.loads(continuation)["to"] == {"broadcast": {}} and delay == 0

    # Come round while the children are still queued: nothing added, back later.
    engine.queue.sent.extend(children)
    assert await handle(engine, continuation) is Outcome.REQUEUED
    [(again, wait)] = engine.queue.sent[len(children) :]
    assert json.loads(again)["to"] == {"broadcast": {}} and wait >= 2.0
    assert not [n for n in engine.ledger.blobs if n.endswith("claim/fan-out.json")]

    # Behind the children once they are sent: the next pages, until everything is queued.
    most = 0
    for _ in range(50):
        sent = engine.queue.take()
        if not sent:
            break
        for text, _delay in sent:
            await handle(engine, text)
            most = max(most, len(engine.queue.sent))
    assert most <= engine.fanout_backlog + engine.fanout_page_size
    assert sorted(sends(fake_connector)) == sorted(["a:1", *(f"a:n{i}" for i in range(11))])
    report = await read_report(engine.ledger, "b-1")
    assert report["state"] == "done"
    assert report["targets"] == report["delivered"] == 12 and report["duplicate"] == 0


def hold_queue_full_for_days(engine: Engine) -> list[str]:
    """Messages delayed for days (`send_later`, a producer's `delay`: up to 7 days), as
    many as the fan-out's backlog: the queue's count includes them."""
    later = [body({"conversation": "a:1"}, f"later-{i}") for i in range(engine.fanout_backlog)]
    engine.queue.sent.extend((text, 6 * 24 * 3600.0) for text in later)
    return later


async def wait_until_fanned_out_more(engine: Engine, copy: str) -> float:
    """Handle the broadcast's copies, each after its delay, until one adds children: the
    seconds it waited."""
    count, waited = len(engine.queue.sent), 0.0
    for _ in range(200):
        await handle(engine, copy)
        if any(json.loads(t)[RESERVED].get("child") for t, _ in engine.queue.sent[count:]):
            return waited
        (copy, delay) = engine.queue.sent.pop()  # it comes back after its delay
        engine.clock.now += delay
        waited += delay
    raise AssertionError(f"still no child after {waited:.0f} s of waiting")


def children_of(engine: Engine, request_id: str) -> list[str]:
    """The queued children of one broadcast, as queued."""
    return [
        text
        for text, _ in engine.queue.sent
        if json.loads(text)["id"] == request_id and json.loads(text)[RESERVED].get("child")
    ]


def continuation_of(engine: Engine, request_id: str) -> str:
    [copy] = [
        text
        for text, _ in engine.queue.sent
        if json.loads(text)["id"] == request_id and "broadcast" in json.loads(text)["to"]
    ]
    engine.queue.sent = [(t, d) for t, d in engine.queue.sent if t != copy]
    return copy


async def test_messages_scheduled_days_ahead_do_not_hold_a_broadcast_back(parts, fake_connector):
    # They are not a backlog anyone works through: a broadcast that waited for the queue's
    # count to fall would wait until they come due (or crawl along a page at a time).
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)
    engine.fanout_page_size = 2
    engine.fanout_backlog = 3
    later = hold_queue_full_for_days(engine)

    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.REQUEUED
    # Its own backlog at once (pages of 2 until 3 or more of its own are queued).
    assert len(children_of(engine, "b-1")) == 4
    continuation = continuation_of(engine, "b-1")

    # While its own children are queued, it waits for them, however many others there are.
    assert await handle(engine, continuation) is Outcome.REQUEUED
    assert len(children_of(engine, "b-1")) == 4
    waiting, delay = engine.queue.sent[-1]
    assert "broadcast" in json.loads(waiting)["to"] and delay >= 2.0
    engine.queue.sent.pop()

    # Once they are delivered, it adds the rest; the delayed messages are still queued.
    for child in children_of(engine, "b-1"):
        engine.queue.sent.remove((child, 0.0))
        assert await handle(engine, child) is Outcome.DELIVERED
    assert await handle(engine, continuation) is Outcome.FANNED_OUT
    await drain_all_but(engine, later)
    assert sorted(sends(fake_connector)) == sorted(
        {"a:1", "19:chan-t1", "a:t2", "a:t1-other", "web-1"}
    )
    assert [text for text, _ in engine.queue.sent] == later
    report = await read_report(engine.ledger, "b-1")
    assert report["state"] == "done" and report["delivered"] == report["targets"] == 5


async def drain_all_but(engine: Engine, kept: list[str]) -> None:
    """Handle everything queued except `kept` (messages delayed for days), delays skipped."""
    for _ in range(100):
        due = [(t, d) for t, d in engine.queue.sent if t not in kept]
        if not due:
            return
        engine.queue.sent = [(t, d) for t, d in engine.queue.sent if t in kept]
        for text, _delay in due:
            await handle(engine, text)
    raise AssertionError("the queue never drained")


async def test_another_broadcasts_children_do_not_hold_a_broadcast_back(parts, fake_connector):
    # Two broadcasts at once (two tenants, say): each keeps a backlog of its own children
    # queued, so one tenant's pace does not set the other's.
    runtime, engine = parts
    for i in range(8):
        await runtime.references.upsert(reference(fake_connector.url, f"a:n{i}", user=f"29:{i}"))
    engine.fanout_page_size = 2
    engine.fanout_backlog = 4

    await handle(engine, body({"broadcast": {}}, "b-1"))
    first = children_of(engine, "b-1")
    assert len(first) == 4
    continuation_of(engine, "b-1")
    assert await handle(engine, body({"broadcast": {}}, "b-2")) is Outcome.REQUEUED
    assert len(children_of(engine, "b-2")) == 4  # not held back by b-1's four
    second = continuation_of(engine, "b-2")
    assert await handle(engine, second) is Outcome.REQUEUED  # but by its own four
    assert len(children_of(engine, "b-2")) == 4


async def test_a_broadcast_held_back_by_its_own_children_adds_a_page_of_matches_a_minute(
    parts, fake_connector
):
    # Its own children may stay queued for long (a tenant throttling them, a child the host
    # lost): the broadcast still adds a page's worth of matches a minute, and pages of the
    # store's listing that match nothing (`personal` is checked here) do not count.
    runtime, engine = parts
    for i in range(2):
        await runtime.references.upsert(reference(fake_connector.url, f"a:c{i}", personal=False))
    for i in range(6):
        await runtime.references.upsert(reference(fake_connector.url, f"a:p{i}", user=f"29:{i}"))
    await runtime.references.upsert(reference(fake_connector.url, "z:chan", personal=False))
    engine.fanout_page_size = 2
    engine.fanout_backlog = 2

    await handle(engine, body({"broadcast": {"personal": False}}, "b-1"))
    stuck = children_of(engine, "b-1")
    assert len(stuck) == 2  # never handled from here on
    copy = continuation_of(engine, "b-1")
    waited = await wait_until_fanned_out_more(engine, copy)
    assert 60 <= waited <= 120
    [child] = [json.loads(t) for t in children_of(engine, "b-1") if t not in stuck]
    assert child[RESERVED]["reference"]["conversation"]["id"] == "z:chan"


async def test_a_broadcast_of_sparse_pages_is_still_held_back_by_its_own_children(
    parts, fake_connector
):
    # A `personal` filter can leave each listed page a single match: the pages the
    # checkpoint remembers must still add up to a backlog, or a broadcast whose children
    # stay queued (a tenant throttling them) never finds its backlog and keeps adding.
    runtime, engine = parts
    for i in range(200):
        for n in (1, 2):
            await runtime.references.upsert(
                reference(fake_connector.url, f"a:{i:03d}-{n}", user=f"29:{i}-{n}")
            )
        await runtime.references.upsert(
            reference(fake_connector.url, f"a:{i:03d}-3", personal=False)
        )
    engine.fanout_page_size = 3  # each listed page: two personal chats and one channel
    engine.fanout_backlog = 80  # more than the pages the checkpoint keeps (64)

    copy = body({"broadcast": {"personal": False}}, "b-1")
    for _ in range(6):  # it comes round, none of its children handled meanwhile
        await handle(engine, copy)
        copy = continuation_of(engine, "b-1")
    assert len(children_of(engine, "b-1")) == engine.fanout_backlog


async def test_a_child_too_large_to_queue_does_not_mark_its_page_through(parts, fake_connector):
    # The last child of each page here is too large to queue: recorded failed at once. Were
    # that outcome taken as its page being through, the page's queued children would not
    # count, and the broadcast would add pages without end while the queue stays full.
    from shared.queues import MAX_REQUEST_BYTES

    runtime, engine = parts
    for i in range(8):
        await runtime.references.upsert(reference(fake_connector.url, f"a:{i:02d}", user="u"))
        long_id = f"a:{i:02d}-" + "c" * 600
        await runtime.references.upsert(reference(fake_connector.url, long_id, user="v"))
    engine.fanout_page_size = 2
    engine.fanout_backlog = 4
    later = hold_queue_full_for_days(engine)
    overhead = len(body({"broadcast": {}}, "b-1", text="").encode())
    copy = body({"broadcast": {}}, "b-1", text="x" * (MAX_REQUEST_BYTES - overhead - 100))

    for _ in range(4):  # it comes round, none of its children handled meanwhile
        await handle(engine, copy)
        copy = continuation_of(engine, "b-1")
    assert len(children_of(engine, "b-1")) == engine.fanout_backlog

    # Once they are delivered it goes on; every conversation ends with one outcome.
    await drain_all_but(engine, later)  # its children
    engine.queue.sent.append((copy, 0.0))
    await drain_all_but(engine, later)
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"], report["delivered"], report["failed"]) == (
        "done",
        17,
        9,
        8,
    )
    assert len(sends(fake_connector)) == 9


async def test_a_storage_outage_counting_its_own_children_keeps_the_broadcast(
    parts, fake_connector
):
    # Reading its pages' slots fails: the copy is kept and retried, as for any storage
    # failure (raised, it would spend the host's dequeues and be poisoned with no outcome).
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)
    engine.fanout_page_size = 2
    engine.fanout_backlog = 2
    later = hold_queue_full_for_days(engine)
    ledger = SlotReadOutage(clock=engine.clock)
    engine.ledger = ledger
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.REQUEUED
    continuation = continuation_of(engine, "b-1")
    children = children_of(engine, "b-1")
    assert len(children) == 2

    ledger.down = True
    assert await handle(engine, continuation) is Outcome.REQUEUED
    kept, delay = engine.queue.sent[-1]
    assert json.loads(kept)["to"] == {"broadcast": {}} and delay >= 5
    assert children_of(engine, "b-1") == children and engine.queue.poisoned == []

    ledger.down = False
    await drain_all_but(engine, later)
    assert sorted(sends(fake_connector)) == sorted(
        {"a:1", "19:chan-t1", "a:t2", "a:t1-other", "web-1"}
    )
    report = await read_report(engine.ledger, "b-1")
    assert report["state"] == "done" and report["delivered"] == report["targets"] == 5


class SlotReadOutage(MemoryLedger):
    """Reading a target's slot fails while `down` (an outage mid-way through a count)."""

    down = False

    async def read(self, name):
        from shared.references import StoreError

        if self.down and "/out/" in name:
            raise StoreError("proactive ledger: storage unreachable (test outage)")
        return await MemoryLedger.read(self, name)


async def test_the_checkpoint_stays_small_whatever_the_conversation_ids(parts, fake_connector):
    # Conversation ids are as long as the channel makes them (the store hashes long ones
    # in blob names): the checkpoint, read by every report, must not grow with them.
    runtime, engine = parts
    for i in range(70):
        long_id = f"19:{i:02d}" + "c" * 2_000
        await runtime.references.upsert(reference(fake_connector.url, long_id, personal=False))
    engine.fanout_page_size = 1
    engine.fanout_backlog = 63  # pages of one child are not merged: 64 of them kept

    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.REQUEUED
    await drain(engine)
    [head] = [blob for name, blob in engine.ledger.blobs.items() if name.endswith("head.json")]
    assert len(json.loads(head[0])["pages"]) == 64
    assert len(head[0]) < 16_000  # 64 long ids would be 128 kB
    report = await read_report(engine.ledger, "b-1")
    assert report["state"] == "done" and report["delivered"] == report["targets"] == 71


async def test_a_queue_that_cannot_tell_its_depth_does_not_stop_a_broadcast(parts, fake_connector):
    runtime, engine = parts
    await store_many(runtime, fake_connector.url)

    class Unknown(MemoryQueue):
        async def depth(self):
            return None  # the service could not say

    engine.queue = Unknown()
    engine.fanout_backlog = 1
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
    await drain(engine)
    assert len(sends(fake_connector)) == 5


async def test_a_broadcast_child_that_is_gone_is_pruned_and_reported(parts, fake_connector):
    runtime, engine = parts
    fake_connector.script("POST", r"a%3A1/activities$", [Reply(403, json=GONE)])
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    await handle(engine, body({"broadcast": {}}, "b-1"))
    await drain(engine)
    report = await read_report(engine.ledger, "b-1")
    assert (report["targets"], report["delivered"], report["pruned"]) == (2, 1, 1)
    assert await runtime.references.get("msteams/a:1") is None


async def test_a_resubmitted_broadcast_is_not_fanned_out_again(parts, fake_connector):
    _runtime, engine = parts
    await handle(engine, body({"broadcast": {}}, "b-1"))
    await drain(engine)
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.DUPLICATE
    assert engine.queue.sent == []
    assert sends(fake_connector) == ["a:1"]


async def test_an_operator_puts_a_poison_copy_back_to_retry_a_failed_target(parts, fake_connector):
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [copy] = engine.queue.poisoned

    # Checked the conversation, decided it was not posted: the copy goes back as it is.
    assert await handle(engine, json.dumps(copy)) is Outcome.DELIVERED
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"], report["state"]) == (1, 0, "done")
    # A delivered target is never sent again, poison copy or not.
    assert await handle(engine, json.dumps(copy)) is Outcome.DUPLICATE
    assert len(sends(fake_connector)) == 2  # the 500 and the retry


async def test_an_operators_retry_whose_claim_was_written_with_its_answer_lost_is_sent(
    parts, fake_connector
):
    # Storage took the retry's claim over the failure and its answer was lost (the
    # client's retry found the ETag changed): taken for another instance's claim, the
    # retry was counted a duplicate and the slot kept a claim nobody settled: the report
    # lost its failure and read `running` for ever, and nothing was sent.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [copy] = engine.queue.poisoned

    class ClaimAnswerLost(MemoryLedger):
        lost = 0

        async def replace(self, name, data, etag, *, metadata=None):
            written = await super().replace(name, data, etag, metadata=metadata)
            if written is not None and "/out/" in name and "owner" in data and not self.lost:
                self.lost += 1
                return None
            return written

    ledger = ClaimAnswerLost(clock=engine.clock)
    ledger.blobs, ledger._version = engine.ledger.blobs, engine.ledger._version
    engine.ledger = ledger

    assert await handle(engine, json.dumps(copy)) is Outcome.DELIVERED
    assert ledger.lost == 1
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"], report["state"]) == (1, 0, "done")
    assert len(sends(fake_connector)) == 2  # the 500 and the retry


def at_the_size_limit(request_id: str = "req-1") -> str:
    """A request as large as a producer may send (MAX_REQUEST_BYTES as JSON)."""
    from shared.proactive_schema import request_bytes
    from shared.queues import MAX_REQUEST_BYTES

    message = json.loads(body({"conversation": "msteams/a:1"}, request_id, text=""))
    message["text"] = "x" * (MAX_REQUEST_BYTES - request_bytes(message))
    assert request_bytes(message) == MAX_REQUEST_BYTES
    return json.dumps(message, separators=(",", ":"))


async def test_an_operators_retry_at_the_size_limit_with_a_long_note_is_requeued_as_told(
    parts, fake_connector
):
    # The operator's note in `poisonReason` took up the room the engine's bookkeeping
    # needs: the throttled copy could not be queued (the put raised, the host redelivered
    # at once, Retry-After never applied, then the host poisoned it).
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES

    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "5"})
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops"), throttled])
    assert await handle(engine, at_the_size_limit()) is Outcome.FAILED
    [copy] = engine.queue.poisoned
    copy["poisonReason"] = "checked with the user: not posted; " + "n" * 420
    retry = json.dumps(copy, separators=(",", ":"))
    assert len(retry.encode()) <= MAX_QUEUE_MESSAGE_BYTES
    engine.message_id = "9f0c3a52-0d1e-4c8b-9a55-2f7d3e1b6c40"  # as the host names them

    assert await handle(engine, retry) is Outcome.REQUEUED

    [(text, delay)] = engine.queue.sent
    assert len(text.encode()) <= MAX_QUEUE_MESSAGE_BYTES and delay >= 5
    requeued = json.loads(text)
    assert requeued["_proactive"]["retryOf"] == engine.message_id
    assert requeued["poisonReason"].startswith("checked with the user: not posted; nnn")
    engine.message_id = None
    engine.clock.now += 10  # the copy comes back after its delay, the tenant's wait over
    await drain(engine)
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"], report["state"]) == (1, 0, "done")
    assert len(sends(fake_connector)) == 3  # the 500, the 429, the retry's send


async def test_a_retry_at_the_size_limit_held_for_the_settings_keeps_its_marks():
    # Too large with its bookkeeping, the held copy went back as it came: no `retryOf` and
    # no `claimedBy`, so back under a new message id it retried the failure its own retry
    # had recorded, and sent again a message that may have been posted.
    from shared.holding import hold_for_settings
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES

    queue = MemoryQueue()
    retry = {**json.loads(at_the_size_limit()), "poisonReason": "note " + "n" * 450}
    operator_id = "9f0c3a52-0d1e-4c8b-9a55-2f7d3e1b6c40"

    await hold_for_settings(
        json.dumps(retry, separators=(",", ":")),
        RuntimeError("x"),
        queue=queue,
        redelivered=operator_id,
    )

    [(held, _)] = queue.take()
    assert len(held.encode()) <= MAX_QUEUE_MESSAGE_BYTES
    marks = json.loads(held)[RESERVED]
    assert marks["claimedBy"] == operator_id and marks["retryOf"] == operator_id


async def test_a_broadcast_child_removed_after_the_listing_is_left_to_the_channel(
    parts, fake_connector
):
    # A child carries the reference the fan-out listed, so the send reads nothing from the
    # store. A conversation uninstalled meanwhile is the channel's to refuse (403), and is
    # then reported pruned, not failed and not poisoned.
    runtime, engine = parts
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
    await runtime.references.delete("msteams/a:2")  # uninstalled meanwhile
    fake_connector.script("POST", r"a%3A2/activities$", [Reply(403, json=GONE)])
    await drain(engine)
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["pruned"]) == ("done", 1, 1)
    assert report["failed"] == 0 and engine.queue.poisoned == []
    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]


async def test_a_throttled_child_is_retried_with_the_conversations_current_reference(
    aad_app, fake_connector
):
    # A child carries the reference listed at fan-out time; a 429 can put it back for up
    # to an hour, by when the conversation may have moved (a new serviceUrl) or gone.
    with FakeConnector() as moved_to:
        trusted = f"{fake_connector.url},{moved_to.url}"
        settings = aad_app.settings(BOT_TRUSTED_SERVICE_URLS=trusted)
        store = MemoryReferenceStore()
        for key, user in (("a:1", "29:a"), ("a:2", "29:b")):
            await store.upsert(reference(fake_connector.url, key, user=user))
        clock = Clock()
        runtime = make_runtime(settings, store, clock)
        engine = Engine(
            runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, rand=lambda: 0
        )
        try:
            throttled = Reply(
                429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "30"}
            )
            fake_connector.script("POST", r"/activities$", [throttled] * 8)
            assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
            for text, _delay in engine.queue.take():
                assert await handle(engine, text) is Outcome.REQUEUED
            retries = engine.queue.take()
            assert len(retries) == 2
            assert all("reference" not in json.loads(t)[RESERVED] for t, _ in retries)

            # Meanwhile a:1 moved to another serviceUrl and a:2 was uninstalled.
            await store.upsert(reference(moved_to.url, "a:1", user="29:a"))
            await store.delete("msteams/a:2")
            clock.now += 30  # the copies come back after the Retry-After
            for text, _delay in retries:
                await handle(engine, text)
            assert sends(moved_to) == ["a:1"]
            report = await read_report(engine.ledger, "b-1")
            assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 1)
            assert "removed from the store" in report["failures"][0]["reason"]
        finally:
            await runtime.close()


def child(key: str, carried: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": "b-1",
            "to": {"conversation": key},
            "text": "hi",
            "_proactive": {"child": True, "reference": carried},
        }
    )


async def test_a_child_carrying_another_conversations_reference_is_poisoned_unsent(
    parts, fake_connector
):
    _runtime, engine = parts
    other = reference(fake_connector.url, "a:other")
    assert await handle(engine, child("msteams/a:1", other)) is Outcome.POISONED
    [poisoned] = engine.queue.poisoned
    assert "_proactive.reference" in poisoned["poisonReason"]
    assert sends(fake_connector) == []


async def test_a_child_carrying_an_untrusted_service_url_sends_nothing_there(parts, fake_connector):
    # Whoever can write to the queue gains nothing over a `reference` target: the trusted
    # serviceUrls decide where the bot's token goes.
    _runtime, engine = parts
    with FakeConnector() as attacker:
        forged = reference(attacker.url, "a:1")
        assert await handle(engine, child("msteams/a:1", forged)) is Outcome.FAILED
        assert attacker.requests == []
    report = await read_report(engine.ledger, "b-1")
    assert report["failed"] == 1 and "not trusted" in report["failures"][0]["reason"]
    assert sends(fake_connector) == []


async def test_a_broadcast_child_costs_two_bookkeeping_writes_and_no_reads(parts, fake_connector):
    # Claim the target's slot (create-only), send, settle it with the outcome (If-Match):
    # no outcome read, no reference read, no claim left behind to delete.
    runtime, engine = parts
    calls: list[str] = []

    class Counting(MemoryLedger):
        async def create(self, name, data, *, metadata=None):
            calls.append("create")
            return await MemoryLedger.create(self, name, data, metadata=metadata)

        async def read(self, name):
            calls.append("read")
            return await MemoryLedger.read(self, name)

        async def replace(self, name, data, etag, *, metadata=None):
            calls.append("replace")
            return await MemoryLedger.replace(self, name, data, etag, metadata=metadata)

        async def delete(self, name, etag=None):
            calls.append("delete")
            return await MemoryLedger.delete(self, name, etag)

    engine.ledger = Counting(clock=engine.clock)
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
    [(text, _)] = engine.queue.take()
    await runtime.references.delete("msteams/a:1")  # the send does not need the store
    calls.clear()
    assert await handle(engine, text) is Outcome.DELIVERED
    assert calls == ["create", "replace"]
    assert sends(fake_connector) == ["a:1"]
    prefix = request_prefix("b-1")
    names = [n[len(prefix) :] for n in engine.ledger.blobs if n.startswith(prefix)]
    assert sorted(names) == ["head.json", outcome_name("b-1", "msteams/a:1")[len(prefix) :]]
    assert await handle(engine, text) is Outcome.DUPLICATE  # a redelivery sends nothing
    assert sends(fake_connector) == ["a:1"]


async def test_a_report_counts_a_claimed_target_as_running(parts, fake_connector):
    _runtime, engine = parts
    from shared.idempotency import Claim, take_claim

    await ensure_head(engine.ledger, "req-1", "single", engine.clock.now)
    claim = await take_claim(
        engine.ledger, outcome_name("req-1", "target"), engine.clock.now, seconds=45.0
    )
    assert isinstance(claim, Claim)
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("running", 0, 0)


class OutcomeAnswerLost(MemoryLedger):
    """Storage takes the write of an outcome and its answer is lost: the client's retry
    finds the ETag changed (412) and the ledger answers None, as BlobLedger does."""

    lost = 0

    async def replace(self, name, data, etag, *, metadata=None):
        written = await MemoryLedger.replace(self, name, data, etag, metadata=metadata)
        if written is not None and "/out/" in name and "outcome" in data and not self.lost:
            self.lost += 1
            return None
        return written


async def test_a_failure_recorded_with_its_answer_lost_still_gets_its_poison_copy(
    parts, fake_connector
):
    # Read as another copy's outcome, it got none: the report said failed, and the
    # operator had no copy to put back.
    _runtime, engine = parts
    engine.ledger = OutcomeAnswerLost(clock=engine.clock)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    assert engine.ledger.lost == 1
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert len(engine.queue.poisoned) == 1


async def test_another_messages_failure_with_the_same_reason_is_not_taken_for_this_ones(
    parts, fake_connector
):
    # Its claim taken over while it was sending, message A met B's failure (the same
    # 500, the same reason) in the slot: read as its own, it put a second poison copy.
    runtime, engine = parts
    from shared.idempotency import replace_with_claim

    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 2)
    name = outcome_name("req-1", "target")
    taken: list[Outcome] = []

    class TakenOverAndFailedFirst(MemoryLedger):
        async def replace(self, name_, data, etag, *, metadata=None):
            if name_ == name and "outcome" in data and not taken:
                taken.append(Outcome.REQUEUED)  # once: B's own write is not held
                current = await self.read(name)
                later = engine.clock.now + engine.claim_seconds + 1
                claim = await replace_with_claim(
                    self, name, current.etag, later, seconds=45, message="B"
                )
                b_data = {**data, "message": "B"}
                await MemoryLedger.replace(self, name_, b_data, claim, metadata=metadata)
            return await MemoryLedger.replace(self, name_, data, etag, metadata=metadata)

    engine.ledger = TakenOverAndFailedFirst(clock=engine.clock)
    text = body({"conversation": "msteams/a:1"})
    outcome = await handle_queue_message(text, runtime, engine=engine, message_id="A")
    assert outcome is Outcome.DUPLICATE
    assert engine.queue.poisoned == []  # B's failure has B's poison copy, not A's too
    assert (await engine.ledger.read(name)).data["message"] == "B"


async def test_a_failure_does_not_replace_the_live_claim_of_an_instance_that_took_over(
    parts, fake_connector
):
    # This instance stalled past its claim; another took the target over and is sending.
    # The stalled one's failure (here a 500) must not settle the slot under it: the report
    # would say failed for a target the other instance delivers.
    _runtime, engine = parts
    from shared.idempotency import replace_with_claim
    from shared.reports import record_outcome

    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    name = outcome_name("req-1", "target")
    taken: list[str] = []

    class TakenOverBeforeTheFailureLands(MemoryLedger):
        async def replace(self, name_, data, etag, *, metadata=None):
            if name_ == name and "outcome" in data and not taken:
                current = await self.read(name)
                later = engine.clock.now + engine.claim_seconds + 1
                taken.append(await replace_with_claim(self, name, current.etag, later, seconds=45))
            return await MemoryLedger.replace(self, name_, data, etag, metadata=metadata)

    engine.ledger = TakenOverBeforeTheFailureLands(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.DUPLICATE
    # Not this copy's failure: no poison copy of a target the other instance delivers.
    assert engine.queue.poisoned == []
    slot = await engine.ledger.read(name)
    assert slot.etag == taken[0] and "outcome" not in slot.data  # still the other's claim

    # The instance that took over delivers, and its outcome is what the report shows.
    assert await record_outcome(
        engine.ledger, "req-1", "target", "delivered", engine.clock.now, claim_etag=taken[0]
    )
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)


async def test_a_broadcast_child_too_large_to_carry_its_reference_reads_it_from_the_store(
    parts, fake_connector
):
    runtime, engine = parts
    from shared.queues import MAX_REQUEST_BYTES

    await runtime.references.delete("msteams/a:1")
    large = reference(fake_connector.url, "a:2", user="29:b")
    large["user"]["name"] = "n" * (MAX_REQUEST_BYTES // 2)
    await runtime.references.upsert(large)
    text = {"id": "b-1", "to": {"broadcast": {}}, "text": "t" * (MAX_REQUEST_BYTES // 2)}
    assert await handle(engine, json.dumps(text)) is Outcome.FANNED_OUT
    [(child, _)] = engine.queue.take()
    assert json.loads(child)["_proactive"] == {"child": True}
    engine.queue.sent.append((child, 0.0))
    await runtime.references.delete("msteams/a:2")  # uninstalled meanwhile
    await drain(engine)
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 0, 1)
    assert "removed from the store" in report["failures"][0]["reason"]
    assert sends(fake_connector) == [] and engine.queue.poisoned == []


# --- unusable app settings -----------------------------------------------------------------


async def test_unusable_settings_keep_the_message_with_a_backoff(
    monkeypatch, azurite, unique_name, caplog
):
    # A settings mistake (here: no MicrosoftAppId) must not drain the queue into poison.
    from azure.storage.queue import QueueClient

    import app
    from shared.config import reset_settings
    from shared.proactive import process_queue_message
    from shared.runtime import reset_runtime
    from shared.storage import close_shared_clients

    queue = unique_name("held")
    for name in ("MicrosoftAppId", "MicrosoftAppPassword", "BOT_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    monkeypatch.setenv("BOT_PROACTIVE_QUEUE", queue)
    monkeypatch.chdir(os.path.dirname(__file__))  # no local.settings.json here
    reset_settings()
    reset_runtime()
    try:
        text = body({"conversation": "msteams/a:1"})
        assert await process_queue_message(text, app.runtime) is Outcome.REQUEUED
    finally:
        reset_settings()
        reset_runtime()
        await close_shared_clients()
    assert "MicrosoftAppId" in caplog.text
    client = QueueClient.from_connection_string(azurite.connection_string, queue)
    try:
        assert client.get_queue_properties().approximate_message_count == 1
        assert client.peek_messages() == []  # hidden for the backoff
    finally:
        client.close()


async def test_a_held_message_counts_its_attempts_and_backs_off():
    from shared.holding import hold_for_settings

    queue = MemoryQueue()
    # A message throttled for a while before the settings broke: the hold clears its age.
    text = json.dumps({**json.loads(body({"conversation": "msteams/a:1"})), RESERVED: {"since": 5}})
    for expected in (1, 2, 3):
        await hold_for_settings(text, RuntimeError("MicrosoftAppId is required"), queue=queue)
        [(text, delay)] = queue.take()
        assert json.loads(text)["_proactive"]["attempt"] == expected
        assert json.loads(text)["_proactive"]["since"] is None
        assert 5 * 3 ** (expected - 1) <= delay <= 5 * 3 ** (expected - 1) * 1.2
    assert "claimedBy" not in json.loads(text)[RESERVED]
    # A redelivery (its earlier attempt may have kept the target's claim): the held copy
    # goes on as that message, as a copy kept for storage does; held again, still so.
    for message_id in ("m-1", "h-1"):
        await hold_for_settings(text, RuntimeError("x"), queue=queue, redelivered=message_id)
        [(text, _)] = queue.take()
        assert json.loads(text)[RESERVED]["claimedBy"] == "m-1"
    # An operator's retry of that copy (a poisonReason added) is a message of its own.
    retry = json.dumps({**json.loads(text), "poisonReason": "retry"})
    kept = json.loads(retry)
    kept[RESERVED] = {**kept[RESERVED], "outcome": "failed", "reason": "500"}  # one kept
    for message, message_id, marks in (
        (retry, "op-1", {"claimedBy": "op-1", "claimedRetry": True}),
        (retry, None, {}),
        (json.dumps(kept), "op-1", {"claimedBy": "op-1", "claimedRetry": True}),
    ):
        await hold_for_settings(message, RuntimeError("x"), queue=queue, redelivered=message_id)
        [(held, _)] = queue.take()
        held_marks = json.loads(held)[RESERVED]
        assert {k: v for k, v in held_marks.items() if k.startswith("claimed")} == marks
    await hold_for_settings("not json", RuntimeError("x"), queue=queue)
    [(raw, delay)] = queue.take()
    assert raw == "not json"  # kept (it is poisoned, and reported, once the settings work)
    assert delay >= 600  # with no count of its own, held for the longest wait
    # Not UTF-8: held as text, it read as a valid request with U+FFFD in its text, sent
    # once the settings worked. Refused at once, as the engine refuses it.
    mangled = b'{"id": "r", "to": {"conversation": "msteams/a:1"}, "text": "pay \xff\xfe now"}'
    assert await hold_for_settings(mangled, RuntimeError("x"), queue=queue) is Outcome.POISONED
    assert queue.take() == []
    [poisoned] = queue.poisoned
    assert poisoned["poisonReason"] == "invalid request: the message is not JSON"
    # UTF-16 JSON, which the engine reads: held as the request it is, not as mangled text,
    # and one the engine refuses is held as its JSON, to be reported under its id.
    utf16 = body({"conversation": "msteams/a:1"}, "r-16").encode("utf-16")
    await hold_for_settings(utf16, RuntimeError("x"), queue=queue)
    [(held, _delay)] = queue.take()
    assert json.loads(held)["id"] == "r-16" and json.loads(held)["text"] == "hello"
    refused16 = json.dumps({**json.loads(body({"conversation": "msteams/a:1"})), "bogus": 1})
    await hold_for_settings(refused16.encode("utf-16"), RuntimeError("x"), queue=queue)
    [(held, delay)] = queue.take()
    assert json.loads(held) == json.loads(refused16) and delay >= 600
    assert len(queue.poisoned) == 1  # only the one that is not JSON at all
    # In UTF-16 it fitted a queue message; written as UTF-8 it would not: refused now (the
    # put failed on every redelivery, and the host poisoned it with no reason).
    request = {**json.loads(body({"conversation": "msteams/a:1"})), "text": "字" * 20_000}
    wide = json.dumps(request, ensure_ascii=False)
    for large in (wide, json.dumps({**request, "bogus": 1}, ensure_ascii=False)):
        outcome = await hold_for_settings(large.encode("utf-16"), RuntimeError("x"), queue=queue)
        assert outcome is Outcome.POISONED and queue.take() == []
    assert [p["poisonReason"] for p in queue.poisoned[1:]] == [
        "invalid request: larger than 48640 bytes as JSON",
        "invalid request: unknown field `bogus`",
    ]
    # Its poison copy, too large even unchanged once written as UTF-8, keeps what fits.
    assert queue.poisoned[1]["bodyCut"] is True
    assert queue.poisoned[1]["body"].startswith('{"id":"req-1"')
    # A UTF-8 request that fits as it came but not with the hold's bookkeeping is kept as
    # it came (the engine judges it once the settings work), not poisoned.
    request = json.loads(body({"conversation": "msteams/a:1"}))
    room = MAX_QUEUE_MESSAGE_BYTES - len(compact_json({**request, "text": ""})) - 10
    near = compact_json({**request, "text": "a" * room})
    assert await hold_for_settings(near.encode(), RuntimeError("x"), queue=queue) is (
        Outcome.REQUEUED
    )
    [(held, delay)] = queue.take()
    assert held == near and delay >= 600 and len(queue.poisoned) == 3
    # A request the engine refuses stays as it came: the hold does not make it valid.
    refused = json.dumps(
        {**json.loads(body({"conversation": "msteams/a:1"})), RESERVED: {"attempt": "3"}}
    )
    await hold_for_settings(refused, RuntimeError("x"), queue=queue)
    [(raw, delay)] = queue.take()
    assert raw == refused and delay >= 600


async def test_an_unreachable_login_authority_never_ages_the_message_out(aad_app, fake_connector):
    store = MemoryReferenceStore()
    await store.upsert(reference(fake_connector.url, "a:1"))
    settings = aad_app.settings(
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url, BOT_LOGIN_AUTHORITY="https://127.0.0.1:9"
    )
    clock = Clock()
    runtime = make_runtime(settings, store, clock)
    engine = Engine(runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, max_age=0)
    try:
        # Requeued three times already, and older than any age bound.
        requeued = {"attempt": 3, "since": 0.0}
        text = json.dumps(
            {**json.loads(body({"conversation": "msteams/a:1"})), "_proactive": requeued}
        )
        assert await handle(engine, text) is Outcome.REQUEUED
    finally:
        await runtime.close()
    assert engine.queue.poisoned == [] and fake_connector.requests == []
    [(_, delay)] = engine.queue.take()
    assert 135 <= delay <= 135 * 1.2 + 1


async def test_an_invalid_container_setting_keeps_the_message_instead_of_failing_the_trigger(
    monkeypatch, azurite, unique_name, caplog
):
    # The container setting is also what a producer's settings validate: holding the
    # message must need only the storage connection and the queue name, or the host
    # redelivers it until it poisons it.
    from azure.storage.queue import QueueClient

    import app
    from shared.config import reset_settings
    from shared.proactive import process_queue_message
    from shared.runtime import reset_runtime
    from shared.storage import close_shared_clients

    queue = unique_name("held")
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    monkeypatch.setenv("BOT_PROACTIVE_QUEUE", queue)
    monkeypatch.setenv("BOT_REFERENCES_CONTAINER", "Not_A_Container!")
    monkeypatch.setenv("BOT_ALLOW_UNAUTHENTICATED", "true")  # the container is what is wrong
    monkeypatch.chdir(os.path.dirname(__file__))  # no local.settings.json here
    reset_settings()
    reset_runtime()
    try:
        assert await process_queue_message(body({"conversation": "msteams/a:1"}), app.runtime) is (
            Outcome.REQUEUED
        )
    finally:
        reset_settings()
        reset_runtime()
        await close_shared_clients()
    assert "BOT_REFERENCES_CONTAINER" in caplog.text
    client = QueueClient.from_connection_string(azurite.connection_string, queue)
    try:
        assert client.get_queue_properties().approximate_message_count == 1
    finally:
        client.close()


# --- storage outages ---------------------------------------------------------------------


class OutageLedger(MemoryLedger):
    """The in-memory ledger with a switch for a storage outage (a real one cannot be
    started and stopped per call here; test_storage_down covers Azurite going away)."""

    down = False

    async def create(self, name, data, *, metadata=None):
        self._check()
        return await MemoryLedger.create(self, name, data, metadata=metadata)

    async def read(self, name):
        self._check()
        return await MemoryLedger.read(self, name)

    def _check(self) -> None:
        from shared.references import StoreError

        if self.down:
            raise StoreError("proactive ledger: storage unreachable (test outage)")


async def test_a_storage_outage_longer_than_the_dequeue_budget_loses_no_broadcast_child(
    parts, fake_connector
):
    # Each raise costs one of the host's five dequeues; the host then poisons the child
    # itself, with no outcome recorded, and the broadcast never reaches `done`.
    runtime, engine = parts
    engine.ledger = OutageLedger(clock=engine.clock)
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
    [first, second] = engine.queue.take()

    engine.ledger.down = True
    text = first[0]
    for _ in range(8):  # longer than maxDequeueCount
        assert await handle(engine, text) is Outcome.REQUEUED
        [(text, delay)] = engine.queue.take()
        assert delay >= 5
    engine.ledger.down = False
    engine.queue.sent.extend([(text, 0.0), second])
    await drain(engine)

    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]
    assert engine.queue.poisoned == []
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["targets"]) == ("done", 2, 2)


async def test_a_storage_outage_still_raises_when_the_queue_is_down_too(parts):
    # Nothing could hold the message: the host's redelivery is the only way left.
    from shared.references import StoreError

    _runtime, engine = parts
    engine.ledger = OutageLedger(clock=engine.clock)
    engine.ledger.down = True

    class DownQueue(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            raise OSError("queue unreachable (test outage)")

    engine.queue = DownQueue()
    with pytest.raises(StoreError):
        await handle(engine, body({"conversation": "msteams/a:1"}))


# --- bounds: message size, Retry-After beyond the age bound ---------------------------------


async def test_a_request_too_large_for_the_engines_copies_is_refused_at_once(parts, fake_connector):
    # It fits a queue message, but the copy the engine puts back (with its `_proactive`
    # field) would not: the put would raise on every throttle until the host poisons it,
    # unreported. The producer refuses such requests; the engine must too.
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES

    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "1"})
    fake_connector.script("POST", r"/activities$", [throttled] * 2)
    text = body({"conversation": "msteams/a:1"}, text="x" * (MAX_QUEUE_MESSAGE_BYTES - 80))
    assert len(text.encode()) <= MAX_QUEUE_MESSAGE_BYTES

    assert await handle(engine, text) is Outcome.POISONED

    assert engine.queue.sent == [] and sends(fake_connector) == []
    [poisoned] = engine.queue.poisoned  # the request as it was: with a reason it would not fit
    assert poisoned["id"] == "req-1"
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "larger than" in report["failures"][0]["reason"]


@pytest.mark.parametrize(
    ("max_age", "retry_after"),
    [
        (600, "3600"),
        # The default bound: a Retry-After of 2 hours reads as the hour it is capped at, and
        # was requeued for that hour (the copy then failed, or met another 429).
        (3600, "7200"),
        (3600, "3600"),
    ],
)
async def test_a_retry_after_beyond_the_age_bound_fails_now_instead_of_waiting_past_it(
    parts, fake_connector, max_age, retry_after
):
    _runtime, engine = parts
    engine.max_age = max_age
    throttled = Reply(
        429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": retry_after}
    )
    fake_connector.script("POST", r"/activities$", [throttled] * 2)

    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED

    assert engine.queue.sent == []
    [poisoned] = engine.queue.poisoned
    assert "3600" in poisoned["poisonReason"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)


async def test_a_broadcast_child_too_large_for_a_queue_message_is_reported_not_raised(
    parts, fake_connector
):
    # The broadcast fits; its child for a conversation with a long id would not (the key
    # replaces the filter). Raising would stop the fan-out on every attempt.
    from shared.queues import MAX_REQUEST_BYTES

    runtime, engine = parts
    long_id = "19:" + "c" * 600 + "@thread.tacv2"
    await runtime.references.upsert(reference(fake_connector.url, long_id, personal=False))
    overhead = len(body({"broadcast": {}}, "b-1", text="").encode())
    text = body({"broadcast": {}}, "b-1", text="x" * (MAX_REQUEST_BYTES - overhead - 100))

    assert await handle(engine, text) is Outcome.FANNED_OUT
    await drain(engine)

    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"], report["delivered"], report["failed"]) == (
        "done",
        2,
        1,
        1,
    )
    assert "larger than" in report["failures"][0]["reason"]


async def test_a_claim_mostly_spent_on_slow_storage_is_not_used_for_a_send(parts, fake_connector):
    # The claim is what keeps a second instance off the target. When the bookkeeping
    # before the send took most of it, the send (its own retries up to the Connector
    # budget) could outlive it and another instance would send too.
    _runtime, engine = parts
    clock = engine.clock

    class SlowLedger(MemoryLedger):
        """Claims take 30 s to write (a storage brownout, played on the test clock)."""

        async def create(self, name, data, *, metadata=None):
            if "/out/" in name:
                clock.now += 30
            return await MemoryLedger.create(self, name, data, metadata=metadata)

    engine.ledger = SlowLedger(clock=clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    assert sends(fake_connector) == []
    assert not any("/out/" in name for name in engine.ledger.blobs)  # released
    [(copy, _)] = engine.queue.take()

    engine.ledger = MemoryLedger(clock=clock)  # storage is quick again
    assert await handle(engine, copy) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]


async def test_a_send_is_started_only_while_its_claim_outlasts_the_write_that_settles_it(
    parts, fake_connector, monkeypatch
):
    # Slow storage throughout, played on the test clock: the reference read took 20 s of
    # the 45 s claim, the Connector answered after 10 s and the settling write took 16 s.
    # Started with half its claim left, the send was settled after the claim had ended,
    # when a second copy of the same request (its id sent again) had taken it over: both
    # sent. The send needs 12 s (the Connector's budget) + 15 s (the write) + 3 s left.
    runtime, engine = parts
    clock, store, text = engine.clock, runtime.references, body({"conversation": "msteams/a:1"})
    brownout, settled, other = [True], [], []
    get = store.get

    async def slow_get(key):
        if brownout[0]:
            clock.now += 20
        return await get(key)

    async def slow_post(*args, **kwargs):
        clock.now += 10
        return await post(*args, **kwargs)

    class SlowSettle(MemoryLedger):
        async def replace(self, name, data, etag, *, metadata=None):
            if "/out/" in name and "outcome" in data and not settled:
                settled.append(name)  # once: the other copy's own write is not slowed
                clock.now += 16
                other.append(
                    await handle_queue_message(text, runtime, engine=engine, message_id="msg-B")
                )
            return await MemoryLedger.replace(self, name, data, etag, metadata=metadata)

    post = proactive.post
    monkeypatch.setattr(proactive, "post", slow_post)
    store.get = slow_get
    engine.ledger = SlowSettle(clock=clock)
    outcome = await handle_queue_message(text, runtime, engine=engine, message_id="msg-A")
    assert sends(fake_connector) == []  # put back, its claim released
    assert outcome is Outcome.REQUEUED and other == []
    assert not any("/out/" in name for name in engine.ledger.blobs)
    [(copy, _)] = engine.queue.take()

    brownout[0] = False  # the reference read is quick again; the rest stays slow
    outcome = await handle_queue_message(copy, runtime, engine=engine, message_id="msg-A2")
    assert outcome is Outcome.DELIVERED
    assert other == [Outcome.REQUEUED]  # the claim still held the other copy off
    [(again, _)] = engine.queue.take()
    outcome = await handle_queue_message(again, runtime, engine=engine, message_id="msg-B")
    assert outcome is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1"]


class SlowClaims(MemoryLedger):
    """Each claim's create takes `seconds` on the test clock (a storage brownout)."""

    seconds = 0.0

    async def create(self, name, data, *, metadata=None):
        if "/out/" in name:
            self.clock.now += self.seconds
        return await MemoryLedger.create(self, name, data, metadata=metadata)


@pytest.mark.parametrize(("spent", "sent"), [(15.0, True), (15.01, False)])
async def test_a_send_starts_with_30_seconds_of_its_claim_left_and_not_less(
    parts, fake_connector, spent, sent
):
    # 12 s for the send with its retries, 15 s for the write that settles it, 3 s for the
    # instances' clocks: of a 45 s claim, 15 s may go before the send, not more.
    _runtime, engine = parts
    engine.ledger = SlowClaims(clock=engine.clock)
    engine.ledger.seconds = spent
    outcome = await handle(engine, body({"conversation": "msteams/a:1"}))
    assert (outcome, sends(fake_connector)) == (
        (Outcome.DELIVERED, ["a:1"]) if sent else (Outcome.REQUEUED, [])
    )


async def test_storage_too_slow_to_start_a_send_backs_off_then_fails_it_at_the_age_bound(
    parts, fake_connector
):
    # Each claim's create took 16 s, its whole claim less 29 s: every copy was put back a
    # second later, for ever, three storage calls a time (never delivered, never failed).
    _runtime, engine = parts
    engine.ledger = SlowClaims(clock=engine.clock)
    engine.ledger.seconds = 16.0
    text, delays, outcome = body({"conversation": "msteams/a:1"}), [], Outcome.REQUEUED
    while outcome is Outcome.REQUEUED and len(delays) < 1000:
        outcome = await handle(engine, text)
        if outcome is Outcome.REQUEUED:
            [(text, delay)] = engine.queue.take()
            delays.append(delay)
            engine.clock.now += delay
    assert outcome is Outcome.FAILED and sends(fake_connector) == []
    assert delays == sorted(delays) and delays[0] < 2 and 30 <= delays[-1] <= 37
    assert len(delays) < 100  # an hour, the age bound, at 16 s and up to 37 s a copy
    [poisoned] = engine.queue.poisoned
    assert "storage too slow" in poisoned["poisonReason"]
    report = await read_report(engine.ledger, "req-1")
    assert report["state"] == "done" and report["failed"] == 1


async def test_a_copy_past_the_age_bound_fails_though_each_claim_ended_before_its_check(
    parts, fake_connector
):
    # Each claim took 50 s of a 45 s claim: held back while its claim had ended, the copy
    # was put back every 30 s for ever, never failed (storage calls each time).
    _runtime, engine = parts
    engine.ledger, engine.max_age = SlowClaims(clock=engine.clock), 100.0
    engine.ledger.seconds = 50.0
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(copy, _)] = engine.queue.take()
    engine.clock.now += 200  # past the age bound
    assert await handle(engine, copy) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    assert "storage too slow" in poisoned["poisonReason"]
    assert sends(fake_connector) == []


async def test_a_resumed_copy_that_gives_up_on_slow_storage_says_it_may_have_been_posted(
    parts, fake_connector
):
    # Resumed: an earlier attempt of its message began its send. Failed with "storage too
    # slow" alone, the poison copy read as nothing sent, and a retry could post it again.
    _runtime, engine = parts
    engine.ledger, engine.max_age = SlowClaims(clock=engine.clock), 100.0
    engine.ledger.seconds = 16.0
    since = engine.clock.now - 200
    resumed = {"id": "req-1", "to": {"conversation": "msteams/a:1"}, "text": "hello"}
    resumed[RESERVED] = {"attempt": 0, "since": since, "resumed": True}
    assert await handle(engine, json.dumps(resumed)) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    assert "storage too slow" in poisoned["poisonReason"]
    assert "may have been posted" in poisoned["poisonReason"]
    assert sends(fake_connector) == []


async def test_the_last_attempt_the_host_grants_records_a_failure_before_it_poisons(
    parts, fake_connector
):
    # The queue itself refuses the engine's copy (an outage of the queue, not the Blob
    # store): the function raises, and after maxDequeueCount the host poisons the message.
    # Without an outcome the report (a broadcast's too) would never be done.
    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "5"})
    fake_connector.script("POST", r"/activities$", [throttled] * 4)

    class DownQueue(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            raise OSError("queue unreachable (test outage)")

    engine.queue = DownQueue()
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(OSError):
        await handle_queue_message(text, engine.runtime, engine=engine)
    report = await read_report(engine.ledger, "req-1")
    assert report["state"] != "done"  # not the last attempt: the host tries again

    with pytest.raises(OSError):
        await handle_queue_message(text, engine.runtime, engine=engine, final_attempt=True)
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "poison" in report["failures"][0]["reason"]


def test_the_trigger_knows_the_hosts_dequeue_budget(monkeypatch):
    import proactive_function

    monkeypatch.delenv(proactive_function.HOST_OVERRIDE, raising=False)
    assert proactive_function.max_dequeue_count() == 5  # host.json's maxDequeueCount


@pytest.fixture
async def refusing_queue(aad_app, azurite, unique_name, monkeypatch):
    """The bot's settings in this process's environment, on storage whose Blob service
    works and whose Queue service refuses every put (an account SAS that covers Blob
    only: the service answers 403). Yields a reader of a request's report."""
    from shared.config import Settings, reset_settings
    from shared.ledger import BlobLedger
    from shared.runtime import reset_runtime
    from shared.storage import close_shared_clients

    container = unique_name("refs")
    env = {
        **aad_app.env,
        "AzureWebJobsStorage": sas_connection_string(azurite, "racwdl", resource_types="sco"),
        "BOT_REFERENCES_CONTAINER": container,
        "BOT_PROACTIVE_QUEUE": unique_name("refused"),
    }
    monkeypatch.delenv("BOT_ALLOW_UNAUTHENTICATED", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    reset_runtime()
    operator = Settings.from_env(
        {**env, "AzureWebJobsStorage": azurite.connection_string}  # full rights, to read
    )
    ledger = BlobLedger(operator)

    async def report(request_id: str) -> dict[str, Any] | None:
        return await read_report(ledger, request_id)

    try:
        yield report
    finally:
        import app

        await app.runtime().close()
        reset_settings()
        reset_runtime()
        await close_shared_clients()


def queue_message(text: str, dequeue_count: int) -> func.QueueMessage:
    """The trigger value as the Python worker builds it."""
    from azure.functions.queue import QueueMessage

    now = datetime.now(UTC)
    return QueueMessage(
        id="m-1",
        body=text.encode(),
        dequeue_count=dequeue_count,
        insertion_time=now,
        expiration_time=now + timedelta(days=7),
        time_next_visible=now,
        pop_receipt="receipt",
    )


@asynccontextmanager
async def trigger_app(
    aad_app, azurite, unique_name, fake_connector, monkeypatch, **extra: str
) -> AsyncIterator[tuple[Settings, BlobReferenceStore]]:
    """The function app's own runtime, as the trigger builds it from the app settings."""
    import app
    import proactive_function
    from shared.config import reset_settings
    from shared.runtime import reset_runtime
    from shared.storage import close_shared_clients

    env = {
        **aad_app.env,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
        "BOT_PROACTIVE_QUEUE": unique_name("queue"),
        "BOT_TRUSTED_SERVICE_URLS": fake_connector.url,
        **extra,
    }
    monkeypatch.delenv("BOT_ALLOW_UNAUTHENTICATED", raising=False)
    monkeypatch.delenv(proactive_function.HOST_OVERRIDE, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    reset_runtime()
    settings = Settings.from_env(env)
    store = BlobReferenceStore(settings)
    try:
        yield settings, store
    finally:
        await store.close()
        await app.runtime().close()
        reset_settings()
        reset_runtime()
        await close_shared_clients()


async def test_the_trigger_names_the_queue_message_in_what_it_records(
    aad_app, azurite, unique_name, fake_connector, monkeypatch
):
    # The host's message id is how a redelivery knows its own earlier attempt (a claim it
    # kept, an outcome it recorded): the trigger passes on the id the worker gives it.
    import proactive_function

    async with trigger_app(aad_app, azurite, unique_name, fake_connector, monkeypatch) as (
        settings,
        store,
    ):
        await store.upsert(reference(fake_connector.url, "a:1"))
        text = body({"conversation": "msteams/a:1"}, request_id="req-id")
        await proactive_function.main(queue_message(text, 1))
        record = await BlobLedger(settings).read(outcome_name("req-id", "target"))
    assert sends(fake_connector) == ["a:1"]
    assert (record.data["outcome"], record.data["message"]) == ("delivered", "m-1")


async def test_the_trigger_tells_a_redelivery_which_finds_the_claim_it_kept_in_a_crowd(
    aad_app, azurite, unique_name, fake_connector, monkeypatch
):
    # The host's second delivery of a broadcast child whose first attempt died after its
    # send began (its claim kept): even with its tenant's line crowded it is not put back
    # as another message (which would take the claim over and send again), but waits the
    # claim out as the resumed copy, sending nothing now.
    import app
    import proactive_function
    from shared.idempotency import take_claim

    async with trigger_app(
        aad_app, azurite, unique_name, fake_connector, monkeypatch, BOT_CONNECTOR_RATE_LIMIT="2"
    ) as (settings, _store):
        target = reference(fake_connector.url, "a:1", tenant="tenant-1")
        child = {"id": "b-1", "to": {"conversation": "msteams/a:1"}, "text": "hello"}
        text = json.dumps({**child, RESERVED: {"child": True, "reference": target}})
        slot = outcome_name("b-1", "msteams/a:1")
        # Ended (the redelivery came late): the copy is due at once, not in 45 s.
        await take_claim(BlobLedger(settings), slot, time.time() - 60, seconds=45, message="m-1")
        async with crowded(app.runtime(), 6):
            await proactive_function.main(queue_message(text, 2))
        queued = await next_visible(azurite, settings.proactive_queue)
    assert sends(fake_connector) == []
    assert json.loads(queued)[RESERVED]["resumed"] is True


async def next_visible(azurite, queue: str, within: float = 20.0) -> str:
    """The text of the next message that becomes visible on `queue`."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy

    client = QueueClient.from_connection_string(
        azurite.connection_string, queue, message_decode_policy=TextBase64DecodePolicy()
    )
    try:
        deadline = time.monotonic() + within
        while not (visible := client.peek_messages()):
            assert time.monotonic() < deadline, "nothing became visible"
            await asyncio.sleep(0.2)
        return visible[0].content
    finally:
        client.close()


async def test_the_trigger_records_a_failure_on_the_last_attempt_the_host_grants(
    refusing_queue, monkeypatch
):
    # No stored reference yet: the engine puts a copy back to wait for it, and the queue
    # refuses it, so the function raises. Before the last attempt the host redelivers
    # (the report stays open); on the last one it poisons the message, so the failure
    # must be recorded first or the report never reaches `done`.
    import proactive_function

    monkeypatch.delenv(proactive_function.HOST_OVERRIDE, raising=False)
    text = body({"conversation": "msteams/a:landing"}, request_id="req-last")
    for attempt in (1, 4):
        with pytest.raises(QueueError) as raised:  # the queue's 403, raised for the host
            await proactive_function.main(queue_message(text, attempt))
        # Its text and chain, which the host logs: the status, never the SDK's text (the
        # service's answer, the request's URL with the SAS signature).
        assert "HTTP 403" in str(raised.value) and "sig=" not in str(raised.value)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__
        report = await refusing_queue("req-last")
        assert report is not None and report["state"] != "done", report

    with pytest.raises(QueueError):
        await proactive_function.main(queue_message(text, 5))  # host.json's maxDequeueCount
    report = await refusing_queue("req-last")
    assert (report["state"], report["failed"]) == ("done", 1)
    [failure] = report["failures"]
    assert failure["target"] == "msteams/a:landing"
    assert "moved it to the poison queue" in failure["reason"]


OVERRIDE = "AzureFunctionsJobHost__extensions__queues__maxDequeueCount"


@pytest.mark.parametrize(
    ("name", "setting", "last"),
    [
        (OVERRIDE, "2", 2),
        (OVERRIDE, " 3 ", 3),
        (OVERRIDE.lower(), "2", 2),  # the host's configuration keys ignore case
        (OVERRIDE, "0", 5),
        (OVERRIDE, "two", 5),
    ],
)
async def test_the_hosts_dequeue_budget_can_be_overridden_by_an_app_setting(
    refusing_queue, monkeypatch, name, setting, last
):
    # The host reads this app setting over host.json; a value it could not use leaves
    # host.json's 5.
    import proactive_function

    monkeypatch.setenv(name, setting)
    assert proactive_function.max_dequeue_count() == last
    text = body({"conversation": "msteams/a:landing"}, request_id="req-budget")
    for attempt in (last - 1, last):
        with pytest.raises(QueueError):
            await proactive_function.main(queue_message(text, attempt))
        report = await refusing_queue("req-budget")
        assert (report["state"] == "done") is (attempt == last), report


async def test_a_claim_from_an_instance_whose_clock_runs_ahead_still_expires(parts, fake_connector):
    # Its holder wrote `expiresAt` an hour ahead (its clock is wrong), then crashed. The
    # claim's age is read from the store's own timestamp, so it ends after its length.
    _runtime, engine = parts
    skewed = {"owner": "x", "expiresAt": engine.clock.now + 3600 + engine.claim_seconds}
    await engine.ledger.create(outcome_name("req-1", "target"), skewed)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(copy, _)] = engine.queue.take()

    engine.clock.now += engine.claim_seconds + 2
    assert await handle(engine, copy) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]


async def fan_out_given_up_on_its_last_attempt(runtime, engine, fake_connector) -> None:
    """A broadcast to a:1 and a:2, a page each: the first page queued, then the host's last
    attempt at the broadcast with the queue refusing every put; then the queue is back."""
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    engine.fanout_page_size = 1
    engine.fanout_seconds = 0
    text = body({"broadcast": {}}, "b-1")
    assert await handle(engine, text) is Outcome.REQUEUED  # first page, then continues
    [child, _continuation] = engine.queue.take()

    class DownQueue(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            raise OSError("queue unreachable (test outage)")

    queue, engine.queue = engine.queue, DownQueue()
    with pytest.raises(OSError):
        await handle_queue_message(text, engine.runtime, engine=engine, final_attempt=True)
    engine.queue = queue
    engine.queue.sent.append(child)
    await drain(engine)


async def test_a_fanout_that_fails_on_the_hosts_last_attempt_still_ends_its_report(
    parts, fake_connector
):
    runtime, engine = parts
    await fan_out_given_up_on_its_last_attempt(runtime, engine, fake_connector)

    report = await read_report(engine.ledger, "b-1")
    # The second page was counted before it was queued, and the queue refused it: a:2 is
    # reported failed with the fan-out, not left out of the count.
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 2)
    failures = {failure["target"]: failure["reason"] for failure in report["failures"]}
    assert set(failures) == {"broadcast fan-out", "msteams/a:2"}
    assert "may not have been queued" in failures["msteams/a:2"]
    assert report["targets"] == 3


async def test_a_fanout_ended_whose_own_failure_could_not_be_written_still_ends_its_report(
    parts, fake_connector
):
    # Storage took the head that ended the fan-out (one more target) and refused the
    # fan-out's own failed slot after it: the report read `running` for ever, one target
    # short of an outcome, and putting the broadcast back only counted a duplicate.
    runtime, engine = parts
    fanout_slot = outcome_name("b-1", FANOUT_TARGET)

    @dataclasses.dataclass
    class RefusingTheFanoutsSlot(MemoryLedger):
        refusing: bool = True

        async def create(self, name, data, *, metadata=None):
            if self.refusing and name == fanout_slot:
                raise StoreError("proactive ledger: create failed: HTTP 503 (test)")
            return await super().create(name, data, metadata=metadata)

    engine.ledger = RefusingTheFanoutsSlot(clock=engine.ledger.clock)
    await fan_out_given_up_on_its_last_attempt(runtime, engine, fake_connector)
    assert await engine.ledger.read(fanout_slot) is None

    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"]) == ("done", 3)
    assert (report["delivered"], report["failed"]) == (1, 2)
    failures = {failure["target"]: failure["reason"] for failure in report["failures"]}
    assert "not yet fanned out were not sent" in failures["broadcast fan-out"]
    engine.ledger.refusing = False  # the slot written later: counted once, not twice
    await record_outcome(engine.ledger, "b-1", FANOUT_TARGET, "failed", 0.0, reason="x")
    assert (await read_report(engine.ledger, "b-1"))["failed"] == 2


async def test_a_fanout_ended_heads_a_full_list_of_failures(parts, monkeypatch):
    # Its failure read from the head went after the children's: with the list full, the
    # line saying the rest of the broadcast was not sent was the one left out.
    from shared import reports

    _runtime, engine = parts
    ledger = engine.ledger
    monkeypatch.setattr(reports, "MAX_FAILURES_LISTED", 2)
    await ensure_head(ledger, "b-1", "broadcast", 0.0)
    head = await ledger.read(head_name("b-1"))
    ended = {**head.data, "targets": 4, "fannedOut": True, "ended": "given up"}
    await ledger.replace(head_name("b-1"), ended, head.etag)
    for key in ("msteams/a", "msteams/b", "msteams/c"):
        await record_outcome(ledger, "b-1", key, "failed", 0.0, reason="gone")
    report = await read_report(ledger, "b-1")
    assert (report["state"], report["failed"]) == ("done", 4)
    assert [failure["target"] for failure in report["failures"]] == [
        "broadcast fan-out",
        "msteams/a",
    ]


async def test_a_report_read_while_a_fanout_counts_pages_never_outruns_its_targets(parts):
    # The outcomes were listed after the head was read: a fan-out counting another page,
    # and its children finishing, meanwhile read as 4 delivered of 2 targets.
    _runtime, engine = parts

    @dataclasses.dataclass
    class CountingTheNextPageMeanwhile(MemoryLedger):
        counting: bool = False

        async def list(self, prefix):
            if self.counting:
                self.counting = False
                current = await self.read(head_name("b-1"))
                data = {**current.data, "targets": 4, "fannedOut": True}
                await self.replace(head_name("b-1"), data, current.etag)
                for key in ("msteams/c", "msteams/d"):
                    await record_outcome(self, "b-1", key, "delivered", 0.0)
            async for entry in super().list(prefix):
                yield entry

    ledger = CountingTheNextPageMeanwhile(clock=engine.ledger.clock)
    await ensure_head(ledger, "b-1", "broadcast", 0.0)
    head = await ledger.read(head_name("b-1"))
    await ledger.replace(head_name("b-1"), {**head.data, "targets": 2}, head.etag)
    for key in ("msteams/a", "msteams/b"):
        await record_outcome(ledger, "b-1", key, "delivered", 0.0)
    ledger.counting = True
    report = await read_report(ledger, "b-1")
    assert report["delivered"] <= report["targets"]
    assert (report["state"], report["targets"], report["delivered"]) == ("done", 4, 4)


async def test_a_broadcast_sent_again_rebuilt_with_its_keys_reordered_is_sent(
    parts, fake_connector
):
    # The producer's head landed and its put did not; the operator sends the request again
    # rebuilt from stored data (keys in another order, 1.0 for 1), which the producer lets
    # through as the same request. The fan-out compared the head's digest of the text,
    # took it for another broadcast and sent nothing: `pending` for ever.
    from shared.fanout import SAME_REQUEST, request_digest, same_request
    from shared.proactive_schema import parse_request
    from shared.reports import create_own_head

    _runtime, engine = parts
    activity = {"type": "message", "text": "hi", "channelData": {"n": 1}}
    first = {"id": "b-1", "to": {"broadcast": {}}, "activity": activity}
    rebuilt = {"channelData": {"n": 1.0}, "text": "hi", "type": "message"}
    again = {"activity": rebuilt, "to": {"broadcast": {}}, "id": "b-1"}
    parsed = parse_request(compact_json(first))
    fields = {"digest": request_digest(parsed), SAME_REQUEST: same_request(parsed)}
    await create_own_head(engine.ledger, "b-1", "broadcast", 0.0, fields=fields)

    await handle(engine, compact_json(again))
    await drain(engine)
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["duplicate"]) == ("done", 1, 0)
    assert sends(fake_connector) == ["a:1"]


async def test_a_claim_whose_create_answer_was_lost_is_known_for_its_own(parts, fake_connector):
    # Storage took the claim's create and its answer was lost (the client's retry found
    # the slot taken): the engine took its own claim for an earlier attempt's, put back a
    # resumed copy, and that copy (its create's answer lost again) failed the target as
    # "may have been posted" with nothing sent.
    runtime, engine = parts
    slot = outcome_name("req-1", "target")

    @dataclasses.dataclass
    class CreateAnswerLost(MemoryLedger):
        lost: int = 1

        async def create(self, name, data, *, metadata=None):
            etag = await super().create(name, data, metadata=metadata)
            if name == slot and "expiresAt" in data and self.lost:
                self.lost -= 1
                return None
            return etag

    engine.ledger = CreateAnswerLost(clock=engine.ledger.clock)
    text = body({"conversation": "msteams/a:1"})
    outcome = await handle_queue_message(text, runtime, engine=engine, message_id="msg-A")
    assert outcome is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]
    assert engine.queue.take() == [] and engine.queue.poisoned == []


async def test_a_claim_lasts_as_long_as_its_holders_setting_says(parts, fake_connector):
    # BOT_PROACTIVE_CLAIM_SECONDS lowered from 120 to 45, instances restarting one by one:
    # the holder (120 s) may start its send up to 90 s after claiming, and the other
    # (45 s) took the claim over at 46 s, its own length: both sent.
    runtime, engine = parts
    engine.claim_seconds = 120.0
    other = dataclasses.replace(engine, claim_seconds=45.0, message_id="msg-B")
    store, text, seen = runtime.references, body({"conversation": "msteams/a:1"}), []
    get = store.get

    async def slow_get(key):  # the holder reads the reference in 50 s (< 90)
        found = await get(key)
        if not seen:
            engine.clock.now += 47
            seen.append(await handle_queue_message(text, runtime, engine=other, message_id="B"))
            engine.clock.now += 3
        return found

    store.get = slow_get
    outcome = await handle_queue_message(text, runtime, engine=engine, message_id="msg-A")
    assert outcome is Outcome.DELIVERED
    assert seen == [Outcome.REQUEUED]  # the other waits for the claim, then finds it settled
    assert sends(fake_connector) == ["a:1"]


class AnswerLost(MemoryLedger):
    """Storage takes a write to the fan-out's checkpoint and its answer is lost: late, or a
    5xx after the write landed, so the client's retry finds the ETag changed (412) and
    `replace` answers None, as the Blob ledger does (shown on Azurite by a proxy in a
    review)."""

    def __init__(self, *, clock, lose) -> None:
        super().__init__(clock=clock)
        self.lose = lose  # (the n-th write to the checkpoint, its data) -> lose its answer
        self.head_writes = 0
        self.lost = 0

    async def replace(self, name, data, etag, *, metadata=None):
        written = await super().replace(name, data, etag, metadata=metadata)
        if written is not None and name.endswith("head.json"):
            self.head_writes += 1
            if self.lose(self.head_writes, data):
                self.lost += 1
                return None
        return written


@pytest.mark.parametrize("lost_write", [1, 2, 3, 4])
async def test_a_checkpoint_written_with_its_answer_lost_does_not_stop_the_broadcast(
    parts, fake_connector, lost_write
):
    # The fan-out took the lost answer for another holder's write and stopped, with no
    # copy of itself queued: the pages after it were never listed, the report stayed
    # `running` for ever. Writes 1-4: page 1's checkpoint, its clearing, page 2's, its.
    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2", "a:3", "a:4")
    engine.fanout_page_size = 2
    engine.fanout_seconds = 0
    engine.ledger = AnswerLost(clock=engine.clock, lose=lambda n, _data: n == lost_write)

    await handle(engine, body({"broadcast": {}}, "b-1"))
    await drain(engine)

    assert engine.ledger.lost == 1
    assert sorted(sends(fake_connector)) == ["a:1", "a:2", "a:3", "a:4"]
    report = await read_report(engine.ledger, "b-1")
    counts = {key: report[key] for key in ("state", "targets", "delivered", "failed")}
    assert counts == {"state": "done", "targets": 4, "delivered": 4, "failed": 0}


async def test_a_fanout_ended_with_its_answer_lost_still_ends_its_report(parts, fake_connector):
    # The host's last attempt ends the fan-out (targets + 1 for the fan-out itself); that
    # write's answer lost, the fan-out's failure was never recorded: `running` for ever.
    runtime, engine = parts
    engine.ledger = AnswerLost(clock=engine.clock, lose=lambda _n, data: data.get("targets") == 3)
    await fan_out_given_up_on_its_last_attempt(runtime, engine, fake_connector)

    assert engine.ledger.lost == 1
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"]) == ("done", 3)
    assert (report["delivered"], report["failed"]) == (1, 2)


class _DuplicateRecordOutage:
    """The engine's ledger, but storage refuses the record of a duplicate (an outage while
    a reused id is told apart)."""

    def __init__(self, ledger):
        self._ledger = ledger

    def __getattr__(self, name):
        return getattr(self._ledger, name)

    async def create(self, name, data, *, metadata=None):
        if "/dup/" in name:
            raise StoreError("proactive ledger: storage unreachable (test outage)")
        return await self._ledger.create(name, data, metadata=metadata)


async def _given_up_in_an_outage(engine, text, message_id):
    """`text` handled on the host's last attempt while its duplicate cannot be recorded
    nor any copy queued: it fails."""
    ledger, queue = engine.ledger, engine.queue
    engine.ledger, engine.queue = _DuplicateRecordOutage(ledger), _QueueOutage()
    try:
        with pytest.raises((StoreError, OSError)):
            await handle_queue_message(
                text, engine.runtime, engine=engine, final_attempt=True, message_id=message_id
            )
    finally:
        engine.ledger, engine.queue = ledger, queue


class _QueueOutage(MemoryQueue):
    async def put(self, text, *, delay=0.0):
        raise OSError("queue unreachable (test outage)")

    async def poison(self, body, reason):
        raise OSError("queue unreachable (test outage)")


async def test_a_broadcast_reusing_an_id_given_up_leaves_the_first_broadcasts_fanout_going(
    parts, fake_connector
):
    runtime, engine = parts
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    engine.fanout_page_size = 1
    engine.fanout_seconds = 0
    assert await handle(engine, body({"broadcast": {}}, "b-1", text="first")) is Outcome.REQUEUED
    pending = engine.queue.take()  # page 1's child and the continuation

    # Another broadcast with the first's id and other content fails on every attempt.
    await _given_up_in_an_outage(engine, body({"broadcast": {}}, "b-1", text="second"), "m-2")
    for text, _delay in pending:
        await handle(engine, text)
    await drain(engine)

    report = await read_report(engine.ledger, "b-1")
    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]
    assert (report["state"], report["targets"], report["delivered"]) == ("done", 2, 2)
    assert report["failed"] == 0


async def test_a_request_reusing_a_broadcasts_id_given_up_writes_nothing_in_its_report(
    parts, fake_connector
):
    runtime, engine = parts
    await runtime.references.upsert(reference(fake_connector.url, "a:2", user="29:b"))
    assert await handle(engine, body({"broadcast": {}}, "b-1")) is Outcome.FANNED_OUT
    [first, second] = engine.queue.take()
    assert await handle(engine, first[0]) is Outcome.DELIVERED

    # A request of its own reusing the broadcast's id fails on every attempt.
    await _given_up_in_an_outage(engine, body({"conversation": "msteams/a:1"}, "b-1"), "m-2")
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("running", 1, 0)

    assert await handle(engine, second[0]) is Outcome.DELIVERED
    report = await read_report(engine.ledger, "b-1")
    assert (report["state"], report["targets"], report["delivered"]) == ("done", 2, 2)
    assert (report["failed"], report["failures"]) == (0, [])
    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]


async def test_a_delivered_marker_refused_by_storage_is_recorded_later_without_a_resend(
    parts, fake_connector
):
    # The crash window stays, but storage refusing the marker write after the 2xx no
    # longer sends the message again: the kept copy carries the outcome to record.
    _runtime, engine = parts

    class MarkerOutage(MemoryLedger):
        """Writes of an outcome fail while `down` (claims still land)."""

        down = True

        def check(self, data):
            from shared.references import StoreError

            if self.down and "outcome" in data:
                raise StoreError("proactive ledger: storage unreachable (test outage)")

        async def create(self, name, data, *, metadata=None):
            self.check(data)
            return await MemoryLedger.create(self, name, data, metadata=metadata)

        async def replace(self, name, data, etag, *, metadata=None):
            self.check(data)
            return await MemoryLedger.replace(self, name, data, etag, metadata=metadata)

    engine.ledger = MarkerOutage(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    assert sends(fake_connector) == ["a:1"]
    [(copy, _)] = engine.queue.take()

    assert await handle(engine, copy) is Outcome.REQUEUED  # still down: kept again
    [(copy, _)] = engine.queue.take()
    engine.ledger.down = False
    assert await handle(engine, copy) is Outcome.DELIVERED

    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"]) == ("done", 1)
    assert await handle(engine, copy) is Outcome.DUPLICATE


async def test_a_500_whose_failure_cannot_be_recorded_is_still_never_resent(parts, fake_connector):
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])

    # Only the outcome's write fails (storage failing right after the send): failing every
    # write under out/ would refuse the claim too, and nothing would be sent at all.
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    assert len(sends(fake_connector)) == 1
    [(copy, _)] = engine.queue.take()
    assert json.loads(copy)["_proactive"]["outcome"] == "failed"
    engine.ledger.down = False
    assert await handle(engine, copy) is Outcome.FAILED

    assert len(sends(fake_connector)) == 1
    assert len(engine.queue.poisoned) == 1
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "500" in report["failures"][0]["reason"]


# --- review: a kept outcome keeps its target claimed ---------------------------------------


class OutcomeWriteOutage(MemoryLedger):
    """Writes of an outcome fail while `down`; claims, reads and deletes still work (one
    refused write after the Connector's 2xx)."""

    down = True

    def _check(self, data) -> None:
        from shared.references import StoreError

        if self.down and isinstance(data, dict) and "outcome" in data:
            raise StoreError("proactive ledger: storage unreachable (test outage)")

    async def create(self, name, data, *, metadata=None):
        self._check(data)
        return await MemoryLedger.create(self, name, data, metadata=metadata)

    async def replace(self, name, data, etag, *, metadata=None):
        self._check(data)
        return await MemoryLedger.replace(self, name, data, etag, metadata=metadata)


async def test_a_second_copy_is_not_sent_while_a_refused_outcome_waits_to_be_recorded(
    parts, fake_connector
):
    # The send succeeded, storage refused the settling write: the copy kept to record the
    # outcome is queued. The claim must stay meanwhile; released, it let a second copy of
    # the target (a resumed fan-out's page, a resubmitted id) claim the empty slot and
    # send the message again before the kept copy recorded it.
    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    text = body({"conversation": "msteams/a:1"})
    assert await handle(engine, text) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)["_proactive"]["outcome"] == "delivered"
    engine.ledger.down = False

    engine.clock.now += 1
    assert await handle(engine, text) is Outcome.REQUEUED  # the same request again: held off
    [(second, _)] = engine.queue.take()
    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert report["state"] == "running"

    assert await handle(engine, kept) is Outcome.DELIVERED
    assert await handle(engine, second) is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)


async def test_a_500_whose_failure_waits_to_be_recorded_is_not_resent_by_a_second_copy(
    parts, fake_connector
):
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    text = body({"conversation": "msteams/a:1"})
    assert await handle(engine, text) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    engine.ledger.down = False

    assert await handle(engine, text) is Outcome.REQUEUED
    [(second, _)] = engine.queue.take()
    assert await handle(engine, kept) is Outcome.FAILED
    assert await handle(engine, second) is Outcome.DUPLICATE
    assert len(sends(fake_connector)) == 1  # the 500 was never resent
    assert len(engine.queue.poisoned) == 1


async def test_a_kept_outcome_comes_back_before_its_claim_ends_however_often_it_was_throttled(
    parts, fake_connector
):
    # The kept copy's delay grew with the send's earlier attempts (5 x 3^n: 135 s after
    # three throttles), so the claim holding other copies off ended long before the
    # outcome was recorded: a second copy of the target sent the message again.
    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "1"})
    fake_connector.script("POST", r"/activities$", [throttled] * 6)
    text = body({"conversation": "msteams/a:1"})
    copy = text
    for _ in range(3):
        assert await handle(engine, copy) is Outcome.REQUEUED
        [(copy, delay)] = engine.queue.take()
        engine.clock.now += delay
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    assert await handle(engine, copy) is Outcome.REQUEUED  # delivered; its outcome refused
    [(kept, kept_delay)] = engine.queue.take()
    engine.ledger.down = False

    # What comes back first: the kept copy, or a second copy of the target arriving just
    # after the claim ends.
    arrivals = sorted([(kept_delay, kept), (engine.claim_seconds + 1, text)])
    start = engine.clock.now
    for at, message in arrivals:
        engine.clock.now = start + at
        await handle(engine, message)
    await drain(engine)
    assert len(sends(fake_connector)) == 7  # three throttled attempts of two, one delivered
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"]) == ("done", 1)


async def test_a_user_target_whose_lookups_spent_the_claim_is_not_sent_on_it(parts, fake_connector):
    # The claim's time was checked only before the target's reference was resolved: a
    # `user` target then looks the user up twice, creates the 1:1 and stores it (four
    # calls of up to 10-12 s each) before the send, whose own retries could then outlive
    # the claim while another instance took the target over and sent too.
    runtime, engine = parts
    clock, store = engine.clock, runtime.references

    class SlowStore(MemoryReferenceStore):
        """Lookups and the write of the new 1:1 at a storage brownout's pace (test clock)."""

        async def find_by_user(self, **kwargs):
            clock.now += 10
            return await MemoryReferenceStore.find_by_user(self, **kwargs)

        async def upsert(self, reference, **kwargs):
            clock.now += 10
            return await MemoryReferenceStore.upsert(self, reference, **kwargs)

    store.__class__ = SlowStore
    text = body({"user": user(fake_connector)}, "u-1")
    assert await handle(engine, text) is Outcome.REQUEUED
    assert sends(fake_connector) == []  # 30 s of the 45 s claim gone: not sent on it
    assert not any("/out/" in name for name in engine.ledger.blobs)  # released
    [(copy, _)] = engine.queue.take()

    store.__class__ = MemoryReferenceStore  # storage is quick again
    assert await handle(engine, copy) is Outcome.DELIVERED
    assert len(fake_connector.requests_for("createConversation")) == 1  # the stored 1:1 reused
    assert len(sends(fake_connector)) == 1


async def test_a_message_the_host_poisoned_is_retried_once_given_a_poison_reason(
    parts, fake_connector
):
    # The host's own poison copy is the message as it was, without `poisonReason`.
    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "5"})
    fake_connector.script("POST", r"/activities$", [throttled])

    class DownQueue(MemoryQueue):
        async def put(self, text, *, delay=0.0):
            raise OSError("queue unreachable (test outage)")

    queue, engine.queue = engine.queue, DownQueue()
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(OSError):
        await handle_queue_message(text, engine.runtime, engine=engine, final_attempt=True)
    engine.queue = queue

    assert await handle(engine, text) is Outcome.DUPLICATE  # put back as it is
    assert len(sends(fake_connector)) == 1  # the throttled attempt only
    retried = json.dumps({**json.loads(text), "poisonReason": "retried by an operator"})
    engine.clock.now += 5  # the operator comes after the 429's Retry-After
    assert await handle(engine, retried) is Outcome.DELIVERED
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)


async def test_bookkeeping_left_by_the_previous_layout_is_read_as_it_was_meant(
    parts, fake_connector
):
    # Before the slot, a target had a claim of its own (claim/<target>.json) and an outcome
    # created without one. A crashed holder's claim there is ignored; an old outcome still
    # decides (delivered: never again; failed: an operator's poison copy retries it).
    from shared.reports import claim_name, record_outcome

    _runtime, engine = parts
    ledger, now = engine.ledger, engine.clock.now
    await ensure_head(ledger, "old-1", "single", now)
    await ledger.create(claim_name("old-1", "target"), {"owner": "x", "expiresAt": now + 999})
    await record_outcome(ledger, "old-1", "target", "delivered", now, label="msteams/a:1")
    await ensure_head(ledger, "old-2", "single", now)
    await record_outcome(ledger, "old-2", "target", "failed", now, reason="500", label="k")

    assert await handle(engine, body({"conversation": "msteams/a:1"}, "old-1")) is Outcome.DUPLICATE
    assert (await read_report(ledger, "old-1"))["state"] == "done"
    retry = {**json.loads(body({"conversation": "msteams/a:1"}, "old-2")), "poisonReason": "500"}
    assert await handle(engine, json.dumps(retry)) is Outcome.DELIVERED
    report = await read_report(ledger, "old-2")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)
    assert sends(fake_connector) == ["a:1"]


# --- an instance's invocations shared by tenants ----------------------------------------


def slow_tenant_child(aad_app, fake_connector) -> tuple[Runtime, Engine, dict[str, Any], str]:
    """An engine whose tenants get 2 sends a second, and a broadcast child carrying its
    reference (tenant-1's conversation a:1)."""
    settings = aad_app.settings(
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url, BOT_CONNECTOR_RATE_LIMIT="2"
    )
    clock = Clock()
    runtime = make_runtime(settings, MemoryReferenceStore(), clock)
    engine = Engine(runtime, MemoryLedger(clock=clock), MemoryQueue(), clock=clock, rand=lambda: 0)
    target = reference(fake_connector.url, "a:1", tenant="tenant-1")
    child = json.dumps(
        {
            "id": "b-1",
            "to": {"conversation": "msteams/a:1"},
            "text": "hello",
            RESERVED: {"child": True, "reference": target},
        }
    )
    return runtime, engine, target, child


async def child_report(engine: Engine) -> dict[str, Any]:
    """The report of slow_tenant_child's broadcast, fanned out to that one child (its head
    written only now: nothing the engine does with a child reads it)."""
    head = {**new_head("b-1", "broadcast", 0.0), "targets": 1, "fannedOut": True}
    await engine.ledger.create(head_name("b-1"), head)
    return await read_report(engine.ledger, "b-1")


def put_back_unclaimed(engine: Engine, fake_connector, child: str, delay: float) -> str:
    """The one copy `engine` put back of `child`: as it came (not counted as an attempt,
    its age not started), visible after about `delay`, nothing sent or recorded."""
    [(copy, put_back_for)] = engine.queue.take()
    queued = json.loads(copy)
    assert queued[RESERVED].pop("attempt") == 0
    assert queued[RESERVED].pop("since") is None
    assert queued == json.loads(child)
    assert put_back_for == pytest.approx(delay, rel=0.05)
    assert sends(fake_connector) == []
    assert not [name for name in engine.ledger.blobs if name.startswith(request_prefix("b-1"))]
    return copy


async def delivered_once(engine: Engine, fake_connector, copy: str) -> None:
    """`copy`, handled again, is sent once and reported delivered."""
    assert await handle(engine, copy) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]
    assert (await read_report(engine.ledger, "b-1"))["delivered"] == 1


@asynccontextmanager
async def crowded(runtime: Runtime, in_line: int) -> AsyncIterator[None]:
    """The instance's line for tenant-1 holds `in_line` background sends (at 2/s: the next
    grant in 0.5 s, then 0.5 s for each waiting) while its line for tenant-2 has just stood
    empty."""
    pacer = runtime.connector.pacer
    line = Scope("msteams", "tenant-1", None, "elsewhere:443")
    waiting = [asyncio.ensure_future(pacer.acquire(line, background=True)) for _ in range(in_line)]
    try:
        await asyncio.sleep(0)  # the first is granted, the others wait
        await pacer.acquire(Scope("msteams", "tenant-2", None, "elsewhere:443"), background=True)
        yield
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


@pytest.mark.parametrize(("in_line", "delay"), [(6, 0.515 + 5 / 1.94), (40, 15.0)])
async def test_a_child_whose_tenants_line_here_is_crowded_goes_back_unclaimed(
    aad_app, fake_connector, in_line, delay
):
    # A child for tenant-1 would hold this invocation for seconds that a message for
    # tenant-2 could use. It goes back on the queue as it came, visible after about that
    # wait (at most 15 s), before anything is claimed or sent.
    runtime, engine, _target, child = slow_tenant_child(aad_app, fake_connector)
    async with crowded(runtime, in_line):
        assert await handle(engine, child) is Outcome.REQUEUED

        copy = put_back_unclaimed(engine, fake_connector, child, delay)
    try:
        await delivered_once(engine, fake_connector, copy)  # the line empty again
    finally:
        await runtime.close()


async def test_a_child_the_room_does_not_let_out_goes_back_unclaimed(
    aad_app, fake_connector, monkeypatch
):
    # One tenant over many instances: this instance's share of tenant-1 (2/s here) is
    # small, and the broadcast children it let out already fill its line past what a send
    # may wait for its slot. The next waits in the room, holding nothing; not let out
    # within the room's bound, it goes back on the queue as it came (not an attempt, its
    # age not started), nothing claimed or sent, visible when the line would take it.
    # (Before the room it was claimed, then requeued as a throttled attempt after waiting
    # 7 s for a slot in vain.)
    monkeypatch.setattr(proactive, "ROOM_SECONDS", 0.2)
    runtime, engine, _target, child = slow_tenant_child(aad_app, fake_connector)
    pacer = runtime.connector.pacer
    line = Scope("msteams", "tenant-1", None, "elsewhere:443")
    release = asyncio.Event()

    async def let_out_before() -> None:
        async with pacer.admission(line, 100.0, 60.0):
            await release.wait()

    ahead = [asyncio.ensure_future(let_out_before()) for _ in range(10)]
    try:
        await asyncio.sleep(0)
        assert await handle(engine, child) is Outcome.REQUEUED

        copy = put_back_unclaimed(engine, fake_connector, child, 11 / 1.94)  # 10 ahead, and it
    finally:
        release.set()
        await asyncio.gather(*ahead)
    try:
        await delivered_once(engine, fake_connector, copy)  # those ahead finished: let out
    finally:
        await runtime.close()


async def test_a_child_held_back_here_past_its_budget_keeps_its_reference(
    aad_app, fake_connector, monkeypatch
):
    # No send slot within its budget (its tenant's line here is long, and no other line
    # stands empty, so it was not put back; let out of the room all the same, as when
    # its tenant's rate is cut after it was): nothing was sent, and the copy still
    # carries the reference, so the next time its line is crowded it can be put back
    # unclaimed.
    monkeypatch.setattr(proactive, "room_within", lambda slot_wait: 1000.0)
    runtime, engine, target, child = slow_tenant_child(aad_app, fake_connector)
    line = Scope("msteams", "tenant-1", None, "elsewhere:443")
    pacer = runtime.connector.pacer
    waiting = [asyncio.ensure_future(pacer.acquire(line, background=True)) for _ in range(40)]
    try:
        await asyncio.sleep(0)
        assert await handle(engine, child) is Outcome.REQUEUED
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await runtime.close()
    [(copy, _)] = engine.queue.take()
    kept = json.loads(copy)[RESERVED]
    assert (kept["attempt"], kept["reference"]) == (1, target)
    assert sends(fake_connector) == []


def attempts(runtime: Runtime, engine: Engine) -> Callable[..., Awaitable[Outcome]]:
    """Handling of a queue message as the trigger does it: its host id, and the options."""

    async def attempt(text: str, message_id: str, **options: bool) -> Outcome:
        return await handle_queue_message(
            text, runtime, engine=engine, message_id=message_id, **options
        )

    return attempt


async def dies_after_its_send(engine: Engine, attempt, text: str, message_id: str, **options):
    """The attempt sends, then nothing takes its outcome (storage refuses it, the queue the
    copy kept for it): it raises, as a process that died there."""
    engine.queue = DownQueue()
    with pytest.raises(RuntimeError):
        await attempt(text, message_id, **options)
    engine.queue = MemoryQueue()


async def sent_twice_then_reported(engine: Engine, fake_connector) -> None:
    """The child was sent once more after a crash, never a third time: then reported."""
    assert sends(fake_connector) == ["a:1", "a:1"] and engine.queue.sent == []
    report = await child_report(engine)
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "may have been posted" in report["failures"][0]["reason"]


async def test_a_child_whose_attempts_die_after_the_send_is_sent_twice_at_most_in_a_crowd(
    aad_app, fake_connector
):
    # Its process died after the POST (nothing could record it, the claim kept), and the
    # host's redelivery came to a crowded line. Put back there, it was a new message that
    # took the claim over and sent again; each such death sent it once more. The claim
    # its own attempt kept is decided first: one resumed copy, then a report.
    runtime, engine, _target, child = slow_tenant_child(aad_app, fake_connector)
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    attempt = attempts(runtime, engine)
    try:
        await dies_after_its_send(engine, attempt, child, "m-1")
        engine.clock.now += 60
        async with crowded(runtime, 6):
            assert await attempt(child, "m-1", redelivered=True) is Outcome.REQUEUED
        [(copy, _)] = engine.queue.take()
        assert json.loads(copy)[RESERVED]["resumed"] is True

        await dies_after_its_send(engine, attempt, copy, "c-1")
        engine.ledger.down = False
        engine.clock.now += 60
        async with crowded(runtime, 6):
            assert await attempt(copy, "c-1", redelivered=True) is Outcome.FAILED
    finally:
        await runtime.close()
    await sent_twice_then_reported(engine, fake_connector)


class ReadFailsOnce(OutcomeWriteOutage):
    """As OutcomeWriteOutage, and the next `fail_reads` reads fail (a storage blip)."""

    fail_reads = 0

    async def read(self, name):
        if self.fail_reads:
            self.fail_reads -= 1
            raise StoreError("proactive ledger: read timed out (test)")
        return await OutcomeWriteOutage.read(self, name)


async def test_a_redelivery_kept_for_storage_before_its_claim_decides_keeps_that_claim(
    aad_app, fake_connector
):
    # As above, but storage fails once as the redelivery reads the target's slot: the
    # copy kept for storage is another queue message. It carries the redelivered message's
    # id and goes on as that message would (without it, it took the claim over and sent,
    # and each crash after that sent once more).
    runtime, engine, target, child = slow_tenant_child(aad_app, fake_connector)
    await runtime.references.upsert(target)  # a kept copy reads it again
    engine.ledger = ReadFailsOnce(clock=engine.clock)
    attempt = attempts(runtime, engine)
    try:
        await dies_after_its_send(engine, attempt, child, "m-1")
        engine.clock.now += 60
        engine.ledger.fail_reads = 1
        assert await attempt(child, "m-1", redelivered=True) is Outcome.REQUEUED
        [(held, _)] = engine.queue.take()
        assert json.loads(held)[RESERVED]["claimedBy"] == "m-1"

        assert await attempt(held, "h-1") is Outcome.REQUEUED
        [(copy, _)] = engine.queue.take()
        assert json.loads(copy)[RESERVED]["resumed"] is True
        assert "claimedBy" not in json.loads(copy)[RESERVED]
        assert sends(fake_connector) == ["a:1"]

        await dies_after_its_send(engine, attempt, copy, "c-1")
        engine.ledger.down = False
        engine.clock.now += 60
        assert await attempt(copy, "c-1", redelivered=True) is Outcome.FAILED
    finally:
        await runtime.close()
    await sent_twice_then_reported(engine, fake_connector)


@pytest.mark.parametrize("redelivered_after", [5, 60])  # the claim live, or ended
async def test_a_kept_copy_going_on_for_a_redelivery_reports_what_its_last_attempt_sent(
    aad_app, fake_connector, redelivered_after
):
    # The copy kept for storage (claimedBy m-1) claims under m-1's id and sends; then
    # nothing takes its outcome and the host gives up on it. Its failure is recorded as
    # that claim's, the message possibly posted (it was: the report stayed open, or said
    # nothing of the send, when the last attempt judged the claim by the copy's own id).
    runtime, engine, target, child = slow_tenant_child(aad_app, fake_connector)
    await runtime.references.upsert(target)
    engine.ledger = ReadFailsOnce(clock=engine.clock)
    attempt = attempts(runtime, engine)
    try:
        engine.ledger.fail_reads = 1  # m-1 came back (its host died before it claimed)
        assert await attempt(child, "m-1", redelivered=True) is Outcome.REQUEUED
        [(kept, _)] = engine.queue.take()
        await dies_after_its_send(engine, attempt, kept, "h-1")
        engine.ledger.down = False
        engine.clock.now += redelivered_after
        engine.queue = DownQueue()
        with pytest.raises(OSError):  # the queue still down: the host's last attempt
            await attempt(kept, "h-1", redelivered=True, final_attempt=True)
    finally:
        await runtime.close()

    assert sends(fake_connector) == ["a:1"]
    report = await child_report(engine)
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "may have been posted" in report["failures"][0]["reason"]


class LandsThenDown(OutcomeWriteOutage):
    """As OutcomeWriteOutage (outcome writes fail while `down`); with `land_then_fail`,
    the next outcome lands, storage answers an error, and every call fails after it."""

    down = False
    land_then_fail = False
    gone = False

    def _check(self, data) -> None:
        if self.gone:
            raise StoreError("proactive ledger: storage unreachable (test outage)")
        OutcomeWriteOutage._check(self, data)

    async def replace(self, name, data, etag, *, metadata=None):
        result = await OutcomeWriteOutage.replace(self, name, data, etag, metadata=metadata)
        if self.land_then_fail and isinstance(data, dict) and "outcome" in data:
            self.gone = True
            raise StoreError("proactive ledger: timed out (test)")
        return result

    async def read(self, name):
        self._check(None)
        return await MemoryLedger.read(self, name)


@pytest.mark.parametrize("redelivered", [False, True])
async def test_a_retry_whose_kept_copy_recorded_its_failure_is_not_retried_by_its_redelivery(
    parts, fake_connector, redelivered
):
    # An operator's retry op-1 draws a 500; storage refuses the failure's record, so a copy
    # carrying it is kept, and op-1's process dies before it returns. The copy records the
    # failure as op-1's (it recorded it as its own message's, and op-1, delivered again,
    # took it for another's failure to retry, and sent again what may have been posted).
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 6)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    retry = json.dumps(engine.queue.poisoned[0])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    assert await attempt(retry, "op-1", redelivered=redelivered) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    engine.ledger.down = False
    assert await attempt(kept, "c-1") is Outcome.FAILED  # the failure recorded now
    engine.clock.now += 60

    # Its own failure (recorded by the copy that went on as op-1): not sent; it puts the
    # poison copy, which op-1 cannot tell from one its process died before (docs: extra).
    assert await attempt(retry, "op-1", redelivered=True) is Outcome.FAILED
    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's


async def test_a_kept_failure_recorded_again_leaves_an_operators_live_claim_alone(
    parts, fake_connector
):
    # m-1 draws a 500 whose failure storage refuses: K is kept, records it later and puts
    # the poison copy, then its process dies, so the host delivers K again. Meanwhile an
    # operator put that copy back (p-1), which is sending. K's record must not replace
    # p-1's live claim (it did: p-1's delivery went unrecorded, the report said failed,
    # and another poison copy invited a second delivery).
    runtime, engine = parts
    attempt = attempts(runtime, engine)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    assert await attempt(body({"conversation": "msteams/a:1"}), "m-1") is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    engine.ledger.down = False
    assert await attempt(kept, "k-1") is Outcome.FAILED
    [poison] = engine.queue.poisoned
    engine.clock.now += 60
    fake_connector.script("POST", r"/activities$", [Reply(200, json={"id": "x"}, delay=1.0)])
    retry = asyncio.ensure_future(attempt(json.dumps(poison), "p-1"))
    await fake_connector.wait_for(lambda requests: requests[1:], timeout=10)  # p-1 sending

    assert await attempt(kept, "k-1", redelivered=True) is Outcome.DUPLICATE
    assert await retry is Outcome.DELIVERED
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)
    assert len(engine.queue.poisoned) == 1


async def test_the_resumed_copy_of_a_retry_does_not_retry_the_failure_its_chain_recorded(
    parts, fake_connector
):
    # An operator's retry op-1 draws a 500 whose failure storage refuses (K kept, the
    # claim too); op-1 dies before it returns, and the host's redelivery puts back the
    # resumed copy R. K records the failure (op-1's). R, a message of its own still
    # carrying poisonReason, took that failure for one to retry and sent the 500 again.
    runtime, engine = parts
    attempt = attempts(runtime, engine)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 6)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    retry = json.dumps(engine.queue.poisoned[0])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    assert await attempt(retry, "op-1") is Outcome.REQUEUED  # K
    [(kept, _)] = engine.queue.take()
    engine.clock.now += 3
    assert await attempt(retry, "op-1", redelivered=True) is Outcome.REQUEUED  # R
    [(resumed, _)] = engine.queue.take()
    engine.ledger.down = False
    assert await attempt(kept, "k-1") is Outcome.FAILED
    engine.clock.now += 60

    assert await attempt(resumed, "r-1") is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's


async def test_a_failure_kept_by_an_earlier_version_and_kept_again_is_still_recorded(
    parts, fake_connector
):
    # An earlier version kept m-1's 500 in a copy that names no sender; storage refuses it
    # again after the upgrade. The copy kept again must not name itself as the sender: it
    # then yielded to m-1's still live claim as to another's, and nothing ever recorded the
    # failure (the report stayed `running`, no poison copy).
    from shared.holding import hold_for_settings
    from shared.idempotency import take_claim

    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    reason = "uncertain status 500: the message may have been posted, so it is not resent"
    kept = json.dumps(
        {
            **json.loads(body({"conversation": "msteams/a:1"})),
            RESERVED: {"attempt": 0, "since": None, "outcome": "failed", "reason": reason},
        }
    )
    await ensure_head(engine.ledger, "req-1", "single", engine.clock.now)
    slot = outcome_name("req-1", "target")
    await take_claim(engine.ledger, slot, engine.clock.now, seconds=45, message="m-1")
    held = MemoryQueue()
    await hold_for_settings(kept, RuntimeError("x"), queue=held, redelivered="k-1")
    [(held_copy, _)] = held.take()
    assert "claimedBy" not in json.loads(held_copy)[RESERVED]
    ledger, engine.ledger = engine.ledger, OutcomeWriteOutage(clock=engine.clock)
    engine.ledger.blobs = ledger.blobs
    assert await attempt(kept, "k-1") is Outcome.REQUEUED
    [(again, _)] = engine.queue.take()
    assert "claimedBy" not in json.loads(again)[RESERVED]
    engine.ledger.down = False
    engine.clock.now += 15

    assert await attempt(again, "k-2") is Outcome.FAILED
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert len(engine.queue.poisoned) == 1 and sends(fake_connector) == []


async def test_an_operators_retry_of_a_resumed_copy_the_host_poisoned_is_sent(
    parts, fake_connector
):
    # m-1's send and its resumed copy R's send were both left unrecorded; R's last attempt
    # recorded its failure and the host poisoned R as it was (`resumed`, no poisonReason,
    # no poison copy of the engine's). An operator adds a poisonReason and puts it back, as
    # docs/proactive.md says: it is retried (it was answered `duplicate`: a resumed copy
    # never retried a failure, though only a retry's resumed copy must not).
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    text = body({"conversation": "msteams/a:1"})
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    await dies_after_its_send(engine, attempt, text, "m-1")
    engine.clock.now += 10
    assert await attempt(text, "m-1", redelivered=True) is Outcome.REQUEUED
    [(resumed, _)] = engine.queue.take()
    engine.clock.now += 60
    await dies_after_its_send(engine, attempt, resumed, "r-1")
    engine.ledger = OneMoreRefusal(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.ledger.left = 3  # the attempt's own three tries, then the give-up record lands
    engine.clock.now += 10
    engine.queue = DownQueue()
    with pytest.raises(RuntimeError):
        await attempt(resumed, "r-1", redelivered=True, final_attempt=True)
    engine.queue = MemoryQueue()
    assert (await read_report(engine.ledger, "req-1"))["failed"] == 1
    engine.clock.now += 600
    retry = json.dumps({**json.loads(resumed), "poisonReason": "retried by an operator"})

    assert await attempt(retry, "op-1") is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1", "a:1", "a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"]) == (1, 0)


async def test_a_copy_kept_for_storage_goes_on_as_the_message_handled_whatever_it_carried(
    aad_app, fake_connector
):
    # An operator's retry (a poisonReason added) of a copy that went on as m-1 is a message
    # of its own. Delivered again, with a storage blip, the copy kept for it goes on as
    # that retry, not as m-1 (which would take the retry's own claim over and send again).
    runtime, engine, _target, child = slow_tenant_child(aad_app, fake_connector)
    stale = {**json.loads(child), "poisonReason": "retry"}
    stale[RESERVED] = {**stale[RESERVED], "claimedBy": "m-1"}
    engine.ledger = ReadFailsOnce(clock=engine.clock)
    engine.ledger.down, engine.ledger.fail_reads = False, 1
    try:
        outcome = await attempts(runtime, engine)(json.dumps(stale), "op-1", redelivered=True)
    finally:
        await runtime.close()
    assert outcome is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    marks = {k: v for k, v in json.loads(kept)[RESERVED].items() if k.startswith("claimed")}
    assert marks == {"claimedBy": "op-1", "claimedRetry": True}
    assert sends(fake_connector) == []


@pytest.mark.parametrize("redelivered", [False, True])
async def test_an_operators_retry_of_a_kept_failure_the_host_poisoned_is_sent(
    parts, fake_connector, redelivered
):
    # A 500 whose failure storage refused: the copy kept to record it (going on as the
    # message that sent). Its record landed but storage answered an
    # error, the queue was down, and the host poisoned it as it was. An operator adds a
    # poisonReason and puts it back (docs/proactive.md): a message of its own, sent once
    # more, not taken for the redelivery it went on for (answered `duplicate`).
    runtime, engine = parts
    engine.ledger = LandsThenDown(clock=engine.clock)
    text = body({"conversation": "msteams/a:1"})
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.ledger.down = True
    outcome = await handle_queue_message(
        text, runtime, engine=engine, message_id="m-1", redelivered=redelivered
    )
    assert outcome is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)[RESERVED]["claimedBy"] == "m-1"  # recorded as the one that sent
    engine.ledger.down, engine.ledger.land_then_fail = False, True
    engine.queue = DownQueue()
    for final in (False, True):
        with pytest.raises(StoreError):
            await handle_queue_message(
                kept, runtime, engine=engine, message_id="u-1", final_attempt=final
            )
    engine.ledger.gone = engine.ledger.land_then_fail = False
    engine.queue = MemoryQueue()
    retry = json.dumps({**json.loads(kept), "poisonReason": "retried by an operator"})

    assert await handle(engine, retry) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1", "a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)


# --- review: once the Connector may have the message, no failure sends it again ----------


class OneMoreRefusal(OutcomeWriteOutage):
    """One more write of an outcome is refused, then they work."""

    left = 1

    def _check(self, data) -> None:
        if isinstance(data, dict) and "outcome" in data and self.left > 0:
            self.left -= 1
            raise StoreError("proactive ledger: storage unreachable (test outage)")


class DownQueue(MemoryQueue):
    async def put(self, text, *, delay=0.0):
        raise OSError("queue unreachable (test outage)")


class LandsThenFails(MemoryLedger):
    """The next write of an outcome lands, then storage answers with an error (a timeout
    after the service took the write)."""

    left = 1

    async def replace(self, name, data, etag, *, metadata=None):
        result = await MemoryLedger.replace(self, name, data, etag, metadata=metadata)
        if isinstance(data, dict) and "outcome" in data and self.left > 0:
            self.left -= 1
            raise StoreError("proactive ledger: replace timed out (test)")
        return result


async def kept_copy(engine: Engine, fake_connector: FakeConnector, outcome: str) -> str:
    """A send (a 2xx for "delivered", a 500 for "failed") whose outcome storage refused to
    record: the kept copy carrying it. Outcome writes stay refused (`engine.ledger.down`)."""
    if outcome == "failed":
        fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)[RESERVED]["outcome"] == outcome
    return kept


class FlakyQueue(MemoryQueue):
    """A queue whose next `fail_puts` puts and `fail_poisons` poison puts fail (a transient
    queue error), then work."""

    def __init__(self, *, fail_puts: int = 0, fail_poisons: int = 0) -> None:
        super().__init__()
        self.fail_puts, self.fail_poisons = fail_puts, fail_poisons

    async def put(self, text, *, delay=0.0):
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise OSError("queue unreachable (test outage)")
        await MemoryQueue.put(self, text, delay=delay)

    async def poison(self, body, reason):
        if self.fail_poisons > 0:
            self.fail_poisons -= 1
            raise OSError("queue unreachable (test outage)")
        await MemoryQueue.poison(self, body, reason)


async def redelivered(engine: Engine, text: str) -> list[Outcome | str]:
    """The message handled as the host would: again after an attempt that raised."""
    outcomes: list[Outcome | str] = []
    for _ in range(2):
        try:
            outcomes.append(await handle(engine, text))
            return outcomes
        except Exception as error:
            outcomes.append(type(error).__name__)
    return outcomes


async def test_a_send_that_may_have_been_posted_is_not_resent_when_its_poison_copy_fails_once(
    parts, fake_connector
):
    # A 500 (the message may have been posted): its poison copy was put before the failure
    # was recorded, and a queue error there released the claim; the host's redelivery
    # found the slot empty and sent the message again.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.queue = FlakyQueue(fail_poisons=1)
    text = body({"conversation": "msteams/a:1"})

    await redelivered(engine, text)
    engine.clock.now += engine.claim_seconds + 1
    await redelivered(engine, text)

    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "may have been posted" in report["failures"][0]["reason"]
    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"]


async def test_a_failure_kept_for_its_record_still_leaves_a_poison_copy(parts, fake_connector):
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "failed")
    engine.ledger.down = False

    assert await handle(engine, kept) is Outcome.FAILED

    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"] and RESERVED not in poisoned
    assert sends(fake_connector) == ["a:1"]


async def test_a_delivered_send_whose_settle_and_first_kept_copy_failed_is_not_resent(
    parts, fake_connector
):
    # The 2xx came, the settling write failed, and the first put of the copy that carries
    # the outcome failed once: the StoreError went on to the requeue for storage failures,
    # whose copy carried no outcome, and sent the message again when it came back.
    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    engine.queue = FlakyQueue(fail_puts=1)
    text = body({"conversation": "msteams/a:1"})

    assert await handle(engine, text) is Outcome.REQUEUED

    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)[RESERVED]["outcome"] == "delivered"
    engine.ledger.down = False
    assert await handle(engine, kept) is Outcome.DELIVERED
    engine.clock.now += engine.claim_seconds + 1
    assert await handle(engine, text) is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1"]


async def test_a_delivered_send_nothing_could_record_keeps_its_claim(parts, fake_connector):
    # Neither the settling write nor the kept copy's put got through: the claim stays (the
    # message went out), so the host's redelivery is held off rather than sent at once.
    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)

    engine.queue = DownQueue()
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(Exception) as raised:
        await handle(engine, text)
    assert not isinstance(raised.value, StoreError)  # not for the storage requeue either

    engine.queue = MemoryQueue()
    assert await handle(engine, text) is Outcome.REQUEUED  # held off by the claim
    assert sends(fake_connector) == ["a:1"]


async def test_the_hosts_last_attempt_never_fails_a_target_another_instance_is_sending(
    parts, fake_connector
):
    # Copy A holds a live claim and is sending; copy B, on the host's last attempt, finds
    # it busy and cannot queue its put-back. B's "failed on every attempt" replaced A's
    # claim: the report said failed for a target A then delivered.
    from shared.idempotency import take_claim
    from shared.reports import SINGLE_TARGET

    _runtime, engine = parts
    text = body({"conversation": "msteams/a:1"})
    slot = outcome_name("req-1", SINGLE_TARGET)
    await ensure_head(engine.ledger, "req-1", "single", engine.clock())
    claim = await take_claim(engine.ledger, slot, engine.clock(), seconds=engine.claim_seconds)

    engine.queue = DownQueue()
    with pytest.raises(OSError):
        await handle_queue_message(text, engine.runtime, engine=engine, final_attempt=True)

    record = await engine.ledger.read(slot)
    assert record is not None and record.etag == claim.etag  # A's claim, untouched
    report = await read_report(engine.ledger, "req-1")
    assert report["failed"] == 0


async def test_the_hosts_last_attempt_records_the_outcome_a_kept_copy_carries(
    parts, fake_connector
):
    # A kept copy (delivered; storage refused its record) whose last attempt failed too:
    # the host gave up on it, and the report said failed for a message that was delivered.
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "delivered")

    engine.ledger = OneMoreRefusal(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.queue = DownQueue()
    with pytest.raises(StoreError):
        await handle_queue_message(kept, engine.runtime, engine=engine, final_attempt=True)

    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["delivered"], report["failed"]) == ("done", 1, 0)
    assert sends(fake_connector) == ["a:1"]


async def test_a_prune_whose_state_delete_fails_is_held_for_storage_and_retried(
    parts, fake_connector
):
    # The channel said the conversation is gone (nothing was posted), and deleting its
    # state failed: the failure is a storage one, held and retried like any other, with
    # the claim released, not a send that "may have been posted".
    from shared.state import StateError, conversation_state_key
    from shared.state_memory import MemoryStateStore

    runtime, engine = parts

    class DownState(MemoryStateStore):
        down = True

        async def delete(self, key):
            if self.down:
                raise StateError("state store: delete failed: HTTP 503 (HttpResponseError)")
            return await MemoryStateStore.delete(self, key)

    runtime.state = state = DownState()
    assert await state.write(conversation_state_key("msteams", "a:1"), {"n": 1}, etag=None)
    fake_connector.script("POST", r"/activities$", [Reply(403, json=GONE)] * 2)
    text = body({"conversation": "msteams/a:1"})

    assert await handle(engine, text) is Outcome.REQUEUED
    [(copy, _)] = engine.queue.take()
    state.down = False
    assert await handle(engine, copy) is Outcome.PRUNED  # not held off by a kept claim

    assert await runtime.references.get("msteams/a:1") is None
    assert await state.read(conversation_state_key("msteams", "a:1")) is None
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["pruned"]) == ("done", 1)


# --- review: the host's last attempt and a failure's poison copy -------------------------


async def test_the_last_attempt_of_a_kept_failure_records_it_over_the_sends_own_claim(
    parts, fake_connector
):
    # The kept copy's last attempt failed too; its give-up record gave way to the live
    # claim, which was the send's own (kept for the copy): the report stayed `running`.
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "failed")
    engine.ledger = OneMoreRefusal(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.queue = DownQueue()
    engine.clock.now += 5  # the send's claim is still live
    with pytest.raises(StoreError):
        await handle_queue_message(kept, engine.runtime, engine=engine, final_attempt=True)

    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "may have been posted" in report["failures"][0]["reason"]
    # The host poisons the kept copy as it is; the engine's copy is the request's own.
    [poisoned] = engine.queue.poisoned
    assert RESERVED not in poisoned and "may have been posted" in poisoned["poisonReason"]
    assert sends(fake_connector) == ["a:1"]


@pytest.mark.parametrize("redelivered_after", [10, 60])  # the claim live, or ended
async def test_a_failure_after_the_send_that_repeats_sends_once_more_then_is_reported(
    parts, fake_connector, redelivered_after
):
    # Delivered, then nothing could record it (the claim kept); the host's next attempt
    # of the same queue message finds that claim, live or (late) expired. A copy waits it
    # out and sends once more (the POST may not have left); should that fail the same
    # way, it is reported, not put back again: each copy would otherwise send again.
    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    engine.queue = DownQueue()
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(RuntimeError):  # unsettled: for the host, the claim kept
        await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-7")
    engine.queue = MemoryQueue()
    engine.clock.now += redelivered_after
    outcome = await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-7")
    assert outcome is Outcome.REQUEUED and sends(fake_connector) == ["a:1"]
    [(copy, delay)] = engine.queue.take()
    assert json.loads(copy)[RESERVED]["resumed"] is True and delay <= 60

    engine.clock.now += 60  # the claim has ended: the copy sends, and fails the same way
    engine.queue = DownQueue()
    with pytest.raises(RuntimeError):
        await handle_queue_message(copy, engine.runtime, engine=engine, message_id="c-1")
    engine.queue = MemoryQueue()
    engine.ledger.down = False
    engine.clock.now += 10
    outcome = await handle_queue_message(copy, engine.runtime, engine=engine, message_id="c-1")

    assert outcome is Outcome.FAILED and engine.queue.sent == []
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert "may have been posted" in report["failures"][0]["reason"]
    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"] and RESERVED not in poisoned
    assert sends(fake_connector) == ["a:1", "a:1"]


async def test_a_500_whose_failure_neither_storage_nor_the_queue_takes_is_sent_once_more(
    parts, fake_connector
):
    # The documented window (docs/proactive.md): the claim cannot tell this from a crash
    # before the POST, so the message is sent once more when storage is back, then its
    # failure is recorded and reported; never a third time.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 6)
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    engine.queue = DownQueue()
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(RuntimeError):
        await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-1")
    engine.ledger.down = False
    engine.queue = MemoryQueue()
    engine.clock.now += 10  # the host's visibilityTimeout
    outcome = await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-1")
    assert outcome is Outcome.REQUEUED and sends(fake_connector) == ["a:1"]
    [(copy, _)] = engine.queue.take()
    engine.clock.now += 60
    assert await handle_queue_message(copy, engine.runtime, engine=engine) is Outcome.FAILED
    engine.clock.now += 600
    assert await handle_queue_message(copy, engine.runtime, engine=engine) is Outcome.DUPLICATE
    assert sends(fake_connector) == ["a:1", "a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1) and "500" in str(report)


@pytest.mark.parametrize("redelivered_after", [10, 60])  # the claim live, or ended
async def test_a_claim_its_own_attempt_kept_before_the_send_is_waited_out_and_sent_once(
    parts, fake_connector, redelivered_after
):
    # The earlier attempt claimed the target and failed before its POST left, its claim
    # kept (its release failed too, or its host was killed while it waited in the pacing
    # line): nothing was sent, and the message is delivered once, not reported.
    from shared.idempotency import take_claim

    _runtime, engine = parts
    name = outcome_name("req-1", "target")
    await take_claim(engine.ledger, name, engine.clock.now, seconds=45, message="m-8")
    text = body({"conversation": "msteams/a:1"})
    engine.clock.now += redelivered_after
    outcome = await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-8")
    assert outcome is Outcome.REQUEUED and sends(fake_connector) == []
    [(copy, _)] = engine.queue.take()
    engine.clock.now += 60
    assert await handle_queue_message(copy, engine.runtime, engine=engine) is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1"]
    assert (await read_report(engine.ledger, "req-1"))["delivered"] == 1


async def test_a_resumed_copy_whose_failure_only_the_queue_takes_keeps_it_and_returns(
    parts, fake_connector
):
    # The resumed copy finds its own claim again (its first attempt died) while Blob
    # refuses the failure's record: a copy kept to record it is queued and the attempt
    # returns, as for a send's outcome; raised to the host, every attempt queued another.
    from shared.idempotency import take_claim

    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    engine.ledger.down = False
    text = body({"conversation": "msteams/a:1"})
    name = outcome_name("req-1", "target")
    await take_claim(engine.ledger, name, engine.clock.now, seconds=45, message="m-1")
    engine.clock.now += 60
    assert await handle_queue_message(text, engine.runtime, engine=engine, message_id="m-1") is (
        Outcome.REQUEUED
    )
    [(resumed, _)] = engine.queue.take()
    await take_claim(engine.ledger, name, engine.clock.now, seconds=45, message="r-1")
    engine.clock.now += 10
    engine.ledger.down = True
    outcome = await handle_queue_message(resumed, engine.runtime, engine=engine, message_id="r-1")

    assert outcome is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)[RESERVED]["outcome"] == "failed"
    engine.ledger.down = False
    assert await handle_queue_message(kept, engine.runtime, engine=engine) is Outcome.FAILED
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert len(engine.queue.poisoned) == 1 and sends(fake_connector) == []


async def test_a_failure_whose_record_landed_while_storage_failed_still_gets_its_poison_copy(
    parts, fake_connector
):
    # The failure's write landed, then storage answered with an error (a timeout after
    # the service took it): the kept copy found it recorded, counted a duplicate, and no
    # poison copy was ever put.
    _runtime, engine = parts

    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    engine.ledger = LandsThenFails(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()

    assert await handle(engine, kept) is Outcome.FAILED

    [poisoned] = engine.queue.poisoned
    assert "may have been posted" in poisoned["poisonReason"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"], report["duplicate"]) == ("done", 1, 0)


async def test_a_kept_failure_the_host_poisoned_is_retried_when_an_operator_puts_it_back(
    parts, fake_connector
):
    # The host's own poison copy of a kept failure carries its outcome: put back with a
    # poisonReason, as the docs say to retry, it only counted a duplicate.
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "failed")
    engine.ledger.down = False
    assert await handle(engine, kept) is Outcome.FAILED  # recorded
    engine.queue = MemoryQueue()
    retry = {**json.loads(kept), "poisonReason": "put back by an operator"}

    assert await handle(engine, json.dumps(retry)) is Outcome.DELIVERED

    assert sends(fake_connector) == ["a:1", "a:1"]  # the operator's decision: sent again
    report = await read_report(engine.ledger, "req-1")
    assert (report["delivered"], report["failed"]) == (1, 0)


async def test_an_operators_retry_whose_failure_is_kept_is_not_sent_again(parts, fake_connector):
    # The retry drew a 500 and storage refused its record: the copy kept to record it
    # kept the retry's poisonReason, was taken for an operator's retry of a kept failure,
    # and sent the message again.
    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 3)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    engine.queue = MemoryQueue()
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    assert await handle(engine, json.dumps(poisoned)) is Outcome.REQUEUED  # the retry
    [(kept, _)] = engine.queue.take()
    engine.ledger.down = False

    assert await handle(engine, kept) is Outcome.FAILED

    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's
    [again] = engine.queue.poisoned
    assert RESERVED not in again and "may have been posted" in again["poisonReason"]


async def test_an_operators_retry_claims_the_target_in_its_own_message_name(parts, fake_connector):
    # Its claim named no message: a retry delivered but unsettled, whose last attempt
    # then failed, gave way to its own claim and left the report `running`.
    from shared.reports import SINGLE_TARGET

    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")])
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.queue = DownQueue()
    retry = json.dumps(poisoned)
    with pytest.raises(RuntimeError):
        await handle_queue_message(retry, engine.runtime, engine=engine, message_id="m-9")

    slot = await engine.ledger.read(outcome_name("req-1", SINGLE_TARGET))
    assert slot.data.get("message") == "m-9"


async def test_the_last_attempt_of_a_kept_failure_whose_record_landed_puts_its_poison_copy(
    parts, fake_connector
):
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "failed")
    engine.ledger = LandsThenFails(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.queue = DownQueue()
    with pytest.raises(StoreError):
        await handle_queue_message(
            kept, engine.runtime, engine=engine, message_id="k-1", final_attempt=True
        )

    [poisoned] = engine.queue.poisoned
    assert RESERVED not in poisoned and "may have been posted" in poisoned["poisonReason"]


@pytest.mark.parametrize("blip", [False, True])
async def test_an_operators_retry_delivered_again_by_the_host_after_its_failure_sends_nothing(
    parts, fake_connector, blip
):
    # The retry drew a 500, recorded it, and the process died before the function
    # returned: the host delivered the same queue message again, which took its own
    # failure for one to retry and posted a message that may have been posted already.
    # With a storage blip on that redelivery, the copy kept for it goes on as the retry
    # (it took the failure for another message's, and sent).
    class Died(BaseException):
        """The process dying (or the host cancelling the invocation) here."""

    class DiesOnPoison(MemoryQueue):
        async def poison(self, body, reason):
            raise Died()

    _runtime, engine = parts
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 3)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    retry = json.dumps(poisoned)
    engine.queue = DiesOnPoison()
    with pytest.raises(Died):
        await handle_queue_message(retry, engine.runtime, engine=engine, message_id="op-1")
    engine.queue = MemoryQueue()
    again, again_id = retry, "op-1"
    if blip:
        engine.ledger = ReadFailsOnce(clock=engine.clock, blobs=engine.ledger.blobs)
        engine.ledger.down, engine.ledger.fail_reads = False, 1
        outcome = await handle_queue_message(
            retry, engine.runtime, engine=engine, message_id="op-1", redelivered=True
        )
        assert outcome is Outcome.REQUEUED
        [(again, _)] = engine.queue.take()
        again_id = "k-1"

    outcome = await handle_queue_message(again, engine.runtime, engine=engine, message_id=again_id)

    assert outcome is Outcome.FAILED
    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's
    # The poison copy its process died before is put now, once, as the engine's own.
    [poisoned] = engine.queue.poisoned
    assert RESERVED not in poisoned and "may have been posted" in poisoned["poisonReason"]
    # Another message carrying the same poison copy is a new retry, the operator's call.
    assert (
        await handle_queue_message(retry, engine.runtime, engine=engine, message_id="op-2")
        is Outcome.FAILED
    )
    assert len(sends(fake_connector)) == 3


# --- review: every copy of one operator's retry is that retry ---------------------------


class Crash(BaseException):
    """The process dying here (not an Exception: nothing in the engine handles it)."""


class FirstCreateFails(MemoryLedger):
    """The next create fails (a storage blip as the attempt begins)."""

    fail_creates = 1

    async def create(self, name, data, *, metadata=None):
        if self.fail_creates:
            self.fail_creates -= 1
            raise StoreError("proactive ledger: create timed out (test)")
        return await MemoryLedger.create(self, name, data, metadata=metadata)


class PutLandsThenFails(MemoryQueue):
    """The next put lands, then the client reports an error (`failure`: or the process
    dies, a Crash)."""

    def __init__(self, failure: BaseException) -> None:
        super().__init__()
        self.failure: BaseException | None = failure

    async def put(self, text, *, delay=0.0):
        await MemoryQueue.put(self, text, delay=delay)
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure


class DiesAfterReplaced(MemoryLedger):
    """The process dies right after the next write over a slot whose data has `field` lands."""

    armed = True
    field = ""

    async def replace(self, name, data, etag, *, metadata=None):
        result = await MemoryLedger.replace(self, name, data, etag, metadata=metadata)
        if self.armed and isinstance(data, dict) and self.field in data:
            self.armed = False
            raise Crash()
        return result


class DiesAfterClaimReplaced(DiesAfterReplaced):
    """The process dies right after the next claim written over a slot's content lands."""

    field = "expiresAt"


async def poison_copy_of_a_500(engine: Engine, fake_connector, answers: int = 20) -> str:
    """A send answered 500 (failed, may have been posted): its poison copy, for a retry.
    The sends after it are answered 500 too, `answers` in all, then 200."""
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * answers)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.FAILED
    [poisoned] = engine.queue.poisoned
    engine.queue = MemoryQueue()
    return json.dumps(poisoned)


async def test_a_retrys_kept_copy_and_its_redelivery_do_not_both_send(parts, fake_connector):
    # The retry msg-2 meets a storage blip at once: the copy kept for storage (msg-3) is a
    # first attempt's, claimed by no message, and its put landed though the queue answered
    # an error, so msg-2 raised and the host delivered it again. msg-3 retried the target
    # and recorded its 500; msg-2, a retry too, took that failure for one to retry and
    # sent the message that may have been posted once more.
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    retry = await poison_copy_of_a_500(engine, fake_connector)
    engine.ledger = FirstCreateFails(clock=engine.clock, blobs=engine.ledger.blobs)
    engine.queue = PutLandsThenFails(OSError("queue: timed out (test)"))
    with pytest.raises(StoreError):
        await attempt(retry, "msg-2")
    [(kept, _)] = engine.queue.take()
    assert "claimedBy" not in json.loads(kept)[RESERVED]
    assert await attempt(kept, "msg-3") is Outcome.FAILED
    engine.clock.now += 10

    outcome = await attempt(retry, "msg-2", redelivered=True)
    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's
    assert outcome is Outcome.DUPLICATE
    slot = await engine.ledger.read(outcome_name("req-1", "target"))
    assert (slot.data["outcome"], slot.data["message"]) == ("failed", "msg-3")
    assert len(engine.queue.poisoned) == 1  # msg-3's, for the operator


async def test_a_retrys_resumed_copy_and_its_third_delivery_do_not_both_send(parts, fake_connector):
    # The retry msg-5 dies right after its claim replaced the failure, then, delivered
    # again, right after it queued the resumed copy msg-6. msg-6 sends (500) and records
    # its failure; msg-5's third delivery, finding a failure another message recorded,
    # retried it and sent again a message that may have been posted.
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    retry = await poison_copy_of_a_500(engine, fake_connector)
    engine.ledger = DiesAfterClaimReplaced(clock=engine.clock, blobs=engine.ledger.blobs)
    with pytest.raises(Crash):
        await attempt(retry, "msg-5")
    engine.clock.now += 10
    engine.queue = PutLandsThenFails(Crash())
    with pytest.raises(Crash):
        await attempt(retry, "msg-5", redelivered=True)
    [(resumed, _)] = engine.queue.take()
    assert json.loads(resumed)[RESERVED]["resumed"] is True
    engine.clock.now += 60
    assert await attempt(resumed, "msg-6") is Outcome.FAILED
    assert sends(fake_connector) == ["a:1", "a:1"]  # the first send and the retry's
    engine.clock.now += 10

    outcome = await attempt(retry, "msg-5", redelivered=True)
    assert sends(fake_connector) == ["a:1", "a:1"]
    assert outcome is Outcome.DUPLICATE
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert len(engine.queue.poisoned) == 1  # msg-6's, for the operator


async def test_an_operators_retry_of_a_retrys_kept_failure_is_sent(parts, fake_connector):
    # A failure kept for a retry (msg-2) names that retry; recorded, its copy put back by
    # an operator with a poisonReason is a retry of its own (its failure set aside), not
    # taken for msg-2's copy, which never retries msg-2's failure.
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    retry = await poison_copy_of_a_500(engine, fake_connector, answers=2)
    engine.ledger = OutcomeWriteOutage(clock=engine.clock, blobs=engine.ledger.blobs)
    assert await attempt(retry, "msg-2") is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    assert json.loads(kept)[RESERVED]["retryOf"] == "msg-2"
    engine.ledger.down = False
    assert await attempt(kept, "msg-3") is Outcome.FAILED
    slot = await engine.ledger.read(outcome_name("req-1", "target"))
    assert slot.data["retryOf"] == "msg-2"
    again = json.dumps({**json.loads(kept), "poisonReason": "retried by an operator"})

    assert await attempt(again, "msg-9") is Outcome.DELIVERED
    assert sends(fake_connector) == ["a:1", "a:1", "a:1"]


async def test_a_retry_held_for_the_settings_names_the_retry(parts, fake_connector):
    # A copy held while the app settings are unusable is another queue message: as the
    # engine's own copies, it names the retry (and sets a kept failure aside).
    from shared.holding import hold_for_settings

    _runtime, engine = parts
    retry = await poison_copy_of_a_500(engine, fake_connector)
    queue = MemoryQueue()
    kept = {**json.loads(retry), RESERVED: {"outcome": "failed", "reason": "500"}}
    for message in (retry, json.dumps(kept)):
        await hold_for_settings(message, RuntimeError("x"), queue=queue, message_id="msg-2")
        [(held, _)] = queue.take()
        assert json.loads(held)[RESERVED]["retryOf"] == "msg-2"
        assert "outcome" not in json.loads(held)[RESERVED]
        await hold_for_settings(held, RuntimeError("x"), queue=queue, message_id="msg-3")
        [(held, _)] = queue.take()
        assert json.loads(held)[RESERVED]["retryOf"] == "msg-2"
    plain = body({"conversation": "msteams/a:1"})
    await hold_for_settings(plain, RuntimeError("x"), queue=queue, message_id="msg-4")
    [(held, _)] = queue.take()
    assert "retryOf" not in json.loads(held)[RESERVED]


# --- review: a failure's poison copy survives a crash after its record -------------------


class DiesAfterOutcomeRecorded(DiesAfterReplaced):
    """The process dies right after the next outcome write lands."""

    field = "outcome"


async def test_a_failure_whose_process_died_before_its_poison_copy_still_gets_one(
    parts, fake_connector
):
    # A 500 (the message may have been posted), its failure recorded, and the process
    # died before the poison copy was put: the host's redelivery of msg-7 found the slot
    # failed, counted itself a duplicate, and no poison copy was ever put.
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 6)
    engine.ledger = DiesAfterOutcomeRecorded(clock=engine.clock)
    text = body({"conversation": "msteams/a:1"})
    with pytest.raises(Crash):
        await attempt(text, "msg-7")
    assert engine.queue.poisoned == []
    engine.clock.now += 10

    outcome = await attempt(text, "msg-7", redelivered=True)
    [poisoned] = engine.queue.poisoned
    assert outcome is Outcome.FAILED
    assert RESERVED not in poisoned and "may have been posted" in poisoned["poisonReason"]
    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"], report["duplicate"]) == ("done", 1, 0)
    # Another message to the same target (a resubmitted id) is a duplicate, as before.
    assert await attempt(text, "msg-8") is Outcome.DUPLICATE
    assert len(engine.queue.poisoned) == 1


async def test_a_childs_failure_whose_process_died_gets_its_poison_copy_in_a_crowd(
    aad_app, fake_connector
):
    # As above for a broadcast child whose redelivery comes to a crowded line: put back
    # unclaimed, it was another message, which found the failure and put no poison copy.
    runtime, engine, _target, child = slow_tenant_child(aad_app, fake_connector)
    attempt = attempts(runtime, engine)
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops")] * 6)
    engine.ledger = DiesAfterOutcomeRecorded(clock=engine.clock)
    try:
        with pytest.raises(Crash):
            await attempt(child, "msg-7")
        engine.clock.now += 10
        async with crowded(runtime, 6):
            outcome = await attempt(child, "msg-7", redelivered=True)
    finally:
        await runtime.close()
    [poisoned] = engine.queue.poisoned
    assert outcome is Outcome.FAILED
    assert poisoned[RESERVED] == {"child": True} and "may have been posted" in str(poisoned)
    assert sends(fake_connector) == ["a:1"] and engine.queue.sent == []


async def test_a_removed_childs_failure_is_not_poisoned_by_its_redelivery(parts, fake_connector):
    # A child whose conversation was removed is failed with no poison copy (nothing is
    # landing); its redelivery after a crash puts none either.
    _runtime, engine = parts
    attempt = attempts(engine.runtime, engine)
    await ensure_head(engine.ledger, "b-1", "broadcast", engine.clock.now)
    child = json.dumps(
        {
            "id": "b-1",
            "to": {"conversation": "msteams/a:gone"},
            "text": "x",
            RESERVED: {"child": True},
        }
    )
    engine.ledger = DiesAfterOutcomeRecorded(clock=engine.clock, blobs=engine.ledger.blobs)
    with pytest.raises(Crash):
        await attempt(child, "msg-7")

    assert await attempt(child, "msg-7", redelivered=True) is Outcome.DUPLICATE
    assert engine.queue.poisoned == [] and sends(fake_connector) == []


# --- copies at the size limit: lone surrogates, long reasons ------------------------------


def at_the_size_limit_in(text: str, to: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request of MAX_REQUEST_BYTES as JSON whose text is `text` repeated (then padded)."""
    from shared.proactive_schema import request_bytes
    from shared.queues import MAX_REQUEST_BYTES

    message = json.loads(body(to or {"conversation": "msteams/a:1"}, "req-1", text=""))
    room = MAX_REQUEST_BYTES - request_bytes(message)
    message["text"] = text * (room // len(text.encode()))
    message["text"] += "x" * (MAX_REQUEST_BYTES - request_bytes(message))
    assert request_bytes(message) == MAX_REQUEST_BYTES
    return message


async def test_a_lone_surrogate_in_a_retrys_note_does_not_swell_its_copies(parts, fake_connector):
    # One lone surrogate (a note cut in the middle of an emoji) made every copy written
    # with all its non-ASCII text as \uXXXX escapes: a request of Chinese text at the size
    # limit doubled, its throttled copy could not be queued, and a copy held for the
    # settings went back as it came, without the marks that stop a second send.
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES, compact_json

    _runtime, engine = parts
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "5"})
    fake_connector.script("POST", r"/activities$", [Reply(500, body="oops"), throttled])
    assert await handle(engine, compact_json(at_the_size_limit_in("中"))) is Outcome.FAILED
    [copy] = engine.queue.poisoned
    retry = compact_json({**copy, "poisonReason": "checked \ud800"})
    assert len(retry.encode()) <= MAX_QUEUE_MESSAGE_BYTES
    engine.message_id = "9f0c3a52-0d1e-4c8b-9a55-2f7d3e1b6c40"

    assert await handle(engine, retry) is Outcome.REQUEUED

    [(text, delay)] = engine.queue.sent
    assert len(text.encode()) <= MAX_QUEUE_MESSAGE_BYTES and delay >= 5
    assert json.loads(text)["text"] == copy["text"]


async def test_a_failure_with_a_long_reason_kept_for_storage_is_recorded_not_sent_again(
    parts, fake_connector
):
    # A 500 whose error code is 60 lone surrogates (a reason of ~440 bytes as JSON) and one
    # refused outcome write: the copy kept to record the failure did not fit a queue
    # message, and the request was sent a second time after its claim ended.
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES, compact_json

    _runtime, engine = parts
    code = "\ud800" * 60
    fake_connector.script("POST", r"/activities$", [Reply(500, json={"error": {"code": code}})])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    text = compact_json(at_the_size_limit_in("x"))
    engine.message_id = "9f0c3a52-0d1e-4c8b-9a55-2f7d3e1b6c40"

    assert await handle(engine, text) is Outcome.REQUEUED  # a copy kept with the failure

    [(kept, _)] = engine.queue.sent
    assert len(kept.encode()) <= MAX_QUEUE_MESSAGE_BYTES
    engine.ledger.down = False
    engine.message_id = None
    engine.clock.now += 120
    await drain(engine)
    assert len(sends(fake_connector)) == 1
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)
    assert report["failures"][0]["reason"].startswith("uncertain status 500")


async def test_the_kept_failure_of_an_unknown_key_of_emoji_at_the_size_limit_fits(
    parts, fake_connector
):
    # Its reason names the key (up to 200 characters, 4 bytes each): the copy kept to
    # record it did not fit, and the function raised (the host's dequeue budget spent).
    from shared.queues import MAX_QUEUE_MESSAGE_BYTES, compact_json

    _runtime, engine = parts
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    message = at_the_size_limit_in("x", {"conversation": "msteams/" + "\U0001f600" * 300})
    message["_proactive"] = {"attempt": 3, "since": engine.clock() - 120}
    engine.message_id = "9f0c3a52-0d1e-4c8b-9a55-2f7d3e1b6c40"

    assert await handle(engine, compact_json(message)) is Outcome.REQUEUED

    [(kept, _)] = engine.queue.sent
    assert len(kept.encode()) <= MAX_QUEUE_MESSAGE_BYTES
    assert json.loads(kept)["_proactive"]["outcome"] == "failed"


async def test_a_kept_failure_an_earlier_version_recorded_with_a_longer_reason_is_its_own(
    parts, fake_connector
):
    # Earlier versions kept 300 characters of a reason, whatever their bytes, and carried
    # the whole of it in the copy kept to record it. Such a copy, finding its failure
    # landed, read it as another's (the reasons differed once cut to 256 bytes): counted
    # a duplicate, with no poison copy for an operator to retry.
    _runtime, engine = parts
    kept = await kept_copy(engine, fake_connector, "failed")
    reason = "uncertain status 500 code " + "\U0001f600" * 60 + ": the message may have been posted"
    copy = json.loads(kept)
    copy[RESERVED]["reason"] = reason
    engine.ledger.down = False
    name = outcome_name("req-1", "target")
    slot = await engine.ledger.read(name)
    landed = {"target": "msteams/a:1", "outcome": "failed", "reason": reason[:300]}
    await engine.ledger.replace(name, landed, slot.etag, metadata={"outcome": "failed"})

    assert await handle(engine, json.dumps(copy)) is Outcome.FAILED

    [poisoned] = engine.queue.poisoned
    assert poisoned["poisonReason"].startswith("uncertain status 500 code")
    assert sends(fake_connector) == ["a:1"]


async def kept_failure_finding(
    engine: Engine, fake_connector: FakeConnector, recorded: Callable[[str], dict]
) -> str:
    """The copy kept to record a 500's failure (sent as m-1, handled now as m-2, going on
    as m-1), once its target's slot holds a failure with what `recorded(its reason)`
    gives (the reason, unless given, its own): the kept copy's text."""
    engine.message_id = "m-1"
    kept = await kept_copy(engine, fake_connector, "failed")
    assert json.loads(kept)[RESERVED]["claimedBy"] == "m-1"
    engine.ledger.down = False
    engine.message_id = "m-2"
    name = outcome_name("req-1", "target")
    slot = await engine.ledger.read(name)
    reason = json.loads(kept)[RESERVED]["reason"]
    found = {"target": "msteams/a:1", "outcome": "failed", "reason": reason, **recorded(reason)}
    await engine.ledger.replace(name, found, slot.etag, metadata={"outcome": "failed"})
    return kept


async def test_a_kept_failure_finding_another_messages_failure_with_its_reason_is_a_duplicate(
    parts, fake_connector
):
    # Another queue message recorded a failure whose reason reads as this copy's once
    # cut (they agree on their first 256 bytes): taken for the copy's own, its poison
    # copy was put beside the other's, one more copy for an operator to put back.
    _runtime, engine = parts

    def others(mine: str) -> dict:  # another reason, which reads the same cut short
        assert report_reason(mine + "x" * 300 + "1") == report_reason(mine + "x" * 300 + "2")
        return {"message": "m-other", "reason": report_reason(mine + "x" * 300 + "1")}

    kept = await kept_failure_finding(engine, fake_connector, others)
    copy = json.loads(kept)
    copy[RESERVED]["reason"] += "x" * 300 + "2"

    assert await handle(engine, json.dumps(copy)) is Outcome.DUPLICATE

    assert engine.queue.poisoned == []
    assert sends(fake_connector) == ["a:1"]
    report = await read_report(engine.ledger, "req-1")
    assert (report["failed"], report["duplicate"]) == (1, 1)


async def test_a_kept_failure_whose_record_landed_under_its_sender_is_its_own(
    parts, fake_connector
):
    # The record landed while storage answered an error: written as the message that
    # sent (m-1), which the kept copy goes on as. Its poison copy is still to be put.
    _runtime, engine = parts
    kept = await kept_failure_finding(engine, fake_connector, lambda r: {"message": "m-1"})
    reason = json.loads(kept)[RESERVED]["reason"]

    assert await handle(engine, kept) is Outcome.FAILED

    [poisoned] = engine.queue.poisoned
    assert poisoned["poisonReason"] == reason
    assert sends(fake_connector) == ["a:1"]


async def test_a_kept_failure_finding_the_host_gave_up_on_its_sender_puts_no_second_copy(
    parts, fake_connector
):
    # The message that sent (m-1) failed on every attempt after keeping this copy: the
    # host recorded that as m-1 and poisoned m-1 itself. The copy, going on as m-1, is
    # not that failure's: one more poison copy would be a second one to put back.
    from shared.outcomes import record_given_up

    _runtime, engine = parts
    engine.message_id = "m-1"
    kept = await kept_copy(engine, fake_connector, "failed")
    engine.ledger.down = False
    original = body({"conversation": "msteams/a:1"})
    await record_given_up(original, engine, RuntimeError("the function failed"))
    report = await read_report(engine.ledger, "req-1")
    assert "host moved it to the poison queue" in report["failures"][0]["reason"]
    engine.message_id = "m-2"

    assert await handle(engine, kept) is Outcome.DUPLICATE

    assert engine.queue.poisoned == []
    assert sends(fake_connector) == ["a:1"]


async def test_a_message_the_host_delivers_again_after_its_last_attempt_gets_its_poison_copy(
    parts, fake_connector
):
    # The function read maxDequeueCount as 5 (an override it did not read, such as "0xA"),
    # the host as 10: the 5th attempt recorded the failure as the host's to poison, the
    # host delivered the message a 6th time, which found the target failed and returned.
    # The message was deleted: no poison copy anywhere, though the report said there was.
    from shared.outcomes import record_given_up

    _runtime, engine = parts
    original = body({"conversation": "msteams/a:1"})
    engine.message_id = "m-1"
    await record_given_up(original, engine, RuntimeError("the function failed"))

    assert await handle(engine, original) is Outcome.FAILED

    [copy] = engine.queue.poisoned
    assert copy["id"] == "req-1" and "function failed on every attempt" in copy["poisonReason"]
    assert sends(fake_connector) == [] and engine.queue.take() == []
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"]) == ("done", 1)


async def test_a_copy_kept_for_storage_the_host_delivers_again_after_giving_up_gets_one(
    parts, fake_connector
):
    # k-1, a copy kept for storage going on as m-1, failed its attempt the function took
    # for the last: recorded as m-1's, given up. The host (counting more attempts) then
    # delivered k-1 again, which found "m-1's" failure, answered duplicate, and k-1 was
    # deleted with no poison copy anywhere.
    from shared.outcomes import record_given_up

    _runtime, engine = parts
    copy = json.loads(body({"conversation": "msteams/a:1"}))
    copy[RESERVED] = {"attempt": 1, "claimedBy": "m-1"}
    kept = json.dumps(copy)
    going_on = dataclasses.replace(engine, message_id="m-1", delivered_as="k-1")
    await record_given_up(kept, going_on, RuntimeError("the function failed"))

    outcome = await handle_queue_message(
        kept, engine.runtime, engine=engine, message_id="k-1", redelivered=True
    )

    assert outcome is Outcome.FAILED and sends(fake_connector) == []
    [poisoned] = engine.queue.poisoned
    assert "function failed on every attempt" in poisoned["poisonReason"]


async def test_a_copy_going_on_as_a_message_the_host_gave_up_on_puts_no_second_copy(
    parts, fake_connector
):
    # m-1 failed on every attempt (the host recorded that as m-1 and poisoned m-1 itself)
    # after a copy kept for a storage blip, going on as m-1, had been queued. That copy
    # found "its own" failure and put a poison copy beside the host's: two to put back.
    from shared.outcomes import record_given_up

    _runtime, engine = parts
    original = body({"conversation": "msteams/a:1"})
    engine.message_id = "m-1"
    await record_given_up(original, engine, RuntimeError("the function failed"))
    copy = json.loads(original)
    copy[RESERVED] = {"attempt": 1, "claimedBy": "m-1"}
    engine.message_id = "m-2"

    assert await handle(engine, json.dumps(copy)) is Outcome.DUPLICATE

    assert engine.queue.poisoned == [] and sends(fake_connector) == []
    report = await read_report(engine.ledger, "req-1")
    assert (report["state"], report["failed"], report["duplicate"]) == ("done", 1, 1)


async def kept_failure_put_back_by_an_operator(engine, fake_connector) -> str:
    """A 400 whose failure storage refused to record: its kept copy recorded it (with the
    engine's poison copy, taken by the operator), and an operator put the kept copy back
    with a `poisonReason` to retry it: that retry's text."""
    engine.message_id = "m-1"
    fake_connector.script("POST", r"/activities$", [Reply(400, body="bad")])
    engine.ledger = OutcomeWriteOutage(clock=engine.clock)
    assert await handle(engine, body({"conversation": "msteams/a:1"})) is Outcome.REQUEUED
    [(kept, _)] = engine.queue.take()
    engine.ledger.down = False
    engine.message_id = "m-2"
    assert await handle(engine, kept) is Outcome.FAILED
    engine.queue.poisoned.clear()
    return json.dumps({**json.loads(kept), "poisonReason": "operator: retry please"})


async def test_an_operators_retry_of_a_kept_failure_given_up_after_its_send_says_so(
    parts, fake_connector
):
    # The retry took the slot over and its send began, then its process died, and every
    # redelivery failed (the queue refused the copy each tried to leave). Given up, it
    # was recorded with the kept copy's old reason and got an engine poison copy beside
    # the host's: two retryable copies, and the report hid a send that may have posted.
    from shared.idempotency import replace_with_claim

    _runtime, engine = parts
    retry = await kept_failure_put_back_by_an_operator(engine, fake_connector)
    name = outcome_name("req-1", "target")
    slot = await engine.ledger.read(name)
    assert await replace_with_claim(
        engine.ledger, name, slot.etag, engine.clock(), seconds=engine.claim_seconds, message="q-1"
    )
    engine.queue = FlakyQueue(fail_puts=100)
    with pytest.raises(OSError):
        await handle_queue_message(
            retry, engine.runtime, engine=engine, final_attempt=True, message_id="q-1",
            redelivered=True,
        )  # fmt: skip

    recorded = (await engine.ledger.read(name)).data
    assert "may have been posted" in recorded["reason"]
    assert engine.queue.poisoned == []  # the host's own copy of the retry is the one


async def test_an_operators_retry_of_a_kept_failure_given_up_unclaimed_puts_no_copy(
    parts, fake_connector
):
    # Its claim's write refused on every attempt: given up, it took the failure recorded
    # before it for its own and put an engine poison copy beside the host's.
    _runtime, engine = parts
    retry = await kept_failure_put_back_by_an_operator(engine, fake_connector)

    class ClaimWritesFail(MemoryLedger):
        async def replace(self, name, data, etag, *, metadata=None):
            raise StoreError("storage unreachable (test outage)")

    ledger = ClaimWritesFail(clock=engine.clock)
    ledger.blobs = engine.ledger.blobs
    engine.ledger, engine.queue = ledger, FlakyQueue(fail_puts=100)
    with pytest.raises((StoreError, OSError)):
        await handle_queue_message(
            retry, engine.runtime, engine=engine, final_attempt=True, message_id="q-1",
            redelivered=True,
        )  # fmt: skip

    assert engine.queue.poisoned == []
    assert sends(fake_connector) == ["a:1"]  # the first attempt's 400 alone


async def test_a_broadcast_whose_head_a_producer_took_back_meanwhile_is_still_sent(
    parts, fake_connector
):
    # Queued without a head (a producer with the read-only role); another producer sent
    # the id again, created the head, and took it back when the queue refused its put,
    # just after the fan-out made sure of it: counted a duplicate, never sent, `pending`.
    runtime, engine = parts  # stores msteams/a:1
    await store_personal(runtime, fake_connector.url, "a:2")

    class TakenBackAfterEnsure(MemoryLedger):
        taken = False

        async def create(self, name, data, *, metadata=None):
            etag = await MemoryLedger.create(self, name, data, metadata=metadata)
            if etag is None and name == head_name("b-x") and not self.taken:
                self.taken = True
                del self.blobs[name]  # the producer's delete of the head it created
            return etag

    engine.ledger = TakenBackAfterEnsure(clock=engine.clock)
    await engine.ledger.create(head_name("b-x"), new_head("b-x", "broadcast", engine.clock()))

    await handle(engine, body({"broadcast": {}}, "b-x"))
    await drain(engine)

    assert engine.ledger.taken
    assert sorted(sends(fake_connector)) == ["a:1", "a:2"]
    report = await read_report(engine.ledger, "b-x")
    assert (report["state"], report["delivered"], report["duplicate"]) == ("done", 2, 0)


def test_a_broadcasts_digest_reads_as_earlier_versions_wrote_it():
    # A broadcast fanning out across an upgrade compares its digest with the one its
    # head keeps: written from compact_json, whose text for a lone surrogate changed, it
    # no longer matched, and the rest of the broadcast was dropped as another's.
    import hashlib

    from shared.fanout import request_digest
    from shared.proactive_schema import parse_request

    message = {"id": "b-1", "to": {"broadcast": {}}, "text": "h\u00e9llo \ud800"}
    shown = {"to": message["to"], "activity": None, "text": message["text"]}
    earlier = json.dumps(shown, separators=(",", ":")).encode("ascii")  # all of it escaped

    assert request_digest(parse_request(json.dumps(message))) == hashlib.sha256(earlier).hexdigest()
