"""The producer command as an operator runs it (a subprocess), against Azurite: what it
prints, its exit status, and what it leaves on the queue and in the container."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from tests.fixtures.devhost import ROOT
from tests.fixtures.storage import sas_connection_string
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


@pytest.mark.parametrize("queue", ["answers 500", "drops the connection once it has read"])
async def test_a_put_that_may_have_landed_keeps_its_report(azurite, storage, queue):
    # A put answered 500, or whose connection dropped after it was sent (the client raises
    # a connection error then, as when nothing was sent), may have stored the message, which
    # an instance may be fanning out from the head already: the head stays (`pending`).
    import asyncio

    from shared.proactive_schema import InvalidRequest
    from shared.producer import close, enqueue, producer_settings, read_report

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if queue == "answers 500":
                writer.write(b"HTTP/1.1 500 Internal\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {
        **storage,
        "AzureWebJobsStorage": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={azurite.blob_url};QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        ),
    }
    settings = producer_settings(env)
    try:
        request = {"id": "r-maybe", "to": {"conversation": "msteams/a:1"}, "text": "hi"}
        with pytest.raises(Exception) as raised:
            await enqueue(request, settings=settings)
        assert not isinstance(raised.value, InvalidRequest)
        assert (await read_report("r-maybe", settings=settings))["state"] == "pending"
    finally:
        await close()
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
