"""Conversation-reference lifecycle end to end: channel events → the devhost → Blob storage.

One `python -m tools.devhost` (real repo root, real messages_function) serves the whole
module. It verifies channel tokens minted by botsim's identity service, sends its echoes to
a FakeConnector with a token from the fake AAD, and keeps conversation references in a Blob
container on Azurite. Each test drives a Teams-like conversation with its own ids through
install, bot added/removed, messages, and team deleted/restored, and reads what the
container holds with azure-storage-blob.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from shared.references import document_name
from tests.fixtures.devhost import DevHost
from tools.botsim import identity as botsim_identity
from tools.botsim.connector import FakeConnector

pytestmark = pytest.mark.integration

TENANT = "t-lifecycle"


# --- one bot for the module ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def connector(module_connector: FakeConnector) -> FakeConnector:
    module_connector.reset()
    return module_connector


@pytest.fixture(scope="module")
def app_id(module_aad_app) -> str:
    return module_aad_app.app_id


@pytest.fixture(scope="module")
def bot_env(
    module_aad_app, fake_aad_service, identity_services, module_connector, azurite
) -> dict[str, str]:
    identity_services.reset()
    return {
        **module_aad_app.env,
        **botsim_identity.identity_env(identity_services.channel, identity_services.emulator),
        "BOT_TRUSTED_SERVICE_URLS": module_connector.url,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": f"lifecycle-{uuid.uuid4().hex[:12]}",
        # MSAL (requests) must trust the fake AAD's CA.
        "REQUESTS_CA_BUNDLE": fake_aad_service.ca_path,
        "SSL_CERT_FILE": fake_aad_service.ca_path,
    }


@pytest.fixture(scope="module")
def devhost(bot_env, tmp_path_factory) -> DevHost:
    host = DevHost(bot_env, tmp_path_factory.mktemp("lifecycle"))
    try:
        yield host.wait_started()
    finally:
        host.stop()


@pytest.fixture(scope="module")
def container(bot_env, azurite) -> ContainerClient:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(bot_env["BOT_REFERENCES_CONTAINER"])
    yield client
    service.close()


class Channel:
    """A Teams-like channel talking to the devhost: builds activities, posts them, reads Blob."""

    def __init__(self, devhost, identity, container, connector, app_id) -> None:
        self.devhost = devhost
        self.identity = identity
        self.container = container
        self.connector = connector
        self.bot = {"id": f"28:{app_id}", "name": "Lifecycle Bot"}
        self.app_id = app_id
        self.service_url = f"{connector.url}/amer/"
        self.user = {"id": f"29:{uuid.uuid4().hex}", "name": "Ada", "aadObjectId": "aad-ada"}

    def activity(
        self,
        kind: str,
        conversation: dict[str, Any],
        *,
        team: str | None = None,
        event: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        channel_data: dict[str, Any] = {"tenant": {"id": TENANT}}
        if team is not None:
            channel_data["team"] = {"id": team, "name": "Team"}
        if event is not None:
            channel_data["eventType"] = event
        activity = {
            "type": kind,
            "id": f"f:{uuid.uuid4().hex}",
            "channelId": "msteams",
            "serviceUrl": self.service_url,
            "from": self.user,
            "recipient": self.bot,
            "conversation": {"tenantId": TENANT, **conversation},
            "channelData": channel_data,
            "locale": "en-US",
        }
        activity.update(fields)
        return activity

    def send(self, activity: dict[str, Any]) -> None:
        """Post with a valid channel token; the bot must answer 200 with an empty body."""
        token = self.identity.mint_channel_token(self.app_id, activity["serviceUrl"])
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        status, body = self.devhost.post(json.dumps(activity).encode(), headers)
        assert (status, body) == (200, b""), self.devhost.log[-4000:]

    def stored(self, key: str) -> tuple[dict[str, Any], str] | None:
        """(document, ETag) of the conversation's blob, or None when there is none."""
        try:
            downloader = self.container.download_blob(document_name(key))
            return json.loads(downloader.readall()), downloader.properties.etag
        except ResourceNotFoundError:
            return None


@pytest.fixture
def channel(devhost, identity_services, container, connector, app_id) -> Channel:
    return Channel(devhost, identity_services.channel, container, connector, app_id)


def new_id(prefix: str, suffix: str) -> str:
    return f"{prefix}:{uuid.uuid4().hex}{suffix}"


# --- install / uninstall -------------------------------------------------------------------


def test_installation_add_stores_the_reference_and_remove_deletes_it(channel: Channel):
    conversation = {"id": new_id("19", "@thread.v2"), "conversationType": "groupChat"}
    key = f"msteams/{conversation['id']}"

    channel.send(channel.activity("installationUpdate", conversation, action="add"))

    document, _ = channel.stored(key)
    assert document["key"] == key
    assert document["tenantId"] == TENANT
    reference = document["reference"]
    assert reference["serviceUrl"] == channel.service_url
    assert reference["conversation"]["id"] == conversation["id"]
    assert reference["bot"]["id"] == channel.bot["id"]

    channel.send(channel.activity("installationUpdate", conversation, action="remove"))
    assert channel.stored(key) is None


# --- the bot added to / removed from a conversation ----------------------------------------


def test_bot_added_stores_and_bot_removed_deletes_but_a_user_leaving_does_not(channel: Channel):
    conversation = {"id": new_id("19", "@thread.v2"), "conversationType": "groupChat"}
    key = f"msteams/{conversation['id']}"

    added = channel.activity("conversationUpdate", conversation, membersAdded=[channel.bot])
    channel.send(added)
    assert channel.stored(key)[0]["reference"]["conversation"]["id"] == conversation["id"]
    assert channel.connector.requests == []  # the bot joining is not welcomed

    someone_left = channel.activity(
        "conversationUpdate", conversation, membersRemoved=[{"id": "29:someone-else"}]
    )
    channel.send(someone_left)
    assert channel.stored(key) is not None

    bot_left = channel.activity(
        "conversationUpdate", conversation, membersRemoved=[{"id": channel.app_id}]
    )  # Teams sometimes omits the "28:" prefix
    channel.send(bot_left)
    assert channel.stored(key) is None


# --- messages: stored once, refreshed only when something material changes ---------------


def test_messages_store_new_conversations_and_refresh_only_on_material_change(channel: Channel):
    conversation = {"id": new_id("a", ""), "conversationType": "personal"}
    key = f"msteams/{conversation['id']}"

    first = channel.activity("message", conversation, text="hello")
    channel.send(first)
    document, etag = channel.stored(key)
    assert document["reference"]["serviceUrl"] == channel.service_url
    assert document["personal"] is True
    assert document["userId"] == channel.user["id"]
    [echo] = channel.connector.requests
    assert echo.json["text"] == "Echo: hello"
    assert echo.raw_path.startswith("/amer/v3/conversations/")

    # Only the activity id is new: nothing is written.
    channel.send(channel.activity("message", conversation, text="again"))
    assert channel.stored(key) == (document, etag)

    # The channel moved the conversation to another serviceUrl: the reference follows it.
    channel.service_url = f"{channel.connector.url}/emea/"
    channel.send(channel.activity("message", conversation, text="moved"))
    refreshed, new_etag = channel.stored(key)
    assert new_etag != etag
    assert refreshed["reference"]["serviceUrl"] == channel.service_url
    assert refreshed["createdAt"] == document["createdAt"]
    assert channel.connector.requests[-1].raw_path.startswith("/emea/v3/conversations/")
    assert len(channel.connector.requests) == 3  # every message was still answered


def test_the_replies_carry_the_bots_token_from_the_fake_aad(channel: Channel, fake_aad_service):
    conversation = {"id": new_id("a", ""), "conversationType": "personal"}
    channel.send(channel.activity("message", conversation, text="token?"))
    [echo] = channel.connector.requests
    assert fake_aad_service.is_valid_token(echo.authorization.removeprefix("Bearer "))


# --- Teams teams: channels, team deleted / restored, the bot removed from the team ---------


def team_channels(channel: Channel) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A team's id, its General channel's conversation and another channel's (one thread)."""
    team_id = new_id("19", "@thread.tacv2")
    general = {"id": team_id, "conversationType": "channel", "isGroup": True}
    other_id = new_id("19", "@thread.tacv2")
    thread = {
        "id": f"{other_id};messageid=1712345678901",
        "conversationType": "channel",
        "isGroup": True,
    }
    return team_id, general, thread


def store_team(channel: Channel, team_id: str, *conversations: dict[str, Any]) -> list[str]:
    channel.send(
        channel.activity(
            "conversationUpdate", conversations[0], team=team_id, membersAdded=[channel.bot]
        )
    )
    for conversation in conversations[1:]:
        channel.send(channel.activity("message", conversation, team=team_id, text="hi team"))
    keys = [f"msteams/{c['id'].split(';messageid=')[0]}" for c in conversations]
    for key in keys:
        assert channel.stored(key)[0]["teamId"] == team_id
    return keys


def test_team_deleted_removes_the_teams_channels_and_team_restored_brings_it_back(
    channel: Channel,
):
    team_id, general, thread = team_channels(channel)
    general_key, channel_key = store_team(channel, team_id, general, thread)
    other_team, other_general, _ = team_channels(channel)
    [bystander] = store_team(channel, other_team, other_general)

    channel.send(channel.activity("conversationUpdate", general, team=team_id, event="teamDeleted"))
    assert channel.stored(general_key) is None
    assert channel.stored(channel_key) is None  # the thread was stored under its channel
    assert channel.stored(bystander) is not None

    channel.send(
        channel.activity("conversationUpdate", general, team=team_id, event="teamRestored")
    )
    document, _ = channel.stored(general_key)
    assert document["teamId"] == team_id
    assert document["reference"]["serviceUrl"] == channel.service_url


def test_bot_removed_from_a_team_removes_every_channel_of_the_team(channel: Channel):
    team_id, general, thread = team_channels(channel)
    keys = store_team(channel, team_id, general, thread)

    removed = channel.activity(
        "conversationUpdate", general, team=team_id, membersRemoved=[channel.bot]
    )
    channel.send(removed)
    assert [channel.stored(key) for key in keys] == [None, None]
