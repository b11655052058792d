"""`make run`: the bot on http://127.0.0.1:7071 with Azurite on its default ports.

Creates `local.settings.json` from the example on first run, starts the repo's Azurite
(unless one already answers on the default ports; its data is kept in
`.tools/azurite-data`), creates the bot's queues and container, then runs `func start`
when Azure Functions Core Tools are on PATH and the repo's own host (`tools/devhost`)
otherwise. Once the bot answers and the host says it is running (`/admin/host/status`,
so after the host's own start-up lines) it prints one `Ready:` line with its URL and what
to run next (`make chat`, `make playground`; `--no-hints` leaves those out), and with Azurite
on other ports than its defaults the AzureWebJobsStorage the producer needs. Ctrl-C or SIGTERM
stops everything it started and says what it stopped; a port already taken is a
one-line message, not a traceback.

    python -m tools.run_local [--port N] [--blob-port N --queue-port N --table-port N]
                              [--settings FILE] [--data DIR] [--devhost] [--no-hints]
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from shared.config import (
    AZURE_HOST_MARKERS,
    DEFAULT_QUEUE,
    DEFAULT_REFERENCES_CONTAINER,
    Settings,
    SettingsError,
    proactive_queue_name,
    references_container_name,
)
from tools.args import tcp_port
from tools.azurite import (
    DEFAULT_PORTS,
    ROOT,
    TOO_OLD,
    Azurite,
    answers_as_azurite,
    connection_string,
    ensure_resources,
    listening,
    port_in_use,
    too_old,
)
from tools.devhost.settings import (
    encrypted,
    json_problem,
    runs_unauthenticated,
    values_problem,
)

PORT = 7071
SETTINGS_FILE = ROOT / "local.settings.json"
DATA_DIR = ROOT / ".tools" / "azurite-data"
HOST_STOP_TIMEOUT = 20.0  # the host finishes the invocations in flight
DEVELOPMENT_STORAGE = "usedevelopmentstorage=true"


class RunError(Exception):
    """The bot cannot be started; the message says what to do about it."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP: stop like Ctrl-C (a BaseException, so nothing swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.run_local", description=__doc__)
    parser.add_argument("--port", type=tcp_port, default=PORT, help="the bot's HTTP port")
    for service in ("blob", "queue", "table"):
        parser.add_argument(f"--{service}-port", type=tcp_port, default=DEFAULT_PORTS[service])
    parser.add_argument("--settings", type=Path, default=SETTINGS_FILE, help="local settings")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="Azurite's data folder")
    parser.add_argument("--devhost", action="store_true", help="never use `func start`")
    parser.add_argument(
        "--no-hints", action="store_true", help="no `make chat` / `make playground` hint when ready"
    )
    args = parser.parse_args(argv)
    ports = {"--port": args.port, "--blob-port": args.blob_port, "--queue-port": args.queue_port}
    ports["--table-port"] = args.table_port
    named = {}
    for option, port in ports.items():
        if port in named:
            parser.error(f"{named[port]} and {option} are both {port}: give each its own port")
        named[port] = option
    return args


EXAMPLE = "local.settings.example.json"
IGNORED_SETTINGS = "local.settings*.json"  # .gitignore's: where settings (secrets) go


def load_settings(path: Path) -> dict[str, str]:
    """`Values` of the settings file, created from the example when it does not exist."""
    if not path.exists():
        try:
            shutil.copyfile(ROOT / EXAMPLE, path)
        except OSError as error:
            reason = (
                f"its folder {path.parent} does not exist"
                if not path.parent.is_dir()
                else (error.strerror or type(error).__name__)
            )
            raise RunError(f"cannot create {path} from {EXAMPLE}: {reason}") from None
        print(f"created {path.resolve()} from {EXAMPLE}{_not_ignored(path)}", flush=True)
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise RunError(f"{path.name} is not readable JSON ({json_problem(error)})") from None
    values = document.get("Values", {}) if isinstance(document, dict) else None
    if not isinstance(values, dict):
        raise RunError(f'{path.name} must be a JSON object with a "Values" object')
    if encrypted(document):
        # Core Tools would decrypt them, and this could not tell what they run the bot with
        # (the local host refuses them too).
        raise RunError(
            f"{path.name} is encrypted: decrypt it (`func settings decrypt`) to run it here"
        )
    values = _values(document)
    if problem := values_problem(values):
        raise RunError(f"{path.name}: Values: {problem}")
    return values


def _not_ignored(path: Path) -> str:
    """A warning when git would offer the new settings file for a commit: in the repo,
    under a name .gitignore does not hold (it may get secrets)."""
    inside = path.resolve().is_relative_to(ROOT)
    if not inside or fnmatch.fnmatchcase(path.name, IGNORED_SETTINGS):
        return ""
    return f" (git does not ignore it: only {IGNORED_SETTINGS} files are; keep secrets out of it)"


def _read_document(path: Path) -> dict[str, Any] | None:
    """A settings file's JSON object, or None when it is absent, unreadable or no object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _values(document: Mapping[str, Any] | None) -> dict[str, str]:
    """A settings document's `Values` as text, a null value skipped ({} when none)."""
    values = document.get("Values") if document is not None else None
    if not isinstance(values, dict):
        return {}
    return {str(k): str(v) for k, v in values.items() if v is not None}


def _repo_values() -> dict[str, str]:
    """The repo's own local.settings.json `Values` ({} when it is absent or unreadable)."""
    return _values(_read_document(SETTINGS_FILE))


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP raise :class:`Terminated`, SIGINT KeyboardInterrupt (also when this
    was started with SIGINT ignored, as a shell without job control starts a command run
    in the background); the previous handlers come back after."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def no_interruptions() -> Iterator[None]:
    """While cleaning up: further Ctrl-C / SIGTERM wait (every step of the cleanup is bounded)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def storage_to_start(args: argparse.Namespace) -> Azurite | None:
    """A new Azurite for the ports (not started yet), or None when one already answers."""
    ports = {"blob": args.blob_port, "queue": args.queue_port, "table": args.table_port}
    if port_in_use(ports["blob"]) and port_in_use(ports["queue"]):
        if not (answers_as_azurite(ports["blob"]) and answers_as_azurite(ports["queue"])):
            raise RunError(
                f"ports {ports['blob']} and {ports['queue']} are in use by a program that is not "
                "Azurite: stop it, then run `make run` again"
            )
        print(
            f"using the Azurite already running on ports {ports['blob']} and {ports['queue']}",
            flush=True,
        )
        return None
    for service, port in ports.items():
        if port_in_use(port):
            raise RunError(
                f"port {port} (Azurite's {service} service) is in use by another program: "
                "stop it, then run `make run` again"
            )
    try:
        args.data.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, a folder it may not write to
        raise RunError(
            f"--data {args.data}: not a folder Azurite can use ({error.strerror})"
        ) from None
    return Azurite(
        blob_port=ports["blob"],
        queue_port=ports["queue"],
        table_port=ports["table"],
        location=str(args.data),
        in_memory=False,
    )


def bot_settings(args: argparse.Namespace, file_values: Mapping[str, str]) -> dict[str, str]:
    """The settings the bot will see: the environment's over the file's; where Core Tools
    run the app (or the local host in their place), a variable set empty takes the file's
    value, as they do."""
    if use_core_tools(args):
        return _over_environment(file_values)
    return {**file_values, **os.environ}


def check_settings(settings: Mapping[str, str]) -> None:
    """Judge the settings as the bot will at its first request (started with ones it
    refuses, it would answer every request 500, the reason in its log alone), the
    platform's variables left out as the host leaves them."""
    bot_view = {name: value for name, value in settings.items() if name not in AZURE_HOST_MARKERS}
    try:
        Settings.from_env(bot_view)
    except SettingsError as error:  # names the setting and the rule, never a secret
        raise RunError(f"{error}: fix it in the settings, then run `make run` again") from None


def create_resources(args: argparse.Namespace, settings: Mapping[str, str]) -> None:
    queue = settings.get("BOT_PROACTIVE_QUEUE") or DEFAULT_QUEUE
    container = settings.get("BOT_REFERENCES_CONTAINER") or DEFAULT_REFERENCES_CONTAINER
    try:  # as the bot will judge them: started with another, it would answer only 500s
        proactive_queue_name(queue)
        references_container_name(container)
    except SettingsError as error:  # names the setting and the rule, never a secret
        raise RunError(f"{error}: fix it in the settings, then run `make run` again") from None
    try:
        ensure_resources(connection_string(args.blob_port, args.queue_port), [queue], [container])
    except Exception as error:  # whatever answers on the ports is not a working Azurite
        if not (listening(args.blob_port) and listening(args.queue_port)):
            raise RunError(
                f"Azurite stopped answering on ports {args.blob_port}/{args.queue_port} (was "
                "another `make run` stopping?): run `make run` again"
            ) from None
        if too_old(error):
            raise RunError(f"ports {args.blob_port}/{args.queue_port}: {TOO_OLD}") from None
        raise RunError(
            f"ports {args.blob_port}/{args.queue_port} answer, but not as Azurite "
            f"({type(error).__name__}): stop what uses them, then run `make run` again"
        ) from None


def host_command(args: argparse.Namespace) -> list[str]:
    # Core Tools read the repo's local.settings.json whatever the environment holds (they
    # fill in a variable set blank, too): another settings file needs the local host.
    if use_core_tools(args) and not exposes_unauthenticated():
        return ["func", "start", "--port", str(args.port)]
    return [sys.executable, "-m", "tools.devhost", "--port", str(args.port)]


def use_core_tools(args: argparse.Namespace) -> bool:
    """Core Tools are there and may run the repo's own settings file."""
    own_file = args.settings.resolve() == SETTINGS_FILE.resolve()
    return not args.devhost and own_file and shutil.which("func") is not None


def exposes_unauthenticated() -> bool:
    """Whether Core Tools would serve an unauthenticated bot to the network: they listen
    on every address, and the repo's settings (the example's, before the file exists;
    what the environment sets wins) run the bot unauthenticated. The local host, on
    loopback, runs it instead."""
    path = _core_tools_file()
    document = _read_document(path)
    if path == SETTINGS_FILE and (document is None or encrypted(document) is not False):
        return True  # Core Tools would decrypt it (or try): what they run cannot be told
    return runs_unauthenticated(_over_environment(_values(document)))


def core_tools_values() -> dict[str, str]:
    """The settings Core Tools run the app with: the repo's file (the example's before it
    exists; a null value skipped), a variable of the environment winning unless empty."""
    return _over_environment(_values(_read_document(_core_tools_file())))


def _core_tools_file() -> Path:
    """The settings file Core Tools read: the repo's, or the example it is made from."""
    return SETTINGS_FILE if SETTINGS_FILE.exists() else ROOT / EXAMPLE


def _over_environment(values: Mapping[str, str]) -> dict[str, str]:
    """`values` with what the environment sets over them (an empty variable sets nothing)."""
    return dict(values) | {name: value for name, value in os.environ.items() if value != ""}


def host_environment(args: argparse.Namespace, file_values: Mapping[str, str]) -> dict[str, str]:
    """The host's environment: ours, plus what the host would not find on its own."""
    # `make run` is local by definition: a hosting-platform variable inherited from the
    # machine (a container's CONTAINER_NAME) would make the bot refuse local mode as on Azure.
    env = {name: value for name, value in os.environ.items() if name not in AZURE_HOST_MARKERS}
    if args.settings.resolve() != SETTINGS_FILE.resolve():
        for name, value in file_values.items():  # the host reads only the repo's file
            env.setdefault(name, value)
        # ... and reads it still: what FILE leaves out must not come from it (blank is unset).
        for name in _repo_values():
            env.setdefault(name, "")
    # The storage the bot will see (a blank variable filled from the file where Core Tools
    # fill it), on this Azurite's ports: set, so no host fills it in with the defaults.
    storage = storage_on_ports(args, bot_settings(args, file_values).get("AzureWebJobsStorage", ""))
    if storage is not None:
        env["AzureWebJobsStorage"] = storage
    core_tools = host_command(args)[0] == "func"
    if use_core_tools(args) and not core_tools:
        # The local host in Core Tools' place (the bot unauthenticated): it lets a blank
        # variable win over the file, where Core Tools fill it in from the file.
        for name, value in core_tools_values().items():
            if env.get(name) == "":
                env[name] = value
    if core_tools:
        # Core Tools start the worker with the `python3` or `python` found on PATH, not
        # this one: the repo's virtual environment first, and named, as activating it would.
        bin_dir = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
        env["VIRTUAL_ENV"] = os.path.dirname(bin_dir)
        env["languageWorkers__python__defaultExecutablePath"] = sys.executable
    return env


def is_development_storage(storage: str) -> bool:
    """Whether `storage` is `UseDevelopmentStorage=true` alone, as a connection string is
    read (empty segments such as a trailing `;` skipped, the name in any case)."""
    segments = [part.strip().lower() for part in storage.split(";") if part.strip()]
    return segments == [DEVELOPMENT_STORAGE]


def storage_on_ports(args: argparse.Namespace, storage: str) -> str | None:
    """`UseDevelopmentStorage=true` names Azurite's default ports: with others, the
    connection string of Azurite's account on them (its documented, public development
    key: no secret), which the host gets instead; None when nothing is to change."""
    custom_ports = (args.blob_port, args.queue_port) != (
        DEFAULT_PORTS["blob"],
        DEFAULT_PORTS["queue"],
    )
    if is_development_storage(storage) and custom_ports:
        return connection_string(args.blob_port, args.queue_port)
    return None


def ready_line(args: argparse.Namespace, storage: str | None = None) -> str:
    """What to do next, once the bot answers; with `storage` (Azurite on other ports than
    its defaults), the AzureWebJobsStorage the producer needs to reach it, on a line of
    its own."""
    url = f"http://127.0.0.1:{args.port}/api/messages"
    producer = (
        f"\nFor the producer (`.venv/bin/python -m shared.producer`): "
        f"AzureWebJobsStorage='{storage}' (this Azurite's ports; UseDevelopmentStorage=true "
        "names its defaults)"
        if storage
        else ""
    )
    if args.no_hints:
        return f"Ready: the bot answers on {url}{producer}"
    if args.port == PORT:
        chat, playground = "`make chat`", "`make playground`"
    else:  # the make targets talk to the default port
        chat = f"`.venv/bin/python -m tools.botsim chat --bot {url}`"
        playground = f"`.venv/bin/python -m tools.playground --bot {url}`"
    return (
        f"Ready: the bot answers on {url}. In another terminal: {chat} (a terminal chat)"
        f" or {playground} (Microsoft 365 Agents Playground, a Teams-like page)."
        f" Ctrl-C stops it.{producer}"
    )


STATUS_TIMEOUT = 2.0  # seconds for the host's status answer
SLOW_START = 120.0  # seconds of "not running yet" after which the wait is said


def host_running(port: int) -> bool | None:
    """What the host says of itself (`GET /admin/host/status`): True once it is `Running`,
    False while it is still starting (another state, or no answer yet: refused, cut or
    timed out), None when it does not say (404, or an answer that is not JSON with a
    `state`)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STATUS_TIMEOUT)
    try:
        connection.request("GET", "/admin/host/status")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return False  # no answer yet: not running yet
    finally:
        connection.close()
    if response.status == 404:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    state = document.get("state") if isinstance(document, dict) else None
    return state == "Running" if isinstance(state, str) else None


def run_host(command: list[str], env: dict[str, str], ready: str, port: int) -> int:
    """Run the host until it exits, or until Ctrl-C / SIGTERM stops it; its exit code.

    Prints `ready` once the host accepts connections on `port` and, when it says how it is
    (the repo's host does), once it is running: after its own start-up lines, not above them.
    """
    host = subprocess.Popen(command, cwd=ROOT, env=env)
    slow_at = time.monotonic() + SLOW_START
    try:
        while host.poll() is None:
            if listening(port) and host_running(port) is not False:
                print(ready, flush=True)
                break
            if time.monotonic() > slow_at:  # said once; the wait goes on
                slow_at = float("inf")
                print(
                    f"make run: the host has not said it is running after {SLOW_START:.0f} s "
                    "(see its lines above); still waiting",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.1)
        return host.wait()
    except (KeyboardInterrupt, Terminated) as stop:
        with no_interruptions():
            if isinstance(stop, Terminated):
                host.terminate()  # Ctrl-C reached the host already (same process group)
            elif command[1:3] == ["-m", "tools.devhost"]:
                # ... unless it was sent to this process alone (`kill -INT`, a supervisor):
                # passed on, so the host stops gracefully either way. The local host takes
                # a second SIGINT within a second as the same one; Core Tools might not.
                host.send_signal(signal.SIGINT)
            try:
                return host.wait(timeout=HOST_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                host.kill()
                return host.wait()
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def run(args: argparse.Namespace) -> int:
    file_values = load_settings(args.settings)
    settings = bot_settings(args, file_values)
    check_settings(settings)
    if port_in_use(args.port):
        raise RunError(
            f"port {args.port} is in use: is the bot already running (`make run` in another "
            "terminal)? Stop it, then try again"
        )
    azurite = storage_to_start(args)
    host_started = False
    try:
        if azurite is not None:
            try:
                azurite.start()
            except RuntimeError as error:  # not installed, exited, or too slow to answer
                raise RunError(f"Azurite did not start: {error}") from None
            except OSError as error:
                raise RunError(
                    f"Azurite could not be run ({type(error).__name__}): is Node.js installed?"
                ) from None
            print(
                f"Azurite started on ports {args.blob_port} (blob) and {args.queue_port} (queue),"
                f" data in {args.data}",
                flush=True,
            )
        if is_development_storage(settings.get("AzureWebJobsStorage", "")):
            create_resources(args, settings)
        command = host_command(args)
        if use_core_tools(args) and command[0] != "func":
            print(
                "Core Tools listen on every network address, and these settings run the bot "
                'unauthenticated (or may: a file not marked "IsEncrypted": false): the local '
                "host runs it on loopback instead (set MicrosoftAppId to use Core Tools)",
                flush=True,
            )
        host_started = True
        producer = storage_on_ports(args, settings.get("AzureWebJobsStorage", ""))
        ready = ready_line(args, producer)
        return run_host(command, host_environment(args, file_values), ready, args.port)
    finally:
        with no_interruptions():
            if azurite is not None:
                azurite.stop()
            if host_started:
                with contextlib.suppress(OSError):  # the terminal may have closed
                    print(stopped_line(azurite), flush=True)


def stopped_line(azurite: Azurite | None) -> str:
    """What Ctrl-C (or the host's exit) stopped."""
    if azurite is None:
        return "Stopped the bot (the Azurite that was already running is left running)."
    return "Stopped the bot and Azurite."


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def bypass_proxies_for_loopback(environ: MutableMapping[str, str]) -> None:
    """Everything `make run` starts talks to this machine (Azurite, the bot, the chat's
    Connector): a proxy set for the machine (`http_proxy`) is not asked to reach it, in
    this process and in the host it starts. Both spellings get the same list (a reader
    takes one of them: what either held is kept); either being `*` alone (no proxy for
    any host) makes both `*`."""
    listed: list[str] = []
    for name in ("no_proxy", "NO_PROXY"):
        for entry in environ.get(name, "").split(","):
            if entry.strip() and entry.strip() not in listed:
                listed.append(entry.strip())
    if any(environ.get(name, "").strip() == "*" for name in ("no_proxy", "NO_PROXY")):
        # "Every host" (read so only when it is the whole value), in both spellings.
        environ["no_proxy"] = environ["NO_PROXY"] = "*"
        return
    value = ",".join([*listed, *(host for host in LOOPBACK_NAMES if host not in listed)])
    environ["no_proxy"] = environ["NO_PROXY"] = value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bypass_proxies_for_loopback(os.environ)
    with stop_signals():
        try:
            return run(args)
        except RunError as error:
            print(f"make run: {error}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except Terminated as stop:
            return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
