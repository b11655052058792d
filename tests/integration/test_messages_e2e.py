"""POST /api/messages end to end: the function app in the local host, against botsim and Azurite.

`python -m tools.devhost` runs from the repo root as a subprocess with settings pointing at
botsim's identity services (channel tokens), the fake AAD (the bot's own token, over HTTPS
through MSAL), the FakeConnector (where the echo must arrive) and Azurite (where the
conversation reference must be stored). A second group calls `messages_function.main`
with real `azure.functions` request objects, as the Functions worker does.
"""

from __future__ import annotations

import json

import azure.functions as func
import pytest

import app
from shared.config import Settings, reset_settings
from shared.references import BlobReferenceStore
from shared.runtime import reset_runtime
from tests.fixtures.devhost import DevHost

pytestmark = pytest.mark.integration

CONVERSATION = "19:meeting_abc@thread.v2"


def message(service_url: str, text: str = "hello from e2e") -> dict:
    return {
        "type": "message",
        "id": "1712345678901",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "29:e2e-user", "name": "Ada", "aadObjectId": "aad-e2e"},
        "recipient": {"id": "28:bot", "name": "Bot"},
        "conversation": {"id": CONVERSATION, "conversationType": "groupChat", "tenantId": "t-e2e"},
        "channelData": {"tenant": {"id": "t-e2e"}},
        "text": text,
    }


@pytest.fixture
def bot_env(aad_app, identity_env, fake_connector, fake_aad, azurite, unique_name):
    """The app settings of a bot wired to botsim and Azurite (environment form)."""
    return {
        **aad_app.env,
        **identity_env,
        "BOT_TRUSTED_SERVICE_URLS": fake_connector.url,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": unique_name("refs"),
        # MSAL (requests) must trust the fake AAD's CA.
        "REQUESTS_CA_BUNDLE": fake_aad.ca_path,
        "SSL_CERT_FILE": fake_aad.ca_path,
    }


async def stored_reference(env: dict[str, str], key: str):
    store = BlobReferenceStore(Settings.from_env(env))
    try:
        return await store.get(key)
    finally:
        await store.close()


# --- through the local host --------------------------------------------------------------------


@pytest.fixture
def devhost(bot_env, tmp_path):
    host = DevHost(bot_env, tmp_path)
    try:
        yield host.wait_started()
    finally:
        host.stop()


async def test_channel_message_through_the_devhost_is_echoed_and_remembered(
    devhost, bot_env, channel_identity, fake_connector, fake_aad
):
    token = channel_identity.mint_channel_token(bot_env["MicrosoftAppId"], fake_connector.url)
    status, body = devhost.post(
        json.dumps(message(fake_connector.url)).encode(),
        {"Content-Type": "application/json; charset=utf-8", "Authorization": f"Bearer {token}"},
    )

    assert (status, body) == (200, b""), devhost.log
    [sent] = fake_connector.requests
    assert sent.operation == "replyToActivity"
    assert sent.params == {"conversationId": CONVERSATION, "activityId": "1712345678901"}
    assert sent.json["text"] == "Echo: hello from e2e"
    assert sent.json["replyToId"] == "1712345678901"
    assert fake_aad.is_valid_token(sent.authorization.removeprefix("Bearer "))

    stored = await stored_reference(bot_env, f"msteams/{CONVERSATION}")
    assert stored is not None
    assert stored.reference["serviceUrl"] == fake_connector.url
    assert stored.reference["conversation"]["id"] == CONVERSATION
    assert stored.tenant_id == "t-e2e"


async def test_bad_token_through_the_devhost_is_401_with_no_side_effects(
    devhost, bot_env, channel_identity, fake_connector, fake_aad
):
    token = channel_identity.mint_channel_token("someone-else", fake_connector.url)
    status, body = devhost.post(
        json.dumps(message(fake_connector.url)).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert (status, body) == (401, b"Unauthorized."), devhost.log
    # Nothing sent: the bot's token may be acquired (once per process, in the background,
    # only cached: docs/contracts.md), never sent.
    assert fake_connector.requests == []
    assert await stored_reference(bot_env, f"msteams/{CONVERSATION}") is None
    assert "Bearer" not in devhost.log and token not in devhost.log


# --- messages_function.main, as the Functions worker calls it -------------------------------


@pytest.fixture
async def process_env(bot_env, monkeypatch):
    """The bot's settings in this process's environment, and a fresh per-process runtime."""
    for name, value in bot_env.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    reset_runtime()
    yield bot_env
    await app.runtime().close()
    reset_settings()
    reset_runtime()


def functions_request(activity: dict, token: str | None) -> func.HttpRequest:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return func.HttpRequest(
        "POST",
        "http://127.0.0.1:7071/api/messages",
        headers=headers,
        body=json.dumps(activity).encode(),
    )


async def test_function_main_answers_with_a_functions_response(
    process_env, channel_identity, fake_connector
):
    from messages_function import main

    token = channel_identity.mint_channel_token(process_env["MicrosoftAppId"], fake_connector.url)

    response = await main(functions_request(message(fake_connector.url, "via main"), token))
    assert isinstance(response, func.HttpResponse)
    assert response.status_code == 200
    assert fake_connector.activities[0]["text"] == "Echo: via main"
    assert await stored_reference(process_env, f"msteams/{CONVERSATION}") is not None

    invoke = dict(message(fake_connector.url), type="invoke", name="task/fetch")
    response = await main(functions_request(invoke, token))
    assert response.status_code == 501

    response = await main(functions_request(message(fake_connector.url), None))
    assert response.status_code == 401
    assert response.get_body() == b"Unauthorized."
    assert response.mimetype == "text/plain"
