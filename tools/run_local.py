"""`make run`: the bot on http://127.0.0.1:7071 with Azurite on its default ports.

Creates `local.settings.json` from the example on first run, starts the repo's Azurite
(unless one already answers on the default ports), creates the bot's queues and
container, then runs `func start` when Azure Functions Core Tools are on PATH and the
repo's own host (`tools/devhost`) otherwise. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

from tools.azurite import DEFAULT_PORTS, ROOT, Azurite, connection_string, ensure_resources

PORT = 7071


def load_settings() -> dict[str, str]:
    settings_file = ROOT / "local.settings.json"
    if not settings_file.exists():
        shutil.copyfile(ROOT / "local.settings.example.json", settings_file)
        print("created local.settings.json from local.settings.example.json", flush=True)
    return json.loads(settings_file.read_text()).get("Values", {})


def answering(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    values = load_settings()
    azurite = None
    if answering(DEFAULT_PORTS["blob"]) and answering(DEFAULT_PORTS["queue"]):
        print("using the Azurite already running on the default ports", flush=True)
    else:
        data = ROOT / ".tools" / "azurite-data"
        data.mkdir(parents=True, exist_ok=True)
        azurite = Azurite(
            blob_port=DEFAULT_PORTS["blob"],
            queue_port=DEFAULT_PORTS["queue"],
            table_port=DEFAULT_PORTS["table"],
            location=str(data),
            in_memory=False,
        ).start()
        print("Azurite started on ports 10000 (blob) and 10001 (queue)", flush=True)
    try:
        if values.get("AzureWebJobsStorage", "").strip() == "UseDevelopmentStorage=true":
            ensure_resources(
                connection_string(DEFAULT_PORTS["blob"], DEFAULT_PORTS["queue"]),
                [values.get("BOT_PROACTIVE_QUEUE") or "proactive-messages"],
                [values.get("BOT_REFERENCES_CONTAINER") or "conversation-references"],
            )
        if shutil.which("func"):
            command = ["func", "start", "--port", str(PORT)]
        else:
            command = [sys.executable, "-m", "tools.devhost", "--port", str(PORT)]
        host = subprocess.Popen(command, cwd=ROOT)
        signal.signal(signal.SIGTERM, lambda *_: host.terminate())
        try:
            return host.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the host too (same process group): let it shut down cleanly.
            try:
                return host.wait(timeout=20)
            except subprocess.TimeoutExpired:
                host.kill()
                return host.wait()
    finally:
        if azurite is not None:
            azurite.stop()


if __name__ == "__main__":
    sys.exit(main())
