"""Blob clients copied from a sibling (shared/blob_clients.py), on Azurite: a copy is laid
out as the storage SDK's own client of that name, and its requests reach that blob."""

from __future__ import annotations

import asyncio
import copy
import enum
import functools
import gc
import weakref

import pytest

from shared.blob_clients import BlobClients, sibling
from tests.fixtures.storage import sas_connection_string

pytestmark = pytest.mark.integration

# Names as the stores write them (percent-encoded segments) and ones they never write:
# characters the SDK quotes, non-ASCII, a name like the template's.
NAMES = [
    "refs/msteams/19%3Aa%40thread.tacv2.json",
    "proactive/r1/out/29%3Ab.json",
    "state/é ü 漢.json",
    "a b+c~d/e;f=g&h.json",
    "template.json.2",
]
PRIMITIVES = (str, bytes, int, float, bool, type(None), enum.Enum)


def cached_url_class():
    """A blob client class that keeps its URL once computed."""
    from azure.storage.blob.aio import BlobClient

    url = functools.cached_property(BlobClient.url.fget)
    return type("CachedUrl", (BlobClient,), {"url": url})


def shape(value, seen=None, depth=0):
    """What a client is made of, without object identities: primitives as they are, the
    storage SDK's and azure-core's objects attribute by attribute, anything else by type."""
    seen = set() if seen is None else seen
    if isinstance(value, PRIMITIVES):
        return value
    if isinstance(value, list | tuple):
        return [shape(item, seen, depth + 1) for item in value]
    if isinstance(value, dict):
        return {key: shape(item, seen, depth + 1) for key, item in value.items()}
    kind = type(value)
    if not kind.__module__.startswith("azure.") or id(value) in seen or depth > 6:
        return f"<{kind.__module__}.{kind.__qualname__}>"
    seen.add(id(value))
    fields = getattr(value, "__dict__", {})
    return (kind.__qualname__, {key: shape(item, seen, depth + 1) for key, item in fields.items()})


@pytest.fixture
async def container(azurite, unique_name):
    from azure.storage.blob.aio import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(unique_name("clients"))
    await client.create_container()
    try:
        yield client
    finally:
        await service.close()


async def test_a_copy_is_laid_out_as_the_sdk_builds_that_blobs_client(container):
    template = container.get_blob_client("template.json")
    for name in NAMES:
        made = sibling(template, name)
        built = container.get_blob_client(name)
        assert made is not None
        assert made.url == built.url
        assert made._client._config.url == built.url
        assert made._client.block_blob._config.url == built.url
        assert shape(made) == shape(built)
        assert shape(template) != shape(built)  # the comparison sees the name
    assert template.blob_name == "template.json"  # the template is left as it was
    assert template._client._config.url.endswith("/template.json")


async def test_copies_write_read_and_delete_their_own_blobs(container):
    template = container.get_blob_client("template.json")
    await template.upload_blob(b"template")
    copies = [sibling(template, name) for name in NAMES]
    for index, blob in enumerate(copies):
        await blob.upload_blob(f"body {index}".encode(), metadata={"n": str(index)})
    listed = {b.name: b async for b in container.list_blobs(include=["metadata"])}
    assert sorted(listed) == sorted([*NAMES, "template.json"])
    for index, name in enumerate(NAMES):
        body = await (await container.get_blob_client(name).download_blob()).readall()
        assert body == f"body {index}".encode()
        assert listed[name].metadata == {"n": str(index)}
        downloaded = await copies[index].download_blob()
        assert await downloaded.readall() == body
        assert downloaded.properties.name == name
    await copies[0].delete_blob()
    remaining = [b.name async for b in container.list_blobs()]
    assert NAMES[0] not in remaining and "template.json" in remaining
    assert await (await template.download_blob()).readall() == b"template"


async def test_a_client_laid_out_otherwise_is_not_copied(container):
    template = container.get_blob_client("template.json")
    assert sibling(template, "") is None
    snapshot = container.get_blob_client("t.json", snapshot="2024-01-01T00:00:00Z")
    assert sibling(snapshot, "x") is None
    assert sibling(object(), "x") is None  # type: ignore[arg-type]
    # An operation group with a configuration of its own: its URL would stay the template's.
    odd = container.get_blob_client("template.json")
    odd._client.blob._config = copy.copy(odd._client._config)
    assert sibling(odd, "x") is None
    odd = container.get_blob_client("template.json")
    odd._client._client._base_url = "http://elsewhere/"
    assert sibling(odd, "x") is None
    # A part the generated client did not have (a new operation group, say).
    odd = container.get_blob_client("template.json")
    odd._client.blob_v2 = copy.copy(odd._client.blob)
    assert sibling(odd, "x") is None
    # A client that keeps its URL once computed (here a subclass caching it).
    odd = container.get_blob_client("template.json")
    odd.__class__ = cached_url_class()
    assert odd.url.endswith("/template.json")
    assert sibling(odd, "x") is None


async def test_the_sdk_builds_what_cannot_be_copied(container):
    clients = BlobClients(4)
    first = clients.get(container, "one.json")
    first._client.blob._config = copy.copy(first._client._config)  # no longer copyable
    second = clients.get(container, "two.json")
    assert shape(second) == shape(container.get_blob_client("two.json"))
    await second.upload_blob(b"2")
    assert [b.name async for b in container.list_blobs()] == ["two.json"]


async def test_a_container_changed_since_the_template_gets_the_sdks_clients(container):
    clients = BlobClients(4)
    clients.get(container, "one.json")
    container.require_encryption = True  # what get_blob_client hands each new client
    try:
        two = clients.get(container, "two.json")
        assert two.require_encryption is True
        assert shape(two) == shape(container.get_blob_client("two.json"))
    finally:
        container.require_encryption = False


async def test_copies_at_work_at_once_keep_to_their_own_blobs(container):
    clients = BlobClients(64)
    names = [f"at-once/{index} é%3A.json" for index in range(40)]

    async def round_trip(name):
        blob = clients.get(container, name)
        await blob.upload_blob(name.encode())
        return await (await blob.download_blob()).readall()

    assert await asyncio.gather(*(round_trip(name) for name in names)) == [
        name.encode() for name in names
    ]
    assert sorted([b.name async for b in container.list_blobs()]) == sorted(names)


async def test_every_cache_of_a_container_copies_its_one_template(container, azurite):
    # An engine and its ledger are made per queue message: their caches share templates.
    from azure.storage.blob.aio import BlobServiceClient

    one = BlobClients(4).get(container, "one.json")
    two = BlobClients(4).get(container, "two.json")
    assert two._client._serialize is one._client._serialize
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    gone = service.get_container_client(container.container_name)
    BlobClients(4).get(gone, "three.json")
    dropped = weakref.ref(gone)
    del gone
    gc.collect()
    assert dropped() is None  # a template does not keep its container's client alive
    await service.close()


async def test_clients_are_kept_per_name_and_dropped_with_their_container(container, azurite):
    from azure.storage.blob.aio import BlobServiceClient

    clients = BlobClients(2)
    one = clients.get(container, "one.json")
    assert clients.get(container, "one.json") is one
    two = clients.get(container, "two.json")
    assert two._client._serialize is one._client._serialize  # copied, not built again
    assert clients.get(container, "one.json") is one  # used last: "two" goes first
    clients.get(container, "three.json")
    assert clients.get(container, "two.json") is not two
    assert shape(clients.get(container, "two.json")) == shape(two)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    try:
        other = service.get_container_client(container.container_name)
        moved = clients.get(other, "one.json")
        assert moved is not one
        assert moved._pipeline is not one._pipeline  # the new container's own pipeline
        await moved.upload_blob(b"1")
        assert await (await one.download_blob()).readall() == b"1"
    finally:
        await service.close()


def transport_of(client):
    """The aiohttp transport a client's requests leave through (under the SDK's wrappers)."""
    transport = client._pipeline._transport
    while hasattr(transport, "_transport"):
        transport = transport._transport
    return transport


async def test_a_template_serves_its_own_container_client_only(azurite, unique_name):
    # With a SAS connection string the container's settings carry no credential, so two
    # services' clients of one container look alike: only the client itself tells them
    # apart (a copy through another's template would use that service's connections,
    # maybe a closed event loop's).
    from azure.storage.blob.aio import BlobServiceClient

    sas = sas_connection_string(azurite, "rwdlac")
    name = unique_name("own")
    first, second = (BlobServiceClient.from_connection_string(sas) for _ in range(2))
    try:
        await first.create_container(name)
        one, two = first.get_container_client(name), second.get_container_client(name)
        template = weakref.ref(BlobClients(4).get(one, "a.json"))
        BlobClients(4).get(two, "b.json")
        copy = BlobClients(4).get(two, "c.json")
        assert transport_of(copy) is transport_of(second)
        await copy.upload_blob(b"c")
        del one
        gc.collect()
        assert template() is None  # the template goes with its container's client
    finally:
        await first.close()
        await second.close()


async def test_a_cache_given_another_container_client_drops_its_names(azurite, unique_name):
    from azure.storage.blob.aio import BlobServiceClient

    name = unique_name("drop")
    first, second = (
        BlobServiceClient.from_connection_string(azurite.connection_string) for _ in range(2)
    )
    try:
        clients = BlobClients(4)
        one = clients.get(first.get_container_client(name), "one.json")
        again = clients.get(second.get_container_client(name), "one.json")
        assert again is not one
        assert transport_of(again) is transport_of(second)
    finally:
        await first.close()
        await second.close()
