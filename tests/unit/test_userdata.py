"""shared/userdata.py: erasing a user's state and 1:1 conversations, in memory and on Blob
(Azurite), through the API and on the channel's deleteUserData activity."""

from __future__ import annotations

import pytest

from shared.config import Settings, StorageSettings
from shared.references import BlobReferenceStore, MemoryReferenceStore
from shared.state import MemoryStateStore, conversation_state_key, user_state_key
from shared.state_blob import BlobStateStore
from shared.userdata import erase_for_activity, erase_user_data
from tests.fixtures.storage import FAST_STORAGE
from tests.unit.test_references import reference


@pytest.fixture(params=["memory", pytest.param("blob", marks=pytest.mark.integration)])
async def stores(request, unique_name):
    if request.param == "memory":
        references, state = MemoryReferenceStore(), MemoryStateStore()
    else:
        azurite = request.getfixturevalue("azurite")
        settings = Settings(
            storage=StorageSettings(connection_string=azurite.connection_string),
            references_container=unique_name("erase"),
        )
        references = BlobReferenceStore(settings, options=FAST_STORAGE)
        state = BlobStateStore(settings, options=FAST_STORAGE)
    yield references, state
    await references.close()
    await state.close()


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
    # The user state is keyed by the channel's user id, which was not given: it stays.
    assert erased.user_state is False


async def test_delete_user_data_activity_erases_its_sender(stores):
    references, state = stores
    await seed(references, state)
    activity = {
        "type": "deleteUserData",
        "channelId": "msteams",
        "from": {"id": "29:bob", "aadObjectId": "aad-bob"},
        "conversation": {"id": "a:bob-1"},
    }
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
