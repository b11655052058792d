"""HTTP triggers: an aiohttp server that routes `/{routePrefix}/{route}` to functions.

Routes follow the Functions host: matched case-insensitively on the path (decoded,
except that an encoded slash stays `%2F` inside a segment, as ASP.NET Core leaves it),
`{param}` segments (also `{param?}`, `{param:int}`, `{*rest}`) become `route_params`.
Routing is on path and method together, so a method a function does not list (HEAD
and OPTIONS included) is 404, like any unknown path. The function gets a real
`azure.functions.HttpRequest` shaped as the host passes it (header names lower-case,
repeated headers and query keys joined with commas, empty query values left out).
A body is passed only with a positive Content-Length, as the host passes it (a chunked
request's body does not reach the function). A failed invocation answers 500 with an
empty body; a named `http` output left unset
answers 200 with an empty body, as the host's default result.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import azure.functions as func
from aiohttp import web
from azure.functions.http import HttpRequest as WorkerHttpRequest
from multidict import CIMultiDict
from yarl import URL

from tools.devhost.app import Function, HttpTrigger
from tools.devhost.invoker import Invoker, Outcome

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 100 * 1024 * 1024  # the Functions host's request size limit
ADMIN_PREFIX = "/admin/"
_ENCODED_SLASH = re.compile("%2F", re.IGNORECASE)
_TOKEN = re.compile(r"(\{[^{}]*\})")
_PARAMETER = re.compile(
    r"^\{(?P<star>\*{1,2})?(?P<name>[A-Za-z_]\w*)(?::(?P<constraint>[^?=}]+))?"
    r"(?P<optional>\?)?(?:=(?P<default>[^}]*))?\}$"
)
_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "alpha": r"[A-Za-z]+",
    "bool": r"(?i:true|false)",
    "guid": r"[0-9A-Fa-f]{8}-?(?:[0-9A-Fa-f]{4}-?){3}[0-9A-Fa-f]{12}",
}

ManualTrigger = Callable[[str], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Route:
    function: Function
    template: str  # the path as written, for the startup listing
    pattern: re.Pattern[str]
    methods: frozenset[str] | None

    def allows(self, method: str) -> bool:
        return self.methods is None or method.upper() in self.methods


def compile_route(prefix: str, function: Function) -> Route:
    trigger = function.spec.trigger
    assert isinstance(trigger, HttpTrigger)
    segments = [s for s in (prefix.strip("/"), trigger.route.strip("/")) if s]
    template = "/" + "/".join(segments)
    regex = "".join(_segment(segment) for segment in "/".join(segments).split("/") if segment)
    pattern = re.compile(f"^{regex or '/'}/?$", re.IGNORECASE)
    return Route(function, template, pattern, trigger.methods)


def _segment(segment: str) -> str:
    whole = _PARAMETER.match(segment)
    if whole and (whole["optional"] or whole["default"] is not None or whole["star"]):
        # An optional or catch-all parameter may be absent together with its slash.
        value = ".*" if whole["star"] else _constraint(whole["constraint"])
        return f"(?:/(?P<{whole['name']}>{value}))?"
    parts = []
    for token in _TOKEN.split(segment):
        match = _PARAMETER.match(token)
        if match:
            parts.append(f"(?P<{match['name']}>{_constraint(match['constraint'])})")
        elif token:
            parts.append(re.escape(token))
    return "/" + "".join(parts)


def _constraint(constraint: str | None) -> str:
    return _CONSTRAINTS.get((constraint or "").split("(")[0].lower(), r"[^/]+")


def build_web_app(
    routes: list[Route],
    invoker: Invoker,
    *,
    manual_triggers: Mapping[str, ManualTrigger] | None = None,
    state: Callable[[], str] = lambda: "Running",
) -> web.Application:
    """One catch-all handler: admin endpoints first, then the function routes in order.

    `state` is what `GET /admin/host/status` says, as the Functions host: `Running` once
    every listener has started (HTTP is served before the queue and timer listeners)."""
    manual = manual_triggers if manual_triggers is not None else {}  # may fill in later

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            str(request.url)
        except ValueError:  # a Host header no URL can carry ("x:notaport"): the host's 400
            return web.Response(status=400)
        if request.path.startswith(ADMIN_PREFIX):
            if not (_from_this_machine(request) and _own_page(request)):
                return web.Response(status=403)
            return await _admin(request, manual, state)
        path = routing_path(request.raw_path)
        matches = [(r, m) for r in routes if (m := r.pattern.match(path))]
        for route, match in matches:
            if route.allows(request.method):
                return await _invoke(request, route, match, invoker)
        if matches:
            logger.debug("%s is not a method of %s (404, as the host)", request.method, path)
        else:
            logger.debug("No function for %s %s (404, as the host)", request.method, path)
        return web.Response(status=404)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _invoke(
    request: web.Request, route: Route, match: re.Match[str], invoker: Invoker
) -> web.StreamResponse:
    # The host passes the worker a body only when the request declares a positive
    # Content-Length: a chunked request reaches the function with an empty body.
    body = await request.read() if (request.content_length or 0) > 0 else b""
    trigger_request = WorkerHttpRequest(
        method=request.method,
        url=str(request.url),  # a Host no URL can carry was answered 400 before
        headers=_joined((name.lower(), value) for name, value in request.headers.items()),
        params={k: v for k, v in _joined(request.query.items()).items() if v},
        route_params={k: v for k, v in match.groupdict().items() if v is not None},
        body_type="bytes",
        body=body,
    )
    outcome = await invoker.invoke(route.function, lambda: trigger_request)
    if not outcome.succeeded:
        return web.Response(status=500)  # never the exception text: it may carry secrets
    output = route.function.spec.http_output
    value = outcome.value if output == "$return" else outcome.outputs.get(output or "")
    return to_web_response(value)  # the invoker checked it is an HttpResponse, str or None


def routing_path(raw_path: str) -> str:
    """The request path as the host routes on it: decoded, but `%2F` kept in a segment."""
    path = raw_path.split("?", 1)[0]
    return unquote(_ENCODED_SLASH.sub(lambda m: m.group(0).replace("%", "%25"), path))


def to_web_response(value: Any) -> web.Response:
    """An aiohttp response from an http output (HttpResponse, str, or None: unset)."""
    if value is None:
        return web.Response(status=200)
    if isinstance(value, str):
        return web.Response(status=200, text=value)
    if not isinstance(value, func.HttpResponse):
        raise TypeError(type(value).__name__)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, header in value.headers.items():
        headers.add(name, header)
    if "Content-Type" not in headers:
        mimetype = value.mimetype
        charset = f"; charset={value.charset}" if mimetype.startswith("text/") else ""
        headers["Content-Type"] = f"{mimetype}{charset}"
    return web.Response(status=value.status_code, body=value.get_body(), headers=headers)


# Headers a proxy, CDN or HTTP tunnel (Dev Tunnels, ngrok, ...) in front of the host adds
# (and any X-Forwarded-*): the caller is elsewhere, however local the connection.
_FORWARDED = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "x-original-host",
        "x-original-url",
        "cf-connecting-ip",
        "true-client-ip",
    }
)


def _from_this_machine(request: web.Request) -> bool:
    """Whether the caller connected from a loopback address, not through a proxy or an
    HTTP tunnel that says it forwarded the request. Azure's admin endpoints ask for the
    master key; this host has none, so one served beyond loopback (`--host`), or through
    a tunnel to test with Teams, would run a function (a broadcast, signed with the bot's
    token) for anyone who reaches it."""
    for name in request.headers:
        lowered = name.lower()
        if lowered in _FORWARDED or lowered.startswith("x-forwarded-"):
            return False
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _own_page(request: web.Request) -> bool:
    """Whether an admin request came to this host by its own address: a Host (and Origin,
    when a browser sent one) naming localhost or an IP address. A web page whose DNS name
    was rebound to 127.0.0.1 is same-origin to itself, and sends its own name."""

    def local(host: str | None) -> bool:
        host = (host or "").lower().strip("[]")
        if host == "localhost":
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    origin = request.headers.get("Origin")
    if origin is not None:
        try:
            if not local(URL(origin).host):
                return False  # "null" (a sandboxed page) included
        except ValueError:
            return False
    return local(request.url.host)


async def _admin(
    request: web.Request, manual: Mapping[str, ManualTrigger], state: Callable[[], str]
) -> web.Response:
    """`GET /admin/host/status` and `POST /admin/functions/<name>` (run a non-HTTP function)."""
    path = request.path.rstrip("/").lower()
    if path == "/admin/host/status" and request.method == "GET":
        return web.json_response({"state": state()})
    prefix = "/admin/functions/"
    if path.startswith(prefix) and request.method == "POST":
        name = request.path.rstrip("/")[len(prefix) :].lower()  # the host's names ignore case
        trigger = next((t for n, t in manual.items() if n.lower() == name), None)
        if trigger is None:
            return web.Response(status=404)
        # A JSON body only, as the host binds it: a web page the developer visits can send
        # a form or text/plain here without asking (no CORS preflight), never JSON.
        if request.content_type != "application/json":
            return web.Response(status=415, text='send JSON: {"input": "..."}')
        try:
            document = json.loads(await request.read())
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            return web.Response(status=400, text='body must be JSON: {"input": "..."}')
        text = document.get("input", "")
        outcome = await trigger(text if isinstance(text, str) else "")
        return web.Response(status=202 if outcome.succeeded else 500)
    return web.Response(status=404)


def _joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Repeated header/query names joined with commas, as the host does."""
    joined: dict[str, str] = {}
    for name, value in pairs:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined
