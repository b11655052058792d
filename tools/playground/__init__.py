"""Microsoft 365 Agents Playground, run from the repo's tool folder against a local bot.

The Playground (npm `@microsoft/m365agentsplayground`, installed pinned into
`.tools/playground` by the Makefile) is a local web page that looks like Teams (or Web
Chat, or the Emulator), plays the channel and the Connector, and mocks installs, members
joining, teams and channels. It needs no account and no outside network.

It is started here the way a headless machine needs it: no browser opened (its default
calls `xdg-open`, which a server or container lacks), telemetry off, its log file in the
tool folder, and its server bound to 127.0.0.1 (its own code listens on every interface;
`loopback.cjs` is preloaded to change that).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tools.azurite import free_port

ROOT = Path(__file__).resolve().parents[2]
TOOL_DIR = ROOT / ".tools" / "playground"
CLI = TOOL_DIR / "node_modules" / "@microsoft" / "m365agentsplayground" / "cli.js"
LOG_FILE = TOOL_DIR / "playground.log"
LOOPBACK = Path(__file__).resolve().parent / "loopback.cjs"
CHANNELS = ("msteams", "webchat", "emulator")
DEFAULT_PORT = 56150  # the Playground's own default; it moves to a free port when taken
_LISTENING = re.compile(r"Listening on (\d+)")
# Lines the Playground prints that would mislead here (it opens no browser, and its
# "localhost" URL can resolve to ::1, where the loopback-bound server does not listen).
_SILENCED = ("Listening on", "is being launched for you")


def _bindable(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (as node binds it). A connect
    test says nothing of a port in the range outgoing connections take theirs from."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PlaygroundError(Exception):
    """The Playground cannot be started; the message says what to do about it."""


class Playground:
    """One Agents Playground process serving its page and mock Connector on loopback."""

    def __init__(
        self,
        bot_url: str,
        *,
        channel: str = "msteams",
        port: int = DEFAULT_PORT,
        log_file: Path = LOG_FILE,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if channel not in CHANNELS:
            raise PlaygroundError(f"channel {channel!r}: choose one of {', '.join(CHANNELS)}")
        self.bot_url = bot_url
        self.channel = channel
        self.requested_port = port
        self.log_file = log_file
        self.port: int | None = None
        self.lines: list[str] = []  # what the Playground printed
        self._echo = echo
        self._listening = threading.Event()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        """The page to open (127.0.0.1: the server listens on IPv4 loopback only)."""
        if self.port is None:
            raise PlaygroundError("the Playground is not running")
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        """The Playground on `port`, its mock Connector's serviceUrl on 127.0.0.1 as well
        (its default names `localhost`, which may resolve to ::1 first)."""
        return [
            "node",
            "--require",
            str(LOOPBACK),
            str(CLI),
            "--app-endpoint",
            self.bot_url,
            "--channel-id",
            self.channel,
            "--port",
            str(port),
            "--service-url",
            f"http://127.0.0.1:{port}/_connector",
            "--disable-telemetry",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TEAMSAPPTESTER_BROWSER"] = "none"  # never spawn xdg-open (absent on servers)
        env["M365_AGENTS_PLAYGROUND_LOGFILE"] = str(self.log_file)
        return env

    def start(self, timeout: float = 60.0) -> Playground:
        if not CLI.exists():
            raise PlaygroundError("the Agents Playground is not installed: run `make playground`")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # A taken port is replaced here, not by the Playground, so the serviceUrl matches.
        port = self.requested_port if _bindable(self.requested_port) else free_port()
        for _ in range(3):
            self._launch(port, timeout)
            if self.port == port:
                return self
            # It listened elsewhere (the port was taken in between): the serviceUrl it was
            # given names this one, where nothing would take the bot's replies.
            self.stop()
            port = free_port()
        raise PlaygroundError("the Playground did not listen on the port it was given")

    def _launch(self, port: int, timeout: float) -> None:
        self.port = None
        self._listening = threading.Event()  # this process's (a stopped one's reader runs on)
        try:
            self.process = subprocess.Popen(
                self.command(port),
                cwd=TOOL_DIR,  # it reads an optional config file from its working folder
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # stopping it stops node's children too
            )
        except OSError as error:
            raise PlaygroundError(
                f"node could not be run ({type(error).__name__}): is Node.js installed?"
            ) from None
        threading.Thread(target=self._read, name="playground-output", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None:
                self._listening.wait(0.5)  # let the reader take the last lines
                tail = "\n".join(self.lines[-5:])
                raise PlaygroundError(
                    f"the Playground exited with {self.process.returncode}:\n{tail}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PlaygroundError("the Playground did not start in time")

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        listened = self._listening
        for raw in self.process.stdout:
            line = raw.rstrip()
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not listened.is_set():
                self.port = int(match.group(1))
                listened.set()
            if self._echo and line and not any(text in line for text in _SILENCED):
                self._echo(line)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> Playground:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
