"""The repo-local Azurite starts on free ports, serves Blob and Queue, and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from tools.azurite import Azurite, ensure_resources, free_port

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


def test_data_on_disk_is_removed_on_stop_and_when_it_cannot_start():
    instance = Azurite(in_memory=False).start()
    folder = Path(instance.location)
    ensure_resources(instance.connection_string, ["queue-on-disk"], [])
    assert any(folder.iterdir())  # the data is on disk
    instance.stop()
    assert not folder.exists()

    # Its blob port taken: it is not started, and leaves no folder behind.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failed = Azurite(in_memory=False, blob_port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="taken"):
            failed.start()
    assert failed.process is None and not Path(failed.location).exists()


def test_the_command_keeps_data_in_a_folder_it_removes_on_stop():
    # In memory, Azurite's queue service pauses for seconds once a minute under steady
    # traffic (benchmarks/README.md, "Broadcast: Azurite's freezes"): the command keeps
    # its data on disk unless told otherwise.
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(
        [sys.executable, "-m", "tools.azurite"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as command:
        try:
            line = command.stdout.readline().strip()
            started = re.fullmatch(r"Azurite running: (\S+) \(data in (.+)\)", line)
            assert started, line
            folder = Path(started.group(2))
            ensure_resources(started.group(1), ["queue-of-the-command"], [])
            assert any(folder.iterdir())  # what it stored is in the folder
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command.pid, signal.SIGTERM)
            command.wait(timeout=30)
    assert command.returncode == 0
    assert not folder.exists()


# `python -m tools.azurite --default-ports`, with the default ports made these (tests never
# use the real ones: another run may hold them).
ON_PORTS = """
import sys
import tools.azurite as azurite
azurite.DEFAULT_PORTS = dict(blob=int(sys.argv[1]), queue=int(sys.argv[2]), table=int(sys.argv[3]))
sys.exit(azurite.main(["--default-ports"]))
"""


def command_on(ports: list[int], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    temporary = tmp_path / "tmp"  # where its data folder would be
    temporary.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", ON_PORTS, *map(str, ports)],
        cwd=root,
        env={**os.environ, "TMPDIR": str(temporary)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert list(temporary.iterdir()) == []  # no data folder left behind
    return result


def test_the_command_on_ports_another_azurite_answers_on_says_so(azurite, tmp_path):
    # Its own Azurite exited on the port clash, and it took the other one's answers for its
    # own: "Azurite running: ... (data in <its unused folder>)", exit 0.
    result = command_on([azurite.blob_port, azurite.queue_port, azurite.table_port], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"azurite: ports {azurite.blob_port} (blob), {azurite.queue_port} (queue), "
        f"{azurite.table_port} (table) taken: an Azurite already answers there: use it, or "
        "stop it first"
    ]


def test_the_command_on_a_port_another_program_holds_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = command_on([free_port(), port, free_port()], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"azurite: port {port} (queue) taken: another program holds it: stop it, or choose "
        "other ports"
    ]
