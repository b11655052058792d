"""Broadcast fan-out: one queue message per matching conversation, page by page, resumable.

A broadcast request is never delivered by one invocation. Each invocation that holds the
broadcast's fan-out claim:

1. reads the checkpoint (the report head: the store's continuation token, targets so far,
   its latest pages, the page it may not have finished queueing);
2. lists the next page of matching references (channel, tenant and team filters are the
   store's; `personal` is checked here);
3. writes the page's keys (``page/<n>-<token>.json``, create-only, a blob of this
   holder's own), then the checkpoint with ``If-Match``, counting the page's targets and
   naming that blob pending, before anything is queued: a page is never counted twice,
   and every target counted is queued;
4. enqueues one child per conversation: ``{"id": <broadcast id>, "to": {"conversation":
   <key>}, <content>, "_proactive": {"child": true, "reference": <the listed
   reference>}}``, whose outcome is recorded under the broadcast's id by key (the reference
   rides along so the send reads nothing from the store; one too large to fit is left out
   and read instead);
5. stops after `fanout_seconds`, or once about `fanout_backlog` of its own children are
   queued, clears the pending page, and puts the broadcast back on the queue, so the next
   page may be fanned out by any instance and no invocation runs long.

Flow control: each broadcast keeps about `fanout_backlog` of its children on the queue,
not every child at once. A request enqueued behind a broadcast to a hundred thousand
conversations (one tenant's 50 sends/s take half an hour for them) waits behind a backlog,
not behind the whole broadcast; a child leaves the queue minutes after its reference was
listed, not an hour; and the continuation, put back behind the backlog, comes round when
the queue has worked through it, to add the next pages. The queue's approximate count
(one call per invocation) answers while it is below the backlog. Above it, the count
cannot say whose messages fill the queue, so the broadcast counts its own: the checkpoint
keeps, for its latest pages, the slot of each page's last queued child and how many it
queued (sparse pages merged, so they add up to a backlog), and a page counts as queued
until that slot holds an outcome (one read per page, newest first). Messages a producer
delayed for days, or another broadcast's children, so never hold it back; its own
children do, requeued by a throttled tenant too, and after `FULL_QUEUE_PATIENCE` of that
it adds a page's worth all the same (a child the host lost would otherwise hold it
forever). A queue that cannot say how full it is counts as not full.

A crash between 3 and 5 leaves the page pending: the next holder queues its keys again
before anything else (children that read their reference from the store; delivery dedupes
per (id, conversation), so one already queued is reported a duplicate, not sent twice).
The count is the keys', not a new listing's, which may have lost a conversation one of the
page's own children pruned meanwhile. The children spread over every instance the host
scales out to; each one is retried on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from shared.idempotency import Busy, Settled, is_outcome, release_claim, take_claim
from shared.ledger import Record, iso
from shared.proactive_schema import (
    RESERVED,
    BroadcastFilter,
    InvalidRequest,
    ProactiveRequest,
    carries,
    check_conversation_key,
    request_bytes,
)
from shared.queues import MAX_REQUEST_BYTES, compact_json, earlier_json
from shared.references.contract import StoredReference, StoreError
from shared.reports import (
    FANOUT_LABEL,
    FANOUT_TARGET,
    claim_name,
    ensure_head,
    head_name,
    outcome_name,
    page_name,
    record_duplicate,
    record_outcome,
    report_reason,
    request_prefix,
)

if TYPE_CHECKING:
    from shared.engine import Engine
    from shared.proactive import Outcome

logger = logging.getLogger(__name__)

CONTENT_FIELDS = ("activity", "text")
# The head's digest of what a request is, whatever the order of its JSON's keys and however
# its whole numbers are written (`digest` is of the request's text, as earlier versions
# wrote it): a broadcast's copies, and the producer's id check, compare it.
SAME_REQUEST = "sameRequest"
UNREADABLE_CHECKPOINT = "the fan-out's checkpoint cannot be read by this version"
FULL_QUEUE_WAIT = 2.0  # seconds: a fan-out that found the queue full looks again after this
# Seconds since the fan-out last added a page (or first came round) after which its own
# queued children no longer hold it back: it adds a page's worth of children per this long.
FULL_QUEUE_PATIENCE = 60.0
# Pages the checkpoint remembers as possibly still queued (a slot and a count each); sparse
# pages are merged, so these always add up to a backlog (see _recent_pages).
MAX_RECENT_PAGES = 64


async def fan_out(request: ProactiveRequest, engine: Engine) -> Outcome:
    from shared.proactive import Outcome

    assert request.broadcast is not None
    ledger = engine.ledger
    await ensure_head(ledger, request.id, "broadcast", engine.clock())
    # How many of its own children the queue holds (None: it cannot tell, so not full).
    own = await engine.queue.depth()
    seen = None  # the checkpoint as read to count them, with the pages found through dropped
    if own is not None and own >= engine.fanout_backlog:
        # Full, but of what? Only the broadcast's own children hold it back: messages a
        # producer delayed for days, or another broadcast's children, are not its backlog.
        seen = await ledger.read(head_name(request.id))
        own = await _own_backlog(engine, request.id, seen.data if seen else {})
        if own >= engine.fanout_backlog:
            if engine.age(request) < FULL_QUEUE_PATIENCE:
                # Put back with a delay: the queue may hold only delayed copies, and a copy
                # put back without one would come round at once.
                logger.info("proactive %r: fan-out waits, %d own queued", request.id, own)
                return await engine.requeue(request, engine.jitter(FULL_QUEUE_WAIT), count=False)
            # Its own children have kept the queue full for a minute (a tenant throttling
            # them, a child the host lost): a page's worth all the same, then it waits.
            logger.info("proactive %r: fan-out adds a page, %d own queued", request.id, own)
            own = engine.fanout_backlog - engine.fanout_page_size
    claim = await take_claim(
        ledger, claim_name(request.id, FANOUT_TARGET), engine.clock(), seconds=engine.claim_seconds
    )
    if isinstance(claim, Settled):  # never: this slot holds no outcome
        raise StoreError("proactive ledger: the fan-out claim holds an outcome")
    if isinstance(claim, Busy):
        return await engine.requeue(request, engine.jitter(min(claim.wait, 10.0)), count=False)
    try:
        record = await ledger.read(head_name(request.id))
        if record is None:
            # Removed since it was made: a producer sending this id again took back the
            # head it created when the queue refused its put. Made again, or the broadcast
            # was taken for one already fanned out and never sent.
            await ensure_head(ledger, request.id, "broadcast", engine.clock())
            record = await ledger.read(head_name(request.id))
        digest, same = request_digest(request), same_request(request)
        if record is not None and another_request(record.data, request):
            return await _other_broadcast(request, engine)
        if record is not None and record.data.get("pending") is not None:
            record = await finish_pending_page(request, engine, record)
            if record is None:
                return Outcome.REQUEUED  # the checkpoint moved on elsewhere: claim lost
        if record is None or record.data.get("fannedOut"):
            await record_duplicate(ledger, request.id, "broadcast", engine.clock())
            logger.info("proactive %r: broadcast already fanned out", request.id)
            return Outcome.DUPLICATE
        if seen is not None and seen.etag == record.etag:
            record = seen  # unchanged since: keep the pages found through dropped
        head, etag = dict(record.data), record.etag
        started = engine.clock()
        while True:
            try:
                page = await engine.runtime.references.list(
                    channel_id=request.broadcast.channel_id,
                    tenant_id=request.broadcast.tenant_id,
                    team_id=request.broadcast.team_id,
                    continuation=head.get("continuation"),
                    page_size=engine.fanout_page_size,
                )
            except ValueError:
                if head.get(SAME_REQUEST) is None and head.get("digest") is None:
                    # The checkpoint's listing may have other filters (a head too old to
                    # say what request it is): another broadcast's.
                    return await _other_broadcast(request, engine)
                # Its own checkpoint (the head said so above), which this version cannot
                # read (edited by hand, or a token another version wrote): ended with its
                # reason, not left running for ever as another broadcast's duplicate.
                logger.warning(
                    "proactive %r: fan-out ending: %s", request.id, UNREADABLE_CHECKPOINT
                )
                await end_fan_out(request, engine, UNREADABLE_CHECKPOINT)
                return Outcome.FAILED
            targets = [item for item in page.items if _matches(item, request.broadcast)]
            children = _children(request, [(item.key, item.reference) for item in targets])
            queued = [
                item
                for item, child in zip(targets, children, strict=True)
                if isinstance(child, str)
            ]
            number, previous = int(head.get("page") or 0) + 1, head.get("pending")
            pending = None
            if targets:  # written ahead: what the checkpoint counts is queued, even after a crash
                pending = await _write_page(engine, request.id, number, [t.key for t in targets])
            head.update(
                digest=digest,
                continuation=page.continuation,
                **{SAME_REQUEST: same},
                targets=int(head.get("targets") or 0) + len(targets),
                fannedOut=page.continuation is None,
                updatedAt=iso(engine.clock()),
                pages=_recent_pages(request.id, head, queued, engine.fanout_backlog),
                page=number,
                pending=pending,
            )
            new_etag = await _replace_head(engine, request.id, head, etag)
            if new_etag is None:  # only the claim holder writes it: our claim was lost
                logger.warning("proactive %r: fan-out checkpoint moved on elsewhere", request.id)
                return Outcome.REQUEUED
            etag = new_etag
            if previous is not None:  # queued in full before this page was listed
                await _drop_page(engine, request.id, previous)
            await _enqueue_children(request, targets, children, engine)
            if own is not None:
                own += len(queued)
            done = head["fannedOut"]
            if (
                done
                or engine.clock() - started >= engine.fanout_seconds
                or (
                    own is not None and own >= engine.fanout_backlog  # the continuation adds more
                )
            ):
                if await _clear_pending(request, engine, head, etag) is None:
                    return Outcome.REQUEUED
                break
    finally:
        await release_claim(ledger, claim)
    if head["fannedOut"]:
        logger.info(
            "proactive %r: broadcast fanned out to %d conversations", request.id, head["targets"]
        )
        return Outcome.FANNED_OUT
    # Released first, so the continuation can take the claim at once, wherever it runs.
    logger.info("proactive %r: fan-out continues (%d so far)", request.id, head["targets"])
    # A broadcast copy's `since` is when it last added a page: its patience starts again.
    progressed = replace(request, engine=replace(request.engine, since=None))
    return await engine.requeue(progressed, 0.0, count=False)


def same_request(request: ProactiveRequest) -> str:
    """What the request is, as SAME_REQUEST keeps it in the head: its targets and content
    whatever the order of its JSON's keys and however its whole numbers are written (the
    same request rebuilt from stored data and sent again is the same)."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    shown = {name: plain(request.message.get(name)) for name in ("to", *CONTENT_FIELDS)}
    text = json.dumps(shown, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def another_request(head: Mapping[str, Any], request: ProactiveRequest) -> bool:
    """Whether the head is another request's: by SAME_REQUEST where the head keeps it, else
    by `digest` (a head an earlier version wrote; None: nothing to tell by)."""
    same = head.get(SAME_REQUEST)
    if isinstance(same, str):
        return same != same_request(request)
    return head.get("digest") not in (None, request_digest(request))


def request_digest(request: ProactiveRequest) -> str:
    """What the request is (its targets and content), for telling another request that
    reuses its id from its own copies (a broadcast's head, the producer's check)."""
    shown = {name: request.message.get(name) for name in ("to", *CONTENT_FIELDS)}
    # Written as earlier versions wrote it, not by compact_json (whose text for a lone
    # surrogate differs): a head an earlier version wrote must read as the same.
    return hashlib.sha256(earlier_json(shown)).hexdigest()


async def _other_broadcast(request: ProactiveRequest, engine: Engine) -> Outcome:
    """A broadcast reusing the id of one under way with other targets or content: counted
    as a duplicate, as a single request reusing an id is; the first goes on unchanged."""
    from shared.proactive import Outcome

    await record_duplicate(engine.ledger, request.id, "broadcast", engine.clock())
    logger.warning(
        "proactive %r: another broadcast with this id is under way; this one is a duplicate",
        request.id,
    )
    return Outcome.DUPLICATE


def _recent_pages(
    request_id: str, head: dict[str, Any], queued: Sequence[StoredReference], backlog: int
) -> list[Any]:
    """The checkpoint's pages still counted as queued, with the children just queued: for
    each, the slot of its last queued child (``out/<key>.json``: a long key is hashed, so
    the checkpoint stays small) and how many it queued (see _own_backlog).

    A page of few children (a `personal` filter's sparse listing) is merged into the one
    before while that one holds fewer than a 63rd of the backlog, so the pages kept always
    add up to a backlog. A child recorded failed at fan-out (too large) is not queued: its
    outcome would mark its page through at once.
    """
    pages = [page for page in head.get("pages") or () if _is_page(page)]
    if queued:
        slot = outcome_name(request_id, queued[-1].key)[len(request_prefix(request_id)) :]
        least = -(-backlog // (MAX_RECENT_PAGES - 1))
        if pages and pages[-1][1] < least:
            pages[-1] = [slot, pages[-1][1] + len(queued)]
        else:
            pages.append([slot, len(queued)])
    return pages[-MAX_RECENT_PAGES:]


async def _own_backlog(engine: Engine, request_id: str, head: dict[str, Any]) -> int:
    """About how many of this broadcast's children are still queued, newest page first.

    A page counts as queued until its last child has an outcome: the queue hands messages
    out roughly in order, so by then the page is through (a child put back by throttling
    has none, and holds its page). Drops the pages found through from `head["pages"]`.
    Counting stops once the backlog is reached; older pages are then not read.
    """
    pages = [page for page in head.get("pages") or () if _is_page(page)]
    queued, through = 0, []
    for page in reversed(pages):
        if queued >= engine.fanout_backlog:
            break
        slot = await engine.ledger.read(request_prefix(request_id) + page[0])
        if slot is not None and is_outcome(slot.data):
            through.append(page)
        else:
            queued += page[1]
    head["pages"] = [page for page in pages if page not in through]
    return queued


def _is_page(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and value[0].startswith("out/")
        and value[0].endswith(".json")
        and isinstance(value[1], int)
    )


def _matches(stored: StoredReference, broadcast: BroadcastFilter) -> bool:
    return broadcast.personal is None or stored.personal == broadcast.personal


@dataclass(frozen=True, slots=True)
class _Unqueued:
    """A conversation whose child no queue message can be: reported failed, with why."""

    reason: str


def _children(
    request: ProactiveRequest, targets: Sequence[tuple[str, Any]]
) -> list[str | _Unqueued]:
    """The child message (JSON) for each (key, reference or None), or why there is none.

    Each child is one parse_request takes: a stored key it would refuse (an earlier
    version stored ids with lone surrogates) is reported failed here, and a reference it
    would refuse (nested too deep, another key's) is left for the child to read."""
    content = {name: request.message[name] for name in CONTENT_FIELDS if name in request.message}
    children: list[str | _Unqueued] = []
    for key, reference in targets:
        try:
            check_conversation_key(key)
        except InvalidRequest:
            # Stored by an earlier version: an id with a lone surrogate, or "." / "..".
            children.append(_Unqueued("the conversation's stored id is not one a message can name"))
            continue
        child: dict[str, Any] = {"id": request.id, "to": {"conversation": key}, **content}
        child[RESERVED] = {"child": True}
        if reference is not None and carries(reference, key):
            carried = {**child, RESERVED: {"child": True, "reference": reference}}
            # Too large to carry the reference (and still leave room for what the engine
            # and the poison queue add): the child reads it from the store instead.
            if len(compact_json(carried).encode("utf-8")) <= MAX_REQUEST_BYTES:
                child = carried
        # The key replaces the filter: a long one may not fit.
        if request_bytes(child) <= MAX_REQUEST_BYTES:
            children.append(compact_json(child))
        else:
            children.append(
                _Unqueued(
                    f"the message for this conversation is larger than {MAX_REQUEST_BYTES} "
                    "bytes as JSON"
                )
            )
    return children


async def _enqueue_children(
    request: ProactiveRequest,
    keys: Sequence[StoredReference] | Sequence[str],
    children: Sequence[str | _Unqueued],
    engine: Engine,
) -> None:
    """Queue each child; a conversation with none is recorded failed instead (reported,
    not raised: a raise would stop the fan-out on every attempt)."""
    semaphore = asyncio.Semaphore(engine.fanout_parallel)

    async def one(key: str, child: str | _Unqueued) -> None:
        async with semaphore:
            if isinstance(child, str):
                await engine.queue.put(child)
                return
            await _report_failed(engine, request.id, key, child.reason)
            logger.warning("proactive %r: %r not sent: %s", request.id, key[:200], child.reason)

    names = [item if isinstance(item, str) else item.key for item in keys]
    await asyncio.gather(*(one(key, child) for key, child in zip(names, children, strict=True)))


async def end_fan_out(request: ProactiveRequest, engine: Engine, reason: str) -> None:
    """A fan-out the host gives up on: ended, with the fan-out itself as one failed
    target, so the report reaches `done` once the children enqueued so far are."""
    record = await engine.ledger.read(head_name(request.id))
    if record is not None and isinstance(record.data, dict):
        if another_request(record.data, request):
            return  # another broadcast reusing its id (see _other_broadcast): not this one's
        if record.data.get("pending"):
            record = await _end_pending_page(request, engine, record, reason)
    if record is None or not isinstance(record.data, dict) or record.data.get("fannedOut"):
        return
    reason = report_reason(f"{reason}; conversations not yet fanned out were not sent")
    # The fan-out counted as one more target, and its failure, in one write: the report
    # reads the failure from the head until its slot is there (a storage failure between
    # the two writes left a target no outcome would ever come for: `running` for ever).
    head = {
        **record.data,
        "fannedOut": True,
        "targets": int(record.data.get("targets") or 0) + 1,
        "ended": reason,
        "updatedAt": iso(engine.clock()),
    }
    if await _replace_head(engine, request.id, head, record.etag) is None:
        return  # a fan-out moved on meanwhile: it is not over
    await record_outcome(
        engine.ledger,
        request.id,
        FANOUT_TARGET,
        "failed",
        engine.clock(),
        reason=reason,
        label=FANOUT_LABEL,
    )


async def _end_pending_page(
    request: ProactiveRequest, engine: Engine, record: Record, reason: str
) -> Record | None:
    """The page the checkpoint counted but may not have queued in full: queued again, or,
    when that fails too (the queue may be what is failing), each of its targets with an
    empty slot reported failed, so the report still ends. None: the checkpoint moved on."""
    try:
        return await finish_pending_page(request, engine, record)
    except Exception as error:
        logger.warning(
            "proactive %r: the pending fan-out page could not be queued again (%s)",
            request.id,
            type(error).__name__,
        )
    reason = f"{reason}; this conversation's message may not have been queued"
    for key in await pending_keys(engine, request.id, record.data):
        await _report_failed(engine, request.id, key, reason, only_if_empty=True)
    head = {**record.data, "pending": None}
    etag = await _replace_head(engine, request.id, head, record.etag)
    return None if etag is None else Record(head, etag, record.modified)


async def finish_pending_page(
    request: ProactiveRequest, engine: Engine, record: Record
) -> Record | None:
    """Queue again the page the checkpoint names pending (its holder may have stopped part
    way), then clear it: the record as written, or None when the checkpoint moved on
    elsewhere. Its children read their references from the store."""
    head = dict(record.data)
    keys = await pending_keys(engine, request.id, head)
    if keys:
        logger.warning(
            "proactive %r: fan-out page %s may not have been queued in full; queued again",
            request.id,
            head["pending"],
        )
        children = _children(request, [(key, None) for key in keys])
        await _enqueue_children(request, keys, children, engine)
    etag = await _clear_pending(request, engine, head, record.etag)
    return None if etag is None else Record(head, etag, record.modified)


async def pending_keys(engine: Engine, request_id: str, head: dict[str, Any]) -> list[str]:
    """The keys of the page the checkpoint names pending ([] when it names none, or its
    page is missing or unreadable: written before the checkpoint names it, so only by hand)."""
    page = head.get("pending")
    if page is None:
        return []
    try:
        found = await engine.ledger.read(page_name(request_id, page))
    except ValueError:  # not a page id this code writes: the head was edited by hand
        found = None
    keys = found.data.get("keys") if found is not None and isinstance(found.data, dict) else None
    if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
        return keys
    logger.error("proactive %r: fan-out page %.40r is missing or unreadable", request_id, page)
    return []


async def _clear_pending(
    request: ProactiveRequest, engine: Engine, head: dict[str, Any], etag: str
) -> str | None:
    """The pending page is queued: say so in the checkpoint (None: it moved on elsewhere),
    and remove the page's keys (best effort: a page left over is never read again)."""
    page = head.get("pending")
    if page is None:
        return etag
    head["pending"] = None
    new_etag = await _replace_head(engine, request.id, head, etag)
    if new_etag is None:
        logger.warning("proactive %r: fan-out checkpoint moved on elsewhere", request.id)
        return None
    await _drop_page(engine, request.id, page)
    return new_etag


async def _replace_head(
    engine: Engine, request_id: str, head: dict[str, Any], etag: str
) -> str | None:
    """Write the checkpoint over the one read with `etag`: its new ETag, or None when it
    changed since (another holder moved it on). Each write carries a mark of its own, so a
    write that landed while its answer was lost (storage answered late or with a 5xx after
    taking it, and the client's retry then found the ETag changed) is known for ours by
    reading the checkpoint back: without that, the fan-out took it for another holder's and
    stopped, with nobody to go on."""
    head["write"] = uuid.uuid4().hex
    new_etag = await engine.ledger.replace(head_name(request_id), head, etag)
    if new_etag is not None:
        return new_etag
    current = await engine.ledger.read(head_name(request_id))
    if current is None or not isinstance(current.data, dict):
        return None
    if current.data.get("write") != head["write"]:
        return None
    logger.info("proactive %r: fan-out checkpoint written, its answer lost", request_id)
    return current.etag


async def _write_page(engine: Engine, request_id: str, number: int, keys: list[str]) -> str:
    """The page's keys in a blob of this writer's own (create-only); its id, for the
    checkpoint to name. Two holders of one page (a claim that expired under a stalled one)
    never write the same blob, so the one the checkpoint names is the one it counted."""
    page = f"{number}-{uuid.uuid4().hex[:12]}"
    if await engine.ledger.create(page_name(request_id, page), {"keys": keys}) is None:
        raise StoreError("proactive ledger: a fan-out page blob already exists")
    return page


async def _drop_page(engine: Engine, request_id: str, page: Any) -> None:
    """Best effort: a page left over is never read again (reports skip it)."""
    try:
        await engine.ledger.delete(page_name(request_id, page))
    except (StoreError, ValueError) as error:
        logger.info("proactive %r: fan-out page not removed (%s)", request_id, error)


async def _report_failed(
    engine: Engine, request_id: str, key: str, reason: str, *, only_if_empty: bool = False
) -> None:
    """A conversation the fan-out itself reports failed (shown by its key)."""
    await record_outcome(
        engine.ledger,
        request_id,
        key,
        "failed",
        engine.clock(),
        reason=reason,
        label=key,
        only_if_empty=only_if_empty,
    )
