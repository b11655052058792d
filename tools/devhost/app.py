"""The function app as the host sees it: host.json, every `*/function.json`, the modules.

Reading function.json is strict: an unknown trigger or an unresolved `%Setting%` stops
the host at startup with a :class:`HostError` naming the function and the problem.
Loading the code is the Python worker's part, and done as it does it: modules are
imported as `__app__.<folder>` with the app root last on `sys.path`, and a function the
worker cannot load (its module fails to import; its `main` is missing, or its parameters
or annotations do not match its bindings) is logged at startup and fails each of its
invocations with that reason, while the other functions are served.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import azure.functions as func

from tools.devhost.settings import HostError, parse_timespan, resolve

logger = logging.getLogger(__name__)

HOST_JSON = "host.json"
FUNCTION_JSON = "function.json"
DEFAULT_CONNECTION = "AzureWebJobsStorage"
CONTEXT_PARAMETER = "context"
APP_PACKAGE = "__app__"  # the Python worker's package name for the function app root
MessageEncoding = Literal["base64", "none"]
# Storage queue names: 3-63 lower-case letters, digits and single hyphens, alphanumeric ends.
_QUEUE_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """host.json `extensions.queues` (defaults as the Functions host, except polling)."""

    max_polling_interval: float = 2.0  # seconds; Azure's default is 1 min, 2 s suits local runs
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    message_encoding: MessageEncoding = "base64"


@dataclass(frozen=True, slots=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)
    function_timeout: float | None = None  # seconds; None = no limit


@dataclass(frozen=True, slots=True)
class HttpTrigger:
    name: str
    route: str
    methods: frozenset[str] | None  # None: every method


@dataclass(frozen=True, slots=True)
class QueueTrigger:
    name: str
    queue_name: str
    connection: str
    data_type: str = ""  # function.json "dataType": "binary" passes bytes, otherwise a string


@dataclass(frozen=True, slots=True)
class TimerTrigger:
    name: str
    schedule: str
    run_on_startup: bool
    source: str = ""  # as function.json has it: a %Setting% names where the schedule came from


Trigger = HttpTrigger | QueueTrigger | TimerTrigger


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function folder: its trigger and how to find its code."""

    name: str
    directory: Path
    trigger: Trigger
    script_file: str = "__init__.py"
    entry_point: str = "main"
    http_output: str | None = None  # "$return" or a parameter name


@dataclass(frozen=True, slots=True)
class Function:
    """A loaded function: the spec plus its entry point."""

    spec: FunctionSpec
    main: Callable[..., Any]
    is_async: bool
    parameters: tuple[str, ...]
    trigger_annotation: type | None = None  # the trigger parameter's annotation, resolved

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class FunctionApp:
    root: Path
    config: HostConfig
    functions: tuple[Function, ...]


# App settings the Functions host reads over host.json's queue options (names compared
# without case, as the host's configuration does).
HOST_QUEUE_OVERRIDE = "azurefunctionsjobhost__extensions__queues__"
_QUEUE_INTEGERS = ("batchSize", "newBatchThreshold", "maxDequeueCount")
_QUEUE_TEXTS = ("maxPollingInterval", "visibilityTimeout", "messageEncoding")
# Their names by lower case: host.json and app settings name them in any case.
_QUEUE_NAMES = {name.lower(): name for name in (*_QUEUE_INTEGERS, *_QUEUE_TEXTS)}


def read_host_config(root: Path, settings: Mapping[str, str] | None = None) -> HostConfig:
    """host.json, with the queue options an app setting overrides as on Azure
    (``AzureFunctionsJobHost__extensions__queues__maxDequeueCount`` and the like)."""
    # Keys in any case, as the host reads host.json (.NET configuration).
    document = _folded(_read_json(root / HOST_JSON, HOST_JSON))
    extensions = _folded(_object(document.get("extensions", {}), "host.json extensions"))
    queues = _object(extensions.get("queues", {}), "host.json extensions.queues")
    queues = {_QUEUE_NAMES.get(key.lower(), key): value for key, value in queues.items()}
    queues.update(_queue_overrides(settings or {}))
    http = _folded(_object(extensions.get("http", {}), "host.json extensions.http"))
    prefix = str(http.get("routeprefix", "api")).strip("/")
    timeout = document.get("functiontimeout")
    function_timeout = None
    if timeout not in (None, "", "-1", -1):
        function_timeout = parse_timespan(timeout, where="host.json functionTimeout")
    return HostConfig(
        route_prefix=prefix,
        queues=_queue_options(queues),
        function_timeout=function_timeout,
    )


def _folded(section: Mapping[str, Any]) -> dict[str, Any]:
    """Keys in lower case; of keys that differ only in case the last wins and sections
    merge, as the host flattens host.json into case-blind configuration."""
    folded: dict[str, Any] = {}
    for key, value in section.items():
        name = key.lower()
        if isinstance(value, dict) and isinstance(folded.get(name), dict):
            folded[name] = {**folded[name], **value}
        else:
            folded[name] = value
    return folded


_WHOLE_NUMBER = re.compile(r"\+?[0-9]{1,9}")


def _queue_overrides(settings: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for setting, value in settings.items():
        lowered = setting.lower()
        if not lowered.startswith(HOST_QUEUE_OVERRIDE):
            continue
        name = _QUEUE_NAMES.get(lowered.removeprefix(HOST_QUEUE_OVERRIDE))
        if name is None:
            continue
        text = value.strip(" \t\n\v\f\r")  # the white space .NET's parse skips
        if name in _QUEUE_INTEGERS:
            if not _WHOLE_NUMBER.fullmatch(text):  # ASCII digits, as .NET reads them
                raise HostError(f"{setting}: expected a whole number, got {value!r}")
            overrides[name] = int(text)
        else:
            overrides[name] = text
    return overrides


def _queue_options(queues: Mapping[str, Any]) -> QueueOptions:
    where = "host.json extensions.queues"
    defaults = QueueOptions()
    batch_size = _integer(queues, "batchSize", defaults.batch_size, where, low=1, high=32)
    encoding = str(queues.get("messageEncoding", "base64")).lower()
    if encoding not in ("base64", "none"):
        raise HostError(f"{where}.messageEncoding: expected base64 or none, got {encoding!r}")
    threshold = batch_size // 2 * _processors()  # unset: the host's default, never refused
    if "newBatchThreshold" in queues:
        threshold = _integer(queues, "newBatchThreshold", 0, where, low=0, high=1000)
    return QueueOptions(
        max_polling_interval=max(
            0.1,
            parse_timespan(
                queues.get("maxPollingInterval", "00:00:02"), where=f"{where}.maxPollingInterval"
            ),
        ),
        visibility_timeout=parse_timespan(
            queues.get("visibilityTimeout", "00:00:00"), where=f"{where}.visibilityTimeout"
        ),
        batch_size=batch_size,
        new_batch_threshold=threshold,
        max_dequeue_count=_integer(
            queues, "maxDequeueCount", defaults.max_dequeue_count, where, low=1, high=1000
        ),
        message_encoding=encoding,  # type: ignore[arg-type]
    )


def discover_functions(
    root: Path, settings: Mapping[str, str], only: Sequence[str] | None = None
) -> list[FunctionSpec]:
    """Every enabled function folder under `root` (optionally only the named ones)."""
    folders = sorted(path.parent for path in root.glob(f"*/{FUNCTION_JSON}"))
    known = {folder.name for folder in folders}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise HostError(f"--functions: no function folder named {', '.join(unknown)}")
    specs = []
    for folder in folders:
        if only and folder.name not in only:
            continue
        spec = read_function(folder, settings)
        if spec is not None:
            specs.append(spec)
    return specs


def read_function(folder: Path, settings: Mapping[str, str]) -> FunctionSpec | None:
    """The folder's function.json as a spec, or None when the function is disabled."""
    name = folder.name
    where = f"{name}/{FUNCTION_JSON}"
    document = _read_json(folder / FUNCTION_JSON, where)
    if _is_disabled(name, document, settings):
        logger.info("Function '%s' is disabled", name)
        return None
    bindings = document.get("bindings")
    if not isinstance(bindings, list) or not all(isinstance(b, dict) for b in bindings):
        raise HostError(f"{where}: bindings must be a list of objects")
    triggers = [b for b in bindings if str(b.get("type", "")).endswith("Trigger")]
    if len(triggers) != 1:
        raise HostError(f"{where}: expected exactly one trigger binding, found {len(triggers)}")
    http_output = None
    for binding in bindings:
        if binding in triggers:
            continue
        if binding.get("type") == "http" and binding.get("direction") == "out":
            http_output = str(binding.get("name", "$return"))
            continue
        raise HostError(
            f"{where}: binding type {binding.get('type')!r} "
            f"(direction {binding.get('direction')!r}) is not supported by tools/devhost"
        )
    trigger = _trigger(name, triggers[0], settings, where)
    if isinstance(trigger, HttpTrigger) and http_output is None:
        raise HostError(f"{where}: an httpTrigger needs an http output binding")
    return FunctionSpec(
        name=name,
        directory=folder,
        trigger=trigger,
        script_file=str(document.get("scriptFile") or "__init__.py"),
        entry_point=str(document.get("entryPoint") or "main"),
        http_output=http_output,
    )


def _trigger(name: str, binding: Mapping[str, Any], settings: Mapping[str, str], where: str):
    kind = binding.get("type")
    param = binding.get("name")
    if not isinstance(param, str) or not param.isidentifier():
        raise HostError(f"{where}: the trigger binding needs a 'name' that is a Python identifier")
    if binding.get("direction", "in") != "in":
        raise HostError(f"{where}: a trigger binding's direction must be 'in'")
    if kind == "httpTrigger":
        methods = binding.get("methods") or None
        route = str(binding.get("route") or name).strip("/")
        return HttpTrigger(
            name=param,
            route=route,
            methods=frozenset(str(m).upper() for m in methods) if methods else None,
        )
    if kind == "queueTrigger":
        queue_name = binding.get("queueName")
        if not isinstance(queue_name, str) or not queue_name:
            raise HostError(f"{where}: queueTrigger needs a queueName")
        connection = str(binding.get("connection") or DEFAULT_CONNECTION)
        resolved = resolve(queue_name, settings, where=f"{where} queueName")
        if not _QUEUE_NAME.match(resolved):
            # From a %Setting%: named, its value not shown (it may be any setting's).
            shown = queue_name if resolved != queue_name else repr(resolved)
            raise HostError(
                f"{where} queueName: {shown} is not a valid queue name "
                "(3-63 lower-case letters, digits and single hyphens)"
            )
        return QueueTrigger(
            name=param,
            queue_name=resolved,
            connection=resolve(connection, settings, where=f"{where} connection"),
            data_type=str(binding.get("dataType") or "").lower(),
        )
    if kind == "timerTrigger":
        schedule = binding.get("schedule")
        if not isinstance(schedule, str) or not schedule.strip():
            raise HostError(f"{where}: timerTrigger needs a schedule")
        return TimerTrigger(
            name=param,
            schedule=resolve(schedule, settings, where=f"{where} schedule").strip(),
            run_on_startup=bool(binding.get("runOnStartup", False)),
            source=schedule.strip(),
        )
    raise HostError(
        f"{where}: trigger type {kind!r} is not supported by tools/devhost "
        "(httpTrigger, queueTrigger and timerTrigger are)"
    )


def load_function(spec: FunctionSpec) -> Function:
    """The function ready to run, or, when the worker could not load it, one whose every
    invocation fails with the reason (the host serves the other functions meanwhile)."""
    try:
        return make_function(spec, _entry_point(spec))
    except HostError as error:
        logger.error("Function '%s' failed to load: %s", spec.name, error)
        return failed_function(spec, str(error))


def _entry_point(spec: FunctionSpec) -> Callable[..., Any]:
    """Import `__app__.<folder>[.<script>]`, as the Python worker does, and find `main`."""
    module_name = _module_name(spec)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # SystemExit too: one module must not end the host
        logger.error("Function '%s': importing %s raised", spec.name, module_name, exc_info=exc)
        raise HostError(
            f"function {spec.name}: importing {module_name} failed ({type(exc).__name__})"
        ) from None
    main = getattr(module, spec.entry_point, None)
    if not callable(main):
        raise HostError(f"function {spec.name}: {module_name} has no function {spec.entry_point}")
    return main


class FunctionLoadError(Exception):
    """Raised by every invocation of a function the worker could not load."""


def failed_function(spec: FunctionSpec, reason: str) -> Function:
    """A stand-in whose invocations fail with `reason`, as the worker answers them."""

    async def not_loaded(**_: Any) -> None:
        raise FunctionLoadError(reason)

    parameters = [spec.trigger.name]
    if spec.http_output and spec.http_output != "$return":
        parameters.append(spec.http_output)
    return Function(spec=spec, main=not_loaded, is_async=True, parameters=tuple(parameters))


def make_function(spec: FunctionSpec, main: Callable[..., Any]) -> Function:
    """`main` checked against the spec's bindings, as the worker does when it loads it."""
    parameters = tuple(inspect.signature(main).parameters)
    _check_parameters(spec, parameters)
    return Function(
        spec=spec,
        main=main,
        is_async=inspect.iscoroutinefunction(main),
        parameters=parameters,
        trigger_annotation=_check_annotations(spec, main),
    )


def load_app(
    root: Path, settings: Mapping[str, str], only: Sequence[str] | None = None
) -> FunctionApp:
    """Read host.json and every function, then import them (settings already in os.environ)."""
    config = read_host_config(root, settings)
    specs = discover_functions(root, settings, only)
    install_app_package(root)
    return FunctionApp(root, config, tuple(load_function(spec) for spec in specs))


def install_app_package(root: Path) -> None:
    """Make the app importable as the Python worker does: the app root is the namespace
    package `__app__` (function modules are `__app__.<folder>`), and it is appended to
    `sys.path` last, so an installed package wins over an app folder of the same name.

    The local host's own start-up entry for the working folder (`python -m` puts it first)
    is taken off `sys.path`, as the worker's process has none, so the app resolves the same
    from any folder; `PYTHONPATH` entries stay, as they do for the worker.
    """
    folder = str(root)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)
    if folder not in sys.path:
        sys.path.append(folder)
    package = sys.modules.get(APP_PACKAGE)
    if package is None:
        spec = importlib.machinery.ModuleSpec(APP_PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [folder]
        package = importlib.util.module_from_spec(spec)
        sys.modules[APP_PACKAGE] = package
    elif folder not in package.__path__:
        package.__path__.append(folder)
    importlib.invalidate_caches()


def _module_name(spec: FunctionSpec) -> str:
    script = (spec.directory / spec.script_file).resolve()
    if script.suffix != ".py" or script.parent != spec.directory.resolve():
        raise HostError(
            f"function {spec.name}: scriptFile must be a .py file inside its folder, "
            f"got {spec.script_file!r}"
        )
    if not script.is_file():
        raise HostError(f"function {spec.name}: scriptFile {spec.script_file} does not exist")
    if script.name == "__init__.py":
        return f"{APP_PACKAGE}.{spec.name}"
    return f"{APP_PACKAGE}.{spec.name}.{script.stem}"


def _check_parameters(spec: FunctionSpec, parameters: tuple[str, ...]) -> None:
    bindings = {spec.trigger.name}
    if spec.http_output and spec.http_output != "$return":
        bindings.add(spec.http_output)
    extra = sorted(set(parameters) - bindings - {CONTEXT_PARAMETER})
    missing = sorted(bindings - set(parameters))
    if extra:
        raise HostError(
            f"function {spec.name}: parameters not declared in function.json: {', '.join(extra)}"
        )
    if missing:
        raise HostError(
            f"function {spec.name}: bindings without a parameter in "
            f"{spec.entry_point}(): {', '.join(missing)}"
        )


# What the worker's converters accept for a trigger parameter; str and bytes always pass
# (the worker's "generic" binding hands over the host's value as it is).
_TRIGGER_TYPES: dict[type, tuple[str, type]] = {
    HttpTrigger: ("httpTrigger", func.HttpRequest),
    QueueTrigger: ("queueTrigger", func.QueueMessage),
    TimerTrigger: ("timerTrigger", func.TimerRequest),
}


def _check_annotations(spec: FunctionSpec, main: Callable[..., Any]) -> type | None:
    """The worker's load-time annotation checks; the trigger parameter's resolved type."""
    try:
        hints = typing.get_type_hints(main)
    except Exception as exc:
        raise HostError(
            f"function {spec.name}: the annotations of {spec.entry_point}() cannot be resolved "
            f"({type(exc).__name__})"
        ) from None
    name = spec.trigger.name
    annotation = hints.get(name)
    if annotation is not None:
        kind, expected = _TRIGGER_TYPES[type(spec.trigger)]
        if not isinstance(annotation, type):
            raise HostError(
                f"function {spec.name}: binding {name} has invalid non-type annotation "
                f"{annotation!r}"
            )
        if not issubclass(annotation, expected | str | bytes):
            raise HostError(
                f'function {spec.name}: type of {name} binding in function.json "{kind}" '
                f'does not match its Python annotation "{annotation.__name__}"'
            )
    if spec.http_output == "$return" and "return" in hints:
        returned = hints["return"]
        if not isinstance(returned, type) or not issubclass(returned, func.HttpResponse | str):
            shown = getattr(returned, "__name__", repr(returned))
            raise HostError(
                f'function {spec.name}: Python return annotation "{shown}" does not match '
                'binding type "http"'
            )
    return annotation


def _is_disabled(name: str, document: Mapping[str, Any], settings: Mapping[str, str]) -> bool:
    flag = settings.get(f"AzureWebJobs.{name}.Disabled", "")
    return document.get("disabled") is True or flag.strip().lower() in ("true", "1")


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise HostError(f"{where}: not found (is --root the function app folder?)") from None
    except (OSError, ValueError) as exc:
        raise HostError(f"{where}: not readable JSON ({type(exc).__name__})") from None
    return _object(document, where)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HostError(f"{where}: must be a JSON object")
    return value


def _processors() -> int:
    """The processors this process may run on (the host's default newBatchThreshold is
    half a batch per processor)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _integer(
    section: Mapping[str, Any], key: str, default: int, where: str, *, low: int, high: int
) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HostError(f"{where}.{key}: expected an integer from {low} to {high}, got {value!r}")
    return value
