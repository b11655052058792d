"""Handler registration and dispatch.

A bot registers async handlers with decorators::

    router = Router()

    @router.message(r"^help\\b")
    async def help_(turn: TurnContext) -> None:
        await turn.reply("Try 'weather <city>'.")

    @router.invoke("composeExtension/query")
    async def search(turn: TurnContext) -> InvokeResponse:
        return InvokeResponse(200, {"composeExtension": {"type": "result", ...}})

Matching rules, the same for every decorator:

- Routes are tried in registration order and the **first match wins**: exactly one handler
  runs per activity. Register specific routes before general ones (a catch-all last).
- Activity types, event names and invoke names compare exactly (spec A2011: ordinal).
- A handler's return value matters only for invokes (see :meth:`Router.invoke`).
- An activity no route matches is ignored (spec A2014); an unmatched invoke answers 501.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.activity import channel_data, from_teams, is_bot_account, is_message_extension
from shared.diagnostics import clip, describe
from shared.turn import TurnContext

logger = logging.getLogger(__name__)

Handler = Callable[[TurnContext], Awaitable[Any]]
ErrorHandler = Callable[[TurnContext, BaseException], Awaitable[None]]
Predicate = Callable[[TurnContext], Any]  # truthy = match; a re.Match is kept on turn.match
H = TypeVar("H", bound=Callable[..., Any])

APOLOGY = "Sorry, something went wrong on my side. Please try again later."
APOLOGY_MARGIN = 1.0  # seconds of the channel's wait kept for the answer after the apology


@dataclass(slots=True)
class InvokeResponse:
    """The synchronous answer to an invoke: HTTP status and JSON body (None = empty)."""

    status: int
    body: Any = None


@dataclass(slots=True)
class DispatchResult:
    """Whether a route matched, and what its handler returned."""

    handled: bool
    value: Any = None


@dataclass(slots=True)
class Route:
    predicate: Predicate
    handler: Callable[[TurnContext], Any]
    name: str = ""


def _of_type(activity_type: str) -> Predicate:
    return lambda turn: turn.activity.get("type") == activity_type


def _includes_bot(members: Any, turn: TurnContext) -> bool:
    return any(is_bot_account(member, turn.bot_id) for member in members or ())


# Activities Teams tells apart by channelData.eventType (Router.teams_event).
_TEAMS_EVENT_TYPES = frozenset({"conversationUpdate", "messageUpdate", "messageDelete"})


class Router:
    """Ordered routes from activities to handlers; the first matching route handles a turn."""

    def __init__(self, *, apology: str = APOLOGY) -> None:
        self.routes: list[Route] = []
        self.apology = apology  # what a user sees when a handler fails
        self._on_error: ErrorHandler | None = None

    # --- registration ----------------------------------------------------------------------

    def add(
        self, predicate: Predicate, handler: Callable[[TurnContext], Any], name: str = ""
    ) -> None:
        """Append a route. Later routes only see activities earlier ones did not match."""
        self.routes.append(Route(predicate, handler, name or getattr(handler, "__name__", "")))

    def on(self, predicate: Predicate) -> Callable[[H], H]:
        """Register a handler for activities `predicate(turn)` accepts (any custom rule;
        an ``async def`` rule is awaited)."""

        def register(handler: H) -> H:
            self.add(predicate, handler)
            return handler

        return register

    def activity(self, activity_type: str) -> Callable[[H], H]:
        """Any activity of this `type` (e.g. ``"message"``, ``"invoke"``, a custom type)."""
        return self.on(_of_type(activity_type))

    def message(
        self, pattern: str | re.Pattern[str] | None = None, *, ignore_case: bool = True
    ) -> Callable[[H], H]:
        """Messages; with `pattern`, only those whose text it matches.

        The pattern is searched (``re.search``, anchor it with ``^``/``$`` for a whole-text
        match) in the text without the bot's own @mention, case-insensitively unless
        ``ignore_case=False``; a compiled pattern is used with its own flags. The match is
        available to the handler as ``turn.match`` (groups, named groups).
        """
        if pattern is None:
            return self.on(_of_type("message"))
        if isinstance(pattern, str):
            pattern = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        compiled = pattern

        def predicate(turn: TurnContext) -> re.Match[str] | None:
            if turn.activity.get("type") != "message":
                return None
            return compiled.search(turn.text)

        return self.on(predicate)

    def members_added(self) -> Callable[[H], H]:
        """conversationUpdate adding members other than the bot (``turn.members_added``)."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "conversationUpdate" and bool(turn.members_added)
            )
        )

    def bot_added(self) -> Callable[[H], H]:
        """conversationUpdate adding the bot itself (its id is the activity's `recipient.id`)."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "conversationUpdate"
                and _includes_bot(turn.activity.get("membersAdded"), turn)
            )
        )

    def members_removed(self) -> Callable[[H], H]:
        """conversationUpdate removing members other than the bot (``turn.members_removed``)."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "conversationUpdate" and bool(turn.members_removed)
            )
        )

    def bot_removed(self) -> Callable[[H], H]:
        """conversationUpdate removing the bot itself from the conversation."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "conversationUpdate"
                and _includes_bot(turn.activity.get("membersRemoved"), turn)
            )
        )

    def teams_event(self, event_type: str) -> Callable[[H], H]:
        """A Teams conversationUpdate, messageUpdate or messageDelete with this
        `channelData.eventType`.

        E.g. ``teamRenamed``, ``teamDeleted``, ``teamArchived``, ``channelCreated``,
        ``channelRenamed``, ``channelDeleted``, ``teamMemberAdded``; ``editMessage`` and
        ``undeleteMessage`` (messageUpdate), ``softDeleteMessage`` (messageDelete).
        """
        return self.on(
            lambda turn: (
                turn.activity.get("type") in _TEAMS_EVENT_TYPES
                and from_teams(turn.activity)  # elsewhere channelData is the client's own
                and channel_data(turn.activity).get("eventType") == event_type
            )
        )

    def installation_added(self, *, upgrade: bool | None = None) -> Callable[[H], H]:
        """installationUpdate `add` (the bot was installed) or `add-upgrade` (app updated).

        ``upgrade=None`` matches both, ``True`` only `add-upgrade`, ``False`` only `add`.
        """
        return self.on(self._installation("add", upgrade))

    def installation_removed(self, *, upgrade: bool | None = None) -> Callable[[H], H]:
        """installationUpdate `remove` (uninstalled) or `remove-upgrade` (app updated).

        ``upgrade=None`` matches both, ``True`` only `remove-upgrade`, ``False`` only `remove`.
        """
        return self.on(self._installation("remove", upgrade))

    @staticmethod
    def _installation(action: str, upgrade: bool | None) -> Predicate:
        wanted = {
            None: (action, f"{action}-upgrade"),
            False: (action,),
            True: (f"{action}-upgrade",),
        }[upgrade]
        # Case-blind, as the reference store judges the action (shared.lifecycle).
        return lambda turn: (
            turn.activity.get("type") == "installationUpdate"
            and str(turn.activity.get("action") or "").lower() in wanted
        )

    def reactions_added(self) -> Callable[[H], H]:
        """messageReaction with `reactionsAdded` (e.g. a like on a bot message)."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "messageReaction"
                and bool(turn.activity.get("reactionsAdded"))
            )
        )

    def reactions_removed(self) -> Callable[[H], H]:
        """messageReaction with `reactionsRemoved`."""
        return self.on(
            lambda turn: (
                turn.activity.get("type") == "messageReaction"
                and bool(turn.activity.get("reactionsRemoved"))
            )
        )

    def message_update(self) -> Callable[[H], H]:
        """A user edited a message (Teams also sends this for undelete: to tell them
        apart, ``teams_event("editMessage")`` and ``teams_event("undeleteMessage")``)."""
        return self.activity("messageUpdate")

    def message_delete(self) -> Callable[[H], H]:
        """A user deleted a message."""
        return self.activity("messageDelete")

    def event(self, name: str | None = None) -> Callable[[H], H]:
        """event activities with this `name` (any event when None)."""
        return self.on(self._named("event", name))

    def invoke(self, name: str | None = None) -> Callable[[H], H]:
        """invoke activities with this `name` (any invoke when None).

        E.g. ``adaptiveCard/action``, ``composeExtension/query``, ``task/fetch``,
        ``signin/verifyState``. The handler's return value is the HTTP answer: an
        :class:`InvokeResponse`, any other value as a 200 JSON body, or None for 200 with an
        empty body. An invoke no route matches answers 501.
        """
        return self.on(self._named("invoke", name))

    def card_action(self, verb: str | None = None) -> Callable[[H], H]:
        """``adaptiveCard/action`` invokes (Universal Actions' ``Action.Execute``) with this
        `verb` (any verb when None); ``turn.card_action`` is the typed value. Answer with
        :mod:`shared.invokes` (``card_response(card)`` replaces the pressed card)."""

        def predicate(turn: TurnContext) -> bool:
            action = turn.card_action
            if action is None:
                return False
            return verb is None or action["action"].get("verb") == verb

        return self.on(predicate)

    def task_fetch(self) -> Callable[[H], H]:
        """``task/fetch``: Teams asks which dialog to open (``turn.task_request``); answer
        with ``shared.invokes.task_card`` / ``task_url`` / ``task_message``."""
        return self.invoke("task/fetch")

    def task_submit(self) -> Callable[[H], H]:
        """``task/submit``: a dialog was submitted (``turn.task_request["data"]``); answer
        with ``shared.invokes.task_message`` (closes it), ``task_card``, or None."""
        return self.invoke("task/submit")

    @staticmethod
    def _named(activity_type: str, name: str | None) -> Predicate:
        return lambda turn: (
            turn.activity.get("type") == activity_type
            and (name is None or turn.activity.get("name") == name)
        )

    def end_of_conversation(self) -> Callable[[H], H]:
        return self.activity("endOfConversation")

    def typing(self) -> Callable[[H], H]:
        return self.activity("typing")

    def catch_all(self) -> Callable[[H], H]:
        """Every activity no earlier route matched, invokes included (register it last)."""
        return self.on(lambda turn: True)

    def error(self, handler: ErrorHandler) -> ErrorHandler:
        """Replace the apology sent when a handler raises (the failure is logged either way).
        It is called where the apology would be sent, and only there (see
        :meth:`handle_error`): not for a message extension's invoke, a card's automatic
        refresh or the bot's removal, nor after this conversation's Connector failed, nor
        with less than a second of the channel's wait left.
        What it sends goes to the Connector even under ``expectReplies``: the turn's answer
        is then the failure, which carries nothing. Its ``turn.send``, ``reply``,
        ``update_activity`` and ``delete_activity`` keep within what is left of the
        channel's wait for the answer (they fail once it is spent)."""
        self._on_error = handler
        return handler

    # --- dispatch --------------------------------------------------------------------------

    async def dispatch(self, turn: TurnContext) -> DispatchResult:
        """Run the first route matching `turn`. A handler's exception propagates."""
        for route in self.routes:
            matched = route.predicate(turn)
            if inspect.isawaitable(matched):
                matched = await matched  # an async rule (one that reads state, say)
            if not matched:
                continue
            if isinstance(matched, re.Match):
                turn.match = matched
            value = route.handler(turn)
            if inspect.isawaitable(value):
                value = await value
            return DispatchResult(True, value)
        return DispatchResult(False)

    async def handle_error(self, turn: TurnContext, error: BaseException) -> None:
        """Log a failed turn with its ids and apologise to the user. Never raises.

        The apology is tried only within the channel's wait for the answer, and not at all
        when less than a second of it is left.
        The user never sees the exception; the log names the activity, the conversation and
        where the exception was raised (not its text, which may carry user data or secrets,
        but for the app's own errors whose text says why: see _reason).
        No apology is posted for a message extension's invoke (the chat the user types in,
        which the bot is usually not in; a search runs as they type) nor for a card's
        automatic refresh (one per person viewing it): their client shows the failed
        answer itself. Nor to a conversation the bot was just removed from (uninstalled,
        removed, the team deleted): nobody there would read it, and Teams refuses it. Nor
        when a send, reply, update or delete in this conversation failed on the Connector
        (unanswered, throttled, the conversation gone; any failure but a request the
        channel called invalid) or was cut short by the handler's own timeout once a
        request of it was written, or any call failed for want of the bot's token: the
        apology would meet the same failure, or follow a reply that may have been
        posted, and waiting for it again would take the HTTP answer past the channel's
        15 s. Another failed call (a member lookup answered 500, a send to another
        conversation) does not hold it back.
        """
        logger.error(
            "handler failed: activity=%s conversation=%s type=%s error=%s%s",
            clip(turn.activity.get("id")),
            clip(turn.conversation_key),
            clip(turn.activity.get("type")),
            describe(error),
            _reason(error),
        )
        try:
            # What the failure sends keeps within the channel's wait for the answer (less
            # APOLOGY_MARGIN for the answer itself): an answer past it makes the channel
            # send the activity again.
            left = None if turn.answer_by is None else turn.answer_by - time.monotonic()
            if left is not None:
                left -= APOLOGY_MARGIN
                turn.retry = turn.connector.retry_within(max(left, 0.0))
            if _no_apology(turn.activity) or _connector_failing(turn, error):
                pass  # no apology, nor the bot's own in its place
            elif left is not None and left < 1.0:
                logger.warning(
                    "no apology: activity=%s conversation=%s: too little is left of "
                    "the channel's wait for the answer",
                    clip(turn.activity.get("id")),
                    clip(turn.conversation_key),
                )
            elif self._on_error is not None:
                turn.buffering = False  # the answer is the failure: sent now or never seen
                await self._on_error(turn, error)
            else:
                await turn.reply(self.apology, buffer=False)
        except Exception as failure:
            logger.warning(
                "could not apologise: activity=%s conversation=%s error=%s",
                clip(turn.activity.get("id")),
                clip(turn.conversation_key),
                type(failure).__name__,
            )


def _reason(error: BaseException) -> str:
    """What the author needs to know of a failure whose text is the app's own: a state or
    storage error says why (too large, a conflict, unreachable); a Connector error says
    what the channel answered (operation, kind, status and code; not its message, which
    quotes the channel's answer)."""
    from shared.connector.errors import ConnectorError
    from shared.references.contract import StoreError
    from shared.state import StateError

    if isinstance(error, StateError | StoreError):
        return f" ({error})"
    if isinstance(error, ConnectorError):
        parts = [error.operation or "connector", error.kind.value]
        if error.status is not None:
            parts.append(str(error.status))
        if error.code:
            parts.append(clip(error.code))
        return f" ({' '.join(parts)})"
    return ""


def _connector_failing(turn: TurnContext, error: BaseException) -> bool:
    """Whether the apology would meet a Connector failure of the turn again: one the turn
    noted (its latest post here failed, or the bot's token did), the bot's token failing
    the call that raised `error`, or the handler's own timeout (`error`) cutting its
    latest post here short once it was written: the channel was too slow to answer it.
    A post cancelled for another reason (a task beside it failed) says nothing of the
    channel, and the apology goes."""
    from shared.connector.errors import ConnectorError

    return (
        turn.failed_here
        or turn.token_failed
        or (isinstance(error, ConnectorError) and error.no_token)
        or (turn.cut_short_here and isinstance(error, TimeoutError))
    )


def _no_apology(activity: Mapping[str, Any]) -> bool:
    """An invoke whose failure its client shows where it happened, so that a message
    posted to the conversation would only be noise, the bot's removal from the
    conversation (see Router.handle_error), or the bot's own activity passed back by a
    channel (the apology would come back too, and fail again while the failure lasts)."""
    from shared.lifecycle import Change, classify  # on a failure only

    if is_message_extension(activity) or classify(activity) is Change.REMOVE:
        return True
    recipient = activity.get("recipient")
    bot_id = recipient.get("id") if isinstance(recipient, Mapping) else None
    if is_bot_account(activity.get("from"), bot_id if isinstance(bot_id, str) else None):
        return True
    value = activity.get("value")
    return (
        activity.get("type") == "invoke"
        and activity.get("name") == "adaptiveCard/action"
        and isinstance(value, Mapping)
        and value.get("trigger") == "automatic"
    )
