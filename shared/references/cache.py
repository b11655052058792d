"""The reference store's in-process memory of what it last read or wrote per key."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.references.contract import StoredReference, copied


@dataclass(slots=True)
class RecentCache:
    """What this process last read or wrote per key, for a bounded time (LRU)."""

    size: int
    ttl: float
    clock: Callable[[], float]
    entries: OrderedDict[str, tuple[float, StoredReference]] = field(default_factory=OrderedDict)

    def get(self, key: str) -> StoredReference | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] < self.clock():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry[1]

    def put(self, stored: StoredReference) -> None:
        if self.size <= 0:
            return
        self.entries[stored.key] = (self.clock() + self.ttl, copied(stored))
        self.entries.move_to_end(stored.key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)
