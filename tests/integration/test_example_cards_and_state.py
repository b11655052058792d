"""examples/cards_and_state.py through the real pipeline: botsim's channel tokens checked
against its JWKS, the bot's token from the fake AAD (MSAL over HTTPS), replies to the
FakeConnector, references and state in Azurite. Each `Runtime` is built as production
builds it (`Runtime.create`); two of them play two function instances. The last test runs
the example as a function app in two local hosts (`tools/devhost`), two processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from examples.cards_and_state import router
from shared.http import HttpRequest, HttpResponse
from shared.messages import handle_messages
from shared.proactive import handle_queue_message
from shared.producer import read_report
from shared.runtime import Runtime
from shared.state import conversation_state_key, user_state_key
from shared.state_blob import state_blob_name
from shared.storage import close_shared_clients
from tests.fixtures.devhost import ROOT, DevHost

pytestmark = pytest.mark.integration

USER = {"id": "29:user-1", "name": "Ada", "aadObjectId": "aad-1"}
PERSONAL = {"id": "a:personal-1", "conversationType": "personal", "tenantId": "t-1"}
GROUP = {"id": "19:group@thread.v2", "conversationType": "groupChat", "tenantId": "t-1"}


class Channel:
    """Posts activities as the Teams channel would: signed, to one bot instance."""

    def __init__(self, identity, connector, settings) -> None:
        self.identity = identity
        self.connector = connector
        self.settings = settings
        self.count = 0

    def activity(self, conversation=PERSONAL, **fields) -> dict:
        self.count += 1
        value = {
            "type": "message",
            "id": f"act-{self.count}",
            "channelId": "msteams",
            "serviceUrl": self.connector.url,
            "from": USER,
            "recipient": {"id": "28:bot", "name": "Bot"},
            "conversation": conversation,
            "channelData": {"tenant": {"id": "t-1"}},
        }
        value.update(fields)
        return value

    async def post(self, runtime: Runtime, activity: dict) -> HttpResponse:
        token = self.identity.mint_channel_token(self.settings.app_id, self.connector.url)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        body = json.dumps(activity).encode()
        request = HttpRequest.create("POST", headers, body, "http://127.0.0.1/api/messages")
        return await handle_messages(request, runtime)

    def invoke(self, name: str, value, conversation=GROUP) -> dict:
        return self.activity(conversation, type="invoke", name=name, value=value)


@pytest.fixture
def settings(aad_app, identity_env, fake_connector, fake_aad, azurite, unique_name):
    return aad_app.settings(
        **identity_env,
        BOT_TRUSTED_SERVICE_URLS=fake_connector.url,
        AzureWebJobsStorage=azurite.connection_string,
        BOT_REFERENCES_CONTAINER=unique_name("example"),
        BOT_PROACTIVE_QUEUE=unique_name("example-q"),
    )


@pytest.fixture
async def instances(settings):
    """Two bot instances (two function hosts) sharing one storage account."""
    runtimes = [Runtime.create(settings, router), Runtime.create(settings, router)]
    yield runtimes
    for runtime in runtimes:
        await runtime.close()


@pytest.fixture
def channel(channel_identity, fake_connector, settings) -> Channel:
    return Channel(channel_identity, fake_connector, settings)


def stored(settings, key: str):
    """The state document in the container, read with the storage SDK (None when absent)."""
    blobs = ContainerClient.from_connection_string(
        settings.storage.connection_string, settings.references_container
    )
    blob = blobs.get_blob_client(state_blob_name(key))
    if not blob.exists():
        return None
    return json.loads(blob.download_blob().readall())["data"]


def clicks_in(card: dict) -> str:
    return card["body"][1]["text"]


async def test_the_card_is_sent_and_its_action_returns_the_updated_card(
    instances, channel, fake_connector, settings
):
    bot = instances[0]
    response = await channel.post(bot, channel.activity(GROUP, text="card"))
    assert response.status == 200
    [sent] = fake_connector.requests
    [attachment] = sent.json["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert clicks_in(card) == "Clicks: 0"
    action = card["actions"][0]
    assert (action["type"], action["verb"]) == ("Action.Execute", "add")

    # The user presses "Add one": Teams sends the action as an adaptiveCard/action invoke.
    value = {"action": {"type": "Action.Execute", "verb": "add"}, "trigger": "manual"}
    response = await channel.post(bot, channel.invoke("adaptiveCard/action", value))

    assert response.status == 200
    answer = json.loads(response.body)
    assert answer["statusCode"] == 200
    assert answer["type"] == "application/vnd.microsoft.card.adaptive"
    assert clicks_in(answer["value"]) == "Clicks: 1"
    assert stored(settings, conversation_state_key("msteams", GROUP["id"])) == {"clicks": 1}

    # An automatic refresh shows the count and changes nothing.
    show = {"action": {"type": "Action.Execute", "verb": "show"}, "trigger": "automatic"}
    answer = json.loads((await channel.post(bot, channel.invoke("adaptiveCard/action", show))).body)
    assert clicks_in(answer["value"]) == "Clicks: 1"


async def test_concurrent_clicks_on_two_instances_are_all_counted(instances, channel, settings):
    value = {"action": {"type": "Action.Execute", "verb": "add"}, "trigger": "manual"}
    presses = 8
    responses = await asyncio.gather(
        *(
            channel.post(instances[i % 2], channel.invoke("adaptiveCard/action", value))
            for i in range(presses)
        )
    )
    assert [r.status for r in responses] == [200] * presses
    # Every answer shows a distinct count: each click saw the ones saved before it.
    shown = sorted(clicks_in(json.loads(r.body)["value"]) for r in responses)
    assert shown == sorted(f"Clicks: {n}" for n in range(1, presses + 1))
    assert stored(settings, conversation_state_key("msteams", GROUP["id"])) == {"clicks": presses}


async def test_an_unknown_card_verb_is_a_card_error(instances, channel):
    value = {"action": {"type": "Action.Execute", "verb": "explode"}}
    response = await channel.post(instances[0], channel.invoke("adaptiveCard/action", value))
    assert response.status == 200
    answer = json.loads(response.body)
    assert (answer["statusCode"], answer["type"]) == (400, "application/vnd.microsoft.error")


async def test_user_state_counts_messages_and_keeps_a_preference_across_instances(
    instances, channel, fake_connector, settings
):
    first, second = instances
    assert (await channel.post(first, channel.activity(text="hello"))).status == 200
    assert (await channel.post(second, channel.activity(text="theme dark"))).status == 200
    # The preference is per user: it holds in another conversation, on another instance.
    assert (await channel.post(first, channel.activity(GROUP, text="hi again"))).status == 200

    texts = [request.json["text"] for request in fake_connector.requests]
    assert "message 1 you sent me" in texts[0]
    assert texts[1] == "Your theme is now dark."
    assert "message 2 you sent me" in texts[2] and "Theme: dark" in texts[2]
    # The user's own name, repeated: plain text, never Markdown of the bot's.
    assert fake_connector.requests[2].json["textFormat"] == "plain"
    assert stored(settings, user_state_key("msteams", USER["id"])) == {
        "messages": 2,
        "theme": "dark",
    }


async def test_the_bots_own_message_passed_back_is_not_answered_or_counted(
    instances, channel, fake_connector, settings
):
    # Answered, it came back on a channel that passes the bot's messages back, for ever.
    first, _ = instances
    own = channel.activity(text="Hi Ada: that is message 1", **{"from": {"id": "28:bot"}})
    assert (await channel.post(first, own)).status == 200
    assert fake_connector.requests == []
    assert stored(settings, user_state_key("msteams", "28:bot")) is None


async def test_two_messages_at_once_are_each_told_their_own_count(
    instances, channel, fake_connector, settings
):
    # Sent side by side to two instances: each reply says the count as saved, never the
    # count a concurrent save then changed.
    first, second = instances
    responses = await asyncio.gather(
        channel.post(first, channel.activity(text="one")),
        channel.post(second, channel.activity(GROUP, text="two")),
    )
    assert [r.status for r in responses] == [200, 200]
    texts = sorted(request.json["text"] for request in fake_connector.requests)
    assert ["message 1 you" in texts[0], "message 2 you" in texts[1]] == [True, True], texts
    assert stored(settings, user_state_key("msteams", USER["id"])) == {"messages": 2}


async def test_a_message_that_changes_nothing_writes_no_state(instances, channel, settings):
    response = await channel.post(instances[0], channel.activity(GROUP, text="card"))
    assert response.status == 200
    assert stored(settings, conversation_state_key("msteams", GROUP["id"])) is None


async def test_the_nickname_dialog_round_trip(instances, channel, settings):
    bot = instances[0]
    fetch = {"data": {"msteams": {"type": "task/fetch"}}, "context": {"theme": "dark"}}
    response = await channel.post(bot, channel.invoke("task/fetch", fetch, PERSONAL))
    assert response.status == 200
    task = json.loads(response.body)["task"]
    assert task["type"] == "continue"
    assert task["value"]["title"] == "Nickname"
    assert task["value"]["card"]["contentType"] == "application/vnd.microsoft.card.adaptive"

    submit = {"data": {"nickname": "  Countess  "}, "context": {"theme": "dark"}}
    response = await channel.post(bot, channel.invoke("task/submit", submit, PERSONAL))
    assert json.loads(response.body) == {"task": {"type": "message", "value": "Hello, Countess!"}}
    assert stored(settings, user_state_key("msteams", USER["id"])) == {"nickname": "Countess"}


async def test_delete_user_data_erases_state_and_references(instances, channel, settings):
    bot = instances[0]
    await channel.post(bot, channel.activity(text="theme light"))  # user state, 1:1 stored
    await channel.post(bot, channel.activity(GROUP, text="card"))  # a group, also stored
    value = {"action": {"type": "Action.Execute", "verb": "add"}}
    await channel.post(bot, channel.invoke("adaptiveCard/action", value, PERSONAL))
    personal_key = f"msteams/{PERSONAL['id']}"
    assert await bot.references.get(personal_key) is not None
    assert stored(settings, conversation_state_key("msteams", PERSONAL["id"])) == {"clicks": 1}

    response = await channel.post(bot, channel.activity(type="deleteUserData"))

    assert (response.status, response.body) == (200, b"")
    assert stored(settings, user_state_key("msteams", USER["id"])) is None
    assert stored(settings, conversation_state_key("msteams", PERSONAL["id"])) is None
    assert await bot.references.get(personal_key) is None  # not recorded again either
    assert (await bot.references.find_by_user(channel_id="msteams", user_id=USER["id"])) is None
    # The group conversation is not the user's alone: it stays.
    assert await bot.references.get(f"msteams/{GROUP['id']}") is not None


def proactive_queue(settings) -> QueueClient:
    return QueueClient.from_connection_string(
        settings.storage.connection_string, settings.proactive_queue
    )


async def test_a_reminder_goes_through_the_proactive_queue(
    instances, channel, fake_connector, settings
):
    bot = instances[0]
    try:
        response = await channel.post(bot, channel.activity(text="remind 0 stretch"))
        assert response.status == 200
        assert fake_connector.requests[-1].json["text"] == "I will remind you in 0 s."

        [message] = proactive_queue(settings).receive_messages()
        body = base64.b64decode(message.content)
        request = json.loads(body)
        assert request["to"]["reference"]["conversation"]["id"] == PERSONAL["id"]
        assert "activityId" not in request["to"]["reference"]
        assert request["activity"]["text"] == "Reminder: stretch"

        # What the proactive function does with it: the reminder reaches the conversation.
        await handle_queue_message(body, bot)
        sent = fake_connector.requests[-1]
        assert sent.operation == "sendToConversation"
        assert sent.params == {"conversationId": PERSONAL["id"]}
        assert sent.json["text"] == "Reminder: stretch"
        assert sent.json["textFormat"] == "plain"  # the user's words, never Markdown
        assert "replyToId" not in sent.json
        report = await read_report(request["id"], settings=settings)
        assert (report["state"], report["delivered"]) == ("done", 1)
    finally:
        await close_shared_clients()


async def test_a_reminder_asked_in_an_activity_the_channel_sends_again_reaches_the_user_once(
    instances, channel, fake_connector, settings
):
    # The channel sends an activity again when its answer failed or came late, and the
    # handler runs a second time: both runs' requests carry one id, and the queue sends it
    # once (a random id made the user get the reminder twice).
    bot = instances[0]
    asked = channel.activity(text="remind 0 stretch")
    try:
        for _ in range(2):
            assert (await channel.post(bot, asked)).status == 200
        messages = list(proactive_queue(settings).receive_messages())
        assert len(messages) == 2
        bodies = [base64.b64decode(message.content) for message in messages]
        assert len({json.loads(body)["id"] for body in bodies}) == 1
        for body in bodies:
            await handle_queue_message(body, bot)
    finally:
        await close_shared_clients()
    reminders = [
        r for r in fake_connector.requests if r.json and r.json.get("text") == "Reminder: stretch"
    ]
    assert len(reminders) == 1


async def test_a_later_reminder_waits_hidden_on_the_queue(instances, channel, settings):
    try:
        response = await channel.post(instances[0], channel.activity(text="remind 600 later"))
        assert response.status == 200
    finally:
        await close_shared_clients()
    queue = proactive_queue(settings)
    assert queue.get_queue_properties().approximate_message_count == 1
    assert list(queue.peek_messages()) == []  # not visible before its time


async def test_a_reminder_beyond_a_day_is_refused_and_nothing_is_queued(
    instances, channel, fake_connector, settings
):
    response = await channel.post(instances[0], channel.activity(text="remind 90000 later"))
    assert response.status == 200
    assert fake_connector.requests[-1].json["text"] == "I can remind you within a day at most."
    with pytest.raises(ResourceNotFoundError):  # never created: nothing was enqueued
        proactive_queue(settings).get_queue_properties()


async def test_two_host_processes_count_every_concurrent_click(
    aad_app, identity_env, fake_connector, fake_aad, azurite, channel, tmp_path
):
    env = {
        **aad_app.env,
        **identity_env,
        "BOT_TRUSTED_SERVICE_URLS": fake_connector.url,
        "AzureWebJobsStorage": azurite.connection_string,
        "BOT_REFERENCES_CONTAINER": channel.settings.references_container,
        "REQUESTS_CA_BUNDLE": fake_aad.ca_path,  # MSAL (requests) trusts the fake AAD
        "SSL_CERT_FILE": fake_aad.ca_path,
    }
    app = ROOT / "tests" / "fixtures" / "apps" / "example_app"
    # The app imports the repo's `examples` and `shared`: on PYTHONPATH, as the worker needs
    # them (the local host, like the worker, puts only the app's own folder on sys.path).
    env = {**env, "PYTHONPATH": str(ROOT)}
    hosts = [DevHost(env, tmp_path, root=app), DevHost(env, tmp_path, root=app)]
    try:
        for host in hosts:
            host.wait_started()
        value = {"action": {"type": "Action.Execute", "verb": "add"}, "trigger": "manual"}
        presses = 8

        def press(index: int) -> tuple[int, bytes]:
            token = channel.identity.mint_channel_token(aad_app.app_id, fake_connector.url)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            body = json.dumps(channel.invoke("adaptiveCard/action", value)).encode()
            return hosts[index % 2].post(body, headers)

        with ThreadPoolExecutor(presses) as pool:
            answers = list(pool.map(press, range(presses)))
    finally:
        for host in hosts:
            host.stop()

    assert [status for status, _ in answers] == [200] * presses, hosts[0].log + hosts[1].log
    shown = sorted(clicks_in(json.loads(body)["value"]) for _, body in answers)
    assert shown == sorted(f"Clicks: {n}" for n in range(1, presses + 1))
    key = conversation_state_key("msteams", GROUP["id"])
    assert stored(channel.settings, key) == {"clicks": presses}
