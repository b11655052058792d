"""Start and stop the repo-local Azurite (Blob + Queue storage emulator).

`make setup` installs Azurite with npm into `.tools/azurite`; this module runs it,
on free ports for tests or the default ports for `make run`, waits until both
services answer, and creates the bot's queues and container.

    python -m tools.azurite [--default-ports] [--location DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite"

# Azurite's documented, public development account (not a secret: every emulator has it).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
DEFAULT_PORTS = {"blob": 10000, "queue": 10001, "table": 10002}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connection_string(blob_port: int, queue_port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{blob_port}/{ACCOUNT};"
        f"QueueEndpoint=http://127.0.0.1:{queue_port}/{ACCOUNT};"
    )


class Azurite:
    """One Azurite process (blob, queue and table services)."""

    def __init__(
        self,
        *,
        blob_port: int | None = None,
        queue_port: int | None = None,
        table_port: int | None = None,
        location: str | None = None,
        in_memory: bool = True,
    ) -> None:
        self.blob_port = blob_port or free_port()
        self.queue_port = queue_port or free_port()
        self.table_port = table_port or free_port()
        self.in_memory = in_memory
        self._own_location = location is None and not in_memory
        self.location = location or ("" if in_memory else tempfile.mkdtemp(prefix="azurite-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port)

    def start(self, timeout: float = 30.0) -> Azurite:
        if not AZURITE_BIN.exists():
            raise RuntimeError("Azurite is not installed: run `make setup` first")
        args = [
            str(AZURITE_BIN),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",  # no traffic beyond loopback
            "--disableProductStyleUrl",
            "--blobHost",
            "127.0.0.1",
            "--queueHost",
            "127.0.0.1",
            "--tableHost",
            "127.0.0.1",
            "--blobPort",
            str(self.blob_port),
            "--queuePort",
            str(self.queue_port),
            "--tablePort",
            str(self.table_port),
        ]
        # Azurite refuses --location together with --inMemoryPersistence.
        args += ["--inMemoryPersistence"] if self.in_memory else ["--location", self.location]
        # A new session, so stopping Azurite also stops node's children.
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Azurite exited with code {self.process.returncode}")
            if _listening(self.blob_port) and _listening(self.queue_port):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Azurite did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                # Azurite can linger on open keep-alive connections; in-memory data has
                # nothing to flush, so it gets a short grace period.
                self.process.wait(timeout=3 if self.in_memory else 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        if self._own_location:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ensure_resources(conn_str: str, queues: list[str], containers: list[str]) -> None:
    """Create queues (and their `-poison` twins) and containers if they do not exist."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

    queue_service = QueueServiceClient.from_connection_string(conn_str)
    for name in queues:
        for queue in (name, f"{name}-poison"):
            with contextlib.suppress(ResourceExistsError):
                queue_service.create_queue(queue)
    blob_service = BlobServiceClient.from_connection_string(conn_str)
    for name in containers:
        with contextlib.suppress(ResourceExistsError):
            blob_service.create_container(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the repo-local Azurite")
    parser.add_argument("--default-ports", action="store_true", help="10000/10001/10002")
    parser.add_argument("--location", help="data folder (default: in memory)")
    args = parser.parse_args(argv)
    ports = DEFAULT_PORTS if args.default_ports else {}
    azurite = Azurite(
        blob_port=ports.get("blob"),
        queue_port=ports.get("queue"),
        table_port=ports.get("table"),
        location=args.location,
        in_memory=args.location is None,
    )
    azurite.start()
    print(f"Azurite running: {azurite.connection_string}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while azurite.process and azurite.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        azurite.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
