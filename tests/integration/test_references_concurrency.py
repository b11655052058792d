"""No lost updates under concurrent writers (tasks and OS processes), and listing at scale.

Each writer adds its own field to the same conversation's reference, the way function
instances handling one conversation each bring something new. Afterwards the stored document
must hold exactly the fields of the writers that reported success.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import uuid

import pytest
from azure.storage.blob.aio import BlobServiceClient

from shared.config import Settings, StorageSettings
from shared.references import BlobReferenceStore, MemoryReferenceStore, StoreConflict, StoreError
from shared.references.blob import ERASURE_WAIT
from shared.references.keys import user_index_name
from shared.storage import StorageOptions
from shared.userdata import erase_user_data
from tests.fixtures.storage import FAST_STORAGE
from tests.unit.test_references import FailingTransport, reference
from tests.unit.test_references import settings_for as store_settings

pytestmark = pytest.mark.integration

OPTIONS = StorageOptions(retry_total=2, initial_backoff=0.05, increment_base=0.1, jitter=0.0)
KEY = "msteams/a:contended"


def base_reference() -> dict:
    return {
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/emea/",
        "conversation": {"id": "a:contended", "conversationType": "personal", "tenantId": "t"},
        "user": {"id": "29:user"},
        "bot": {"id": "28:bot"},
    }


def settings_for(connection_string: str, container: str) -> Settings:
    return Settings(
        storage=StorageSettings(connection_string=connection_string),
        references_container=container,
    )


async def run_writers(
    connection_string: str,
    container: str,
    probes: list[int],
    *,
    instances: int = 4,
    max_attempts: int = 25,
) -> list[tuple[int, str]]:
    """Each probe is one writer task; writers share `instances` store instances."""
    stores = [
        BlobReferenceStore(
            settings_for(connection_string, container), options=OPTIONS, max_attempts=max_attempts
        )
        for _ in range(instances)
    ]

    async def writer(probe: int, store: BlobReferenceStore) -> tuple[int, str]:
        try:
            written = await store.upsert({**base_reference(), f"probe{probe}": probe})
        except StoreConflict:
            return probe, "conflict"
        except Exception as exc:  # reported, then asserted absent
            return probe, f"error {type(exc).__name__}: {exc}"
        return probe, "ok" if written else "unchanged"

    try:
        return await asyncio.gather(
            *(writer(p, stores[i % instances]) for i, p in enumerate(probes))
        )
    finally:
        for store in stores:
            await store.close()


def writers_in_process(connection_string, container, probes, barrier, results):
    """Entry point of a spawned OS process: start with the other process, report outcomes."""
    barrier.wait(timeout=60)
    results.put(asyncio.run(run_writers(connection_string, container, probes)))


async def stored_probes(connection_string: str, container: str) -> set[int]:
    store = BlobReferenceStore(settings_for(connection_string, container), options=OPTIONS)
    try:
        stored = await store.get(KEY)
    finally:
        await store.close()
    assert stored is not None
    return {value for name, value in stored.reference.items() if name.startswith("probe")}


def check(results: list[tuple[int, str]], final: set[int]) -> set[int]:
    errors = [outcome for _, outcome in results if outcome.startswith("error")]
    assert not errors, errors
    succeeded = {probe for probe, outcome in results if outcome == "ok"}
    assert final == succeeded, "every reported success is in the document, nothing else"
    return succeeded


async def test_twenty_tasks_lose_no_update(azurite, unique_name):
    container = unique_name("race")
    results = await run_writers(azurite.connection_string, container, list(range(20)))
    succeeded = check(results, await stored_probes(azurite.connection_string, container))
    assert succeeded == set(range(20))  # 25 attempts > 19 rivals: every writer gets through


async def test_exhausted_retries_report_conflict_and_write_nothing(azurite, unique_name):
    container = unique_name("race")
    results = await run_writers(
        azurite.connection_string, container, list(range(20)), instances=20, max_attempts=1
    )
    succeeded = check(results, await stored_probes(azurite.connection_string, container))
    assert succeeded  # somebody won...
    assert any(outcome == "conflict" for _, outcome in results)  # ...and somebody was told no


def test_twenty_writers_in_two_processes_lose_no_update(azurite, unique_name):
    container = unique_name("race")
    context = multiprocessing.get_context("spawn")
    barrier, outcomes = context.Barrier(2), context.Queue()
    processes = [
        context.Process(
            target=writers_in_process,
            args=(
                azurite.connection_string,
                container,
                list(range(k * 10, k * 10 + 10)),
                barrier,
                outcomes,
            ),
        )
        for k in range(2)
    ]
    for process in processes:
        process.start()
    try:
        results = [outcome for _ in processes for outcome in outcomes.get(timeout=60)]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    final = asyncio.run(stored_probes(azurite.connection_string, container))
    assert check(results, final) == set(range(20))


def guest_reference(tenant: int, **extra) -> dict:
    """One user's 1:1 with the bot in each of several tenants (a guest user)."""
    return {
        "channelId": "msteams",
        "serviceUrl": "https://smba.trafficmanager.net/emea/",
        "conversation": {
            "id": f"a:guest-{tenant}",
            "conversationType": "personal",
            "tenantId": f"t{tenant}",
        },
        "user": {"id": "29:guest", "aadObjectId": "aad-guest"},
        "bot": {"id": "28:bot"},
        **extra,
    }


@pytest.mark.parametrize("mode", ["read-first", "create-first"])
async def test_user_index_loses_no_conversation_under_concurrent_writers(
    azurite, unique_name, mode
):
    settings = settings_for(azurite.connection_string, unique_name("race"))
    stores = [BlobReferenceStore(settings, options=OPTIONS, max_attempts=25) for _ in range(3)]
    try:
        if mode == "create-first":
            # Each instance has just seen new conversations only: it now creates documents
            # without reading first, and a conversation stored by another gets a refused
            # create, then the read and merge.
            for n, store in enumerate(stores):
                for i in range(6):
                    other_user = {"id": f"29:warm-{n}-{i}"}
                    await store.upsert(guest_reference(100 + 10 * n + i, user=other_user))
        await asyncio.gather(*(stores[t % 3].upsert(guest_reference(t)) for t in range(6)))
        # Half are removed while the other half change, all at once, from three instances.
        await asyncio.gather(
            *(
                stores[t % 3].delete(f"msteams/a:guest-{t}")
                if t % 2
                else stores[(t + 1) % 3].upsert(guest_reference(t, locale="fr-FR"))
                for t in range(6)
            )
        )
        reader = stores[0]
        for t in range(6):
            for who in ({"user_id": "29:guest"}, {"aad_object_id": "aad-guest"}):
                found = await reader.find_by_user(channel_id="msteams", tenant_id=f"t{t}", **who)
                if t % 2:
                    assert found is None, (t, who)
                else:
                    assert found is not None and found.key == f"msteams/a:guest-{t}", (t, who)
                    assert found.reference["locale"] == "fr-FR"
    finally:
        for store in stores:
            await store.close()


# ---------------------------------------------------------------------------- listing at scale


def scale_reference(i: int, channels: int = 2, tenants: int = 5) -> dict:
    return {
        "channelId": ["msteams", "webchat"][i % channels],
        "serviceUrl": "https://smba.trafficmanager.net/emea/",
        "conversation": {
            "id": f"19:{uuid.UUID(int=i)}@thread.tacv2",
            "conversationType": "channel",
            "tenantId": f"tenant-{i % tenants}",
        },
        "bot": {"id": "28:bot"},
    }


def expected_keys(count: int, channel: str, tenant: str) -> set[str]:
    refs = (scale_reference(i) for i in range(count))
    return {
        f"{r['channelId']}/{r['conversation']['id']}"
        for r in refs
        if r["channelId"] == channel and r["conversation"]["tenantId"] == tenant
    }


async def page_through(store, page_size: int, **filters) -> list[str]:
    keys: list[str] = []
    continuation = None
    while True:
        page = await store.list(page_size=page_size, continuation=continuation, **filters)
        assert len(page.items) <= page_size
        keys += [item.key for item in page.items]
        continuation = page.continuation
        if continuation is None:
            return keys


async def test_ten_thousand_references_page_exactly_in_memory():
    store = MemoryReferenceStore()
    for i in range(10_000):
        await store.upsert(scale_reference(i))
    everything = await page_through(store, 1000)
    assert len(everything) == len(set(everything)) == 10_000
    subset = await page_through(store, 100, channel_id="msteams", tenant_id="tenant-2")
    assert len(subset) == len(set(subset))
    assert set(subset) == expected_keys(10_000, "msteams", "tenant-2")


async def test_a_thousand_references_page_exactly_on_azurite(azurite, unique_name):
    count = 1000
    store = BlobReferenceStore(
        settings_for(azurite.connection_string, unique_name("scale")), options=OPTIONS
    )
    try:
        semaphore = asyncio.Semaphore(16)

        async def put(i: int) -> None:
            async with semaphore:
                assert await store.upsert(scale_reference(i))

        await asyncio.gather(*(put(i) for i in range(count)))
        everything = await page_through(store, 70)  # pages end mid-listing-page too
        assert len(everything) == len(set(everything)) == count
        subset = await page_through(store, 33, channel_id="msteams", tenant_id="tenant-2")
        assert len(subset) == len(set(subset))
        assert set(subset) == expected_keys(count, "msteams", "tenant-2")
        tenant_only = await page_through(store, 500, tenant_id="tenant-4")
        # Only Teams conversations are indexed by tenant (a webchat client's tenant is not
        # verified data), so the webchat half of these carries none.
        assert len(tenant_only) == len(set(tenant_only)) == count // 10
        assert set(tenant_only) == expected_keys(count, "msteams", "tenant-4")
    finally:
        await store.close()


# --- a 1:1 whose user changes ------------------------------------------------------------


async def erase_teams_user(store: BlobReferenceStore):
    """Erase the Teams user `reference()` names by default, by both their ids."""
    return await erase_user_data(
        channel_id="msteams",
        user_id="29:user",
        aad_object_id="aad-user",
        state=None,
        references=store,
    )


class Gated(BlobReferenceStore):
    """Holds one step of its upserts, once :meth:`hold` named it, until the test opens the
    gate: `_index` (the user's index entries, after the document write) or `_unindex` (a
    previous user's entries taken out)."""

    step = ""
    gate: asyncio.Event | None = None
    reached: asyncio.Event | None = None

    def hold(self, step: str) -> None:
        self.step, self.gate, self.reached = step, asyncio.Event(), asyncio.Event()

    async def _held(self, step: str) -> None:
        if step == self.step and self.gate is not None and self.reached is not None:
            self.reached.set()
            await self.gate.wait()

    async def _index(self, planned, likely_absent):
        await self._held("_index")
        await super()._index(planned, likely_absent)

    async def _unindex(self, previous, planned):
        await self._held("_unindex")
        await super()._unindex(previous, planned)


async def test_a_user_change_racing_a_change_back_leaves_the_conversation_erasable(
    azurite, unique_name
):
    # One Web Chat conversation written in by two user ids (a client that changes from.id
    # at sign-in): instance A stores it for u2 and, before it takes it out of u1's index,
    # instance B stores it for u1 again. A's removal must not leave u1's conversation out
    # of u1's index: erasing u1 must find and delete it.

    settings = store_settings(azurite.connection_string, unique_name("flip"))
    a = Gated(settings, options=FAST_STORAGE)
    b = BlobReferenceStore(settings, options=FAST_STORAGE)
    u1 = reference("c:1", channel_id="webchat", tenant=None, user="u1", aad=None)
    u2 = reference("c:1", channel_id="webchat", tenant=None, user="u2", aad=None)
    try:
        await a.upsert(u1)
        a.hold("_unindex")
        writing = asyncio.ensure_future(a.upsert(u2))
        await a.reached.wait()
        assert await b.upsert(u1) is True
        a.gate.set()
        assert await writing is True
        assert (await b.get("webchat/c:1")).user_id == "u1"
        found = await b.find_by_user(channel_id="webchat", user_id="u1")
        assert found is not None and found.key == "webchat/c:1"
        erased = await erase_user_data(channel_id="webchat", user_id="u1", state=None, references=b)
        assert erased.conversations == ["webchat/c:1"]
        assert await b.get("webchat/c:1") is None
    finally:
        await a.close()
        await b.close()


class UpsertBeforeIndexRemoval(BlobReferenceStore):
    """Lets another instance upsert `reference` just before this one removes the user
    index it emptied (the removal of `index`, once)."""

    other: BlobReferenceStore | None = None
    index = ""
    racing: dict | None = None

    def race(self, other: BlobReferenceStore, index: str, reference: dict) -> None:
        self.other, self.index, self.racing = other, index, reference

    async def _remove(self, name, etag):
        if name == self.index and self.other is not None and self.racing is not None:
            racing, self.racing = self.racing, None
            assert await self.other.upsert(racing) is True
        return await super()._remove(name, etag)


async def test_a_delete_emptying_a_user_index_keeps_a_conversation_indexed_meanwhile(
    azurite, unique_name
):
    # The user's only 1:1 (tenant-1) is deleted, which empties their index; just before
    # the index is removed, another instance stores the same user's 1:1 in tenant-2 into
    # it. The removal must not take the new entry with it: the user is still found.

    settings = store_settings(azurite.connection_string, unique_name("emptied"))
    deleting = UpsertBeforeIndexRemoval(settings, options=FAST_STORAGE)
    other = BlobReferenceStore(settings, options=FAST_STORAGE)
    try:
        await deleting.upsert(reference("a:1", tenant="tenant-1"))
        index = user_index_name("msteams", "id", "29:user")
        deleting.race(other, index, reference("a:2", tenant="tenant-2"))
        assert await deleting.delete("msteams/a:1") is True
        assert deleting.racing is None  # the upsert ran inside the delete
        assert await other.get("msteams/a:1") is None
        found = await other.find_by_user(
            channel_id="msteams", user_id="29:user", tenant_id="tenant-2"
        )
        assert found is not None and found.key == "msteams/a:2"
    finally:
        await deleting.close()
        await other.close()


async def test_an_upsert_that_failed_is_not_answered_from_the_cache_afterwards(
    azurite, unique_name
):
    # The user changes (u1 -> u2) and the new user's index write fails after the document
    # was stored for u2: the conversation is in neither index. The next activity, from u1
    # again, must not be skipped as "cached, nothing changed": it stores u1 and indexes it.

    settings = store_settings(azurite.connection_string, unique_name("failcache"))
    failing = {"on": False}
    transport = FailingTransport(
        lambda r: failing["on"] and r.method == "PUT" and "/users/" in r.url
    )
    client = BlobServiceClient.from_connection_string(
        azurite.connection_string, transport=transport, retry_total=0
    )
    store = BlobReferenceStore(settings, client=client, options=FAST_STORAGE)
    other = BlobReferenceStore(settings, options=FAST_STORAGE)
    u1 = reference("c:1", channel_id="webchat", tenant=None, user="u1", aad=None)
    u2 = reference("c:1", channel_id="webchat", tenant=None, user="u2", aad=None)
    try:
        await store.upsert(u1)
        failing["on"] = True
        with pytest.raises(StoreError):
            await store.upsert(u2)
        failing["on"] = False
        assert await store.upsert(u1) is True  # written again, not skipped
        assert (await other.get("webchat/c:1")).user_id == "u1"
        erased = await erase_user_data(
            channel_id="webchat", user_id="u1", state=None, references=other
        )
        assert erased.conversations == ["webchat/c:1"]
    finally:
        await store.close()
        await other.close()
        await client.close()


async def test_an_erasure_waits_for_a_conversation_this_instance_is_still_indexing(
    azurite, unique_name
):
    # A new 1:1 of the user is stored, its index write still under way, when the erasure
    # (same instance) begins: the erasure must find and delete it, not leave it stored.

    store = Gated(
        store_settings(azurite.connection_string, unique_name("inflight")), options=FAST_STORAGE
    )
    try:
        await store.upsert(reference("e:old", tenant="t1"))
        store.hold("_index")
        recording = asyncio.ensure_future(store.upsert(reference("e:new", tenant="t2")))
        await store.reached.wait()  # the document is stored; its index write is held
        asyncio.get_running_loop().call_later(0.3, store.gate.set)
        erased = await erase_teams_user(store)
        await recording
        assert sorted(erased.conversations) == ["msteams/e:new", "msteams/e:old"]
        assert await store.get("msteams/e:new") is None
    finally:
        await store.close()


async def test_an_erasure_does_not_wait_for_another_channels_writes(azurite, unique_name):
    # A write of another channel's conversation stuck on storage (held here) is none of the
    # erasure's business: the channel gives the erasure 15 s, which it must not spend so.

    store = Gated(
        store_settings(azurite.connection_string, unique_name("otherchannel")),
        options=FAST_STORAGE,
    )
    try:
        await store.upsert(reference("e:old", tenant="t1"))
        store.hold("_index")
        webchat = reference("w:1", channel_id="webchat", tenant=None, user="w-user", aad=None)
        held = asyncio.ensure_future(store.upsert(webchat))
        await store.reached.wait()
        async with asyncio.timeout(ERASURE_WAIT * 0.6):
            erased = await erase_teams_user(store)
        assert erased.conversations == ["msteams/e:old"]
        assert not held.done()
        store.gate.set()
        assert await held is True
    finally:
        await store.close()


async def test_the_cache_is_not_trusted_while_this_instance_still_writes_the_conversation(
    azurite, unique_name
):
    # u2's activity stores the 1:1 for u2; its index write is slow and the turn stopped
    # waiting for it. u1 writes in meanwhile: compared with the cache (which still says
    # u1) it would be "nothing changed" and skipped, leaving the 1:1 stored for u2.

    store = Gated(
        store_settings(azurite.connection_string, unique_name("inflightcache")),
        options=FAST_STORAGE,
    )
    u1 = reference("c:1", channel_id="webchat", tenant=None, user="u1", aad=None)
    u2 = reference("c:1", channel_id="webchat", tenant=None, user="u2", aad=None)
    try:
        await store.upsert(u1)
        store.hold("_index")
        slow = asyncio.ensure_future(store.upsert(u2))
        await store.reached.wait()  # the document says u2; its index write is held
        asyncio.get_running_loop().call_later(0.3, store.gate.set)
        assert await store.upsert(u1) is True
        await slow
        assert (await store.get("webchat/c:1")).user_id == "u1"
        erased = await erase_user_data(
            channel_id="webchat", user_id="u1", state=None, references=store
        )
        assert erased.conversations == ["webchat/c:1"]
    finally:
        await store.close()


async def test_an_erasure_waits_once_for_a_write_stuck_on_storage(
    azurite, unique_name, monkeypatch
):
    # Another user's write of the channel stuck on storage: waited for once per erasure
    # (ERASURE_WAIT), not once for each of the user's names (user id, aadObjectId).
    from shared.references import blob as blob_store

    monkeypatch.setattr(blob_store, "ERASURE_WAIT", 0.5)
    store = Gated(
        store_settings(azurite.connection_string, unique_name("stuck")), options=FAST_STORAGE
    )
    try:
        await store.upsert(reference("e:old", tenant="t1"))
        store.hold("_index")
        other = reference("e:other", tenant="t1", user="29:other", aad="aad-other")
        stuck = asyncio.ensure_future(store.upsert(other))
        await store.reached.wait()
        async with asyncio.timeout(0.5 * 1.8):
            erased = await erase_teams_user(store)
        assert erased.conversations == ["msteams/e:old"]
        store.gate.set()
        assert await stuck is True
    finally:
        await store.close()


async def test_an_index_write_that_outlives_its_upsert_is_waited_for_by_an_erasure(
    azurite, unique_name
):
    # Storage so slow that the upsert's own timeout ends it after the document write: its
    # index write goes on alone. An erasure beginning then must still find the 1:1.
    slow = dataclasses.replace(FAST_STORAGE, read_timeout=1.0, operation_timeout=1.0)
    store = Gated(store_settings(azurite.connection_string, unique_name("outlives")), options=slow)
    try:
        await store.upsert(reference("e:old", tenant="t1"))
        store.hold("_index")
        with pytest.raises(StoreError):
            await store.upsert(reference("e:new", tenant="t2"))
        asyncio.get_running_loop().call_later(0.3, store.gate.set)
        erased = await erase_teams_user(store)
        assert sorted(erased.conversations) == ["msteams/e:new", "msteams/e:old"]
        assert await store.get("msteams/e:new") is None
    finally:
        await store.close()


async def test_a_second_erasure_waits_for_the_write_a_first_one_gave_up_on(
    azurite, unique_name, monkeypatch
):
    # Y's new 1:1 is still being indexed (held) when X is erased: X's erasure waits a while,
    # then goes on. Y's own erasure, next, must wait for it again and erase it.
    from shared.references import blob as blob_store

    monkeypatch.setattr(blob_store, "ERASURE_WAIT", 0.5)
    store = Gated(
        store_settings(azurite.connection_string, unique_name("second")), options=FAST_STORAGE
    )
    try:
        await store.upsert(reference("e:x", tenant="t1", user="29:x", aad="aad-x"))
        store.hold("_index")
        y = asyncio.ensure_future(
            store.upsert(reference("e:y", tenant="t1", user="29:y", aad="aad-y"))
        )
        await store.reached.wait()
        erased_x = await erase_user_data(
            channel_id="msteams",
            user_id="29:x",
            aad_object_id="aad-x",
            state=None,
            references=store,
        )
        assert erased_x.conversations == ["msteams/e:x"] and not y.done()
        asyncio.get_running_loop().call_later(0.2, store.gate.set)
        erased_y = await erase_user_data(
            channel_id="msteams",
            user_id="29:y",
            aad_object_id="aad-y",
            state=None,
            references=store,
        )
        assert await y is True
        assert erased_y.conversations == ["msteams/e:y"]
        assert await store.get("msteams/e:y") is None
    finally:
        await store.close()
