"""shared/userdata.py: erasing a user's state and 1:1 conversations, in memory and on Blob
(Azurite), through the API and on the channel's deleteUserData activity."""

from __future__ import annotations

import asyncio
import json

import pytest
from azure.storage.blob import ContainerClient

from shared.config import Settings, StorageSettings
from shared.references import (
    INDEX_KEYS,
    BlobReferenceStore,
    MemoryReferenceStore,
    StoreError,
    document_name,
    user_index_name,
)
from shared.references.contract import index_entries, without
from shared.state import State, StateError, conversation_state_key, user_state_key
from shared.state_memory import MemoryStateStore
from shared.userdata import erase_for_activity, erase_user_data
from tests.fixtures.storage import FAST_STORAGE
from tests.unit.test_references import list_all, reference


@pytest.fixture
async def blob_store(azurite, unique_name):
    """A Blob reference store on Azurite, and a client on its container to read it raw."""
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("erase"),
    )
    references = BlobReferenceStore(settings, options=FAST_STORAGE)
    raw = ContainerClient.from_connection_string(
        azurite.connection_string, settings.references_container
    )
    yield references, raw
    await references.close()
    raw.close()


async def seed(references, state) -> None:
    """Ada: two 1:1s (two tenants), a group chat, state; Bob: a 1:1 and state."""
    await references.upsert(reference("a:ada-1", user="29:ada", aad="aad-ada", tenant="t-1"))
    await references.upsert(reference("a:ada-2", user="29:ada", aad="aad-ada", tenant="t-2"))
    await references.upsert(reference("19:group", personal=False, user="29:ada", aad="aad-ada"))
    await references.upsert(reference("a:bob-1", user="29:bob", aad="aad-bob"))
    for key in (
        user_state_key("msteams", "29:ada"),
        user_state_key("msteams", "29:bob"),
        user_state_key("webchat", "29:ada"),  # another channel's user: not this one
        conversation_state_key("msteams", "a:ada-1"),
        conversation_state_key("msteams", "19:group"),
    ):
        assert await state.write(key, {"kept": key}, etag=None)


async def test_erase_removes_the_users_state_and_conversations(stores):
    references, state = stores
    await seed(references, state)

    erased = await erase_user_data(
        channel_id="msteams", user_id="29:ada", state=state, references=references
    )

    assert erased.user_state is True
    assert sorted(erased.conversations) == ["msteams/a:ada-1", "msteams/a:ada-2"]
    assert await state.read(user_state_key("msteams", "29:ada")) is None
    assert await state.read(conversation_state_key("msteams", "a:ada-1")) is None
    assert await references.get("msteams/a:ada-1") is None
    assert await references.get("msteams/a:ada-2") is None
    assert await references.find_by_user(channel_id="msteams", user_id="29:ada") is None
    # Others' data, the group conversation and the user on another channel stay.
    assert await references.get("msteams/a:bob-1") is not None
    assert await references.get("msteams/19:group") is not None
    for key in (
        user_state_key("msteams", "29:bob"),
        user_state_key("webchat", "29:ada"),
        conversation_state_key("msteams", "19:group"),
    ):
        assert (await state.read(key)).data == {"kept": key}

    again = await erase_user_data(
        channel_id="msteams", user_id="29:ada", state=state, references=references
    )
    assert (again.user_state, again.conversations) == (False, [])


async def test_erase_by_aad_object_id_finds_the_conversations(stores):
    references, state = stores
    await seed(references, state)
    erased = await erase_user_data(
        channel_id="msteams", aad_object_id="aad-ada", state=state, references=references
    )
    assert sorted(erased.conversations) == ["msteams/a:ada-1", "msteams/a:ada-2"]
    # The user state is keyed by the channel's user id: the conversations found name it.
    assert erased.user_state is True
    assert await state.read(user_state_key("msteams", "29:ada")) is None
    assert await state.read(conversation_state_key("msteams", "a:ada-1")) is None
    for key in (user_state_key("msteams", "29:bob"), user_state_key("webchat", "29:ada")):
        assert (await state.read(key)).data == {"kept": key}


async def web_chat_visits(references, state, count: int) -> list[str]:
    """Ada's `count` Web Chat visits (a new Direct Line conversation each), each with state;
    Bob's visit; a group conversation Ada spoke in."""
    for n in range(count):
        ref = reference(f"dl-{n}", channel_id="webchat", tenant=None, user="dl_ada", aad=None)
        await references.upsert(ref)
        await state.write(conversation_state_key("webchat", f"dl-{n}"), {"n": n}, etag=None)
    await references.upsert(
        reference("dl-bob", channel_id="webchat", tenant=None, user="dl_bob", aad=None)
    )
    await references.upsert(
        reference("group", channel_id="webchat", tenant=None, user="dl_ada", personal=False)
    )
    for key in (
        user_state_key("webchat", "dl_ada"),
        user_state_key("webchat", "dl_bob"),
        conversation_state_key("webchat", "dl-bob"),
    ):
        await state.write(key, {"kept": key}, etag=None)
    return [f"webchat/dl-{n}" for n in range(count)]


async def assert_only_others_are_left(references, state, count: int) -> None:
    assert sorted(await list_all(references)) == ["webchat/dl-bob", "webchat/group"]
    left = [
        n for n in range(count) if await state.read(conversation_state_key("webchat", f"dl-{n}"))
    ]
    assert left == []
    assert await state.read(user_state_key("webchat", "dl_ada")) is None
    for key in (user_state_key("webchat", "dl_bob"), conversation_state_key("webchat", "dl-bob")):
        assert (await state.read(key)).data == {"kept": key}
    who = {"channel_id": "webchat", "user_id": "dl_ada"}
    assert await references.find_by_user(**who) is None
    assert await references.user_index_overflowed(**who) is False  # its index is gone


async def test_erase_reaches_conversations_the_user_index_no_longer_lists(stores):
    # More conversations than the user index holds: the oldest are found by listing.
    references, state = stores
    keys = await web_chat_visits(references, state, INDEX_KEYS + 3)

    erased = await erase_user_data(
        channel_id="webchat", user_id="dl_ada", state=state, references=references
    )

    assert sorted(erased.conversations) == sorted(keys) and erased.user_state
    await assert_only_others_are_left(references, state, INDEX_KEYS + 3)


class FailingState(MemoryStateStore):
    """A state store whose deletes fail after `allowed` of them (storage went down)."""

    def __init__(self, inner, allowed: int) -> None:
        super().__init__()
        self.inner, self.allowed = inner, allowed

    async def read(self, key):
        return await self.inner.read(key)

    async def write(self, key, data, *, etag, write_ids=()):
        return await self.inner.write(key, data, etag=etag, write_ids=write_ids)

    async def delete(self, key):
        if self.allowed <= 0:
            raise StateError("state store: delete failed: storage unreachable (OSError)")
        self.allowed -= 1
        return await self.inner.delete(key)


async def test_an_erasure_cut_short_is_finished_by_a_retry(stores):
    references, state = stores
    count = INDEX_KEYS + 3
    await web_chat_visits(references, state, count)
    for allowed in (2, 100):  # storage fails part-way through, twice
        failing = FailingState(state, allowed)
        with pytest.raises(StateError):
            await erase_user_data(
                channel_id="webchat", user_id="dl_ada", state=failing, references=references
            )
        # Part done; the mark that sends erasure to the listing is still there.
        left = len(await list_all(references))
        assert 2 < left < count + 2
        assert await references.user_index_overflowed(channel_id="webchat", user_id="dl_ada")

    await erase_user_data(
        channel_id="webchat", user_id="dl_ada", state=state, references=references
    )
    await assert_only_others_are_left(references, state, count)


async def test_an_erasure_of_a_user_whose_index_is_nearly_full_lists_the_channel(stores):
    # Full but not overflowed: a conversation recorded while the erasure starts would push
    # the oldest out after the erasure read the index, and neither would list it.
    references, state = stores
    who = {"channel_id": "webchat", "user_id": "dl_ada"}
    await web_chat_visits(references, state, 3)
    assert await references.user_index_overflowed(**who) is False
    await web_chat_visits(references, state, INDEX_KEYS)
    assert await references.user_index_overflowed(**who) is True


class HalfDeletes(MemoryReferenceStore):
    """The Blob store's delete in its two steps (the user index entry, then the document),
    its `fail_at`-th delete stopping between them as a storage failure would."""

    fail_at = 0

    async def delete(self, key):
        self.fail_at -= 1
        if self.fail_at == 0:
            stored = self._docs[key]
            for kind, value in index_entries(stored, any_channel=True):
                self._change_index((stored.channel_id, kind, value), without(key))
            raise StoreError("reference store: delete failed (test outage)")
        return await super().delete(key)


async def test_an_erasure_of_a_nearly_full_index_cut_short_is_finished_by_a_retry():
    # Listed at once for being nearly full, and marked all the same: the retry, finding
    # the index much less full, lists again for the mark, and finds the 1:1 whose index
    # entry went before its document's delete failed.
    references, state = HalfDeletes(), MemoryStateStore()
    count = INDEX_KEYS - 6
    await web_chat_visits(references, state, count)
    references.fail_at = 20
    with pytest.raises(StoreError):
        await erase_user_data(
            channel_id="webchat", user_id="dl_ada", state=state, references=references
        )
    await erase_user_data(
        channel_id="webchat", user_id="dl_ada", state=state, references=references
    )
    await assert_only_others_are_left(references, state, count)


async def test_off_teams_an_aad_object_id_erases_nothing(stores):
    # A Web Chat client writes from.aadObjectId itself: Mallory claiming Ada's must not
    # erase Ada's conversation (stored with the same claimed id).
    references, state = stores
    await references.upsert(
        reference("dl-ada", channel_id="webchat", tenant=None, user="dl_ada", aad="aad-ada")
    )
    await state.write(conversation_state_key("webchat", "dl-ada"), {"n": 1}, etag=None)
    activity = delete_user_data(
        "dl_mallory", "aad-ada", channel_id="webchat", conversation_id="dl-mallory"
    )
    erased = await erase_for_activity(activity, state=state, references=references)
    assert erased.conversations == []
    assert await references.get("webchat/dl-ada") is not None
    assert await state.read(conversation_state_key("webchat", "dl-ada")) is not None
    with pytest.raises(ValueError, match="msteams"):
        await erase_user_data(
            channel_id="webchat", aad_object_id="aad-ada", state=state, references=references
        )
    assert await references.get("webchat/dl-ada") is not None


async def test_delete_user_data_activity_erases_its_sender(stores):
    references, state = stores
    await seed(references, state)
    activity = delete_user_data("29:bob", "aad-bob", conversation_id="a:bob-1")
    erased = await erase_for_activity(activity, state=state, references=references)
    assert erased.user_state and erased.conversations == ["msteams/a:bob-1"]
    assert await references.get("msteams/a:bob-1") is None
    assert await references.get("msteams/a:ada-1") is not None


async def test_an_activity_without_a_sender_erases_nothing(stores):
    references, state = stores
    await seed(references, state)
    erased = await erase_for_activity(
        {"type": "deleteUserData", "channelId": "msteams", "conversation": {"id": "x"}},
        state=state,
        references=references,
    )
    assert (erased.user_state, erased.conversations) == (False, [])
    assert await references.get("msteams/a:ada-1") is not None


async def test_erase_needs_a_user():
    with pytest.raises(ValueError):
        await erase_user_data(
            channel_id="msteams",
            state=MemoryStateStore(),
            references=MemoryReferenceStore(),
        )


@pytest.mark.integration
async def test_blob_a_web_chat_aad_object_id_stored_before_the_rule_is_never_matched(
    blob_store,
):
    # Documents and index entries written before aadObjectId counted on Teams only: the
    # claimed id matches nothing, and erasing the user by id takes the old entry out too.
    references, raw = blob_store
    state = MemoryStateStore()
    ref = reference("dl-ada", channel_id="webchat", tenant=None, user="dl_ada", aad="aad-ada")
    await references.upsert(ref)
    document = json.loads(raw.download_blob(document_name("webchat/dl-ada")).readall())
    raw.upload_blob(
        document_name("webchat/dl-ada"),
        json.dumps({**document, "aadObjectId": "aad-ada"}),
        overwrite=True,
    )
    legacy = user_index_name("webchat", "aad", "aad-ada")
    raw.upload_blob(legacy, json.dumps({"schemaVersion": 1, "key": "webchat/dl-ada"}))

    assert await references.find_by_user(channel_id="webchat", aad_object_id="aad-ada") is None
    mallory = {"type": "deleteUserData", "channelId": "webchat"}
    mallory["from"] = {"id": "dl_mallory", "aadObjectId": "aad-ada"}
    assert (
        await erase_for_activity(mallory, state=state, references=references)
    ).conversations == []
    assert await references.get("webchat/dl-ada") is not None

    erased = await erase_user_data(
        channel_id="webchat", user_id="dl_ada", state=state, references=references
    )
    assert erased.conversations == ["webchat/dl-ada"]
    assert [blob.name for blob in raw.list_blobs()] == []  # the old aad entry too


@pytest.mark.integration
@pytest.mark.parametrize("channel", ["webchat", "msteams"])
async def test_blob_an_index_the_previous_version_filled_still_leads_erasure_to_every_1to1(
    blob_store, channel
):
    # Before the overflow mark, an index kept a user's 8 latest conversations and dropped
    # older ones without a word. Such a document (no `overflowed`) is read as overflowed
    # when it is full (on Teams) or always (elsewhere): erasure then lists the channel.
    references, raw = blob_store
    state = MemoryStateStore()
    keys = []
    for visit in range(10):
        ref = reference(f"a:{visit}", channel_id=channel, tenant=None, user="u-bob", aad=None)
        await references.upsert(ref)
        keys.append(f"{channel}/a:{visit}")
        await state.write(conversation_state_key(channel, f"a:{visit}"), {"n": visit}, etag=None)
    latest_first = keys[::-1]
    legacy = {"schemaVersion": 1, "key": latest_first[0], "older": latest_first[1:8]}
    raw.upload_blob(user_index_name(channel, "id", "u-bob"), json.dumps(legacy), overwrite=True)

    erased = await erase_user_data(
        channel_id=channel, user_id="u-bob", state=state, references=references
    )

    assert sorted(erased.conversations) == sorted(keys)
    assert await list_all(references) == []
    for visit in range(10):
        assert await state.read(conversation_state_key(channel, f"a:{visit}")) is None
    assert [blob.name for blob in raw.list_blobs()] == []


async def test_a_1to1_stored_again_during_the_erasure_does_not_end_it_early(stores):
    # Ada's 1:1 in tenant 1 is erased, then her message in it lands on another instance
    # and stores it again (the index's front). The erasure took the repeat for the end
    # and left her 1:1 in tenant 2, which nothing had touched.
    references, state = stores
    await seed(references, state)
    real_delete, raced = references.delete, []

    async def delete_then_ada_speaks(key):
        deleted = await real_delete(key)
        if not raced:
            raced.append(key)
            await references.upsert(reference(key.split("/", 1)[1], user="29:ada", aad="aad-ada"))
        return deleted

    references.delete = delete_then_ada_speaks
    erased = await erase_user_data(
        channel_id="msteams", user_id="29:ada", state=state, references=references
    )

    left = sorted(await list_all(references))
    assert left == sorted(["msteams/a:bob-1", "msteams/19:group", raced[0]])
    assert sorted(erased.conversations) == ["msteams/a:ada-1", "msteams/a:ada-2"]


@pytest.mark.integration
async def test_blob_a_retry_after_a_reference_delete_failed_finishes_the_erasure(blob_store):
    # The reference's blob delete failed after its user index entry was removed: the retry
    # found nothing through the index, answered "done", and the 1:1 stayed stored.
    from azure.core.exceptions import HttpResponseError

    from shared.references import StoreError

    references, _ = blob_store
    state = MemoryStateStore()
    await seed(references, state)
    container, failed = references._store, []
    real_remove = container.remove

    async def remove_failing_once(name, etag=None):
        if name.startswith("refs/") and not failed:
            failed.append(name)
            busy = HttpResponseError(message="Server Busy")
            busy.status_code = 503
            raise busy
        return await real_remove(name, etag)

    container.remove = remove_failing_once
    with pytest.raises(StoreError):
        await erase_user_data(
            channel_id="msteams", user_id="29:ada", state=state, references=references
        )
    container.remove = real_remove
    await erase_user_data(
        channel_id="msteams", user_id="29:ada", state=state, references=references
    )

    assert failed
    assert sorted(await list_all(references)) == ["msteams/19:group", "msteams/a:bob-1"]
    who = {"channel_id": "msteams", "user_id": "29:ada"}
    assert await references.user_index_overflowed(**who) is False  # settled once done


@pytest.mark.integration
async def test_blob_a_record_cut_short_leaves_nothing_erasure_cannot_find(blob_store):
    # A new 1:1's record cut off between its two writes (the turn's recording budget ran
    # out while storage was slow): the document was written without its index entry, and
    # the user's erasure did not find it. The index write now finishes on its own.
    references, _ = blob_store
    container, writes = references._store, []
    real_put = container.put

    async def slow_second_write(name, body, etag, **options):
        writes.append(name)
        if len(writes) == 2:
            await asyncio.sleep(0.6)
        return await real_put(name, body, etag, **options)

    container.put = slow_second_write
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await references.upsert(reference("a:ada-1", user="29:ada", aad="aad-ada"))
    await asyncio.sleep(1.0)  # storage answers in the end
    container.put = real_put

    await erase_user_data(
        channel_id="msteams", user_id="29:ada", state=MemoryStateStore(), references=references
    )

    assert await list_all(references) == []


AAD_ADA = "00000000-0000-0000-0000-00000000ada0"


def opened_by_aad(conversation_id: str = "a:opened") -> dict:
    """A 1:1 the bot opened for a `user` target named by the aadObjectId, as the versions
    before it also stored the aadObjectId kept it: that id as the user's id."""
    ref = reference(conversation_id, user=AAD_ADA, aad=None)
    ref["user"] = {"id": AAD_ADA}
    return ref


def delete_user_data(
    user_id: str = "29:ada",
    aad: str = AAD_ADA,
    *,
    channel_id: str = "msteams",
    conversation_id: str | None = None,
) -> dict:
    activity = {
        "type": "deleteUserData",
        "channelId": channel_id,
        "from": {"id": user_id, "aadObjectId": aad},
    }
    if conversation_id is not None:
        activity["conversation"] = {"id": conversation_id}
    return activity


async def test_a_1to1_opened_for_the_user_by_their_aad_object_id_is_erased(stores):
    references, state = stores
    await references.upsert(opened_by_aad())
    await state.write(user_state_key("msteams", AAD_ADA), {"n": 1}, etag=None)

    erased = await erase_for_activity(delete_user_data(), state=state, references=references)

    assert erased.conversations == ["msteams/a:opened"]
    assert await references.get("msteams/a:opened") is None
    assert await references.find_by_user(channel_id="msteams", user_id=AAD_ADA) is None
    assert await state.read(user_state_key("msteams", AAD_ADA)) is None


async def test_blob_erasure_leaves_no_index_of_the_user_behind(blob_store):
    # The 1:1 was opened by aadObjectId, then the user wrote in it (its user id changed):
    # no index blob naming the user, or their conversation, may stay after the erasure.
    references, raw = blob_store
    state = MemoryStateStore()
    await references.upsert(opened_by_aad(), refresh=True)
    await references.upsert(reference("a:opened", user="29:ada", aad=AAD_ADA), refresh=True)
    await references.upsert(reference("a:bob", user="29:bob", aad="aad-bob"))
    assert await references.find_by_user(channel_id="msteams", user_id=AAD_ADA) is None

    erased = await erase_for_activity(delete_user_data(), state=state, references=references)

    assert erased.conversations == ["msteams/a:opened"]
    left = sorted(blob.name for blob in raw.list_blobs())
    assert left == sorted(
        [
            document_name("msteams/a:bob"),
            user_index_name("msteams", "id", "29:bob"),
            user_index_name("msteams", "aad", "aad-bob"),
        ]
    )


async def test_blob_an_index_entry_whose_document_is_gone_is_dropped_by_the_erasure(blob_store):
    # A removal racing a message's write can leave an entry pointing at no document.
    references, raw = blob_store
    state = MemoryStateStore()
    await references.upsert(reference("a:ada", user="29:ada", aad=AAD_ADA))
    raw.delete_blob(document_name("msteams/a:ada"))

    erased = await erase_for_activity(delete_user_data(), state=state, references=references)

    assert erased.conversations == []
    assert [blob.name for blob in raw.list_blobs()] == []


async def test_blob_a_1to1_this_version_cannot_read_stops_no_erasure_and_is_removed_on_removal(
    blob_store, caplog
):
    # A newer version rewrote it (schemaVersion 2) and was rolled back.
    references, raw = blob_store
    state = MemoryStateStore()
    await references.upsert(reference("a:newer", user="29:ada", aad=AAD_ADA))
    await references.upsert(reference("a:ada", user="29:ada", aad=AAD_ADA))
    newer = json.loads(raw.download_blob(document_name("msteams/a:newer")).readall())
    raw.upload_blob(
        document_name("msteams/a:newer"), json.dumps({**newer, "schemaVersion": 2}), overwrite=True
    )
    await state.write(user_state_key("msteams", "29:ada"), {"n": 1}, etag=None)

    erased = await erase_for_activity(delete_user_data(), state=state, references=references)

    assert erased.conversations == ["msteams/a:ada"]
    assert await state.read(user_state_key("msteams", "29:ada")) is None
    assert "passed over" in caplog.text and "schemaVersion 2" in caplog.text
    # Its index entries stay, for a version that can read it to erase it.
    index = json.loads(raw.download_blob(user_index_name("msteams", "id", "29:ada")).readall())
    assert index["key"] == "msteams/a:newer"
    # Its removal (the bot uninstalled there) deletes it all the same; the next erasure
    # drops the entries that now lead nowhere.
    assert await references.delete("msteams/a:newer") is True
    await erase_for_activity(delete_user_data(), state=state, references=references)
    assert [blob.name for blob in raw.list_blobs()] == []


@pytest.mark.parametrize(
    "damage",
    [b"\x00not json", b"[1, 2]", json.dumps({"schemaVersion": 2, "keys": ["x"]}).encode()],
    ids=["not-json", "not-an-index", "newer-version"],
)
async def test_blob_a_user_index_this_version_cannot_read_stops_no_erasure(
    blob_store, caplog, damage
):
    # Read as overflowed: the erasure lists the channel instead of failing at every retry,
    # and leaves no index of the user behind; the user's 1:1s are still recorded meanwhile.
    references, raw = blob_store
    state = MemoryStateStore()
    await references.upsert(reference("a:ada", user="29:ada", aad=AAD_ADA))
    await references.upsert(reference("a:bob", user="29:bob", aad="aad-bob"))
    index = user_index_name("msteams", "id", "29:ada")
    raw.upload_blob(index, damage, overwrite=True)
    await references.upsert(reference("a:ada-2", user="29:ada", aad=AAD_ADA, tenant="t-2"))
    await state.write(user_state_key("msteams", "29:ada"), {"n": 1}, etag=None)

    erased = await erase_for_activity(delete_user_data(), state=state, references=references)

    assert sorted(erased.conversations) == ["msteams/a:ada", "msteams/a:ada-2"]
    assert await state.read(user_state_key("msteams", "29:ada")) is None
    assert f"user index {index[-80:]} cannot be read; taken as overflowed" in caplog.text
    left = sorted(blob.name for blob in raw.list_blobs())
    assert left == sorted(
        [
            document_name("msteams/a:bob"),
            user_index_name("msteams", "id", "29:bob"),
            user_index_name("msteams", "aad", "aad-bob"),
        ]
    )


async def test_blob_a_conversation_the_user_writes_in_while_the_erasure_settles_stays_findable(
    azurite, unique_name
):
    # Its entry led nowhere when the erasure read it (a removal raced an earlier write);
    # then the user wrote in it again (another instance) before the index was settled.
    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("settle"),
    )

    class Racing(BlobReferenceStore):
        racer = None

        async def settle_user_index(self, **lookup):
            self.settling = True
            try:
                await super().settle_user_index(**lookup)
            finally:
                self.settling = False

        async def _read(self, name, key):
            found = await super()._read(name, key)
            if getattr(self, "settling", False) and self.racer is not None:
                racer, self.racer = self.racer, None
                await racer()
            return found

    references = Racing(settings, options=FAST_STORAGE)
    other = BlobReferenceStore(settings, options=FAST_STORAGE)
    raw = ContainerClient.from_connection_string(
        azurite.connection_string, settings.references_container
    )
    try:
        ada = reference("a:ada", channel_id="webchat", tenant=None, user="dl_ada", aad=None)
        await references.upsert(ada)
        raw.delete_blob(document_name("webchat/a:ada"))  # the entry now leads nowhere
        references.racer = lambda: other.upsert(ada, refresh=True)

        await erase_user_data(
            channel_id="webchat", user_id="dl_ada", state=None, references=references
        )

        found = await other.find_by_user(channel_id="webchat", user_id="dl_ada")
        assert found is not None and found.key == "webchat/a:ada"
    finally:
        await references.close()
        await other.close()
        raw.close()


async def saved_in_a_teams_turn(state, user_id: str, aad_object_id: str, **data) -> None:
    saved = State.for_user(state, "msteams", user_id, aad_object_id=aad_object_id)
    (await saved.load()).update(data)
    assert await saved.save()


async def test_an_aad_object_id_erases_user_states_no_stored_1to1_names(stores):
    # A user of channels only (no 1:1 ever stored), and a user whose app was uninstalled
    # (the 1:1 and its index removed, "the user's own state stays until erased"): an
    # erasure by the aadObjectId, as a privacy request names them, found nothing.
    references, state = stores
    for user, aad in (("29:channels-only", "AAD-C"), ("29:uninstalled", "aad-u"), ("29:x", "x")):
        await saved_in_a_teams_turn(state, user, aad, theme=f"{user}'s secret")
    # The same user id on another channel, written without an owner, stays.
    await state.write(user_state_key("webchat", "29:channels-only"), {"n": 1}, etag=None)

    for aad in ("aad-c", "AAD-U"):
        erased = await erase_user_data(
            channel_id="msteams", aad_object_id=aad, state=state, references=references
        )
        assert erased.user_state and erased.conversations == []

    assert await state.read(user_state_key("msteams", "29:channels-only")) is None
    assert await state.read(user_state_key("msteams", "29:uninstalled")) is None
    assert (await state.read(user_state_key("msteams", "29:x"))).data == {"theme": "29:x's secret"}
    assert await state.read(user_state_key("webchat", "29:channels-only")) is not None


async def test_a_user_state_saved_by_code_that_knows_no_aad_object_id_keeps_its_owner(stores):
    # Proactive code saves the user's state by user id alone: the owner the Teams turn
    # saved with it stays, so an erasure by the aadObjectId still finds it.
    references, state = stores
    await saved_in_a_teams_turn(state, "29:ada", "aad-ada", theme="dark")
    later = State.for_user(state, "msteams", "29:ada")
    await later.update(lambda data: data.update(reminders=1))
    assert await later.save()

    erased = await erase_user_data(
        channel_id="msteams", aad_object_id="aad-ada", state=state, references=references
    )

    assert erased.user_state and await state.read(user_state_key("msteams", "29:ada")) is None


async def test_a_delete_user_data_activity_erases_its_sender_by_id_in_the_channels_wait(stores):
    # Inside the turn, the sender's own user state goes by its id; listing every user
    # state of the channel for other ids with the same aadObjectId would not fit in the
    # channel's wait on a large bot (an operator's erasure by the aadObjectId does it).
    references, state = stores
    for user in ("29:bob", "29:bob-in-another-app"):
        await saved_in_a_teams_turn(state, user, "aad-bob", theme="dark")
    activity = delete_user_data("29:bob", "aad-bob", conversation_id="a:bob-1")

    erased = await erase_for_activity(activity, state=state, references=references)

    assert erased.user_state and await state.read(user_state_key("msteams", "29:bob")) is None
    assert await state.read(user_state_key("msteams", "29:bob-in-another-app")) is not None
    await erase_user_data(
        channel_id="msteams", aad_object_id="aad-bob", state=state, references=references
    )
    assert await state.read(user_state_key("msteams", "29:bob-in-another-app")) is None


async def erased_by(state, references, aad: str) -> bool:
    erased = await erase_user_data(
        channel_id="msteams", aad_object_id=aad, state=state, references=references
    )
    return erased.user_state


async def test_a_save_that_meets_a_teams_turns_write_keeps_its_owner(stores):
    # Proactive code read the user's state before a Teams turn saved it (with its owner):
    # its save met that write, re-read it, and wrote again without the owner.
    references, state = stores
    later = State.for_user(state, "msteams", "29:ada")
    await later.load()  # nothing stored yet
    await saved_in_a_teams_turn(state, "29:ada", "aad-ada", theme="dark")
    await later.update(lambda data: data.update(reminders=1))
    assert await later.save()

    assert await erased_by(state, references, "aad-ada")


async def test_the_latest_owner_stored_wins_over_one_read_earlier(stores):
    references, state = stores
    await saved_in_a_teams_turn(state, "29:ada", "aad-old", theme="dark")
    later = State.for_user(state, "msteams", "29:ada")
    await later.load()  # names aad-old
    await saved_in_a_teams_turn(state, "29:ada", "aad-new", theme="light")
    await later.update(lambda data: data.update(reminders=1))
    assert await later.save()

    assert not await erased_by(state, references, "aad-old")
    assert await erased_by(state, references, "aad-new")


@pytest.mark.parametrize("aad", ["", "{not-an-id}"])
async def test_a_turn_with_no_usable_aad_object_id_keeps_the_stored_owner(stores, aad):
    references, state = stores
    await saved_in_a_teams_turn(state, "29:ada", "aad-ada", theme="dark")
    await saved_in_a_teams_turn(state, "29:ada", aad, theme="light")

    assert await erased_by(state, references, "aad-ada")
