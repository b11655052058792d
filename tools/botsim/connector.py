"""botsim's fake Bot Connector: the 15 operations of Connector REST v3 over local HTTP.

It records every request (method, raw percent-encoded path, decoded path parameters,
query, headers, JSON body, arrival time), answers with sensible defaults, replays
scripted replies (statuses, Teams error bodies, Retry-After, delays, dropped
connections), can enforce the Teams per-conversation limits (7/1 s, 8/2 s, 60/30 s, 1,800/h →
429, with a record of violations) and hands each activity the bot sends to subscribers
as it arrives (the chat command prints them).

    with FakeConnector() as connector:
        ...  # point the bot at connector.url
        connector.script("POST", r"/activities$", [Reply(429, headers={"Retry-After": "1"})])
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from shared.windows import TEAMS_CONVERSATION_WINDOWS, Window
from tools.botsim.server import BackgroundServer

logger = logging.getLogger(__name__)

_UNSET: Any = object()

# (method, pattern on the raw path after any serviceUrl prefix, operationId); order matters:
# ".../activities/history" must win over ".../activities/{activityId}".
_SEG = r"(?P<{}>[^/]+)"
_CONV = "/v3/conversations/" + _SEG.format("conversationId")
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern + "$"), operation)
    for method, pattern, operation in (
        ("GET", "/v3/conversations", "getConversations"),
        ("POST", "/v3/conversations", "createConversation"),
        ("POST", _CONV + "/activities/history", "sendConversationHistory"),
        ("POST", _CONV + "/activities", "sendToConversation"),
        (
            "GET",
            _CONV + "/activities/" + _SEG.format("activityId") + "/members",
            "getActivityMembers",
        ),
        ("POST", _CONV + "/activities/" + _SEG.format("activityId"), "replyToActivity"),
        ("PUT", _CONV + "/activities/" + _SEG.format("activityId"), "updateActivity"),
        ("DELETE", _CONV + "/activities/" + _SEG.format("activityId"), "deleteActivity"),
        ("GET", _CONV + "/members", "getConversationMembers"),
        ("GET", _CONV + "/pagedmembers", "getConversationPagedMembers"),
        ("GET", _CONV + "/members/" + _SEG.format("memberId"), "getConversationMember"),
        ("DELETE", _CONV + "/members/" + _SEG.format("memberId"), "deleteConversationMember"),
        ("POST", _CONV + "/attachments", "uploadAttachment"),
        ("GET", "/v3/attachments/" + _SEG.format("attachmentId"), "getAttachmentInfo"),
        (
            "GET",
            "/v3/attachments/" + _SEG.format("attachmentId") + "/views/" + _SEG.format("viewId"),
            "getAttachment",
        ),
    )
)
OPERATIONS = tuple(operation for _, _, operation in _ROUTES)
ACTIVITY_OPERATIONS = frozenset(
    {"sendToConversation", "replyToActivity", "updateActivity", "deleteActivity"}
)

THROTTLED_BODY = {"error": {"code": "Throttled", "message": "Too many requests."}}
# What the services refuse with 413 MessageSizeTooBig: the Bot Connector any request body
# over 256 KiB; Teams a message over about 100 KB, counted as UTF-16 (its documentation).
MAX_BODY_BYTES = 262_144
TEAMS_MAX_UTF16_BYTES = 102_400
_SIZED_OPERATIONS = frozenset({"sendToConversation", "replyToActivity", "updateActivity"})


@dataclass(slots=True)
class Reply:
    """One scripted answer. ``drop`` closes the connection without answering."""

    status: int = 200
    json: Any = _UNSET
    body: bytes | str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass(slots=True)
class RecordedRequest:
    method: str
    raw_path: str  # as sent, percent-encoding intact, without the query
    path: str  # decoded
    operation: str | None  # operationId, None for unknown routes
    params: dict[str, str]  # decoded path parameters
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    body: bytes
    time: float
    status: int = 0  # what the fake answered
    response: Any = None  # the JSON it answered with, if any

    @property
    def conversation_id(self) -> str | None:
        return self.params.get("conversationId")

    @property
    def activity(self) -> dict[str, Any] | None:
        return self.json if isinstance(self.json, dict) else None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass(frozen=True, slots=True)
class Violation:
    """A request the fake answered 429 because it broke a limit."""

    conversation_id: str | None  # None for the global and tenant limits
    window: Window
    time: float
    tenant_id: str | None = None  # which tenant's limit, for a tenant_limit violation


@dataclass(slots=True)
class _Script:
    method: str
    pattern: re.Pattern[str]
    replies: deque[Reply]


def default_members(conversation_id: str) -> list[dict[str, Any]]:
    return [
        {
            "id": "29:user-1",
            "name": "User One",
            "aadObjectId": "00000000-0000-0000-0000-000000000001",
            "role": "user",
        },
        {
            "id": "29:user-2",
            "name": "User Two",
            "aadObjectId": "00000000-0000-0000-0000-000000000002",
            "role": "user",
        },
        {"id": "28:bot", "name": "Bot", "role": "bot"},
    ]


# Teams' per-thread limits in full: the bot's pacer keeps to the first three and leaves the
# hour's 1,800 to the channel, which this enforces as Teams does.
TEAMS_THREAD_WINDOWS: tuple[Window, ...] = (*TEAMS_CONVERSATION_WINDOWS, Window(1800, 3600.0))


class FakeConnector:
    """The fake Connector service. Start with :meth:`start` or use it as a context manager."""

    def __init__(
        self,
        *,
        enforce_limits: bool = False,
        windows: Sequence[Window] = TEAMS_THREAD_WINDOWS,
        global_limit: Window | None = None,
        tenant_limit: Window | None = None,
        clock: Callable[[], float] = time.monotonic,
        auth_check: Callable[[str | None], bool] | None = None,
        redirect_attachments: bool = True,
        refuse_browsers: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.enforce_limits = enforce_limits
        self.windows = tuple(windows)
        self.global_limit = global_limit
        self.tenant_limit = tenant_limit  # per Teams tenant named in the body (Teams: ~50/s)
        # conversation id -> tenant, for requests whose body names no tenant (Teams knows a
        # conversation's tenant; a bot may send only the conversation id)
        self.conversation_tenants: dict[str, str] = {}
        self.auth_check = auth_check
        self.redirect_attachments = redirect_attachments
        # A person's chat listens here: what a web page open in their browser sends (a
        # form's or a fetch's POST needs no preflight) must not show as the bot's.
        self.refuse_browsers = refuse_browsers
        self.members: dict[str, list[dict[str, Any]]] = {}
        self.attachments: dict[str, dict[str, Any]] = {}
        self.conversations: list[dict[str, Any]] = []
        self._clock = clock
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        # Where attachment views redirect to (not Connector operations): (path, Authorization).
        self._blob_fetches: list[tuple[str, str | None]] = []
        self._scripts: list[_Script] = []
        self._violations: list[Violation] = []
        self._arrivals: dict[str, deque[float]] = {}
        self._global_arrivals: deque[float] = deque()
        self._tenant_arrivals: dict[str | None, deque[float]] = {}
        self._subscribers: list[Callable[[RecordedRequest], None]] = []
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:[\\s\\S]*}", self._handle)
        self.server = BackgroundServer(self.app, host=host, port=port)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The serviceUrl to give the bot (no trailing slash)."""
        return self.server.url

    def start(self) -> FakeConnector:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> FakeConnector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget requests, scripts, violations, subscribers and stored data."""
        with self._lock:
            self._requests.clear()
            self._blob_fetches.clear()
            self._scripts.clear()
            self._violations.clear()
            self._arrivals.clear()
            self._global_arrivals.clear()
            self._tenant_arrivals.clear()
            self._subscribers.clear()
            self.members.clear()
            self.attachments.clear()
            self.conversations.clear()
            self.enforce_limits = False
            self.global_limit = None
            self.tenant_limit = None
            self.conversation_tenants = {}
            self.auth_check = None
            self.redirect_attachments = True

    # --- what tests read --------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def violations(self) -> list[Violation]:
        with self._lock:
            return list(self._violations)

    @property
    def blob_fetches(self) -> list[tuple[str, str | None]]:
        """Requests for the bytes an attachment view redirected to: (raw path, the
        Authorization header or None)."""
        with self._lock:
            return list(self._blob_fetches)

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.operation == operation]

    @property
    def activities(self) -> list[dict[str, Any]]:
        """The activities the bot sent, replied or updated (answered 2xx), in arrival order."""
        return [
            r.json
            for r in self.requests
            if r.operation in ACTIVITY_OPERATIONS and isinstance(r.json, dict) and r.status < 300
        ]

    async def wait_for(
        self,
        predicate: Callable[[list[RecordedRequest]], Any],
        timeout: float = 5.0,  # noqa: ASYNC109 - a plain deadline reads best in tests
    ) -> Any:
        """Wait until ``predicate(requests)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self.requests)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fake Connector: condition not met within {timeout} s")
            await asyncio.sleep(0.01)

    def wait_for_sync(
        self, predicate: Callable[[list[RecordedRequest]], Any], timeout: float = 5.0
    ) -> Any:
        """Blocking :meth:`wait_for`, for code without an event loop (the chat command)."""
        with self._lock:
            result = self._lock.wait_for(lambda: predicate(list(self._requests)), timeout)
        if not result:
            raise TimeoutError(f"fake Connector: condition not met within {timeout} s")
        return result

    # --- what tests set up ------------------------------------------------------------

    def script(self, method: str, path_regex: str, replies: Iterable[Reply]) -> None:
        """Answer matching requests with ``replies`` in order, then with the defaults.

        ``method`` is an HTTP method or ``"*"``; ``path_regex`` is searched in the raw
        (percent-encoded) path.
        """
        with self._lock:
            self._scripts.append(_Script(method.upper(), re.compile(path_regex), deque(replies)))

    def subscribe(
        self,
        target: Callable[[RecordedRequest], None] | asyncio.Queue[RecordedRequest],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Callable[[], None]:
        """Receive each activity operation the bot makes (send, reply, update, delete).

        ``target`` is a callback (called on the server's thread) or an ``asyncio.Queue``
        fed on ``loop`` (default: the running loop of the caller). Returns an unsubscribe
        function.
        """
        if isinstance(target, asyncio.Queue):
            queue = target
            queue_loop = loop or asyncio.get_running_loop()

            def callback(request: RecordedRequest) -> None:
                queue_loop.call_soon_threadsafe(queue.put_nowait, request)
        else:
            callback = target
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    # --- the server side --------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock()
        raw_path = request.raw_path.split("?", 1)[0]
        if raw_path.startswith("/_blobs/"):
            with self._lock:
                self._blob_fetches.append((raw_path, request.headers.get("Authorization")))
            return self._blob(raw_path)
        body = await request.read()
        if self.refuse_browsers:
            refusal = _browser_refusal(request, body)
            if refusal is not None:
                return refusal
        payload = _json_or_none(body)
        recorded = self._record(request, raw_path, body, payload, arrived)
        reply = self._next_script(request.method, raw_path)
        if reply is not None:
            return await self._scripted(request, recorded, reply)
        status, answer = self._answer(request, recorded, arrived)
        return self._respond(recorded, status, answer)

    def _record(
        self, request: web.Request, raw_path: str, body: bytes, payload: Any, arrived: float
    ) -> RecordedRequest:
        prefix_end = raw_path.find("/v3/")
        route_path = raw_path[prefix_end:] if prefix_end >= 0 else raw_path
        operation, params = _match(request.method, route_path)
        recorded = RecordedRequest(
            method=request.method,
            raw_path=raw_path,
            path=unquote(raw_path),
            operation=operation,
            params=params,
            query=dict(request.query),
            headers=dict(request.headers),
            json=payload,
            body=body,
            time=arrived,
        )
        with self._lock:
            self._requests.append(recorded)
        return recorded

    def _next_script(self, method: str, raw_path: str) -> Reply | None:
        with self._lock:
            for script in self._scripts:
                if (
                    script.replies
                    and script.method in ("*", method)
                    and script.pattern.search(raw_path)
                ):
                    return script.replies.popleft()
        return None

    async def _scripted(
        self, request: web.Request, recorded: RecordedRequest, reply: Reply
    ) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop:
            # A connection reset as the client sees it: no status line, socket closed.
            if request.transport is not None:
                request.transport.abort()
            self._finish(recorded, 0, None)
            return web.Response(status=500)
        if reply.json is not _UNSET:
            self._finish(recorded, reply.status, reply.json)
            return web.json_response(reply.json, status=reply.status, headers=reply.headers)
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        self._finish(recorded, reply.status, None)
        return web.Response(status=reply.status, body=body, headers=reply.headers)

    def _answer(
        self, request: web.Request, recorded: RecordedRequest, arrived: float
    ) -> tuple[int, Any]:
        if self.auth_check is not None and not self.auth_check(_bearer(recorded.authorization)):
            return 401, {
                "error": {"code": "Unauthorized", "message": "Authorization has been denied."}
            }
        if recorded.operation is None:
            return 404, {"error": {"code": "NotFound", "message": "No such operation."}}
        if recorded.operation in _SIZED_OPERATIONS and _too_big(recorded):
            return 413, {
                "error": {"code": "MessageSizeTooBig", "message": "The message is too large."}
            }
        violation = self._check_limits(recorded, arrived)
        if violation is not None:
            return 429, THROTTLED_BODY
        return self._default(request, recorded)

    def _check_limits(self, recorded: RecordedRequest, arrived: float) -> Violation | None:
        """The first limit this request breaks (recorded as a violation), or None; only
        an admitted request counts against any of them."""
        with self._lock:
            checks: list[tuple[deque[float], Sequence[Window], str | None, str | None]] = []
            if self.global_limit is not None:
                checks.append((self._global_arrivals, (self.global_limit,), None, None))
            if self.tenant_limit is not None:
                tenant = _tenant(recorded.json)
                if tenant is None and recorded.conversation_id is not None:
                    key = recorded.conversation_id.split(";", 1)[0]
                    tenant = self.conversation_tenants.get(key)
                arrivals = self._tenant_arrivals.setdefault(tenant, deque())
                checks.append((arrivals, (self.tenant_limit,), None, tenant))
            conversation = recorded.conversation_id
            if self.enforce_limits and conversation is not None and recorded.method != "GET":
                arrivals = self._arrivals.setdefault(conversation.split(";", 1)[0], deque())
                checks.append((arrivals, self.windows, conversation, None))
            for arrivals, windows, name, tenant in checks:
                violation = _refusal(arrivals, windows, arrived, name, tenant)
                if violation is not None:
                    self._violations.append(violation)
                    return violation
            for arrivals, _, _, _ in checks:
                arrivals.append(arrived)
            return None

    def _respond(self, recorded: RecordedRequest, status: int, answer: Any) -> web.StreamResponse:
        self._finish(
            recorded, status, answer if not isinstance(answer, web.StreamResponse) else None
        )
        if isinstance(answer, web.StreamResponse):
            return answer
        headers = {"Retry-After": "1"} if status == 429 else None
        if answer is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(answer, status=status, headers=headers)

    def _finish(self, recorded: RecordedRequest, status: int, answer: Any) -> None:
        with self._lock:
            recorded.status = status
            recorded.response = answer
            subscribers = (
                list(self._subscribers) if recorded.operation in ACTIVITY_OPERATIONS else []
            )
            self._lock.notify_all()
        if 200 <= status < 300:
            for callback in subscribers:
                try:
                    callback(recorded)
                except Exception as error:  # a watcher never changes the channel's answer
                    logger.warning("botsim: a subscriber failed: %s", type(error).__name__)

    # --- default answers, one per operation ---------------------------------------------

    def _default(self, request: web.Request, recorded: RecordedRequest) -> tuple[int, Any]:
        op, params, body = recorded.operation, recorded.params, recorded.json
        conversation = params.get("conversationId", "")
        if op in ("sendToConversation", "replyToActivity", "sendConversationHistory"):
            return 200, {"id": f"activity-{next(self._ids)}"}
        if op == "updateActivity":
            return 200, {"id": params["activityId"]}
        if op in ("deleteActivity",):
            return 200, None
        if op == "createConversation":
            return self._create_conversation(request, recorded)
        if op == "getConversations":
            return 200, self._page(self.conversations, recorded.query, "conversations", 100)
        if op in ("getConversationMembers", "getActivityMembers"):
            return 200, self._members(conversation)
        if op == "getConversationPagedMembers":
            return 200, self._page(self._members(conversation), recorded.query, "members", 200)
        if op == "getConversationMember":
            member = self._find_member(conversation, params["memberId"])
            if member is None:
                return 404, {
                    "error": {
                        "code": "MemberNotFoundInConversation",
                        "message": "The member was not found.",
                    }
                }
            return 200, member
        if op == "deleteConversationMember":
            members = self._members(conversation)
            self.members[conversation] = [m for m in members if m.get("id") != params["memberId"]]
            return 200, None
        if op == "uploadAttachment":
            attachment_id = f"attachment-{next(self._ids)}"
            self.attachments[attachment_id] = dict(body or {})
            return 200, {"id": attachment_id}
        if op == "getAttachmentInfo":
            return self._attachment_info(params["attachmentId"])
        if op == "getAttachment":
            return self._attachment_view(request, params["attachmentId"], params["viewId"])
        return 404, {"error": {"code": "NotFound", "message": "No such operation."}}

    def _create_conversation(
        self, request: web.Request, recorded: RecordedRequest
    ) -> tuple[int, Any]:
        parameters = recorded.json if isinstance(recorded.json, dict) else {}
        conversation_id = f"a:conversation-{next(self._ids)}"
        prefix = recorded.raw_path[: recorded.raw_path.find("/v3/")]
        service_url = f"{self.url}{prefix}/"
        entry = {"id": conversation_id, "members": parameters.get("members") or []}
        self.conversations.append(entry)
        if parameters.get("members"):
            self.members[conversation_id] = [dict(m) for m in parameters["members"]]
        answer: dict[str, Any] = {"id": conversation_id, "serviceUrl": service_url}
        if isinstance(parameters.get("activity"), dict):
            answer["activityId"] = f"activity-{next(self._ids)}"
        return 201 if parameters.get("isGroup") else 200, answer

    def _members(self, conversation_id: str) -> list[dict[str, Any]]:
        if conversation_id not in self.members:
            return default_members(conversation_id)
        return self.members[conversation_id]

    def _find_member(self, conversation_id: str, member_id: str) -> dict[str, Any] | None:
        for member in self._members(conversation_id):
            if member_id in (member.get("id"), member.get("aadObjectId")):
                return member
        return None

    @staticmethod
    def _page(
        items: list[dict[str, Any]], query: Mapping[str, str], key: str, default_size: int
    ) -> dict[str, Any]:
        try:
            start = int(query.get("continuationToken") or 0)
            size = int(query.get("pageSize") or default_size)
        except ValueError:
            start, size = 0, default_size
        page: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            page["continuationToken"] = str(start + size)
        return page

    def _attachment_info(self, attachment_id: str) -> tuple[int, Any]:
        attachment = self.attachments.get(attachment_id)
        if attachment is None:
            return 404, {"error": {"code": "NotFound", "message": "Attachment not found."}}
        views = [
            {"viewId": view, "size": len(_view_bytes(attachment, view) or b"")}
            for view in ("original", "thumbnail")
            if _view_bytes(attachment, view) is not None
        ]
        return 200, {"name": attachment.get("name"), "type": attachment.get("type"), "views": views}

    def _attachment_view(
        self, request: web.Request, attachment_id: str, view_id: str
    ) -> tuple[int, Any]:
        content = _view_bytes(self.attachments.get(attachment_id) or {}, view_id)
        if content is None:
            return 404, {"error": {"code": "NotFound", "message": "Attachment view not found."}}
        if self.redirect_attachments:
            location = f"/_blobs/{attachment_id}/{view_id}"
            return 302, web.Response(status=302, headers={"Location": location})
        return 200, web.Response(body=content, content_type="application/octet-stream")

    def _blob(self, raw_path: str) -> web.Response:
        _, _, attachment_id, view_id = [*raw_path.split("/"), "", "", "", ""][:4]
        content = _view_bytes(self.attachments.get(unquote(attachment_id)) or {}, unquote(view_id))
        if content is None:
            return web.Response(status=404)
        return web.Response(body=content, content_type="application/octet-stream")


def _tenant(payload: Any) -> str | None:
    """The Teams tenant a request's body names (conversation.tenantId, channelData.tenant.id)."""
    if not isinstance(payload, dict):
        return None
    conversation = payload.get("conversation")
    if isinstance(conversation, dict) and isinstance(conversation.get("tenantId"), str):
        return conversation["tenantId"]
    tenant = (payload.get("channelData") or {}).get("tenant")
    if isinstance(tenant, dict) and isinstance(tenant.get("id"), str):
        return tenant["id"]
    return payload.get("tenantId") if isinstance(payload.get("tenantId"), str) else None


def _refusal(
    arrivals: deque[float],
    windows: Sequence[Window],
    now: float,
    conversation: str | None,
    tenant: str | None = None,
) -> Violation | None:
    """The window an arrival now would overflow, or None (arrivals older than every
    window are dropped; the arrival itself is not counted here)."""
    span = max(w.seconds for w in windows)
    while arrivals and arrivals[0] <= now - span:
        arrivals.popleft()
    for window in windows:
        inside = sum(1 for t in arrivals if t > now - window.seconds)
        if inside + 1 > window.limit:
            return Violation(conversation, window, now, tenant)
    return None


def _match(method: str, route_path: str) -> tuple[str | None, dict[str, str]]:
    for route_method, pattern, operation in _ROUTES:
        if route_method != method:
            continue
        found = pattern.match(route_path)
        if found:
            return operation, {k: unquote(v) for k, v in found.groupdict().items()}
    return None, {}


def _view_bytes(attachment: Mapping[str, Any], view_id: str) -> bytes | None:
    encoded = attachment.get(f"{view_id}Base64")
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded)
    except ValueError:
        return None


def _too_big(recorded: RecordedRequest) -> bool:
    body = recorded.body
    if len(body) > MAX_BODY_BYTES:
        return True
    payload = recorded.json
    if not isinstance(payload, dict) or payload.get("channelId") != "msteams":
        return False
    # The message as text, not as sent: a client's JSON may spell é or 中 as \\u escapes.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-16-le", "surrogatepass")) > TEAMS_MAX_UTF16_BYTES


def _json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer ") :]
    return None


def _browser_refusal(request: web.Request, body: bytes) -> web.Response | None:
    """The answer to a request a web page sent (a browser names the page's site in
    `Origin` or `Sec-Fetch-Site`), or to a body that is not JSON, which the bot's client
    never sends; None for what the bot sends."""
    site = request.headers.get("Sec-Fetch-Site", "none").strip().lower()
    if "Origin" in request.headers or site != "none":
        return web.Response(status=403, text="requests from web pages are refused")
    if (body or request.method in ("POST", "PUT")) and request.content_type != "application/json":
        return web.Response(status=415, text="only application/json is accepted")
    return None
