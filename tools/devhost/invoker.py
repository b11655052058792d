"""Run one function invocation: bind its arguments, call `main`, log one line.

Like the Python worker, async functions run on the host's one long-lived event loop
(module-level aiohttp sessions keep working across invocations) and sync functions
run in a thread pool. Binding the trigger value and encoding the outputs are part of
the invocation, so a body that cannot be bound, a value returned without a `$return`
binding, or an `http` `$return` that is not a response fails it, as in the worker.
Every invocation ends with one line such as
``Executed 'Functions.x' (Succeeded, Id=..., Duration=12ms)``; a failure also logs
its reason (a function's own exception with its traceback). Trigger payloads
(bodies, headers) are never logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func

from tools.devhost.app import CONTEXT_PARAMETER, Function, FunctionLoadError

logger = logging.getLogger(__name__)


class BindingError(Exception):
    """An input could not be bound or an output not encoded; the text names which."""


@dataclass(slots=True)
class Outcome:
    invocation_id: str
    succeeded: bool
    value: Any = None  # what main returned
    outputs: dict[str, Any] = field(default_factory=dict)  # values set on func.Out parameters


class Out(func.Out):
    """The value holder passed for a named output binding."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


@dataclass(frozen=True, slots=True)
class _TraceContext:
    trace_parent: str
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _RetryContext:
    retry_count: int = 0
    max_retry_count: int = 0
    exception: Any = None


class InvocationContext(func.Context):
    """What a function receives for a `context` parameter."""

    def __init__(self, invocation_id: str, function: Function) -> None:
        self._invocation_id = invocation_id
        self._function = function
        self._thread_local = threading.local()
        self._trace = _TraceContext(f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00")
        self._retry = _RetryContext()

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> threading.local:  # type: ignore[override]
        return self._thread_local

    @property
    def function_name(self) -> str:
        return self._function.name

    @property
    def function_directory(self) -> str:
        return str(self._function.spec.directory)

    @property
    def trace_context(self) -> Any:
        return self._trace

    @property
    def retry_context(self) -> Any:
        return self._retry


class Invoker:
    """Invokes functions and keeps track of everything still running, for shutdown."""

    def __init__(self, executor: Executor, *, function_timeout: float | None = None) -> None:
        self._executor = executor
        self._function_timeout = function_timeout
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = 0

    @property
    def running(self) -> int:
        """Invocations in progress (HTTP, queue, timer)."""
        return self._running

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run background work (a queue message, a timer tick) that shutdown waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, grace: float) -> bool:
        """Wait until nothing is running, at most `grace` seconds; True when idle."""
        deadline = time.monotonic() + grace
        while self._tasks or self._running:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=min(remaining, 0.5))
            else:
                await asyncio.sleep(min(remaining, 0.05))
        return True

    async def invoke(self, function: Function, bind: Callable[[], Any]) -> Outcome:
        """Run `function` once; `bind()` makes its trigger value, inside the invocation."""
        invocation_id = str(uuid.uuid4())
        outputs = {
            name: Out()
            for name in function.parameters
            if name not in (function.spec.trigger.name, CONTEXT_PARAMETER)
        }
        started = time.perf_counter()
        self._running += 1
        try:
            kwargs: dict[str, Any] = {function.spec.trigger.name: bind(), **outputs}
            if CONTEXT_PARAMETER in function.parameters:
                kwargs[CONTEXT_PARAMETER] = InvocationContext(invocation_id, function)
            value = await self._call(function, kwargs)
            _check_outputs(function, value, outputs)
        except BaseException as exc:
            self._log_executed(function, invocation_id, started, failed=True)
            if not isinstance(exc, Exception):
                raise  # cancellation / exit: not the function's failure to report
            self._log_failure(function, invocation_id, started, exc)
            return Outcome(invocation_id, succeeded=False)
        finally:
            self._running -= 1
        self._log_executed(function, invocation_id, started, failed=False)
        return Outcome(
            invocation_id,
            succeeded=True,
            value=value,
            outputs={name: out.get() for name, out in outputs.items()},
        )

    def _log_failure(
        self, function: Function, invocation_id: str, started: float, exc: Exception
    ) -> None:
        timeout = self._function_timeout
        if isinstance(exc, TimeoutError) and timeout and _elapsed(started) >= timeout:
            logger.error(
                "Function '%s' timed out after %ss (Id=%s)", function.name, timeout, invocation_id
            )
        elif isinstance(exc, FunctionLoadError):
            logger.error(
                "Function '%s' is not loaded: %s (Id=%s)", function.name, exc, invocation_id
            )
        elif isinstance(exc, BindingError):
            # The host's own reason; it names a parameter or a type, never a payload.
            logger.error("Function '%s': %s (Id=%s)", function.name, exc, invocation_id)
        else:
            # Tracebacks are what a developer needs; payloads are never part of this line.
            logger.error(
                "Function '%s' raised %s (Id=%s)",
                function.name,
                type(exc).__name__,
                invocation_id,
                exc_info=exc,
            )

    async def _call(self, function: Function, kwargs: dict[str, Any]) -> Any:
        if function.is_async:
            async with asyncio.timeout(self._function_timeout):
                return await function.main(**kwargs)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function.main, **kwargs)
        # A thread cannot be stopped: past the timeout the invocation fails (a 500, a
        # message retried) as the host's does, while the thread runs on to its end.
        return await asyncio.wait_for(
            loop.run_in_executor(self._executor, call), self._function_timeout
        )

    @staticmethod
    def _log_executed(function: Function, invocation_id: str, started: float, *, failed: bool):
        duration_ms = round(_elapsed(started) * 1000)
        logger.info(
            "Executed 'Functions.%s' (%s, Id=%s, Duration=%dms)",
            function.name,
            "Failed" if failed else "Succeeded",
            invocation_id,
            duration_ms,
        )


def _check_outputs(function: Function, value: Any, outputs: dict[str, Out]) -> None:
    """What the worker checks when it encodes the results of an invocation."""
    http_output = function.spec.http_output
    if http_output != "$return" and value is not None:
        raise BindingError(
            f"function '{function.name}' without a $return binding returned a non-None value"
        )
    if http_output == "$return":
        _check_http_value(value)
    elif http_output and outputs[http_output].get() is not None:
        _check_http_value(outputs[http_output].get())


def _check_http_value(value: Any) -> None:
    if not isinstance(value, func.HttpResponse | str):
        raise BindingError(
            f'unable to encode outgoing TypedData: unsupported type "http" for Python type '
            f'"{type(value).__name__}"'
        )


def _elapsed(started: float) -> float:
    return time.perf_counter() - started
