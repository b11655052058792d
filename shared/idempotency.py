"""Exactly once, as far as a queue allows: claims and delivered markers per target.

Teams has no idempotency key, so the store decides whether a target was already sent:

1. **Claim** (create-only blob with an expiry) before anything is sent, so two instances
   (a host redelivery, a resubmitted id, a resumed fan-out) never work on one target at
   the same time. An expired claim (its holder crashed) is taken over with ``If-Match``.
2. **Check** the target's outcome *after* holding the claim: a holder that finished just
   before would otherwise be repeated.
3. **Send**, then write the delivered marker (the outcome blob, create-only) at once,
   before anything else; then release the claim.

What is left is the window between the Connector's 2xx and the marker write: a crash
there means the target is sent again once the claim has expired. It is one storage round
trip wide; docs/proactive.md says so. (Storage refusing the write alone does not: the
engine's kept copy carries the outcome and records it later, without a send.)
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from shared.ledger import Ledger
from shared.reports import claim_name

logger = logging.getLogger(__name__)

CLAIM_SECONDS = 120.0  # longer than any one send (the Connector's budget is 12 s)


@dataclass(slots=True)
class Claim:
    name: str
    etag: str


@dataclass(slots=True)
class Busy:
    """Another instance holds the target's claim, for `wait` more seconds at most."""

    wait: float


async def take_claim(
    ledger: Ledger, request_id: str, target: str, now: float, *, seconds: float = CLAIM_SECONDS
) -> Claim | Busy:
    """Claim the target, or learn how long its current holder may still hold it."""
    name = claim_name(request_id, target)
    data = {"owner": uuid.uuid4().hex, "expiresAt": now + seconds}
    for _ in range(3):
        etag = await ledger.create(name, data)
        if etag is not None:
            return Claim(name, etag)
        current = await ledger.read(name)
        if current is None:
            continue  # released meanwhile: try again
        expires = current.data.get("expiresAt") if isinstance(current.data, dict) else None
        if isinstance(expires, int | float) and current.modified:
            # Never longer than a claim lasts from when the store wrote it (its own clock,
            # to the second): a holder whose clock ran ahead cannot block the target.
            expires = min(expires, current.modified + seconds + 1.0)
        if isinstance(expires, int | float) and expires > now:
            return Busy(expires - now)
        etag = await ledger.replace(name, data, current.etag)  # expired: its holder is gone
        if etag is not None:
            logger.info("proactive %r: took over an expired claim on %r", request_id, target)
            return Claim(name, etag)
    return Busy(5.0)


async def release_claim(ledger: Ledger, claim: Claim) -> None:
    """Release the claim if it is still ours (best effort: it expires anyway)."""
    try:
        await ledger.delete(claim.name, claim.etag)
    except Exception as error:
        logger.info("proactive: claim not released (%s); it expires", type(error).__name__)
