"""Command line: `python -m tools.devhost [--port N] [--host H] [--root DIR] [--functions ...]`.

After an orderly stop the process ends at once, as the real worker's process does when
the host shuts it down: no interpreter teardown, so clients that function modules keep
for the process lifetime (aiohttp sessions) are not reported as "unclosed".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from tools.args import tcp_port_or_any
from tools.devhost.settings import (
    ALLOW_SETTING,
    APP_ID_SETTING,
    HostError,
    apply_settings,
    load_local_settings,
    runs_unauthenticated,
)

logger = logging.getLogger("tools.devhost")

# The host's own libraries. The app's (the Azure SDK, MSAL) are the app's to decide, as on
# Azure, where the worker forwards whatever the app logs at INFO and above.
QUIET_LOGGERS = ("aiohttp.access", "asyncio", "urllib3")
BOT_ROOT = Path(__file__).resolve().parents[2]  # the function app this repo is
DEBUG_SETTING = "PYTHON_ENABLE_DEBUG_LOGGING"  # the Python worker's: "1" forwards DEBUG too


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.devhost", description="Run the function app locally"
    )
    parser.add_argument(
        "--port", type=tcp_port_or_any, default=7071, help="HTTP port (default 7071; 0: any)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (not loopback: only with MicrosoftAppId set)",
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="function app folder")
    parser.add_argument("--functions", nargs="+", metavar="NAME", help="run only these functions")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """INFO to stderr for the host and function modules; the host's libraries quieter."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


async def run(args: argparse.Namespace, collect: bool = True) -> int:
    # Imported here so `--help` and argument errors stay instant.
    from tools.devhost.app import load_app
    from tools.devhost.host import HostOptions, serve

    root = args.root.resolve()
    if not root.is_dir():
        raise HostError(f"--root: {args.root} is not a folder")
    # Like the real host: settings are in os.environ before any function module is imported.
    settings = apply_settings(load_local_settings(root), os.environ)
    check_exposure(args.host, settings)
    if root == BOT_ROOT:  # another app's own `shared` must not meet the bot's
        _leave_out_platform_markers(settings)
        _apply_binding_defaults(settings)
    if settings.get(DEBUG_SETTING, "").strip() == "1":
        logging.getLogger().setLevel(logging.DEBUG)
    app = load_app(root, settings, args.functions)
    # Loaded: what the host and the function modules imported lives as long as the
    # process. Out of the collector's way for good (the permanent generation), and the
    # collector back on when main() found it on.
    gc.freeze()
    if collect:
        gc.enable()
    return await serve(app, settings, HostOptions(host=args.host, port=args.port))


def check_exposure(host: str, settings: dict[str, str]) -> None:
    """HostError when `host` is not a loopback address and the settings run the bot
    unauthenticated (BOT_ALLOW_UNAUTHENTICATED true, no MicrosoftAppId, as the app reads
    them): it trusts loopback serviceUrls, so anyone reaching it could make it post to any
    port of this machine, and store that conversation."""
    if is_loopback(host) or not runs_unauthenticated(settings):
        return
    raise HostError(
        f"--host {host}: the settings run the bot unauthenticated ({ALLOW_SETTING}=true, "
        f"no {APP_ID_SETTING}), and an unauthenticated bot listens on loopback only (anyone "
        "reaching it could make it post to any port of this machine): set "
        f"{APP_ID_SETTING} to serve other hosts"
    )


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address; anything else (every interface, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _leave_out_platform_markers(settings: dict[str, str]) -> None:
    """Take out of the app's settings the variables by which the bot knows it runs on Azure
    (a container that sets CONTAINER_NAME for itself, say): this host is never Azure (it
    is not deployed), and with one of them the bot would refuse its local unauthenticated
    mode and answer every request 500. An unauthenticated bot stays on loopback
    (:func:`check_exposure`), whatever they said. A line in the log names each."""
    from shared.config import AZURE_HOST_MARKERS

    for name in AZURE_HOST_MARKERS:
        in_settings = settings.pop(name, None) is not None
        in_environment = os.environ.pop(name, None) is not None
        if in_settings or in_environment:
            logger.info("%s is set: left out of the app's settings (this host is not Azure)", name)


def _apply_binding_defaults(settings: dict[str, str]) -> None:
    """The bot's defaults for the settings its bindings name, where nothing sets them (the
    Functions host on Azure has none: there they must be set, as infra/ does). For the bot
    alone: importing its `shared` package would stand in for another app's own `shared`."""
    from shared.config import BINDING_DEFAULTS

    for name, value in BINDING_DEFAULTS.items():
        if not settings.get(name, "").strip():  # unset or empty, as the app reads it
            settings[name] = os.environ[name] = value
            logger.info("%s is not set: the app's default %r (on Azure, set it)", name, value)


def main(argv: list[str] | None = None) -> int:
    # The host's start is imports: no garbage for the cyclic collector to find, only
    # objects for its passes to walk (a tenth of a cold first answer's CPU, see
    # shared/warmup.py), so it waits until the app is loaded (run()).
    collect = gc.isenabled()
    gc.disable()
    try:
        args = parse_args(argv)
        configure_logging()
        return asyncio.run(run(args, collect))
    except HostError as exc:
        print(f"devhost: error: {exc}", file=sys.stderr, flush=True)  # once, not logged too
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting, before the host's own handlers
        return 128 + signal.SIGINT
    finally:
        if collect:
            gc.enable()


def end_process(code: int) -> None:
    """Flush what was logged and printed, then end without interpreter teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    end_process(main())
