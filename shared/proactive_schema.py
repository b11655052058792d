"""The proactive request: its JSON schema, parsed strictly into a typed request.

See docs/proactive.md for the schema. Every refusal is an :class:`InvalidRequest` with a
short reason (it becomes the poison copy's `poisonReason` and the report's reason).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shared.activity import (
    MAX_JSON_DEPTH,
    TEAMS_CHANNEL,
    DuplicateKey,
    InvalidActivity,
    NotJsonNumber,
    as_activity,
    check_outgoing_fields,
    conversation_key,
    is_http_url,
    is_unicode_text,
    nests_deeper,
    path_id_problem,
    split_key,
    strict_loads,
)
from shared.diagnostics import clip
from shared.reports import SINGLE_TARGET

# The one field the engine adds to copies it puts back on the queue (attempt count, first
# seen, broadcast child). Producers never write it; shared.producer refuses it.
RESERVED = "_proactive"
POISON_REASON = "poisonReason"  # a poison copy's: an operator who puts it back retries it
TOP_LEVEL_FIELDS = frozenset({"id", "to", "activity", "text", RESERVED, POISON_REASON})
BROADCAST_FILTERS = ("channelId", "tenantId", "teamId", "personal")
USER_FIELDS = ("channelId", "id", "tenantId", "serviceUrl")
# The two ways Teams knows a user: the id its activities carry ("29:" and printable ASCII)
# and the AAD object id (a GUID).
TEAMS_USER_ID = re.compile(r"29:[!-~]+")
AAD_OBJECT_ID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")


class InvalidRequest(ValueError):
    """The queue message is not a proactive request this bot can deliver."""


@dataclass(frozen=True, slots=True)
class UserTarget:
    channel_id: str
    user_id: str  # the Teams user id (29:…) or the user's AAD object id
    tenant_id: str
    service_url: str


@dataclass(frozen=True, slots=True)
class BroadcastFilter:
    channel_id: str | None = None
    tenant_id: str | None = None
    team_id: str | None = None
    personal: bool | None = None


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """The engine's reserved field: attempts so far, when first seen, broadcast child."""

    attempt: int = 0
    since: float | None = None
    child: bool = False
    # A child's conversation reference as the fan-out listed it: the send needs no read of
    # the store (the Connector still refuses an untrusted serviceUrl, as for any target).
    # A copy put back to be tried again leaves it out (Engine.requeue).
    reference: Mapping[str, Any] | None = None
    # Sent, but its outcome could not be recorded (storage failed): record it, send nothing.
    outcome: str | None = None
    reason: str | None = None
    # Put back to wait out the claim an earlier attempt of its queue message kept after
    # the send began (it may have posted): once more only (shared/proactive.py).
    resumed: bool = False
    # That message was an operator's retry when the copy was resumed (it carried
    # `poisonReason`, and so does the copy): a `poisonReason` on a resumed copy without
    # this mark was added by an operator since, to retry it.
    resumed_retry: bool = False
    # Kept for storage by a redelivery whose claim was not decided yet: the host's id of
    # that queue message, whose earlier attempt may have kept the target's claim. The copy
    # goes on as that message would (shared/proactive.py).
    claimed_by: str | None = None
    # That message was an operator's retry (it carried `poisonReason`, and so does the
    # copy): a `poisonReason` on a copy without this mark was added by an operator since.
    claimed_retry: bool = False
    # The operator's retry this is a copy of: the host's id of that retry's first queue
    # message (retry_token). Every copy of one retry carries it, and so does every outcome
    # they record: no copy retries a failure another copy of the same retry recorded.
    retry_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attempt": self.attempt, "since": self.since}
        if self.child:
            data["child"] = True
        if self.resumed:
            data["resumed"] = True
            if self.resumed_retry:
                data["resumedRetry"] = True
        if self.claimed_by is not None:
            data["claimedBy"] = self.claimed_by
            if self.claimed_retry:
                data["claimedRetry"] = True
        if self.retry_of is not None:
            data["retryOf"] = self.retry_of
        if self.reference is not None:
            data["reference"] = self.reference
        if self.outcome:
            data["outcome"] = self.outcome
            if self.reason:
                data["reason"] = self.reason
        return data


@dataclass(frozen=True, slots=True)
class ProactiveRequest:
    id: str
    key: str | None  # the conversation key, for conversation and reference targets
    reference: Mapping[str, Any] | None  # an explicit reference target
    activity: dict[str, Any]
    user: UserTarget | None = None
    broadcast: BroadcastFilter | None = None
    engine: Bookkeeping = field(default_factory=Bookkeeping)
    message: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def target_name(self) -> str:
        """Where its outcome is recorded: a broadcast child by its conversation key."""
        return self.key if self.engine.child and self.key else SINGLE_TARGET

    @property
    def label(self) -> str:
        """The target as reports and logs show it."""
        if self.key:
            return self.key
        if self.user:
            return f"user {self.user.channel_id}/{self.user.user_id}"
        return "broadcast"

    @property
    def logged(self) -> str:
        """The label for a log line: quoted and cut short, since a conversation's id is
        whatever its client chose (a line break in it would fake a log line)."""
        return clip(self.label)


# Activity types a bot may send to a conversation on its own initiative. Inbound-only types
# (invoke, conversationUpdate, ...) would only be refused by the Connector after a token and
# a round trip.
SENDABLE_TYPES = frozenset({"message", "typing", "event", "endOfConversation"})
# Where the activity goes is the reference's to decide, never the producer's: these fields of
# a producer's activity are dropped, then filled from the reference.
ADDRESSING_FIELDS = ("channelId", "serviceUrl", "conversation", "from", "recipient")
MAX_ID_CHARS = 1024


# What of an operator's `poisonReason` the engine's copies carry: only its presence counts,
# and the bookkeeping they add must still fit in a queue message (MAX_REQUEST_BYTES leaves
# 512 bytes for both), which a long note took up.
CARRIED_REASON_BYTES = 160


def carried(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message as the engine's copies carry it: a `poisonReason` longer than
    CARRIED_REASON_BYTES as JSON cut short (as text, with "..." at its end)."""
    from shared.queues import compact_json, cut_json

    copy = dict(message)
    reason = copy.get(POISON_REASON)
    if reason is None or len(compact_json(reason).encode("utf-8")) <= CARRIED_REASON_BYTES:
        return copy
    text = reason if isinstance(reason, str) else compact_json(reason)
    copy[POISON_REASON] = cut_json(text, CARRIED_REASON_BYTES, "...")
    return copy


def request_bytes(message: Mapping[str, Any]) -> int:
    """A request's size as JSON without the fields the engine and the poison queue add."""
    from shared.queues import request_size

    own = {k: v for k, v in message.items() if k not in (RESERVED, "poisonReason")}
    return request_size(own)


def field_name(name: str) -> str:
    """A field name as a reason shows it: the producer chose it, so at most 40 characters,
    with line breaks, control and other non-ASCII characters as Python escapes (a reason
    goes into log lines)."""
    return ascii(name[:40])[1:-1]


def as_handled(request: ProactiveRequest) -> ProactiveRequest:
    """The request as the engine handles it: a kept failure the host poisoned, put back by
    an operator with a `poisonReason` to retry it, is tried again (its outcome set aside),
    like the engine's own poison copy; anything else as it is."""
    if request.engine.outcome == "failed" and "poisonReason" in request.message:
        return replace(request, engine=replace(request.engine, outcome=None, reason=None))
    return request


def parse_request(body: bytes | str) -> ProactiveRequest:
    """Validate a queue message body; raises InvalidRequest with a short reason.

    The content is either `activity` (an object; `type` defaults to message) or `text`
    (shorthand for a message with that text), never both: a request carrying both is
    ambiguous and refused. The activity's addressing fields (channelId, serviceUrl,
    conversation, from, recipient) always come from the target's reference.
    """
    try:
        message = strict_loads(body)
    except NotJsonNumber as error:  # no parser on the way to the channel would read it
        raise InvalidRequest(str(error)) from None
    except DuplicateKey as error:  # another reader of the queue may take the other value
        raise InvalidRequest(f"`{field_name(error.name)}` is given twice in one object") from None
    except RecursionError:
        raise InvalidRequest(f"the message nests more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the message is not JSON") from None
    if not isinstance(message, dict):
        raise InvalidRequest("the message is not a JSON object")
    if nests_deeper(message, MAX_JSON_DEPTH + 1):  # the activity one level down
        deep = next(
            name
            for name, value in message.items()
            if isinstance(value, dict | list) and nests_deeper(value, MAX_JSON_DEPTH)
        )
        raise InvalidRequest(f"`{field_name(deep)}` nests more than {MAX_JSON_DEPTH} levels deep")
    unknown = sorted(set(message) - TOP_LEVEL_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field `{field_name(unknown[0])}`")
    request_id = message.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest(f"`id` must be a non-empty string of at most {MAX_ID_CHARS} chars")
    if _UNPRINTABLE.search(request_id):
        raise InvalidRequest(
            "`id` must be printable text: no control characters, line breaks or lone surrogates"
        )
    activity = _content(message.get("activity"), message.get("text"))
    engine = _bookkeeping(message.get(RESERVED))
    base = ProactiveRequest(request_id, None, None, activity, engine=engine, message=message)

    target = message.get("to")
    if not isinstance(target, dict) or len(target) != 1:
        raise InvalidRequest("`to` must be an object with exactly one target")
    kind, value = next(iter(target.items()))
    if engine.child and kind != "conversation":
        raise InvalidRequest("a broadcast child names a conversation")
    if kind == "conversation":
        check_conversation_key(value)
        if engine.reference is not None:
            try:
                carried = _reference_key(engine.reference)
            except InvalidRequest:
                carried = None
            if carried != value:
                raise InvalidRequest(f"`{RESERVED}.reference` is not `to.conversation`'s")
            return replace(base, key=value, reference=engine.reference)
        return replace(base, key=value)
    if kind == "reference":
        return replace(base, key=_reference_key(value), reference=value)
    if kind == "user":
        return replace(base, user=_user(value))
    if kind == "broadcast":
        return replace(base, broadcast=parse_broadcast(value))
    raise InvalidRequest("`to` must name a conversation, reference, user or broadcast")


def check_conversation_key(value: Any) -> str:
    """`value` when it is a `to.conversation` parse_request takes; InvalidRequest otherwise."""
    try:
        _, conversation_id = split_key(value)
        if not is_unicode_text(value) or path_id_problem(conversation_id):
            raise ValueError("not a conversation id the bot can store")
    except ValueError:
        raise InvalidRequest(
            "`to.conversation` must be a conversation key '<channelId>/<conversation.id>'"
        ) from None
    return value


def invalid_target_label(body: bytes | str) -> str | None:
    """What the report shows as an invalid request's target, when its `to` names one the
    way a valid request's report would (a conversation key, a user, a broadcast); None
    otherwise (the slot's own name)."""
    from shared.queues import json_fields

    message = json_fields(body)
    target = message.get("to") if message is not None else None
    if not isinstance(target, dict) or len(target) != 1:
        return None
    [(kind, value)] = target.items()
    if kind == "conversation":
        with contextlib.suppress(InvalidRequest):
            return check_conversation_key(value)  # else not one (a name of another kind)
    if kind == "user" and isinstance(value, dict):
        channel_id, user_id = value.get("channelId"), value.get("id")
        if isinstance(channel_id, str) and isinstance(user_id, str) and channel_id and user_id:
            return f"user {channel_id}/{user_id}"
    return "broadcast" if kind == "broadcast" else None


# A broadcast child nests its reference two levels down (the message, its RESERVED field).
_CARRIED_DEPTH = MAX_JSON_DEPTH + 1 - 2


def carries(reference: Any, key: str) -> bool:
    """Whether a broadcast child to `key` may carry `reference` (parse_request takes it:
    the reference's own key, within the nesting a message may have); a child that may not
    reads the reference from the store instead."""
    try:
        return _reference_key(reference) == key and not nests_deeper(reference, _CARRIED_DEPTH)
    except InvalidRequest:
        return False


def claimed_identity(message: Mapping[str, Any] | None) -> str | None:
    """The queue message a copy goes on as (`_proactive.claimedBy`: its earlier attempt's
    claim is the copy's own), or None. Not when an operator put the copy back to retry it:
    a `poisonReason` the message did not carry when the copy was kept (`claimedRetry`
    says whether it did) makes it a message of its own."""
    bookkeeping = message.get(RESERVED) if message is not None else None
    if not isinstance(bookkeeping, dict):
        return None
    claimed_by = bookkeeping.get("claimedBy")
    retrying = bookkeeping.get("claimedRetry") is True
    if not usable_id(claimed_by) or ("poisonReason" in message) != retrying:
        return None
    return claimed_by


def retry_token(message: Mapping[str, Any], handled: str | None) -> str | None:
    """The operator's retry `message` is a copy of (`_proactive.retryOf`), None when none.

    A message carrying a `poisonReason` is a retry: the one its `retryOf` names, else its
    own (`handled`: the host's id of the message handled, or of the one it goes on as). A
    failure the engine kept to record, put back with a `poisonReason`, is an operator's
    new retry whatever it names (its recorded failure is set aside). A copy kept to record
    a retry's outcome (its `poisonReason` dropped) still names that retry."""
    bookkeeping = message.get(RESERVED)
    named = bookkeeping.get("retryOf") if isinstance(bookkeeping, dict) else None
    named = named if usable_id(named) else None
    own = handled if usable_id(handled) else None
    if "poisonReason" not in message:
        return named
    if isinstance(bookkeeping, dict) and bookkeeping.get("outcome") == "failed":
        return own
    return named or own


def kept_identity(
    message: Mapping[str, Any], handled: str | None, *, redelivered: bool, records: bool
) -> str | None:
    """The queue message a copy kept (for storage or the settings) for `message` goes on
    as: the one `message` already goes on as; else `handled` (the host's id of the message
    handled, or of the one it goes on as) where its identity matters: a redelivery (an
    earlier attempt may have kept the target's claim), or an outcome the copy is kept to
    record (`records`: recorded as the message that sent). A copy carrying an outcome
    that names nobody (kept by an earlier version) still names nobody: whoever handles it
    did not send it. Otherwise none: a message of its own, whatever mark it came with."""
    if (identity := claimed_identity(message)) is not None:
        return identity
    bookkeeping = message.get(RESERVED)
    kept = bookkeeping.get("outcome") if isinstance(bookkeeping, dict) else None
    if kept is not None and not (kept == "failed" and "poisonReason" in message):
        return None  # (a failure with a poisonReason is set aside: an operator's retry)
    return handled if (redelivered or records) and usable_id(handled) else None


def claim_marks(message: Mapping[str, Any], identity: str | None) -> dict[str, Any]:
    """The `claimedBy`/`claimedRetry` fields of a copy kept for a message handled as
    `identity` (None: a message of its own, so none), replacing any it carried."""
    if identity is None:
        return {}
    marks: dict[str, Any] = {"claimedBy": identity}
    if "poisonReason" in message:
        marks["claimedRetry"] = True
    return marks


def usable_id(value: Any) -> bool:
    """Whether `value` passes parse_request's rules for `id` (a report is kept under it)."""
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and not _UNPRINTABLE.search(value)
    )


# Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and lone
# surrogates (bytes that were not UTF-8, as Python decodes them): an id is printed on one
# line by the producer command and logged, and is a blob name in UTF-8.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _reference_key(reference: Any) -> str:
    if not isinstance(reference, dict):
        raise InvalidRequest("`to.reference` must be an object")
    conversation = reference.get("conversation")
    if (
        not _non_empty_string(reference.get("serviceUrl"))
        or not _non_empty_string(reference.get("channelId"))
        or "/" in reference["channelId"]
        or not isinstance(conversation, dict)
        or not _non_empty_string(conversation.get("id"))
    ):
        raise InvalidRequest("`to.reference` needs serviceUrl, channelId and conversation.id")
    for account in ("bot", "user"):
        if not isinstance(reference.get(account), dict | None):
            raise InvalidRequest(f"`to.reference.{account}` must be an object")
    return conversation_key(reference["channelId"], conversation["id"])


def _user(value: Any) -> UserTarget:
    if not isinstance(value, dict):
        raise InvalidRequest("`to.user` must be an object")
    unknown = sorted(set(value) - set(USER_FIELDS))
    if unknown:
        raise InvalidRequest(f"`to.user` has an unknown field `{field_name(unknown[0])}`")
    missing = [name for name in USER_FIELDS if not _non_empty_string(value.get(name))]
    if missing:
        raise InvalidRequest("`to.user` needs " + ", ".join(USER_FIELDS) + " (strings)")
    if value["channelId"] != TEAMS_CHANNEL:
        raise InvalidRequest("`to.user` is for Teams users: channelId must be msteams")
    if not is_http_url(value["serviceUrl"]):
        raise InvalidRequest("`to.user.serviceUrl` must be an http or https URL")
    user_id = value["id"]
    if not (TEAMS_USER_ID.fullmatch(user_id) or AAD_OBJECT_ID.fullmatch(user_id)):
        raise InvalidRequest(
            "`to.user.id` must be a Teams user id (29:...) or the user's AAD object id (a GUID)"
        )
    return UserTarget(value["channelId"], value["id"], value["tenantId"], value["serviceUrl"])


def parse_broadcast(value: Any) -> BroadcastFilter:
    if not isinstance(value, dict):
        raise InvalidRequest("`to.broadcast` must be an object ({} means every conversation)")
    unknown = sorted(set(value) - set(BROADCAST_FILTERS))
    if unknown:
        filters, named = ", ".join(BROADCAST_FILTERS), field_name(unknown[0])
        raise InvalidRequest(f"`to.broadcast` filters are {filters}; not `{named}`")
    for name in ("channelId", "tenantId", "teamId"):
        if name in value and not _non_empty_string(value[name]):
            raise InvalidRequest(f"`to.broadcast.{name}` must be a non-empty string")
    if "/" in value.get("channelId", ""):  # a channel id never has one: it matches nothing
        raise InvalidRequest("`to.broadcast.channelId` must be a channel id, without '/'")
    if "personal" in value and not isinstance(value["personal"], bool):
        raise InvalidRequest("`to.broadcast.personal` must be true or false")
    return BroadcastFilter(
        value.get("channelId"), value.get("tenantId"), value.get("teamId"), value.get("personal")
    )


MAX_ATTEMPT = 1_000_000  # attempts the engine counts: far more than an hour of requeues
MAX_EPOCH = 1e11  # seconds: the year 5138, and finite (an integer past 1e308 is not)


def _is_epoch(value: Any) -> bool:
    """A time in epoch seconds as the engine writes it: a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_EPOCH  # NaN compares false


def _bookkeeping(value: Any) -> Bookkeeping:
    if value is None:
        return Bookkeeping()
    if not isinstance(value, dict):
        raise InvalidRequest(f"`{RESERVED}` is the engine's own field")
    attempt, since, child = value.get("attempt", 0), value.get("since"), value.get("child", False)
    outcome, reason, reference = value.get("outcome"), value.get("reason"), value.get("reference")
    resumed, claimed_by = value.get("resumed", False), value.get("claimedBy")
    claimed_retry = value.get("claimedRetry", False)
    resumed_retry = value.get("resumedRetry", False)
    retry_of = value.get("retryOf")
    if (
        not isinstance(attempt, int)
        or not 0 <= attempt <= MAX_ATTEMPT
        or not (since is None or _is_epoch(since))
        or not isinstance(child, bool)
        or not isinstance(resumed, bool)
        or not (claimed_by is None or usable_id(claimed_by))
        or not isinstance(claimed_retry, bool)
        or (claimed_retry and claimed_by is None)
        or not isinstance(resumed_retry, bool)
        or (resumed_retry and not resumed)
        or not (retry_of is None or usable_id(retry_of))
        or outcome not in (None, "delivered", "pruned", "failed")
        or not isinstance(reason, str | None)
        or not (reference is None or (child and isinstance(reference, dict)))
    ):
        raise InvalidRequest(f"`{RESERVED}` is the engine's own field")
    return Bookkeeping(
        attempt,
        float(since) if since is not None else None,
        child,
        reference,
        outcome,
        reason,
        resumed,
        resumed_retry,
        claimed_by,
        claimed_retry,
        retry_of,
    )


def _content(activity: Any, text: Any) -> dict[str, Any]:
    """The activity to send, from the request's `activity` or `text` (see parse_request)."""
    if activity is not None and text is not None:
        raise InvalidRequest("give either `activity` or `text`, not both")
    if activity is not None:
        if not isinstance(activity, dict):
            raise InvalidRequest("`activity` must be an object")
        outgoing = as_activity(activity)
        kind = outgoing["type"]
        if not isinstance(kind, str) or kind not in SENDABLE_TYPES:
            raise InvalidRequest(
                "`activity.type` must be one of " + ", ".join(sorted(SENDABLE_TYPES))
            )
        for name in ADDRESSING_FIELDS:
            outgoing.pop(name, None)
        try:
            check_outgoing_fields(outgoing, "activity.")
        except InvalidActivity as invalid:  # the channel would refuse it: say so now
            raise InvalidRequest(invalid.reason) from None
        return outgoing
    if isinstance(text, str) and text:
        return as_activity(text)
    if text is not None:
        raise InvalidRequest("`text` must be a non-empty string")
    raise InvalidRequest("one of `activity` (an object) or `text` is required")


def _non_empty_string(value: Any) -> bool:
    """A non-empty string of Unicode text (a lone surrogate escape is JSON, not text: no
    blob name, URL or log line takes it)."""
    return isinstance(value, str) and bool(value) and is_unicode_text(value)
