"""The state-store contract and State's save rules, run against memory and Blob (Azurite).

Then what only the Blob store has: its layout in the container, plain JSON documents,
clear errors for foreign documents and for storage that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from azure.storage.blob import ContainerClient

from shared.config import Settings, StorageSettings
from shared.state import (
    MAX_SAVE_ATTEMPTS,
    State,
    StateConflict,
    StateError,
    StateTooLarge,
    conversation_state_key,
    user_state_key,
)
from shared.state_blob import BlobStateStore, state_blob_name
from shared.state_memory import MemoryStateStore
from tests.fixtures.storage import (
    ANSWER_TEXT,
    FAST_STORAGE,
    UNREADABLE_ANSWERS,
    unreadable_storage,
)
from tools.azurite import free_port

USER = user_state_key("msteams", "29:user-1")
CONVERSATION = conversation_state_key("msteams", "19:abc@thread.tacv2;messageid=1")


def settings_for(connection_string: str, container: str) -> Settings:
    return Settings(
        storage=StorageSettings(connection_string=connection_string),
        references_container=container,
    )


@pytest.fixture(params=["memory", pytest.param("blob", marks=pytest.mark.integration)])
async def store(request, unique_name):
    if request.param == "memory":
        instance = MemoryStateStore(max_bytes=4096)
    else:
        azurite = request.getfixturevalue("azurite")
        instance = BlobStateStore(
            settings_for(azurite.connection_string, unique_name("state")),
            options=FAST_STORAGE,
            max_bytes=4096,
        )
    yield instance
    await instance.close()


# ---------------------------------------------------------------------------- the contract


async def test_missing_state_reads_as_none(store):
    assert await store.read(USER) is None


async def test_malformed_keys_are_rejected(store):
    for key in ("user", "user/msteams", "user/msteams/", "team/msteams/x", "/msteams/x", 7):
        with pytest.raises(ValueError):
            await store.read(key)
        with pytest.raises(ValueError):
            await store.write(key, {}, etag=None)


def test_a_channel_id_with_a_slash_makes_no_key():
    with pytest.raises(ValueError):
        user_state_key("ms/teams", "29:user")
    assert user_state_key("msteams", "29:a/b") == "user/msteams/29:a/b"


async def test_create_read_and_update_with_etags(store):
    etag = await store.write(USER, {"count": 1, "name": "Ada"}, etag=None)
    assert etag
    stored = await store.read(USER)
    assert (stored.key, stored.data, stored.etag) == (USER, {"count": 1, "name": "Ada"}, etag)
    assert stored.updated_at

    # Create-only when the document exists, and a stale ETag: refused, nothing changes.
    assert await store.write(USER, {"count": 9}, etag=None) is None
    newer = await store.write(USER, {"count": 2}, etag=etag)
    assert newer and newer != etag
    assert await store.write(USER, {"count": 99}, etag=etag) is None
    assert (await store.read(USER)).data == {"count": 2}


async def test_delete_then_an_old_etag_is_refused(store):
    etag = await store.write(USER, {"a": 1}, etag=None)
    assert await store.delete(USER) is True
    assert await store.delete(USER) is False
    assert await store.read(USER) is None
    assert await store.write(USER, {"a": 2}, etag=etag) is None
    assert await store.read(USER) is None


async def test_over_the_limit_is_a_clear_error_and_nothing_is_written(store):
    with pytest.raises(StateTooLarge) as raised:
        await store.write(USER, {"blob": "x" * 5000}, etag=None)
    assert "over the limit of 4096" in str(raised.value)
    assert "xxxx" not in str(raised.value)
    assert await store.read(USER) is None

    etag = await store.write(USER, {"small": True}, etag=None)
    with pytest.raises(StateTooLarge):
        await store.write(USER, {"blob": "é" * 2100}, etag=etag)  # 4,200 bytes of UTF-8
    assert (await store.read(USER)).data == {"small": True}


@pytest.mark.parametrize(
    "data",
    [
        {"when": {1, 2}},
        {"value": float("nan")},
        {1: "int key"},
        {"tuple": (1, 2)},
        {"object": object()},
        ["not", "an", "object"],
    ],
    ids=["set", "nan", "int-key", "tuple", "object", "list"],
)
async def test_only_plain_json_objects_are_stored(store, data):
    with pytest.raises(StateError) as raised:
        await store.write(USER, data, etag=None)
    assert "plain JSON" in str(raised.value) or "JSON object" in str(raised.value)
    assert await store.read(USER) is None


def nested(levels: int) -> dict:
    data: dict = {}
    for _ in range(levels - 1):
        data = {"n": data}
    return data


async def test_a_state_nested_too_deep_to_read_back_reliably_is_refused(store):
    # 943 levels were written from a shallow stack and failed to parse when read 20 frames
    # deeper: every later turn of that user answered 500 until an operator stepped in.
    state = State(store, USER)
    (await state.load()).update(nested(64))
    assert await state.save()
    (await state.load())["deeper"] = nested(64)  # 65 levels
    with pytest.raises(StateError) as raised:
        state.check()
    assert "nested more than 64" in str(raised.value)
    with pytest.raises(StateError):
        await state.save()
    assert (await store.read(USER)).data == nested(64)  # nothing was written


async def test_a_state_an_earlier_version_stored_deeper_still_saves_its_changes(store):
    # Refused for its depth, no change to it could be saved: every turn changing it failed.
    await store.write(USER, nested(80), etag=None)
    state = State(store, USER)
    (await state.load())["theme"] = "dark"
    assert await state.save()
    assert (await store.read(USER)).data == {**nested(80), "theme": "dark"}
    # It keeps its depth; it may not grow deeper (unbounded, it was read back no more).
    (await state.load())["deeper"] = nested(80)
    with pytest.raises(StateError):
        await state.save()


async def test_a_save_meeting_a_deeper_document_an_earlier_version_wrote_merges_with_it():
    store = MemoryStateStore()
    state = State(store, USER)
    (await state.load())["theme"] = "dark"  # read while there was none
    await store.write(USER, nested(80), etag=None)  # an earlier version's, meanwhile
    assert await state.save()
    assert (await store.read(USER)).data == {**nested(80), "theme": "dark"}


async def test_ids_of_any_shape_get_their_own_documents(store):
    keys = [
        user_state_key("msteams", "29:1a/b?c#d"),
        user_state_key("msteams", "29:1A/B?C#D"),
        user_state_key("msteams", "ü-ñ-🙂"),
        user_state_key("webchat", "29:1a/b?c#d"),
        conversation_state_key("msteams", "29:1a/b?c#d"),
        user_state_key("msteams", "x" * 1500),  # hashed name
        user_state_key("msteams", "x" * 1501),
    ]
    for index, key in enumerate(keys):
        assert await store.write(key, {"n": index}, etag=None)
    for index, key in enumerate(keys):
        assert (await store.read(key)).data == {"n": index}


# ---------------------------------------------------------------------------- State


async def test_unchanged_state_is_not_written(store):
    state = State(store, USER)
    assert await state.load() == {}
    assert await state.save() is False
    assert await store.read(USER) is None

    assert await State(store, USER).save() is False  # never loaded: nothing to save


async def test_changed_state_is_written_and_read_back(store):
    state = State(store, USER)
    (await state.load())["theme"] = "dark"
    assert await state.save() is True
    assert await state.save() is False  # saved: nothing changed since
    assert await State(store, USER).load() == {"theme": "dark"}


async def test_subclasses_of_json_types_are_their_json_kind(store):
    # A StrEnum is written as its string, a defaultdict as an object: once saved, nothing
    # is left to save (every later save wrote again, and a save that met another writer
    # left the handler's data unrefreshed).
    import enum
    from collections import defaultdict

    class Theme(enum.StrEnum):
        DARK = "dark"

    state = State(store, USER)
    data = await state.load()
    data.update(theme=Theme.DARK, seen=defaultdict(int, ada=1))
    assert await state.save() is True
    assert state.changed is False
    assert await state.save() is False
    assert (await store.read(USER)).data == {"theme": "dark", "seen": {"ada": 1}}

    other = State(store, USER)  # another turn counts meanwhile
    (await other.load())["n"] = 1
    assert await other.save() is True
    data["seen"]["bob"] = 1
    assert await state.save() is True  # merged with the other's change
    assert data == {"theme": "dark", "seen": {"ada": 1, "bob": 1}, "n": 1}
    assert await state.save() is False


async def test_a_change_json_tells_apart_is_saved(store):
    # Python holds True == 1 and 1 == 1.0; JSON does not, and the next turn reads the type.
    await store.write(USER, {"on": 1, "off": 0, "flags": [1, 0], "ratio": 1}, etag=None)
    state = State(store, USER)
    data = await state.load()
    data.update(on=True, off=False, flags=[True, False], ratio=1.0)
    assert await state.save() is True
    stored = (await store.read(USER)).data
    assert [type(stored[name]) for name in ("on", "off", "ratio")] == [bool, bool, float]
    assert [type(flag) for flag in stored["flags"]] == [bool, bool]


async def test_a_type_change_merges_as_a_change(store):
    # A concurrent writer saved first: the flag turned from 1 to true is still this turn's
    # edit, merged on top of the other writer's field.
    await store.write(USER, {"on": 1, "lang": "en"}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.load())["on"] = True
    (await second.load())["lang"] = "de"
    assert await second.save() and await first.save()
    assert (await store.read(USER)).data == {"on": True, "lang": "de"}
    assert type((await store.read(USER)).data["on"]) is bool


async def test_two_concurrent_counters_both_count(store):
    first, second = State(store, CONVERSATION), State(store, CONVERSATION)
    await first.load()
    await second.load()  # both read the same version

    def increment(data):
        data["count"] = data.get("count", 0) + 1

    await first.update(increment)
    await second.update(increment)
    assert await first.save() and await second.save()

    assert (await store.read(CONVERSATION)).data == {"count": 2}
    assert await second.load() == {"count": 2}  # the loser sees what was stored


async def test_many_concurrent_turns_lose_nothing(store):
    def increment(data):
        data["count"] = data.get("count", 0) + 1

    async def turn() -> None:
        state = State(store, CONVERSATION)
        await state.update(increment)
        await asyncio.sleep(0)
        await state.save()

    await asyncio.gather(*(turn() for _ in range(MAX_SAVE_ATTEMPTS - 2)))
    assert (await store.read(CONVERSATION)).data == {"count": MAX_SAVE_ATTEMPTS - 2}


async def test_updates_started_together_in_one_turn_both_count(store):
    # Two helpers of one handler changing the state side by side: both first loads read
    # the store, and the second read replaced the data the first change was made to.
    await store.write(CONVERSATION, {"n": 0}, etag=None)
    state = State(SlowReads(store), CONVERSATION)

    def add(data):
        data["n"] += 1

    await asyncio.gather(state.update(add), state.update(add), state.load())
    assert await state.save()
    assert (await store.read(CONVERSATION)).data == {"n": 2}


async def test_update_changes_count_when_the_turns_also_edit_directly(store):
    # Two turns each count a click with update() and also record a plain edit of a field
    # only they change: both clicks count and both plain edits are kept.
    def click(data):
        data["clicks"] = data.get("clicks", 0) + 1

    await store.write(CONVERSATION, {"clicks": 1}, etag=None)
    first, second = State(store, CONVERSATION), State(store, CONVERSATION)
    (await first.update(click))["seen_alice"] = True
    (await second.update(click))["seen_bob"] = True
    assert await first.save() and await second.save()
    expected = {"clicks": 3, "seen_alice": True, "seen_bob": True}
    assert (await store.read(CONVERSATION)).data == expected
    assert await second.load() == expected


async def test_a_direct_edit_that_overrides_an_update_is_kept(store):
    # The plain edit set a field the update() also set: the edit wins for that field, as it
    # did in the turn; the other writer's update() field is kept.
    await store.write(USER, {"n": 0, "mode": "a"}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.load())["other"] = 1
    (await second.update(lambda d: d.update(n=d["n"] + 1, mode="b")))["mode"] = "c"
    assert await first.save() and await second.save()
    assert (await store.read(USER)).data == {"n": 1, "mode": "c", "other": 1}


async def test_the_merge_hook_gets_both_sides_with_the_updates_replayed(store):
    def click(data):
        data["clicks"] = data.get("clicks", 0) + 1

    await store.write(USER, {"clicks": 0, "tags": []}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.update(click))["tags"] = ["a"]
    (await second.update(click))["tags"] = ["b"]
    assert await first.save()
    seen = []

    def union(loaded, theirs, ours):
        seen.append((loaded, theirs, ours))
        return {**theirs, "tags": sorted(set(theirs["tags"]) | set(ours["tags"]))}

    second.merge = union
    assert await second.save()
    assert seen == [
        ({"clicks": 1, "tags": []}, {"clicks": 2, "tags": ["a"]}, {"clicks": 1, "tags": ["b"]})
    ]
    assert (await store.read(USER)).data == {"clicks": 2, "tags": ["a", "b"]}


async def test_plain_edits_to_the_same_value_are_not_a_conflict(store):
    # The documented rule: a field both writers changed to the same value is written once.
    # So two plain `+= 1` edits that meet count once; counters belong in update().
    await store.write(USER, {"clicks": 1}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.load())["clicks"] += 1
    (await second.load())["clicks"] += 1
    assert await first.save() and await second.save()
    assert (await store.read(USER)).data == {"clicks": 2}


async def test_edits_of_different_fields_merge(store):
    await store.write(USER, {"theme": "light", "lang": "en", "old": 1}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.load())["theme"] = "dark"
    data = await second.load()
    data["lang"] = "de"
    del data["old"]
    assert await first.save() and await second.save()
    assert (await store.read(USER)).data == {"theme": "dark", "lang": "de"}


async def test_edits_of_the_same_field_are_a_conflict_and_nothing_is_overwritten(store):
    first, second = State(store, USER), State(store, USER)
    (await first.load())["theme"] = "dark"
    (await second.load())["theme"] = "blue"
    assert await first.save()
    with pytest.raises(StateConflict) as raised:
        await second.save()
    assert "nothing was written" in str(raised.value)
    assert (await store.read(USER)).data == {"theme": "dark"}


async def test_a_field_deleted_while_another_turn_changed_it_is_a_conflict(store):
    await store.write(USER, {"theme": "light", "lang": "en"}, etag=None)
    first, second = State(store, USER), State(store, USER)
    (await first.load())["theme"] = "dark"
    del (await second.load())["theme"]  # read before the first saved
    assert await first.save()
    with pytest.raises(StateConflict):
        await second.save()
    assert (await store.read(USER)).data == {"theme": "dark", "lang": "en"}


async def test_a_merge_function_combines_the_same_field(store):
    first, second = State(store, USER), State(store, USER)
    (await first.load())["tags"] = ["a"]
    (await second.load())["tags"] = ["b"]
    assert await first.save()

    def union(loaded, theirs, ours):
        return {**theirs, "tags": sorted(set(theirs.get("tags", [])) | set(ours["tags"]))}

    second.merge = union
    assert await second.save()
    assert (await store.read(USER)).data == {"tags": ["a", "b"]}


async def test_a_save_over_the_limit_writes_nothing(store):
    await store.write(USER, {"notes": []}, etag=None)
    state = State(store, USER)
    (await state.load())["notes"].append("x" * 5000)
    with pytest.raises(StateTooLarge):
        await state.save()
    assert (await store.read(USER)).data == {"notes": []}


async def test_a_state_of_exactly_the_limit_is_saved_and_one_byte_more_is_not(store):
    # {"blob":"…"} is 11 bytes of JSON around the string: 4096 bytes in all with 4085.
    state = State(store, USER)
    (await state.load())["blob"] = "x" * 4085
    assert await state.save()
    assert len((await store.read(USER)).data["blob"]) == 4085

    (await state.load())["blob"] += "x"
    with pytest.raises(StateTooLarge) as raised:
        await state.save()
    assert "4097 bytes" in str(raised.value)
    assert len((await store.read(USER)).data["blob"]) == 4085


class WriteHeld:
    """A store whose write number `held` (0 the first) waits until `go` is set: what the
    handler does meanwhile happens while that write is out."""

    def __init__(self, store, held: int = 0) -> None:
        self.store, self.held, self.writes = store, held, 0
        self.max_bytes = store.max_bytes
        self.writing, self.go = asyncio.Event(), asyncio.Event()

    async def read(self, key):
        return await self.store.read(key)

    async def write(self, key, data, *, etag, write_ids=()):
        self.writes += 1
        if self.writes - 1 == self.held:
            self.writing.set()
            await self.go.wait()
        return await self.store.write(key, data, etag=etag, write_ids=write_ids)


async def test_a_change_made_while_the_save_is_out_is_saved_by_the_next(store):
    held = WriteHeld(store)
    state = State(held, USER)
    data = await state.load()
    data["a"] = 1
    saving = asyncio.create_task(state.save())
    await held.writing.wait()
    data["b"] = 2  # another task of the same handler, while the write is out
    state_updated = asyncio.create_task(state.update(lambda d: d.update(c=3)))
    await asyncio.sleep(0)
    held.go.set()
    assert await saving
    await state_updated
    assert (await store.read(USER)).data == {"a": 1}
    assert state.changed and data == {"a": 1, "b": 2, "c": 3}
    assert await state.save()  # what the turn's end does
    assert (await store.read(USER)).data == {"a": 1, "b": 2, "c": 3}


async def test_a_change_made_while_a_merged_save_is_out_is_merged_by_the_next(store):
    held = WriteHeld(store, held=1)  # the second write: after meeting another writer's
    state = State(held, USER)
    data = await state.load()
    await store.write(USER, {"x": 1}, etag=None)  # another turn saved first
    data["a"] = 1
    saving = asyncio.create_task(state.save())
    await held.writing.wait()
    data["b"] = 2
    held.go.set()
    assert await saving
    assert (await store.read(USER)).data == {"x": 1, "a": 1}
    assert state.changed  # b still to save, merged with the other turn's x like any change
    assert await state.save()
    assert (await store.read(USER)).data == {"x": 1, "a": 1, "b": 2}
    assert data == {"x": 1, "a": 1, "b": 2}


def increment(data):
    data["n"] = data.get("n", 0) + 1


async def test_an_update_made_while_a_merged_save_is_out_counts_on_the_stored_count(store):
    await store.write(USER, {"n": 5}, etag=None)
    held = WriteHeld(store, held=1)
    state = State(held, USER)
    data = await state.update(increment)  # 6
    stored = await store.read(USER)
    await store.write(USER, {"n": 10}, etag=stored.etag)  # another turn's +5
    saving = asyncio.create_task(state.save())
    await held.writing.wait()  # writing 11: the other's 10, plus our increment
    await state.update(increment)  # a second task of the handler, meanwhile
    held.go.set()
    assert await saving
    assert (await store.read(USER)).data == {"n": 11}
    assert await state.save()
    assert (await store.read(USER)).data == {"n": 12} and data == {"n": 12}


async def test_an_edit_made_while_a_merged_save_is_out_never_reverts_the_other_writers(store):
    await store.write(USER, {"prefs": {"theme": "light"}}, etag=None)
    held = WriteHeld(store, held=1)
    state = State(held, USER)
    data = await state.load()
    stored = await store.read(USER)
    await store.write(USER, {"prefs": {"theme": "dark"}}, etag=stored.etag)
    data["seen"] = True
    saving = asyncio.create_task(state.save())
    await held.writing.wait()
    data["prefs"]["lang"] = "fr"  # the field the other writer changed, meanwhile
    held.go.set()
    assert await saving
    with pytest.raises(StateConflict):
        await state.save()
    assert (await store.read(USER)).data == {"prefs": {"theme": "dark"}, "seen": True}


class AnswerHeld(MemoryStateStore):
    """A store whose first write once `armed` is made, then answered only when `go` is set
    (a remote store's answer on its way)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.written, self.go = asyncio.Event(), asyncio.Event()

    async def write(self, key, data, *, etag, write_ids=()):
        answer = await super().write(key, data, etag=etag, write_ids=write_ids)
        if self.armed and not self.written.is_set():
            self.written.set()
            await self.go.wait()
        return answer


async def test_erased_data_stays_erased_when_a_merged_save_met_a_deleted_document(store):
    # The merged write created the document again (the other writer had deleted it) while
    # the handler went on editing; then the document is deleted once more (the user's
    # erasure, say). The turn's end save writes only what the turn changed since its last
    # write (b), never the data it loaded before the deletions.
    await store.write(USER, {"secret": "s", "n": 1}, etag=None)
    held = WriteHeld(store, held=1)
    state = State(held, USER)
    data = await state.load()
    data["a"] = 1
    await store.delete(USER)
    saving = asyncio.create_task(state.save())
    await held.writing.wait()  # the merged write, a create, is out
    data["b"] = 2
    held.go.set()
    assert await saving
    assert (await store.read(USER)).data == {"a": 1}
    await store.delete(USER)
    assert await state.save()
    assert (await store.read(USER)).data == {"b": 2}


async def counted_and_saving(start: int):
    """A state counted once from `start` whose save was stored, its answer held back."""
    store = AnswerHeld()
    await store.write(USER, {"n": start}, etag=None)
    store.armed = True
    state = State(store, USER)
    await state.update(increment)
    saving = asyncio.create_task(state.save())  # the turn's own save_state, say
    await store.written.wait()
    return store, state, saving


async def test_a_delete_waits_for_a_save_that_is_out():
    store, state, saving = await counted_and_saving(0)
    deleting = asyncio.create_task(state.delete())  # another task starts over meanwhile
    await asyncio.sleep(0.01)
    store.go.set()
    assert await saving and await deleting
    data = await state.update(increment)  # on the emptied state: n = 1
    await store.write(USER, {"n": 5}, etag=None)  # another instance, meanwhile
    assert await state.save()
    assert (await store.read(USER)).data == {"n": 6} and data == {"n": 6}


class AnswerLost:
    """The next `lose` writes that are stored lose their answers: after `meanwhile`
    (another writer, say) each answers None, as the store's client does when it sent a
    stored write again and was refused; or, `failing`, raises StateError, as when the
    call timed out. The next `fail_refused` refused writes and `fail_reads` reads raise
    StateError too (storage failing), and so does write number `unsent` (counted from 1),
    before it is sent."""

    def __init__(self, store, meanwhile=None, failing=False) -> None:
        self.store, self.meanwhile, self.failing = store, meanwhile, failing
        self.lose = self.fail_refused = self.fail_reads = self.unsent = self.writes = 0
        self.max_bytes = store.max_bytes

    async def read(self, key):
        if self.fail_reads:
            self.fail_reads -= 1
            raise StateError("state store: read timed out after 10s")
        return await self.store.read(key)

    async def write(self, key, data, *, etag, write_ids=()):
        self.writes += 1
        if self.writes == self.unsent:
            raise StateError("state store: write timed out after 10s")
        answer = await self.store.write(key, data, etag=etag, write_ids=write_ids)
        if answer is None and self.fail_refused:
            self.fail_refused -= 1
            raise StateError("state store: write timed out after 10s")
        if answer is None or not self.lose:
            return answer
        self.lose -= 1
        if self.meanwhile is not None:
            await self.meanwhile()
        if self.failing:
            raise StateError("state store: write timed out after 10s")
        return None


async def another_turn_counts(store) -> None:
    other = State(store, USER)
    await other.update(increment)
    assert await other.save()


@pytest.mark.parametrize("meanwhile", [False, True])
async def test_a_write_whose_answer_was_lost_counts_once(store, meanwhile):
    # Stored, its answer lost: and maybe another turn counted on top of it before this
    # save read the document again. Each increment counts once.
    await store.write(USER, {"n": 0}, etag=None)
    lossy = AnswerLost(store, (lambda: another_turn_counts(store)) if meanwhile else None)
    state = State(lossy, USER)
    data = await state.update(increment)
    lossy.lose = 1
    assert await state.save()
    expected = {"n": 2 if meanwhile else 1}
    assert (await store.read(USER)).data == expected and data == expected
    assert not state.changed


async def test_a_write_whose_call_failed_but_was_stored_counts_once_when_saved_again(store):
    await store.write(USER, {"n": 0}, etag=None)
    lossy = AnswerLost(store, lambda: another_turn_counts(store), failing=True)
    state = State(lossy, USER)
    await state.update(increment)
    lossy.lose = 1
    with pytest.raises(StateError):
        await state.save()  # it was stored, and another turn counted since
    await state.update(increment)
    assert await state.save()  # proactive code trying again, say
    assert (await store.read(USER)).data == {"n": 3}


async def test_a_merged_write_whose_call_failed_keeps_the_other_writers_change(store):
    await store.write(USER, {"n": 0}, etag=None)
    lossy = AnswerLost(store, failing=True)
    state = State(lossy, USER)
    await state.update(increment)
    await another_turn_counts(store)  # before this save's first write: a merge follows
    lossy.lose = 1
    with pytest.raises(StateError):
        await state.save()  # the merged n = 2 was stored, its call failed
    assert (await store.read(USER)).data == {"n": 2}
    await state.save()  # the turn's end
    assert (await store.read(USER)).data == {"n": 2}


@pytest.mark.parametrize("failure", ["the re-read failed", "the next write failed too"])
async def test_a_write_left_unanswered_counts_once_when_saved_again(store, failure):
    await store.write(USER, {"n": 0}, etag=None)
    lossy = AnswerLost(store, failing=failure == "the next write failed too")
    state = State(lossy, USER)
    await state.update(increment)
    lossy.lose = 1  # stored, then answered None (a refused resend) or timed out
    if failure == "the re-read failed":
        lossy.fail_reads = 1
    else:
        lossy.fail_refused = 1  # the next save's first write, refused, times out too
    for _ in range(2 if failure == "the next write failed too" else 1):
        with pytest.raises(StateError):
            await state.save()
    assert (await store.read(USER)).data == {"n": 1}
    await state.save()
    assert (await store.read(USER)).data == {"n": 1}


def add_counts(loaded, theirs, ours):
    """A State.merge for a counter: both sides' increments."""
    merged = dict(theirs)
    merged["n"] = theirs.get("n", 0) + ours.get("n", 0) - loaded.get("n", 0)
    return merged


@pytest.mark.parametrize("merge", [None, add_counts])
async def test_a_write_recognised_by_a_save_that_then_failed_counts_once(store, merge):
    # A save's write is stored but its call fails; another turn counts; the next save
    # recognises that write, then its own write fails before it is sent; a third save.
    await store.write(USER, {"n": 0}, etag=None)
    lossy = AnswerLost(store, lambda: another_turn_counts(store), failing=True)
    state = State(lossy, USER, merge=merge)
    await state.update(increment)
    lossy.lose, lossy.unsent = 1, 3
    for _ in range(2):
        with pytest.raises(StateError):
            await state.save()
    assert (await store.read(USER)).data == {"n": 2}
    await state.save()
    assert (await store.read(USER)).data == {"n": 2}


async def test_a_delete_while_the_first_load_is_out_reads_as_empty():
    class SlowRead(MemoryStateStore):
        async def read(self, key):
            found = await super().read(key)
            await asyncio.sleep(0.05)
            return found

    store = SlowRead()
    await store.write(USER, {"secret": "s"}, etag=None)
    state = State(store, USER)
    loading = asyncio.create_task(state.load())
    await asyncio.sleep(0.01)
    await state.delete()
    assert await loading == {} and await state.load() == {}
    assert await store.read(USER) is None


class LosesTheFirstAnswer:
    """A TCP proxy to Azurite's blob port that, once `armed`, drops the connection of the
    first state write after Azurite stored it: its answer is lost, and the storage SDK
    sends it again (refused: the ETag moved)."""

    def __init__(self, port: int) -> None:
        self.port, self.armed, self.dropped = port, False, 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        lose = asyncio.Event()

        async def requests():
            with contextlib.suppress(OSError):
                while chunk := await reader.read(65536):
                    line = chunk.split(b"\r\n", 1)[0]
                    if self.armed and line.startswith(b"PUT ") and b"/state/" in line:
                        self.armed = False
                        lose.set()
                    upstream_writer.write(chunk)
                    await upstream_writer.drain()
            upstream_writer.close()

        async def answers():
            with contextlib.suppress(OSError):
                while chunk := await upstream_reader.read(65536):
                    if lose.is_set():
                        self.dropped += 1
                        writer.transport.abort()
                        return
                    writer.write(chunk)
                    await writer.drain()
            writer.close()

        await asyncio.gather(requests(), answers())


@pytest.mark.integration
async def test_a_write_stored_but_whose_answer_was_lost_counts_once(azurite, unique_name):
    from tools.azurite import connection_string

    proxy = LosesTheFirstAnswer(azurite.blob_port)
    port = await proxy.start()
    container = unique_name("state")
    direct = BlobStateStore(settings_for(azurite.connection_string, container))
    through = BlobStateStore(settings_for(connection_string(port, azurite.queue_port), container))
    try:
        await direct.write(USER, {"n": 0}, etag=None)
        state = State(through, USER)
        await state.update(increment)
        proxy.armed = True
        assert await state.save()
        assert proxy.dropped == 1
        assert (await direct.read(USER)).data == {"n": 1}
    finally:
        await through.close()
        await direct.close()
        proxy.server.close()


async def test_two_saves_of_one_state_at_once_count_an_update_once():
    store, state, first = await counted_and_saving(10)
    second = asyncio.create_task(state.save())  # the turn's end, at once
    await asyncio.sleep(0.01)
    store.go.set()
    assert await first and not await second
    assert (await store.read(USER)).data == {"n": 11}


async def test_an_async_update_change_is_a_clear_error(store):
    state = State(store, USER)

    async def bump(data):
        data["n"] = 1

    with pytest.raises(TypeError, match="plain function, not async"):
        await state.update(bump)
    assert not state.changed and not await state.save()
    assert await store.read(USER) is None
    # What a plain change returns is not used: only what it changed counts.
    await state.update(lambda data: data.setdefault("items", []))
    await state.update(lambda data: data.setdefault("prefs", {}))
    await state.update(lambda data: data.setdefault("prefs", {}))  # there: changes nothing
    await state.update(lambda data: data.pop("missing", {}))
    await state.update(lambda data: data.pop("prefs"))
    assert await state.save()
    assert (await store.read(USER)).data == {"items": []}


async def test_the_data_a_handler_holds_stays_the_states_after_a_delete(store):
    await store.write(USER, {"count": 5}, etag=None)
    state = State(store, USER)
    data = await state.load()
    await state.delete()
    assert data == {}  # the handler's dict reads as the state does
    data["started"] = "now"  # starting over with the dict load() gave it
    assert await state.save()
    assert (await store.read(USER)).data == {"started": "now"}


async def test_delete_then_state_starts_empty(store):
    await store.write(USER, {"a": 1}, etag=None)
    state = State(store, USER)
    assert await state.load() == {"a": 1}
    assert await state.delete() is True
    assert await state.load() == {}
    assert await store.read(USER) is None


async def test_delete_prefixed_deletes_the_threads_of_one_channel_only(store):
    # Each Teams channel thread has a state of its own ("<channel>;messageid=<root>"). The
    # channels' ids differ in length (the prefix ends at each place of a base64 group) and
    # in script.
    for channel in ("19:c@thread.tacv2", "19:ç会话@thread.tacv2", "19:cc@thread.tacv2"):
        gone = [
            conversation_state_key("msteams", f"{channel};messageid={root}")
            for root in ("1", "22", "1700000000000")
        ]
        kept = [
            conversation_state_key("msteams", channel),  # the channel's own
            conversation_state_key("msteams", f"{channel[:-1]}X;messageid=1"),  # another's
            conversation_state_key("webchat", f"{channel};messageid=1"),  # another channel id
            user_state_key("msteams", f"{channel};messageid=1"),  # another scope
        ]
        for key in gone + kept:
            assert await store.write(key, {"kept": key}, etag=None)

        prefix = conversation_state_key("msteams", f"{channel};messageid=")
        assert await store.delete_prefixed(prefix) == 3

        assert [key for key in gone if await store.read(key)] == []
        assert [key for key in kept if await store.read(key) is None] == []
        assert await store.delete_prefixed(prefix) == 0
        for key in kept:
            await store.delete(key)


async def test_delete_prefixed_with_nothing_stored_deletes_nothing(store):
    assert await store.delete_prefixed(conversation_state_key("msteams", "19:c;messageid=")) == 0
    with pytest.raises(ValueError):
        await store.delete_prefixed("conversation/msteams/")


class SlowReads:
    """`store` whose reads give way to other tasks first, as any I/O does (the memory
    store's never do, so side-by-side loads would run one after the other)."""

    def __init__(self, store) -> None:
        self._store = store

    async def read(self, key):
        await asyncio.sleep(0)
        return await self._store.read(key)

    def __getattr__(self, name):
        return getattr(self._store, name)


class BusyStore(MemoryStateStore):
    """A memory store where another writer always saves just before this one."""

    async def write(self, key, data, *, etag, write_ids=()):
        current = await self.read(key)
        await super().write(key, {"other": self.writes}, etag=current.etag if current else None)
        return await super().write(key, data, etag=etag, write_ids=write_ids)


async def test_endless_concurrent_writers_give_a_retry_safe_conflict():
    store = BusyStore()
    state = State(store, USER)
    await state.update(lambda data: data.update(mine=True))
    with pytest.raises(StateConflict, match="nothing was written"):
        await state.save()
    assert "mine" not in (await store.read(USER)).data


async def test_state_without_a_store_is_a_clear_error():
    with pytest.raises(StateError, match="no state store"):
        await State(None, USER).load()


# ---------------------------------------------------------------------------- Blob only


@pytest.mark.integration
async def test_blob_layout_is_plain_json_under_state(azurite, unique_name):
    container = unique_name("state")
    store = BlobStateStore(settings_for(azurite.connection_string, container))
    try:
        await store.write(USER, {"theme": "dark", "name": "Zoë"}, etag=None)
    finally:
        await store.close()
    blobs = ContainerClient.from_connection_string(azurite.connection_string, container)
    [name] = [blob.name for blob in blobs.list_blobs()]
    assert name == state_blob_name(USER)
    assert name.startswith("state/user/")
    document = json.loads(blobs.download_blob(name).readall())
    assert document["schemaVersion"] == 1
    assert document["key"] == USER
    assert document["data"] == {"theme": "dark", "name": "Zoë"}


@pytest.mark.integration
@pytest.mark.parametrize("body", [b"{not json", b"[" * 200_000 + b"]" * 200_000])
async def test_a_foreign_document_is_a_clear_error(azurite, unique_name, body):
    container = unique_name("state")
    blobs = ContainerClient.from_connection_string(azurite.connection_string, container)
    blobs.create_container()
    blobs.upload_blob(state_blob_name(USER), body)
    store = BlobStateStore(settings_for(azurite.connection_string, container))
    try:
        with pytest.raises(StateError, match="not valid JSON"):
            await store.read(USER)
    finally:
        await store.close()


async def test_storage_that_is_down_is_a_state_error_without_secrets():
    port = free_port()
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=c2VjcmV0LWtleS12YWx1ZQ==;"
        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    store = BlobStateStore(settings_for(connection, "state-down"), options=FAST_STORAGE)
    try:
        with pytest.raises(StateError) as raised:
            await store.read(USER)
    finally:
        await store.close()
    assert "c2VjcmV0" not in str(raised.value)
    assert "state store: read failed" in str(raised.value)


@pytest.mark.parametrize("answer", list(UNREADABLE_ANSWERS))
@pytest.mark.parametrize("operation", ["list", "read"])
async def test_an_answer_no_client_can_read_is_a_state_error(answer, operation):
    # A 200 whose body the storage SDK cannot read (a proxy's page, XML cut short), to the
    # listing that erasing a conversation's threads makes, or to a document's ranged GET
    # (no Content-Range): the SDK's own ValueError escaped the store as it was.
    async with unreadable_storage(answer, downloads=True) as storage:
        store = BlobStateStore(
            settings_for(storage.connection_string, "state"), options=FAST_STORAGE
        )
        try:
            with pytest.raises(StateError) as raised:
                if operation == "list":
                    await store.delete_prefixed(
                        conversation_state_key("msteams", "19:c;messageid=")
                    )
                else:
                    await store.read(conversation_state_key("msteams", "a:1"))
        finally:
            await store.close()

    text = str(raised.value)
    assert text.startswith(f"state store: {operation} failed: the answer could not be read (")
    assert ANSWER_TEXT not in text


@pytest.mark.integration
async def test_storage_refusing_the_credential_says_which_setting_to_check(azurite, unique_name):
    # The account key is wrong: the operator is told to check AzureWebJobsStorage, not
    # given a bare "HTTP 403" (and never the key).
    wrong = azurite.connection_string.replace(
        azurite.connection_string.split("AccountKey=")[1].split(";")[0],
        "c2VjcmV0LWtleS12YWx1ZQ==",
    )
    store = BlobStateStore(settings_for(wrong, unique_name("state")), options=FAST_STORAGE)
    try:
        with pytest.raises(StateError) as raised:
            await store.read(USER)
    finally:
        await store.close()
    assert "storage authentication failed" in str(raised.value)
    assert "AzureWebJobsStorage" in str(raised.value)
    assert "c2VjcmV0" not in str(raised.value)
