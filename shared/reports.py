"""Delivery reports: what happened to each proactive request, readable by its producer.

Layout, under ``proactive/<request id>/`` in `BOT_REFERENCES_CONTAINER` (ids encoded as
the reference store encodes name segments; see docs/proactive.md):

``head.json``
    ``{"id", "kind": "single" | "broadcast", "createdAt", "updatedAt", "targets",
    "continuation", "fannedOut"}``: created (create-only) by the producer or by the first
    delivery attempt; for a broadcast also the fan-out's checkpoint, updated with ETags
    by the one instance holding the fan-out claim, with its latest pages (``"pages"``:
    ``["out/<last child>.json", children]`` each, for flow control), the number of pages
    listed (``"page"``), the one counted but maybe not queued in full (``"pending"``),
    what the broadcast is (``"digest"``) and each write's own mark (``"write"``, to know
    a write whose answer was lost for its own; the producer's create carries one too)
    (shared/fanout.py).
``page/<n>-<token>.json``
    ``{"keys": [...]}``: the conversations of a broadcast's nth fan-out page, written
    (create-only, a name of its writer's own) before the checkpoint counts them and names
    it, removed once they are queued.
``out/<target>.json``
    One per target, the target's slot (shared/idempotency.py): a claim while an instance
    works on it, then its final outcome (delivered, pruned, failed + reason), which is
    never replaced. Its metadata repeats the outcome, so a report is one listing, and
    concurrent children never write to one shared blob.
``dup/<uuid>.json``
    One per arrival that was not sent again because its target already had an outcome.
``claim/fan-out.json``
    Held while an instance fans a broadcast out (shared/fanout.py).
``started.json``
    Written when a single-target request is requeued (throttled, ...): it is running.

State: ``pending`` until an instance started on it, ``running`` while targets remain,
``done`` when every target has an outcome (for a broadcast: after the fan-out ended).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from shared.idempotency import claim_expiry, is_outcome
from shared.ledger import Ledger, NotJson, iso
from shared.references.contract import StoreError
from shared.references.keys import encode_segment

PREFIX = "proactive/"
SINGLE_TARGET = "target"  # the outcome name of a request with one target
FANOUT_TARGET = "fan-out"  # the claim name of a broadcast's fan-out
FANOUT_LABEL = "broadcast fan-out"  # the target a fan-out the host gave up on fails as
MAX_FAILURES_LISTED = 1000  # a report lists at most this many failed targets
MAX_REASON_CHARS = 300
# ... and bytes, as JSON in UTF-8: a copy kept to record a failure carries its reason, and
# must still fit in a queue message with a request of the largest size.
MAX_REASON_BYTES = 256
MAX_LABEL_CHARS = 1000  # of a target's label, as a report lists it
Kind = Literal["single", "broadcast"]
Final = Literal["delivered", "pruned", "failed"]
FINAL_OUTCOMES: tuple[Final, ...] = ("delivered", "pruned", "failed")


def report_reason(reason: str) -> str:
    """A reason as a report keeps it: cut to MAX_REASON_CHARS characters and, as JSON in
    UTF-8, MAX_REASON_BYTES bytes (cut again, it stays as it is)."""
    from shared.queues import cut_json

    return cut_json(reason[:MAX_REASON_CHARS], MAX_REASON_BYTES)


def request_prefix(request_id: str) -> str:
    return f"{PREFIX}{encode_segment(request_id, 400)}/"


def head_name(request_id: str) -> str:
    return f"{request_prefix(request_id)}head.json"


def outcome_name(request_id: str, target: str) -> str:
    return f"{request_prefix(request_id)}out/{encode_segment(target, 400)}.json"


def claim_name(request_id: str, target: str = FANOUT_TARGET) -> str:
    return f"{request_prefix(request_id)}claim/{encode_segment(target, 400)}.json"


_PAGE_ID = re.compile(r"\d{1,9}-[0-9a-f]{12}")


def page_name(request_id: str, page: Any) -> str:
    """The keys of a broadcast's fan-out page (`page`: ``"<n>-<writer's token>"``), written
    before it is queued; ValueError for anything else (the id is read from the head)."""
    if not isinstance(page, str) or not _PAGE_ID.fullmatch(page):
        raise ValueError("not a fan-out page id")
    return f"{request_prefix(request_id)}page/{page}.json"


def started_name(request_id: str) -> str:
    """Marks a single-target request that was tried and is waiting to be tried again."""
    return f"{request_prefix(request_id)}started.json"


def new_head(request_id: str, kind: Kind, now: float) -> dict[str, Any]:
    stamp = iso(now)
    return {
        "id": request_id,
        "kind": kind,
        "createdAt": stamp,
        "updatedAt": stamp,
        "targets": 1 if kind == "single" else 0,
        "continuation": None,
        "fannedOut": kind == "single",
    }


async def ensure_head(ledger: Ledger, request_id: str, kind: Kind, now: float) -> str | None:
    """Create the request's head unless it exists (create-only: the first writer wins);
    the ETag of the head this call created, None when it existed already."""
    return await ledger.create(head_name(request_id), new_head(request_id, kind, now))


async def create_own_head(
    ledger: Ledger,
    request_id: str,
    kind: Kind,
    now: float,
    *,
    fields: Mapping[str, Any] | None = None,
) -> str | None:
    """ensure_head for a writer that may take its head back (the producer, when the queue
    refuses the request): the ETag of the head this call created, None when another writer
    had created it. The head carries a mark of this call's own, so a create that landed
    while its answer was lost (the client's retry then found the head there) is known for
    this call's by reading it back: without that, it was kept, `pending` for ever.
    `fields`: more for the head to keep (what the request is: the producer's digests)."""
    head = {**new_head(request_id, kind, now), **(fields or {}), "write": uuid.uuid4().hex}
    etag = await ledger.create(head_name(request_id), head)
    if etag is not None:
        return etag
    try:
        current = await ledger.read(head_name(request_id))
    except StoreError:
        # Not JSON, or the read failing: taken for another writer's, as before the mark
        # (kept; the request still goes on to the queue).
        return None
    if current is None or not isinstance(current.data, dict):
        return None
    return current.etag if current.data.get("write") == head["write"] else None


async def single_head(ledger: Ledger, request_id: str, now: float) -> bool:
    """Make sure a single-target request has its head; False when the id is a broadcast's.

    A request reusing a broadcast's id is then a duplicate: sent, it would count as one of
    the broadcast's targets (its report `done` too early) and repeat one of its sends.
    Created first: schedules and producers with the read-only role the template grants
    write no head, so the read is only paid where one exists."""
    for _ in range(2):
        if await ensure_head(ledger, request_id, "single", now) is not None:
            return True
        try:
            head = await ledger.read(head_name(request_id))
        except NotJson:
            return True  # unreadable: what it was cannot be told, as before this check
        if head is not None:
            return not (isinstance(head.data, dict) and head.data.get("kind") == "broadcast")
    return True  # removed as often as it was created: nothing says it is a broadcast's


async def record_outcome(
    ledger: Ledger,
    request_id: str,
    target: str,
    outcome: Final,
    now: float,
    *,
    reason: str | None = None,
    label: str | None = None,
    detail: Mapping[str, Any] | None = None,
    claim_etag: str | None = None,
    only_if_empty: bool = False,
    yield_to_live_claim: bool = False,
    own_message: str | None = None,
) -> bool:
    """Write the target's final outcome once; False when it already had one.

    `only_if_empty`: only into an empty slot (False when it holds a claim or an outcome).

    `claim_etag`: the claim this instance holds on the target's slot, replaced in one
    write. Without it (or when that claim was taken over meanwhile) a claim found in the
    slot is replaced too: whoever holds it is past its own check, and the outcome is final.
    Except a failure over a live claim of another instance (it took over after this one's
    claim expired, and is sending): its holder records the outcome, so a failure here
    cannot stand in the report for a target that instance then delivers (False).
    `yield_to_live_claim`: the same for a failure recorded without a claim (the host gave
    up on a message, or it is invalid): a live claim is another's, sending, unless it
    names `own_message` (an earlier attempt of the same queue message took it).
    `label` is what the report shows as the target (the conversation key, when known).
    """
    shown = label or target
    # Cut short in the metadata (Azure keeps 8 KiB of it per blob; a request may name a
    # target of 40,000 characters): the document keeps the whole of it.
    metadata = {"outcome": outcome, "target": _pack(shown[:MAX_LABEL_CHARS])}
    data: dict[str, Any] = {"target": shown, "outcome": outcome, "at": iso(now), **(detail or {})}
    if reason:
        data["reason"] = report_reason(reason)
        metadata["reason"] = _pack(data["reason"])
    name = outcome_name(request_id, target)
    settled = claim_etag is not None and await ledger.replace(
        name, data, claim_etag, metadata=metadata
    )
    if settled:
        return True
    for _ in range(5):
        if await ledger.create(name, data, metadata=metadata) is not None:
            return True
        if only_if_empty:
            return False
        current = await ledger.read(name)
        if current is None:
            continue  # released meanwhile
        if is_outcome(current.data):
            return False
        expires = claim_expiry(current.data)
        guarded = claim_etag is not None or yield_to_live_claim
        holder = current.data.get("message") if isinstance(current.data, dict) else None
        if own_message is not None and holder == own_message:
            guarded = False  # this message's own earlier attempt: nobody else is sending
        if outcome == "failed" and guarded and expires is not None and expires > now:
            return False
        if await ledger.replace(name, data, current.etag, metadata=metadata) is not None:
            return True
    raise StoreError(f"proactive ledger: {name[-80:]!r} kept changing; outcome not recorded")


async def record_duplicate(ledger: Ledger, request_id: str, target: str, now: float) -> None:
    name = f"{request_prefix(request_id)}dup/{uuid.uuid4().hex}.json"
    await ledger.create(name, {"target": target, "at": iso(now)})


async def read_report(ledger: Ledger, request_id: str) -> dict[str, Any] | None:
    """The report JSON (fixed shape, see docs/proactive.md), or None when nothing is known.

    The outcomes are listed before the head is read: a target's outcome is written only
    after the head counted it, so the head read after them counts every one listed (read
    first, a fan-out counting pages meanwhile could be outrun: 4 delivered of 2 targets).
    """
    prefix = request_prefix(request_id)
    fanout_slot = outcome_name(request_id, FANOUT_TARGET)[len(prefix) :]
    single_slot = outcome_name(request_id, SINGLE_TARGET)[len(prefix) :]
    fanout_listed = False
    many = False  # a slot of a target other than a single request's: a broadcast's
    counts: dict[str, int] = dict.fromkeys(FINAL_OUTCOMES, 0)
    duplicate = 0
    failures: list[dict[str, str]] = []
    latest = 0.0
    claimed = False
    async for entry in ledger.list(prefix):
        rest = entry.name[len(prefix) :]
        if rest.startswith("claim/") or rest == "started.json" or "claim" in entry.metadata:
            claimed = True  # being worked on, or tried and waiting for its next attempt
            continue
        if rest.startswith("dup/"):
            duplicate += 1
        elif rest.startswith("out/"):
            outcome = entry.metadata.get("outcome", "")
            if outcome not in counts:
                continue
            counts[outcome] += 1
            fanout_listed = fanout_listed or rest == fanout_slot
            many = many or rest != single_slot
            if outcome == "failed" and len(failures) < MAX_FAILURES_LISTED:
                failures.append(
                    {
                        "target": _unpack(entry.metadata.get("target")),
                        "reason": _unpack(entry.metadata.get("reason")),
                    }
                )
        else:
            continue
        latest = max(latest, entry.modified)
    head_record = await ledger.read(head_name(request_id))
    if head_record is not None:
        _check_head(head_record.data, head_name(request_id))
    ended = head_record.data.get("ended") if head_record is not None else None
    if isinstance(ended, str) and not fanout_listed:
        # A fan-out the host gave up on, its own failed slot not written (yet): the head
        # that ended it says why, in the same write that counted it as a target.
        counts["failed"] += 1  # listed first: the rest of the broadcast was not sent
        failures = [{"target": FANOUT_LABEL, "reason": ended}, *failures][:MAX_FAILURES_LISTED]
    finished = sum(counts.values())
    if head_record is None:
        if not finished and not duplicate:
            return None
        # Its head write failed, or a rule deleting old blobs took the head first: still
        # reported. A broadcast's head counted its targets: without it, those found, and
        # never `done` (how many more there were is not known).
        head = new_head(request_id, "broadcast" if many else "single", latest)
        head["targets"] = finished if many else 1
        head["fannedOut"] = not many
    else:
        head = head_record.data
        latest = max(latest, head_record.modified)
    created = head.get("createdAt")
    updated = iso(latest) if latest else head.get("updatedAt")
    if _is_iso(created) and _is_iso(updated):
        # Blob times have whole seconds, createdAt the writer's milliseconds: the same format,
        # so the later of the two compares as the greater string (a createdAt not in that
        # format, a head edited by hand, is shown as found but never taken as updatedAt).
        updated = max(created, updated)
    single = head.get("kind") != "broadcast"
    targets = 1 if single else int(head.get("targets") or 0)
    if head.get("fannedOut") and finished >= targets:
        state = "done"
    elif claimed or (not single and (finished or targets or head.get("continuation"))):
        state = "running"
    else:
        state = "pending"
    return {
        "id": request_id,
        "state": state,
        "targets": targets,
        "delivered": counts["delivered"],
        "duplicate": duplicate,
        "pruned": counts["pruned"],
        "failed": counts["failed"],
        "failures": failures,
        "createdAt": created,
        "updatedAt": updated,
    }


def _check_head(data: Any, name: str) -> None:
    """StoreError unless `data` reads as a report's head (a blob edited by hand, or by
    another program, reads as unusable rather than as storage failing)."""
    targets = data.get("targets", 0) if isinstance(data, dict) else None
    if not isinstance(data, dict) or (
        data.get("kind") == "broadcast"
        and targets is not None
        and (not isinstance(targets, int) or isinstance(targets, bool) or targets < 0)
    ):
        raise NotJson(f"proactive ledger: {name} is not a report's head")


_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _is_iso(value: Any) -> bool:
    """Whether `value` is a time as `iso` writes it (so two compare as strings)."""
    return isinstance(value, str) and _ISO.fullmatch(value) is not None


def _pack(text: str) -> str:
    """Metadata values must be ASCII: base64url of the UTF-8 text."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def _unpack(value: str | None) -> str:
    if not value:
        return ""
    try:
        return base64.urlsafe_b64decode(value.encode("ascii")).decode("utf-8", "replace")
    except ValueError:
        return ""
