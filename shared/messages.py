"""`POST /api/messages`: from an HTTP request to the bot's answer (docs/contracts.md).

The order is the security boundary: cheap checks of the request first (method, media
type, size, JSON, required fields), then the token, and only then anything with a side
effect. A request that fails a check never reaches a handler, never writes storage and
never makes the bot send its token. The first well-formed request of a process starts
the bot's own token acquisition in the background before its token is checked (at most
once per process, the token only cached: see Runtime.prepare), so a cold turn does not
do one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared import warmup
from shared.activity import (
    Activity,
    InvalidActivity,
    check_content_type,
    check_size,
    conversation_key,
    from_teams,
    is_message_extension,
    parse_activity,
)
from shared.config import SettingsError
from shared.diagnostics import clip, describe
from shared.http import HttpRequest, HttpResponse
from shared.logs import REFUSALS, log_repeated
from shared.router import InvokeResponse, Router
from shared.runtime import Runtime
from shared.turn import TurnContext
from shared.urls import addressed_to_this_machine

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

UNAUTHORIZED = "Unauthorized."  # the one 401 body: the reason is logged, never sent
# The one exception, in local unauthenticated mode only: a fixed text (nothing from the
# request), so a local client with a hostname serviceUrl learns why it is refused.
LOCAL_UNAUTHORIZED = (
    "Unauthorized: this bot runs in local unauthenticated mode (BOT_ALLOW_UNAUTHENTICATED="
    "true), which accepts only loopback serviceUrls (127.0.0.1, localhost, [::1]). Give the "
    "client a serviceUrl on this machine, or configure MicrosoftAppId and send tokens."
)
LOCAL_NAME_UNAUTHORIZED = (
    "Unauthorized: this bot runs in local unauthenticated mode (BOT_ALLOW_UNAUTHENTICATED="
    "true), which answers only requests addressed to this machine by localhost or an IP "
    "address, never by another host name (a web page's, rebound to this machine)."
)
SERVER_ERROR = "The bot could not process this activity."
# The signing keys could not be fetched (none cached): the token is not judged, so no 401.
KEYS_UNAVAILABLE = "The bot cannot verify requests right now; try again shortly."
CHANNEL_WINDOW = 15.0  # seconds a channel waits for the HTTP answer to an activity
EXTENSION_WINDOW = 5.0  # ... and Teams for a message extension's invoke
RECORD_BUDGET = 2.0  # seconds the reference write may add to the HTTP answer
# A removal (uninstall, bot removed, team deleted: a team's channels too) must not be cut
# short, or the rest stays stored and is broadcast to: more time, within the channel's 15 s,
# and when it fails all the same the answer is a 500, so the channel's retry finishes it.
REMOVAL_BUDGET = 10.0
# A team's removal lists every stored Teams conversation to find the team's channels (about
# 0.4 s per 1,000 on a local Azurite): past the channel's 15 s, it goes on to the end, the
# answer coming late (the host runs the invocation on after the channel stopped waiting;
# a retry meanwhile finds less to delete). Within the host's 230 s for an HTTP answer.
TEAM_REMOVAL_BUDGET = 120.0
# The bot added on Teams (installed, added to a team or chat, a team or channel restored):
# stored before the turn, and a failed write fails the answer (see _handle). More than a
# refresh gets: a cold instance pays the storage SDK's import and, on Azure, its identity
# token here.
ADDITION_BUDGET = 5.0


@dataclass(slots=True)
class TurnOutcome:
    handled: bool = False
    value: Any = None
    failed: bool = False
    answer: HttpResponse | None = None  # an invoke's or expectReplies' answer, built


class InvalidAnswer(ValueError):
    """A turn's HTTP answer cannot be sent (an invoke's status out of range or body not
    JSON; expectReplies replies not JSON): the turn fails before anything it changed is
    saved."""


async def handle_messages(
    request: HttpRequest, runtime: Runtime | Callable[[], Runtime]
) -> HttpResponse:
    """Authenticate, validate and route one activity; answer per docs/contracts.md.

    `runtime` is the runtime, or the app's function that gets it (app.runtime): called
    here, so app settings that do not validate give the channel a clean 500.
    """
    # A process's first turn imports most of what the bot uses: see shared/warmup.py.
    with warmup.FIRST_TURN.turn():
        try:
            return await _handle(request, runtime)
        except Exception as error:  # a bug here must still give the channel a clean answer
            logger.error("messages: unexpected %s", describe(error))
            return HttpResponse.text(500, SERVER_ERROR)


async def _handle(request: HttpRequest, runtime: Runtime | Callable[[], Runtime]) -> HttpResponse:
    started = time.monotonic()
    if request.method != "POST":
        return HttpResponse(405, b"", {"Allow": "POST"})
    if not isinstance(runtime, Runtime):
        try:
            runtime = runtime()
        except SettingsError as error:
            # SettingsError's message names the setting and the problem, never its value.
            log_repeated(
                logger,
                logging.ERROR,
                f"not configured: {error}",
                "messages: bot not configured: %s",
                error,
            )
            return HttpResponse.text(500, SERVER_ERROR)

    try:
        check_content_type(request.header("content-type"))
        check_size(request.header("content-length"), request.body, runtime.settings.max_body_bytes)
        activity = parse_activity(request.body)
    except InvalidActivity as invalid:
        logger.info("messages: rejected request: %s %s", invalid.status, invalid.reason)
        return HttpResponse.text(invalid.status, invalid.reason)

    ids = _ids(activity)
    # A well-formed request: start what its turn will need (once per process; nothing is
    # sent on its behalf before its token is checked, see Runtime.prepare).
    runtime.prepare()
    from shared.auth.inbound import (  # with the authenticator (jwt)
        AuthError,
        KeysUnavailable,
        NotLoopback,
    )

    if runtime.settings.auth_disabled and not addressed_to_this_machine(
        request.header("host"), request.header("origin")
    ):
        # Anyone on this machine may drive an unauthenticated bot, so a web page may not:
        # the page's own name, rebound to 127.0.0.1, would reach it (and through it, any
        # local port its serviceUrl names).
        logger.warning("messages: 401 %s: unauthenticated mode, addressed by a host name", ids)
        return HttpResponse.text(401, LOCAL_NAME_UNAUTHORIZED)
    try:
        identity = await runtime.authenticator.authenticate(
            request.header("authorization"), activity
        )
    except KeysUnavailable as error:
        # An outage, not a bad token: the channel may retry once the key cache tries again.
        from shared.auth.keys import COLD_RETRY_INTERVAL

        # Anyone's request meets it while the keys cannot be fetched: once a minute.
        log_repeated(
            logger,
            logging.ERROR,
            f"503 {error}",
            "messages: 503 %s: outage: %s",
            ids,
            error,
            repeated=REFUSALS,
        )
        response = HttpResponse.text(503, KEYS_UNAVAILABLE)
        response.headers["Retry-After"] = str(math.ceil(COLD_RETRY_INTERVAL))
        return response
    except AuthError as error:
        # AuthError's message is the internal reason, written without the token. Anyone
        # can send requests without a valid one: each reason once a minute, with a count.
        # The cause is the reason's words before any value it quotes (a key id, an
        # algorithm: a junk token's own).
        cause = re.split("['\"]", str(error), maxsplit=1)[0]
        log_repeated(
            logger, logging.WARNING, cause, "messages: 401 %s: %s", ids, error, repeated=REFUSALS
        )
        local = isinstance(error, NotLoopback) and runtime.settings.auth_disabled
        return HttpResponse.text(401, LOCAL_UNAUTHORIZED if local else UNAUTHORIZED)
    except Exception as error:  # fail closed: an auth problem is never a 500
        logger.error("messages: 401 %s: authenticator raised %s", ids, type(error).__name__)
        return HttpResponse.text(401, UNAUTHORIZED)

    # Spec: callerId is set by the receiver from the verified token; what was sent is discarded.
    activity.pop("callerId", None)
    caller_id = runtime.authenticator.caller_id(identity)
    if caller_id:
        activity["callerId"] = caller_id

    turn = TurnContext(
        activity,
        runtime.connector,
        identity=identity,
        settings=runtime.settings,
        state=runtime.state,
        body=request.body,
    )
    # A shallow copy keeps a handler's edits to the activity out of the reference.
    recorded = dict(activity)
    recorded_beside = (
        (activity["type"] == "invoke" or turn.expects_replies)
        and not _removal(recorded)
        and activity["type"] != "deleteUserData"
    )
    # When the turn's own work must be over (its apology included): the channel's wait,
    # less the reference write or the erasure that follows the turn.
    first = _recorded_first(recorded)
    after = 0.0 if recorded_beside or first else RECORD_BUDGET
    turn.answer_by = started + _window(activity) - after
    if activity["type"] == "deleteUserData":
        # The channel asks the bot to forget the sender: erase, and record nothing. The
        # erasure never depends on the bot's handlers: it runs even when one of them failed.
        outcome = await _run_turn(runtime.router, turn)
        erased = await _erase(runtime, recorded, ids)
        outcome.failed = outcome.failed or not erased
    elif first:
        # The bot was added on Teams (installed, a team restored), or one of its team's
        # channels deleted or restored: stored first, then the turn (a welcome, say). No
        # later activity may redo a failed write (in a team the bot hears only its
        # @mentions; a notification-only app's user may never write), so it answers 500
        # and the handlers do not run: the channel's retry does both, and the welcome is
        # sent once. (A channel's removal deletes that channel's state, not the turn's.
        # Other channels add the bot at each conversation's start, and its first message
        # records it: their additions go the usual way.)
        if await _record(runtime, recorded, ids):
            outcome = await _run_turn(runtime.router, turn)
        else:
            outcome = TurnOutcome(failed=True)
    elif recorded_beside:
        # The HTTP answer is the reply (a card, a dialog, the buffered replies): the
        # reference is recorded beside the turn, so the answer waits for the longer of the
        # two, not for both.
        async with asyncio.TaskGroup() as both:
            recording = both.create_task(_record(runtime, recorded, ids))
            outcome = await _run_turn(runtime.router, turn)
        outcome.failed = outcome.failed or not recording.result()
    else:
        # The reply went to the Connector during the turn: the reference is recorded after
        # it, so the reply waits neither for a blob write nor, on a cold start, for the
        # store's imports (which would hold the event loop while it is in flight). A
        # removal always comes after the turn: it deletes the conversation's state, which
        # the turn's own save would otherwise write back.
        outcome = await _run_turn(runtime.router, turn)
        # Whatever the turn's outcome; not when the conversation was removed meanwhile.
        written = await _record(runtime, recorded, ids, since=turn.started)
        outcome.failed = outcome.failed or not written
    response = _respond(activity, turn, outcome)
    logger.debug("messages: %s %s -> %s", ids, clip(activity["type"]), response.status)
    _check_late(activity, recorded, ids, time.monotonic() - started)
    return response


def _check_late(activity: Activity, recorded: Activity, ids: str, elapsed: float) -> None:
    """Warn when the answer came after the channel stopped waiting: the channel may send
    the activity again, and the handler then runs a second time (slow work belongs in
    ``turn.send_later`` or the proactive queue). A removal may run on by design."""
    window = _window(activity)
    if elapsed > window and not _removal(recorded):
        logger.warning(
            "messages: %s %s answered after %.1f s; the channel waits %.0f s, then may send "
            "it again",
            ids,
            clip(activity["type"]),
            elapsed,
            window,
        )


def _window(activity: Activity) -> float:
    """How long the channel waits for the HTTP answer to `activity`."""
    return EXTENSION_WINDOW if is_message_extension(activity) else CHANNEL_WINDOW


async def _run_turn(router: Router, turn: TurnContext) -> TurnOutcome:
    from shared.removals import current_turn

    # What the handlers remove, they may write again. A token of its own (not the turn:
    # the registry would keep each such turn's activity alive for minutes).
    running = current_turn.set(object())
    try:
        return await _dispatch(router, turn)
    finally:
        current_turn.reset(running)


async def _dispatch(router: Router, turn: TurnContext) -> TurnOutcome:
    try:
        result = await router.dispatch(turn)
        outcome = TurnOutcome(handled=result.handled, value=result.value)
        if turn.activity["type"] == "invoke" or turn.expects_replies:
            # Built before the save: an answer that cannot be sent saves nothing (the
            # channel's retry would count the turn twice).
            outcome.answer = _answer(turn.activity, turn, outcome)
            turn.answered = True
        await turn.save_state()  # only what the handler changed; a failure fails the turn
    except (Exception, asyncio.CancelledError) as error:
        if isinstance(error, asyncio.CancelledError) and _being_cancelled():
            raise  # the turn itself is (its time is up, the host stops): not a handler failure
        await router.handle_error(turn, error)
        return TurnOutcome(handled=True, failed=True)
    return outcome


def _being_cancelled() -> bool:
    """Whether this task is being cancelled, rather than a handler having raised the
    CancelledError of a task cancelled elsewhere (one it awaited)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _removal(activity: Activity) -> bool:
    from shared.lifecycle import Change, classify

    return classify(activity) is Change.REMOVE


def _recorded_first(activity: Activity) -> bool:
    """Whether the activity is recorded before its turn: the bot added on Teams, or a
    channel of its team deleted or restored (Teams tells those once)."""
    from shared.lifecycle import Change, channel_event, classify

    if not from_teams(activity):
        return False
    change = classify(activity)
    if change is Change.REMOVE:
        return False
    return change is Change.ADD or channel_event(activity) is not None


async def _record(
    runtime: Runtime, activity: Activity, ids: str, *, since: float | None = None
) -> bool:
    """Add/refresh/remove the conversation reference (a removal: the removed conversations'
    state too); False when a Teams addition or a removal failed.

    A write gets at most RECORD_BUDGET seconds: the channel is still waiting for the HTTP
    answer (Teams gives message-extension queries 5 s in all), and a storage outage with
    its retries must not eat that. A refresh cut short or failed is only logged: a later
    activity redoes it. The failure of one recorded before the turn (within
    ADDITION_BUDGET; REMOVAL_BUDGET for a channel deleted) fails the answer, and so does
    a removal's, which gets REMOVAL_BUDGET (a team's: TEAM_REMOVAL_BUDGET): no later
    activity would redo them; the channel's retry does. `since`: when the activity's turn
    began, after which a removal of its conversation is not undone by a refresh.
    """
    from shared.lifecycle import Change, channel_event, classify, record_activity, removed_team
    from shared.references.contract import StoreError
    from shared.state import StateError

    change = classify(activity)
    removal = change is Change.REMOVE
    kept = _recorded_first(activity)
    forgets = kept and channel_event(activity) == "channelDeleted"
    what = "reference not removed" if removal or forgets else "reference not recorded"
    budget = ADDITION_BUDGET if kept else RECORD_BUDGET
    if removal:
        budget = TEAM_REMOVAL_BUDGET if removed_team(activity) else REMOVAL_BUDGET
    elif forgets:
        budget = REMOVAL_BUDGET
    try:
        async with asyncio.timeout(budget):
            await record_activity(
                runtime.references, activity, change, state=runtime.state, started=since
            )
    except TimeoutError:
        logger.error("messages: %s %s: storage did not answer in time", what, ids)
    except (StoreError, StateError, SettingsError) as error:  # their text names no secret
        logger.error("messages: %s %s: %s", what, ids, error)
    except Exception as error:  # e.g. a storage SDK error: its text may carry a SAS URL
        logger.error("messages: %s %s: %s", what, ids, type(error).__name__)
    else:
        return True
    return not (removal or kept)


async def _erase(runtime: Runtime, activity: Activity, ids: str) -> bool:
    """Erase the sender's state and references (deleteUserData); False when storage failed
    (the turn then answers 500, and the channel's retry finishes the job)."""
    from shared.references.contract import StoreError
    from shared.state import StateError
    from shared.userdata import erase_for_activity

    try:
        await erase_for_activity(activity, state=runtime.state, references=runtime.references)
    except (StoreError, StateError) as error:  # their text names no secret: it says why
        logger.error("messages: user data not erased %s: %s (%s)", ids, error, describe(error))
        return False
    except Exception as error:  # a storage SDK error's text may carry a SAS URL
        logger.error("messages: user data not erased %s: %s", ids, describe(error))
        return False
    return True


def _respond(activity: Activity, turn: TurnContext, outcome: TurnOutcome) -> HttpResponse:
    if outcome.failed:
        return HttpResponse.text(500, SERVER_ERROR)
    return outcome.answer or HttpResponse(200)  # no invoke, no expectReplies: 200


def _answer(activity: Activity, turn: TurnContext, outcome: TurnOutcome) -> HttpResponse:
    """The HTTP answer that carries the turn's reply: the buffered replies, the invoke's.
    InvalidAnswer when it cannot be sent (see _invoke_result; JSON it is not)."""
    if activity["type"] != "invoke":
        return _json_answer(activity, 200, {"activities": turn.buffered})
    invoke = _invoke_result(outcome, activity)
    body = None if invoke.status in (204, 304) else invoke.body  # they carry no body
    if turn.expects_replies:
        # As the SDKs do: the invoke's answer travels with the replies, as an activity.
        value: dict[str, Any] = {"status": invoke.status}
        if body is not None:
            value["body"] = body
        answer = {"type": "invokeResponse", "value": value}
        return _json_answer(activity, 200, {"activities": [*turn.buffered, answer]})
    if body is None:
        return HttpResponse(invoke.status)
    return _json_answer(activity, invoke.status, body)


def _json_answer(activity: Activity, status: int, payload: Any) -> HttpResponse:
    try:
        return HttpResponse.json(status, payload)
    except (TypeError, ValueError, RecursionError):  # a set, NaN, a datetime, ...
        logger.error(
            "messages: the answer to %s %s is not JSON",
            clip(activity["type"]),
            clip(activity.get("name") or ""),
        )
        raise InvalidAnswer("a turn's answer must be plain JSON") from None


def _invoke_result(outcome: TurnOutcome, activity: Activity) -> InvokeResponse:
    """An invoke handler's return value as status and body (see Router.invoke): 501 when
    no handler took it; InvalidAnswer for a status out of range."""
    if not outcome.handled:
        return InvokeResponse(501)
    value = outcome.value
    invoke = value if isinstance(value, InvokeResponse) else InvokeResponse(200, value)
    if not isinstance(invoke.status, int) or not 200 <= invoke.status <= 599:
        logger.error(
            "messages: invoke %s returned status %s",
            clip(activity.get("name") or ""),
            clip(invoke.status),
        )
        raise InvalidAnswer("an invoke answer's status must be an int from 200 to 599")
    return invoke


def _ids(activity: Activity) -> str:
    """What lets an operator follow one activity in the logs (quoted and clipped: the ids
    are untrusted, and logged before the token is checked)."""
    key = conversation_key(activity["channelId"], activity["conversation"]["id"])
    return f"activity={clip(activity.get('id'))} conversation={clip(key)}"
