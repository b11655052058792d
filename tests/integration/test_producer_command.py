"""The producer command as an operator runs it (a subprocess), against Azurite: what it
prints, its exit status, and what it leaves on the queue and in the container."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from tests.fixtures.devhost import ROOT
from tests.fixtures.storage import (
    ANSWER_TEXT,
    UNREADABLE_ANSWERS,
    sas_connection_string,
    unreadable_storage,
)
from tools.azurite import ACCOUNT, ACCOUNT_KEY

pytestmark = pytest.mark.integration


def producer(env: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "shared.producer", *args],
        cwd=ROOT,
        env={**keep, **env},
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )


@pytest.fixture
def storage(azurite, unique_name) -> dict[str, str]:
    return {
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("cmd"),
        "BOT_PROACTIVE_QUEUE": unique_name("cmd"),
    }


def queued(env: dict[str, str]) -> int:
    queue = QueueClient.from_connection_string(
        env["AzureWebJobsStorage"], env["BOT_PROACTIVE_QUEUE"]
    )
    try:
        return len(queue.peek_messages(max_messages=32))
    except ResourceNotFoundError:
        return 0
    finally:
        queue.close()


def blobs(connection: str, container: str) -> list[str]:
    client = ContainerClient.from_connection_string(connection, container)
    try:
        return [blob.name for blob in client.list_blobs()]
    except ResourceNotFoundError:
        return []
    finally:
        client.close()


@contextlib.asynccontextmanager
async def blob_proxy(azurite, storage, handle):
    """Azurite's blob service behind a local HTTP proxy: ``handle(request, forward)``
    answers each request (``await forward()`` passes it on as it came and gives Azurite's
    answer). Yields the producer's settings reaching blobs through it (queues directly).
    Requests go on with the path, query and headers they came with (signed by the
    client's shared key)."""
    from aiohttp import ClientSession, web
    from yarl import URL

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        target = URL(azurite.blob_url.rsplit("/", 1)[0] + request.raw_path, encoded=True)
        body = await request.read()
        async with session.request(
            request.method,
            target,
            headers=headers,
            data=body or None,
            skip_auto_headers=("Content-Type",),  # signed: only the client's own
        ) as answer:
            answered = await answer.read()
            kept = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=answer.status, headers=kept, body=answered)

    async def route(request: web.Request) -> web.Response:
        return await handle(request, lambda: forward(request))

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", route)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    blob_url = f"http://127.0.0.1:{runner.addresses[0][1]}/{ACCOUNT}"
    try:
        async with ClientSession() as session:
            yield {
                **storage,
                "AzureWebJobsStorage": (
                    f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                    f"BlobEndpoint={blob_url};QueueEndpoint={azurite.queue_url};"
                ),
            }
    finally:
        await runner.cleanup()


# Azure's answer to a request a role (or its condition) does not allow.
NOT_ALLOWED = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationPermissionMismatch'
    b"</Code><Message>This request is not authorized to perform this operation using this "
    b"permission.</Message></Error>"
)


async def test_the_producer_works_within_its_roles_read_condition(azurite, storage):
    # On Azure a producer's identity reads the references container through Storage Blob
    # Data Reader, held by a condition (infra/modules/storage.bicep, built and checked by
    # tools/infra_check.py) to the prefixes it needs: never the bot's state or its user
    # index. Azurite checks no roles, so this proxy makes the role's decisions (a stand-in
    # for Azure's checks): no writes; a blob read only under those prefixes; a listing
    # only with a prefix under them.
    from aiohttp import web

    from shared.config import Settings, StorageSettings
    from shared.references import BlobReferenceStore
    from shared.reports import head_name
    from shared.state import user_state_key
    from shared.state_blob import BlobStateStore, state_blob_name
    from tools.infra_check import PRODUCER_READS

    settings = Settings(
        storage=StorageSettings(connection_string=storage["AzureWebJobsStorage"]),
        references_container=storage["BOT_REFERENCES_CONTAINER"],
    )
    references, states = BlobReferenceStore(settings), BlobStateStore(settings)
    try:
        await references.upsert(
            {
                "channelId": "msteams",
                "serviceUrl": "https://smba.trafficmanager.net/amer/",
                "conversation": {"id": "a:1", "conversationType": "personal", "tenantId": "t"},
                "bot": {"id": "28:bot"},
                "user": {"id": "29:u", "aadObjectId": "00000000-0000-0000-0000-000000000001"},
            }
        )
        await states.write(user_state_key("msteams", "29:u"), {"secret": "s"}, etag=None)
    finally:
        await references.close()
        await states.close()
    put = ("schedule", "put", "standup", "--cron", "0 0 9 * * 1-5")
    assert producer(storage, *put, "--conversation", "msteams/a:1", "--text", "x").returncode == 0
    sent = producer(storage, "send", "--conversation", "msteams/a:1", "--text", "x", "--id", "r1")
    assert sent.returncode == 0, sent.stderr

    refused: list[tuple[str, str]] = []

    async def as_the_role_allows(request, forward):
        container, _, blob = request.path.removeprefix(f"/{ACCOUNT}/").partition("/")
        if request.method not in ("GET", "HEAD"):
            allowed = False  # a Reader writes nothing
        elif blob:
            allowed = blob.startswith(PRODUCER_READS)
        elif container and request.query.get("comp") == "list":
            allowed = request.query.get("prefix", "").startswith(PRODUCER_READS)
        else:
            allowed = True
        if allowed:
            return await forward()
        refused.append((request.method, blob or request.query.get("prefix", "")))
        return web.Response(
            status=403,
            headers={"x-ms-error-code": "AuthorizationPermissionMismatch"},
            body=NOT_ALLOWED,
            content_type="application/xml",
        )

    async with blob_proxy(azurite, storage, as_the_role_allows) as held:
        listed = await asyncio.to_thread(producer, held, "conversations")
        report = await asyncio.to_thread(producer, held, "report", "r1")
        scheduled = await asyncio.to_thread(producer, held, "schedule", "list")
        again = await asyncio.to_thread(
            producer, held, "send", "--conversation", "msteams/a:1", "--text", "y", "--id", "r2"
        )
        assert refused == [("PUT", head_name("r2"))]  # the report's head: a write
        # What the condition holds back: the bot's state, and the container as a whole.
        state = ContainerClient.from_connection_string(
            held["AzureWebJobsStorage"], held["BOT_REFERENCES_CONTAINER"]
        )
        with state:
            with pytest.raises(HttpResponseError) as denied:
                name = state_blob_name(user_state_key("msteams", "29:u"))
                await asyncio.to_thread(lambda: state.download_blob(name).readall())
            assert denied.value.status_code == 403
            with pytest.raises(HttpResponseError) as denied:
                await asyncio.to_thread(lambda: list(state.list_blobs()))
            assert denied.value.status_code == 403

    assert (listed.returncode, listed.stdout) == (0, "msteams/a:1\n"), listed.stderr
    assert report.returncode == 0 and '"state": "pending"' in report.stdout, report.stderr
    assert scheduled.returncode == 0 and '"name": "standup"' in scheduled.stdout
    assert (again.returncode, again.stdout) == (0, "r2\n"), again.stderr
    assert queued(storage) == 2


DEEP = "[" * 100_000
BAD_INPUT = {
    # Python's json reads these; no JSON parser does (the Connector's included).
    "NaN": (["--activity", '{"text": "a", "value": NaN}'], "--activity is not valid JSON"),
    "Infinity": (["--activity", '{"text": "a", "value": -Infinity}'], "not valid JSON"),
    "nested too deep": (["--activity", DEEP], "--activity is not valid JSON"),
    # An id is printed on one line and is a blob name: printable UTF-8 text only.
    "id not UTF-8": (["--text", "hi", "--id", b"id-\xff"], "`id` must be printable"),
    "id with a newline": (["--text", "hi", "--id", "line1\nline2"], "`id` must be printable"),
    "id with an escape": (["--text", "hi", "--id", "a\x1b[2Jb"], "`id` must be printable"),
    # Bytes a UTF-8 terminal could not decode (Latin-1 "café"): sent as they came before.
    "text not UTF-8": (["--text", b"caf\xe9"], "--text is not text in the terminal's"),
    "activity not UTF-8": (["--activity", b'{"text": "caf\xe9"}'], "--activity is not text"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_1_with_one_line_saying_what_and_writes_nothing(storage, case):
    args, reason = BAD_INPUT[case]
    result = producer(storage, "send", "--conversation", "msteams/a:1", *args)

    assert (result.returncode, result.stdout) == (1, ""), result.stderr[-500:]
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and reason in line, line
    assert "could not reach storage" not in line
    assert queued(storage) == 0
    assert blobs(storage["AzureWebJobsStorage"], storage["BOT_REFERENCES_CONTAINER"]) == []


def test_a_request_the_queue_refuses_leaves_no_pending_report(azurite, storage):
    # Blob writes allowed, queue refused: a producer role with Blob write but no Queue
    # Sender. `send` fails, and no report says `pending` for a request never queued (a
    # script polling `report` until it is done would wait for ever).
    blob_only = {**storage, "AzureWebJobsStorage": sas_connection_string(azurite, "rwdlc")}

    send = ("send", "--conversation", "msteams/a:1", "--text", "hi", "--id", "r1")
    sent = producer(blob_only, *send)
    assert (sent.returncode, sent.stdout) == (1, "")
    assert sent.stderr.startswith("error: ") and sent.stderr.count("\n") == 1, sent.stderr
    # What the queue said (its status; the credential to check), not "unreachable".
    assert "403" in sent.stderr and "could not reach" not in sent.stderr, sent.stderr
    assert "may have been queued" not in sent.stderr  # refused: surely not queued

    report = producer(storage, "report", "r1")
    assert (report.returncode, report.stdout) == (1, ""), report.stdout
    assert "no report for 'r1'" in report.stderr
    assert blobs(azurite.connection_string, storage["BOT_REFERENCES_CONTAINER"]) == []
    assert queued(storage) == 0

    # The same request once the queue takes it: queued, and reported pending.
    sent = producer(storage, *send)
    assert (sent.returncode, sent.stdout) == (0, "r1\n"), sent.stderr
    assert queued(storage) == 1
    assert '"state": "pending"' in producer(storage, "report", "r1").stdout


def test_an_id_another_request_holds_is_refused_and_the_same_request_sent_again(azurite, storage):
    # A broadcast, or other text, under an id a request already holds went to the queue
    # and `send` said it was sent: the queue then sent whichever message came first, and
    # the broadcast was dropped as a duplicate of the single request.
    send = ("send", "--conversation", "msteams/a:1", "--text", "hi", "--id", "r1")
    assert producer(storage, *send).returncode == 0
    for other in (
        ("send", "--conversation", "msteams/a:1", "--text", "other", "--id", "r1"),
        ("send", "--conversation", "msteams/a:2", "--text", "hi", "--id", "r1"),
        ("send", "--broadcast", "--text", "hi", "--id", "r1"),
    ):
        refused = producer(storage, *other)
        assert (refused.returncode, refused.stdout) == (1, ""), other
        assert "already another request's" in refused.stderr and "'r1'" in refused.stderr
    again = producer(storage, *send)  # the same request sent again (its answer was lost)
    assert (again.returncode, again.stdout) == (0, "r1\n"), again.stderr
    assert queued(storage) == 2
    # Rebuilt from stored data, its JSON's keys in another order, 1.0 for 1: the same.
    activity = ("send", "--conversation", "msteams/a:1", "--id", "r2", "--activity")
    first = '{"type": "message", "text": "hi", "value": {"n": 1, "m": 2}}'
    rebuilt = '{"value": {"m": 2, "n": 1.0}, "text": "hi", "type": "message"}'
    assert producer(storage, *activity, first).returncode == 0
    assert producer(storage, *activity, rebuilt).returncode == 0
    # With the read-only role the template grants (the head is the first sender's), the
    # id is checked all the same.
    read_only = sas_connection_string(azurite, "rla", services="bq")
    reader = {**storage, "AzureWebJobsStorage": read_only}
    refused = producer(reader, "send", "--broadcast", "--text", "hi", "--id", "r1")
    assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
    assert producer(reader, *send).returncode == 0
    assert queued(storage) == 5


def test_settings_that_reach_blobs_but_no_queue_leave_no_pending_report(azurite, storage):
    # A connection string without a QueueEndpoint: refused before the report's head is
    # written, which said `pending` for ever for a request never queued.
    blobs_only = sas_connection_string(azurite, "rwdlc").replace(
        f"QueueEndpoint={azurite.queue_url};", ""
    )
    sent = producer(
        {**storage, "AzureWebJobsStorage": blobs_only},
        *("send", "--conversation", "msteams/a:1", "--text", "hi", "--id", "r1"),
    )
    assert (sent.returncode, sent.stdout) == (1, ""), sent.stderr
    assert sent.stderr.startswith("error: setting AzureWebJobsStorage"), sent.stderr
    assert blobs(azurite.connection_string, storage["BOT_REFERENCES_CONTAINER"]) == []
    assert producer(storage, "report", "r1").returncode == 1  # no report at all


@pytest.mark.parametrize("queue", ["answers 500", "drops the connection once it has read"])
async def test_a_put_that_may_have_landed_keeps_its_report(azurite, storage, queue):
    # A put answered 500, or whose connection dropped after it was sent (the client raises
    # a connection error then, as when nothing was sent), may have stored the message, which
    # an instance may be fanning out from the head already: the head stays (`pending`).
    from shared.proactive_schema import InvalidRequest
    from shared.producer import close, enqueue, producer_settings, read_report

    async with broken_queue(azurite, storage, answer_500=queue == "answers 500") as env:
        settings = producer_settings(env)
        try:
            request = {"id": "r-maybe", "to": {"conversation": "msteams/a:1"}, "text": "hi"}
            with pytest.raises(Exception) as raised:
                await enqueue(request, settings=settings)
            assert not isinstance(raised.value, InvalidRequest)
            assert (await read_report("r-maybe", settings=settings))["state"] == "pending"
        finally:
            await close()


@pytest.mark.parametrize("chosen", [None, "-x 1"])
async def test_a_send_that_may_have_landed_names_its_id_so_a_retry_sends_once(
    azurite, storage, chosen
):
    # The queue answers 500: the put may have landed (the client retried it, too). The
    # command chose the id; without it on stderr, a second `send` was a new request. The
    # `report` it names runs as pasted, an id starting with `-` too (argparse took it for
    # an option).
    send = ("send", "--conversation", "msteams/a:1", "--text", "hi")
    async with broken_queue(azurite, storage, answer_500=True) as env:
        given = () if chosen is None else (f"--id={chosen}",)
        sent = await asyncio.to_thread(producer, env, *send, *given)

    assert (sent.returncode, sent.stdout) == (1, ""), sent.stderr
    assert len(sent.stderr.splitlines()) == 1, sent.stderr
    line = sent.stderr.strip()
    assert line.startswith("error: ") and "may have been queued" in line, line
    [option] = shlex.split(line.split("send it with ")[1])
    request_id = option.removeprefix("--id=")
    assert chosen is None or request_id == chosen
    command = shlex.split(line.split("see `")[1].split("`")[0])
    assert command[:2] == ["report", "--"]
    report = producer(storage, *command)
    assert report.returncode == 0 and '"state": "pending"' in report.stdout, report.stderr


async def test_a_report_head_whose_answers_were_lost_names_the_id_that_repairs_it(azurite, storage):
    # Blob storage stores the report's head, but every answer to its create is lost (a
    # 500 in their place; the client's retries find it exists, and those answers are lost
    # too). Nothing is queued and the report reads `pending`; the error said only "could
    # not write", and the id the command chose was shown nowhere, so that report stayed
    # `pending` for ever. Sent again with the id named, it is queued.
    from aiohttp import web

    heads: list[int] = []

    async def lose_the_heads_answers(request, forward):
        answer = await forward()
        if request.method == "PUT" and request.path.endswith("/head.json"):
            heads.append(answer.status)
            if answer.status in (201, 409):
                return web.Response(status=500)  # the create's own answer, lost
        return answer

    send = ("send", "--conversation", "msteams/a:1", "--text", "hi")
    async with blob_proxy(azurite, storage, lose_the_heads_answers) as env:
        sent = await asyncio.to_thread(producer, env, *send)

    assert heads.count(201) == 1 and heads[heads.index(201) + 1 :], heads
    assert (sent.returncode, sent.stdout) == (1, ""), sent.stderr
    [line] = sent.stderr.splitlines()
    assert line.startswith("error: ") and "was not queued" in line, line
    hint = shlex.split(line.split("send it with ")[1])  # as a shell reads it, pasted
    request_id = hint[0].removeprefix("--id=")
    assert queued(storage) == 0
    report = producer(storage, "report", request_id)
    assert report.returncode == 0 and '"state": "pending"' in report.stdout, report.stderr

    again = producer(storage, *send, *hint)
    assert (again.returncode, again.stdout) == (0, f"{request_id}\n"), again.stderr
    assert queued(storage) == 1


async def test_a_head_created_with_its_answer_lost_goes_when_the_queue_refuses(azurite, storage):
    # The head's create is stored and its answer lost (a 500 in its place); the client's
    # retry finds it there (409). The queue then refuses the request: the head was taken
    # for another writer's and kept, so the report read `pending` for ever for a request
    # never queued.
    from aiohttp import web

    from shared.producer import close, enqueue, producer_settings, read_report
    from shared.queues import QueueError

    heads: list[int] = []

    async def lose_the_first_heads_answer(request, forward):
        answer = await forward()
        if request.method == "PUT" and request.path.endswith("/head.json"):
            heads.append(answer.status)
            if answer.status == 201:
                return web.Response(status=500)
        return answer

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(NOT_ALLOWED), NOT_ALLOWED)
            )
            await writer.drain()
        writer.close()

    queue_server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    queue_url = f"http://127.0.0.1:{queue_server.sockets[0].getsockname()[1]}/{ACCOUNT}"
    try:
        async with blob_proxy(azurite, storage, lose_the_first_heads_answer) as env:
            connection = env["AzureWebJobsStorage"].replace(azurite.queue_url, queue_url)
            settings = producer_settings({**env, "AzureWebJobsStorage": connection})
            request = {"id": "r-lost", "to": {"conversation": "msteams/a:1"}, "text": "hi"}
            with pytest.raises(QueueError) as refused:
                await enqueue(request, settings=settings)
            assert refused.value.status == 403
            assert heads[-2:] == [201, 409]  # (after a 404 when the container is new)
            assert await read_report("r-lost", settings=producer_settings(storage)) is None
    finally:
        await close()
        queue_server.close()
        await queue_server.wait_closed()
    assert blobs(azurite.connection_string, storage["BOT_REFERENCES_CONTAINER"]) == []


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_report_and_conversations_whose_listing_cannot_be_read_say_so(answer):
    # Storage answered the listing 200 with what its SDK cannot read (a proxy's page, XML
    # cut short): each command said "could not reach storage (DeserializationError)" (it
    # was reached) or "HTTP 200". One line naming the listing; never the answer's text.
    from shared.reports import request_prefix

    async with unreadable_storage(answer) as fake:
        env = {
            "AzureWebJobsStorage": fake.connection_string,
            "BOT_REFERENCES_CONTAINER": "refs",
            "BOT_PROACTIVE_QUEUE": "proactive",
        }
        report = await asyncio.to_thread(producer, env, "report", "r1")
        listed = await asyncio.to_thread(producer, env, "conversations", '{"personal": true}')

    assert len([r for r in fake.requests if "comp=list" in r]) == 2
    for done, listing in (
        (report, f"proactive ledger: list {request_prefix('r1')}"),
        (listed, "reference store: list '*'"),
    ):
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"error: {listing} failed: the answer could not be read ("), line
        assert ANSWER_TEXT not in done.stderr


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_send_whose_put_answer_cannot_be_read_may_have_been_queued(
    azurite, storage, answer
):
    # The queue answered the put 201 (it landed) with a body the SDK cannot read: `send`
    # said "could not reach storage" and not that the request may have been queued, so
    # a second `send` was a second request; for a ValueError (a body not in UTF-8) it also
    # took the request's report away, as for a put refused before it was sent.
    async with unreadable_storage(answer) as fake:
        env = {
            **storage,
            "AzureWebJobsStorage": (
                f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={azurite.blob_url};QueueEndpoint={fake.queue_url};"
            ),
        }
        request_id = "-r unread; 2026"  # a shell would split it, or read it as an option
        send = ("send", "--conversation", "msteams/a:1", "--text", "hi", f"--id={request_id}")
        sent = await asyncio.to_thread(producer, env, *send)

    assert (sent.returncode, sent.stdout) == (1, ""), sent.stderr
    [line] = sent.stderr.splitlines()
    queue = storage["BOT_PROACTIVE_QUEUE"]
    assert line.startswith(f"error: queue {queue!r}: put failed: the answer could not be read ("), (
        line
    )
    assert f"{request_id!r} may have been queued" in line, line
    assert shlex.split(line.split("send it with ")[1]) == [f"--id={request_id}"], line
    assert ANSWER_TEXT not in sent.stderr
    report = producer(storage, "report", request_id)
    assert report.returncode == 0 and '"state": "pending"' in report.stdout, report.stderr


@contextlib.asynccontextmanager
async def broken_queue(azurite, storage: dict[str, str], *, answer_500: bool):
    """The settings of `storage` with its queue endpoint a server that answers every
    request 500 (`answer_500`) or drops the connection once it has read it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if answer_500:
                writer.write(b"HTTP/1.1 500 Internal\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield {
            **storage,
            "AzureWebJobsStorage": (
                f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={azurite.blob_url};QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
            ),
        }
    finally:
        server.close()
        await server.wait_closed()


SCRIPT = """
import asyncio

import shared.producer as producer


async def main():
    request_id = await producer.enqueue({"to": {"conversation": "msteams/a:1"}, "text": "hi"})
    report = await producer.read_report(request_id)
    print(request_id, report["state"])
    await producer.close()


asyncio.run(main())
"""


def test_an_id_stdout_cannot_encode_is_printed_escaped_and_the_send_succeeds(storage):
    # On a stdout that cannot encode the id (a pipe in an ANSI code page), the message
    # was queued but the command exited 1 saying storage could not be reached.
    env = {**storage, "PYTHONIOENCODING": "ascii"}
    sent = producer(env, "send", "--conversation", "msteams/a:1", "--text", "x", "--id", "café-1")
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, "caf\\xe9-1\n", "")
    assert queued(storage) == 1
    report = producer(env, "report", "café-1")
    assert report.returncode == 0 and '"pending"' in report.stdout


def producer_to_closed_stdout(env: dict[str, str], *args: str, fd: bool = True) -> tuple:
    """The command run with a stdout whose reader has gone (`... | head -c0`), or with no
    stdout at all (`fd=False`: `... >&-`)."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shared.producer", *args],
            cwd=ROOT,
            env={**keep, **env},
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            preexec_fn=None if fd else (lambda: os.close(1)),
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr


def test_a_command_whose_stdout_is_closed_says_so_and_what_it_did(storage):
    # The message was queued, the schedule written, yet each command said it could not
    # reach storage (or, for `schedule put`, that it failed).
    # With no stdout at all (`fd=False`), the id went nowhere and the command said nothing.
    for fd, n in ((True, 1), (False, 2)):
        command = ["send", "--conversation", "msteams/a:1", "--text", "x", "--id", f"r-{n}"]
        done = producer_to_closed_stdout(storage, *command, fd=fd)
        assert done == (0, f"request 'r-{n}' was queued\n")
        assert queued(storage) == n
        put = ["schedule", "put", f"daily-{n}", "--cron", "0 0 9 * * *"]
        put += ["--conversation", "msteams/a:1", "--text", "x"]
        done = producer_to_closed_stdout(storage, *put, fd=fd)
        assert done == (0, f"schedule 'daily-{n}' was written\n")
        assert f"daily-{n}" in producer(storage, "schedule", "list").stdout
    # A command whose output is lost: an error, but not storage's.
    expected = (1, "error: stdout was closed before the output was written\n")
    for fd in (True, False):
        assert producer_to_closed_stdout(storage, "report", "r-1", fd=fd) == expected


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_output_that_cannot_be_written_is_said_to_be_stdouts_not_storages(storage):
    # A full disk behind stdout was "could not reach storage (OSError)".
    producer(storage, "send", "--conversation", "msteams/a:1", "--text", "x", "--id", "r-1")
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    for command in (["report", "r-1"], ["conversations"], ["schedule", "list"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [sys.executable, "-m", "shared.producer", *command],
                cwd=ROOT,
                env={**keep, **storage},
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        if command == ["conversations"] or command == ["schedule", "list"]:
            # Nothing stored to list: nothing written, nothing to fail.
            assert (done.returncode, done.stderr) == (0, ""), command
        else:
            assert (done.returncode, done.stderr) == (
                1,
                "error: stdout could not be written (ENOSPC)\n",
            )


def head_blob(storage: dict[str, str], request_id: str) -> str:
    from shared.reports import head_name

    return head_name(request_id)


@pytest.mark.parametrize(
    "head",
    [[], "x", {"kind": "broadcast", "targets": "x"}, {"kind": "broadcast", "targets": 1e300}],
)
def test_a_report_head_that_is_not_one_says_so_rather_than_blaming_storage(storage, head):
    # JSON of another shape (edited by hand, another program) was "could not reach
    # storage (AttributeError)": storage answered, the blob was the trouble.
    producer(storage, "send", "--conversation", "msteams/a:1", "--text", "x", "--id", "r-1")
    client = ContainerClient.from_connection_string(
        storage["AzureWebJobsStorage"], storage["BOT_REFERENCES_CONTAINER"]
    )
    with client:
        client.upload_blob(head_blob(storage, "r-1"), json.dumps(head), overwrite=True)
    done = producer(storage, "report", "r-1")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: proactive ledger: ")
    assert done.stderr.endswith("is not a report's head\n")


async def test_a_broadcast_whose_head_is_gone_is_not_reported_as_a_finished_single(storage):
    # A rule deleting old blobs took the head before its targets' outcomes: the report
    # read "done", 1 target, 5 delivered.
    from shared.config import Settings, StorageSettings
    from shared.ledger import BlobLedger
    from shared.producer import close
    from shared.reports import record_outcome

    settings = Settings(
        storage=StorageSettings(connection_string=storage["AzureWebJobsStorage"]),
        references_container=storage["BOT_REFERENCES_CONTAINER"],
    )
    ledger = BlobLedger(settings)
    try:
        for n in range(5):
            await record_outcome(ledger, "b-1", f"msteams/a:{n}", "delivered", 0.0)
    finally:
        await close()
    done = await asyncio.to_thread(producer, storage, "report", "b-1")
    report = json.loads(done.stdout)
    assert (report["state"], report["targets"], report["delivered"]) == ("running", 5, 5)


def test_a_script_using_the_python_api_closes_what_it_opened(storage):
    # asyncio.run ends the loop: clients left open print "Unclosed client session" then.
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={**keep, **storage},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "pending"
    assert "Unclosed" not in done.stderr and done.stderr == ""
    assert queued(storage) == 1


# ---------------------------------------------------------------------------- schedules


def schedules(env: dict[str, str]) -> list[dict]:
    import json

    listed = producer(env, "schedule", "list")
    assert (listed.returncode, listed.stderr) == (0, ""), listed.stderr[-500:]
    return [json.loads(line) for line in listed.stdout.splitlines()]


async def test_a_schedule_put_by_the_command_is_listed_run_by_the_timer_and_deleted(storage):
    from datetime import UTC, datetime

    from shared.ledger import BlobLedger
    from shared.producer import close, producer_settings
    from shared.queues import StorageQueue
    from shared.schedules import run_schedules

    put = ("schedule", "put", "standup", "--cron", "0 0 9 * * 1-5")
    written = producer(storage, *put, "--conversation", "msteams/a:1", "--text", "Stand-up")
    assert (written.returncode, written.stdout, written.stderr) == (0, "standup\n", "")
    [listed] = schedules(storage)
    assert listed["name"] == "standup" and listed["schedule"] == "0 0 9 * * 1-5"
    assert listed["enabled"] is True and "problem" not in listed
    assert listed["request"] == {"to": {"conversation": "msteams/a:1"}, "text": "Stand-up"}

    # Written again: replaced, not added to.
    again = producer(storage, *put, "--broadcast", '{"channelId": "msteams"}', "--text", "All")
    assert again.returncode == 0, again.stderr
    [listed] = schedules(storage)
    assert listed["request"] == {"to": {"broadcast": {"channelId": "msteams"}}, "text": "All"}

    # The timer, on a Monday at 09:00:30: one send, with the schedule's id for that minute.
    settings = producer_settings(storage)
    ledger, queue = BlobLedger(settings), StorageQueue(settings)
    monday = datetime(2030, 1, 7, 9, 0, 30, tzinfo=UTC)
    try:
        assert await run_schedules(ledger, queue, monday) == ["schedule:standup:2030-01-07T09:00Z"]
    finally:
        await close()
    assert queued(storage) == 1
    assert any(name.startswith("proactive-schedules/") for name in stored(storage))

    deleted = producer(storage, "schedule", "delete", "standup")
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, "", "")
    assert schedules(storage) == []
    # Its last-run record stays, marked removed: the schedule written again under that
    # name starts afresh, and never reuses an id of the minute of its last run.
    [record] = stored(storage)
    assert record.startswith("proactive-schedules/")
    missing = producer(storage, "schedule", "delete", "standup")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "error: no schedule named 'standup'\n"
    assert queued(storage) == 1  # what was enqueued before the delete is still delivered


def stored(env: dict[str, str]) -> list[str]:
    return blobs(env["AzureWebJobsStorage"], env["BOT_REFERENCES_CONTAINER"])


BAD_SCHEDULES = {
    "cron with 5 fields": (["standup", "--cron", "0 9 * * 1-5"], "6-field NCRONTAB"),
    "cron that never falls due": (["standup", "--cron", "0 0 0 30 2 *"], "never falls due"),
    "name in a folder": (["team/standup", "--cron", "0 0 9 * * *"], "schedule's name is"),
    "name with a space": (["stand up", "--cron", "0 0 9 * * *"], "schedule's name is"),
    "request too large": (["s", "--cron", "0 0 9 * * *", "--text", "x" * 50_000], "larger than"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULES))
def test_a_schedule_the_timer_would_skip_is_refused_and_nothing_is_written(storage, case):
    args, reason = BAD_SCHEDULES[case]
    content = [] if "--text" in args else ["--text", "hi"]
    result = producer(storage, "schedule", "put", *args, "--conversation", "msteams/a:1", *content)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr[-500:]
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and reason in line, line
    assert stored(storage) == []


def test_a_disabled_schedule_and_a_broken_document_are_listed_as_the_timer_sees_them(storage):
    from azure.storage.blob import ContainerClient

    put = ("schedule", "put", "paused", "--cron", "0 0 9 * * *", "--disabled")
    assert producer(storage, *put, "--conversation", "msteams/a:1", "--text", "x").returncode == 0
    container = ContainerClient.from_connection_string(
        storage["AzureWebJobsStorage"], storage["BOT_REFERENCES_CONTAINER"]
    )
    with container:
        container.upload_blob("schedules/broken.json", b'{"schedule": "secret-ish', overwrite=True)
        container.upload_blob(
            "schedules/odd.json", b'{"schedule": "0 0 9 * * *", "request": {"text": "x"}}'
        )

    listed = {line["name"]: line for line in schedules(storage)}

    assert listed["paused"]["enabled"] is False
    assert listed["broken"] == {
        "name": "broken",
        "blob": "schedules/broken.json",
        "problem": "the document is not valid JSON or unreadable",
    }
    assert set(listed["odd"]) == {"name", "blob", "problem"} and "`to`" in listed["odd"]["problem"]
    assert "secret-ish" not in str(listed)  # a document's content is never echoed
    # A broken document is replaced by a good one of the same name.
    fixed = producer(
        storage, "schedule", "put", "broken", "--cron", "0 0 9 * * *",
        "--conversation", "msteams/a:1", "--text", "fixed",
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert {line["name"]: line for line in schedules(storage)}["broken"]["enabled"] is True


async def test_a_schedule_storage_fails_to_read_fails_the_list_rather_than_called_broken(
    azurite, storage
):
    # A 503 on one document was listed as "the document is not valid JSON or unreadable"
    # with exit 0: an operator could delete or rewrite a schedule that was fine.
    from aiohttp import web

    put = ("schedule", "put", "b", "--cron", "0 0 9 * * *", "--conversation", "msteams/a:1")
    assert producer(storage, *put, "--text", "x").returncode == 0

    async def busy(request, forward):
        if request.method == "GET" and request.path.endswith("/schedules/b.json"):
            return web.Response(status=503, headers={"x-ms-error-code": "ServerBusy"})
        return await forward()

    async with blob_proxy(azurite, storage, busy) as env:
        listed = await asyncio.to_thread(producer, env, "schedule", "list")
    assert listed.returncode == 1 and "503" in listed.stderr, listed.stderr[-500:]
    assert "not valid JSON" not in listed.stdout


def test_list_shows_every_schedule_and_delete_removes_whatever_list_names(storage):
    # A lone surrogate in a request `put` accepted made `list` fail (stdout could not
    # encode it) and hide every schedule after it; names `list` showed for blobs the timer
    # skips could not be deleted.
    from azure.storage.blob import ContainerClient

    odd = ("schedule", "put", "a-odd", "--cron", "0 0 9 * * *", "--conversation", "msteams/a:1")
    assert producer(storage, *odd, "--activity", '{"text": "hi \\ud800"}').returncode == 0
    good = ("schedule", "put", "b-good", "--cron", "0 0 9 * * *", "--conversation", "msteams/a:1")
    assert producer(storage, *good, "--text", "hi").returncode == 0
    container = ContainerClient.from_connection_string(
        storage["AzureWebJobsStorage"], storage["BOT_REFERENCES_CONTAINER"]
    )
    with container:
        container.upload_blob("schedules/c-plain", b"{}")
        container.upload_blob("schedules/team/d-nested.json", b"{}")

        container.upload_blob("schedules/b-good", b"{}")  # listed as "b-good" too
        container.upload_blob("victim.json", b"{}")

    listed = schedules(storage)
    assert [line["name"] for line in listed] == [
        "a-odd",
        "b-good",
        "b-good",
        "c-plain",
        "team/d-nested",
    ]
    assert listed[0]["request"]["activity"]["text"] == "hi \ud800"
    # A name never reaches a blob outside schedules/ (`..` resolves in the URL's path).
    for outside in ("../victim", "schedules/../victim.json"):
        refused = producer(storage, "schedule", "delete", outside)
        assert refused.returncode == 1 and "no schedule named" in refused.stderr
    # The blob `list` names is deleted, and that one only.
    deleted = producer(storage, "schedule", "delete", "schedules/b-good")
    assert (deleted.returncode, deleted.stderr) == (0, "")
    assert [line["blob"] for line in schedules(storage)] == [
        "schedules/a-odd.json",
        "schedules/b-good.json",
        "schedules/c-plain",
        "schedules/team/d-nested.json",
    ]
    for line in schedules(storage):
        deleted = producer(storage, "schedule", "delete", line["blob"])
        assert (deleted.returncode, deleted.stderr) == (0, ""), (line, deleted.stderr)
    assert schedules(storage) == []
    assert stored(storage) == ["victim.json"]


@pytest.mark.parametrize(
    "names",
    [
        # A reader splitting lines the Unicode way got fragments that were not JSON.
        ["a\u2028b", "c\x85d"],
        # DEL and C1 controls (U+009B starts an escape sequence): JSON escapes instead.
        ["x\x9b2J\x7f"],
    ],
)
def test_list_prints_names_another_client_chose_one_line_each_nothing_a_terminal_acts_on(
    storage, names
):
    from azure.storage.blob import ContainerClient

    container = ContainerClient.from_connection_string(
        storage["AzureWebJobsStorage"], storage["BOT_REFERENCES_CONTAINER"]
    )
    with container:
        container.create_container()
        for name in names:
            container.upload_blob(f"schedules/{name}.json", b"{}")
    listed = producer(storage, "schedule", "list").stdout
    assert not {"\u2028", "\x85", "\x9b", "\x7f"} & set(listed)
    assert [line["name"] for line in schedules(storage)] == names


def test_deleting_a_schedule_named_in_bytes_the_terminal_could_not_decode_says_so(storage):
    refused = producer(storage, "schedule", "delete", b"x\xff")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: give a schedule's name")
    assert "could not reach storage" not in refused.stderr


async def test_conversations_prints_a_key_whose_id_breaks_lines_on_one_line(storage):
    # A client that chooses its conversation id (a local or Emulator-style channel) may put
    # a line break in it: printed raw, one key read as two lines, the second naming
    # another channel's conversation.
    from shared.config import Settings, StorageSettings
    from shared.references import BlobReferenceStore

    settings = Settings(
        storage=StorageSettings(connection_string=storage["AzureWebJobsStorage"]),
        references_container=storage["BOT_REFERENCES_CONTAINER"],
    )
    store = BlobReferenceStore(settings)
    ids = ["a\nmsteams/19:evil", "b\u2028c", "c\r\td\x7f\x9b", "e\\x0af", "plain"]
    # Format characters: U+202E shows "gnp.exe" as "exe.png"; U+200B makes a key look
    # like another one (printed raw before).
    ids += ["rlo\u202egnp.exe", "zw\u200babc", "tag\U000e0041", "cgj\u034fx", "nbsp\xa0", "end  "]
    try:
        for conversation_id in ids:
            await store.upsert(
                {
                    "channelId": "webchat",
                    "serviceUrl": "https://webchat.botframework.com/",
                    "conversation": {"id": conversation_id},
                    "bot": {"id": "bot"},
                }
            )
    finally:
        await store.close()
    listed = await asyncio.to_thread(producer, storage, "conversations", '{"channelId": "webchat"}')
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted(
        [
            "webchat/a\\x0amsteams/19:evil",
            "webchat/b\\u2028c",
            "webchat/c\\x0d\\x09d\\x7f\\x9b",
            "webchat/e\\x5cx0af",  # a backslash of its own: not read as the escape of a line break
            "webchat/cgj\\u034fx",
            "webchat/end\\x20\\x20",
            "webchat/nbsp\\xa0",
            "webchat/plain",
            "webchat/rlo\\u202egnp.exe",
            "webchat/tag\\U000e0041",
            "webchat/zw\\u200babc",
        ]
    )
    # The reader stops after the first line (`| head -1`): it got whole lines, and that is
    # no error (exit 1 and "stdout was closed before the output was written" before).
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    command = [sys.executable, "-m", "shared.producer", "conversations"]
    first = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", 'set -o pipefail; "$@" | head -1', "pipe", *command],
        cwd=ROOT,
        env={**keep, **storage},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (first.returncode, first.stderr) == (0, "")
    assert len(first.stdout.splitlines()) == 1


# The command with the reference store's retries cut to none: storage that does not answer
# fails in a second, not after the ~9 s of retries a user waits.
WITHOUT_RETRIES = """
import sys
from shared.references.blob import BlobReferenceStore
from shared.storage import StorageOptions
BlobReferenceStore.__init__.__kwdefaults__["options"] = StorageOptions(retry_total=0)
from shared.producer import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("form", ["account key", "SAS"])
def test_storage_that_does_not_answer_is_named_by_host_and_port_with_how_to_start_it(form):
    # It said `error: reference store: list '*' failed: storage unreachable (...)` alone.
    from tools.azurite import connection_string, free_port

    port = free_port()
    secret = "sig=NotToBeShown"
    storage = (
        connection_string(port, free_port())
        if form == "account key"
        else f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};SharedAccessSignature=sv=2024&{secret}"
    )
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_RETRIES, "conversations"],
        cwd=ROOT,
        env={**keep, "AzureWebJobsStorage": storage},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: reference store: list '*' failed: storage unreachable (")
    assert line.endswith(
        f"(tried blob storage at 127.0.0.1:{port}; locally, `make run` starts it)"
    ), line
    assert ACCOUNT_KEY not in line and secret not in line


def test_the_hint_names_the_queue_for_a_queue_that_does_not_answer_and_make_run_only_locally():
    from shared.producer import _unreachable_hint, producer_settings
    from shared.queues import QueueError
    from shared.references.contract import StoreError

    local = producer_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
    down = QueueError("proactive queue: put failed: storage unreachable (ServiceRequestError)")
    assert _unreachable_hint(down, local) == (
        " (tried queue storage at 127.0.0.1:10001; locally, `make run` starts it)"
    )
    azure = producer_settings({"AzureWebJobsStorage__accountName": "stbot"})
    blob_down = StoreError("reference store: list '*' failed: storage unreachable (OSError)")
    assert _unreachable_hint(blob_down, azure) == (
        " (tried blob storage at stbot.blob.core.windows.net:443)"
    )
    refused = StoreError("reference store: list '*' failed: HTTP 403", status=403)
    assert _unreachable_hint(refused, azure) == ""  # it answered: no endpoint to blame
