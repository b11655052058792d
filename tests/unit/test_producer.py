"""The producer API's validation and settings (its storage paths run end to end on Azurite)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from shared.config import SettingsError
from shared.proactive import InvalidRequest
from shared.proactive_schema import parse_request
from shared.producer import _parser, build_request, enqueue, producer_settings
from tests.fixtures.recursion import collector_paused
from tests.fixtures.storage import sas_connection_string


def test_settings_come_from_the_environment_then_local_settings(tmp_path):
    (tmp_path / "local.settings.json").write_text(
        json.dumps(
            {
                "Values": {
                    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                    "BOT_PROACTIVE_QUEUE": "from-file",
                    "BOT_REFERENCES_CONTAINER": "file-container",
                }
            }
        )
    )
    settings = producer_settings({"BOT_PROACTIVE_QUEUE": "from-env"}, tmp_path)
    assert settings.proactive_queue == "from-env"
    assert settings.references_container == "file-container"
    assert settings.storage.connection_string == "UseDevelopmentStorage=true"
    assert not settings.app_id  # a producer needs no bot credentials


def test_storage_set_in_the_environment_replaces_the_files_storage_as_a_whole(tmp_path):
    # README, Deploy step 5: an operator exports the identity-based form in the repo, where
    # `make run` left local.settings.json with the connection string of Azurite.
    (tmp_path / "local.settings.json").write_text(
        json.dumps({"Values": {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}})
    )
    settings = producer_settings(
        {
            "AzureWebJobsStorage__queueServiceUri": "https://acct.queue.core.windows.net",
            "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net",
        },
        tmp_path,
    )
    assert settings.storage.connection_string == ""
    assert settings.storage.service_uri("queue") == "https://acct.queue.core.windows.net"
    assert settings.storage.service_uri("blob") == "https://acct.blob.core.windows.net"

    # And the other way round: a connection string in the environment is not mixed with
    # identity-based settings from the file.
    (tmp_path / "local.settings.json").write_text(
        json.dumps({"Values": {"AzureWebJobsStorage__accountName": "acct"}})
    )
    settings = producer_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, tmp_path)
    assert settings.storage.connection_string == "UseDevelopmentStorage=true"
    assert settings.storage.account_name == ""


def test_storage_given_both_ways_in_one_place_is_read_as_the_host_reads_it(tmp_path, caplog):
    # The connection string wins, as in the Functions host, which enqueues to the same queue.
    with caplog.at_level("WARNING"):
        settings = producer_settings(
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "AzureWebJobsStorage__accountName": "acct",
            },
            tmp_path,
        )
    assert settings.storage.connection_string == "UseDevelopmentStorage=true"
    assert settings.storage.account_name == ""
    assert "AzureWebJobsStorage__accountName are ignored" in caplog.text


def test_bad_names_are_refused_by_setting(tmp_path):
    with pytest.raises(SettingsError) as raised:
        producer_settings({"BOT_PROACTIVE_QUEUE": "Not_A_Queue"}, tmp_path)
    assert "BOT_PROACTIVE_QUEUE" in str(raised.value)


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


NESTED = _nested(100_000)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({"to": {"conversation": "no-slash"}, "text": "x"}, "conversation key"),
        ({"to": {"conversation": "msteams/a"}}, "`activity`"),
        ({"to": {"conversation": "msteams/a"}, "text": "x", "_proactive": {}}, "engine's own"),
        ({"to": {"conversation": "msteams/a"}, "text": "x", "poisonReason": "x"}, "engine's own"),
        (["not", "an", "object"], "object"),
        ({"to": {"conversation": "msteams/a"}, "text": "x" * 49_000}, "larger than"),
        # With a lone surrogate, judged as earlier versions wrote it (all of it escaped,
        # twice the size): an instance still running one would refuse it as too large.
        ({"to": {"conversation": "msteams/a"}, "text": "\ud800" + "中" * 16_180}, "larger than"),
        # Values JSON has no form for: refused as the documented InvalidRequest.
        ({"to": {"conversation": "msteams/a"}, "activity": {"value": float("nan")}}, "finite"),
        ({"to": {"conversation": "msteams/a"}, "activity": {"v": float("-inf")}}, "finite"),
        ({"to": {"conversation": "msteams/a"}, "activity": {"value": object()}}, "not JSON"),
        ({"to": {"conversation": "msteams/a"}, "activity": {"value": {1, 2}}}, "not JSON"),
        ({"to": {"conversation": "msteams/a"}, "activity": NESTED}, "not JSON"),
        # Ids are one printable line of UTF-8 text.
        ({"to": {"conversation": "msteams/a"}, "text": "x", "id": "a\nb"}, "printable"),
        ({"to": {"conversation": "msteams/a"}, "text": "x", "id": "a\x00"}, "printable"),
        ({"to": {"conversation": "msteams/a"}, "text": "x", "id": "a\u2028b"}, "printable"),
        ({"to": {"conversation": "msteams/a"}, "text": "x", "id": "a\udcff"}, "printable"),
    ],
)
async def test_invalid_requests_are_refused_before_anything_is_enqueued(tmp_path, request_, reason):
    # Storage that does not exist: a refusal must come before any storage call.
    settings = producer_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, tmp_path)
    with collector_paused(), pytest.raises(InvalidRequest) as raised:  # NESTED: the limit
        await enqueue(request_, settings=settings)
    assert reason in str(raised.value)


@pytest.mark.parametrize("delay", [-1, 7 * 24 * 3600, float("nan"), "60", True])
async def test_a_delay_outside_the_queues_range_is_refused_before_anything_is_enqueued(
    tmp_path, delay
):
    settings = producer_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, tmp_path)
    request = {"to": {"conversation": "msteams/a"}, "text": "x"}
    with pytest.raises(InvalidRequest, match="delay"):
        await enqueue(request, settings=settings, delay=delay)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_queued_message_with_a_number_json_has_not_is_refused_with_its_reason(constant):
    # From any producer, not only this one: the engine poisons it with this reason at
    # once, instead of every target of a broadcast failing at the Connector.
    body = f'{{"id": "n", "to": {{"broadcast": {{}}}}, "activity": {{"value": {constant}}}}}'
    with pytest.raises(InvalidRequest, match=f"`{constant}` is not a JSON number"):
        parse_request(body)


@pytest.mark.parametrize("number", ["1e999", "-1e999"])
def test_a_queued_message_with_a_number_too_large_for_a_float_is_refused(number):
    # Valid JSON syntax that Python reads as infinity, which would go on as Infinity.
    body = f'{{"id": "n", "to": {{"broadcast": {{}}}}, "activity": {{"value": {number}}}}}'
    with pytest.raises(InvalidRequest, match="numbers must be finite"):
        parse_request(body)


def test_the_command_line_builds_each_target():
    parse = _parser().parse_args
    assert build_request(parse(["send", "--conversation", "msteams/a", "--text", "hi"])) == {
        "to": {"conversation": "msteams/a"},
        "text": "hi",
    }
    user = '{"channelId": "msteams", "id": "29:1", "tenantId": "t", "serviceUrl": "s"}'
    built = build_request(parse(["send", "--user", user, "--activity", '{"text": "a"}']))
    assert built == {"to": {"user": json.loads(user)}, "activity": {"text": "a"}}
    assert build_request(parse(["send", "--broadcast", "--text", "x", "--id", "b"])) == {
        "to": {"broadcast": {}},
        "text": "x",
        "id": "b",
    }
    with pytest.raises(SystemExit):
        parse(["send", "--conversation", "k", "--broadcast", "--text", "x"])
    assert uuid.UUID(str(uuid.uuid4()))


@pytest.mark.integration
async def test_a_queue_another_writer_creates_first_still_gets_the_message(
    azurite, unique_name, monkeypatch
):
    # The queue is missing when the first message goes out, and another writer (a second
    # producer, a host starting up) creates it between our send's 404 and our create.
    from azure.storage.queue import QueueClient as SyncQueueClient
    from azure.storage.queue.aio import QueueClient

    from shared.config import Settings, StorageSettings
    from shared.queues import StorageQueue
    from shared.storage import close_shared_clients

    name = unique_name("race")
    other = SyncQueueClient.from_connection_string(azurite.connection_string, name)
    create = QueueClient.create_queue

    async def another_writer_first(self, **kwargs):
        other.create_queue()  # the other writer wins the race
        return await create(self, **kwargs)

    monkeypatch.setattr(QueueClient, "create_queue", another_writer_first)
    settings = Settings(storage=StorageSettings(connection_string=azurite.connection_string))
    try:
        await StorageQueue(settings, name).put("hello")
    finally:
        await close_shared_clients()
    [message] = other.peek_messages()
    assert base64.b64decode(message.content) == b"hello"  # base64, as Functions expects


@pytest.mark.integration
async def test_the_queue_tells_how_many_messages_it_holds(azurite, unique_name):
    # The fan-out's flow control goes by it (shared/fanout.py): delayed copies count too.
    from shared.config import Settings, StorageSettings
    from shared.queues import StorageQueue
    from shared.storage import close_shared_clients

    settings = Settings(storage=StorageSettings(connection_string=azurite.connection_string))
    queue = StorageQueue(settings, unique_name("depth"))
    try:
        assert await queue.depth() == 0  # not created yet
        for delay in (0.0, 0.0, 30.0):
            await queue.put("child", delay=delay)
        assert await queue.depth() == 3
    finally:
        await close_shared_clients()


@pytest.mark.integration
async def test_messages_the_bot_queues_never_expire_before_they_are_taken(azurite, unique_name):
    # Without a time to live the service deletes a message 7 days after it was put, taken
    # or not: one delayed by nearly 7 days (the producer allows up to MAX_DELAY_SECONDS)
    # would be visible for a minute, then gone unreported. Nor does a poison copy expire
    # before an operator looks. A short delay here: the expiry is set when the message is
    # put, whatever its delay.
    import asyncio
    from datetime import timedelta

    from azure.storage.queue import QueueClient

    from shared.config import Settings, StorageSettings
    from shared.queues import MAX_DELAY_SECONDS, StorageQueue
    from shared.storage import close_shared_clients

    settings = Settings(storage=StorageSettings(connection_string=azurite.connection_string))
    queue = StorageQueue(settings, unique_name("ttl"))
    try:
        await queue.put("later", delay=1)
        await queue.poison("broken", "invalid request: test")
    finally:
        await close_shared_clients()
    received = []
    for name in (queue.name, f"{queue.name}-poison"):
        client = QueueClient.from_connection_string(azurite.connection_string, name)
        try:
            for _ in range(100):  # the delayed one becomes visible after a second
                received += list(client.receive_messages(visibility_timeout=60))
                if len(received) == (1 if name == queue.name else 2):
                    break
                await asyncio.sleep(0.1)
        finally:
            client.close()
    assert len(received) == 2
    for message in received:
        kept = message.expires_on - message.inserted_on
        assert kept > timedelta(seconds=MAX_DELAY_SECONDS, days=365), message.expires_on


@pytest.mark.integration
async def test_a_queue_the_identity_may_not_read_has_an_unknown_depth(azurite, unique_name, caplog):
    # An identity allowed to add and take messages but not to read the queue's properties:
    # the depth is unknown (the fan-out then adds pages as if the queue were not full), and
    # the log names the error's type, never the credential.
    from shared.config import Settings, StorageSettings
    from shared.queues import StorageQueue
    from shared.storage import close_shared_clients

    connection = sas_connection_string(azurite, "acp", services="q")
    queue = StorageQueue(
        Settings(storage=StorageSettings(connection_string=connection)), unique_name("depth")
    )
    try:
        await queue.put("child")  # allowed
        assert await queue.depth() is None
    finally:
        await close_shared_clients()
    [warning] = [r for r in caplog.records if "depth unknown" in r.getMessage()]
    assert "HttpResponseError" in warning.getMessage()
    assert connection.split("sig=")[1][:12] not in caplog.text


@pytest.mark.integration
async def test_a_new_reports_update_time_is_never_before_its_creation(azurite, unique_name):
    # createdAt is the producer's clock in milliseconds; blob times have whole seconds.
    from shared.config import Settings, StorageSettings
    from shared.producer import read_report
    from shared.storage import close_shared_clients

    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("refs"),
        proactive_queue=unique_name("proactive"),
    )
    try:
        reports = []
        for _ in range(3):
            request = {"to": {"conversation": "msteams/19:a@thread.tacv2"}, "text": "hi"}
            reports.append(
                await read_report(await enqueue(request, settings=settings), settings=settings)
            )
    finally:
        await close_shared_clients()
    assert [r["state"] for r in reports] == ["pending"] * 3
    assert [r["updatedAt"] >= r["createdAt"] for r in reports] == [True] * 3, reports


def test_a_blank_storage_setting_in_the_environment_does_not_replace_the_files(tmp_path):
    # A blank value is no setting: an exported but empty AzureWebJobsStorage__clientId (or
    # AzureWebJobsStorage) must not throw away the connection string of the file.
    (tmp_path / "local.settings.json").write_text(
        json.dumps({"Values": {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}})
    )
    for blank in ({"AzureWebJobsStorage__clientId": "  "}, {"AzureWebJobsStorage": ""}):
        settings = producer_settings(blank, tmp_path)
        assert settings.storage.connection_string == "UseDevelopmentStorage=true", blank


async def test_a_report_whose_creation_time_is_not_a_time_keeps_its_update_time():
    # A head someone edited by hand: createdAt is shown as found, updatedAt stays a time.
    from shared.ledger import MemoryLedger, iso
    from shared.reports import head_name, new_head, read_report

    ledger = MemoryLedger(clock=lambda: 1_800_000_000.0)
    for created in ("not a time", "zzzz", None, 12):
        head = {**new_head("r1", "single", 1_700_000_000.0), "createdAt": created}
        ledger.blobs.clear()
        await ledger.create(head_name("r1"), head)
        report = await read_report(ledger, "r1")
        assert report["createdAt"] == created
        assert report["updatedAt"] == iso(1_800_000_000.0), report


async def test_a_report_is_updated_when_its_latest_outcome_was_recorded():
    from shared.ledger import MemoryLedger, iso
    from shared.reports import ensure_head, read_report, record_outcome

    now = [1_800_000_000.0]
    ledger = MemoryLedger(clock=lambda: now[0])
    await ensure_head(ledger, "b1", "broadcast", now[0])
    for key in ("msteams/a:1", "msteams/a:2"):
        now[0] += 60
        await record_outcome(ledger, "b1", key, "delivered", now[0])
    report = await read_report(ledger, "b1")
    assert (report["createdAt"], report["updatedAt"]) == (iso(1_800_000_000.0), iso(now[0]))


@pytest.mark.parametrize("read_back", ["fails", "finds another writer's", "finds its own"])
async def test_a_head_created_with_its_answer_lost_is_known_by_its_mark(read_back):
    # The create landed and its answer was lost (the client's retry found it there): the
    # mark it carries, read back, tells whether the head is this call's (so the producer
    # takes it back if the queue refuses the request). A read-back that fails took the
    # head for another writer's, as before the mark: it no longer failed the enqueue.
    from shared.ledger import MemoryLedger
    from shared.references import StoreError
    from shared.reports import create_own_head, head_name, new_head

    class AnswerLost(MemoryLedger):
        async def create(self, name, data, *, metadata=None):
            if read_back == "finds another writer's":
                data = {**new_head("r1", "single", 0.0), "write": "another"}
            await MemoryLedger.create(self, name, data, metadata=metadata)
            return None

        async def read(self, name):
            if read_back == "fails":
                raise StoreError("storage answered 503", status=503)
            return await MemoryLedger.read(self, name)

    ledger = AnswerLost()
    etag = await create_own_head(ledger, "r1", "single", 0.0)

    if read_back == "finds its own":
        assert etag is not None and etag == ledger.blobs[head_name("r1")][2]
    else:
        assert etag is None
