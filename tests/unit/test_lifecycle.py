"""Lifecycle rules: which activities add, refresh or remove a stored reference.

Run against the in-memory store and Blob storage on Azurite; "nothing written" is observed
through the memory store's write counter and the blob's ETag and Last-Modified.
"""

from __future__ import annotations

import itertools

import pytest
from azure.storage.blob.aio import ContainerClient

from shared.config import Settings, StorageSettings
from shared.lifecycle import Change, classify, record_activity
from shared.references import (
    BlobReferenceStore,
    StoreError,
    document_name,
)
from shared.state import conversation_state_key, user_state_key
from tests.fixtures.storage import FAST_STORAGE
from tools.azurite import free_port

FAST = FAST_STORAGE
BOT = {"id": "28:bot-app-id", "name": "Bot"}
SERVICE_URL = "https://smba.trafficmanager.net/emea/"
_ids = itertools.count(1)


def activity(
    kind: str,
    conversation_id: str = "a:personal",
    *,
    personal: bool = True,
    team: str | None = None,
    event: str | None = None,
    tenant: str = "tenant-1",
    service_url: str = SERVICE_URL,
    **fields,
) -> dict:
    channel_data: dict = {"tenant": {"id": tenant}}
    if team:
        channel_data["team"] = {"id": team}
    if event:
        channel_data["eventType"] = event
    return {
        "type": kind,
        "id": f"act-{next(_ids)}",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "29:user", "aadObjectId": "aad-user"},
        "recipient": BOT,
        # No conversation.tenantId: the tenant arrives in channelData, as Teams often sends it.
        "conversation": {
            "id": conversation_id,
            "conversationType": "personal" if personal else "channel",
            "isGroup": not personal,
        },
        "channelData": channel_data,
        **fields,
    }


def message(conversation_id: str = "a:personal", **kw) -> dict:
    return activity("message", conversation_id, text="hi", **kw)


def channel_message(conversation_id: str, team: str) -> dict:
    return message(conversation_id, personal=False, team=team)


@pytest.fixture
def store(stores):
    """The reference store of `stores` (in memory, or on Azurite)."""
    return stores[0]


async def write_states(state, *conversation_ids: str) -> list[str]:
    """A state for each conversation (a Teams thread id included) and the user's own."""
    written = [conversation_state_key("msteams", c) for c in conversation_ids]
    for key in [*written, user_state_key("msteams", "29:user")]:
        assert await state.write(key, {"kept": key}, etag=None)
    return written


async def states_left(state, conversation_ids) -> list[str]:
    return [c for c in conversation_ids if await state.read(conversation_state_key("msteams", c))]


async def keys(store) -> set[str]:
    return {item.key for item in (await store.list(page_size=1000)).items}


# ---------------------------------------------------------------------------- adds


@pytest.mark.parametrize("action", ["add", "add-upgrade"])
async def test_install_adds_the_conversation(store, action):
    await record_activity(store, activity("installationUpdate", action=action))
    stored = await store.get("msteams/a:personal")
    assert stored is not None and stored.tenant_id == "tenant-1"
    assert stored.reference["conversation"]["tenantId"] == "tenant-1"
    assert stored.reference["serviceUrl"] == SERVICE_URL
    found = await store.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    assert found.key == "msteams/a:personal"


@pytest.mark.parametrize("bot_id", ["28:bot-app-id", "bot-app-id"])
async def test_bot_added_to_a_team_adds_the_conversation(store, bot_id):
    update = activity(
        "conversationUpdate",
        "19:general@thread.tacv2",
        personal=False,
        team="19:general@thread.tacv2",
        membersAdded=[{"id": bot_id}],
    )
    assert classify(update) is Change.ADD
    await record_activity(store, update)
    stored = await store.get("msteams/19:general@thread.tacv2")
    assert stored.team_id == "19:general@thread.tacv2" and not stored.personal
    assert "activityId" not in stored.reference  # a conversationUpdate cannot be replied to


@pytest.mark.parametrize("event", [["teamDeleted"], {"x": 1}, 7, "teamDeleted"])
def test_an_event_type_off_teams_or_not_text_means_nothing(event):
    # A list there raised TypeError (unhashable) after the turn's replies had gone: a 500,
    # the conversation not recorded, and a channel that retries would welcome twice. And
    # eventType is a Teams field: on another channel its client writes channelData.
    added = {"membersAdded": [{"id": "u-2"}]}
    webchat = activity("conversationUpdate", "c-1", event=event, channelId="webchat", **added)
    assert classify(webchat) is Change.REFRESH
    teams = activity("conversationUpdate", "19:chat", personal=False, event=event, **added)
    expected = Change.REMOVE if event == "teamDeleted" else Change.REFRESH
    assert classify(teams) is expected


async def test_other_members_added_stores_a_new_conversation_too(store):
    update = activity(
        "conversationUpdate", "19:chat", personal=False, membersAdded=[{"id": "29:x"}]
    )
    assert classify(update) is Change.REFRESH
    await record_activity(store, update)
    assert await keys(store) == {"msteams/19:chat"}


async def test_a_message_extension_used_in_a_chat_between_two_people_records_nothing(store):
    # The user's own 1:1 with the bot is stored; then they search with the bot's message
    # extension in a chat with a colleague, which the bot is not in. Its invokes name that
    # chat: stored, it would become the user's latest 1:1 and a `user` target would go there.
    await record_activity(store, message("a:bot-chat"))
    search = activity("invoke", "a:chat-with-colleague", name="composeExtension/query")
    await record_activity(store, search)
    assert await keys(store) == {"msteams/a:bot-chat"}
    found = await store.find_by_user(channel_id="msteams", user_id="29:user")
    assert found.key == "msteams/a:bot-chat"
    card = activity("invoke", "a:bot-chat", name="adaptiveCard/action")
    await record_activity(store, card)  # other invokes are recorded as before
    assert await keys(store) == {"msteams/a:bot-chat"}


async def test_first_message_adds_and_a_changed_one_refreshes(store):
    await record_activity(store, message())
    first = await store.get("msteams/a:personal")
    await record_activity(store, message(service_url="https://smba.trafficmanager.net/amer/"))
    second = await store.get("msteams/a:personal")
    assert second.etag != first.etag
    assert second.reference["serviceUrl"] == "https://smba.trafficmanager.net/amer/"


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "tenant-2"},
        {"conversation": {"id": "19:chat", "conversationType": "groupChat", "name": "Renamed"}},
        {"recipient": {"id": BOT["id"], "name": "Renamed bot"}},
    ],
    ids=["tenant", "conversation-name", "bot-name"],
)
async def test_a_message_that_changes_the_reference_is_written(store, change):
    await record_activity(store, message("19:chat", personal=False))
    before = await store.get("msteams/19:chat")
    await record_activity(store, message("19:chat", personal=False, **change))
    after = await store.get("msteams/19:chat")
    assert after.etag != before.etag
    if "tenant" in change:
        assert after.tenant_id == "tenant-2"
    if "conversation" in change:
        assert after.reference["conversation"]["name"] == "Renamed"
    if "recipient" in change:
        assert after.reference["bot"]["name"] == "Renamed bot"


async def test_team_restored_adds_it_back(store):
    general = "19:general@thread.tacv2"
    await record_activity(
        store,
        activity("conversationUpdate", general, personal=False, team=general, event="teamDeleted"),
    )
    restored = activity(
        "conversationUpdate", general, personal=False, team=general, event="teamRestored"
    )
    assert classify(restored) is Change.ADD
    await record_activity(store, restored)
    assert await keys(store) == {f"msteams/{general}"}


# ---------------------------------------------------------------------------- nothing written


async def test_message_with_only_a_new_activity_id_writes_nothing(store):
    await record_activity(store, message())
    before = await store.get("msteams/a:personal")
    writes = getattr(store, "writes", None)
    for _ in range(5):
        await record_activity(store, message())  # new id each time, nothing else new
    after = await store.get("msteams/a:personal")
    assert after.etag == before.etag and after.updated_at == before.updated_at
    if writes is not None:
        assert store.writes == writes


@pytest.mark.integration
async def test_blob_untouched_by_chatty_messages(azurite, unique_name):
    container_name = unique_name("life")
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=container_name,
    )
    store = BlobReferenceStore(settings, options=FAST)
    container = ContainerClient.from_connection_string(azurite.connection_string, container_name)
    try:
        await record_activity(store, message())
        blob = container.get_blob_client(document_name("msteams/a:personal"))
        before = await blob.get_blob_properties()
        for _ in range(10):
            await record_activity(store, message())
        after = await blob.get_blob_properties()
        assert (after.etag, after.last_modified) == (before.etag, before.last_modified)
    finally:
        await store.close()
        await container.close()


# ---------------------------------------------------------------------------- removals


@pytest.mark.parametrize("action", ["remove", "remove-upgrade"])
async def test_uninstall_removes_the_conversation(store, action):
    await record_activity(store, message())
    await record_activity(store, activity("installationUpdate", action=action))
    assert await store.get("msteams/a:personal") is None
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None


async def test_uninstall_deletes_the_conversations_state(stores):
    # Its state could not be erased later: erasure finds a user's 1:1s by their references.
    references, state = stores
    await record_activity(references, message(), state=state)
    await record_activity(references, message("a:other"), state=state)
    await write_states(state, "a:personal", "a:other")

    await record_activity(references, activity("installationUpdate", action="remove"), state=state)

    assert await keys(references) == {"msteams/a:other"}
    assert await states_left(state, ["a:personal", "a:other"]) == ["a:other"]
    assert await state.read(user_state_key("msteams", "29:user"))  # the user's own stays


async def test_bot_removed_from_a_group_chat_deletes_its_state(stores):
    references, state = stores
    await record_activity(references, message("19:chat", personal=False), state=state)
    await write_states(state, "19:chat")
    removed = activity(
        "conversationUpdate", "19:chat", personal=False, membersRemoved=[{"id": BOT["id"]}]
    )
    await record_activity(references, removed, state=state)
    assert await keys(references) == set()
    assert await states_left(state, ["19:chat"]) == []


@pytest.mark.parametrize("bot_id", ["28:bot-app-id", "bot-app-id"])
async def test_bot_removed_from_a_group_chat_removes_it(store, bot_id):
    await record_activity(store, message("19:chat", personal=False))
    update = activity(
        "conversationUpdate",
        "19:chat",
        personal=False,
        membersRemoved=[{"id": "29:x"}, {"id": bot_id}],
    )
    assert classify(update) is Change.REMOVE
    await record_activity(store, update)
    assert await keys(store) == set()


async def test_other_member_removed_keeps_the_conversation(store):
    await record_activity(store, message("19:chat", personal=False))
    await record_activity(
        store,
        activity("conversationUpdate", "19:chat", personal=False, membersRemoved=[{"id": "29:x"}]),
    )
    assert await keys(store) == {"msteams/19:chat"}


async def _two_teams_and_a_chat(store) -> None:
    for conversation_id in ("19:general-a", "19:design-a", "19:design-a;messageid=17"):
        await record_activity(store, channel_message(conversation_id, team="19:general-a"))
    await record_activity(store, channel_message("19:general-b", team="19:general-b"))
    await record_activity(store, message())


@pytest.mark.parametrize("event", ["teamDeleted", "teamHardDeleted"])
async def test_team_deleted_removes_all_its_channels(store, event):
    await _two_teams_and_a_chat(store)
    await record_activity(
        store,
        activity(
            "conversationUpdate", "19:general-a", personal=False, team="19:general-a", event=event
        ),
    )
    assert await keys(store) == {"msteams/19:general-b", "msteams/a:personal"}


async def test_channel_deleted_removes_that_channel_and_its_state_only(stores):
    # Teams sends it to the team's General channel and names the deleted one in channelData.
    references, state = stores
    await _two_teams_and_a_chat(references)
    await write_states(state, "19:design-a", "19:design-a;messageid=17", "19:general-a")
    deleted = activity(
        "conversationUpdate",
        "19:general-a",
        personal=False,
        team="19:general-a",
        event="channelDeleted",
    )
    deleted["channelData"]["channel"] = {"id": "19:design-a", "name": "Design"}

    await record_activity(references, deleted, state=state)

    assert await keys(references) == {
        "msteams/19:general-a",
        "msteams/19:general-b",
        "msteams/a:personal",
    }
    channels = ["19:design-a", "19:design-a;messageid=17", "19:general-a"]
    assert await states_left(state, channels) == ["19:general-a"]


def _channel_event(event: str, channel: dict) -> dict:
    update = activity(
        "conversationUpdate", "19:general-a", personal=False, team="19:general-a", event=event
    )
    update["channelData"]["channel"] = channel
    return update


async def test_channel_restored_stores_that_channel_again(store):
    # The reference channelDeleted removed comes back with the restore, the team's own
    # (serviceUrl, bot, tenant) under the channel's id, so broadcasts reach it again.
    await _two_teams_and_a_chat(store)
    design = {"id": "19:design-a", "name": "Design"}
    await record_activity(store, _channel_event("channelDeleted", design))
    assert "msteams/19:design-a" not in await keys(store)

    await record_activity(store, _channel_event("channelRestored", design))

    stored = await store.get("msteams/19:design-a")
    assert stored is not None
    assert stored.reference["conversation"] == {
        "id": "19:design-a",
        "conversationType": "channel",
        "isGroup": True,
        "tenantId": "tenant-1",
    }
    assert stored.reference["serviceUrl"] == SERVICE_URL
    assert stored.reference["bot"]["id"] == BOT["id"]
    assert (stored.tenant_id, stored.team_id) == ("tenant-1", "19:general-a")
    page = await store.list(channel_id="msteams", team_id="19:general-a")
    assert {item.key for item in page.items} == {"msteams/19:general-a", "msteams/19:design-a"}


@pytest.mark.parametrize("channel", [{}, {"id": ""}, {"id": 7}, {"id": "19:general-a"}])
async def test_channel_restored_naming_no_other_channel_adds_nothing_more(store, channel):
    await record_activity(store, _channel_event("channelRestored", channel))
    assert await keys(store) == {"msteams/19:general-a"}


@pytest.mark.parametrize("told_in", ["19:shared-a", "19:general-a"])
async def test_bot_disallowed_in_a_shared_channel_removes_that_channel_only(stores, told_in):
    # Teams tells it as the bot's removal from the shared channel, with the team's id in
    # channelData (eventType channelMemberRemoved), in the shared channel or in the team's
    # General channel (as it tells channelDeleted): the team keeps the bot, so its other
    # channels and their state stay.
    references, state = stores
    await _two_teams_and_a_chat(references)
    await record_activity(references, channel_message("19:shared-a", team="19:general-a"))
    threads = ["19:shared-a", "19:shared-a;messageid=9", "19:general-a", "19:design-a;messageid=1"]
    await write_states(state, *threads)
    disallowed = activity(
        "conversationUpdate",
        told_in,
        personal=False,
        team="19:general-a",
        event="channelMemberRemoved",
        membersRemoved=[{"id": BOT["id"]}],
    )
    disallowed["channelData"]["channel"] = {"id": "19:shared-a", "type": "shared"}
    assert classify(disallowed) is Change.REMOVE

    await record_activity(references, disallowed, state=state)

    assert await keys(references) == {
        "msteams/19:general-a",
        "msteams/19:design-a",
        "msteams/19:general-b",
        "msteams/a:personal",
    }
    assert await states_left(state, threads) == ["19:general-a", "19:design-a;messageid=1"]


@pytest.mark.parametrize("event", ["channelRestored", "channelDeleted", "channelMemberRemoved"])
async def test_a_channel_event_naming_no_possible_key_changes_nothing_else(store, event):
    await _two_teams_and_a_chat(store)
    before = await keys(store)
    update = _channel_event(event, {"id": ";messageid=1"})
    if event == "channelMemberRemoved":
        update["membersRemoved"] = [{"id": BOT["id"]}]

    await record_activity(store, update)  # no error

    assert await keys(store) == before


@pytest.mark.parametrize("how", ["teamDeleted", "bot removed"])
async def test_team_removal_deletes_the_state_of_its_channels_and_their_threads(stores, how):
    references, state = stores
    await _two_teams_and_a_chat(references)
    team_a = [
        "19:general-a",
        "19:general-a;messageid=5",
        "19:design-a",
        "19:design-a;messageid=17",
        "19:design-a;messageid=1700000000018",  # a thread whose reference was never stored
    ]
    others = ["19:general-b", "19:general-b;messageid=3", "19:design-ab;messageid=4", "a:personal"]
    await write_states(state, *team_a, *others)
    fields = {"event": "teamDeleted"} if how == "teamDeleted" else {}
    if how == "bot removed":
        fields["membersRemoved"] = [{"id": BOT["id"]}]
    removal = activity(
        "conversationUpdate", "19:general-a", personal=False, team="19:general-a", **fields
    )

    await record_activity(references, removal, state=state)

    assert await keys(references) == {"msteams/19:general-b", "msteams/a:personal"}
    assert await states_left(state, team_a + others) == others
    assert await state.read(user_state_key("msteams", "29:user"))


async def test_bot_removed_from_a_team_removes_all_its_channels(store):
    await _two_teams_and_a_chat(store)
    await record_activity(
        store,
        activity(
            "conversationUpdate",
            "19:general-a",
            personal=False,
            team="19:general-a",
            membersRemoved=[{"id": BOT["id"]}],
        ),
    )
    assert await keys(store) == {"msteams/19:general-b", "msteams/a:personal"}


async def test_removing_something_never_stored_is_fine(store):
    await record_activity(store, activity("installationUpdate", action="remove"))
    assert await keys(store) == set()


# ---------------------------------------------------------------------------- edges


async def test_teams_channel_threads_share_one_channel_reference(store):
    await record_activity(store, channel_message("19:design@thread.tacv2;messageid=1", "19:g"))
    writes = getattr(store, "writes", None)
    await record_activity(store, channel_message("19:design@thread.tacv2;messageid=2", "19:g"))
    assert await keys(store) == {"msteams/19:design@thread.tacv2"}
    stored = await store.get("msteams/19:design@thread.tacv2")
    assert stored.reference["conversation"]["id"] == "19:design@thread.tacv2"
    assert "activityId" not in stored.reference  # a thread's message id is not the channel's
    if writes is not None:
        assert store.writes == writes


async def test_unstorable_activity_is_skipped_without_error(store):
    broken = message()
    del broken["conversation"]
    await record_activity(store, broken)
    await record_activity(store, {**message(), "channelId": "bad/channel"})
    assert await keys(store) == set()


@pytest.mark.integration
async def test_install_after_another_instance_removed_it(azurite, unique_name):
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("life"),
    )
    a, b = BlobReferenceStore(settings, options=FAST), BlobReferenceStore(settings, options=FAST)
    try:
        await record_activity(a, message())  # instance a remembers it is stored
        await record_activity(b, activity("installationUpdate", action="remove"))
        await record_activity(a, activity("installationUpdate", action="add"))
        assert await b.get("msteams/a:personal") is not None
    finally:
        await a.close()
        await b.close()


async def test_storage_failure_raises_store_error():
    port = free_port()  # nothing listens here
    settings = Settings(
        storage=StorageSettings(
            connection_string=(
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
            )
        ),
        references_container="life",
    )
    store = BlobReferenceStore(settings, options=FAST)
    try:
        with pytest.raises(StoreError):
            await record_activity(store, message())
        with pytest.raises(StoreError):
            await record_activity(store, activity("installationUpdate", action="remove"))
    finally:
        await store.close()


async def test_tenant_and_team_come_only_from_teams_activities(store):
    # Defect 7: a Web Chat client writes what it likes into channelData; listing it under
    # a tenant or team would let a tenant-filtered broadcast reach it.
    spoofed = activity("message", "webchat-conv", team="team-1", text="hi")
    spoofed["channelId"] = "webchat"
    spoofed["serviceUrl"] = "https://webchat.botframework.com/"
    await record_activity(store, spoofed)
    await record_activity(store, message("a:teams-chat"))

    stored = await store.get("webchat/webchat-conv")
    assert stored is not None
    assert (stored.tenant_id, stored.team_id) == (None, None)
    assert "tenantId" not in stored.reference["conversation"]
    tenant_keys = {i.key for i in (await store.list(tenant_id="tenant-1")).items}
    team_keys = {i.key for i in (await store.list(team_id="team-1")).items}
    assert tenant_keys == {"msteams/a:teams-chat"}
    assert team_keys == set()
