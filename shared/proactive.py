"""Proactive delivery: one send per target, and what each outcome means.

A queue message (schema: shared/proactive_schema.py, docs/proactive.md) names one
target: a stored conversation (`conversation`), an explicit `reference`, a Teams `user`
(their stored 1:1, or a new one), or a `broadcast` (fanned out by shared/fanout.py into
one message per conversation). :func:`handle_queue_message` is the queue trigger's one call:

- delivered: the target's slot is settled at once (shared/idempotency.py), then reported.
- the target already has an outcome (a redelivered or resubmitted id): nothing is sent,
  reported as a duplicate (a failure this same queue message recorded, its process dead
  before it returned: the poison copy is put again, reported failed).
- throttled or transient after the client's own retries: a copy goes back on the queue
  after `Retry-After` (+ jitter), up to `BOT_PROACTIVE_MAX_AGE_SECONDS`; then failed, with
  a poison copy.
- gone (403 roster / blocked, 404): the reference actually tried is pruned, reported.
- no stored reference for the key: requeued for about a minute (the reference may be
  landing), then failed with a poison copy.
- a broadcast child whose tenant's line in this instance would hold it over a second
  while another line here stands nearly empty: requeued as it came before its slot is
  claimed, after about that wait, so the invocation takes another message (README,
  "Pacing"). Nothing was sent; not an attempt, its age not started.
- malformed, untrusted serviceUrl, refused by the Connector: poison copy with the reason
  at once, reported failed.
- 500, or no answer after the POST was written (the message may have been posted): never
  resent (but once, should neither storage nor the queue take its failure: docs/
  proactive.md, "The remaining window"); failed with a poison copy.
- the bot's credentials or settings refused: requeued with capped backoff, never
  poisoned; delivered once the setting (named in the log) is fixed.

- the bookkeeping or reference store failing: requeued with the same capped backoff.

A requeued copy is a new queue message and the original returns normally, so the host's
dequeue budget (`maxDequeueCount`) is spent only when that copy cannot be queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from shared.config import Settings
from shared.connector.errors import ConnectorError, ErrorKind
from shared.delivery import (
    Outcome,
    Parts,
    child_scope,
    deliver,
    opening_refused,
    post,
    resolve,
)
from shared.diagnostics import clip
from shared.engine import Engine, settings_backoff
from shared.holding import hold_for_settings
from shared.idempotency import (
    Busy,
    Claim,
    Settled,
    release_claim,
    replace_with_claim,
    take_claim,
)
from shared.logs import log_repeated, storage_cause
from shared.outcomes import (
    REMOVED_REASON,
    OutcomeKept,
    Unsettled,
    claim_spent,
    fail_target,
    failed_here,
    hold_for_storage,
    named_by_this_message,
    put_back_spent,
    put_poison_copy,
    record_given_up,
    record_or_hold,
    record_target,
    record_unrecorded,
)
from shared.proactive_schema import (
    RESERVED,
    InvalidRequest,
    ProactiveRequest,
    as_handled,
    claimed_identity,
    invalid_target_label,
    parse_request,
    request_bytes,
    retry_token,
    usable_id,
)
from shared.queues import (
    MAX_QUEUE_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    StorageQueue,
    json_fields,
    json_object,
    poison_message,
)
from shared.references import StoreError, UnreadableDocument
from shared.reports import (
    SINGLE_TARGET,
    Final,
    outcome_name,
    record_duplicate,
    record_outcome,
    single_head,
)
from shared.room import ROOM_SECONDS, room_within

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_QUEUE_MESSAGE_BYTES",
    "Engine",
    "InvalidRequest",
    "Outcome",
    "ProactiveRequest",
    "deliver",
    "handle_queue_message",
    "parse_request",
    "poison_message",
    "send_to_poison_queue",
]


async def handle_queue_message(
    body: bytes | str,
    runtime: Parts,
    *,
    engine: Engine | None = None,
    final_attempt: bool = False,
    message_id: str | None = None,
    redelivered: bool = False,
) -> Outcome:
    """Process one queue message; see :func:`_handle`.

    `final_attempt`: the host poisons the message if this attempt raises too (its
    `maxDequeueCount` is reached). The target's failure is then recorded first, so its
    report (and its broadcast's) still reaches `done`. `message_id`: the host's id of the
    queue message, which its redeliveries share; `redelivered`: this is one of them.
    """
    engine = engine or Engine.for_runtime(runtime)
    if message_id is not None:
        engine = replace(
            engine, message_id=message_id, redelivered=redelivered, delivered_as=message_id
        )
    try:
        return await _handle(body, engine)
    except Exception as failure:
        if final_attempt:
            await record_given_up(body, _going_on_as(engine, json_object(body)), failure)
        raise


def _going_on_as(engine: Engine, message: Mapping[str, Any] | None) -> Engine:
    """The engine as the queue message a kept copy goes on as (`claimed_identity`)."""
    identity = claimed_identity(message)
    if identity is None:
        return engine
    return replace(engine, message_id=identity, redelivered=True)


async def _handle(body: bytes | str, engine: Engine) -> Outcome:
    """Process one queue message (see the module table).

    A storage failure (the bookkeeping or the reference store) puts a copy back with a
    capped backoff, as a settings mistake does: raising would spend the host's dequeue
    budget, and after `maxDequeueCount` the host poisons the message itself, with no
    outcome recorded (a broadcast would never be done). It raises only when that copy
    cannot be queued either; then the host's redelivery is all that is left.
    """
    try:
        request = parse_request(body)
    except InvalidRequest as error:
        reason: str | None = f"invalid request: {error}"
    else:
        reason = None
        if request_bytes(request.message) > MAX_REQUEST_BYTES:
            # Its requeued copies would not fit in a queue message.
            reason = f"invalid request: larger than {MAX_REQUEST_BYTES} bytes as JSON"
    if reason is not None:
        try:
            return await _poison_invalid(engine, body, reason)
        except StoreError as failure:
            return await _hold_raw(engine, body, failure)
    engine = _going_on_as(engine, request.message)
    try:
        request = as_handled(request)
        if request.engine.outcome is not None:
            return await record_unrecorded(request, engine)
        if request.broadcast is not None:
            from shared.fanout import fan_out

            return await fan_out(request, engine)
        return await _deliver_tracked(request, engine)
    except StoreError as failure:
        return await hold_for_storage(request, engine, failure)


async def _hold_raw(engine: Engine, body: bytes | str, failure: StoreError) -> Outcome:
    """An invalid message whose failure could not be reported yet: kept, reported later."""
    delay = engine.jitter(30.0)
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        await engine.queue.put(text, delay=delay)
    except Exception:
        raise failure from None
    log_repeated(
        logger,
        logging.WARNING,
        f"held reporting: {storage_cause(failure)}",
        "proactive %r: storage failed (%s) reporting an invalid message; retried in %.0f s",
        _request_id(body),
        failure,
        delay,
    )
    return Outcome.REQUEUED


async def _poison_invalid(engine: Engine, body: bytes | str, reason: str) -> Outcome:
    # Reported first: a storage failure here keeps the message (see handle_queue_message)
    # instead of leaving a poison copy with no outcome in the report.
    request_id = _request_id(body)
    if request_id:
        now = engine.clock()
        if await single_head(engine.ledger, request_id, now):
            await record_outcome(
                engine.ledger,
                request_id,
                SINGLE_TARGET,
                "failed",
                now,
                reason=reason,
                label=invalid_target_label(body),
                yield_to_live_claim=True,
            )
        elif (key := _child_key(body)) is not None:  # a broadcast's child: its target
            await record_outcome(engine.ledger, request_id, key, "failed", now, reason=reason)
        # Otherwise a request of its own reusing a broadcast's id: not one of its targets,
        # so nothing goes in its report; the poison copy says why.
    await engine.queue.poison(body, reason)
    logger.warning("proactive %r poisoned: %s", request_id, reason)
    return Outcome.POISONED


# What a send ends with when the target's slot holds its outcome (not a claim to release).
SETTLED = frozenset({Outcome.DELIVERED, Outcome.PRUNED, Outcome.FAILED, Outcome.DUPLICATE})
MAX_CROWDED_DELAY = 15.0  # seconds: a crowded line's copy comes back after its wait, at most this
MIN_REQUEUE_SECONDS = 1.0  # a throttled or failed send's copy comes back after this at least


@dataclass(slots=True)
class _Progress:
    posted: bool = False  # the Connector may have the message: a failure keeps the claim


async def _deliver_tracked(request: ProactiveRequest, engine: Engine) -> Outcome:
    scope = child_scope(request, engine.runtime)
    if scope is None or (engine.redelivered and await named_by_this_message(engine, request)):
        # A claim this message's earlier attempt kept (its send may have left) is decided
        # before anything else: a copy put back would be another message, which would
        # take the claim over and send again, as often as that repeats. So is a failure it
        # recorded (the copy would not put the poison copy its process died before).
        return await _deliver_let_out(request, engine)
    connector = engine.runtime.connector
    pacer = connector.pacer
    # Its tenant's line here is long while another stands nearly empty; or, waited for in
    # the line's room (ROOM_SECONDS), the line stayed too long for a send to get its slot
    # in time: back on the queue as it came, before its slot is claimed, so this
    # invocation takes another message. Not an attempt, and its age is not started.
    wait = pacer.crowded_wait(scope)
    if not wait:
        async with pacer.admission(scope, room_within(connector.slot_wait), ROOM_SECONDS) as wait:
            if not wait:
                return await _deliver_let_out(request, engine)
    logger.debug("proactive %r: %s would wait %.1f s; put back", request.id, request.logged, wait)
    delay = engine.jitter(min(wait, MAX_CROWDED_DELAY))
    return await engine.requeue(request, delay, count=False, age=False)


async def _deliver_let_out(request: ProactiveRequest, engine: Engine) -> Outcome:
    ledger, now, target = engine.ledger, engine.clock(), request.target_name
    first = not request.engine.child and request.engine.since is None
    if first and not await single_head(ledger, request.id, now):
        await record_duplicate(ledger, request.id, request.label, now)
        logger.warning(
            "proactive %r: the id is a broadcast's; %s not sent", request.id, request.logged
        )
        return Outcome.DUPLICATE
    claimed_at = engine.clock()
    name = outcome_name(request.id, target)
    claim = await take_claim(
        ledger, name, claimed_at, seconds=engine.claim_seconds, message=engine.message_id
    )
    if isinstance(claim, Busy):
        if claim.message is not None and claim.message == engine.message_id:
            # This queue message's own earlier attempt claimed the target and failed, or its
            # process died, once its send had begun (the claim is kept then; live, or
            # expired when the redelivery came late). The POST may have left, or it may
            # still have been waiting for its slot (a host killed mid-broadcast leaves
            # dozens so): the claim cannot say. A copy waits the claim out, then sends; one
            # such copy only: should it fail the same way, it is reported rather than put
            # back again to send again, for ever when the failure repeats.
            if request.engine.resumed:
                reason = "the function failed after the send; the message may have been posted"
                try:
                    return await fail_target(request, engine, reason)
                except OutcomeKept:
                    return Outcome.REQUEUED  # the claim stays until the kept copy records
            logger.warning(
                "proactive %r: %s: an earlier attempt failed after its send began; "
                "tried once more when its claim ends",
                request.id,
                request.logged,
            )
            delay = engine.jitter(min(claim.wait, 60.0))
            return await engine.requeue(request, delay, count=False, resumed=True)
        # Another instance is on it (or crashed on it): look again when its claim ends.
        logger.info("proactive %r: %s is being worked on elsewhere", request.id, request.logged)
        return await engine.requeue(request, engine.jitter(min(claim.wait, 15.0)), count=False)
    if isinstance(claim, Settled):
        retried = await _retry_failed(request, engine, name, claim)
        if retried is None and failed_here(request, engine, claim.record.data):
            # This queue message recorded the failure, and its process died before the
            # poison copy was put (or before it returned): put now, so an operator has it.
            reason = claim.record.data.get("reason") or "failed"
            await put_poison_copy(request, engine, reason)
            logger.warning("proactive %r: failed for %s: %s", request.id, request.logged, reason)
            return Outcome.FAILED
        if retried is None:
            await record_duplicate(ledger, request.id, request.label, now)
            logger.info("proactive %r: %s already done; not sent again", request.id, request.logged)
            return Outcome.DUPLICATE
        claim = retried
    progress = _Progress()
    try:
        outcome = await _send_claimed(request, engine, claim, claimed_at, progress)
    except OutcomeKept:
        return Outcome.REQUEUED  # the claim stays until the kept copy records the outcome
    except BaseException as error:
        if not progress.posted:
            await release_claim(ledger, claim)
            raise
        # The claim stays: released, the host's redelivery would send again at once. What
        # the host's last attempt then records over it, should it fail too:
        if isinstance(error, Exception) and not isinstance(error, Unsettled):
            reason = "the function failed after the send; the message may have been posted"
            raise Unsettled("failed", reason, claim.etag) from error
        raise
    if outcome not in SETTLED:
        await release_claim(ledger, claim)
    return outcome


async def _send_claimed(
    request: ProactiveRequest,
    engine: Engine,
    claim: Claim,
    claimed_at: float,
    progress: _Progress,
) -> Outcome:
    try:
        if claim_spent(engine, claimed_at):
            return await put_back_spent(request, engine, claim)
        try:
            target = await resolve(request, engine.runtime)
        except UnreadableDocument as unreadable:
            # Written by another version (or not JSON): never rewritten, so it will not
            # heal by waiting, as an outage would. The poison copy can be put back once a
            # version that reads it runs.
            reason = f"the stored conversation cannot be read by this version: {unreadable}"
            return await fail_target(request, engine, reason[:300], claim.etag)
        if target is None:
            outcome = Outcome.UNKNOWN
        elif claim_spent(engine, claimed_at):  # a slow lookup (a user's 1:1)
            return await put_back_spent(request, engine, claim)
        else:
            progress.posted = True
            try:
                outcome = await post(request, engine.runtime, target)
            except StoreError:
                progress.posted = False  # the prune of a conversation that is gone
                raise
    except ConnectorError as error:
        # A lookup's failure (creating a user's 1:1) posted nothing, whatever its kind.
        sent = progress.posted
        if sent or not opening_refused(request, error):
            progress.posted = sent and error.kind is ErrorKind.UNCERTAIN
            return await _connector_failure(request, engine, error, claim.etag, sent=sent)
        outcome = Outcome.PRUNED
    if outcome is Outcome.DELIVERED or outcome is Outcome.PRUNED:
        # Settled first, before anything else: this is the crash window's far edge.
        final: Final = "delivered" if outcome is Outcome.DELIVERED else "pruned"
        await record_or_hold(request, engine, final, claim_etag=claim.etag)
        if outcome is Outcome.DELIVERED:
            logger.info("proactive %r: delivered to %s", request.id, request.logged)
    elif outcome is Outcome.UNKNOWN:
        return await _unknown(request, engine, claim.etag)
    return outcome


async def _retry_failed(
    request: ProactiveRequest, engine: Engine, name: str, settled: Settled
) -> Claim | None:
    """A failed target whose poison copy an operator put back: claimed to try again. A
    delivered or pruned target is never sent again (None)."""
    failed = settled.record.data.get("outcome") == "failed"
    if not failed or "poisonReason" not in request.message:
        return None
    if request.engine.resumed and request.engine.resumed_retry:
        # Resumed for an operator's retry, whose claim had replaced the failure it
        # retried: any failure now is that retry's own, recorded since. (A resumed copy an
        # operator put back with a `poisonReason` of their own is retried.)
        return None
    if engine.message_id is not None and settled.record.data.get("message") == engine.message_id:
        return None  # this very queue message failed it: the host's redelivery, not a retry
    token = retry_token(request.message, engine.message_id)
    if token is not None and settled.record.data.get("retryOf") == token:
        # Another copy of this same retry failed it (a copy kept for storage, or put back
        # throttled or resumed, alive beside the message it was made from): its own failure.
        return None
    etag = await replace_with_claim(
        engine.ledger,
        name,
        settled.record.etag,
        engine.clock(),
        seconds=engine.claim_seconds,
        message=engine.message_id,
    )
    if etag is None:
        return None  # changed since it was read: another instance is on it
    logger.info("proactive %r: %s retried by an operator", request.id, request.logged)
    return Claim(name, etag)


async def _unknown(
    request: ProactiveRequest, engine: Engine, claim_etag: str | None = None
) -> Outcome:
    """No stored reference: it may be landing (a request sent on an install's event can
    come before its write)."""
    if request.engine.child:
        # Listed by the fan-out moments ago, removed since (uninstalled, pruned): nothing
        # is landing, and a poison copy per removed conversation would only be noise.
        reason = REMOVED_REASON
        await record_target(request, engine, "failed", reason, claim_etag=claim_etag)
        logger.info("proactive %r: %s: %s", request.id, request.logged, reason)
        return Outcome.FAILED
    if engine.age(request) < engine.unknown_window:
        delay = engine.jitter(min(20.0, 5.0 * 2 ** min(request.engine.attempt, 8)))
        logger.info(
            "proactive %r: no stored reference for %s yet; retry in %.0f s",
            request.id,
            request.logged,
            delay,
        )
        return await engine.requeue(request, delay)
    reason = f"no stored reference for conversation {clip(request.label, 200)}"
    return await fail_target(request, engine, reason, claim_etag)


async def _connector_failure(
    request: ProactiveRequest,
    engine: Engine,
    error: ConnectorError,
    claim_etag: str,
    *,
    sent: bool = True,
) -> Outcome:
    """`sent`: the failure came from the send itself, not from finding its conversation."""
    kind, what = error.kind, _describe(error)
    if kind is ErrorKind.UNCERTAIN and not sent:
        # Creating a user's 1:1 answered 500 (or went unanswered): nothing was posted, and
        # asking again gives the same 1:1, so it is retried as a transient failure is.
        kind = ErrorKind.TRANSIENT
    # No token (Entra ID refused the credential, or could not be reached at the configured
    # authority) is the bot's configuration, not the message's: kept until it is fixed.
    no_token = kind is ErrorKind.TRANSIENT and error.setting is not None
    if kind is ErrorKind.CREDENTIALS or no_token:
        delay = engine.jitter(settings_backoff(request.engine.attempt))
        outcome = await engine.requeue(request, delay, held=True)
        cause = error.code or error.status or "no token"
        setting = error.setting or "MicrosoftAppId"
        log_repeated(
            logger,
            logging.WARNING,
            f"credentials {setting} {cause}",
            "proactive %r: no usable credentials (%s); check the setting %s. "
            "The message is kept and retried in %.0f s",
            request.id,
            cause,
            setting,
            delay,
        )
        return outcome
    if kind in (ErrorKind.THROTTLED, ErrorKind.TRANSIENT):
        age = engine.age(request)
        if age < engine.max_age:
            wait = error.retry_after
            if wait is None:
                wait = min(300.0, 2.0 * 2 ** min(request.engine.attempt, 8))
            elif age + wait >= engine.max_age:
                # Waiting as told would outlive the bound (the copy would come back at it,
                # or after it, and fail then): reported now, not in an hour. A Retry-After
                # over MAX_RETRY_AFTER reads as that much, so it fails at once by default.
                reason = f"{what}: Retry-After {wait:.0f} s is beyond the age bound"
                return await fail_target(request, engine, reason, claim_etag)
            # A Retry-After of 0 still waits a moment: requeued at once, the copy would be
            # answered 429 again in a loop for the whole age bound.
            delay = engine.jitter(max(wait, MIN_REQUEUE_SECONDS))
            logger.info(
                "proactive %r: %s to %s; requeued in %.0f s (attempt %d)",
                request.id,
                what,
                request.logged,
                delay,
                request.engine.attempt + 1,
            )
            # Held back here (no send slot in time), nothing was sent: a broadcast child
            # keeps the reference it carries, and with it the put-back when its tenant's
            # line is crowded (which needs the tenant the reference names).
            local = error.code == "PacingTimeout"
            return await engine.requeue(request, delay, keep_reference=local)
        reason = f"gave up after {age:.0f} s: {what}"
        return await fail_target(request, engine, reason, claim_etag)
    if kind is ErrorKind.UNCERTAIN:
        reason = f"{what}: the message may have been posted, so it is not resent"
    elif kind is ErrorKind.UNTRUSTED:
        reason = "the serviceUrl is not trusted; nothing was sent"
    elif kind is ErrorKind.GONE:
        reason = f"the channel refused the conversation: {what}"
    else:
        reason = f"not deliverable: {what}"
    return await fail_target(request, engine, reason, claim_etag)


async def process_queue_message(
    body: bytes | str,
    get_runtime: Callable[[], Parts],
    *,
    final_attempt: bool = False,
    message_id: str | None = None,
    redelivered: bool = False,
) -> Outcome:
    """The queue trigger's one call: handle the message with the process's runtime (from
    the app's `get_runtime`, app.runtime) or, when the app settings are unusable, keep it
    on the queue until they are fixed."""
    from shared.config import SettingsError

    try:
        runtime = get_runtime()
    except SettingsError as error:
        return await hold_for_settings(
            body, error, redelivered=message_id if redelivered else None, message_id=message_id
        )
    return await handle_queue_message(
        body,
        runtime,
        final_attempt=final_attempt,
        message_id=message_id,
        redelivered=redelivered,
    )


def _describe(error: ConnectorError) -> str:
    parts = [str(error.kind)]
    if error.status is not None:
        parts.append(f"status {error.status}")
    if error.code:
        parts.append(f"code {error.code[:60]}")
    return " ".join(parts)


def _child_key(body: bytes | str) -> str | None:
    """The conversation key of a broadcast child (None for anything else)."""
    message = json_fields(body)
    if message is None or not isinstance(message.get(RESERVED), dict):
        return None
    target = message.get("to")
    key = target.get("conversation") if isinstance(target, dict) else None
    return key if message[RESERVED].get("child") is True and isinstance(key, str) else None


def _request_id(body: bytes | str) -> str | None:
    """The request's `id` for the log, when there is a usable one (never any other content)."""
    message = json_fields(body)
    request_id = message.get("id") if message is not None else None
    return request_id if usable_id(request_id) else None


async def send_to_poison_queue(settings: Settings, body: bytes | str, reason: str) -> None:
    """Put a copy on `<BOT_PROACTIVE_QUEUE>-poison`, base64-encoded like the host's own."""
    await StorageQueue(settings).poison(body, reason)
