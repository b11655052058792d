"""The proactive engine end to end: producer → Azurite queue → devhost → fake Connector.

Every host here is `python -m tools.devhost --functions proactive_function` on the repo's
own host.json, with Azurite for the queue, references and bookkeeping, the fake AAD for
tokens (MSAL over HTTPS) and botsim's fake Connector. Requests go in through
shared.producer (the API, and once the command), and what is checked is what a user or an
operator would see: what reached the Connector, the delivery report, the poison queue,
the store, and how often the host dequeued a message.

Hosts that are killed or share work run with a `DEVHOST_QUEUE_LEASE_SECONDS` of a few
seconds and the shortest `BOT_PROACTIVE_CLAIM_SECONDS` the settings accept, so a killed
instance's messages and claims come back in seconds rather than the platform's minutes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueServiceClient

from shared import producer
from shared.config import MIN_CLAIM_SECONDS, Settings
from shared.references import BlobReferenceStore, document_name
from shared.schedules import run_timer
from shared.storage import close_shared_clients
from tests.fixtures.devhost import DevHost
from tests.fixtures.storage import sas_connection_string
from tests.integration.test_producer_command import producer as run_producer
from tools.botsim import identity as botsim_identity
from tools.botsim.connector import FakeConnector, Reply

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def connector(module_connector: FakeConnector) -> FakeConnector:
    module_connector.reset()
    return module_connector


def make_env(app, fake_aad_service, identity_services, connector, azurite, **extra) -> dict:
    suffix = uuid.uuid4().hex[:12]
    return {
        **app.env,
        **botsim_identity.identity_env(identity_services.channel, identity_services.emulator),
        "BOT_TRUSTED_SERVICE_URLS": connector.url,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": f"engine-refs-{suffix}",
        "BOT_PROACTIVE_QUEUE": f"engine-{suffix}",
        "BOT_SCHEDULE": "0 0 0 1 1 *",  # the timer stays quiet; the tests run schedules
        "REQUESTS_CA_BUNDLE": fake_aad_service.ca_path,
        "SSL_CERT_FILE": fake_aad_service.ca_path,
        # The trigger's per-message line (with its dequeue count) is DEBUG detail.
        "PYTHON_ENABLE_DEBUG_LOGGING": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def bot_env(module_aad_app, fake_aad_service, identity_services, module_connector, azurite):
    return make_env(module_aad_app, fake_aad_service, identity_services, module_connector, azurite)


@pytest.fixture(scope="module")
def devhost(bot_env, tmp_path_factory):
    host = DevHost(bot_env, tmp_path_factory.mktemp("engine"), functions=("proactive_function",))
    try:
        yield host.wait_started()
    finally:
        host.stop()


class Bot:
    """The bot's storage as a producer and an operator see it."""

    def __init__(self, env: dict[str, str], azurite) -> None:
        self.env = env
        self.settings = Settings.from_env(env)
        service = QueueServiceClient.from_connection_string(azurite.connection_string)
        self.queue = service.get_queue_client(env["BOT_PROACTIVE_QUEUE"])
        self.poison = service.get_queue_client(f"{env['BOT_PROACTIVE_QUEUE']}-poison")
        for client in (self.queue, self.poison):
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
        self.container = ContainerClient.from_connection_string(
            azurite.connection_string, env["BOT_REFERENCES_CONTAINER"]
        )

    async def store(self, *references: dict[str, Any], parallel: int = 32) -> list[str]:
        store = BlobReferenceStore(self.settings, cache_size=0)
        semaphore = asyncio.Semaphore(parallel)

        async def put(reference):
            async with semaphore:
                await store.upsert(reference)

        try:
            await asyncio.gather(*(put(r) for r in references))
        finally:
            await store.close()
        return [f"{r['channelId']}/{r['conversation']['id']}" for r in references]

    async def get(self, key: str):
        store = BlobReferenceStore(self.settings, cache_size=0)
        try:
            return await store.get(key)
        finally:
            await store.close()

    async def send(self, request: dict[str, Any]) -> str:
        return await producer.enqueue(request, settings=self.settings)

    async def report(self, request_id: str) -> dict | None:
        return await producer.read_report(request_id, settings=self.settings)

    async def wait_report(self, request_id: str, within: float = TIMEOUT, **expected) -> dict:
        deadline = time.monotonic() + within
        while True:
            report = await self.report(request_id)
            if (
                report
                and report["state"] == "done"
                and all(report[k] == v for k, v in expected.items())
            ):
                return report
            if time.monotonic() > deadline:
                raise AssertionError(f"report of {request_id} not done as expected: {report}")
            await asyncio.sleep(0.2)

    def poisoned(self) -> list[dict[str, Any]]:
        return [
            json.loads(base64.b64decode(m.content))
            for m in self.poison.peek_messages(max_messages=32)
        ]

    async def wait_poisoned(self, *request_ids: str, within: float = TIMEOUT) -> list[dict]:
        """The poison copies of these requests, once all are there: a failure is recorded
        in the report first and its poison copy put after, so a report can be read first."""
        deadline = time.monotonic() + within
        while True:
            copies = [m for m in self.poisoned() if m.get("id") in request_ids]
            if {m["id"] for m in copies} >= set(request_ids):
                return copies
            if time.monotonic() > deadline:
                raise AssertionError(f"no poison copy of all of {request_ids}: {copies}")
            await asyncio.sleep(0.2)

    def queued(self) -> int:
        return self.queue.get_queue_properties().approximate_message_count

    def close(self) -> None:
        self.queue.close()
        self.poison.close()
        self.container.close()


@pytest.fixture
async def bot(bot_env, azurite):
    instance = Bot(bot_env, azurite)
    yield instance
    instance.close()
    await close_shared_clients()


def reference_for(url: str, conversation_id: str, **overrides: Any) -> dict[str, Any]:
    personal = overrides.pop("personal", True)
    return {
        "channelId": "msteams",
        "serviceUrl": url,
        "conversation": {
            "id": conversation_id,
            "conversationType": "personal" if personal else "channel",
            "tenantId": overrides.pop("tenant", "tenant-1"),
        },
        "bot": {"id": "28:bot", "name": "Bot"},
        "user": {"id": overrides.pop("user", f"29:{conversation_id}"), "name": "Someone"},
    }


def sent_to(connector: FakeConnector, conversation_id: str) -> list[dict[str, Any]]:
    return [
        r.json
        for r in connector.requests
        if r.operation == "sendToConversation"
        and r.conversation_id == conversation_id
        and 200 <= r.status < 300
    ]


def activities_of(conversation_id: str) -> str:
    """The fake Connector's script pattern for sends to one conversation (raw path)."""
    return re.escape(quote(conversation_id, safe="")) + "/activities$"


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


# --- each target kind, exactly once ------------------------------------------------------------


async def test_each_target_kind_delivers_one_message_to_the_right_conversation(
    devhost, bot, connector
):
    tag = uuid.uuid4().hex[:8]
    chat, group, direct = f"a:chat-{tag}", f"19:group-{tag}", f"a:direct-{tag}"
    [chat_key, _] = await bot.store(
        reference_for(connector.url, chat, tenant=f"t-{tag}"),
        reference_for(connector.url, group, tenant=f"t-{tag}", personal=False),
    )
    user = {"channelId": "msteams", "id": f"29:new-{tag}", "tenantId": f"t-{tag}"}
    user["serviceUrl"] = connector.url

    ids = {
        "conversation": await bot.send({"to": {"conversation": chat_key}, "text": "to a chat"}),
        "reference": await bot.send(
            {"to": {"reference": reference_for(connector.url, direct)}, "text": "direct"}
        ),
        "user": await bot.send({"to": {"user": user}, "text": "to a user"}),
    }
    for request_id in ids.values():
        await bot.wait_report(request_id, delivered=1, targets=1)
    assert [a["text"] for a in sent_to(connector, chat)] == ["to a chat"]
    assert [a["text"] for a in sent_to(connector, direct)] == ["direct"]
    [created] = connector.requests_for("createConversation")
    new_conversation = created.response["id"]
    assert created.json["members"] == [{"id": f"29:new-{tag}"}]
    assert [a["text"] for a in sent_to(connector, new_conversation)] == ["to a user"]

    # A second request to the same user reuses the 1:1 it created.
    again = await bot.send({"to": {"user": user}, "text": "again"})
    await bot.wait_report(again, delivered=1)
    assert len(connector.requests_for("createConversation")) == 1
    assert [a["text"] for a in sent_to(connector, new_conversation)] == ["to a user", "again"]

    # A broadcast to the tenant reaches its three conversations, once each.
    broadcast = await bot.send({"to": {"broadcast": {"tenantId": f"t-{tag}"}}, "text": "all"})
    report = await bot.wait_report(broadcast, targets=3, delivered=3)
    assert report["failed"] == report["pruned"] == 0
    for conversation in (chat, group, new_conversation):
        assert [a["text"] for a in sent_to(connector, conversation)][-1] == "all"
        assert sum(a["text"] == "all" for a in sent_to(connector, conversation)) == 1
    assert bot.poisoned() == []


async def test_a_resubmitted_request_id_sends_nothing_new(devhost, bot, connector):
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation))
    request = {"id": new_id(), "to": {"conversation": key}, "text": "once"}
    await bot.send(request)
    await bot.wait_report(request["id"], delivered=1)
    await bot.send(request)
    await bot.wait_report(request["id"], delivered=1, duplicate=1)
    assert len(sent_to(connector, conversation)) == 1


async def test_the_producer_command_sends_reports_and_lists(devhost, bot, connector, tmp_path):
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation, tenant="cli-tenant"))
    # Only storage settings: a producer needs no bot credentials.
    env = {k: bot.env[k] for k in ("AzureWebJobsStorage", "BOT_REFERENCES_CONTAINER")}
    env["BOT_PROACTIVE_QUEUE"] = bot.env["BOT_PROACTIVE_QUEUE"]

    listed = run_producer(env, "conversations", '{"tenantId": "cli-tenant"}')
    assert (listed.returncode, listed.stdout.split()) == (0, [key])
    missing = run_producer(env, "report", "no-such-request")
    assert missing.returncode == 1 and missing.stdout == "" and "no report" in missing.stderr

    sent = run_producer(env, "send", "--conversation", key, "--text", "from the shell")
    assert sent.returncode == 0, sent.stderr
    request_id = sent.stdout.strip()
    assert uuid.UUID(request_id) and sent.stdout.count("\n") == 1
    await bot.wait_report(request_id, delivered=1)
    shown = run_producer(env, "report", request_id)
    report = json.loads(shown.stdout)
    assert (report["id"], report["state"], report["delivered"]) == (request_id, "done", 1)
    assert set(report) == {
        "id", "state", "targets", "delivered", "duplicate", "pruned", "failed",
        "failures", "createdAt", "updatedAt",
    }  # fmt: skip
    assert [a["text"] for a in sent_to(connector, conversation)] == ["from the shell"]

    bad = run_producer(env, "send", "--conversation", "no-slash", "--text", "x")
    assert bad.returncode == 1 and bad.stdout == "" and "conversation key" in bad.stderr


# --- outcomes ------------------------------------------------------------------------------------


async def test_throttling_and_unavailability_deliver_once_without_poison(devhost, bot, connector):
    logged = (len(devhost.stdout), len(devhost.stderr))  # the host's log is the module's
    conversations = [f"a:burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    keys = await bot.store(*(reference_for(connector.url, c) for c in conversations))
    throttled = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "1"})
    for index, conversation in enumerate(conversations):
        # Each send fails more often than the client retries: the engine requeues it. (A
        # connection dropped after the POST was written is not retried: it may have been
        # posted, tests/unit/test_proactive_engine.py.)
        failure = [throttled, Reply(503, body="busy"), Reply(502, body="gateway")][index % 3]
        connector.script("POST", activities_of(conversation), [failure] * 6)
    ids = [await bot.send({"to": {"conversation": k}, "text": "storm"}) for k in keys]

    # Each takes several invocations, the pacer holding the throttled conversation's sends
    # back for most of each (PacingTimeout): the first was reported done 33-46 s after it
    # was sent in runs here, the last after up to 55 s, loaded or not; 60 s was the first
    # one's whole wait. (The test's own timeout is 120 s.)
    for request_id in ids:
        await bot.wait_report(request_id, within=100, delivered=1, failed=0)
    for conversation in conversations:
        assert len(sent_to(connector, conversation)) == 1
    for request_id in ids:  # each outlasted the client's own retries and was requeued
        assert re.search(re.escape(repr(request_id)) + r": \w+ .*; requeued in", devhost.log)
    assert bot.poisoned() == []
    # Requeued by the engine (copies of its own: how many depends on the client's retries
    # and the pacer under the machine's load), never redelivered by the host: no
    # invocation of this test failed.
    log = devhost.stdout[logged[0] :] + devhost.stderr[logged[1] :]
    assert "Executed 'Functions.proactive_function' (Failed" not in log


async def test_a_60_second_retry_after_is_requeued_not_poisoned(devhost, bot, connector):
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation))
    slow = Reply(429, json={"error": {"code": "Throttled"}}, headers={"Retry-After": "60"})
    connector.script("POST", activities_of(conversation), [slow])
    request_id = await bot.send({"to": {"conversation": key}, "text": "later"})

    await connector.wait_for(lambda rs: [r for r in rs if r.status == 429], timeout=TIMEOUT)
    deadline = time.monotonic() + 20
    while f"proactive {request_id!r}: throttled" not in devhost.log:
        assert time.monotonic() < deadline, devhost.log[-3000:]
        await asyncio.sleep(0.1)
    [delay] = re.findall(
        re.escape(f"proactive {request_id!r}: throttled") + r".*requeued in (\d+) s", devhost.log
    )
    assert 60 <= int(delay) <= 80
    await asyncio.sleep(3)
    # One copy waits, invisible, on the queue; nothing poisoned, nothing sent again.
    assert bot.queued() >= 1 and bot.poisoned() == []
    assert len([r for r in connector.requests if r.conversation_id == conversation]) == 1
    assert (await bot.report(request_id))["state"] != "done"
    # Left there, the copy would be sent a minute on, in a later test that then finds a
    # request it did not make on the module's Connector: cleared once the invocation that
    # queued it has ended (its log line follows the copy's put).
    throttled = devhost.stderr.index(f"proactive {request_id!r}: throttled")
    deadline = time.monotonic() + TIMEOUT
    while "Executed 'Functions.proactive_function'" not in devhost.stderr[throttled:]:
        assert time.monotonic() < deadline, devhost.log[-3000:]
        await asyncio.sleep(0.1)
    bot.queue.clear_messages()
    assert bot.queued() == 0


async def test_gone_is_pruned_and_reported(devhost, bot, connector):
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation))
    roster = {"error": {"code": "BotNotInConversationRoster", "message": "not in roster"}}
    connector.script("POST", activities_of(conversation), [Reply(403, json=roster)])
    request_id = await bot.send({"to": {"conversation": key}, "text": "hi"})
    await bot.wait_report(request_id, pruned=1)
    assert await bot.get(key) is None
    assert bot.poisoned() == []


async def test_malformed_is_poisoned_at_once_and_an_unknown_key_is_kept_and_reported(
    devhost, bot, connector
):
    request_id = new_id()
    malformed = {"id": request_id, "to": {"conversation": "msteams/x"}}  # no content
    bot.queue.send_message(base64.b64encode(json.dumps(malformed).encode()).decode())
    [copy] = await bot.wait_poisoned(request_id, within=15)  # seconds, not retries
    assert "`activity`" in copy["poisonReason"]
    report = await bot.wait_report(request_id, failed=1)
    assert "invalid request" in report["failures"][0]["reason"]
    assert connector.requests == []

    # A key whose reference has not landed yet (a producer right after an install): kept
    # and retried, reported running, delivered once the reference is there. (Failed with a
    # poison copy after about a minute without it: tests/unit/test_proactive_engine.py.)
    conversation = f"a:{uuid.uuid4().hex}"
    key = f"msteams/{conversation}"
    early = await bot.send({"to": {"conversation": key}, "text": "welcome"})
    deadline = time.monotonic() + TIMEOUT
    while f"proactive {early!r}: no stored reference" not in devhost.log:
        assert time.monotonic() < deadline, devhost.log[-3000:]
        await asyncio.sleep(0.1)
    assert (await bot.report(early))["state"] == "running"
    await bot.store(reference_for(connector.url, conversation))
    await bot.wait_report(early, delivered=1)
    assert [a["text"] for a in sent_to(connector, conversation)] == ["welcome"]


async def test_an_untrusted_service_url_is_refused_and_reported(devhost, bot, connector):
    with FakeConnector() as attacker:
        inline = await bot.send(
            {"to": {"reference": reference_for(attacker.url, "a:x")}, "text": "leak?"}
        )
        user = {"channelId": "msteams", "id": "29:x", "tenantId": "t", "serviceUrl": attacker.url}
        via_user = await bot.send({"to": {"user": user}, "text": "leak?"})
        for request_id in (inline, via_user):
            report = await bot.wait_report(request_id, failed=1)
            assert "not trusted" in report["failures"][0]["reason"]
        assert attacker.requests == []
    copies = await bot.wait_poisoned(inline, via_user)
    assert all("not trusted" in m["poisonReason"] for m in copies)


async def test_a_user_whose_1to1_a_newer_version_recorded_is_still_sent_to(devhost, bot, connector):
    # After a rollback, the user's 1:1 is stored in a schemaVersion this version cannot
    # read: the lookup passes over it, the channel answers with that 1:1, and the message
    # goes there (it was held as a storage outage for ever), leaving the document alone.
    tag = uuid.uuid4().hex[:8]
    [_] = await bot.store(reference_for(connector.url, f"a:other-{tag}"))  # the container
    newer = {"schemaVersion": 99, "key": f"msteams/a:newer-{tag}", "reference": {}}
    bot.container.upload_blob(document_name(f"msteams/a:newer-{tag}"), json.dumps(newer))
    connector.script("POST", r"/v3/conversations$", [Reply(200, json={"id": f"a:newer-{tag}"})])
    user = {"channelId": "msteams", "id": f"29:u-{tag}", "tenantId": "tenant-1"}
    request_id = await bot.send(
        {"to": {"user": {**user, "serviceUrl": connector.url}}, "text": "hi"}
    )
    await bot.wait_report(request_id, delivered=1, targets=1)
    assert [a["text"] for a in sent_to(connector, f"a:newer-{tag}")] == ["hi"]
    stored = bot.container.download_blob(document_name(f"msteams/a:newer-{tag}")).readall()
    assert json.loads(stored) == newer


# --- schedules -----------------------------------------------------------------------------------


async def test_a_schedule_fires_once_per_due_time_with_overlapping_and_past_due_runs(
    devhost, bot, connector
):
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation))
    document = {
        "schedule": "0 */5 * * * *",
        "request": {"to": {"conversation": key}, "text": "tick"},
    }
    bot.container.upload_blob("schedules/standup.json", json.dumps(document))
    noon = datetime(2030, 1, 1, 12, 0, 20, tzinfo=UTC)

    # Two timer runs overlap at 12:00; a later one is retried.
    first = await asyncio.gather(run_timer(bot.settings, noon), run_timer(bot.settings, noon))
    retried = await run_timer(bot.settings, noon + timedelta(seconds=10))
    # The host was down until 12:16: the past-due run catches up on 12:05, 12:10, 12:15.
    late = await run_timer(bot.settings, noon + timedelta(minutes=16))

    assert first == [["schedule:standup:2030-01-01T12:00Z"]] * 2 and retried == []
    assert late == [f"schedule:standup:2030-01-01T12:{m}Z" for m in ("05", "10", "15")]
    for request_id in ("schedule:standup:2030-01-01T12:00Z", *late):
        await bot.wait_report(request_id, delivered=1)
    assert [a["text"] for a in sent_to(connector, conversation)] == ["tick"] * 4


# --- credentials -----------------------------------------------------------------------------


async def test_an_expired_secret_loses_nothing_and_delivers_once_fixed(
    fake_aad_service, identity_services, connector, azurite, tmp_path
):
    app_id, secret = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
    fake_aad_service.register_secret(app_id, "the-renewed-secret")  # the bot's has expired

    class App:
        env = {
            "MicrosoftAppId": app_id,
            "MicrosoftAppPassword": secret,
            "BOT_LOGIN_AUTHORITY": fake_aad_service.url,
        }

    env = make_env(App, fake_aad_service, identity_services, connector, azurite)
    bot = Bot(env, azurite)
    host = DevHost(env, tmp_path, functions=("proactive_function",)).wait_started()
    try:
        conversation = f"a:{uuid.uuid4().hex}"
        [key] = await bot.store(reference_for(connector.url, conversation))
        request_id = await bot.send({"to": {"conversation": key}, "text": "patience"})
        deadline = time.monotonic() + TIMEOUT
        while "check the setting MicrosoftAppPassword" not in host.log:
            assert time.monotonic() < deadline, host.log[-3000:]
            await asyncio.sleep(0.1)
        # The copy is queued before the host deletes the original: 2 for a moment.
        while bot.queued() != 1:
            assert time.monotonic() < deadline, bot.queued()
            await asyncio.sleep(0.05)
        assert bot.poisoned() == []
        assert connector.requests == []

        fake_aad_service.register_secret(app_id, secret)  # fixed
        await bot.wait_report(request_id, delivered=1)
        assert [a["text"] for a in sent_to(connector, conversation)] == ["patience"]
        assert bot.poisoned() == []
        assert secret not in host.log
    finally:
        host.stop()
        bot.close()
        await close_shared_clients()


# --- crashes and scale-out ---------------------------------------------------------------------

# The shortest claim the settings accept (room for a send and the write that settles it).
FAST_RECOVERY = {
    "DEVHOST_QUEUE_LEASE_SECONDS": "3",
    "BOT_PROACTIVE_CLAIM_SECONDS": f"{MIN_CLAIM_SECONDS:g}",
}


@pytest.fixture
def shared_env(module_aad_app, fake_aad_service, identity_services, connector, azurite):
    return make_env(
        module_aad_app, fake_aad_service, identity_services, connector, azurite, **FAST_RECOVERY
    )


def conversations_sent(connector: FakeConnector, text: str) -> Counter:
    return Counter(
        r.conversation_id
        for r in connector.requests
        if r.operation == "sendToConversation" and 200 <= r.status < 300 and r.json["text"] == text
    )


async def test_a_host_killed_mid_broadcast_completes_it_after_a_restart(
    shared_env, azurite, connector, tmp_path
):
    bot = Bot(shared_env, azurite)
    conversations = [f"19:kill-{i:03d}" for i in range(300)]
    await bot.store(*(reference_for(connector.url, c, personal=False) for c in conversations))
    first = DevHost(shared_env, tmp_path, functions=("proactive_function",)).wait_started()
    second = None
    try:
        request_id = await bot.send({"to": {"broadcast": {}}, "text": "survive"})
        await connector.wait_for(
            lambda rs: sum(r.operation == "sendToConversation" for r in rs) >= 40, timeout=TIMEOUT
        )
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = conversations_sent(connector, "survive")
        assert len(killed_at) < len(conversations)  # it really was mid-broadcast

        second = DevHost(shared_env, tmp_path, functions=("proactive_function",)).wait_started()
        report = await bot.wait_report(request_id, within=120, targets=300, delivered=300)
        sent = conversations_sent(connector, "survive")
        assert set(sent) == set(conversations)
        twice = [c for c, n in sent.items() if n > 1]
        # Only the documented window: a send whose 2xx came back just before the kill,
        # before its marker was written (at most what was in flight then).
        assert len(twice) <= 48 and all(n == 2 for n in sent.values() if n > 1)
        assert report["failed"] == 0 and bot.poisoned() == []
    finally:
        if first.process.poll() is None:
            first.process.kill()
        if second is not None:
            second.stop()
        bot.close()
        await close_shared_clients()


async def test_two_hosts_share_a_thousand_conversation_broadcast(
    shared_env, azurite, connector, tmp_path
):
    bot = Bot(shared_env, azurite)
    conversations = [f"19:pair-{i:04d}" for i in range(1000)]
    await bot.store(*(reference_for(connector.url, c, personal=False) for c in conversations))
    hosts = [DevHost(shared_env, tmp_path, functions=("proactive_function",)) for _ in range(2)]
    try:
        for host in hosts:
            host.wait_started()
        request_id = await bot.send({"to": {"broadcast": {}}, "text": "together"})
        report = await bot.wait_report(request_id, within=120, targets=1000, delivered=1000)
        sent = conversations_sent(connector, "together")
        assert set(sent) == set(conversations) and set(sent.values()) == {1}
        assert (report["failed"], report["pruned"]) == (0, 0)
        # A host logs a delivery after recording it: its last lines may follow the report.
        deadline = time.monotonic() + TIMEOUT
        while sum(delivered := [host.log.count(": delivered to ") for host in hosts]) < 1000:
            assert time.monotonic() < deadline, delivered
            await asyncio.sleep(0.1)
        assert min(delivered) > 50 and sum(delivered) == 1000, delivered
        assert bot.poisoned() == []
    finally:
        for host in hosts:
            host.stop()
        bot.close()
        await close_shared_clients()


async def test_a_producer_allowed_only_to_enqueue_and_read_still_sends(
    devhost, bot, connector, azurite
):
    # The infra grants producers queue "add" and blob "read": no blob writes. Here that is
    # an account SAS with exactly those rights.
    connection = sas_connection_string(azurite, "rla", services="bq")
    limited = producer.producer_settings(
        {
            **{k: v for k, v in bot.env.items() if k != "AzureWebJobsStorage"},
            "AzureWebJobsStorage": connection,
        }
    )
    conversation = f"a:{uuid.uuid4().hex}"
    [key] = await bot.store(reference_for(connector.url, conversation))

    request_id = await producer.enqueue(
        {"to": {"conversation": key}, "text": "least privilege"}, settings=limited
    )
    deadline = time.monotonic() + TIMEOUT
    while (report := await producer.read_report(request_id, settings=limited)) is None or (
        report["state"] != "done"
    ):
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.2)
    assert report["delivered"] == 1
    assert [a["text"] for a in sent_to(connector, conversation)] == ["least privilege"]
