"""`make run` (tools/run_local.py): starts Azurite and the bot, stops both, explains busy ports.

Each test runs `python -m tools.run_local` as a user's `make run` would, but on free ports,
with its own settings file and Azurite data folder (the repo's are never touched), and
with the repo's host (`--devhost`) even where Core Tools are installed.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from tests.fixtures.devhost import free_port
from tools.azurite import AZURITE_BIN, connection_string
from tools.azurite import listening as accepts_connections

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not AZURITE_BIN.exists(), reason="Azurite is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
STARTED = "Host started on"  # the devhost's last startup line
START_TIMEOUT = 60.0
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


class RunLocal:
    """One `python -m tools.run_local` in its own session (so Ctrl-C can be sent to it)."""

    def __init__(
        self,
        tmp_path: Path,
        settings_text: str | None = None,
        env: dict[str, str] | None = None,
        **ports: int,
    ) -> None:
        self.ports = {
            "port": free_port(),
            "blob": free_port(),
            "queue": free_port(),
            "table": free_port(),
        }
        self.ports.update(ports)
        self.queue = f"proactive-{uuid.uuid4().hex[:10]}"
        self.container = f"refs-{uuid.uuid4().hex[:10]}"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.data = tmp_path / "azurite-data"
        self.settings = tmp_path / "local.settings.json"
        example = json.loads((ROOT / "local.settings.example.json").read_text())
        example["Values"].update(
            BOT_PROACTIVE_QUEUE=self.queue, BOT_REFERENCES_CONTAINER=self.container
        )
        self.settings.write_text(settings_text or json.dumps(example))
        self._out = tmp_path / "run_local.out"
        self._err = tmp_path / "run_local.err"
        args = [
            sys.executable,
            "-m",
            "tools.run_local",
            "--devhost",
            "--port",
            str(self.ports["port"]),
            "--blob-port",
            str(self.ports["blob"]),
            "--queue-port",
            str(self.ports["queue"]),
            "--table-port",
            str(self.ports["table"]),
            "--settings",
            str(self.settings),
            "--data",
            str(self.data),
        ]
        extra_env = env or {}
        env = {k: os.environ[k] for k in INHERITED if k in os.environ}
        # Containers often carry a name the Functions host takes for Azure's: `make run` is
        # local all the same, so the bot must still start in local unauthenticated mode.
        env["CONTAINER_NAME"] = "dev-container"
        env.update(extra_env)
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
                # As a shell without job control starts a command run in the background
                # (`make run &` in a script): with SIGINT ignored, which `kill -INT` and
                # Ctrl-C must still stop.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
            )

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED not in self.stdout:
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"make run did not start:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.1)

    def wait(self, timeout: float = 40.0) -> int:
        return self.process.wait(timeout=timeout)

    def left_behind(self) -> list[str]:
        """Processes still running that this run started (Azurite by its data folder)."""
        marks = (str(self.data), f"--port {self.ports['port']}")
        return [line for line in _command_lines() if any(mark in line for mark in marks)]

    def kill(self) -> None:
        """Last resort after a failed test: nothing may outlive it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        for line in self.left_behind():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


def _command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text:
            lines.append(f"{cmdline.parent.name} {text}")
    return lines


@contextlib.contextmanager
def listening() -> Iterator[int]:
    """A port some other program holds: it accepts connections and never answers."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.fixture
def make_run(tmp_path) -> Iterator[Callable[..., RunLocal]]:
    started: list[RunLocal] = []

    def start(
        settings_text: str | None = None, env: dict[str, str] | None = None, **ports: int
    ) -> RunLocal:
        run = RunLocal(tmp_path / str(len(started)), settings_text, env, **ports)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


def wait_for_line(run: RunLocal, start: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in run.stdout.splitlines():
            if line.startswith(start):
                return line
        time.sleep(0.1)
    pytest.fail(f"no line starting {start!r}:\n{run.stdout}")


def post_status(port: int, path: str, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "SIGINT to it alone"])
def test_make_run_serves_the_bot_with_storage_and_stops_everything(make_run, stop):
    run = make_run()
    run.wait_started()
    ports = run.ports
    # One line says the bot is ready and what to do next.
    ready = wait_for_line(run, "Ready: ")
    assert f"http://127.0.0.1:{ports['port']}/api/messages" in ready
    # On another port than make's, the commands that reach this bot, not make's.
    url = f"http://127.0.0.1:{ports['port']}/api/messages"
    if ports["port"] == 7071:
        assert "`make chat`" in ready and "`make playground`" in ready
    else:
        assert f"tools.botsim chat --bot {url}`" in ready
        assert f"tools.playground --bot {url}`" in ready
    # It ends the start-up: after the host's list of functions, not lost above it.
    lines = run.stdout.splitlines()
    assert lines.index(ready) > min(i for i, line in enumerate(lines) if line.startswith(STARTED))

    # The bot answers on its port: an object that is not an activity is its 400.
    assert post_status(ports["port"], "/api/messages", b"{}") == 400
    # Azurite runs on the given ports, with the bot's queues and container created.
    conn_str = connection_string(ports["blob"], ports["queue"])
    with QueueServiceClient.from_connection_string(conn_str) as queues:
        names = {queue.name for queue in queues.list_queues()}
    assert {run.queue, f"{run.queue}-poison"} <= names
    with BlobServiceClient.from_connection_string(conn_str) as blobs:
        assert blobs.get_container_client(run.container).exists()
    assert any(run.data.iterdir())  # Azurite keeps its data in the folder it was given

    if stop == "SIGTERM":
        run.process.send_signal(signal.SIGTERM)
    elif stop == "Ctrl-C":  # the terminal sends SIGINT to the whole foreground process group
        os.killpg(run.process.pid, signal.SIGINT)
    else:  # `kill -INT`, a supervisor: the host hears of it only through run_local
        run.process.send_signal(signal.SIGINT)
    code = run.wait()

    assert code == 0, run.stdout + run.stderr
    assert "Host stopped" in run.stderr  # gracefully, not killed
    assert "Traceback" not in run.stderr
    assert run.stdout.rstrip().endswith("Stopped the bot and Azurite.")
    assert not any(accepts_connections(ports[name]) for name in ("port", "blob", "queue"))
    assert run.left_behind() == []


def test_make_run_behind_a_proxy_reaches_this_machine_directly(make_run):
    # A developer's machine with a proxy (one nothing answers here) and no NO_PROXY:
    # make run creates Azurite's queue and serves the bot without asking the proxy.
    dead = f"http://127.0.0.1:{free_port()}"
    run = make_run(env={"http_proxy": dead, "HTTP_PROXY": dead})
    run.wait_started()
    wait_for_line(run, "Ready: ")
    assert post_status(run.ports["port"], "/api/messages", b"{}") == 400
    conn_str = connection_string(run.ports["blob"], run.ports["queue"])
    with QueueServiceClient.from_connection_string(conn_str) as queues:
        assert run.queue in {queue.name for queue in queues.list_queues()}
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stdout + run.stderr


def test_make_run_when_the_bot_port_is_taken_says_so_and_starts_nothing(make_run):
    with listening() as port:
        run = make_run(port=port)
        code = run.wait(timeout=30)

    assert code == 1
    assert f"port {port} is in use" in run.stderr
    assert "Traceback" not in run.stderr
    assert not accepts_connections(run.ports["blob"])  # Azurite was not started for nothing
    assert run.left_behind() == []


def test_make_run_when_an_azurite_port_is_taken_names_it(make_run):
    with listening() as port:
        run = make_run(blob=port)
        code = run.wait(timeout=30)

    assert code == 1
    assert f"port {port} (Azurite's blob service) is in use" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.left_behind() == []


def test_make_run_when_the_storage_ports_answer_but_not_as_azurite(make_run):
    with listening() as blob, listening() as queue:
        run = make_run(blob=blob, queue=queue)
        code = run.wait(timeout=30)

    assert code == 1
    assert "not Azurite" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({"BOT_ALLOW_UNAUTHENTICATED": "maybe"}, "BOT_ALLOW_UNAUTHENTICATED: must be true or"),
        ({"BOT_MAX_BODY_BYTES": "abc"}, "BOT_MAX_BODY_BYTES"),
    ],
)
def test_make_run_refuses_settings_the_bot_would_refuse_before_starting_anything(
    make_run, values, said
):
    # Started anyway, the bot would answer every request 500, the reason in its log only.
    example = json.loads((ROOT / "local.settings.example.json").read_text())
    example["Values"].update(values)
    run = make_run(settings_text=json.dumps(example))

    assert run.wait(timeout=30) == 1
    assert said in run.stderr and "fix it in the settings" in run.stderr
    assert "Traceback" not in run.stderr and "Ready" not in run.stdout
    assert not accepts_connections(run.ports["blob"])
    assert not accepts_connections(run.ports["port"])


def test_the_settings_judged_are_those_core_tools_would_give_the_bot(tmp_path, monkeypatch):
    # Core Tools (or the local host in their place, for the repo's own file) fill a
    # variable set empty from the file: judged with the environment's blank winning, a
    # working `make run` was refused ("MicrosoftAppId is required").
    from tools import run_local

    settings = tmp_path / "local.settings.json"
    monkeypatch.setattr(run_local, "SETTINGS_FILE", settings)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "func").write_text("#!/bin/sh\nexit 3\n")
    (tools / "func").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BOT_ALLOW_UNAUTHENTICATED", "")
    file_values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    args = run_local.parse_args(["--settings", str(settings)])
    judged = run_local.bot_settings(args, file_values)
    assert judged["BOT_ALLOW_UNAUTHENTICATED"] == "true"
    run_local.check_settings(judged)
    # The local host with its own file reads the environment first, blank included.
    alone = run_local.parse_args(["--settings", str(settings), "--devhost"])
    with pytest.raises(run_local.RunError, match="MicrosoftAppId"):
        run_local.check_settings(run_local.bot_settings(alone, file_values))
    # A blank AzureWebJobsStorage is the file's development storage there: the host is
    # given this Azurite's ports, not left to fill the default ones in.
    monkeypatch.setenv("AzureWebJobsStorage", "")
    ported = run_local.parse_args(
        ["--settings", str(settings), "--blob-port", "20000", "--queue-port", "20001"]
    )
    environment = run_local.host_environment(ported, file_values)
    assert environment["AzureWebJobsStorage"] == connection_string(20000, 20001)


def test_make_run_with_a_broken_settings_file_names_it(make_run):
    run = make_run(settings_text='{"Values": {"MicrosoftAppId": ')

    assert run.wait(timeout=30) == 1
    assert "local.settings.json is not readable JSON" in run.stderr
    assert "Traceback" not in run.stderr
    assert not accepts_connections(run.ports["blob"])


def test_ensure_resources_creates_a_long_queue_without_a_poison_twin_azure_could_not_have(
    azurite,
):
    # A 60-character queue has no poison queue (67 characters): the storage error said
    # the ports answered "but not as Azurite".
    from tools.azurite import ensure_resources

    name = f"q{uuid.uuid4().hex}".ljust(60, "q")
    ensure_resources(azurite.connection_string, [name], [])
    queues = QueueServiceClient.from_connection_string(azurite.connection_string)
    assert [q.name for q in queues.list_queues(name_starts_with=name)] == [name]


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"BOT_PROACTIVE_QUEUE": "Proactive-Messages"}, "BOT_PROACTIVE_QUEUE"),
        ({"BOT_PROACTIVE_QUEUE": "q" * 60}, "at most 56"),  # the bot would answer only 500s
        ({"BOT_REFERENCES_CONTAINER": "Refs"}, "BOT_REFERENCES_CONTAINER"),
    ],
)
def test_make_run_with_a_storage_name_the_bot_refuses_names_the_setting(azurite, settings, said):
    from tools import run_local

    args = run_local.parse_args(
        ["--blob-port", str(azurite.blob_port), "--queue-port", str(azurite.queue_port)]
    )
    with pytest.raises(run_local.RunError) as raised:
        run_local.create_resources(args, settings)
    message = str(raised.value)
    assert said in message and "not as Azurite" not in message


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ('{"": "x"}', "is no setting name"),
        ('{"A=B": "x"}', "is no setting name"),
        ('{"X": "a\\u0000b"}', "NUL character"),
        ('{"X": "a\\ud800b"}', "not valid Unicode"),
        ('{"X": "' + "x" * 140_000 + '"}', "longer than an environment holds"),
    ],
    ids=["empty name", "name with =", "NUL", "lone surrogate", "too long"],
)
def test_make_run_and_the_local_host_name_a_setting_no_environment_can_hold(
    make_run, tmp_path, values, said
):
    # A traceback (OSError, ValueError) from putting it in the environment.
    from tools.devhost.settings import HostError, load_local_settings

    run = make_run(settings_text=f'{{"Values": {values}}}')
    assert run.wait(timeout=30) == 1
    assert said in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "local.settings.json").write_text(f'{{"Values": {values}}}')
    with pytest.raises(HostError, match=said):
        load_local_settings(tmp_path)


def test_a_settings_file_that_is_not_json_says_where():
    from tools.devhost.settings import json_problem

    with pytest.raises(ValueError) as raised:
        json.loads('{"Values": {"A": "x",}}')  # a trailing comma
    assert json_problem(raised.value).endswith("at line 1, column 22")


def test_make_run_when_azurite_stops_before_the_queues_are_created_says_so_quickly():
    # The Azurite found on the ports (another `make run` that is stopping, say) is gone by
    # the time the queues and the container are created: nothing answers there any more.
    from tools import run_local

    args = run_local.parse_args(["--blob-port", str(free_port()), "--queue-port", str(free_port())])
    started = time.monotonic()
    with pytest.raises(run_local.RunError) as raised:
        run_local.create_resources(args, {})
    assert time.monotonic() - started < 40  # not the storage SDK's minute and a half of retries
    message = str(raised.value)
    assert "not as Azurite" not in message  # nothing answers: it is not some other program
    assert f"{args.blob_port}/{args.queue_port}" in message and "make run" in message


class _OldAzurite(http.server.BaseHTTPRequestHandler):
    """Answers every request as an Azurite older than the storage SDK does (3.33, say):
    400 InvalidHeaderValue for the SDK's x-ms-version. An HTTP stand-in: an old Azurite
    is not installed here."""

    def _refuse(self) -> None:
        body = (
            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>InvalidHeaderValue</Code>'
            b"<Message>The API version 2026-10-06 is not supported by Azurite. Please "
            b"upgrade Azurite to latest version and retry.</Message></Error>"
        )
        self.send_response(400)
        self.send_header("x-ms-error-code", "InvalidHeaderValue")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_POST = do_HEAD = _refuse

    def log_message(self, *args) -> None:
        pass


def test_an_azurite_older_than_the_storage_sdk_is_named_as_such():
    # It answered as Azurite, then `make run` said the ports answer "but not as Azurite".
    import threading

    from tools import run_local

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldAzurite) for _ in "bq"]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        blob, queue = (server.server_address[1] for server in servers)
        args = run_local.parse_args(["--blob-port", str(blob), "--queue-port", str(queue)])
        with pytest.raises(run_local.RunError) as raised:
            run_local.create_resources(args, {})
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    message = str(raised.value)
    assert "older than the storage SDK" in message and "not as Azurite" not in message


def test_the_ready_line_names_make_targets_only_on_makes_own_port():
    import argparse

    from tools.run_local import PORT, ready_line

    on_make = ready_line(argparse.Namespace(port=PORT, no_hints=False))
    assert "`make chat`" in on_make and "`make playground`" in on_make
    other = ready_line(argparse.Namespace(port=7999, no_hints=False))
    assert "make chat" not in other
    assert "tools.botsim chat --bot http://127.0.0.1:7999/api/messages`" in other


def test_a_settings_file_of_its_own_is_the_hosts_only_settings(tmp_path, monkeypatch):
    # The host also reads the repo's local.settings.json: an app id there made the bot of
    # `--settings FILE` (unauthenticated, no app id) answer 401.
    import json

    from tools import run_local

    repo = tmp_path / "local.settings.json"
    repo.write_text(json.dumps({"Values": {"MicrosoftAppId": "app-1", "BOT_X": "repo"}}))
    other = tmp_path / "other.settings.json"
    other.write_text(json.dumps({"Values": {"BOT_ALLOW_UNAUTHENTICATED": "true", "BOT_X": "it"}}))
    monkeypatch.setattr(run_local, "SETTINGS_FILE", repo)
    monkeypatch.delenv("MicrosoftAppId", raising=False)
    monkeypatch.delenv("BOT_X", raising=False)
    args = run_local.parse_args(["--settings", str(other)])

    env = run_local.host_environment(args, run_local.load_settings(other))

    assert env["MicrosoftAppId"] == ""  # blank: unset, whatever the repo's file says
    assert (env["BOT_X"], env["BOT_ALLOW_UNAUTHENTICATED"]) == ("it", "true")


def test_core_tools_start_the_worker_with_the_repos_python(tmp_path, monkeypatch):
    # Core Tools cannot be installed here: `func` is only made to look installed, and the
    # environment it would get is checked by running the Python it would find there.
    import shutil
    import subprocess
    import sys

    from tools import run_local

    real_which = shutil.which
    monkeypatch.setattr(run_local.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a PATH without the repo's environment
    monkeypatch.setenv("MicrosoftAppId", "app-1")  # an authenticated bot: Core Tools run it
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    args = run_local.parse_args([])
    assert run_local.host_command(args)[0] == "func"

    env = run_local.host_environment(args, {})

    assert env["languageWorkers__python__defaultExecutablePath"] == sys.executable
    python3 = real_which("python3", path=env["PATH"])
    assert python3 is not None
    imported = subprocess.run(
        [
            python3,
            "-c",
            "import azure.functions, aiohttp, msal, jwt; import sys; print(sys.prefix)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == env["VIRTUAL_ENV"] == sys.prefix


def test_another_settings_file_runs_the_local_host_even_with_core_tools_installed(
    tmp_path, monkeypatch
):
    # Core Tools read the repo's local.settings.json whatever the environment says (a blank
    # variable too): FILE's settings would lose to it.
    from tools import run_local

    monkeypatch.setattr(run_local.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setenv("MicrosoftAppId", "app-1")  # an authenticated bot: Core Tools run it
    other = tmp_path / "other.settings.json"
    assert run_local.host_command(run_local.parse_args([]))[:2] == ["func", "start"]
    command = run_local.host_command(run_local.parse_args(["--settings", str(other)]))
    assert command[1:3] == ["-m", "tools.devhost"]


@pytest.mark.parametrize(
    ("env", "core_tools"),
    [
        ({}, False),  # the example's settings (or the repo's file): unauthenticated
        ({"MicrosoftAppId": "app-1"}, True),
        ({"BOT_ALLOW_UNAUTHENTICATED": "false", "MicrosoftAppId": ""}, True),
    ],
)
def test_core_tools_never_serve_an_unauthenticated_bot_to_the_network(monkeypatch, env, core_tools):
    # Core Tools listen on every address (0.0.0.0): an unauthenticated bot there could be
    # made to post to any port of this machine by anyone reaching it. The local host, on
    # loopback, runs it instead. (`func` made to look installed: not installable here.)
    from tools import run_local

    monkeypatch.setattr(run_local.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(run_local, "SETTINGS_FILE", run_local.ROOT / "no-such.settings.json")
    for name in ("MicrosoftAppId", "BOT_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = run_local.parse_args(["--settings", str(run_local.SETTINGS_FILE)])
    command = run_local.host_command(args)
    assert (command[0] == "func") is core_tools
    if not core_tools:
        assert command[1:3] == ["-m", "tools.devhost"]


@pytest.mark.parametrize("flag", [True, "true", "True", 1])
def test_an_encrypted_settings_file_is_refused(tmp_path, monkeypatch, flag):
    # Core Tools decrypt it (the flag read as they read it): what it runs the bot with
    # cannot be told here (an encrypted copy of the example's settings ran an
    # unauthenticated bot on every address).
    from tools import run_local

    settings = tmp_path / "local.settings.json"
    values = {"BOT_ALLOW_UNAUTHENTICATED": "CfDJ8...", "MicrosoftAppId": "CfDJ8..."}
    settings.write_text(json.dumps({"IsEncrypted": flag, "Values": values}))
    with pytest.raises(run_local.RunError, match="encrypted: decrypt it"):
        run_local.load_settings(settings)


@pytest.mark.parametrize("document", [{}, {"IsEncrypted": None}, {"isEncrypted": False}])
def test_a_file_core_tools_would_take_for_encrypted_runs_on_the_local_host(
    tmp_path, monkeypatch, document
):
    # Without "IsEncrypted": false Core Tools decrypt the values (or try): which bot they
    # would run cannot be told, so they do not run it.
    from tools import run_local

    settings = tmp_path / "local.settings.json"
    values = {"BOT_ALLOW_UNAUTHENTICATED": "false", "MicrosoftAppId": "app-1"}
    settings.write_text(json.dumps({**document, "Values": values}))
    monkeypatch.setattr(run_local.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(run_local, "SETTINGS_FILE", settings)
    args = run_local.parse_args(["--settings", str(settings)])
    assert run_local.host_command(args)[1:3] == ["-m", "tools.devhost"]
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    assert run_local.host_command(args)[0] == "func"


@pytest.mark.parametrize(
    ("file_app_id", "env"),
    [
        (None, {}),  # null in the file: Core Tools skip it, the app has no app id
        ("app-1", {"MicrosoftAppId": "  "}),  # spaces win over the file, the app strips them
        (None, {"BOT_ALLOW_UNAUTHENTICATED": ""}),  # blank: Core Tools fill it from the file
    ],
    ids=["null app id", "app id of spaces", "blank allow"],
)
def test_the_settings_are_judged_as_core_tools_would_give_them(
    tmp_path, monkeypatch, file_app_id, env
):
    from tools import run_local

    settings = tmp_path / "local.settings.json"
    values = {"BOT_ALLOW_UNAUTHENTICATED": "true", "MicrosoftAppId": file_app_id}
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    monkeypatch.setattr(run_local.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(run_local, "SETTINGS_FILE", settings)
    for name in ("MicrosoftAppId", "BOT_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = run_local.parse_args(["--settings", str(settings)])

    assert run_local.host_command(args)[1:3] == ["-m", "tools.devhost"]
    # The local host in Core Tools' place gets what they would have given the app.
    host_env = run_local.host_environment(args, run_local.load_settings(settings))
    assert host_env.get("BOT_ALLOW_UNAUTHENTICATED") in (None, "true")


# A stand-in host for the Ready line's wait: listens on argv[1] and answers its status
# endpoint as argv[2] says: `hang` leaves requests of the first second unanswered (past the
# status request's timeout) then says Running, `404` has no such endpoint; it exits after
# its first answer, saying so first (after 6 s at the latest).
FAKE_HOST = """
import http.server, json, sys, threading, time
port, mode = int(sys.argv[1]), sys.argv[2]
started = time.monotonic()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if mode == "hang" and time.monotonic() - started < 1.0:
            time.sleep(10)
            return
        print("host: answering", flush=True)
        body = json.dumps({"state": "Running"}).encode() if mode == "hang" else b"no"
        self.send_response(200 if mode == "hang" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        threading.Thread(target=server.shutdown).start()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
deadline = threading.Timer(6, server.shutdown)  # at the latest
deadline.daemon = True
deadline.start()
server.serve_forever()
"""


@pytest.mark.parametrize("mode", ["hang", "404"])
def test_the_ready_line_waits_until_the_host_says_it_runs_or_that_it_does_not_say(capfd, mode):
    # A status request that timed out was taken as "the host does not say": `Ready:` came
    # while the host was still starting. Only a 404 (or an answer that is not JSON) is that.
    from tools import run_local

    port = free_port()
    command = [sys.executable, "-c", FAKE_HOST, str(port), mode]
    started = time.monotonic()
    code = run_local.run_host(command, dict(os.environ), "Ready: the test", port)
    out = capfd.readouterr().out
    assert code == 0
    assert out.count("Ready: the test") == 1 and "host: answering" in out, out
    assert out.index("host: answering") < out.index("Ready: the test"), out
    assert time.monotonic() - started < 15


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout


def test_a_settings_file_it_creates_is_said_with_where_and_kept_out_of_git(tmp_path, capsys):
    # `--settings NEWFILE` (a file where users put secrets) showed in `git status`.
    from tools import run_local

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    (repo / "local.settings.example.json").write_text("{}")  # the example stays tracked
    tracked = git(ROOT, "ls-files", "local.settings*.json", "*/local.settings*.json").split()
    assert tracked == ["local.settings.example.json"]
    created = repo / "local.settings.dev.json"

    values = run_local.load_settings(created)

    assert values["BOT_ALLOW_UNAUTHENTICATED"] == "true"  # the example's
    out = capsys.readouterr().out
    assert out == f"created {created} from local.settings.example.json\n"
    status = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert sorted(status) == ["?? .gitignore", "?? local.settings.example.json"]


def test_a_settings_file_it_creates_under_a_name_git_would_take_says_so(
    tmp_path, capsys, monkeypatch
):
    from tools import run_local

    repo = tmp_path / "repo"  # the repo, as the tool sees it
    repo.mkdir()
    shutil.copyfile(ROOT / "local.settings.example.json", repo / "local.settings.example.json")
    monkeypatch.setattr(run_local, "ROOT", repo)
    outside = tmp_path / "mine.json"  # out of the repo: nothing to say
    run_local.load_settings(outside)
    assert capsys.readouterr().out == f"created {outside} from local.settings.example.json\n"
    inside = repo / "settings.json"
    run_local.load_settings(inside)
    out = capsys.readouterr().out
    assert out.startswith(f"created {inside} from local.settings.example.json (git does not")
    assert "only local.settings*.json files are" in out


def test_a_settings_file_in_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    from tools import run_local

    path = tmp_path / "nowhere" / "x.json"
    ports = [f"--{s}-port={free_port()}" for s in ("blob", "queue", "table")]
    code = run_local.main(["--devhost", f"--port={free_port()}", *ports, f"--settings={path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"make run: cannot create {path} from local.settings.example.json: its folder "
        f"{path.parent} does not exist"
    ]
    assert not path.parent.exists()


def test_a_data_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    # It was a traceback (FileExistsError).
    from tools import run_local

    data = tmp_path / "azurite-data"
    data.write_text("not a folder")
    settings = tmp_path / "local.settings.json"
    settings.write_text((ROOT / "local.settings.example.json").read_text())
    ports = [f"--{s}-port={free_port()}" for s in ("blob", "queue", "table")]
    code = run_local.main(
        ["--devhost", f"--port={free_port()}", *ports, f"--settings={settings}", f"--data={data}"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"make run: --data {data}: not a folder Azurite can use (File exists)"
    ]
    assert data.read_text() == "not a folder"


def test_with_azurite_on_other_ports_the_ready_line_gives_the_producer_its_storage(make_run):
    # README said to set AzureWebJobsStorage for the producer too, not to what.
    run = make_run()
    run.wait_started()
    line = wait_for_line(run, "For the producer")
    storage = connection_string(run.ports["blob"], run.ports["queue"])
    assert line == (
        f"For the producer (`.venv/bin/python -m shared.producer`): AzureWebJobsStorage="
        f"'{storage}' (this Azurite's ports; UseDevelopmentStorage=true names its defaults)"
    )
    keep = {k: os.environ[k] for k in INHERITED if k in os.environ}
    env = {**keep, "AzureWebJobsStorage": storage, "BOT_REFERENCES_CONTAINER": run.container}
    listed = subprocess.run(
        [sys.executable, "-m", "shared.producer", "conversations"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (listed.returncode, listed.stderr) == (0, "")  # it reaches this Azurite
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 0
    assert run.left_behind() == []


def test_on_azurites_default_ports_the_ready_line_says_nothing_of_storage():
    import argparse

    from tools.run_local import ready_line, storage_on_ports

    default = argparse.Namespace(port=7999, no_hints=True, blob_port=10000, queue_port=10001)
    assert storage_on_ports(default, "UseDevelopmentStorage=true") is None
    assert "\n" not in ready_line(default, None)
    other = argparse.Namespace(port=7999, no_hints=True, blob_port=20000, queue_port=20001)
    assert storage_on_ports(other, "DefaultEndpointsProtocol=https;AccountName=x") is None
    assert storage_on_ports(other, " usedevelopmentstorage=TRUE ") == connection_string(
        20000, 20001
    )
    # Read as a connection string is: empty segments (a trailing `;`) are nothing.
    for value in ("UseDevelopmentStorage=true;", ";UseDevelopmentStorage=true;;"):
        assert storage_on_ports(other, value) == connection_string(20000, 20001)
    # With a proxy of its own, the emulator is elsewhere: left as it is.
    proxied = "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://10.0.0.5"
    assert storage_on_ports(other, proxied) is None
