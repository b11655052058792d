"""The turn context: one incoming activity and the means to answer it.

A handler gets a :class:`TurnContext` and talks back through it: `send` posts a new
activity to the conversation (text, an activity, an Adaptive Card or an attachment),
`reply` answers the incoming activity (reply built per spec), `update_activity` /
`delete_activity` change what the bot sent earlier, and `connector` is the whole
Connector client (members, conversations, attachments). When the channel asked for
`deliveryMode: expectReplies`, what the bot sends is buffered and returned in the HTTP
response instead of being posted to the Connector.

The activity's fields are typed (:mod:`shared.wire`): `from_`, `recipient`,
`conversation`, `value`, `channel_data`, `tenant_id`, `team_id`, `entities`,
`attachments`, `locale`; `conversation_state` and `user_state` are the bot's state for
this conversation and this user (:mod:`shared.state`), read on first use and saved at the
end of the turn when changed.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from shared.activity import (
    TEAMS_CHANNEL,
    Activity,
    ConversationReference,
    apply_conversation_reference,
    conversation_key,
    conversation_reference,
    is_bot_account,
    teams_team_id,
    teams_tenant_id,
    text_without_bot_mention,
)
from shared.cards import as_message
from shared.roster import all_members, roster_id
from shared.state import (
    State,
    StateConflict,
    StateError,
    StateStore,
    StateTooLarge,
    conversation_state_key,
)
from shared.wire import (
    Attachment,
    CardActionValue,
    ChannelAccount,
    ConversationAccount,
    Entity,
    Mention,
    TaskRequest,
    TeamsChannelData,
)

if TYPE_CHECKING:
    from shared.auth.inbound import Identity
    from shared.config import Settings
    from shared.connector.client import ConnectorClient
    from shared.connector.errors import RetryPolicy


T = TypeVar("T")


class TurnContext:
    """One incoming activity, who sent it, and how to answer."""

    __slots__ = (
        "_arrived",
        "_conversation_state",
        "_later",
        "_text",
        "_user_state",
        "activity",
        "answer_by",
        "answered",
        "buffered",
        "buffering",
        "connector",
        "cut_short_here",
        "failed_here",
        "identity",
        "match",
        "retry",
        "settings",
        "started",
        "state_store",
        "token_failed",
    )

    def __init__(
        self,
        activity: Activity,
        connector: ConnectorClient,
        *,
        identity: Identity | None = None,
        settings: Settings | None = None,
        state: StateStore | None = None,
        body: bytes | None = None,
    ) -> None:
        self.activity = activity
        self.connector = connector  # the whole Connector client, for what a turn may do
        self.identity = identity
        self.settings = settings
        self.state_store = state
        self.match: re.Match[str] | None = None  # set by a `Router.message(pattern)` route
        self.buffered: list[Activity] = []  # what was sent under deliveryMode expectReplies
        self.buffering = True  # False once the answer can no longer carry what is sent
        self.answered = False  # True once the answer carrying the buffered replies is built
        # When (time.monotonic()) the turn's work must be over for its HTTP answer to
        # reach the channel in time (what the endpoint does after the turn left out): set
        # by the messages endpoint; None for a turn made elsewhere.
        self.answer_by: float | None = None
        self.started = time.monotonic()  # a state removed since is not saved again
        # The retry policy of send, reply, update and delete (None: the Connector client's
        # own): on the error path, cut to what is left of the channel's wait (Router).
        self.retry: RetryPolicy | None = None
        # What the error apology would meet again (Router.handle_error), kept by _noting:
        # the latest send, reply, update or delete here failed unanswered (or throttled,
        # the conversation gone: anything the channel did not answer as invalid), or was
        # cancelled once a request of it was written (which counts when the handler's own
        # timeout cancelled it), and a call failed for want of the bot's token with none
        # getting one since.
        self.failed_here = False
        self.cut_short_here = False
        self.token_failed = False
        self._conversation_state: State | None = None
        self._user_state: State | None = None
        self._text: str | None = None
        self._later = 0  # send_later calls made so far: the next one's place in the turn
        # An activity without a timestamp as it came (send_later's ids; see _later_id): the
        # request body's digest (`body`, the endpoint's), else a copy made text when needed.
        stamped = isinstance(activity.get("timestamp"), str) and activity.get("timestamp")
        self._arrived: Any = None
        if not stamped:
            self._arrived = hashlib.sha256(body).hexdigest() if body else copy.deepcopy(activity)

    # --- reading the activity ------------------------------------------------------------

    @property
    def reference(self) -> ConversationReference:
        return conversation_reference(self.activity)

    @property
    def conversation_key(self) -> str:
        conversation = self.activity.get("conversation") or {}
        return conversation_key(str(self.activity.get("channelId")), str(conversation.get("id")))

    @property
    def expects_replies(self) -> bool:
        return self.activity.get("deliveryMode") == "expectReplies"

    @property
    def text(self) -> str:
        """The message text, trimmed, without the bot's own @mention (worked out once)."""
        if self._text is None:
            self._text = text_without_bot_mention(self.activity)
        return self._text

    @property
    def bot_id(self) -> str | None:
        recipient = self.activity.get("recipient") or {}
        return recipient.get("id")

    # --- typed fields -----------------------------------------------------------------------

    @property
    def type(self) -> str:
        return self.activity["type"]

    @property
    def channel_id(self) -> str:
        return self.activity["channelId"]

    @property
    def from_(self) -> ChannelAccount:
        """Who sent the activity (``{}`` when the channel did not say)."""
        return cast(ChannelAccount, self.activity.get("from") or {})

    @property
    def recipient(self) -> ChannelAccount:
        """The bot, as the channel addressed it."""
        return cast(ChannelAccount, self.activity.get("recipient") or {})

    @property
    def conversation(self) -> ConversationAccount:
        return cast(ConversationAccount, self.activity["conversation"])

    @property
    def value(self) -> Any:
        """The invoke's or event's payload, or a card's submitted inputs (any JSON)."""
        return self.activity.get("value")

    @property
    def channel_data(self) -> TeamsChannelData:
        """The channel's own data (``{}`` when absent); Teams' shape is typed."""
        return cast(TeamsChannelData, self.activity.get("channelData") or {})

    @property
    def tenant_id(self) -> str | None:
        """The Microsoft Entra tenant (conversation.tenantId or channelData.tenant.id) of an
        msteams activity; None on other channels, whose clients write those fields."""
        return teams_tenant_id(self.activity)

    @property
    def team_id(self) -> str | None:
        """The Teams team of a channel conversation (msteams activities only)."""
        return teams_team_id(self.activity)

    @property
    def entities(self) -> list[Entity]:
        return cast(list[Entity], self.activity.get("entities") or [])

    @property
    def mentions(self) -> list[Mention]:
        """The activity's @mentions (of the bot too)."""
        return [cast(Mention, e) for e in self.entities if e.get("type") == "mention"]

    @property
    def attachments(self) -> list[Attachment]:
        return cast(list[Attachment], self.activity.get("attachments") or [])

    @property
    def locale(self) -> str | None:
        return self.activity.get("locale")

    @property
    def card_action(self) -> CardActionValue | None:
        """The `value` of an ``adaptiveCard/action`` invoke, when it has an action."""
        if self.type != "invoke" or self.activity.get("name") != "adaptiveCard/action":
            return None
        value = self.value
        if isinstance(value, dict) and isinstance(value.get("action"), dict):
            return cast(CardActionValue, value)
        return None

    @property
    def task_request(self) -> TaskRequest:
        """The `value` of a ``task/fetch`` / ``task/submit`` invoke (``{}`` when absent)."""
        value = self.value
        return cast(TaskRequest, value if isinstance(value, dict) else {})

    # --- Teams conversation kinds -------------------------------------------------------------

    @property
    def is_personal(self) -> bool:
        """A 1:1 chat with the bot (Teams `personal`; elsewhere: not a group)."""
        kind = self.conversation.get("conversationType")
        if kind is not None:
            return kind == "personal"
        return self.conversation.get("isGroup") is not True

    @property
    def is_group_chat(self) -> bool:
        return self.conversation.get("conversationType") == "groupChat"

    @property
    def is_channel(self) -> bool:
        """A Teams channel (a team's conversation)."""
        return self.conversation.get("conversationType") == "channel"

    # --- state -------------------------------------------------------------------------------

    @property
    def conversation_state(self) -> State:
        """This conversation's state: ``data = await turn.conversation_state.load()``."""
        if self._conversation_state is None:
            key = conversation_state_key(self.channel_id, self.conversation["id"])
            self._conversation_state = State(self.state_store, key)
            self._conversation_state.since = self.started
        return self._conversation_state

    @property
    def user_state(self) -> State:
        """The sender's state on this channel: ``data = await turn.user_state.load()``."""
        if self._user_state is None:
            user_id = self.from_.get("id")
            if not isinstance(user_id, str) or not user_id:
                raise StateError("state: this activity has no from.id, so no user state")
            # On Teams the channel vouches for the sender's aadObjectId: saved with the
            # state, an erasure by that id finds it (elsewhere the client writes it).
            aad = self.from_.get("aadObjectId") if self.channel_id == TEAMS_CHANNEL else None
            self._user_state = State.for_user(
                self.state_store, self.channel_id, user_id, aad_object_id=aad
            )
            self._user_state.since = self.started
        return self._user_state

    async def save_state(self) -> None:
        """Save the turn's changed states now (the pipeline also does it after the turn).
        Each is checked first: one too large or not plain JSON fails before either is
        written. A conflict, a storage failure or a merge that comes out too large is found
        by the write itself, so it can still come after the other state was saved. A
        storage failure is saved once more while the channel's wait allows (the write may
        have been stored: found by its id, never applied twice)."""
        # One removed while the turn ran (its conversation, its user's data erased) is
        # neither checked nor written (State.since, shared/removals.py).
        states = [s for s in (self._conversation_state, self._user_state) if s is not None]
        for state in states:
            state.check()
        for state in states:
            try:
                await state.save()
            except (StateTooLarge, StateConflict):
                raise
            except StateError:
                # Storage failed, and the write may have been stored all the same (its
                # answer lost): saved once more, it is found by its id, not applied again.
                # Failed instead, the channel's retry of the activity would count it twice.
                # Within the channel's wait only: a late answer is resent all the same.
                left = None if self.answer_by is None else self.answer_by - time.monotonic()
                if left is not None and left < 2.0:
                    raise
                try:
                    async with asyncio.timeout(left):
                        await state.save()
                except TimeoutError:
                    raise StateError(
                        "state: the save was tried again and did not end within the channel's wait"
                    ) from None

    async def discard_state(self) -> None:
        """Drop the turn's state changes not saved yet (State.discard), after a failed
        ``save_state`` the handler caught and told the user of: the turn then saves
        nothing more, and answers as the handler did."""
        for state in (self._conversation_state, self._user_state):
            if state is not None:
                await state.discard()

    # --- members -------------------------------------------------------------------------------

    async def members(self) -> list[ChannelAccount]:
        """Everyone in this conversation; in a Teams channel, its team's members, read a
        page at a time (shared/roster.py)."""
        found = await self._noting(all_members(self.connector, self.activity), here=False)
        return cast(list[ChannelAccount], found)

    async def member(self, member_id: str) -> ChannelAccount:
        """One member of this conversation (in a Teams channel: of its team), Connector
        `GetConversationMember`."""
        service_url, conversation_id = self.activity["serviceUrl"], roster_id(self.activity)
        found = await self._noting(
            self.connector.get_conversation_member(service_url, conversation_id, member_id),
            here=False,
        )
        return cast(ChannelAccount, found)

    @property
    def members_added(self) -> list[dict[str, Any]]:
        """Members added to the conversation, the bot itself excluded."""
        return self._others(self.activity.get("membersAdded"))

    @property
    def members_removed(self) -> list[dict[str, Any]]:
        """Members removed from the conversation, the bot itself excluded."""
        return self._others(self.activity.get("membersRemoved"))

    def _others(self, members: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        return [m for m in members or () if not is_bot_account(m, self.bot_id)]

    # --- answering -------------------------------------------------------------------------

    async def send(self, text_or_activity: str | Mapping[str, Any]) -> dict:
        """Post a new activity to this conversation (Connector `SendToConversation`): text,
        an activity, or an Adaptive Card / attachment (sent as a message carrying it).
        Returns the Connector's answer (``{"id": ...}``, the id `update_activity` takes);
        under expectReplies ``{}``: the activity is only buffered, it has no id yet, as
        with the SDKs (check for ``"id"`` before updating what was sent)."""
        activity = apply_conversation_reference(self._outgoing(text_or_activity), self.reference)
        return await self._deliver(activity, reply_to=None, buffer=True)

    async def reply(
        self, text_or_activity: str | Mapping[str, Any], *, buffer: bool = True
    ) -> dict:
        """Answer the incoming activity (Connector `ReplyToActivity`, `replyToId` = its id).

        An activity without an id, and a conversationUpdate (spec: not a reply target), is
        answered by posting to the conversation instead. ``buffer=False`` posts through the
        Connector even under expectReplies (the error apology uses it: a failed turn answers
        500, so a buffered apology would never be seen). Returns what :meth:`send` returns
        (``{}`` when buffered).
        """
        incoming_id = self.reference.get("activityId")
        activity = apply_conversation_reference(
            self._outgoing(text_or_activity), self.reference, reply=bool(incoming_id)
        )
        return await self._deliver(activity, reply_to=incoming_id, buffer=buffer)

    async def update_activity(
        self, activity_id: str, text_or_activity: str | Mapping[str, Any]
    ) -> dict:
        """Replace an activity the bot sent earlier in this conversation."""
        activity = apply_conversation_reference(self._outgoing(text_or_activity), self.reference)
        activity["id"] = activity_id
        return await self._noting(
            self.connector.update_activity(
                activity["serviceUrl"],
                activity["conversation"]["id"],
                activity_id,
                activity,
                **self._retry_options(),
            )
        )

    async def delete_activity(self, activity_id: str) -> None:
        """Delete an activity the bot sent earlier in this conversation."""
        await self._noting(
            self.connector.delete_activity(
                self.activity["serviceUrl"],
                self.activity["conversation"]["id"],
                activity_id,
                **self._retry_options(),
            )
        )

    async def send_later(
        self,
        text_or_activity: str | Mapping[str, Any],
        *,
        delay: float = 0.0,
        request_id: str | None = None,
    ) -> str:
        """Send to this conversation later, through the proactive queue: ``delay`` seconds
        from now (up to about 7 days), with the queue's retries, idempotency and delivery
        report. Returns the request id (``shared.producer.read_report`` reads its report).

        Without ``request_id``, the id is made from the incoming activity (its
        conversation, type, id, timestamp and sender) and this call's place among the
        turn's send_later calls: when the channel sends the same activity again (after a
        500 or a late answer) and the handler runs a second time, its requests carry the
        same ids, and the queue sends each once, whatever they hold this time (a time of
        day, a generated text). A handler that may ask in another order when run again
        passes its own ``request_id``.

        Raises ``shared.proactive_schema.InvalidRequest`` (nothing enqueued) for what the
        engine could not deliver, e.g. an activity type it does not send.
        """
        from shared.producer import enqueue

        outgoing = self._outgoing(text_or_activity)
        reference = {k: v for k, v in self.reference.items() if k != "activityId"}
        request: dict[str, Any] = {"to": {"reference": reference}, "activity": outgoing}
        place, self._later = self._later, self._later + 1
        if request_id is None:
            request_id = self._later_id(place)
        if request_id is not None:
            request["id"] = request_id
        # Run again (the channel resent the activity), the handler may ask with another
        # text (a time of day): the first request sent under the id is the one delivered.
        return await enqueue(
            request, settings=self.settings, delay=delay, refuse_another_request=False
        )

    def _later_id(self, place: int) -> str | None:
        """The id of the turn's `place`-th send_later made without one: the same when the
        channel sends this activity again, another for another activity. An edit, a
        deletion or a reaction carries the id of the message it is about, so the type,
        timestamp and sender count too; without a timestamp, the whole activity (a
        channel's resend repeats it). None (a random id) for an activity without an id."""
        activity = self.activity
        activity_id = activity.get("id")
        if not isinstance(activity_id, str) or not activity_id:
            return None
        sender = activity.get("from")
        when = activity.get("timestamp")
        if not isinstance(when, str) or not when:
            arrived = self._arrived  # the activity as it came, not as a handler left it
            when = arrived if isinstance(arrived, str) else _as_text(arrived)
        seed = json.dumps(
            [
                self.conversation_key,
                activity.get("type"),
                activity_id,
                when,
                sender.get("id") if isinstance(sender, Mapping) else None,
                activity.get("reactionsAdded"),
                activity.get("reactionsRemoved"),
                place,
            ],
            default=repr,
        )
        return "turn:" + hashlib.sha256(seed.encode("utf-8", "surrogatepass")).hexdigest()[:40]

    def _outgoing(self, value: str | Mapping[str, Any]) -> Activity:
        """What a handler sends to this conversation, as an activity. ValueError when it
        names another conversation, serviceUrl or channel: it would be posted here all the
        same (to post elsewhere: ``turn.connector``, or ``shared.producer.enqueue``)."""
        activity = as_message(value)
        here = self.reference
        for name, mine in (
            ("conversation", (here.get("conversation") or {}).get("id")),
            ("serviceUrl", here.get("serviceUrl")),
            ("channelId", here.get("channelId")),
        ):
            theirs = activity.get(name)
            if isinstance(theirs, Mapping):
                theirs = theirs.get("id")
            if name == "serviceUrl" and isinstance(theirs, str) and isinstance(mine, str):
                theirs, mine = theirs.rstrip("/"), mine.rstrip("/")  # one endpoint either way
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"the activity's {name} is not this conversation's: a turn sends to its "
                    "own conversation (turn.connector or shared.producer.enqueue send "
                    "elsewhere)"
                )
        return activity

    async def _deliver(self, activity: Activity, *, reply_to: str | None, buffer: bool) -> dict:
        if buffer and self.buffering and self.expects_replies:
            if self.answered:
                # A task that outlived its turn: the answer has gone, and the channel asked
                # for the replies in it (not posted to it): said, not dropped in silence.
                raise RuntimeError(
                    "the turn's answer was sent: under expectReplies a send after it "
                    "reaches nobody (send before the handler returns, or use send_later)"
                )
            self.buffered.append(activity)
            return {}
        service_url, conversation_id = activity["serviceUrl"], activity["conversation"]["id"]
        options = self._retry_options()
        if reply_to:
            call = self.connector.reply_to_activity(
                service_url, conversation_id, reply_to, activity, **options
            )
        else:
            call = self.connector.send_to_conversation(
                service_url, conversation_id, activity, **options
            )
        return await self._noting(call)

    def _retry_options(self) -> dict[str, RetryPolicy]:
        """The Connector call's `retry` argument: the turn's (the error path's time left),
        else none (the client's own policy)."""
        return {} if self.retry is None else {"retry": self.retry}

    async def _noting(self, call: Awaitable[T], *, here: bool = True) -> T:
        """`call`'s result, noting what its Connector failure or its cancellation says of
        the error apology's way (``failed_here``, ``cut_short_here``, ``token_failed``):
        `here` is a call to this conversation,
        the way the apology goes. A call answered by the channel got a token; one here
        answered as invalid (the request was wrong) shows the way open."""
        from shared.connector.transport import requests_leaving

        with requests_leaving() as left:
            try:
                result = await call
            except asyncio.CancelledError:
                # Cut short once a request of it was written: it may have been posted.
                # Whether an apology would follow it depends on why (Router.handle_error).
                if here and left():
                    self.cut_short_here = True
                raise
            except Exception as error:
                self._note_failure(error, here)
                raise
        self.token_failed = False
        if here:
            self.failed_here = self.cut_short_here = False
        return result

    def _note_failure(self, error: Exception, here: bool) -> None:
        from shared.connector.errors import ConnectorError, ErrorKind  # on a failure only

        if not isinstance(error, ConnectorError):
            return
        answered = error.status is not None
        if error.no_token:
            self.token_failed = True
        elif answered:
            self.token_failed = False
        invalid = error.kind is ErrorKind.INVALID
        if here and not error.no_token and (answered or not invalid):
            # Refused as invalid before anything was sent says nothing of the way.
            self.failed_here = not invalid
            self.cut_short_here = False


def _as_text(activity: Mapping[str, Any]) -> str:
    try:
        return json.dumps(activity, sort_keys=True, default=repr)
    except (TypeError, ValueError):  # keys of several types (set by a caller, not JSON)
        return repr(activity)
