"""Microsoft 365 Agents Playground, run from the repo's tool folder against a local bot.

The Playground (npm `@microsoft/m365agentsplayground`, installed pinned into
`.tools/playground` by the Makefile) is a local web page that looks like Teams (or Web
Chat, or the Emulator), plays the channel and the Connector, and mocks installs, members
joining, teams and channels. It needs no account (its page loads fonts from Microsoft's
CDN when it can, and works without them).

It is started here the way a headless machine needs it: no browser opened (its default
calls `xdg-open`, which a server or container lacks), telemetry off (its usage reports
too, which `--disable-telemetry` leaves on), its log file in the tool folder, only the
environment it needs (not the bot's secrets, nor the `AUTH_*` settings that would make it
fetch and send tokens), and, through `loopback.cjs`, preloaded: its server bound to
127.0.0.1 (its own code listens on every interface), answering only requests addressed
to loopback and sent by its own page (no other site reaches it through a browser), and
ending with the process that started it.
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
# What node gets of this process's environment: where to find things, the locale, and the
# proxy, not the bot's settings and secrets (MicrosoftAppPassword, AzureWebJobsStorage).
_PASSED_ON = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "NODE_EXTRA_CA_CERTS")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
_OWN_PREFIXES = ("M365_AGENTS_PLAYGROUND_", "TEAMSAPPTESTER_")  # the Playground's own settings


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
        env = {
            name: value
            for name, value in os.environ.items()
            if name in _PASSED_ON or name in _PROXIES or name.startswith(_OWN_PREFIXES)
        }
        env["TEAMSAPPTESTER_BROWSER"] = "none"  # never spawn xdg-open (absent on servers)
        env["M365_AGENTS_PLAYGROUND_LOGFILE"] = str(self.log_file)
        # Application Insights' own usage reports, which --disable-telemetry leaves on: they
        # ask the cloud's instance metadata endpoint, then send to Azure.
        env["APPLICATION_INSIGHTS_NO_STATSBEAT"] = "true"
        env["PLAYGROUND_EXIT_WITH_PARENT"] = "1"  # loopback.cjs: stdin closing ends it
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
                stdin=subprocess.PIPE,  # never written: closed when this process ends
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
        if process is None:
            return
        try:
            if process.poll() is None:
                self._end(process)
        finally:
            if process.stdin is not None:
                process.stdin.close()

    @staticmethod
    def _end(process: subprocess.Popen[str]) -> None:
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
