"""The host: load the app, serve HTTP, run queue and timer listeners, stop cleanly.

Everything runs on one long-lived event loop, like the Python worker; sync functions
share a thread pool of `PYTHON_THREADPOOL_THREAD_COUNT` threads (the worker's setting;
default: Python's). On SIGINT, SIGTERM or SIGHUP the host stops polling and timers, stops
accepting requests, waits (bounded) for invocations in flight, and returns 0. A queue
message still being processed when the wait ends stays hidden until its lease runs out
(at most 10 minutes), as with the Functions host. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from tools.devhost.app import Function, FunctionApp, HttpTrigger, QueueTrigger, TimerTrigger
from tools.devhost.http import Route, build_web_app, compile_route
from tools.devhost.invoker import Invoker, Outcome
from tools.devhost.settings import HostError

logger = logging.getLogger(__name__)

LISTENER_STOP_TIMEOUT = 2.0  # seconds for a listener to finish its current storage call
THREAD_COUNT_SETTING = "PYTHON_THREADPOOL_THREAD_COUNT"
LEASE_SETTING = "DEVHOST_QUEUE_LEASE_SECONDS"  # dev/test only: see _lease_seconds


@dataclass(frozen=True, slots=True)
class HostOptions:
    host: str = "127.0.0.1"
    port: int = 7071
    shutdown_grace: float = 10.0  # seconds to wait for invocations in flight


class Listener(Protocol):
    function: Function

    async def run(self) -> None: ...
    def stop(self) -> None: ...
    async def invoke_manually(self, text: str) -> Outcome: ...


async def serve(app: FunctionApp, settings: Mapping[str, str], options: HostOptions) -> int:
    """Run the host until SIGINT/SIGTERM/SIGHUP; the exit code."""
    executor = ThreadPoolExecutor(_thread_count(settings), thread_name_prefix="devhost-sync")
    invoker = Invoker(executor, function_timeout=app.config.function_timeout)
    routes = [compile_route(app.config.route_prefix, f) for f in _of(app, HttpTrigger)]
    manual: dict[str, Any] = {}  # filled once the listeners exist
    started = asyncio.Event()  # set once every listener runs and the host has said so
    runner, port = await _start_http(
        build_web_app(
            routes,
            invoker,
            manual_triggers=manual,
            state=lambda: "Running" if started.is_set() else "Initialized",
        ),
        options,
    )
    # HTTP is served first: the queue and timer listeners need the storage SDK and
    # croniter, which take longer to import than everything an HTTP function needs.
    try:
        listeners, clients = _listeners(app, settings, invoker)
    except BaseException:
        await runner.cleanup()
        raise
    manual.update({listener.function.name: listener.invoke_manually for listener in listeners})
    stopping = _install_signal_handlers()
    tasks = [asyncio.create_task(listener.run()) for listener in listeners]
    for task in tasks:
        task.add_done_callback(_report_crash)
    _announce(app, routes, listeners, f"http://{_url_host(options.host)}:{port}")
    started.set()

    await stopping.wait()
    logger.info("Stopping the host")
    deadline = asyncio.get_running_loop().time() + options.shutdown_grace
    for listener in listeners:
        listener.stop()
    await _stop_listeners(tasks)
    remaining = max(0.1, deadline - asyncio.get_running_loop().time())
    _, idle = await asyncio.gather(runner.cleanup(), invoker.drain(remaining))
    for client in clients:
        await client.close()
    executor.shutdown(wait=False, cancel_futures=True)
    if not idle or invoker.running:
        logger.warning("%d invocation(s) still running; exiting without them", invoker.running)
        _exit_now(0)
    logger.info("Host stopped")
    return 0


def _thread_count(settings: Mapping[str, str]) -> int | None:
    """The worker's sync thread pool size; like the worker, a bad value falls back."""
    value = settings.get(THREAD_COUNT_SETTING, "").strip()
    if not value:
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    logger.warning("%s must be an integer of at least 1; using the default", THREAD_COUNT_SETTING)
    return None


async def _start_http(app: web.Application, options: HostOptions) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 picks a free port); the runner and the actual port."""
    # shutdown_timeout bounds how long runner.cleanup() waits for requests in flight.
    # Bodies reach functions as they came: the Functions host does not decompress a
    # `Content-Encoding: gzip` request (aiohttp would, by default).
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=options.shutdown_grace, auto_decompress=False
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise HostError(
            f"cannot listen on {options.host}:{options.port} ({exc.strerror})"
        ) from None
    return runner, runner.addresses[0][1]


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("A trigger listener stopped unexpectedly", exc_info=task.exception())


async def _stop_listeners(tasks: list[asyncio.Task[None]]) -> None:
    """Let listeners finish the storage call they are in, then cancel the stragglers.

    Invocations are not part of these tasks (they run under the invoker), so
    cancelling a listener never cuts a function short.
    """
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=LISTENER_STOP_TIMEOUT)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _listeners(
    app: FunctionApp, settings: Mapping[str, str], invoker: Invoker
) -> tuple[list[Listener], list[Any]]:
    """Timer and queue listeners, with schedules and connections checked up front."""
    listeners: list[Listener] = []
    clients: dict[Any, Any] = {}
    timer_functions = _of(app, TimerTrigger)
    if timer_functions:
        from tools.devhost.timer import TimerListener, parse_schedule

        for function in timer_functions:
            trigger = function.spec.trigger
            assert isinstance(trigger, TimerTrigger)
            where = f"{function.name}/function.json schedule"
            # From a %Setting%: named, its value not shown (it may be any setting's).
            shown = trigger.source if trigger.source not in ("", trigger.schedule) else None
            schedule = parse_schedule(trigger.schedule, settings, where=where, shown=shown)
            listeners.append(TimerListener(function, schedule, invoker))
    queue_functions = _of(app, QueueTrigger)
    if queue_functions:
        # Imported only when a queue trigger exists: azure.storage.queue is slow to import.
        from tools.devhost.queue import QueueListener
        from tools.devhost.storage import queue_service_client, resolve_connection

        for function in queue_functions:
            trigger = function.spec.trigger
            assert isinstance(trigger, QueueTrigger)
            where = f"{function.name}/function.json connection"
            connection = resolve_connection(trigger.connection, settings, where=where)
            if connection not in clients:
                clients[connection] = queue_service_client(connection, where=where)
            listeners.append(
                QueueListener(
                    function,
                    clients[connection],
                    app.config.queues,
                    invoker,
                    receive_visibility=_lease_seconds(settings),
                )
            )
    return listeners, list(clients.values())


def _lease_seconds(settings: Mapping[str, str]) -> float:
    """How long a received message stays hidden (renewed halfway while it runs).

    10 minutes, as the Functions host; `DEVHOST_QUEUE_LEASE_SECONDS` shortens it for tests
    that kill a host mid-invocation and want its messages back in seconds, not minutes.
    """
    from tools.devhost.queue import RECEIVE_VISIBILITY

    raw = settings.get(LEASE_SETTING, "").strip()
    if not raw:
        return RECEIVE_VISIBILITY
    try:
        value = float(raw)
    except ValueError:
        raise HostError(f"{LEASE_SETTING} must be a number of seconds") from None
    if not 2 <= value <= RECEIVE_VISIBILITY:
        raise HostError(f"{LEASE_SETTING} must be between 2 and {RECEIVE_VISIBILITY} seconds")
    return value


def _of(app: FunctionApp, kind: type) -> list[Function]:
    return [f for f in app.functions if isinstance(f.spec.trigger, kind)]


def _announce(
    app: FunctionApp, routes: Sequence[Route], listeners: Sequence[Listener], base_url: str
) -> None:
    """The startup listing on stdout: one line per function, with URLs for HTTP ones."""
    lines = ["Functions:"]
    for route in routes:
        methods = ",".join(sorted(route.methods)) if route.methods else "ANY"
        lines.append(f"  {route.function.name}: [{methods}] {base_url}{route.template}")
    for listener in listeners:
        trigger = listener.function.spec.trigger
        if isinstance(trigger, QueueTrigger):
            detail = f"queueTrigger (queue {trigger.queue_name})"
        else:
            assert isinstance(trigger, TimerTrigger)
            detail = f"timerTrigger (schedule {trigger.schedule})"
        lines.append(f"  {listener.function.name}: {detail}")
    if not app.functions:
        lines.append("  (none)")
    lines.append(f"Host started on {base_url} (Ctrl-C to stop)")
    print("\n".join(lines), flush=True)


REPEAT_GRACE = 1.0  # seconds within which a repeated signal is the same one


def _install_signal_handlers() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    first_at: list[float] = []

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            # One Ctrl-C can arrive twice at once (from the terminal, and forwarded by
            # `make`): only a signal sent a moment later means "stop waiting".
            if time.monotonic() - first_at[0] < REPEAT_GRACE:
                return
            logger.warning("Second %s: exiting now", signal.Signals(signum).name)
            _exit_now(1)
        logger.info("Received %s", signal.Signals(signum).name)
        first_at.append(time.monotonic())
        stopping.set()

    # SIGHUP: the terminal closed (the host shares the foreground process group of
    # `make run`, which stops on it too): stopped as cleanly as on Ctrl-C.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN:
            continue  # run under nohup (or a supervisor): kept ignored, as asked
        loop.add_signal_handler(signum, on_signal, signum)
    return stopping


def _exit_now(code: int) -> None:
    """Exit without joining worker threads a stuck sync function still occupies."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
