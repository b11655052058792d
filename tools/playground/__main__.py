"""`make playground`: Microsoft 365 Agents Playground against the local bot.

    python -m tools.playground [--channel msteams|webchat|emulator] [--port N] [--bot URL]

Uses the bot that `make run` serves on http://127.0.0.1:7071/api/messages; when nothing
answers there, starts it (`python -m tools.run_local`) and stops it again at the end.
Prints the page's URL to open in a browser. Ctrl-C stops what it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

from tools.args import http_url, tcp_port
from tools.azurite import listening
from tools.devhost.settings import (
    ALLOW_SETTING,
    HostError,
    app_id_source,
    as_started,
    load_local_settings,
)
from tools.playground import CHANNELS, DEFAULT_PORT, ROOT, Playground, PlaygroundError

DEFAULT_BOT = "http://127.0.0.1:7071/api/messages"
BOT_START_TIMEOUT = 180.0  # a first `make run` installs nothing here, but starts Azurite


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.playground", description=__doc__)
    parser.add_argument("--channel", choices=CHANNELS, default="msteams", help="default msteams")
    parser.add_argument(
        "--port", type=tcp_port, default=DEFAULT_PORT, help=f"page port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--bot", type=http_url, default=DEFAULT_BOT, help="the bot's messages endpoint"
    )
    return parser.parse_args(argv)


def bot_port(url: str) -> int | None:
    """The port of a bot URL on this machine's loopback, or None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return port if parts.hostname in ("127.0.0.1", "localhost") else None


def start_bot(port: int) -> subprocess.Popen[bytes]:
    """`make run`'s program on `port`, sharing this terminal; returns once it listens
    (stopped again if this is interrupted or fails before then)."""
    print("No bot answers yet: starting it (`make run`) in this terminal", flush=True)
    bot = subprocess.Popen(
        [sys.executable, "-m", "tools.run_local", "--port", str(port), "--no-hints"], cwd=ROOT
    )
    deadline = time.monotonic() + BOT_START_TIMEOUT
    try:
        while not listening(port):
            if bot.poll() is not None:
                raise PlaygroundError("the bot did not start (see the lines above)")
            if time.monotonic() > deadline:
                raise PlaygroundError("the bot did not start in time")
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_bot(bot, interrupted=True)
        raise
    except BaseException:
        stop_bot(bot)
        raise
    return bot


# A Ctrl-C in the terminal reaches the bot too, which then stops on its own: a SIGTERM on
# top would cut its cleanup short (Azurite left running). Only one that is still running
# after this long (a SIGTERM sent to this process alone) gets one.
OWN_STOP_SECONDS = 15.0


def stop_bot(bot: subprocess.Popen[bytes], *, interrupted: bool = False) -> None:
    """Stop the bot this started. `interrupted`: by a Ctrl-C, which the terminal sent the
    bot as well (a SIGTERM sent to this process alone is not one: the bot has nothing)."""
    if interrupted and not STOP.terminated:
        # Another signal meanwhile ends the wait: the bot gets its SIGTERM at once.
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            bot.wait(timeout=OWN_STOP_SECONDS)
    if bot.poll() is None:
        bot.send_signal(signal.SIGTERM)
    try:
        bot.wait(timeout=30)
    except subprocess.TimeoutExpired:
        bot.kill()
        bot.wait()


NEEDS_LOCAL_MODE = (
    "the local bot has no MicrosoftAppId and BOT_ALLOW_UNAUTHENTICATED is not true: it "
    "would refuse every activity (500).\nTo use the Playground locally, set "
    '"BOT_ALLOW_UNAUTHENTICATED": "true" in local.settings.json.'
)
NEEDS_TOKEN = (
    "the local bot would expect a channel token (MicrosoftAppId is set {where}), which the "
    "Playground does not send: every activity would be answered 401.\nTo use the "
    'Playground locally, make MicrosoftAppId "" there and set '
    '"BOT_ALLOW_UNAUTHENTICATED": "true" in local.settings.json.'
)


def check_local_bot() -> None:
    """PlaygroundError when the settings the bot it starts would read (the environment
    over local.settings.json, as the local host reads them) make it refuse the Playground."""
    try:
        local = load_local_settings(ROOT)
    except HostError as error:
        raise PlaygroundError(str(error)) from None
    if not (ROOT / "local.settings.json").is_file():  # `make run` copies the example's
        local = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    where = app_id_source(local)
    if where:
        raise PlaygroundError(NEEDS_TOKEN.format(where=where))
    if as_started(ALLOW_SETTING, local).strip().lower() not in ("true", "1", "yes"):
        raise PlaygroundError(NEEDS_LOCAL_MODE)


def run(args: argparse.Namespace) -> int:
    bot = None
    port = bot_port(args.bot)
    playground = Playground(
        args.bot,
        channel=args.channel,
        port=args.port,
        echo=lambda line: print(f"playground: {line}"),
    )
    started = interrupted = False
    try:
        if port is not None and not listening(port):
            if args.bot != DEFAULT_BOT:
                raise PlaygroundError(f"no bot answers at {args.bot}: start it first")
            check_local_bot()  # a bot already running is as it was started
            bot = start_bot(port)
        playground.start()
        started = True
        print(
            f"\nAgents Playground ({args.channel}) for the bot at {args.bot}\n"
            f"  open {playground.url} in a browser (Ctrl-C to stop)\n",
            flush=True,
        )
        code = playground.wait()
        print(f"The Playground exited with {code}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            playground.stop()
            stopped = ["the Playground"] if started else []
            if bot is not None:
                stop_bot(bot, interrupted=interrupted)
                stopped.append("the bot it started")
            if stopped:
                print(f"Stopped {' and '.join(stopped)}.", flush=True)


class _Stop:
    terminated = False  # a SIGTERM came: the bot this started got nothing from it


STOP = _Stop()


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP stop like Ctrl-C (and the bot this started is sent one at once)."""
    STOP.terminated = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)  # the terminal closed: node is in its own session
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        return run(args)
    except PlaygroundError as error:
        print(f"make playground: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # stopped before the Playground ran: what started is stopped
        return 0


if __name__ == "__main__":
    sys.exit(main())
