"""The Connector client's HTTP plumbing: the session, when a request left, request bodies
and URLs, one exchange with its redirects, bounded reads of the answers, where a redirect
may lead."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, urlencode

import aiohttp
import yarl

from shared.connector.errors import ConnectorError, ErrorKind
from shared.serviceurl import ServiceTarget, host_for_log
from shared.urls import is_loopback_host

log = logging.getLogger("shared.connector")  # the package logs under one name

Expect = Literal["dict", "list", "none", "bytes"]

MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # a larger answer is refused, not read into memory
MAX_ERROR_BODY_BYTES = 64 * 1024  # enough for any error document; the rest is not read
# An answer whose status decides (an error, a 2xx in DONE_ON_STATUS): its body gets this long.
DONE_BODY_SECONDS = 5.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5  # attachment views only


# Set by requests_leaving for the code it wraps: a request created within it marks it as
# it is written (the context of the task that made the request, or of one it awaits).
_LEAVING: ContextVar[list[bool] | None] = ContextVar("leaving", default=None)


@contextmanager
def requests_leaving() -> Iterator[Callable[[], bool]]:
    """Within the block, whether a Connector request made in it was written to its
    connection (so may have reached the channel), as far as the session stamps departures
    (:func:`departure_tracing`)."""
    left = [False]
    token = _LEAVING.set(left)
    try:
        yield lambda: left[0]
    finally:
        _LEAVING.reset(token)


class Departure:
    """When one request was written to its connection: ``at``, on ``clock`` (None until
    then). Passed to aiohttp as the request's ``trace_request_ctx``; the tracing of
    :func:`departure_tracing` stamps it, and each stamp is passed on to ``on_left(previous,
    at)`` (``previous``: the stamp before, None for the first) as it happens, and marks
    the :func:`requests_leaving` block it was made in."""

    __slots__ = ("at", "clock", "leaving", "on_left", "writes")

    def __init__(
        self,
        clock: Callable[[], float],
        on_left: Callable[[float | None, float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_left = on_left
        self.at: float | None = None
        # Times its headers were written: more than one when aiohttp wrote it again (its
        # own retry of a request whose reused connection dropped).
        self.writes = 0
        self.leaving = _LEAVING.get()

    def stamp(self, *, headers: bool = False) -> None:
        previous, self.at = self.at, self.clock()
        if headers:
            self.writes += 1
        if self.leaving is not None:
            self.leaving[0] = True
        if self.on_left is not None:
            self.on_left(previous, self.at)


async def _written(_session: object, context: SimpleNamespace, params: object) -> None:
    departure = context.trace_request_ctx
    if type(departure) is Departure:
        departure.stamp(headers=isinstance(params, aiohttp.TraceRequestHeadersSentParams))


def departure_tracing() -> aiohttp.TraceConfig:
    """aiohttp tracing that stamps a request's :class:`Departure` as its headers, then each
    chunk of its body, are written (the same instant for a small request): the last stamp
    is when all of it left, after any wait for a connection. A session given to the
    Connector client needs it in its ``trace_configs`` for pacing to know when requests
    left; without it they are counted from their grant."""
    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_written)
    config.on_request_chunk_sent.append(_written)
    return config


# Operations whose success callers can take without its result: a 2xx whose body breaks off
# is still their success. The others (reads, a new conversation's id, an upload's id) are
# tried again.
DONE_ON_STATUS = frozenset(
    {
        "sendToConversation",
        "replyToActivity",
        "sendConversationHistory",
        "updateActivity",
        "deleteActivity",
        "deleteConversationMember",
    }
)


def traces_departures(session: aiohttp.ClientSession) -> bool:
    """Whether `session` stamps departures (:func:`departure_tracing`): without it, when a
    request failed nobody knows whether it had been written."""
    return any(_written in config.on_request_headers_sent for config in session.trace_configs)


class Http:
    """The process's one aiohttp session (per event loop), created on first use, with
    :func:`departure_tracing`."""

    __slots__ = ("_loop", "_owned", "_session", "_timeout")

    def __init__(self, session: aiohttp.ClientSession | None, timeout: aiohttp.ClientTimeout):
        self._session = session
        self._owned = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and not (self._owned and (session.closed or self._loop is not loop)):
            return session
        # First use, or the loop that owned the old session is gone (tests, some hosts).
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),  # no state carried between calls
            trace_configs=[departure_tracing()],
        )
        self._loop = loop
        self._owned = True
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owned and not session.closed:
            await session.close()


def request_headers(
    token: str | None, data: bytes | None, *, accept: str = "application/json"
) -> dict[str, str]:
    headers = {"Accept": accept}
    if data is not None:
        headers["Content-Type"] = "application/json; charset=utf-8"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def encode_body(operation: str, body: Mapping[str, Any] | None) -> bytes | None:
    if body is None:
        return None
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as error:  # nested past Python's limit
        raise ConnectorError(
            ErrorKind.INVALID,
            f"the request body is not JSON ({type(error).__name__}); nothing was sent",
            operation=operation,
        ) from None


class Answer(NamedTuple):
    """One answer to a request: its status, headers and body (read within bounds)."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    # From the host a redirect led to (an attachment's bytes), not from the Connector: its
    # 401 says nothing of the bot's token, its 429 nothing of the Connector's rate.
    redirected: bool = False


async def read_body(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of the answer's body, and whether it had more (left unread:
    aiohttp then closes the connection rather than reuse it)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


async def result_body(operation: str, response: aiohttp.ClientResponse) -> bytes:
    """A 2xx answer's body, whose result is what was asked for: a larger one is refused."""
    if (response.content_length or 0) > MAX_RESPONSE_BYTES:
        raise too_large(operation, MAX_RESPONSE_BYTES)
    content, more = await read_body(response, MAX_RESPONSE_BYTES)
    if more:
        raise too_large(operation, MAX_RESPONSE_BYTES)
    return content


async def detail_body(
    operation: str, response: aiohttp.ClientResponse, budget: asyncio.Timeout
) -> bytes:
    """The body of an answer whose status decides: an error's (detail, cut to
    MAX_ERROR_BODY_BYTES), or a 2xx to an operation in DONE_ON_STATUS (its success; a
    retry would post the message, or make the change, again). Read for at most
    DONE_BODY_SECONDS, never past the request's budget, and dropped when it breaks off,
    stalls (a 429 must not turn into a send that may have been posted) or, for a success,
    is too large (the result lost, the success kept)."""
    ok = 200 <= response.status < 300
    limit = MAX_RESPONSE_BYTES if ok else MAX_ERROR_BODY_BYTES
    loop = asyncio.get_running_loop()
    until = loop.time() + DONE_BODY_SECONDS
    if budget.when() is not None:
        until = min(until, budget.when())
    budget.reschedule(None)  # the status has arrived: from here the body's own bound decides
    problem: str
    try:
        if ok and (response.content_length or 0) > limit:
            problem = f"is larger than {limit} bytes"
        else:
            async with asyncio.timeout_at(until):
                content, more = await read_body(response, limit)
            if not (ok and more):
                return content  # an error's detail, cut short: the status decides
            problem = f"is larger than {limit} bytes"
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        problem = f"broke off ({type(error).__name__})"
    log.warning("connector %s answered %d, then its body %s", operation, response.status, problem)
    return b""


def too_large(operation: str, limit: int) -> ConnectorError:
    return ConnectorError(
        ErrorKind.INVALID, f"the answer is larger than {limit} bytes", operation=operation
    )


# Operations whose result is the id of what they made: an object without one is no result.
ID_RESULTS = frozenset({"createConversation", "uploadAttachment"})


def _names_id(data: Any) -> bool:
    return isinstance(data.get("id"), str) and bool(data["id"])


def result(operation: str, expect: Expect, content: bytes, *, posted: bool = False) -> Any:
    """What a 2xx answer returns to the caller, or the ConnectorError it is.

    For the operations in DONE_ON_STATUS the status is the success: a body that is empty,
    not JSON or of another shape only loses the detail (an empty result). For the others
    the result is what was asked for (members, a page, a new conversation's id: an object
    without a string `id` for the operations in ID_RESULTS), and such a body (a gateway's
    page, one cut short where HTTP cannot tell) is TRANSIENT, tried again; or UNCERTAIN
    when the request posted an activity (`posted`: not sent again).
    """
    if expect == "bytes":
        return content
    if expect == "none":
        return None
    shape = list if expect == "list" else dict
    done = operation in DONE_ON_STATUS
    if not content.strip():
        if done:
            return shape()
        problem = "an empty body"
    else:
        try:
            data = json.loads(content)
        except (ValueError, RecursionError):
            problem = "a body that is not JSON"
        else:
            if isinstance(data, shape) and (operation not in ID_RESULTS or _names_id(data)):
                return data
            problem = "an unexpected JSON shape"
    log.warning("connector %s answered 2xx with %s", operation, problem)
    if done:
        return shape()
    if posted:
        return ConnectorError(
            ErrorKind.UNCERTAIN,
            f"answered 2xx with {problem}: the activity was posted, its result is unknown",
            operation=operation,
        )
    return ConnectorError(ErrorKind.TRANSIENT, f"answered 2xx with {problem}", operation=operation)


def quote_segment(value: str) -> str:
    """One path segment, percent-encoded: ``/``, ``:``, ``@`` and ``;`` included.

    An id that is not valid Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes
    can carry) cannot be encoded, and one that is not a string is no id: an ``invalid``
    error, never a UnicodeEncodeError or TypeError.
    """
    if not isinstance(value, str):
        raise ConnectorError(
            ErrorKind.INVALID, "an id in the request path is not a string; nothing was sent"
        )
    # "." and ".." have no encoding that is safe: quote() leaves them as dot segments, and
    # %2E is an unreserved character in disguise, which a server may decode before it
    # resolves dot segments (RFC 3986 6.2.2). Either way `/conversations/../activities`
    # could reach another operation than the URL that was checked. No channel issues such
    # an id, so it is refused before anything is sent.
    if value in ("", ".", ".."):
        raise ConnectorError(
            ErrorKind.INVALID,
            "an id in the request path is empty, '.' or '..'; nothing was sent",
        )
    try:
        return quote(value, safe="")
    except UnicodeEncodeError:
        raise ConnectorError(
            ErrorKind.INVALID, "an id in the request path is not valid Unicode; nothing was sent"
        ) from None


def build_url(
    target: ServiceTarget,
    path: str,
    query: Mapping[str, str | None] | None,
    operation: str | None = None,
) -> yarl.URL:
    params = {k: v for k, v in (query or {}).items() if v is not None}
    if any(not isinstance(v, str) for v in params.values()):  # a page's whole dict, say
        raise ConnectorError(
            ErrorKind.INVALID,
            "a query parameter is not text; nothing was sent",
            operation=operation,
        )
    try:
        qs = f"?{urlencode(params, quote_via=quote, safe='')}" if params else ""
    except UnicodeEncodeError:  # a paging token handed back from an answer's `\ud800`
        raise ConnectorError(
            ErrorKind.INVALID,
            "a query parameter is not valid Unicode; nothing was sent",
            operation=operation,
        ) from None
    # encoded=True: the URL is exactly the checked one plus already-encoded segments;
    # yarl must not decode %2F or resolve anything.
    return yarl.URL(f"{target.base}{path}{qs}", encoded=True)


# What a URI may hold as written (RFC 3986: unreserved, reserved and `%`).
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


def follow_redirect(
    operation: str,
    url: yarl.URL,
    location: str,
    headers: dict[str, str],
    is_trusted: Callable[[str], bool],
) -> tuple[yarl.URL, dict[str, str]]:
    """Where a redirect leads (https only; http on loopback only from a Connector itself on
    loopback over http, a local one), and the headers for it: the bot's token goes along
    only to the same origin, still inside the trusted set."""
    try:
        # A Location in plain ASCII is requested as it is written (yarl would otherwise
        # decode %3B to `;`, which a server may read as another path); one with other
        # characters is percent-encoded first.
        given = yarl.URL(location, encoded=_URI_CHARACTERS.fullmatch(location) is not None)
        target = url.join(given)
        if target.host and target.raw_host != target.host:  # kept as written: lower it
            target = target.with_host(target.host)
        host = target.host
    except (ValueError, TypeError):
        target, host = None, None
    local = url.scheme == "http" and is_loopback_host(url.host)
    secure = target is not None and (
        target.scheme == "https" or (target.scheme == "http" and local and is_loopback_host(host))
    )
    if target is None or not host or not secure:
        raise ConnectorError(
            ErrorKind.INVALID,
            "redirected to a location that is not an https URL",
            operation=operation,
        )
    headers = dict(headers)
    same_origin = _origin(target) == _origin(url)
    if not (same_origin and is_trusted(str(target.with_query(None).with_fragment(None)))):
        headers.pop("Authorization", None)
    log.info("connector %s redirected to host=%s", operation, host_for_log(str(target)))
    return target, headers


def _origin(url: yarl.URL) -> tuple[str, str, int | None]:
    """Scheme, host and port, the port whether written out (`:443`) or left implied."""
    return url.scheme, (url.host or "").lower(), url.port


async def exchange(
    session: aiohttp.ClientSession,
    operation: str,
    method: str,
    url: yarl.URL,
    headers: dict[str, str],
    data: bytes | None,
    *,
    seconds: float,
    follow: bool,
    departure: Departure,
    is_trusted: Callable[[str], bool],
) -> Answer:
    """One request and its answer within `seconds` (TimeoutError past them): the status,
    headers and body, read within bounds.

    `follow`: redirects are followed (attachment views redirect to where the bytes live);
    otherwise a 3xx is answered as it is. They are followed here, not by aiohttp, so the
    token is dropped unless the next hop is still inside the trusted set (`is_trusted`).
    `departure` is stamped when the request to the Connector (not a redirect) is written.
    """
    traced: Departure | None = departure
    redirected = False
    async with asyncio.timeout(seconds) as budget:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                trace_request_ctx=traced,
            ) as response:
                traced = None
                location = response.headers.get("Location")
                if follow and response.status in REDIRECT_STATUSES and location:
                    url, headers = follow_redirect(operation, url, location, headers, is_trusted)
                    redirected = True
                    continue
                status = response.status
                if 200 <= status < 300 and operation not in DONE_ON_STATUS:
                    content = await result_body(operation, response)  # broken off: tried again
                else:
                    content = await detail_body(operation, response, budget)
                return Answer(status, response.headers, content, redirected)
    raise ConnectorError(
        ErrorKind.INVALID, f"more than {MAX_REDIRECTS} redirects", operation=operation
    )


async def send_once(
    session: aiohttp.ClientSession,
    operation: str,
    method: str,
    url: yarl.URL,
    headers: dict[str, str],
    data: bytes | None,
    *,
    attempt: int,
    seconds: float,
    follow: bool,
    departure: Departure,
    is_trusted: Callable[[str], bool],
    posts: bool,
) -> Answer | ConnectorError:
    """One attempt of a request, within `seconds` (:func:`exchange`): the answer, or a
    retryable ConnectorError for a connection failure.

    A request that delivers an activity (``posts``) and failed after it was written (no
    answer in time, the connection dropped, a broken answer) may have been posted: that
    is UNCERTAIN, raised and never retried, as a 500 is. A failure before anything was
    written, or of any other request (a read, an update, a delete, creating a
    conversation with no first message), is TRANSIENT; a malformed answer to one is
    INVALID, raised (not worth a retry)."""
    # A session given to the client without departure tracing cannot say whether a
    # failed request had been written: then it may have been.
    untraced = not traces_departures(session)
    try:
        answer = await exchange(
            session,
            operation,
            method,
            url,
            headers,
            data,
            seconds=seconds,
            follow=follow,
            departure=departure,
            is_trusted=is_trusted,
        )
    except (TimeoutError, aiohttp.ClientError) as error:
        broken = not isinstance(
            error, TimeoutError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
        )
        log.info(
            "connector %s %s %s failed=%s attempt=%d",
            method,
            url.host,
            operation,
            type(error).__name__,
            attempt,
        )
        if posts and (departure.at is not None or untraced):
            raise ConnectorError(
                ErrorKind.UNCERTAIN,
                f"no {'valid ' if broken else ''}answer after the request was sent "
                f"({type(error).__name__}); it may have been posted",
                operation=operation,
            ) from None
        if broken:
            raise ConnectorError(
                ErrorKind.INVALID,
                f"request failed ({type(error).__name__})",
                operation=operation,
            ) from None
        return ConnectorError(
            ErrorKind.TRANSIENT,
            f"connection failed ({type(error).__name__})",
            operation=operation,
        )
    # A success is detail (DEBUG); anything else is worth a line at the default level.
    log.log(
        logging.DEBUG if 200 <= answer.status < 300 else logging.INFO,
        "connector %s %s %s status=%d attempt=%d",
        method,
        url.host,
        operation,
        answer.status,
        attempt,
    )
    return answer
