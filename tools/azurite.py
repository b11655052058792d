"""Start and stop the repo-local Azurite (Blob + Queue storage emulator).

`make setup` installs Azurite with npm into `.tools/azurite`; this module runs it,
on free ports for tests or the default ports for `make run`, waits until both
services answer, and creates the bot's queues and container.

With a certificate it serves HTTPS, and with ``oauth=True`` also accepts bearer tokens
(Azurite's ``--oauth basic``: it checks a token's issuer, audience and lifetime, not its
signature), so identity-based clients (``AzureWebJobsStorage__blobServiceUri`` +
``__credential=managedidentity``) can be run against it. Azurite accepts OAuth only over
HTTPS.

    python -m tools.azurite [--default-ports] [--location DIR] [--cert PEM --key PEM [--oauth]]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
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


def connection_string(blob_port: int, queue_port: int, scheme: str = "http") -> str:
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint={service_url(blob_port, scheme)};"
        f"QueueEndpoint={service_url(queue_port, scheme)};"
    )


def service_url(port: int, scheme: str = "http") -> str:
    """The account's endpoint on one service port (path-style, as Azurite serves it)."""
    return f"{scheme}://127.0.0.1:{port}/{ACCOUNT}"


class Azurite:
    """One Azurite process (blob, queue and table services).

    ``cert_path`` + ``key_path`` (PEM files) make it serve HTTPS; ``oauth=True`` (needs the
    certificate) makes it accept bearer tokens too, besides the account key.
    """

    def __init__(
        self,
        *,
        blob_port: int | None = None,
        queue_port: int | None = None,
        table_port: int | None = None,
        location: str | None = None,
        in_memory: bool = True,
        cert_path: str | None = None,
        key_path: str | None = None,
        oauth: bool = False,
    ) -> None:
        if bool(cert_path) != bool(key_path):
            raise ValueError("Azurite needs both cert_path and key_path for HTTPS")
        if oauth and not cert_path:
            raise ValueError("Azurite accepts OAuth only over HTTPS: give cert_path and key_path")
        self.blob_port = blob_port or free_port()
        self.queue_port = queue_port or free_port()
        self.table_port = table_port or free_port()
        self.in_memory = in_memory
        self._own_location = location is None and not in_memory
        self.location = location or ("" if in_memory else tempfile.mkdtemp(prefix="azurite-"))
        self.cert_path = cert_path
        self.key_path = key_path
        self.oauth = oauth
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.cert_path else "http"

    @property
    def blob_url(self) -> str:
        return service_url(self.blob_port, self.scheme)

    @property
    def queue_url(self) -> str:
        return service_url(self.queue_port, self.scheme)

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.scheme)

    @property
    def ports(self) -> dict[str, int]:
        return {"blob": self.blob_port, "queue": self.queue_port, "table": self.table_port}

    def start(self, timeout: float = 30.0) -> Azurite:
        if not AZURITE_BIN.exists():
            self.stop()  # removes a temporary folder of its own
            raise RuntimeError("Azurite is not installed: run `make setup` first")
        # Azurite exits when a port is taken, but what holds it answers all the same: it
        # would pass for this one.
        taken = {service: port for service, port in self.ports.items() if port_in_use(port)}
        if taken:
            self.stop()
            raise PortsTaken(taken)
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
        if self.cert_path:
            args += ["--cert", self.cert_path, "--key", str(self.key_path)]
        if self.oauth:
            args += ["--oauth", "basic"]
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
                code = self.process.returncode
                self.stop()  # removes a temporary folder of its own
                raise RuntimeError(f"Azurite exited with code {code}")
            if listening(self.blob_port) and listening(self.queue_port):
                time.sleep(0.1)  # taken meanwhile: its process exits at once
                if self.process.poll() is None:
                    return self
                continue
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


class PortsTaken(RuntimeError):
    """Ports an Azurite was to listen on are taken; says by what, when it is an Azurite."""

    def __init__(self, taken: dict[str, int]) -> None:
        self.taken = taken
        named = ", ".join(f"{port} ({service})" for service, port in taken.items())
        ports = "port" if len(taken) == 1 else "ports"
        answering = [port for service, port in taken.items() if service != "table"]
        if answering and all(answers_as_azurite(port) for port in answering):
            why = "an Azurite already answers there: use it, or stop it first"
        else:
            held = "it" if len(taken) == 1 else "them"
            why = f"another program holds {held}: stop it, or choose other ports"
        super().__init__(f"{ports} {named} taken: {why}")


def port_in_use(port: int) -> bool:
    """True when something answers on 127.0.0.1:port or a listener could not bind it."""
    with socket.socket() as probe:
        probe.settimeout(0.2)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def answers_as_azurite(port: int) -> bool:
    """True when an HTTP request to the port gets Azurite's `Server` header back."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        return "azurite" in (connection.getresponse().getheader("Server") or "").lower()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Retries for a local emulator: a few seconds, not the SDK's 15 s backoff (over a minute).
LOCAL_RETRY = {
    "retry_total": 3,
    "initial_backoff": 0.5,
    "increment_base": 1,
    "random_jitter_range": 0.5,
}


def too_old(error: BaseException) -> bool:
    """Whether a storage error is an Azurite older than the storage SDK refusing the
    SDK's API version (`InvalidHeaderValue` on `x-ms-version`): an Azurite installed
    elsewhere (an editor extension, a global npm install, an old image)."""
    code = getattr(error, "error_code", None)
    code = str(getattr(code, "value", code) or "")  # the SDK's enum, or the code itself
    return code == "InvalidHeaderValue" and "API version" in str(
        getattr(error, "message", "") or ""
    )


TOO_OLD = (
    "the Azurite there is older than the storage SDK (it refuses its API version): stop it, "
    "so that `make run` starts the repo's own, or upgrade it"
)


def ensure_resources(conn_str: str, queues: list[str], containers: list[str]) -> None:
    """Create queues (and their `-poison` twins, where the name fits Azure's 63 characters:
    the host then has none) and containers if they do not exist."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

    queue_service = QueueServiceClient.from_connection_string(conn_str, **LOCAL_RETRY)
    for name in queues:
        poison = f"{name}-poison"
        for queue in (name, poison) if len(poison) <= 63 else (name,):
            with contextlib.suppress(ResourceExistsError):
                queue_service.create_queue(queue)
    blob_service = BlobServiceClient.from_connection_string(conn_str, **LOCAL_RETRY)
    for name in containers:
        with contextlib.suppress(ResourceExistsError):
            blob_service.create_container(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.azurite", description="Run the repo-local Azurite"
    )
    parser.add_argument("--default-ports", action="store_true", help="10000/10001/10002")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--location", help="data folder, kept (default: a temporary one, removed on stop)"
    )
    where.add_argument(
        "--in-memory",
        action="store_true",
        help="no data folder (its queue service pauses for seconds once a minute under load)",
    )
    parser.add_argument("--cert", help="PEM certificate: serve HTTPS (needs --key)")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--oauth", action="store_true", help="accept bearer tokens (HTTPS only)")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key) or (args.oauth and not args.cert):
        parser.error("--cert and --key go together, and --oauth needs them")
    ports = DEFAULT_PORTS if args.default_ports else {}
    azurite = Azurite(
        blob_port=ports.get("blob"),
        queue_port=ports.get("queue"),
        table_port=ports.get("table"),
        location=args.location,
        in_memory=args.in_memory,
        cert_path=args.cert,
        key_path=args.key,
        oauth=args.oauth,
    )
    try:
        azurite.start()
    except RuntimeError as error:  # its ports taken, not installed, exited, too slow
        print(f"azurite: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:
        azurite.stop()
        print(
            f"azurite: Azurite could not be run ({type(error).__name__}): is Node.js installed?",
            file=sys.stderr,
            flush=True,
        )
        return 1
    data = "in memory" if azurite.in_memory else f"data in {azurite.location}"
    print(f"Azurite running: {azurite.connection_string} ({data})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while azurite.process and azurite.process.poll() is None:
            time.sleep(0.5)
        code = azurite.process.returncode if azurite.process else None
        print(f"azurite: Azurite exited with code {code}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
