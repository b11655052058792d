"""AzureWebJobsStorage → async Blob/Queue clients: connection strings, identity, clear errors."""

from __future__ import annotations

import logging

import pytest
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

from shared.config import SettingsError, StorageSettings
from shared.storage import (
    close_client,
    close_shared_clients,
    create_blob_service,
    create_queue_service,
    get_blob_service,
    get_queue_service,
)
from tests.fixtures.storage import thread_hops


def storage(**env: str) -> StorageSettings:
    return StorageSettings.from_env({f"AzureWebJobsStorage{k}": v for k, v in env.items()})


@pytest.mark.integration
async def test_connection_string_clients_reach_azurite(azurite, unique_name):
    settings = StorageSettings(connection_string=azurite.connection_string)
    blob, queue = create_blob_service(settings), create_queue_service(settings)
    try:
        container = blob.get_container_client(unique_name("c"))
        await container.create_container()
        await container.upload_blob("x.json", b"{}")
        assert await (await container.download_blob("x.json")).readall() == b"{}"
        queue_client = queue.get_queue_client(unique_name("q"))
        await queue_client.create_queue()
        await queue_client.send_message("hello")
        assert (await queue_client.get_queue_properties()).approximate_message_count == 1
    finally:
        await close_client(blob)
        await close_client(queue)


async def _thread_hops_of_one_read(settings: StorageSettings, container_name: str) -> int:
    """How many times one blob read hands work to a thread (aiohttp's netrc and proxy
    lookups when it trusts the environment: a thread wake-up each, on every call)."""
    blob = create_blob_service(settings)
    container = blob.get_container_client(container_name)
    try:
        await container.upload_blob("x.json", b"{}", overwrite=True)
        await (await container.download_blob("x.json")).readall()  # connection made
        with thread_hops() as submitted:
            await (await container.download_blob("x.json")).readall()
    finally:
        await close_client(blob)
    return submitted[0]


@pytest.mark.integration
async def test_a_warm_storage_call_makes_no_thread_hop(azurite, unique_name, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = StorageSettings(connection_string=azurite.connection_string)
    container = unique_name("c")
    blob = create_blob_service(settings)
    await blob.create_container(container)
    await close_client(blob)
    assert await _thread_hops_of_one_read(settings, container) == 0


@pytest.mark.integration
async def test_proxy_settings_in_the_environment_are_still_honoured(
    azurite, unique_name, monkeypatch
):
    # With a proxy configured the client reads the environment as before (here NO_PROXY
    # keeps loopback direct, so the call still reaches Azurite).
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    settings = StorageSettings(connection_string=azurite.connection_string)
    container = unique_name("c")
    blob = create_blob_service(settings)
    await blob.create_container(container)
    await close_client(blob)
    assert await _thread_hops_of_one_read(settings, container) > 0


@pytest.mark.integration
async def test_a_storage_call_logs_no_request_and_response_headers(azurite, unique_name, caplog):
    # The Functions worker passes INFO records on to the host: the storage SDK's HTTP logging
    # policy would log two multi-line header dumps per blob call, every call, every turn.
    caplog.set_level(logging.INFO)
    settings = StorageSettings(connection_string=azurite.connection_string)
    blob = create_blob_service(settings)
    try:
        await blob.create_container(unique_name("c"))
    finally:
        await close_client(blob)
    assert [r for r in caplog.records if r.name.startswith("azure.core")] == []


def test_a_level_set_for_the_sdk_http_log_is_kept():
    name = "azure.core.pipeline.policies.http_logging_policy"
    logging.getLogger(name).setLevel(logging.DEBUG)  # an operator asked for it
    try:
        create_blob_service(storage(**{"": "UseDevelopmentStorage=true"}))
        assert logging.getLogger(name).level == logging.DEBUG
    finally:
        logging.getLogger(name).setLevel(logging.NOTSET)


async def test_use_development_storage_points_at_local_azurite():
    settings = storage(**{"": "UseDevelopmentStorage=true"})
    blob, queue = create_blob_service(settings), create_queue_service(settings)
    assert blob.url.startswith("http://127.0.0.1:10000/devstoreaccount1")
    assert queue.url.startswith("http://127.0.0.1:10001/devstoreaccount1")
    await close_client(blob)
    await close_client(queue)


async def test_managed_identity_with_client_id():
    settings = storage(
        __accountName="botstore", __credential="managedidentity", __clientId="11111111-2222"
    )
    blob, queue = create_blob_service(settings), create_queue_service(settings)
    assert blob.url.startswith("https://botstore.blob.core.windows.net")
    assert queue.url.startswith("https://botstore.queue.core.windows.net")
    assert isinstance(blob.credential, ManagedIdentityCredential)
    await close_client(blob)
    await close_client(queue)


async def test_explicit_service_uris_and_default_credential():
    settings = storage(
        __blobServiceUri="https://custom.blob.example.net",
        __queueServiceUri="https://custom.queue.example.net",
    )
    blob, queue = create_blob_service(settings), create_queue_service(settings)
    assert blob.url.startswith("https://custom.blob.example.net")
    assert queue.url.startswith("https://custom.queue.example.net")
    assert isinstance(blob.credential, DefaultAzureCredential)
    await close_client(blob)
    await close_client(queue)


def test_missing_storage_names_the_setting():
    with pytest.raises(SettingsError) as info:
        create_blob_service(StorageSettings())
    assert info.value.setting == "AzureWebJobsStorage"


def test_missing_service_uri_names_the_setting():
    with pytest.raises(SettingsError) as info:
        create_blob_service(storage(__queueServiceUri="https://acct.queue.core.windows.net"))
    assert info.value.setting == "AzureWebJobsStorage__blobServiceUri"


def test_identity_over_plain_http_is_a_settings_error():
    with pytest.raises(SettingsError) as info:
        create_blob_service(storage(__blobServiceUri="http://127.0.0.1:10000/devstoreaccount1"))
    assert info.value.setting == "AzureWebJobsStorage__blobServiceUri"


def test_malformed_connection_string_does_not_echo_it():
    secret = "AccountName=x;AccountKey=c2VjcmV0LWtleQ==;garbage"
    with pytest.raises(SettingsError) as info:
        create_blob_service(StorageSettings(connection_string=secret))
    assert info.value.setting == "AzureWebJobsStorage"
    assert "c2VjcmV0" not in str(info.value)


async def test_shared_clients_are_one_per_loop_until_closed():
    settings = storage(**{"": "UseDevelopmentStorage=true"})
    first = get_blob_service(settings)
    assert get_blob_service(settings) is first
    assert get_queue_service(settings) is get_queue_service(settings)
    await close_shared_clients()
    again = get_blob_service(settings)
    assert again is not first
    await close_shared_clients()


@pytest.mark.integration
async def test_the_shared_clients_build_a_container_or_queue_client_once_per_name(
    azurite, unique_name, monkeypatch
):
    # Building a container or queue client costs more CPU than the request it then makes
    # (a new pipeline each time); the engine's bookkeeping asks for one on every call.
    from azure.storage.blob.aio import ContainerClient
    from azure.storage.queue import TextBase64EncodePolicy
    from azure.storage.queue.aio import QueueClient

    built: list[str] = []
    for cls in (ContainerClient, QueueClient):
        original = cls.__init__

        def counting(self, *args, _original=original, _name=cls.__name__, **kwargs):
            built.append(_name)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)  # the SDK's class, counted, not replaced
    settings = StorageSettings(connection_string=azurite.connection_string)
    container_name, queue_name, other = unique_name("c"), unique_name("q"), unique_name("c2")
    try:
        service = get_blob_service(settings)
        await service.get_container_client(container_name).create_container()
        for n in range(5):
            await service.get_container_client(container_name).upload_blob(f"{n}.json", b"{}")
        assert service.get_container_client(other) is not service.get_container_client(
            container_name
        )
        queues = get_queue_service(settings)
        await queues.get_queue_client(queue_name).create_queue()
        for n in range(3):
            client = queues.get_queue_client(
                queue_name, message_encode_policy=TextBase64EncodePolicy()
            )
            await client.send_message(f"m{n}")
        plain = queues.get_queue_client(queue_name)
        received = [m.content async for m in plain.receive_messages(messages_per_page=32)]
        names = [b.name async for b in service.get_container_client(container_name).list_blobs()]
    finally:
        await close_shared_clients()
    assert sorted(names) == [f"{n}.json" for n in range(5)]
    assert sorted(received) == [
        "bTA=",  # base64 of "m0": the encode policy was applied to every message
        "bTE=",
        "bTI=",
    ]
    # one container client per name, one queue client per (name, encoding)
    assert built.count("ContainerClient") == 2
    assert built.count("QueueClient") == 2


SIGNATURE = "sig=SECRET0123456789abcdef"


@pytest.fixture
async def gateway_naming_the_request():
    """A gateway in front of storage that answers 503 with the request's query (its SAS)
    as the error code header."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"x-ms-error-code": request.query_string})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield (
        f"BlobEndpoint=http://127.0.0.1:{port}/a;QueueEndpoint=http://127.0.0.1:{port}/a;"
        f"SharedAccessSignature=sv=2022-11-02&ss=bq&srt=sco&sp=rwdlacup&{SIGNATURE}"
    )
    await runner.cleanup()
    await close_shared_clients()


async def test_an_error_code_that_is_not_a_codes_name_is_never_shown(
    gateway_naming_the_request, caplog
):
    # The code (storage's x-ms-error-code) went into errors and logs as sent: a gateway
    # naming the failing request there put the SAS signature in them.
    from shared.config import Settings
    from shared.ledger import BlobLedger
    from shared.queues import QueueError, StorageQueue
    from shared.references import BlobReferenceStore, StoreError
    from tests.fixtures.storage import FAST_STORAGE

    settings = Settings(storage=StorageSettings(connection_string=gateway_naming_the_request))
    errors = []
    references = BlobReferenceStore(settings, options=FAST_STORAGE)
    for call in (
        lambda: BlobLedger(settings, options=FAST_STORAGE).read("proactive/x/head.json"),
        lambda: references.get("msteams/a:1"),
        lambda: StorageQueue(settings).put("{}"),
    ):
        with pytest.raises((StoreError, QueueError)) as raised:
            await call()
        errors.append(str(raised.value))
    await references.close()
    assert all("HTTP 503 UnrecognisedErrorCode" in error for error in errors), errors
    assert SIGNATURE not in " ".join(errors) + caplog.text
