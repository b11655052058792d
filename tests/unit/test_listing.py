"""A page of a Blob prefix listing (shared/listing.py), on Azurite: what the stores read of
each blob is what the storage SDK's own `list_blobs` gives, page for page."""

from __future__ import annotations

import asyncio

import pytest
from azure.core.exceptions import ResourceNotFoundError

from shared import listing
from shared.ledger import BlobLedger
from shared.storage import unreadable_answer
from tests.fixtures.storage import ANSWER_TEXT, UNREADABLE_ANSWERS, unreadable_storage

pytestmark = pytest.mark.integration

# Names as the stores write them (segments percent-encoded) and some no store writes:
# non-ASCII, spaces, a tab. (A character XML 1.0 cannot carry is listed encoded: Azurite
# cannot list one, so that listing is served by hand below.)
NAMES = [
    "proactive/r1/out/19%3Aa%40thread.tacv2.json",
    "proactive/r1/out/29%3Ab.json",
    "proactive/r1/dup/0f.json",
    "proactive/r1/claim/fan-out.json",
    "proactive/r1/out/é ü 漢.json",
    "proactive/r1/out/tab\there.json",
    "proactive/r1/started.json",
]
METADATA = [
    {"outcome": "delivered", "target": "MTk6YUB0aHJlYWQ="},
    {"claim": "1733500000.5", "Mixed": "Case"},
    {},
    {"claim": "x"},
    {"outcome": "failed", "reason": "cmVhc29u", "target": "w6k="},
    {"outcome": "pruned"},
    {"at": ""},
]


@pytest.fixture
async def container(azurite, unique_name):
    from azure.storage.blob.aio import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(unique_name("list"))
    await client.create_container()
    for index, (name, metadata) in enumerate(zip(NAMES, METADATA, strict=True)):
        await client.upload_blob(name, b"x" * index, metadata=metadata)
    await client.upload_blob("proactive/r2/out/other.json", b"{}", metadata={"outcome": "x"})
    try:
        yield client
    finally:
        await service.close()


async def every_page(read, container, prefix, size):
    pages, marker = [], None
    while True:
        blobs, marker = await read(container, prefix, marker, size)
        pages.append(blobs)
        if marker is None:
            return pages


@pytest.mark.parametrize("size", [2, 3, 5000])
async def test_a_listing_reads_what_the_sdk_lists_page_for_page(container, size):
    pages = await every_page(listing.page, container, "proactive/r1/", size)
    through_sdk = await every_page(listing._sdk_page, container, "proactive/r1/", size)
    assert pages == through_sdk
    assert len(pages) == -(-len(NAMES) // size)
    blobs = [blob for page in pages for blob in page]
    assert sorted(blob.name for blob in blobs) == sorted(NAMES)  # r2 is not under the prefix
    for blob in blobs:
        index = NAMES.index(blob.name)
        assert blob.metadata == METADATA[index]
        assert blob.size == index
        assert blob.etag and blob.modified > 1.7e9


async def test_a_page_continues_from_the_marker_the_one_before_gave(container):
    first, marker = await listing.page(container, "proactive/r1/", None, 4)
    rest, end = await listing.page(container, "proactive/r1/", marker, 4)
    assert (len(first), len(rest), end) == (4, 3, None)
    assert not {blob.name for blob in first} & {blob.name for blob in rest}


async def test_a_prefix_with_nothing_under_it_is_one_empty_last_page(container):
    assert await listing.page(container, "nothing/", None, 10) == ([], None)


async def test_a_missing_container_raises_what_the_sdk_raises(azurite, unique_name):
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        gone = service.get_container_client(unique_name("never"))
        for read in (listing.page, listing._sdk_page):
            with pytest.raises(ResourceNotFoundError):
                await read(gone, "proactive/", None, 10)


async def test_a_container_lists_through_one_kept_client(container):
    await listing.page(container, "proactive/", None, 10)
    kept = listing._RAW_CLIENTS[container]
    await asyncio.gather(*(listing.page(container, "proactive/", None, 10) for _ in range(3)))
    assert listing._RAW_CLIENTS[container] is kept


# Valid XML that is no listing, or a listing without what a blob must have.
NOT_LISTINGS = {
    "another XML document": ("application/xml", b"<?xml version='1.0'?><Other><Blobs/></Other>"),
    "a blob without a name": (
        "application/xml",
        b"<?xml version='1.0'?><EnumerationResults><Blobs><Blob><Properties/></Blob>"
        b"</Blobs></EnumerationResults>",
    ),
    "a date that is none": (
        "application/xml",
        b"<?xml version='1.0'?><EnumerationResults><Blobs><Blob><Name>n</Name><Properties>"
        b"<Last-Modified>" + ANSWER_TEXT.encode() + b"</Last-Modified></Properties></Blob>"
        b"</Blobs></EnumerationResults>",
    ),
}


@pytest.mark.parametrize("answer", [*UNREADABLE_ANSWERS, *NOT_LISTINGS])
async def test_an_answer_that_is_not_a_listing_is_read_as_unreadable(answer, monkeypatch):
    from azure.storage.blob.aio import BlobServiceClient

    from tests.fixtures import storage as fixtures

    monkeypatch.setattr(fixtures, "UNREADABLE_ANSWERS", {**UNREADABLE_ANSWERS, **NOT_LISTINGS})
    async with (
        unreadable_storage(answer) as fake,
        BlobServiceClient.from_connection_string(fake.connection_string) as service,
    ):
        with pytest.raises(Exception) as raised:
            await listing.page(service.get_container_client("c"), "p/", None, 10)
    # The stores' guards turn it into their own error, without its text (test_ledger.py,
    # test_references.py): what matters here is that they can tell it for what it is.
    assert unreadable_answer(raised.value)


ENCODED_NAME_LISTING = (
    "application/xml",
    b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="c">'
    b"<Prefix>p/</Prefix><MaxResults>10</MaxResults><Blobs>"
    b'<Blob><Name Encoded="true">p/out/ctl%01x%20y.json</Name><Properties>'
    b"<Last-Modified>Sun, 06 Dec 2026 10:00:00 GMT</Last-Modified><Etag>0x8DD1</Etag>"
    b"<Content-Length>3</Content-Length><BlobType>BlockBlob</BlobType></Properties>"
    b"<Metadata><outcome>delivered</outcome></Metadata></Blob>"
    b"<Blob><Name>p/out/plain.json</Name><Properties>"
    b"<Last-Modified>Sun, 06 Dec 2026 10:00:01 GMT</Last-Modified><Etag>0x8DD2</Etag>"
    b"<Content-Length>2</Content-Length><BlobType>BlockBlob</BlobType></Properties></Blob>"
    b"</Blobs><NextMarker /></EnumerationResults>",
)


async def test_a_name_listed_encoded_is_read_as_the_sdk_reads_it(monkeypatch):
    # Azure lists a name holding a character XML 1.0 cannot carry percent-encoded, marked
    # Encoded="true": the name read is the blob's own, as the SDK's listing gives it.
    from azure.storage.blob.aio import BlobServiceClient

    from tests.fixtures import storage as fixtures

    monkeypatch.setattr(fixtures, "UNREADABLE_ANSWERS", {"encoded": ENCODED_NAME_LISTING})
    async with (
        unreadable_storage("encoded") as fake,
        BlobServiceClient.from_connection_string(fake.connection_string) as service,
    ):
        container = service.get_container_client("c")
        blobs, marker = await listing.page(container, "p/", None, 10)
        through_sdk, _ = await listing._sdk_page(container, "p/", None, 10)
    assert marker is None and blobs == through_sdk
    assert [blob.name for blob in blobs] == ["p/out/ctl\x01x y.json", "p/out/plain.json"]
    assert [blob.metadata for blob in blobs] == [{"outcome": "delivered"}, {}]


async def test_the_ledger_lists_a_report_across_pages(azurite, unique_name):
    from shared.config import Settings, StorageSettings

    settings = Settings(
        storage=StorageSettings(connection_string=azurite.connection_string),
        references_container=unique_name("ledger"),
    )
    ledger = BlobLedger(settings, page_size=2)
    for n in range(5):
        await ledger.create(f"proactive/r/out/{n}.json", {"n": n}, metadata={"outcome": "x"})
    entries = [entry async for entry in ledger.list("proactive/r/")]
    assert [entry.name for entry in entries] == [f"proactive/r/out/{n}.json" for n in range(5)]
    assert all(entry.metadata == {"outcome": "x"} and entry.size > 0 for entry in entries)
