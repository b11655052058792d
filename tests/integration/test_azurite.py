"""The repo-local Azurite starts on free ports, serves Blob and Queue, and stops cleanly."""

from __future__ import annotations

import pytest
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from tools.azurite import Azurite, ensure_resources

pytestmark = pytest.mark.integration


def test_resources_are_created_and_usable(azurite, unique_name):
    queue, container = unique_name("q"), unique_name("c")
    ensure_resources(azurite.connection_string, [queue], [container])
    queues = {
        q.name
        for q in QueueServiceClient.from_connection_string(azurite.connection_string).list_queues()
    }
    assert {queue, f"{queue}-poison"} <= queues
    blob = BlobServiceClient.from_connection_string(azurite.connection_string)
    blob.get_blob_client(container, "x.json").upload_blob(b"{}")
    assert blob.get_blob_client(container, "x.json").download_blob().readall() == b"{}"


def test_stop_leaves_no_process():
    instance = Azurite().start()
    process = instance.process
    instance.stop()
    assert process is not None and process.poll() is not None
