"""What a proactive target ends with, once it has been tried: its outcome recorded in its
slot, kept in a copy when storage refuses it, a failure's poison copy, and what the
host's last attempt records when the function failed on every attempt.

The rules (docs/proactive.md): an outcome is recorded before anything else follows it;
once the Connector may have the message, a refusal to record never sends it again (the
outcome travels in a kept copy, or the claim stays); a failure is recorded before its
poison copy is put. shared/proactive.py decides what each attempt's result means and
calls these.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from shared.config import CLAIM_RESERVE_SECONDS
from shared.delivery import Outcome
from shared.engine import Engine, settings_backoff
from shared.idempotency import Claim, is_outcome
from shared.logs import log_repeated, storage_cause
from shared.proactive_schema import (
    RESERVED,
    InvalidRequest,
    ProactiveRequest,
    as_handled,
    claimed_identity,
    kept_identity,
    parse_request,
    retry_token,
)
from shared.queues import compact_json
from shared.references import StoreError
from shared.reports import (
    FINAL_OUTCOMES,
    Final,
    outcome_name,
    record_duplicate,
    record_outcome,
    report_reason,
    single_head,
)

# The engine's logger: one name for every line an operator follows a request by.
logger = logging.getLogger("shared.proactive")


class OutcomeKept(Exception):
    """Storage refused the target's outcome after the send; a copy that carries it was
    queued. The claim is kept: it holds other copies off the target until it is recorded."""


class Unsettled(RuntimeError):
    """After a send, the target's outcome could not be stored (nor a copy carrying it
    queued), or the invocation failed. Raised to the host (not a StoreError: a copy
    requeued without the outcome would send again); the claim stays, as after a crash in
    that window, and the host's last attempt records this outcome over it."""

    def __init__(self, outcome: Final, reason: str | None, claim_etag: str | None) -> None:
        super().__init__(f"the send's outcome ({outcome}) is not recorded")
        self.outcome, self.reason, self.claim_etag = outcome, reason, claim_etag


SETTLE_PAUSES = (0.5, 2.0)  # seconds between tries to record an outcome, or keep a copy of it
POISON_PAUSES = (0.5, 2.0)  # seconds between tries to put a failure's poison copy


async def record_target(
    request: ProactiveRequest,
    engine: Engine,
    outcome: Final,
    reason: str | None,
    *,
    claim_etag: str | None = None,
    given_up: bool = False,
    **options: Any,
) -> bool:
    """Record the request's target's final outcome; False when it already had one.
    `options`: record_outcome's own (yielding to a live claim). The outcome names the
    queue message that recorded it (an operator's retry is never retried by its own
    redelivery), and the operator's retry it is a copy of (nor by another copy of it);
    `given_up`: the host gave up on that message, and its poison copy is the host's."""
    detail: dict[str, Any] = {}
    if engine.message_id is not None:
        detail["message"] = engine.message_id
    if (token := retry_token(request.message, engine.message_id)) is not None:
        detail["retryOf"] = token
    if given_up:
        detail["givenUp"] = True
        if engine.delivered_as is not None:
            detail["givenUpOn"] = engine.delivered_as  # the host's own id of that message
    if detail:
        options.setdefault("detail", detail)
    return await record_outcome(
        engine.ledger,
        request.id,
        request.target_name,
        outcome,
        engine.clock(),
        reason=reason,
        label=request.label,
        claim_etag=claim_etag,
        **options,
    )


async def record_or_hold(
    request: ProactiveRequest,
    engine: Engine,
    outcome: Final,
    *,
    reason: str | None = None,
    claim_etag: str | None = None,
) -> bool:
    """Record the target's final outcome (after a send); False when the slot had one, or
    (a failure) another attempt's live claim. When storage refuses, a copy that carries
    the outcome is queued instead (so it is recorded, never resent), and OutcomeKept tells
    the send to keep its claim meanwhile. When the queue refuses that copy too, both are
    tried again after a pause (SETTLE_PAUSES), then Unsettled."""
    for pause in (*SETTLE_PAUSES, None):
        try:
            return await record_target(request, engine, outcome, reason, claim_etag=claim_etag)
        except StoreError as failure:
            try:
                await hold_for_storage(request, engine, failure, unrecorded=(outcome, reason))
            except Exception:
                if pause is None:
                    raise Unsettled(outcome, reason, claim_etag) from None
                await asyncio.sleep(engine.jitter(pause))
                continue
            raise OutcomeKept from None


async def hold_for_storage(
    request: ProactiveRequest,
    engine: Engine,
    failure: StoreError,
    *,
    unrecorded: tuple[Final, str | None] | None = None,
) -> Outcome:
    if unrecorded is not None and request.engine.outcome is None:
        # The first copy kept for an outcome comes back within seconds, while the send's
        # claim still holds other copies off the target, not after the send's own backoff.
        request = replace(request, engine=replace(request.engine, attempt=0))
    # The copy is another queue message: which one it goes on as (`claimedBy`).
    identity = kept_identity(
        request.message,
        engine.message_id,
        redelivered=engine.redelivered,
        records=unrecorded is not None,
    )
    retrying = unrecorded is None and "poisonReason" in request.message  # else dropped
    bookkeeping = replace(
        request.engine,
        claimed_by=identity,
        claimed_retry=identity is not None and retrying,
    )
    request = replace(request, engine=bookkeeping)
    delay = engine.jitter(settings_backoff(request.engine.attempt))
    try:
        outcome = await engine.requeue(request, delay, mark=False, held=True, unrecorded=unrecorded)
    except Exception:
        raise failure from None
    log_repeated(
        logger,
        logging.WARNING,
        f"held for storage: {storage_cause(failure)}",
        "proactive %r: storage failed (%s); the message is kept and retried in %.0f s",
        request.id,
        failure,
        delay,
    )
    return outcome


async def record_unrecorded(request: ProactiveRequest, engine: Engine) -> Outcome:
    """A copy kept because storage refused to record its outcome: recorded now, not sent."""
    outcome, reason = request.engine.outcome, request.engine.reason
    assert outcome in FINAL_OUTCOMES
    try:
        # As the message that sent (its own claim is replaced), never over another's live
        # claim (an operator's retry sending now records its own outcome). A copy kept by
        # an earlier version names no sender: over any claim, as then.
        created = await record_target(
            request,
            engine,
            outcome,
            reason,
            yield_to_live_claim=request.engine.claimed_by is not None,
            own_message=engine.message_id,
        )
    except StoreError as failure:
        return await hold_for_storage(request, engine, failure, unrecorded=(outcome, reason))
    if not created and not await _recorded_as(request, engine, outcome, reason):
        await record_duplicate(engine.ledger, request.id, request.label, engine.clock())
        return Outcome.DUPLICATE  # this copy arrived twice
    # Recorded now, or its failure's record had landed although storage answered an
    # error (a timeout after the write): either way the poison copy has not been put yet.
    if outcome == "failed":
        await put_poison_copy(request, engine, reason or "failed")
    logger.info("proactive %r: %s: %s recorded (sent earlier)", request.id, request.logged, outcome)
    return Outcome(outcome)


async def _recorded_as(
    request: ProactiveRequest,
    engine: Engine,
    outcome: Final,
    reason: str | None,
    *,
    sender: bool = False,
) -> bool:
    """Whether the target's slot holds this copy's failure (a record that landed while
    storage answered with an error: its poison copy is still to be put).

    Recorded by the queue message this copy goes on as (unless the copy names no sender,
    as those an earlier version kept do, or the slot no writer), with its reason, and not
    as the host gave up on a message (`givenUp`: its poison copy is the host's own).
    Another message's failure is not this one's whatever its reason says (reasons are
    cut, and two may read the same)."""
    if outcome != "failed":
        return False  # a delivery or a prune found recorded is counted a duplicate
    data = await _slot(engine, request)
    if data.get("outcome") != outcome or data.get("givenUp") is True:
        return False
    writer = data.get("message")
    named = writer is not None and claimed_identity(request.message) is not None
    # The sender itself (`sender`: fail_target) wrote as this message, named or not.
    named = named or (sender and writer is not None and engine.message_id is not None)
    if named and writer != engine.message_id:
        return False
    # Both cut as reports cut them: a slot or a kept copy of an earlier version (which
    # kept 300 characters of it, whatever their bytes) still reads as the same failure.
    return report_reason(data.get("reason") or "") == report_reason(reason or "")


async def fail_target(
    request: ProactiveRequest, engine: Engine, reason: str, claim_etag: str | None = None
) -> Outcome:
    """Final failure: reported with the reason, and a poison copy for an operator.

    Recorded first: once the outcome is in the slot no copy of the request sends again,
    whatever happens to the poison copy. When storage refuses the record, the copy kept
    to record it puts the poison copy when it does (record_unrecorded). Not recorded (the
    target settled meanwhile, or taken over by another copy, which is sending it and
    records its outcome), it is not this copy's failure: no poison copy (DUPLICATE)."""
    recorded = await record_or_hold(request, engine, "failed", reason=reason, claim_etag=claim_etag)
    if not recorded:
        try:  # its own record may have landed with the answer lost (the client's retry 412)
            recorded = await _recorded_as(request, engine, "failed", reason, sender=True)
        except StoreError:
            recorded = True  # not known: the operator's copy, as ever
    if not recorded:
        logger.warning(
            "proactive %r: %s: %s; not failed here: another copy settled it or holds it",
            request.id,
            request.logged,
            reason,
        )
        return Outcome.DUPLICATE
    await put_poison_copy(request, engine, reason)
    logger.warning("proactive %r: failed for %s: %s", request.id, request.logged, reason)
    return Outcome.FAILED


async def put_poison_copy(request: ProactiveRequest, engine: Engine, reason: str) -> None:
    """The copy an operator may put back as it is: a fresh start (a child stays a child).
    Its failure is recorded already, so a queue that refuses it is tried again after a
    pause (POISON_PAUSES), then left: the report keeps the reason."""
    copy = {k: v for k, v in request.message.items() if k != RESERVED}
    if request.engine.child:
        copy[RESERVED] = {"child": True}
    for pause in (*POISON_PAUSES, None):
        try:
            await engine.queue.poison(compact_json(copy), reason)
            return
        except Exception as error:
            if pause is None:
                logger.warning(
                    "proactive %r: the poison copy could not be queued (%s); the report "
                    "has the failure and its reason",
                    request.id,
                    type(error).__name__,
                )
                return
            await asyncio.sleep(engine.jitter(pause))


async def record_given_up(body: bytes | str, engine: Engine, failure: Exception) -> None:
    """The host's last attempt failed: the target's outcome as far as it is known, so its
    report still reaches `done`. What a copy kept for its record carries, or what a send
    left unrecorded, is that outcome; otherwise it failed, unless another queue message
    holds a live claim on the target (it is sending, and records its own outcome)."""
    try:
        # An operator's retry of a kept failure is given up as the retry it was handled
        # as, not with the outcome it once carried (its own send may have been posted).
        request = as_handled(parse_request(body))
    except InvalidRequest:
        return
    outcome: Final = "failed"
    reason: str | None = (
        "the function failed on every attempt; the host moved it to the poison queue"
    )
    claim_etag = None
    known = True  # the outcome is this message's own: recorded over its claim
    if isinstance(failure, Unsettled):
        outcome, reason, claim_etag = failure.outcome, failure.reason, failure.claim_etag
    elif request.engine.outcome is not None:
        outcome, reason = request.engine.outcome, request.engine.reason
    else:
        known = False
        if await _claimed_by(engine, request):
            # An earlier attempt of this message claimed the target and never released
            # the claim: it reached the send (or died on the way).
            reason = (
                "the function failed on every attempt, after a send that may have been "
                "posted; the host moved it to the poison queue"
            )
    try:
        if request.broadcast is None:
            if not request.engine.child and not await single_head(
                engine.ledger, request.id, engine.clock()
            ):
                # A request of its own reusing a broadcast's id: not one of its targets, so
                # nothing goes in its report (as when one is poisoned as invalid).
                logger.warning(
                    "proactive %r: the id is a broadcast's; given up, not reported", request.id
                )
                return
            recorded = await record_target(
                request,
                engine,
                outcome,
                reason,
                claim_etag=claim_etag,
                given_up=True,
                yield_to_live_claim=not known or request.engine.claimed_by is not None,
                own_message=engine.message_id,
            )
            kept_failure = known and outcome == "failed" and request.engine.outcome
            if kept_failure and (recorded or await _recorded_as(request, engine, outcome, reason)):
                # The host poisons this copy as it is, carrying its outcome: the copy an
                # operator can put back to retry is the request's own.
                await put_poison_copy(request, engine, reason or "failed")
        else:
            from shared.fanout import end_fan_out

            await end_fan_out(request, engine, reason)
    except Exception as error:  # best effort: the store may be what is failing
        logger.warning(
            "proactive %r: could not record the failure (%s)", request.id, type(error).__name__
        )
        return
    logger.warning("proactive %r: %s: %s", request.id, request.logged, reason or outcome)


async def _claimed_by(engine: Engine, request: ProactiveRequest) -> bool:
    """Whether the target's slot holds a claim an attempt of this very queue message took
    (False when that cannot be read: the store may be what is failing)."""
    if engine.message_id is None or request.broadcast is not None:
        return False
    try:
        data = await _slot(engine, request)
    except StoreError:
        return False
    return not is_outcome(data) and data.get("message") == engine.message_id


async def named_by_this_message(engine: Engine, request: ProactiveRequest) -> bool:
    """Whether the target's slot names this very queue message: a claim an earlier attempt
    of it kept, or an outcome it recorded; StoreError when the slot cannot be read."""
    if engine.message_id is None:
        return False
    return (await _slot(engine, request)).get("message") == engine.message_id


async def _slot(engine: Engine, request: ProactiveRequest) -> dict[str, Any]:
    """What the target's slot holds (a claim or an outcome), {} when nothing usable."""
    record = await engine.ledger.read(outcome_name(request.id, request.target_name))
    return record.data if record is not None and isinstance(record.data, dict) else {}


def claim_spent(engine: Engine, claimed_at: float) -> bool:
    """Too little of the claim is left (slow storage) for the send, with the Connector's
    own retries, and the write that settles it: settled after the claim ends, another copy
    of the request could have taken the target over and sent too. Checked before the
    target's reference is resolved and again before the send itself."""
    return engine.clock() - claimed_at > engine.claim_seconds - CLAIM_RESERVE_SECONDS


async def put_back_spent(request: ProactiveRequest, engine: Engine, claim: Claim) -> Outcome:
    """Its claim spent before the send: claimed again later, less often the longer storage
    stays slow (every copy costs it three calls), and past the age bound failed, with a
    poison copy for an operator (unless the claim ended and another copy took the target
    over meanwhile: that one settles it)."""
    age = engine.age(request)
    if age >= engine.max_age:
        reason = f"gave up after {age:.0f} s: storage too slow to start the send in its claim"
        if request.engine.resumed:  # an earlier attempt's send had begun
            reason += "; an earlier attempt's message may have been posted"
        return await fail_target(request, engine, reason, claim.etag)
    delay = engine.jitter(min(30.0, max(1.0, age / 4)))
    logger.info(
        "proactive %r: claim on %s spent before the send; retried in %.0f s",
        request.id,
        request.logged,
        delay,
    )
    return await engine.requeue(request, delay, count=False)


# A broadcast child's failure with no poison copy: nothing is landing (shared/proactive.py,
# `_unknown`).
REMOVED_REASON = "the conversation was removed from the store after the broadcast matched it"


def failed_here(request: ProactiveRequest, engine: Engine, data: Mapping[str, Any]) -> bool:
    """Whether the slot's outcome `data` is a failure this very queue message recorded,
    one whose poison copy is the engine's to put (a broadcast child whose conversation was
    removed has none). One recorded as the host's last attempt of it (`givenUp`) is the host's to
    poison, but when the host delivers the message it gave up on again it did not (its
    maxDequeueCount is higher than the function read): the copy is the engine's then, as
    the message is deleted once this returns. (Not so for another message going on as
    it, such as a copy kept for storage queued before the host gave up: the host's poison
    copy is the one to put back.)"""
    if data.get("givenUp") is True:
        given_up_on = data.get("givenUpOn")
        if given_up_on is None:  # an earlier version's record: this message, unless a copy
            delivered_again = request.engine.claimed_by is None
        else:
            delivered_again = given_up_on == engine.delivered_as
        if not delivered_again:
            return False
    return (
        engine.message_id is not None
        and data.get("message") == engine.message_id
        and data.get("outcome") == "failed"
        and data.get("reason") != REMOVED_REASON
    )
