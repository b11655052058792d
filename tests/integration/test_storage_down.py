"""Storage down: the user is still answered, and proactive sends wait instead of vanishing.

"Down" is real: an Azurite started for this module, shown to work, then stopped, so every
storage call meets a refused connection. Inbound, the reference write fails beside the turn
and is only logged (without secrets): the echo still reaches the FakeConnector and the
channel gets its 200. Proactive, `deliver` raises so the queue host redelivers the request;
through the devhost, a request that failed while storage was down is delivered once it is
back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from shared.auth.inbound import InboundAuthenticator
from shared.auth.tokens import create_token_provider
from shared.bot import router as shipped_router
from shared.config import Settings
from shared.connector import ConnectorClient
from shared.http import HttpRequest
from shared.messages import handle_messages
from shared.proactive import deliver
from shared.references import BlobReferenceStore, StoreError
from shared.runtime import Runtime
from tests.fixtures.devhost import DevHost
from tests.fixtures.storage import FAST_STORAGE
from tools.azurite import ACCOUNT_KEY, Azurite, connection_string

pytestmark = pytest.mark.integration

# Teams waits 5 s for a message-extension answer (15 s for others): a storage outage must
# not push the answer past the tighter window.
CHANNEL_WINDOW = 5.0
CONTAINER = "references"


def start_and_stop_azurite() -> Azurite:
    """An Azurite that worked (its container was created) and is now stopped."""
    instance = Azurite().start()
    try:
        service = BlobServiceClient.from_connection_string(instance.connection_string)
        service.create_container(CONTAINER)
        service.close()
    finally:
        instance.stop()
    return instance


@pytest.fixture(scope="module")
def stopped_storage() -> Azurite:
    return start_and_stop_azurite()


def message(service_url: str, conversation_id: str, text: str = "still there?") -> dict:
    return {
        "type": "message",
        "id": f"m-{uuid.uuid4().hex}",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "29:user-1", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": conversation_id, "conversationType": "personal", "tenantId": "t"},
        "channelData": {"tenant": {"id": "t"}},
        "text": text,
    }


def reference_for(service_url: str, conversation_id: str) -> dict[str, Any]:
    return {
        "channelId": "msteams",
        "serviceUrl": service_url,
        "conversation": {"id": conversation_id, "conversationType": "personal", "tenantId": "t"},
        "bot": {"id": "28:bot", "name": "Bot"},
        "user": {"id": "29:user-1", "name": "Ada"},
    }


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in (ACCOUNT_KEY, *secrets):
        assert secret not in text
    assert "Bearer " not in text


# --- in-process: handle_messages and deliver with a Runtime on the stopped storage -----------


@pytest.fixture
def bot_env(aad_app, identity_env, fake_connector, stopped_storage) -> dict[str, str]:
    return {
        **aad_app.env,
        **identity_env,
        "BOT_TRUSTED_SERVICE_URLS": fake_connector.url,
        "AzureWebJobsStorage": stopped_storage.connection_string,
        "BOT_REFERENCES_CONTAINER": CONTAINER,
    }


@pytest.fixture
async def runtime(bot_env):
    settings = Settings.from_env(bot_env)
    runtime = Runtime(
        settings=settings,
        authenticator=InboundAuthenticator(settings),
        connector=ConnectorClient(settings, create_token_provider(settings)),
        references=BlobReferenceStore(settings, options=FAST_STORAGE),  # fail fast in-process
        router=shipped_router,
    )
    yield runtime
    await runtime.close()


async def test_inbound_the_user_is_answered_and_the_failure_logged_without_secrets(
    runtime, bot_env, channel_identity, fake_connector, caplog
):
    conversation = f"a:{uuid.uuid4().hex}"
    token = channel_identity.mint_channel_token(bot_env["MicrosoftAppId"], fake_connector.url)
    request = HttpRequest.create(
        "POST",
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        json.dumps(message(fake_connector.url, conversation)).encode(),
        "http://127.0.0.1/api/messages",
    )

    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        response = await handle_messages(request, runtime)
        elapsed = time.monotonic() - started

    assert (response.status, response.body) == (200, b"")
    assert elapsed < CHANNEL_WINDOW
    [echo] = fake_connector.requests
    assert echo.json["text"] == "Echo: still there?"
    failures = [r for r in caplog.records if "reference not recorded" in r.getMessage()]
    assert len(failures) == 1
    assert f"msteams/{conversation}" in failures[0].getMessage()
    assert "unreachable" in failures[0].getMessage() or "timed out" in failures[0].getMessage()
    assert_no_secrets(caplog.text, token, bot_env["MicrosoftAppPassword"])


async def test_proactive_with_the_store_down_raises_and_sends_nothing(
    runtime, fake_connector, fake_aad
):
    body = json.dumps({"id": "r-1", "to": {"conversation": "msteams/a:1"}, "text": "hello"})

    with pytest.raises(StoreError) as raised:
        await deliver(body, runtime)

    assert "msteams/a:1" in str(raised.value)
    assert_no_secrets(str(raised.value))
    assert fake_connector.requests == []
    assert fake_aad.issuances == []


# --- through the devhost: one outage, both directions ---------------------------------------


def wait_for_log(host: DevHost, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in host.log:
        if host.process.poll() is not None:
            pytest.fail(f"devhost exited with {host.process.returncode}:\n{host.log}")
        if time.monotonic() >= deadline:
            pytest.fail(f"devhost: {text!r} not logged within {timeout} s:\n{host.log}")
        time.sleep(0.05)


@pytest.fixture
def outage(bot_env, azurite, fake_aad, tmp_path):
    """A devhost (messages + proactive) whose Blob storage is down and whose queues are up.

    The connection string's BlobEndpoint is a stopped Azurite of its own (so it can come
    back on the same port); its QueueEndpoint is the session's Azurite.
    """
    blob = start_and_stop_azurite()
    queue_name = f"down-{uuid.uuid4().hex[:12]}"
    env = {
        **bot_env,
        "AzureWebJobsStorage": connection_string(blob.blob_port, azurite.queue_port),
        "BOT_PROACTIVE_QUEUE": queue_name,
        # MSAL (requests) in the devhost must trust the fake AAD's CA.
        "REQUESTS_CA_BUNDLE": fake_aad.ca_path,
        "SSL_CERT_FILE": fake_aad.ca_path,
        "PYTHON_ENABLE_DEBUG_LOGGING": "1",  # the trigger's per-message line is DEBUG detail
    }
    host = DevHost(env, tmp_path, functions=("messages_function", "proactive_function"))
    queue = QueueClient.from_connection_string(azurite.connection_string, queue_name)
    restarted: list[Azurite] = []

    def storage_back() -> Azurite:
        """Blob storage comes back on the same port (empty: it ran in memory)."""
        restarted.append(Azurite(blob_port=blob.blob_port).start())
        return restarted[-1]

    try:
        host.wait_started()
        with contextlib.suppress(ResourceExistsError):  # the devhost may have created it first
            queue.create_queue()
        yield host, queue, env, storage_back
    finally:
        host.stop()
        for instance in restarted:
            instance.stop()
        queue.close()


async def test_an_outage_through_the_devhost_answers_the_user_and_keeps_proactive_requests(
    outage, channel_identity, fake_connector
):
    devhost, queue, env, storage_back = outage
    conversation = f"a:{uuid.uuid4().hex}"
    key = f"msteams/{conversation}"
    request = {"id": "r-down", "to": {"conversation": key}, "text": "sent once storage is back"}
    queue.send_message(base64.b64encode(json.dumps(request).encode()).decode("ascii"))

    # Inbound: answered in time, echo sent, the failed reference write only logged.
    token = channel_identity.mint_channel_token(env["MicrosoftAppId"], fake_connector.url)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    activity = json.dumps(message(fake_connector.url, conversation)).encode()
    started = time.monotonic()
    status, body = devhost.post(activity, headers)
    elapsed = time.monotonic() - started

    assert (status, body) == (200, b""), devhost.log
    assert elapsed < CHANNEL_WINDOW
    [echo] = fake_connector.requests_for("replyToActivity")
    assert echo.json["text"] == "Echo: still there?"
    wait_for_log(devhost, "reference not recorded", timeout=5)

    # Proactive: the attempt failed on storage, nothing was sent, the message is kept: a
    # copy with a backoff, so the outage spends none of the host's dequeue budget.
    wait_for_log(devhost, "storage failed")
    wait_for_log(devhost, "): requeued")
    assert "raised StoreError" not in devhost.log
    assert fake_connector.requests_for("sendToConversation") == []
    for _ in range(100):  # the host deletes the original once the function has returned
        if queue.get_queue_properties().approximate_message_count == 1:
            break
        await asyncio.sleep(0.05)
    assert queue.get_queue_properties().approximate_message_count == 1

    # Storage is back and the conversation is remembered again: the retry delivers, once.
    back = storage_back()
    settings = Settings.from_env({**env, "AzureWebJobsStorage": back.connection_string})
    store = BlobReferenceStore(settings)
    await store.upsert(reference_for(fake_connector.url, conversation))
    await store.close()

    # The copy becomes visible after the first backoff (5 s, plus jitter).
    [sent] = await fake_connector.wait_for(
        lambda requests: [r for r in requests if r.operation == "sendToConversation"], timeout=20
    )
    assert sent.params == {"conversationId": conversation}
    assert sent.json["text"] == "sent once storage is back"
    wait_for_log(devhost, "(attempt 1): delivered", timeout=5)
    # The host deletes the message once the function has returned: allow it a moment.
    for _ in range(100):
        if queue.get_queue_properties().approximate_message_count == 0:
            break
        await asyncio.sleep(0.05)
    assert queue.get_queue_properties().approximate_message_count == 0
    poison = QueueClient.from_connection_string(
        env["AzureWebJobsStorage"], f"{queue.queue_name}-poison"
    )
    with contextlib.suppress(ResourceNotFoundError):
        assert poison.peek_messages() == []
    poison.close()

    assert_no_secrets(devhost.log, token, env["MicrosoftAppPassword"])
