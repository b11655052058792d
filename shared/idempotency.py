"""Exactly once, as far as a queue allows: one slot per target, claimed, then settled.

Teams has no idempotency key, so the store decides whether a target was already sent. A
target's slot is one blob (``out/<target>.json``, shared/reports.py) that holds either a
claim or the target's final outcome:

1. **Claim** it before anything is sent: a create-only write of a claim with an expiry. It
   succeeds only where the slot is empty, so it proves, in the same request, that no
   instance holds the target (a host redelivery, a resubmitted id, a resumed fan-out) and
   that it has no outcome yet. A slot that holds a claim past its expiry (its holder
   crashed) is taken over with ``If-Match``; one that holds an outcome is settled.
2. **Send**, then **settle**: the outcome replaces the claim at once (``If-Match`` on the
   claim's ETag, shared/reports.py), before anything else. A send that is put back
   (throttled, ...) releases the claim instead; one whose outcome storage refused keeps
   it until the copy kept to record the outcome has recorded it.

What is left is the window between the Connector's 2xx and the settling write: a crash
there means the target is sent again once the claim has expired. It is one storage round
trip wide; docs/proactive.md says so. (Storage refusing the write alone does not: the
engine's kept copy carries the outcome and records it later, without a send.)

A broadcast's fan-out takes the same kind of claim on a slot of its own that never holds
an outcome (``claim/fan-out.json``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.config import MAX_CLAIM_SECONDS
from shared.ledger import Ledger, Record

logger = logging.getLogger(__name__)

CLAIM_METADATA: Mapping[str, str] = {"claim": "1"}  # how a report's listing tells claims apart


@dataclass(slots=True)
class Claim:
    name: str
    etag: str


@dataclass(slots=True)
class Busy:
    """Another attempt holds the target's claim, for `wait` more seconds at most; `message`:
    the queue message whose attempt took it, when it said."""

    wait: float
    message: str | None = None


@dataclass(slots=True)
class Settled:
    """The slot already holds the target's final outcome."""

    record: Record


def is_outcome(data: Any) -> bool:
    return isinstance(data, dict) and "outcome" in data


def claim_expiry(data: Any) -> float | None:
    """When the claim `data` (a slot's content) says it ends; None when it is no claim."""
    expires = data.get("expiresAt") if isinstance(data, dict) else None
    return expires if isinstance(expires, int | float) else None


async def take_claim(
    ledger: Ledger, name: str, now: float, *, seconds: float, message: str | None = None
) -> Claim | Busy | Settled:
    """Claim the slot `name`, or learn its outcome, or how long its holder may keep it.
    `message`: the host's id of the queue message claiming (its redeliveries share it)."""
    data = _claim(now, seconds, message)
    for _ in range(3):
        etag = await ledger.create(name, data, metadata=CLAIM_METADATA)
        if etag is not None:
            return Claim(name, etag)
        current = await ledger.read(name)
        if current is None:
            continue  # released meanwhile: try again
        if is_outcome(current.data):
            return Settled(current)
        if isinstance(current.data, dict) and current.data.get("owner") == data["owner"]:
            # This call's own create, which storage took while its answer was lost (the
            # client's retry found the slot taken): taken for an earlier attempt's, a
            # target nothing was sent to was failed as "may have been posted".
            return Claim(name, current.etag)
        expires = claim_expiry(current.data)
        if expires is not None and current.modified:
            # Never longer than a claim lasts from when the store wrote it (its own clock,
            # to the second): a holder whose clock ran ahead cannot block the target. As
            # long as its holder's claims last: one whose setting is longer than this
            # instance's (a change rolling out) may start its send later.
            held = current.data.get("seconds")
            length = seconds
            if isinstance(held, int | float) and not isinstance(held, bool) and held > seconds:
                length = MAX_CLAIM_SECONDS if held > MAX_CLAIM_SECONDS else float(held)
            expires = min(expires, current.modified + length + 1.0)
        holder = current.data.get("message") if isinstance(current.data, dict) else None
        holder = holder if isinstance(holder, str) else None
        if expires is not None and expires > now:
            return Busy(expires - now, holder)
        if message is not None and holder == message:
            # Kept by an earlier attempt of this same queue message, which failed (or whose
            # process died) once its send had begun: not taken over, whatever its age; the
            # caller decides (shared/proactive.py).
            return Busy(0.0, holder)
        etag = await replace_with_claim(
            ledger, name, current.etag, now, seconds=seconds, message=message
        )
        if etag is not None:
            logger.info("proactive: took over an expired claim on %s", name[-80:])
            return Claim(name, etag)
    return Busy(5.0)


async def replace_with_claim(
    ledger: Ledger, name: str, etag: str, now: float, *, seconds: float, message: str | None = None
) -> str | None:
    """Claim a slot whose content was read with `etag` (an expired claim, or a failed
    outcome an operator retries); None when it changed since.

    A claim written while its answer was lost (storage took it, then answered late or with
    a 5xx, and the client's retry found the ETag changed) is known by its `owner`, read
    back: taken for another's, the slot held a claim nobody would ever settle."""
    claim = _claim(now, seconds, message)
    written = await ledger.replace(name, claim, etag, metadata=CLAIM_METADATA)
    if written is not None:
        return written
    current = await ledger.read(name)
    ours = current is not None and isinstance(current.data, dict)
    if ours and current.data.get("owner") == claim["owner"]:
        return current.etag
    return None


def _claim(now: float, seconds: float, message: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "owner": uuid.uuid4().hex,
        "expiresAt": now + seconds,
        "seconds": seconds,
    }
    if message is not None:
        data["message"] = message
    return data


async def release_claim(ledger: Ledger, claim: Claim) -> None:
    """Release the claim if it is still ours (best effort: it expires anyway)."""
    try:
        await ledger.delete(claim.name, claim.etag)
    except Exception as error:
        logger.info("proactive: claim not released (%s); it expires", type(error).__name__)
