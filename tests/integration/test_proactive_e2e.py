"""Proactive sends end to end: a queue message → the devhost's proactive_function → Connector.

One `python -m tools.devhost --functions proactive_function` (real repo root and host.json,
so queue polling backs off to at most 2 s) listens on a queue of its own on Azurite. The
test stores a conversation reference in the Blob container the bot uses, puts a base64
request on the queue as a producer would, and checks what reached the FakeConnector (with
the fake AAD's token) and what the container and the queues hold afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import time
import uuid
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueServiceClient

from shared.config import Settings
from shared.references import BlobReferenceStore
from tests.fixtures.devhost import DevHost
from tools.botsim import identity as botsim_identity
from tools.botsim.connector import FakeConnector, Reply

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT = 15.0  # polling backs off to 2 s; a cold first send also gets a token


@pytest.fixture(autouse=True)
def connector(module_connector: FakeConnector) -> FakeConnector:
    module_connector.reset()
    return module_connector


@pytest.fixture(scope="module")
def bot_env(module_aad_app, fake_aad_service, identity_services, module_connector, azurite):
    suffix = uuid.uuid4().hex[:12]
    return {
        **module_aad_app.env,
        **botsim_identity.identity_env(identity_services.channel, identity_services.emulator),
        "BOT_TRUSTED_SERVICE_URLS": module_connector.url,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": f"proactive-refs-{suffix}",
        "BOT_PROACTIVE_QUEUE": f"proactive-{suffix}",
        "REQUESTS_CA_BUNDLE": fake_aad_service.ca_path,
        "SSL_CERT_FILE": fake_aad_service.ca_path,
    }


@pytest.fixture(scope="module")
def devhost(bot_env, tmp_path_factory) -> DevHost:
    host = DevHost(bot_env, tmp_path_factory.mktemp("proactive"), functions=("proactive_function",))
    try:
        yield host.wait_started()
    finally:
        host.stop()


@pytest.fixture(scope="module")
def queues(bot_env, azurite):
    """(the proactive queue, its poison queue), as a producer and an operator see them."""
    service = QueueServiceClient.from_connection_string(azurite.connection_string)
    name = bot_env["BOT_PROACTIVE_QUEUE"]
    clients = service.get_queue_client(name), service.get_queue_client(f"{name}-poison")
    for client in clients:
        with contextlib.suppress(ResourceExistsError):
            client.create_queue()
    yield clients
    service.close()


def enqueue(queue, key: str, text: str) -> None:
    """What a producer does: a JSON request, base64-encoded like every Functions queue message."""
    request = {"id": f"req-{uuid.uuid4().hex}", "to": {"conversation": key}, "text": text}
    queue.send_message(base64.b64encode(json.dumps(request).encode()).decode("ascii"))


def reference_for(service_url: str, conversation_id: str) -> dict[str, Any]:
    return {
        "channelId": "msteams",
        "serviceUrl": service_url,
        "conversation": {"id": conversation_id, "conversationType": "personal", "tenantId": "t"},
        "bot": {"id": "28:bot", "name": "Bot"},
        "user": {"id": "29:ada", "name": "Ada"},
    }


class Store:
    """The bot's Blob container, read and written as the bot does (fresh client each call)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.settings = Settings.from_env(env)

    async def _with(self, call):
        store = BlobReferenceStore(self.settings, cache_size=0)
        try:
            return await call(store)
        finally:
            await store.close()

    async def put(self, reference: dict[str, Any]) -> str:
        await self._with(lambda store: store.upsert(reference))
        return f"{reference['channelId']}/{reference['conversation']['id']}"

    async def get(self, key: str):
        return await self._with(lambda store: store.get(key))

    async def gone(self, key: str) -> bool:
        return await self.get(key) is None


@pytest.fixture
def store(bot_env) -> Store:
    return Store(bot_env)


async def wait_until(condition, what: str) -> None:
    """Poll `condition()` (sync or async) until it is truthy, for DELIVERY_TIMEOUT at most."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {DELIVERY_TIMEOUT} s")
        await asyncio.sleep(0.1)


def queue_is_empty(queue) -> bool:
    """No message left, visible or not (a failed one would be invisible, not gone)."""
    return queue.get_queue_properties().approximate_message_count == 0


async def test_a_queued_text_reaches_the_stored_conversation(
    devhost, queues, store, connector, fake_aad_service
):
    conversation = f"a:{uuid.uuid4().hex}"
    key = await store.put(reference_for(connector.url, conversation))

    enqueue(queues[0], key, "hello")

    [sent] = await connector.wait_for(
        lambda requests: [r for r in requests if r.conversation_id == conversation],
        timeout=DELIVERY_TIMEOUT,
    )
    assert sent.operation == "sendToConversation"
    assert sent.json["text"] == "hello"
    assert sent.json["recipient"]["id"] == "29:ada"
    assert sent.json["from"]["id"] == "28:bot"
    assert fake_aad_service.is_valid_token(sent.authorization.removeprefix("Bearer "))
    # Delivered, so the message is deleted, not redelivered or poisoned.
    await wait_until(lambda: queue_is_empty(queues[0]), what="queue drained")
    assert queue_is_empty(queues[1])
    assert (await store.get(key)) is not None


async def test_a_conversation_the_bot_was_removed_from_is_pruned_from_blob(
    devhost, queues, store, connector
):
    conversation = f"a:{uuid.uuid4().hex}"
    key = await store.put(reference_for(connector.url, conversation))
    roster = {"error": {"code": "BotNotInConversationRoster", "message": "The bot is not part"}}
    connector.script("POST", r"/activities$", [Reply(403, json=roster)])

    enqueue(queues[0], key, "hi")

    await wait_until(lambda: store.gone(key), what="reference pruned")
    await wait_until(lambda: queue_is_empty(queues[0]), what="queue drained")
    assert queue_is_empty(queues[1])  # pruned is an answer, not a failure
    assert len([r for r in connector.requests if r.conversation_id == conversation]) == 1


def poisoned(poison_queue) -> list[dict[str, Any]]:
    return [
        json.loads(base64.b64decode(m.content)) for m in poison_queue.peek_messages(max_messages=32)
    ]


async def test_a_malformed_request_is_poisoned_at_once_with_its_reason(devhost, queues, connector):
    request_id = f"req-{uuid.uuid4().hex}"
    body = {"id": request_id, "to": {"conversation": "msteams/x"}}  # neither text nor activity
    queues[0].send_message(base64.b64encode(json.dumps(body).encode()).decode("ascii"))

    await wait_until(
        lambda: any(m.get("id") == request_id for m in poisoned(queues[1])), "poisoned"
    )
    [copy] = [m for m in poisoned(queues[1]) if m.get("id") == request_id]
    assert copy["to"] == body["to"]
    assert "text" in copy["poisonReason"] and "activity" in copy["poisonReason"]
    await wait_until(lambda: queue_is_empty(queues[0]), what="queue drained")
    # One attempt, not maxDequeueCount of them: the function succeeded after poisoning it.
    invocations = [
        line
        for line in devhost.log.splitlines()
        if "Executed 'Functions.proactive_function'" in line
    ]
    assert not any("Failed" in line for line in invocations), devhost.log
    assert connector.requests == []
