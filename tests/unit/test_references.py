"""The reference-store contract, run against the in-memory store and Blob storage (Azurite).

Then what only the Blob store has: its on-storage layout, the container created on first
write, the in-process cache that spares a chatty conversation any storage call, clear
errors for foreign or corrupt documents, and storage outages (stopped or frozen Azurite).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time

import pytest
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import ContainerClient
from azure.storage.blob.aio import BlobServiceClient as AsyncBlobServiceClient

from shared.config import Settings, SettingsError, StorageSettings
from shared.references import (
    INDEX_KEYS,
    BlobReferenceStore,
    MemoryReferenceStore,
    StoreError,
    create_reference_store,
    document_name,
    to_document,
    user_index_name,
)
from shared.storage import StorageOptions
from tests.fixtures.recursion import collector_paused
from tests.fixtures.storage import (
    ANSWER_TEXT,
    FAST_STORAGE,
    UNREADABLE_ANSWERS,
    unreadable_storage,
)
from tools.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, free_port

FAST = FAST_STORAGE


def settings_for(connection_string: str, container: str) -> Settings:
    return Settings(
        storage=StorageSettings(connection_string=connection_string),
        references_container=container,
    )


def reference(
    conversation_id: str = "a:1",
    *,
    channel_id: str = "msteams",
    tenant: str | None = "tenant-1",
    personal: bool = True,
    user: str = "29:user",
    aad: str | None = "aad-user",
    service_url: str = "https://smba.trafficmanager.net/emea/",
    **extra,
) -> dict:
    conversation = {
        "id": conversation_id,
        "conversationType": "personal" if personal else "channel",
        "isGroup": not personal,
    }
    if tenant is not None:
        conversation["tenantId"] = tenant
    member = {"id": user, "name": "User"}
    if aad is not None:
        member["aadObjectId"] = aad
    return {
        "channelId": channel_id,
        "serviceUrl": service_url,
        "conversation": conversation,
        "user": member,
        "bot": {"id": "28:bot-app-id", "name": "Bot"},
        **extra,
    }


@pytest.fixture(params=["memory", pytest.param("blob", marks=pytest.mark.integration)])
async def store(request, unique_name):
    if request.param == "memory":
        instance = MemoryReferenceStore()
    else:
        azurite = request.getfixturevalue("azurite")
        instance = BlobReferenceStore(
            settings_for(azurite.connection_string, unique_name("refs")), options=FAST
        )
    yield instance
    await instance.close()


async def list_all(store, **filters) -> list[str]:
    keys: list[str] = []
    continuation = None
    while True:
        page = await store.list(continuation=continuation, **filters)
        keys += [item.key for item in page.items]
        continuation = page.continuation
        if continuation is None:
            return keys


# ---------------------------------------------------------------------------- the contract


async def test_missing_reference_is_none(store):
    assert await store.get("msteams/never-seen") is None


async def test_malformed_keys_are_rejected(store):
    for key in ("no-slash", "/no-channel", "msteams/"):
        with pytest.raises(ValueError):
            await store.get(key)


async def test_new_reference_is_stored_with_its_fields(store):
    ref = reference(activityId="act-1", locale="en-US")
    assert await store.upsert(ref) is True
    stored = await store.get("msteams/a:1")
    assert stored is not None
    assert stored.reference == ref
    assert (stored.key, stored.channel_id, stored.conversation_id) == (
        "msteams/a:1",
        "msteams",
        "a:1",
    )
    assert stored.tenant_id == "tenant-1"
    assert stored.personal and stored.user_id == "29:user" and stored.aad_object_id == "aad-user"
    assert stored.etag and stored.created_at and stored.updated_at


async def test_same_reference_or_only_new_activity_id_writes_nothing(store):
    assert await store.upsert(reference(activityId="1"))
    etag = (await store.get("msteams/a:1")).etag
    assert await store.upsert(reference(activityId="1")) is False
    assert await store.upsert(reference(activityId="2")) is False
    stored = await store.get("msteams/a:1")
    assert stored.etag == etag
    assert stored.reference["activityId"] == "1"


@pytest.mark.parametrize(
    "change",
    [
        {"service_url": "https://smba.trafficmanager.net/amer/"},
        {"tenant": "tenant-2"},
        {"user": "29:someone-else"},
        {"bot": {"id": "28:bot-app-id", "name": "Renamed bot"}},
        {"locale": "de-DE"},
    ],
    ids=["serviceUrl", "tenant", "user", "bot-name", "locale"],
)
async def test_material_change_is_written(store, change):
    assert await store.upsert(reference(activityId="1"))
    before = await store.get("msteams/a:1")
    assert await store.upsert(reference(activityId="2", **change)) is True
    after = await store.get("msteams/a:1")
    assert after.etag != before.etag
    assert after.created_at == before.created_at
    assert after.reference["activityId"] == "2"  # a real write carries the latest id
    if "service_url" in change:
        assert after.reference["serviceUrl"] == change["service_url"]
    if "tenant" in change:
        assert after.tenant_id == "tenant-2"


async def test_conversation_name_change_is_written(store):
    ref = reference()
    assert await store.upsert(ref)
    ref["conversation"] = {**ref["conversation"], "name": "Renamed"}
    assert await store.upsert(ref) is True
    assert (await store.get("msteams/a:1")).reference["conversation"]["name"] == "Renamed"


async def test_a_group_keeps_nothing_of_who_spoke_in_it(store):
    # The speaker and their locale are whoever spoke last: not stored, so an erasure of
    # that person, which leaves group conversations stored, leaves nothing of them.
    group = "19:team@thread.tacv2"
    assert await store.upsert(reference(group, personal=False, user="29:alice", locale="fr-FR"))
    assert not await store.upsert(reference(group, personal=False, user="29:bob"))
    stored = await store.get(f"msteams/{group}")
    assert "user" not in stored.reference and "locale" not in stored.reference
    assert "29:alice" not in json.dumps(to_document(stored))
    assert not stored.personal and stored.user_id is None
    assert stored.reference["bot"] == reference()["bot"]


async def test_fields_missing_from_a_later_activity_are_kept(store):
    assert await store.upsert(reference(activityId="msg-1", locale="fr-FR"))
    later = reference()  # e.g. a conversationUpdate: no activityId, no locale
    assert await store.upsert(later) is False
    stored = await store.get("msteams/a:1")
    assert stored.reference["activityId"] == "msg-1"
    assert stored.reference["locale"] == "fr-FR"


async def test_unstorable_references_are_rejected(store):
    bad = [
        {k: v for k, v in reference().items() if k != "channelId"},
        reference(channel_id="ms/teams"),
        {**reference(), "conversation": {"name": "no id"}},
        {k: v for k, v in reference().items() if k != "serviceUrl"},
    ]
    for ref in bad:
        with pytest.raises(ValueError):
            await store.upsert(ref)
    assert await list_all(store) == []


@pytest.mark.parametrize("nobody", [{}, {"name": "no id"}, {"id": ""}, {"id": 7}, "29:x"])
async def test_an_activity_naming_nobody_keeps_the_stored_user_and_bot(store, nobody):
    await store.upsert(reference(user="29:ada", aad="aad-ada"))
    await store.upsert({**reference(user="29:ada"), "user": nobody, "bot": nobody})
    stored = await store.get("msteams/a:1")
    assert stored.reference["user"]["id"] == "29:ada"
    assert stored.reference["bot"]["id"] == "28:bot-app-id"
    found = await store.find_by_user(channel_id="msteams", user_id="29:ada")
    assert found is not None and found.key == "msteams/a:1"  # so their erasure finds it


async def test_delete_removes_and_a_second_delete_is_fine(store):
    await store.upsert(reference())
    assert await store.delete("msteams/a:1") is True
    assert await store.get("msteams/a:1") is None
    assert await store.delete("msteams/a:1") is False
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None


async def test_upsert_after_delete_stores_again(store):
    await store.upsert(reference())
    await store.delete("msteams/a:1")
    assert await store.upsert(reference()) is True
    assert (await store.get("msteams/a:1")) is not None


async def test_find_by_user_id_and_aad_object_id(store):
    await store.upsert(reference("a:1", user="29:alice", aad="aad-alice"))
    await store.upsert(reference("a:2", user="29:bob", aad="aad-bob", tenant="tenant-2"))
    by_id = await store.find_by_user(channel_id="msteams", user_id="29:alice")
    by_aad = await store.find_by_user(channel_id="msteams", aad_object_id="aad-bob")
    assert by_id.key == "msteams/a:1"
    assert by_aad.key == "msteams/a:2"
    assert await store.find_by_user(channel_id="msteams", user_id="29:carol") is None
    assert await store.find_by_user(channel_id="webchat", user_id="29:alice") is None
    # tenant narrows: bob lives in tenant-2
    assert (
        await store.find_by_user(
            channel_id="msteams", aad_object_id="aad-bob", tenant_id="tenant-1"
        )
        is None
    )
    with pytest.raises(ValueError):
        await store.find_by_user(channel_id="msteams")


async def test_tenant_ids_and_aad_object_ids_match_in_any_case(store):
    # GUIDs: Teams writes them in lower case, a program naming a user or a tenant may not.
    aad = "0f1e2d3c-0000-4000-8000-0000000000aa"
    await store.upsert(reference("a:1", user="29:alice", aad=aad, tenant="tenant-abc"))
    for tenant in ("tenant-abc", "TENANT-ABC", "Tenant-Abc"):
        found = await store.find_by_user(
            channel_id="msteams", aad_object_id=aad.upper(), tenant_id=tenant
        )
        assert found is not None and found.key == "msteams/a:1"
        assert await list_all(store, channel_id="msteams", tenant_id=tenant) == ["msteams/a:1"]
    assert await list_all(store, tenant_id="tenant-ab") == []  # still the whole id


async def test_find_by_user_ignores_group_conversations(store):
    await store.upsert(reference("19:group", personal=False, user="29:alice", aad="aad-alice"))
    assert await store.find_by_user(channel_id="msteams", user_id="29:alice") is None
    assert await store.find_by_user(channel_id="msteams", aad_object_id="aad-alice") is None


async def test_list_filters_by_channel_tenant_and_team(store):
    await store.upsert(reference("t1-a", tenant="t1", personal=False), team_id="team-x")
    await store.upsert(reference("t1-b", tenant="t1", personal=False))
    await store.upsert(reference("t2-a", tenant="t2", personal=False), team_id="team-x")
    await store.upsert(reference("web-1", channel_id="webchat", tenant=None))
    assert sorted(await list_all(store)) == [
        "msteams/t1-a",
        "msteams/t1-b",
        "msteams/t2-a",
        "webchat/web-1",
    ]
    assert sorted(await list_all(store, channel_id="msteams", tenant_id="t1")) == [
        "msteams/t1-a",
        "msteams/t1-b",
    ]
    assert await list_all(store, tenant_id="t2") == ["msteams/t2-a"]
    assert sorted(await list_all(store, channel_id="msteams", team_id="team-x")) == [
        "msteams/t1-a",
        "msteams/t2-a",
    ]
    assert await list_all(store, channel_id="webchat") == ["webchat/web-1"]
    assert await list_all(store, channel_id="slack") == []


async def test_list_pages_without_duplicates_or_gaps(store):
    tenant_of = {f"c-{i:03d}": "t1" if i % 2 == 0 else "t2" for i in range(45)}
    for conversation_id, tenant in tenant_of.items():
        await store.upsert(reference(conversation_id, tenant=tenant, personal=False))
    for page_size, filters, tenants in [
        (7, {}, {"t1", "t2"}),
        (1, {"tenant_id": "t1"}, {"t1"}),
        (10, {"channel_id": "msteams", "tenant_id": "t2"}, {"t2"}),
    ]:
        seen: list[str] = []
        continuation = None
        while True:
            page = await store.list(page_size=page_size, continuation=continuation, **filters)
            assert len(page.items) <= page_size
            seen += [item.key for item in page.items]
            continuation = page.continuation
            if continuation is None:
                break
        assert len(seen) == len(set(seen)), "duplicates"
        assert set(seen) == {f"msteams/{c}" for c, t in tenant_of.items() if t in tenants}


async def test_list_items_carry_the_reference(store):
    await store.upsert(reference("x", activityId="1"), team_id="team-1")
    [item] = (await store.list()).items
    assert item.reference == reference("x", activityId="1")
    assert item.team_id == "team-1" and item.tenant_id == "tenant-1" and item.etag


async def test_list_survives_deletes_between_pages(store):
    for i in range(20):
        await store.upsert(reference(f"c-{i:02d}", personal=False))
    first = await store.list(page_size=5)
    deleted = {f"msteams/c-{i:02d}" for i in range(0, 20, 3)} - {i.key for i in first.items}
    for key in deleted:
        await store.delete(key)
    rest: list[str] = []
    continuation = first.continuation
    while continuation:
        page = await store.list(page_size=5, continuation=continuation)
        rest += [item.key for item in page.items]
        continuation = page.continuation
    seen = [i.key for i in first.items] + rest
    assert len(seen) == len(set(seen))
    assert set(seen) == {f"msteams/c-{i:02d}" for i in range(20)} - deleted


async def test_list_rejects_bad_page_sizes_and_tokens(store):
    await store.upsert(reference("a", personal=False))
    await store.upsert(reference("b", personal=False))
    page = await store.list(page_size=1)
    assert page.continuation
    for size in (0, -1, 5001):
        with pytest.raises(ValueError):
            await store.list(page_size=size)
    with pytest.raises(ValueError):
        await store.list(continuation="not a token")
    forged = [
        "",
        "é",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"v": 1, "a": 5}').decode(),
        base64.urlsafe_b64encode(b"[" * 100_000).decode(),  # deeper than the parser goes
    ]
    for token in forged:
        with collector_paused(), pytest.raises(ValueError):
            await store.list(continuation=token)
    with pytest.raises(ValueError):  # a token only continues the listing it came from
        await store.list(channel_id="webchat", continuation=page.continuation)


async def test_hostile_ids_round_trip(store):
    ids = [
        "19:abc@thread.tacv2;messageid=1675",
        "a:1/with/slashes/../..",
        "ünïcödé 会話 🤖 \u202e",
        "x" * 1500,
        "29:" + "é" * 700,
    ]
    for conversation_id in ids:
        ref = reference(conversation_id, user=conversation_id, aad=conversation_id[::-1])
        assert await store.upsert(ref)
        stored = await store.get(f"msteams/{conversation_id}")
        assert stored.reference == ref and stored.key == f"msteams/{conversation_id}"
        found = await store.find_by_user(channel_id="msteams", user_id=conversation_id)
        assert found.key == stored.key
    assert sorted(await list_all(store)) == sorted(f"msteams/{c}" for c in ids)


async def test_team_id_is_kept_when_a_later_activity_lacks_it(store):
    await store.upsert(reference("19:c", personal=False), team_id="team-1")
    assert await store.upsert(reference("19:c", personal=False, activityId="2")) is False
    assert (await store.get("msteams/19:c")).team_id == "team-1"


async def test_find_by_user_with_one_to_one_chats_in_several_tenants(store):
    # A guest user: one 1:1 with the bot in the home tenant, one in the host tenant.
    await store.upsert(reference("a:home", tenant="tenant-1", user="29:guest", aad="aad-guest"))
    await store.upsert(reference("a:host", tenant="tenant-2", user="29:guest", aad="aad-guest"))
    for tenant, key in (("tenant-1", "msteams/a:home"), ("tenant-2", "msteams/a:host")):
        for who in ({"user_id": "29:guest"}, {"aad_object_id": "aad-guest"}):
            found = await store.find_by_user(channel_id="msteams", tenant_id=tenant, **who)
            assert found is not None and found.key == key, (tenant, who)
    latest = await store.find_by_user(channel_id="msteams", user_id="29:guest")
    assert latest.key == "msteams/a:host"  # no tenant given: the most recently written
    await store.upsert(
        reference("a:home", tenant="tenant-1", user="29:guest", aad="aad-guest", locale="fr-FR")
    )
    latest = await store.find_by_user(channel_id="msteams", aad_object_id="aad-guest")
    assert latest.key == "msteams/a:home"


async def test_find_by_user_after_their_latest_conversation_is_deleted(store):
    for conversation_id in ("c-1", "c-2"):
        await store.upsert(
            reference(conversation_id, channel_id="webchat", tenant=None, user="u-1", aad=None)
        )
    assert (await store.find_by_user(channel_id="webchat", user_id="u-1")).key == "webchat/c-2"
    await store.delete("webchat/c-2")
    found = await store.find_by_user(channel_id="webchat", user_id="u-1")
    assert found is not None and found.key == "webchat/c-1"
    await store.delete("webchat/c-1")
    assert await store.find_by_user(channel_id="webchat", user_id="u-1") is None


async def visits(store, count: int, user: str = "u-many") -> list[str]:
    """`count` Web Chat visits of one user: a new Direct Line conversation each time."""
    for n in range(count):
        await store.upsert(reference(f"dl-{n}", channel_id="webchat", tenant=None, user=user))
    return [f"webchat/dl-{n}" for n in range(count)]


async def test_a_user_index_out_of_room_says_it_overflowed_until_settled(store):
    keys = await visits(store, INDEX_KEYS + 2)
    who = {"channel_id": "webchat", "user_id": "u-many"}
    assert await store.user_index_overflowed(**who) is True  # the two oldest are not listed
    assert (await store.find_by_user(**who)).key == keys[-1]
    assert [key for key in keys if await store.get(key) is None] == []  # all still stored
    assert await store.user_index_overflowed(channel_id="webchat", user_id="u-other") is False
    # Deleting every listed conversation leaves the mark: erasure must still list the channel.
    for key in keys:
        await store.delete(key)
    assert await store.find_by_user(**who) is None
    assert await store.user_index_overflowed(**who) is True
    await store.upsert(reference("dl-new", channel_id="webchat", tenant=None, user="u-many"))
    assert await store.user_index_overflowed(**who) is True  # kept by later writes
    await store.settle_user_index(**who)
    assert await store.user_index_overflowed(**who) is False
    assert (await store.find_by_user(**who)).key == "webchat/dl-new"


async def test_tenant_and_team_filters_skip_other_channels_stored_by_earlier_versions(
    store, request
):
    # Before tenant and team were indexed from Teams data only, a Web Chat client's own
    # channelData filled them: such a document, until rewritten, must not match a filter.
    from shared.references.blob_format import blob_metadata, document_body
    from shared.references.contract import plan
    from shared.references.keys import document_name

    await store.upsert(reference("t1-a", tenant="t1", personal=False), team_id="team-x")
    legacy = plan(None, reference("web-old", channel_id="webchat", tenant="t1"), None, 1.7e9)
    legacy.tenant_id, legacy.team_id = "t1", "team-x"
    if isinstance(store, MemoryReferenceStore):
        store._docs[legacy.key] = legacy
        store._sorted = None
    else:
        azurite = request.getfixturevalue("azurite")
        container = ContainerClient.from_connection_string(
            azurite.connection_string, store._container_name
        )
        with container:
            body = document_body(legacy)
            metadata = blob_metadata(legacy, body)
            container.upload_blob(document_name(legacy.key), body, metadata=metadata)

    assert await list_all(store, tenant_id="t1") == ["msteams/t1-a"]
    assert await list_all(store, team_id="team-x") == ["msteams/t1-a"]
    assert sorted(await list_all(store)) == ["msteams/t1-a", "webchat/web-old"]


async def test_an_aad_object_id_counts_on_teams_only(store):
    # Off Teams, from.aadObjectId is whatever the client wrote: a Web Chat user claiming
    # Alice's must not find (or, through erasure, delete) anything of hers by it.
    await store.upsert(reference("dl-1", channel_id="webchat", tenant=None, aad="aad-alice"))
    await store.upsert(reference("a:1", user="29:alice", aad="aad-alice"))
    assert (await store.get("webchat/dl-1")).aad_object_id is None
    assert await store.find_by_user(channel_id="webchat", aad_object_id="aad-alice") is None
    found = await store.find_by_user(channel_id="msteams", aad_object_id="aad-alice")
    assert found.key == "msteams/a:1"


async def test_group_speakers_locale_alone_writes_nothing(store):
    # In a group every speaker brings their own client's locale: no write per speaker.
    group = "19:team@thread.tacv2"
    assert await store.upsert(reference(group, personal=False, user="29:a", locale="en-US"))
    etag = (await store.get(f"msteams/{group}")).etag
    assert not await store.upsert(reference(group, personal=False, user="29:b", locale="de-DE"))
    assert not await store.upsert(reference(group, personal=False, user="29:c", locale="ja-JP"))
    assert (await store.get(f"msteams/{group}")).etag == etag


async def test_ids_differing_only_in_unicode_normalisation_stay_apart(store):
    composed, decomposed = "a:caf\u00e9", "a:cafe\u0301"  # NFC and NFD of the same text
    await store.upsert(reference(composed, user="29:nfc"))
    await store.upsert(reference(decomposed, user="29:nfd"))
    assert (await store.get(f"msteams/{composed}")).reference["user"]["id"] == "29:nfc"
    assert (await store.get(f"msteams/{decomposed}")).reference["user"]["id"] == "29:nfd"
    assert len(await list_all(store)) == 2


def _token_state(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token))


def _token(state: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode()


async def test_a_token_forged_for_other_filters_lists_only_those_filters(store):
    for i in range(4):
        await store.upsert(reference(f"t1-{i}", tenant="t1", personal=False))
        await store.upsert(reference(f"t2-{i}", tenant="t2", personal=False))
        await store.upsert(reference(f"web-{i}", channel_id="webchat", tenant=None))
    t1 = await store.list(channel_id="msteams", tenant_id="t1", page_size=1)
    t2 = await store.list(tenant_id="t2", page_size=1)
    web = await store.list(channel_id="webchat", page_size=1)
    # t1's position with the t2 listing's (public) fingerprint: still only t2 comes back.
    forged = _token({**_token_state(t1.continuation), "f": _token_state(t2.continuation)["f"]})
    page = await store.list(tenant_id="t2", page_size=100, continuation=forged)
    assert page.items and {item.tenant_id for item in page.items} == {"t2"}
    forged = _token({**_token_state(t1.continuation), "f": _token_state(web.continuation)["f"]})
    page = await store.list(channel_id="webchat", page_size=100, continuation=forged)
    assert {item.channel_id for item in page.items} <= {"webchat"}


# ---------------------------------------------------------------------------- Blob only


@pytest.mark.integration
async def test_blob_a_filtered_listing_is_walked_in_calls_bounded_in_time(azurite, unique_name):
    # A team's channels among tens of thousands of Teams conversations: one list call
    # walked them all, past the 10 s that bound a store call, and the team's removal
    # failed on every retry. Each call now returns after its time slice (0 here: one
    # Azure page of 5 names per call), however few it found, and the team's removal
    # pages on to the end.
    from shared.lifecycle import record_activity

    store = BlobReferenceStore(
        settings_for(azurite.connection_string, unique_name("refs")),
        options=FAST,
        listing_batch=5,
        listing_slice=0.0,
    )
    try:
        for n in range(40):
            await store.upsert(reference(f"19:x{n:02}", personal=False), team_id="team-x")
        for n in (3, 17, 36):
            await store.upsert(reference(f"19:x{n:02}t", personal=False), team_id="team-t")
        sizes = []
        continuation = None
        while True:
            page = await store.list(team_id="team-t", page_size=2, continuation=continuation)
            sizes.append(len(page.items))
            continuation = page.continuation
            if continuation is None:
                break
        assert len(sizes) >= 8 and sum(sizes) == 3  # 43 names, 5 per call

        general = reference("19:x03t", personal=False)
        deleted = {
            **general,
            "type": "conversationUpdate",
            "id": "act-1",
            "recipient": {"id": "28:bot"},
            "channelData": {"eventType": "teamDeleted", "team": {"id": "team-t"}},
        }
        await record_activity(store, deleted)
        left = await list_all(store, channel_id="msteams")
        assert len(left) == 40 and not any(key.endswith("t") for key in left)
    finally:
        await store.close()


@pytest.fixture
async def blob_store(azurite, unique_name):
    container = unique_name("refs")
    store = BlobReferenceStore(settings_for(azurite.connection_string, container), options=FAST)
    raw = ContainerClient.from_connection_string(azurite.connection_string, container)
    yield store, raw
    await store.close()
    raw.close()


@pytest.mark.integration
async def test_blob_layout_is_plain_schema_versioned_json(blob_store):
    store, container = blob_store
    assert not container.exists()  # created on first write, not before
    assert await store.get("msteams/a:1") is None
    page = await store.list()
    assert page.items == [] and page.continuation is None
    await store.upsert(reference(), team_id="team-1")
    assert container.exists()
    blob = container.get_blob_client(document_name("msteams/a:1"))
    document = json.loads(blob.download_blob().readall())
    assert document["schemaVersion"] == 1
    assert document["key"] == "msteams/a:1"
    assert document["reference"] == reference()
    assert (document["tenantId"], document["teamId"], document["personal"]) == (
        "tenant-1",
        "team-1",
        True,
    )
    assert (document["userId"], document["aadObjectId"]) == ("29:user", "aad-user")
    props = blob.get_blob_properties()
    assert props.content_settings.content_type == "application/json"
    index = json.loads(
        container.get_blob_client(user_index_name("msteams", "id", "29:user"))
        .download_blob()
        .readall()
    )
    assert index == {"schemaVersion": 1, "key": "msteams/a:1", "overflowed": False}
    assert {b.name.split("/")[0] for b in container.list_blobs()} == {"refs", "users"}


@pytest.mark.integration
@pytest.mark.parametrize(
    "edit", [{"userId": 5}, {"aadObjectId": ["x"]}, {"personal": "false"}, {"key": "no-slash"}]
)
async def test_a_document_edited_with_a_field_of_another_type_is_a_store_error(blob_store, edit):
    # Not an AttributeError deep in a turn (an int user id in a blob name): the store's own
    # error, which names no content.
    store, container = blob_store
    await store.upsert(reference())
    blob = container.get_blob_client(document_name("msteams/a:1"))
    document = json.loads(blob.download_blob().readall())
    blob.upload_blob(json.dumps({**document, **edit}), overwrite=True)
    fresh = BlobReferenceStore(store._settings, options=FAST)
    try:
        with pytest.raises(StoreError):
            await fresh.upsert(reference(locale="de-DE"))
    finally:
        await fresh.close()


@pytest.mark.integration
async def test_a_group_document_naming_its_speaker_loses_them_at_the_next_activity(
    blob_store, azurite
):
    # As an earlier version wrote it: the last speaker kept in the reference.
    store, container = blob_store
    group = "19:team@thread.tacv2"
    await store.upsert(reference(group, personal=False))
    blob = container.get_blob_client(document_name(f"msteams/{group}"))
    document = json.loads(blob.download_blob().readall())
    document["reference"]["user"] = {"id": "29:alice", "name": "Alice Liddell"}
    document["reference"]["locale"] = "fr-FR"
    metadata = {k: v for k, v in blob.get_blob_properties().metadata.items() if k != "doc"}
    blob.upload_blob(json.dumps(document), overwrite=True, metadata=metadata)

    settings = settings_for(azurite.connection_string, container.container_name)
    later = BlobReferenceStore(settings, options=FAST)  # another process: no cache
    try:
        assert await later.upsert(reference(group, personal=False, user="29:bob")) is True
    finally:
        await later.close()
    body = blob.download_blob().readall().decode()
    assert "Alice" not in body and "29:alice" not in body and "29:bob" not in body
    assert "fr-FR" not in body


@pytest.mark.integration
async def test_blob_chatty_conversation_costs_no_storage_call(azurite, unique_name):
    requests: list[str] = []
    client = AsyncBlobServiceClient.from_connection_string(
        azurite.connection_string, raw_request_hook=lambda r: requests.append(r.http_request.method)
    )
    store = BlobReferenceStore(
        settings_for(azurite.connection_string, unique_name("refs")), client=client, options=FAST
    )
    try:
        assert await store.upsert(reference(activityId="0"))
        after_first = len(requests)
        for i in range(1, 50):
            assert await store.upsert(reference(activityId=str(i))) is False
        assert len(requests) == after_first  # 49 messages: not one read or write
        assert await store.upsert(reference(activityId="50", locale="de-DE")) is True
        assert "PUT" in requests[after_first:]
    finally:
        await store.close()
        await client.close()


@pytest.mark.integration
async def test_blob_refresh_bypasses_the_cache(azurite, unique_name):
    settings = settings_for(azurite.connection_string, unique_name("refs"))
    a, b = BlobReferenceStore(settings, options=FAST), BlobReferenceStore(settings, options=FAST)
    try:
        await a.upsert(reference())
        await b.delete("msteams/a:1")  # another instance removed it
        assert await a.upsert(reference()) is False  # a's cache still says "stored"
        assert await a.upsert(reference(), refresh=True) is True
        assert await b.get("msteams/a:1") is not None
    finally:
        await a.close()
        await b.close()


@pytest.mark.integration
async def test_blob_cache_entries_expire(azurite, unique_name):
    now = [1000.0]
    settings = settings_for(azurite.connection_string, unique_name("refs"))
    a = BlobReferenceStore(settings, options=FAST, cache_ttl=60, clock=lambda: now[0])
    b = BlobReferenceStore(settings, options=FAST)
    try:
        await a.upsert(reference())
        await b.delete("msteams/a:1")
        now[0] += 61
        assert await a.upsert(reference()) is True
    finally:
        await a.close()
        await b.close()


@pytest.mark.integration
async def test_blob_foreign_or_corrupt_documents_raise_store_error(blob_store):
    store, container = blob_store
    container.create_container()
    container.upload_blob(
        document_name("msteams/new"),
        json.dumps({"schemaVersion": 99, "key": "msteams/new", "reference": {}}),
    )
    container.upload_blob(document_name("msteams/bad"), b"{not json")
    with pytest.raises(StoreError, match="schemaVersion"):
        await store.get("msteams/new")
    with pytest.raises(StoreError, match="schemaVersion"):
        await store.upsert(reference("new"))  # never overwrite what a newer bot wrote
    with pytest.raises(StoreError, match="not valid JSON"):
        await store.get("msteams/bad")
    assert (
        json.loads(container.download_blob(document_name("msteams/new")).readall())["schemaVersion"]
        == 99
    )


@pytest.mark.integration
async def test_blob_a_listing_leaves_out_documents_it_cannot_read_and_says_so(blob_store, caplog):
    # A document a newer version wrote (kept after a rollback), or junk under the prefix:
    # every broadcast and erasure listing the channel failed on it, for as long as it stayed.
    store, container = blob_store
    await store.upsert(reference("a:1"))
    await store.upsert(reference("a:2"))
    container.upload_blob(
        document_name("msteams/new"),
        json.dumps({"schemaVersion": 99, "key": "msteams/new", "reference": {}}),
    )
    container.upload_blob(document_name("msteams/bad"), b"{not json")
    with caplog.at_level(logging.WARNING, logger="shared.references"):
        assert sorted(await list_all(store, channel_id="msteams")) == ["msteams/a:1", "msteams/a:2"]
    assert caplog.text.count("listing left out") == 2
    assert "schemaVersion 99" in caplog.text and "not json" not in caplog.text
    with pytest.raises(StoreError, match="schemaVersion"):
        await store.upsert(reference("new"))  # still never rewritten


@pytest.mark.integration
async def test_blob_json_nested_deeper_than_the_parser_goes_is_left_out_like_junk(blob_store):
    # "[[[[…]]]]" under the prefix raised RecursionError out of the listing: every
    # broadcast, team removal and erasure listing the channel stopped on it.
    store, container = blob_store
    await store.upsert(reference("a:1"))
    deep = b"[" * 200_000 + b"]" * 200_000
    container.upload_blob(document_name("msteams/deep"), deep)
    assert await list_all(store, channel_id="msteams") == ["msteams/a:1"]
    with pytest.raises(StoreError, match="not valid JSON"):
        await store.get("msteams/deep")


@pytest.mark.integration
async def test_blob_stale_user_index_is_ignored(blob_store):
    store, container = blob_store
    await store.upsert(reference("a:1", user="29:alice", aad=None))
    # Point alice's index at a conversation that is not hers.
    await store.upsert(reference("a:2", user="29:bob", aad=None))
    container.upload_blob(
        user_index_name("msteams", "id", "29:alice"),
        json.dumps({"schemaVersion": 1, "key": "msteams/a:2"}),
        overwrite=True,
    )
    assert await store.find_by_user(channel_id="msteams", user_id="29:alice") is None
    container.upload_blob(
        user_index_name("msteams", "id", "29:carol"),
        json.dumps({"schemaVersion": 1, "key": "msteams/gone"}),
    )
    assert await store.find_by_user(channel_id="msteams", user_id="29:carol") is None
    for junk in ({"key": "no-slash"}, {"key": 42}, ["not", "an", "object"]):
        container.upload_blob(
            user_index_name("msteams", "id", "29:dave"), json.dumps(junk), overwrite=True
        )
        assert await store.find_by_user(channel_id="msteams", user_id="29:dave") is None


@pytest.mark.integration
@pytest.mark.parametrize("how", ["written by the user", "deleted"])
async def test_blob_an_aad_index_an_earlier_version_wrote_in_upper_case_goes(blob_store, how):
    # Earlier versions indexed the aadObjectId as given (a user target named it in upper
    # case); now it is indexed in lower case. The old entry must still go, or erasing the
    # user leaves an index naming their conversation behind.
    store, container = blob_store
    aad = "0F1E2D3C-0000-4000-8000-0000000000AA"
    await store.upsert(reference("a:1", user=aad, aad=aad))
    old = user_index_name("msteams", "aad", aad)
    container.upload_blob(old, json.dumps({"schemaVersion": 1, "key": "msteams/a:1"}))
    if how == "deleted":
        assert await store.delete("msteams/a:1")
    else:  # the user writes in it: Teams names them by their 29: id, aadObjectId lower
        await store.upsert(reference("a:1", user="29:alice", aad=aad.lower()), refresh=True)
    left = json.loads(container.download_blob(old).readall()) if blob_exists(container, old) else {}
    assert "msteams/a:1" not in json.dumps(left)


@pytest.mark.integration
async def test_blob_overflowed_user_index_is_kept_without_keys_until_settled(blob_store):
    store, container = blob_store
    keys = await visits(store, INDEX_KEYS + 1)
    index = container.get_blob_client(user_index_name("webchat", "id", "u-many"))
    document = json.loads(index.download_blob().readall())
    assert document["overflowed"] is True
    assert [document["key"], *document["older"]] == keys[:0:-1]  # the oldest dropped
    for key in keys:
        await store.delete(key)
    assert json.loads(index.download_blob().readall()) == {"schemaVersion": 1, "overflowed": True}
    await store.settle_user_index(channel_id="webchat", user_id="u-many")
    assert not index.exists()
    assert not any(b.name.startswith("users/") for b in container.list_blobs())  # no aad one


@pytest.mark.integration
async def test_blob_large_reference_is_listed_from_its_document(blob_store):
    store, _ = blob_store
    big = reference("big", personal=False)
    big["conversation"]["name"] = os.urandom(6000).hex()  # too big for the metadata copy
    await store.upsert(big)
    await store.upsert(reference("small", personal=False))
    items = {item.key: item for item in (await store.list()).items}
    del big["user"]  # a group's speaker is not stored
    assert items["msteams/big"].reference == big
    small = reference("small", personal=False)
    del small["user"]
    assert items["msteams/small"].reference == small


@pytest.mark.integration
def test_blob_store_survives_a_new_event_loop(azurite, unique_name):
    store = BlobReferenceStore(
        settings_for(azurite.connection_string, unique_name("refs")), options=FAST
    )
    assert asyncio.run(store.upsert(reference()))
    # A host that runs each invocation on a fresh loop: the client is rebuilt, not reused.
    assert asyncio.run(store.get("msteams/a:1")) is not None
    asyncio.run(store.close())


class Gate:
    """Holds the first request a predicate picks (or its answer) until released."""

    def __init__(self, picks, after_response: bool) -> None:
        self.picks = picks
        self.after_response = after_response
        self.reached = asyncio.Event()
        self.released = asyncio.Event()

    async def wait_reached(self) -> None:
        await asyncio.wait_for(self.reached.wait(), 5)

    async def hold(self) -> None:
        self.reached.set()
        await asyncio.wait_for(self.released.wait(), 10)


class GatedTransport(AioHttpTransport):
    """The SDK's own aiohttp transport, able to pause one chosen request: this is how two
    function instances' requests interleave, made deterministic. Everything still reaches
    Azurite."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[Gate] = []
        self.sent: list[tuple[str, str]] = []  # (method, "refs" or "users") per request

    def gate(self, picks, *, after_response: bool = False) -> Gate:
        self.gates.append(gate := Gate(picks, after_response))
        return gate

    async def send(self, request, **kwargs):
        segments = request.url.split("?", 1)[0].split("/")  # .../account/container/refs/...
        self.sent.append((request.method, segments[5] if len(segments) > 5 else "container"))
        gate = next((g for g in self.gates if not g.reached.is_set() and g.picks(request)), None)
        if gate is not None and not gate.after_response:
            await gate.hold()
        response = await super().send(request, **kwargs)
        if gate is not None and gate.after_response:
            await gate.hold()
        return response


def _is(method: str, prefix: str):
    return lambda request: request.method == method and f"/{prefix}/" in request.url


AMER = "https://smba.trafficmanager.net/amer/"


@pytest.fixture
async def gated(azurite, unique_name):
    """make() → (store, transport); stores share one container."""
    settings = settings_for(azurite.connection_string, unique_name("refs"))
    opened = []

    def make():
        transport = GatedTransport()
        client = AsyncBlobServiceClient.from_connection_string(
            azurite.connection_string, transport=transport
        )
        store = BlobReferenceStore(settings, client=client, options=FAST)
        opened.append((store, client))
        return store, transport

    yield make
    for store, client in opened:
        await store.close()
        await client.close()


@pytest.mark.integration
async def test_blob_a_new_users_first_conversation_costs_four_storage_calls(gated):
    store, transport = gated()
    await store.upsert(reference(conversation_id="a:0", user="29:other", aad="aad-other"))
    transport.sent.clear()
    assert await store.upsert(reference()) is True  # a 1:1 conversation with a new user
    # The document is looked for (absent) and created, then each user index created at
    # once (If-None-Match, no read first). Nothing is read back.
    assert transport.sent == [
        ("GET", "refs"),
        ("PUT", "refs"),
        ("PUT", "users"),
        ("PUT", "users"),
    ]
    by_id = await store.find_by_user(channel_id="msteams", user_id="29:user")
    by_aad = await store.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    assert by_id is not None and by_aad is not None and by_id.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_while_most_conversations_are_new_they_are_created_without_a_read(gated):
    store, transport = gated()
    for n in range(10):  # new users' first conversations (many users starting at once)
        transport.sent.clear()
        assert await store.upsert(reference(f"new:{n}", user=f"29:u{n}", aad=f"aad-{n}"))
    # The document is created straight away (If-None-Match: *): no read of its absence.
    assert transport.sent == [("PUT", "refs"), ("PUT", "users"), ("PUT", "users")]

    # A conversation stored earlier (by another instance: nothing cached here) whose
    # reference changed: the create is refused, then the usual read and conditional write.
    other, _ = gated()
    await other.upsert(reference("old:1", user="29:old", aad="aad-old"))
    transport.sent.clear()
    assert await store.upsert(reference("old:1", user="29:old", aad="aad-old", locale="de-DE"))
    assert transport.sent[:3] == [("PUT", "refs"), ("GET", "refs"), ("PUT", "refs")]
    stored = await store.get("msteams/old:1")
    assert stored is not None and stored.reference["locale"] == "de-DE"
    for n in (0, 9):
        found = await store.find_by_user(channel_id="msteams", aad_object_id=f"aad-{n}")
        assert found is not None and found.key == f"msteams/new:{n}"

    # Once most uncached conversations turn out to be stored already, reading comes first.
    for n in range(20):
        await other.upsert(reference(f"seen:{n}", user=f"29:s{n}", aad=None))
    for n in range(20):
        await store.upsert(reference(f"seen:{n}", user=f"29:s{n}", aad=None, locale="fr-FR"))
    transport.sent.clear()
    await store.upsert(reference("seen:0", user="29:s0", aad=None, locale="it-IT"), refresh=True)
    assert transport.sent[0] == ("GET", "refs")


@pytest.mark.integration
async def test_blob_a_caller_that_stops_waiting_leaves_the_1to1_findable_by_its_user(gated):
    # A turn's recording budget ran out while storage was answering the document's write:
    # the write had landed, and the user index write after it must still happen, or the
    # user's erasure (which finds 1:1s through the index) would leave the 1:1 behind.
    store, transport = gated()
    gate = transport.gate(_is("PUT", "refs"), after_response=True)
    upsert = asyncio.ensure_future(store.upsert(reference()))
    await gate.wait_reached()  # stored; its answer held
    upsert.cancel()  # the caller stops waiting
    with pytest.raises(asyncio.CancelledError):
        await upsert
    gate.released.set()

    for _ in range(100):  # the write goes on by itself
        found = await store.find_by_user(channel_id="msteams", user_id="29:user")
        if found is not None:
            break
        await asyncio.sleep(0.05)
    assert found is not None and found.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_close_lets_a_write_its_caller_stopped_waiting_for_finish(gated, azurite):
    # The host stops the process (close) while a write whose turn gave up is still going
    # on: it ends first, the 1:1 stored and findable by its user, not cut between the two.
    store, transport = gated()
    gate = transport.gate(_is("PUT", "refs"), after_response=True)
    upsert = asyncio.ensure_future(store.upsert(reference()))
    await gate.wait_reached()
    upsert.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upsert

    async def release_soon() -> None:
        await asyncio.sleep(0.3)
        gate.released.set()

    releasing = asyncio.ensure_future(release_soon())
    await store.close()
    await releasing
    fresh = BlobReferenceStore(store._settings, options=FAST)
    try:
        found = await fresh.find_by_user(channel_id="msteams", user_id="29:user")
    finally:
        await fresh.close()
    assert found is not None and found.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_a_removal_waits_for_a_write_its_caller_stopped_waiting_for(gated):
    # The write goes on after its caller gave up (above); a removal meanwhile must not be
    # undone by it (its conditional write, refused, would read the absence and create).
    store, transport = gated()
    await store.upsert(reference())
    gate = transport.gate(_is("GET", "refs"), after_response=True)
    upsert = asyncio.ensure_future(store.upsert(reference(locale="de-DE"), refresh=True))
    await gate.wait_reached()
    upsert.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upsert

    async def release_soon() -> None:
        await asyncio.sleep(0.3)  # storage answers the write's read a moment later
        gate.released.set()

    releasing = asyncio.ensure_future(release_soon())
    assert await store.delete("msteams/a:1") is True
    await releasing
    await asyncio.sleep(0.5)  # anything still going on by itself
    assert await store.get("msteams/a:1") is None
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None


@pytest.mark.integration
async def test_blob_a_get_does_not_let_the_next_activity_skip_repairing_the_index(
    blob_store, azurite
):
    # Stored, but its user index lost it (a write cut short in an earlier version, a
    # process that died in between): a get (a proactive send) must not cache it as seen.
    store, raw = blob_store
    await store.upsert(reference())
    for blob in list(raw.list_blobs(name_starts_with="users/")):
        raw.delete_blob(blob.name)
    fresh = BlobReferenceStore(store._settings, options=FAST)
    try:
        assert await fresh.get("msteams/a:1") is not None
        await fresh.upsert(reference())  # the conversation's next activity
        found = await fresh.find_by_user(channel_id="msteams", user_id="29:user")
    finally:
        await fresh.close()
    assert found is not None and found.key == "msteams/a:1"


class FailingTransport(AioHttpTransport):
    """The SDK's own transport; requests a predicate picks fail as a dropped connection
    would (the one failure Azurite cannot be made to produce on demand)."""

    def __init__(self, fails) -> None:
        super().__init__()
        self.fails = fails

    async def send(self, request, **kwargs):
        from azure.core.exceptions import ServiceRequestError

        if self.fails(request):
            raise ServiceRequestError("connection dropped (test)")
        return await super().send(request, **kwargs)


@pytest.mark.integration
async def test_blob_index_write_failing_after_the_document_is_repaired_by_the_next_activity(
    azurite, unique_name
):
    # The document is written before the user index: when the index write fails (or the
    # process dies in between), the conversation is stored but its user cannot be found
    # yet. The failed upsert must not be remembered, so the next activity of the
    # conversation (same process, same reference) reads the document and writes the index.
    settings = settings_for(azurite.connection_string, unique_name("refs"))
    failing = {"on": True}
    transport = FailingTransport(lambda r: failing["on"] and _is("PUT", "users")(r))
    client = AsyncBlobServiceClient.from_connection_string(
        azurite.connection_string, transport=transport, retry_total=0
    )
    store = BlobReferenceStore(settings, client=client, options=FAST)
    try:
        with pytest.raises(StoreError):
            await store.upsert(reference())
        container = ContainerClient.from_connection_string(
            azurite.connection_string, settings.references_container
        )
        assert container.get_blob_client(document_name("msteams/a:1")).exists()  # written
        assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None
        failing["on"] = False
        assert await store.upsert(reference()) is False  # nothing changed: no document write
        by_id = await store.find_by_user(channel_id="msteams", user_id="29:user")
        by_aad = await store.find_by_user(channel_id="msteams", aad_object_id="aad-user")
        assert by_id is not None and by_id.key == "msteams/a:1"
        assert by_aad is not None and by_aad.key == "msteams/a:1"
    finally:
        await store.close()
        await client.close()


@pytest.mark.integration
@pytest.mark.parametrize("failing", ["DELETE refs", "* users"])
async def test_blob_a_delete_failing_halfway_leaves_no_1to1_its_users_erasure_misses(
    azurite, unique_name, failing
):
    # A removal stopped halfway (a storage failure, its time budget, the process ending):
    # taking the user index entries out first, a failed document delete then left a
    # stored 1:1 its user's index no longer named, so erasing that user missed it. Now
    # the document goes first: failing there changes nothing; failing after, only index
    # entries naming no document are left, which lookups check.
    from shared.userdata import erase_user_data

    settings = settings_for(azurite.connection_string, unique_name("refs"))
    method, prefix = failing.split()
    broken = {"on": False}
    transport = FailingTransport(
        lambda r: broken["on"] and f"/{prefix}/" in r.url and method in ("*", r.method)
    )
    client = AsyncBlobServiceClient.from_connection_string(
        azurite.connection_string, transport=transport, retry_total=0
    )
    store = BlobReferenceStore(settings, client=client, options=FAST)
    other = BlobReferenceStore(settings, options=FAST)  # an operator's erasure, later
    try:
        await store.upsert(reference("a:1"))
        broken["on"] = True
        with pytest.raises(StoreError):
            await store.delete("msteams/a:1")
        still = await other.get("msteams/a:1")
        found = await other.find_by_user(channel_id="msteams", user_id="29:user")
        assert (still is None) is (prefix == "users")
        assert (found is None) is (still is None)
        await erase_user_data(
            channel_id="msteams",
            user_id="29:user",
            aad_object_id="aad-user",
            state=None,
            references=other,
        )
        assert await other.get("msteams/a:1") is None
    finally:
        await store.close()
        await other.close()
        await client.close()


@pytest.mark.integration
async def test_blob_a_known_users_new_conversation_keeps_the_older_ones_in_the_index(gated):
    store, _ = gated()
    await store.upsert(reference(conversation_id="a:0"))
    await store.upsert(reference(conversation_id="a:1"))  # the same user, again 1:1
    by_id = await store.find_by_user(channel_id="msteams", user_id="29:user")
    assert by_id is not None and by_id.key == "msteams/a:1"  # the most recent first
    await store.delete("msteams/a:1")
    by_id = await store.find_by_user(channel_id="msteams", user_id="29:user")
    assert by_id is not None and by_id.key == "msteams/a:0"  # the older one was kept


@pytest.mark.integration
async def test_blob_delete_racing_a_recreate_keeps_the_user_index(gated):
    deleter, deleter_transport = gated()
    updater, updater_transport = gated()
    await updater.upsert(reference())
    index_read = deleter_transport.gate(_is("GET", "users"))
    document_put = updater_transport.gate(_is("PUT", "refs"))
    deleting = asyncio.create_task(deleter.delete("msteams/a:1"))
    await index_read.wait_reached()
    updating = asyncio.create_task(updater.upsert(reference(service_url=AMER)))
    await document_put.wait_reached()
    index_read.released.set()
    assert await deleting is True
    document_put.released.set()
    assert await updating is True
    # The update came last: the conversation is stored, and its user can be found.
    stored = await updater.get("msteams/a:1")
    assert stored is not None and stored.reference["serviceUrl"] == AMER
    by_id = await updater.find_by_user(channel_id="msteams", user_id="29:user")
    by_aad = await updater.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    assert by_id is not None and by_id.key == "msteams/a:1"
    assert by_aad is not None and by_aad.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_a_recreate_between_a_deletes_two_steps_is_put_back_in_the_index(gated):
    # The delete removed the document; before it takes the key out of the user index,
    # another instance stores the conversation again, index and all. The delete's check
    # after its index step finds the document and puts the key back.
    deleter, deleter_transport = gated()
    recreator, _ = gated()
    await deleter.upsert(reference())
    index_read = deleter_transport.gate(_is("GET", "users"))
    deleting = asyncio.create_task(deleter.delete("msteams/a:1"))
    await index_read.wait_reached()  # the document is gone; the index still names it
    assert await recreator.get("msteams/a:1") is None
    assert await recreator.upsert(reference(service_url=AMER)) is True
    index_read.released.set()
    assert await deleting is True
    by_id = await recreator.find_by_user(channel_id="msteams", user_id="29:user")
    by_aad = await recreator.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    assert by_id is not None and by_id.reference["serviceUrl"] == AMER
    assert by_aad is not None and by_aad.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_a_blind_create_racing_a_delete_keeps_the_user_index(gated):
    # An instance that has seen mostly new conversations creates without reading first.
    # Its create lands just after another instance deleted the conversation: the document
    # is stored again, and its user must still find it (written before the document, its
    # index entry was taken out by the delete).
    deleter, _ = gated()
    creator, creator_transport = gated()
    await deleter.upsert(reference())
    creator._new_share = 1.0  # create-first, as after a run of new conversations
    document_put = creator_transport.gate(_is("PUT", "refs"))
    creating = asyncio.create_task(creator.upsert(reference(service_url=AMER)))
    await document_put.wait_reached()
    assert await deleter.delete("msteams/a:1") is True
    document_put.released.set()
    assert await creating is True
    by_id = await creator.find_by_user(channel_id="msteams", user_id="29:user")
    assert by_id is not None and by_id.key == "msteams/a:1"


@pytest.mark.integration
async def test_blob_delete_during_an_update_leaves_no_stale_cache(gated):
    store, transport = gated()
    await store.upsert(reference())
    answer = transport.gate(_is("PUT", "refs"), after_response=True)
    updating = asyncio.create_task(store.upsert(reference(service_url=AMER)))
    await answer.wait_reached()  # the update is stored; its answer is not back yet
    deleting = asyncio.ensure_future(store.delete("msteams/a:1"))  # waits for the update
    await asyncio.sleep(0.2)
    answer.released.set()
    assert await updating is True
    assert await deleting is True
    # Deleted after the update: the next message must store the conversation again.
    assert await store.upsert(reference(service_url=AMER)) is True
    assert await store.get("msteams/a:1") is not None


@pytest.mark.integration
@pytest.mark.parametrize("time_slice", [None, 0.0])  # 0: each call ends after one page
async def test_blob_paging_survives_inserts_before_the_resume_point(
    azurite, unique_name, time_slice
):
    settings = settings_for(azurite.connection_string, unique_name("refs"))
    store = BlobReferenceStore(settings, options=FAST, listing_batch=4, listing_slice=time_slice)
    try:
        wanted = {f"msteams/m-{i}" for i in range(3)}
        for key in wanted:
            await store.upsert(reference(key.partition("/")[2], tenant="t1", personal=False))
        first = await store.list(tenant_id="t1", page_size=1)
        [handed_out] = first.items
        # More conversations than one listing batch appear before the resume point.
        resume_point = document_name(handed_out.key)
        fillers = [f"f-{i}" for i in range(100)]
        fillers = [f for f in fillers if document_name(f"msteams/{f}") < resume_point]
        for filler in fillers[:6]:
            await store.upsert(reference(filler, tenant="t2", personal=False))
        seen = [handed_out.key]
        continuation = first.continuation
        while continuation:
            page = await store.list(tenant_id="t1", page_size=1, continuation=continuation)
            seen += [item.key for item in page.items]
            continuation = page.continuation
        assert len(seen) == len(set(seen)), f"duplicates: {seen}"
        assert set(seen) == wanted
    finally:
        await store.close()


@pytest.mark.integration
async def test_blob_leased_document_is_a_clear_error_not_a_conflict(blob_store):
    store, container = blob_store
    await store.upsert(reference())
    container.get_blob_client(document_name("msteams/a:1")).acquire_lease(-1)
    for call in (
        lambda: store.upsert(reference(locale="de-DE")),
        lambda: store.delete("msteams/a:1"),
    ):
        with pytest.raises(StoreError) as info:
            await call()
        assert type(info.value) is StoreError  # not StoreConflict: no ETag race here
        assert (info.value.status, info.value.code) == (412, "LeaseIdMissing")
        assert "LeaseIdMissing" in str(info.value)


@pytest.mark.integration
async def test_blob_user_index_keeps_older_conversations(blob_store):
    store, container = blob_store
    await store.upsert(reference("a:1", tenant="tenant-1"))
    await store.upsert(reference("a:2", tenant="tenant-2"))
    index = container.download_blob(user_index_name("msteams", "aad", "aad-user")).readall()
    assert json.loads(index) == {
        "schemaVersion": 1,
        "key": "msteams/a:2",
        "older": ["msteams/a:1"],
        "overflowed": False,
    }
    await store.delete("msteams/a:2")
    await store.delete("msteams/a:1")
    assert not [b.name for b in container.list_blobs(name_starts_with="users/")]


@pytest.mark.integration
async def test_blob_container_deleted_while_running_is_recreated(blob_store):
    store, container = blob_store
    await store.upsert(reference("a:1", user="29:alice", aad=None))
    container.delete_container()
    assert await store.get("msteams/a:1") is None
    assert await store.find_by_user(channel_id="msteams", user_id="29:alice") is None
    assert (await store.list()).items == []
    assert await store.delete("msteams/a:1") is False
    assert await store.upsert(reference("a:2", user="29:bob", aad=None)) is True
    assert container.exists()
    assert await store.upsert(reference("a:1", user="29:alice", aad=None), refresh=True) is True
    assert sorted(await list_all(store)) == ["msteams/a:1", "msteams/a:2"]
    found = await store.find_by_user(channel_id="msteams", user_id="29:alice")
    assert found is not None and found.key == "msteams/a:1"


# ---------------------------------------------------------------------------- outages


@pytest.mark.integration
async def test_unreachable_storage_raises_store_error_quickly(unique_name):
    dead = Azurite().start()
    store = BlobReferenceStore(
        settings_for(dead.connection_string, unique_name("refs")), options=FAST
    )
    try:
        assert await store.upsert(reference())  # works while storage is up
        dead.stop()
        started = time.monotonic()
        for call in (
            lambda: store.get("msteams/a:1"),
            lambda: store.upsert(reference("other")),
            lambda: store.delete("msteams/a:1"),
            lambda: store.list(),
            lambda: store.find_by_user(channel_id="msteams", user_id="29:user"),
        ):
            with pytest.raises(StoreError, match=r"unreachable|timed out") as info:
                await call()
            assert "AccountKey" not in str(info.value) and "Eby8" not in str(info.value)
        assert time.monotonic() - started < 20
    finally:
        dead.stop()
        await store.close()


async def test_unanswering_storage_times_out_instead_of_hanging(unique_name):
    # A socket that accepts connections (kernel backlog) but never answers: a hung account.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        options = StorageOptions(
            retry_total=0, connection_timeout=1, read_timeout=30, operation_timeout=1.5
        )
        store = BlobReferenceStore(
            settings_for(_connection_string(port), unique_name("refs")), options=options
        )
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                await store.get("msteams/a:1")
            assert time.monotonic() - started < 5
        finally:
            await store.close()


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_listing_answered_with_what_no_client_can_read_is_a_store_error(answer):
    # Answered 200 (a proxy's page, XML cut short): the storage SDK's DeserializationError
    # is a ValueError, not an AzureError, and escaped the store as it was (a broadcast's
    # fan-out raised out of the engine, spending the host's dequeue budget, instead of
    # being held for storage), or the store said "HTTP 200".
    async with unreadable_storage(answer) as storage:
        store = BlobReferenceStore(settings_for(storage.connection_string, "refs"), options=FAST)
        try:
            with pytest.raises(StoreError) as info:
                await store.list(channel_id="msteams")
        finally:
            await store.close()

    assert any("comp=list" in request for request in storage.requests)
    text = str(info.value)
    assert text.startswith("reference store: list 'msteams' failed: the answer could not be read (")
    assert info.value.status is None and ANSWER_TEXT not in text


async def test_a_success_with_a_header_the_storage_sdk_misreads_is_a_store_error():
    # A 200 carrying `x-ms-error-code` (a proxy's): the SDK takes any header with "or-" in
    # its name for object replication's and fails reading it (an IndexError), which
    # escaped the store as "our own code's error" rather than storage's.
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=200, body=b"{}", headers={"x-ms-error-code": "x"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )
    store = BlobReferenceStore(settings_for(connection, "refs"), options=FAST)
    try:
        with pytest.raises(StoreError) as info:
            await store.get("msteams/a:1")
    finally:
        await store.close()
        await runner.cleanup()
    assert str(info.value).startswith(
        "reference store: get 'msteams/a:1' failed: the answer could not be read ("
    )


async def test_a_wrong_argument_the_storage_sdk_refuses_stays_our_own_error():
    # The SDK checks arguments in its own frames, before sending anything: such a TypeError
    # is a bug of ours (a call changed by an SDK upgrade), never "storage unreadable",
    # which would hold a proactive message for storage for ever.
    from azure.storage.blob.aio import BlobServiceClient

    from shared.storage import unreadable_answer

    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:9/{ACCOUNT};"
    )
    async with BlobServiceClient.from_connection_string(connection) as service:
        blob = service.get_blob_client("c", "b")
        with pytest.raises(TypeError) as wrong_data:
            await blob.upload_blob(123)
        with pytest.raises(TypeError) as wrong_condition:
            await blob.delete_blob(match_condition=1, etag="x")
    assert not unreadable_answer(wrong_data.value)
    assert not unreadable_answer(wrong_condition.value)


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
async def test_a_read_answered_without_its_content_range_is_a_store_error(answer):
    # A 200 to the document's ranged GET (a proxy's page): the SDK's plain ValueError.
    async with unreadable_storage(answer, downloads=True) as storage:
        store = BlobReferenceStore(settings_for(storage.connection_string, "refs"), options=FAST)
        try:
            with pytest.raises(StoreError) as info:
                await store.get("msteams/a:1")
        finally:
            await store.close()

    text = str(info.value)
    assert text.startswith(
        "reference store: get 'msteams/a:1' failed: the answer could not be read ("
    )
    assert info.value.status is None and ANSWER_TEXT not in text


async def test_a_key_a_client_chose_cannot_fake_a_line_of_the_stores_own(blob_store, caplog):
    # A channel-signed activity may name any conversation id: the store's lines and its
    # errors (which the messages endpoint logs at ERROR) quote the key and cut it short.
    store, _raw = blob_store
    forged = "19:a\nERROR shared.messages: FORGED" + "x" * 2_000
    reference = {
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/amer/",
        "conversation": {"id": forged, "conversationType": "personal", "tenantId": "t-1"},
        "user": {"id": "29:ada"},
        "bot": {"id": "28:bot"},
    }
    with caplog.at_level(logging.DEBUG, logger="shared"):
        await store.upsert(reference)
        await store.delete(f"msteams/{forged}")
    async with unreadable_storage(next(iter(UNREADABLE_ANSWERS)), downloads=True) as storage:
        broken = BlobReferenceStore(settings_for(storage.connection_string, "refs"), options=FAST)
        try:
            with pytest.raises(StoreError) as info:
                await broken.get(f"msteams/{forged}")
        finally:
            await broken.close()
    lines = [record.getMessage() for record in caplog.records] + [str(info.value)]
    assert any("references: created 'msteams/19:a\\nERROR" in line for line in lines)
    assert any("references: deleted 'msteams/19:a\\nERROR" in line for line in lines)
    assert str(info.value).startswith("reference store: get 'msteams/19:a\\nERROR")
    assert not [line for line in lines if "\n" in line or len(line) > 1_000]


async def test_create_reference_store_requires_storage_settings():
    with pytest.raises(SettingsError) as info:
        create_reference_store(Settings())
    assert info.value.setting == "AzureWebJobsStorage"
    store = create_reference_store(settings_for("UseDevelopmentStorage=true", "refs"))
    assert isinstance(store, BlobReferenceStore)
    await store.close()


async def test_memory_store_counts_writes():
    store = MemoryReferenceStore()
    await store.upsert(reference(activityId="1"))
    await store.upsert(reference(activityId="2"))
    await store.upsert(reference(service_url="https://smba.trafficmanager.net/apac/"))
    await store.delete("msteams/a:1")
    assert (store.writes, store.deletes) == (2, 1)


def _connection_string(port: int) -> str:
    return f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"


async def test_nothing_listening_raises_store_error():
    store = BlobReferenceStore(settings_for(_connection_string(free_port()), "refs"), options=FAST)
    try:
        with pytest.raises(StoreError):
            await store.upsert(reference())
    finally:
        await store.close()


async def lose_user_index(store) -> None:
    """The user's index entries gone, the document kept (an index write that failed)."""
    if isinstance(store, MemoryReferenceStore):
        store._users.clear()
        return
    container = ContainerClient.from_connection_string(
        store._settings.storage.connection_string, store._settings.references_container
    )
    with container:
        container.delete_blob(user_index_name("msteams", "id", "29:user"))
        container.delete_blob(user_index_name("msteams", "aad", "aad-user"))


async def test_reindex_puts_a_lost_index_entry_back_and_writes_nothing_else(store):
    # A user target's lookup missed such a 1:1, the channel answered with it, and the
    # engine wrote the reference it had just read back over the store's: an erasure or a
    # newer serviceUrl in between was undone.
    await store.upsert(reference("a:1"))
    before = await store.get("msteams/a:1")
    await lose_user_index(store)
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None

    await store.reindex("msteams/a:1")

    by_id = await store.find_by_user(channel_id="msteams", user_id="29:user")
    by_aad = await store.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    assert by_id is not None and by_id.key == "msteams/a:1"
    assert by_aad is not None and by_aad.key == "msteams/a:1"
    assert (await store.get("msteams/a:1")).etag == before.etag  # the document unwritten
    await store.delete("msteams/a:1")
    await store.reindex("msteams/a:1")  # deleted meanwhile: nothing comes back
    assert await store.get("msteams/a:1") is None
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None


@pytest.mark.integration
async def test_blob_interrupted_delete_is_repaired_by_the_next_activity(
    blob_store, azurite, unique_name
):
    # Defect 6: a delete that stopped after taking the key out of the user index (its
    # first step) left the document behind; the user could no longer be found, and an
    # activity that changed nothing never rewrote the index.
    store, container = blob_store
    await store.upsert(reference("a:1"))
    container.delete_blob(user_index_name("msteams", "id", "29:user"))
    container.delete_blob(user_index_name("msteams", "aad", "aad-user"))
    assert await store.find_by_user(channel_id="msteams", user_id="29:user") is None

    # Another instance (nothing cached) sees the next activity, which changes nothing.
    other = BlobReferenceStore(store._settings, options=FAST)
    try:
        assert await other.upsert(reference("a:1")) is False  # the document is not rewritten
        by_id = await other.find_by_user(channel_id="msteams", user_id="29:user")
        by_aad = await other.find_by_user(channel_id="msteams", aad_object_id="aad-user")
    finally:
        await other.close()
    assert by_id is not None and by_id.key == "msteams/a:1"
    assert by_aad is not None and by_aad.key == "msteams/a:1"


def blob_exists(container, name: str) -> bool:
    return container.get_blob_client(name).exists()
