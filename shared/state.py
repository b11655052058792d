"""Bot state: one plain JSON document per conversation and one per user.

The Bot Framework State service is retired: bots keep their own state. Here it is a JSON
object per (channel, conversation) and per (channel, user), in Blob storage
(:mod:`shared.state_blob`, container ``BOT_REFERENCES_CONTAINER`` under ``state/``) or in
memory (:class:`shared.state_memory.MemoryStateStore`, same contract, for tests and
tools). One test suite (tests/unit/test_state.py) runs against both.

The store contract is small: ``read``, ``write`` (create with If-None-Match, update with
If-Match on the ETag read), ``delete`` and ``delete_prefixed`` (the states of a Teams
channel's threads, when the bot leaves it). :class:`State` builds the rest on it: loaded
lazily, saved only when changed, and never a silent overwrite. When another writer saved
the document since it was loaded, the save re-reads it and applies this writer's change
again:

- changes made through :meth:`State.update` are replayed on the fresh document (so two
  concurrent counters both count);
- other (direct) edits are then merged field by field (top-level keys), three ways: the
  loaded document with the updates replayed, the fresh one with them replayed, and this
  writer's data. Fields only this writer edited are applied, fields only the other writer
  changed are kept, a field both changed to the same value is written once (so two plain
  ``+= 1`` edits that meet count once: read-modify-write changes belong in ``update``); a
  field both changed differently goes to ``State.merge`` when set, else the save fails
  with :class:`StateConflict`, having written nothing (safe to retry).

Documents are plain JSON (no pickling), limited to :data:`MAX_STATE_BYTES` of UTF-8; a
bigger state is a :class:`StateTooLarge` error and nothing is written. Nor is one a
:class:`State` would save nested deeper than :data:`MAX_STATE_DEPTH` (a StateError; a
document an earlier version stored deeper may keep its depth, not grow deeper).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from shared.activity import nesting, nests_deeper
from shared.removals import removed_since

MAX_STATE_BYTES = 64 * 1024  # of the JSON data, UTF-8
# Objects and arrays nested at most this deep. Deeper, a document written from a shallow
# stack could exceed the recursion limit when read from a deeper one: every later turn
# of its user or conversation would fail on it.
MAX_STATE_DEPTH = 64
MAX_SAVE_ATTEMPTS = 16  # conflicts re-read and re-applied before StateConflict
WRITE_IDS_KEPT = 16  # write ids a document keeps (its own and those it was written over)
SCHEMA_VERSION = 1

Scope = Literal["conversation", "user"]
Data = dict[str, Any]
Change = Callable[[Data], Any]  # mutates the state in place; must depend only on it
# (as loaded, theirs now, ours) -> to write; the first two with the update() changes replayed
Merge = Callable[[Data, Data, Data], Data]

_SCOPES: tuple[Scope, ...] = ("conversation", "user")


class StateError(Exception):
    """State could not be read or written. The message never quotes state data or secrets."""


class StateTooLarge(StateError):
    """The state is over the size limit; nothing was written."""


class StateConflict(StateError):
    """Another writer changed the same state and the change could not be re-applied.

    Nothing was written: the operation can be retried as a whole.
    """


@dataclass(slots=True)
class StateDocument:
    """One stored state: its key, its JSON data and the ETag it was read at."""

    key: str
    data: Data
    etag: str | None = None
    updated_at: str | None = None
    # The ids of the writes that made it, newest first (the last WRITE_IDS_KEPT): the
    # write that stored it, then those of the documents it was written over.
    write_ids: tuple[str, ...] = ()
    # A user state's owner as saved with it (owner_label): kept by writers that do not
    # know it (proactive code), so an erasure by it still finds the state.
    owner: str | None = None


class StateStore(Protocol):
    """Where state documents live. ``write`` answers None when the ETag no longer holds
    (or, with ``etag=None``, when the document exists): the caller re-reads. `write_ids`
    is stored with the document (read back as ``StateDocument.write_ids``): a writer whose
    write was stored but its answer lost (the store's client then retried it, refused; or
    the call failed) finds its id there, even after other writes built on it."""

    max_bytes: int

    async def read(self, key: str) -> StateDocument | None: ...

    async def write(
        self,
        key: str,
        data: Mapping[str, Any],
        *,
        etag: str | None,
        write_ids: Sequence[str] = (),
        aad_object_id: str | None = None,
    ) -> str | None: ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefixed(self, prefix: str) -> int: ...

    async def delete_user_states(self, channel_id: str, aad_object_id: str) -> int: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- keys


def conversation_state_key(channel_id: str, conversation_id: str) -> str:
    """The key of a conversation's state: ``"conversation/<channelId>/<conversation.id>"``."""
    return state_key("conversation", channel_id, conversation_id)


def user_state_key(channel_id: str, user_id: str) -> str:
    """The key of a user's state on one channel: ``"user/<channelId>/<user id>"``."""
    return state_key("user", channel_id, user_id)


def state_key(scope: Scope, channel_id: str, owner_id: str) -> str:
    if not isinstance(channel_id, str) or "/" in channel_id:
        raise ValueError("a channel id in a state key is a string without '/'")
    key = f"{scope}/{channel_id}/{owner_id}"
    split_state_key(key)
    return key


# An aadObjectId is a GUID; any id of these characters is kept (a blob metadata value).
_AAD_LABEL = re.compile(r"[0-9a-z._-]{1,128}")


def owner_label(key: str, aad_object_id: str | None) -> str | None:
    """How the owner of the state at `key` is written beside it: a user state's
    aadObjectId in lower case; None for a conversation's state, or no such id."""
    if aad_object_id is None or split_state_key(key)[0] != "user":
        return None
    return aad_label(aad_object_id)


def aad_label(aad_object_id: str) -> str | None:
    label = aad_object_id.strip().lower() if isinstance(aad_object_id, str) else ""
    return label if _AAD_LABEL.fullmatch(label) else None


def split_state_key(key: str) -> tuple[Scope, str, str]:
    """``"<scope>/<channelId>/<id>"`` → (scope, channel id, id); ValueError when malformed."""
    if not isinstance(key, str):
        raise ValueError("a state key must be a string")
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] not in _SCOPES or not parts[1] or not parts[2]:
        raise ValueError("a state key looks like '<conversation|user>/<channelId>/<id>'")
    return parts[0], parts[1], parts[2]  # type: ignore[return-value]


# ---------------------------------------------------------------------------- documents


def encode_data(
    data: Any, max_bytes: int = MAX_STATE_BYTES, *, max_depth: int | None = None
) -> bytes:
    """The JSON of `data`, checked: an object of plain JSON values, within `max_bytes` and
    (when given) nested at most `max_depth` levels."""
    if not isinstance(data, Mapping):
        raise StateError("state must be a JSON object (a dict)")
    if max_depth is not None and isinstance(data, dict) and nests_deeper(data, max_depth):
        raise StateError(f"state is nested more than {max_depth} levels deep; nothing was written")
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        plain = json.loads(text) == data
    except (TypeError, ValueError, RecursionError):
        plain = False
    if not plain:
        raise StateError(
            "state must be plain JSON: dicts with string keys, lists, strings, numbers "
            "(finite), booleans and None"
        )
    body = text.encode("utf-8", "surrogatepass")
    if len(body) > max_bytes:
        raise StateTooLarge(
            f"state is {len(body)} bytes of JSON, over the limit of {max_bytes}; nothing was "
            "written"
        )
    return body


def to_document(
    key: str, data: Mapping[str, Any], now: float, write_ids: Sequence[str] = ()
) -> Data:
    document = {
        "schemaVersion": SCHEMA_VERSION,
        "key": key,
        "updatedAt": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": data,
    }
    if write_ids:
        document["writeIds"] = list(write_ids[:WRITE_IDS_KEPT])
    return document


def from_document(document: Any, etag: str | None) -> StateDocument:
    if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
        raise StateError("state store: a stored document is not a state document")
    if document.get("schemaVersion") != SCHEMA_VERSION:
        # Never rewrite a document a newer version of the bot wrote.
        raise StateError(
            f"state store: unsupported schemaVersion {document.get('schemaVersion')!r}"
        )
    if not isinstance(document.get("key"), str):
        raise StateError("state store: a stored document has no key")
    found = document.get("writeIds")
    write_ids = tuple(i for i in found if isinstance(i, str)) if isinstance(found, list) else ()
    return StateDocument(
        document["key"],
        document["data"],
        etag,
        document.get("updatedAt"),
        write_ids,
    )


def copy_data(data: Mapping[str, Any]) -> Data:
    return json.loads(json.dumps(data))


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text would be. Python's ``==`` holds ``True == 1`` and ``1 == 1.0``,
    which JSON tells apart: a flag turned from 1 to true is a change to save. A subclass
    is its JSON kind (a StrEnum a string, a defaultdict an object), as it is written.
    Iterative, so data nested as deep as JSON allows cannot exhaust the stack."""
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if x is y:
            continue
        if type(x) is not type(y) and _json_kind(x) is not _json_kind(y):
            return False
        if isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            pending.extend((value, y[name]) for name, value in x.items())
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


def _json_kind(value: Any) -> type | None:
    """The JSON type `value` is written as (bool before int: a bool is an int)."""
    for kind in (bool, int, float, str, dict, list):
        if isinstance(value, kind):
            return kind
    return None


# ---------------------------------------------------------------------------- one state


_MISSING = object()
# An If-Match no document's ETag equals: the write it goes with is refused, the
# document there or not (a None ETag would create a deleted one again).
_NO_DOCUMENT_HAS = '"no-document-has-this-etag"'


def merge_fields(loaded: Data, theirs: Data, ours: Data) -> Data:
    """Three-way merge on top-level fields: ours where only we changed a field, theirs
    where only they did, the value once where both changed it to the same value;
    StateConflict where both changed one field differently."""
    merged = dict(theirs)
    for name in loaded.keys() | ours.keys():
        before, mine = loaded.get(name, _MISSING), ours.get(name, _MISSING)
        if same_json(mine, before):
            continue
        other = theirs.get(name, _MISSING)
        if not same_json(other, before) and not same_json(other, mine):
            raise StateConflict(
                "state: another turn changed the same field at the same time; nothing was "
                "written (set State.merge to combine such changes)"
            )
        if mine is _MISSING:
            merged.pop(name, None)
        else:
            merged[name] = mine
    return merged


class State:
    """One state document, as a handler or proactive code sees it.

    ``await state.load()`` gives the data as a dict to read and change (``{}`` when none is
    stored); ``await state.update(change)`` applies ``change(data)`` and remembers it so a
    concurrent save re-applies it; ``await state.save()`` writes when something changed.
    A turn saves its states at its end; proactive code calls ``save`` itself.
    """

    __slots__ = (
        "_data",
        "_etag",
        "_ids",
        "_loaded",
        "_loading",
        "_saving",
        "_store",
        "_stored_owner",
        "_unsettled",
        "_updates",
        "aad_object_id",
        "key",
        "merge",
        "read_at",
        "since",
    )

    def __init__(
        self,
        store: StateStore | None,
        key: str,
        *,
        merge: Merge | None = None,
        aad_object_id: str | None = None,
    ):
        split_state_key(key)
        self.key = key
        # A user state's owner as the channel vouches for it (Teams' aadObjectId): written
        # with each save, so erasing the user by it finds this state (delete_user_states).
        self.aad_object_id = aad_object_id
        self._stored_owner: str | None = None  # the last owner a document read named
        # Combines fields both writers changed: called like merge_fields, with the loaded
        # and the fresh document each with this turn's update() changes replayed.
        self.merge = merge
        self._store = store
        self._loaded: Data | None = None  # the data as read (or as last saved)
        self._etag: str | None = None
        self._ids: tuple[str, ...] = ()  # the write ids of the document at _etag
        # Writes not answered yet (a call that failed may have been stored): each one's
        # id, the data it was made from and how many update() changes it covered, for a
        # re-read to recognise it.
        self._unsettled: list[tuple[str, Data, int]] = []
        self._data: Data | None = None  # what the bot sees and changes
        self._updates: list[Change] = []
        self._loading = asyncio.Lock()  # held by the first read
        self._saving = asyncio.Lock()
        # When (time.monotonic()) its turn began: a save that finds the document deleted
        # since by a removal of this process writes nothing (shared/removals.py).
        self.since: float | None = None
        self.read_at: float | None = None  # when (time.monotonic()) its data was first read

    @classmethod
    def for_conversation(cls, store: StateStore, channel_id: str, conversation_id: str) -> State:
        return cls(store, conversation_state_key(channel_id, conversation_id))

    @classmethod
    def for_user(
        cls,
        store: StateStore,
        channel_id: str,
        user_id: str,
        *,
        aad_object_id: str | None = None,
    ) -> State:
        """`aad_object_id`: on msteams, the user's (as Teams sent it), so that erasing the
        user by it finds this state; elsewhere the client writes it: None."""
        return cls(store, user_state_key(channel_id, user_id), aad_object_id=aad_object_id)

    @property
    def loaded(self) -> bool:
        return self._data is not None

    @property
    def changed(self) -> bool:
        return self._data is not None and not same_json(self._data, self._loaded)

    async def load(self) -> Data:
        """The state's data (read from the store on the first call only: calls made side
        by side wait for that one read, so no change is made to data a second read replaces)."""
        if self._data is None:
            async with self._loading:
                if self._data is None:
                    began = time.monotonic()  # a read crossing a removal is from before
                    stored = await self._require_store().read(self.key)
                    self.read_at = began
                    self._adopt_owner(stored)
                    self._loaded = stored.data if stored else {}
                    self._etag = stored.etag if stored else None
                    self._ids = stored.write_ids if stored else ()
                    self._data = copy_data(self._loaded)
        return self._data

    def _adopt_owner(self, stored: StateDocument | None) -> None:
        """Remember the owner a document read names (the last one named), for writes that
        know none of their own."""
        if stored is not None and stored.owner is not None:
            self._stored_owner = stored.owner

    def _owner(self) -> dict[str, str]:
        """The write's owner: the one this State was given (the channel vouches for it),
        else the last one a document read named, so a save that knows none keeps it."""
        given = owner_label(self.key, self.aad_object_id)
        owner = given or self._stored_owner
        return {"aad_object_id": owner} if owner else {}

    async def update(self, change: Change) -> Data:
        """Apply `change` to the data now, and again on the fresh data if a concurrent
        writer saved first. `change` must depend only on the data it is given and change
        it in place (what it returns is not used; an ``async def`` is a TypeError). The data
        returned is final once saved: a save that meets a concurrent writer's changes
        updates it in place, so read from it after :meth:`save` (or the turn's
        ``save_state``) what the user is shown (unless it changed again while that save
        was out: then the next save merges it)."""
        data = await self.load()
        result = change(data)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never run: nothing changed
            raise TypeError("state: an update() change must be a plain function, not async")
        self._updates.append(change)
        return data

    def check(self) -> None:
        """Raise what :meth:`save` would for changed data it cannot store (StateTooLarge,
        StateError), without writing anything."""
        if self.changed and not self._removed_meanwhile():  # such a save writes nothing
            encode_data(self._data, self._require_store().max_bytes, max_depth=self._max_depth())

    async def save(self) -> bool:
        """Write the data if it changed (True when written). Raises StateTooLarge (nothing
        written), StateConflict (nothing written, retry-safe) or StateError (a bad state:
        nothing written; storage failing: the write may have been stored, and saving this
        State again finds it by its id and does not apply its update() changes twice)."""
        async with self._saving:  # one at a time: a second would replay the first's updates
            return await self._save()

    async def _save(self) -> bool:
        if self._data is None or not self.changed:
            return False
        if self._removed_meanwhile():
            return False  # removed since its turn began: written, it would outlive that
        store = self._require_store()
        loaded, ours = self._loaded or {}, self._data
        # A bad, oversized or too deep state fails before any I/O.
        encode_data(ours, store.max_bytes, max_depth=self._max_depth())
        # What is written is a copy of the data as the write starts: the handler's other
        # tasks may go on changing it while the write is out, and those changes stay
        # unsaved (``changed``) for the next save instead of passing for written.
        mine, counted, etag, based = copy_data(ours), len(self._updates), self._etag, self._ids
        candidate = mine
        for attempt in range(MAX_SAVE_ATTEMPTS):
            write_id = uuid.uuid4().hex
            ids = (write_id, *based)[:WRITE_IDS_KEPT]
            # Unsettled until answered or a re-read tells: `mine` (what the handler's data
            # was), not the candidate, is the base its stored changes are measured from.
            self._unsettled.append((write_id, mine, counted))
            new_etag = await store.write(
                self.key, candidate, etag=etag, write_ids=ids, **self._owner()
            )
            stored, fresh = candidate, None
            if new_etag is None:
                # Jittered: savers that collided do not collide again in step.
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
                fresh = await store.read(self.key)
                if fresh is None and self._removed_meanwhile():
                    return False  # its removal wins: written again, it would outlive it
                self._adopt_owner(fresh)
                if fresh is not None and write_id in fresh.write_ids:
                    # Stored, but its answer was lost (the store's client retried it,
                    # refused), and maybe written over since by writers who read it:
                    # this write's own, done.
                    new_etag, stored, ids = fresh.etag, fresh.data, fresh.write_ids
            if new_etag is not None:
                self._unsettled.clear()
                del self._updates[:counted]
                if same_json(ours, mine):
                    self._loaded, self._etag, self._ids = stored, new_etag, ids
                    if stored is not mine:  # show the bot what was stored
                        ours.clear()
                        ours.update(copy_data(stored))
                elif stored is mine:
                    self._loaded, self._etag, self._ids = mine, new_etag, ids
                else:
                    # Changed while a write merged with another writer's was out: the next
                    # save merges those changes as it would a concurrent writer's (it meets
                    # this write as one: the ETag kept can match nothing, so its write is
                    # refused, deleted document or not).
                    self._loaded, self._etag = mine, _NO_DOCUMENT_HAS
                return True
            found = [u for u in self._unsettled if fresh is not None and u[0] in fresh.write_ids]
            if found:
                # An earlier save's write whose call failed was stored after all: its
                # update() changes are in the document already, not to be replayed.
                _, loaded, settled = found[-1]
                del self._updates[:settled]
                self._loaded = loaded  # the base of what is left, should this save fail
            self._unsettled.clear()  # none other can be stored any more: the ETag moved on
            theirs = fresh.data if fresh else {}
            etag = fresh.etag if fresh else None
            based = fresh.write_ids if fresh else ()
            mine, counted = copy_data(ours), len(self._updates)
            candidate = self._reapply(loaded, theirs, mine)
            encode_data(candidate, store.max_bytes, max_depth=self._max_depth(theirs))
        raise StateConflict(
            f"state: gave up saving after {MAX_SAVE_ATTEMPTS} concurrent changes; nothing was "
            "written"
        )

    async def discard(self) -> None:
        """Drop the changes not saved yet: the data is what was last read or saved again
        (in place: the dict the handler holds shows it), and the turn's save has nothing
        to write. For a handler that caught a failed save (StateTooLarge, StateConflict)
        and told the user so: without it the turn's own save fails the same way (500 and
        the apology). A write whose storage failed may have been stored all the same: a
        discard does not undo it."""
        async with self._saving:
            if self._data is None:
                return
            self._data.clear()
            self._data.update(copy_data(self._loaded or {}))
            self._updates.clear()
            # Their update() changes are gone: nothing of theirs can be replayed twice.
            self._unsettled.clear()

    async def delete(self) -> bool:
        """Remove the stored document now; the data reads as ``{}`` afterwards. Waits for a
        first read or a save still out (bounded by the store's own time limits), whose
        outcome would otherwise come back over the deletion."""
        async with self._loading, self._saving:
            deleted = await self._require_store().delete(self.key)
            self.read_at = time.monotonic()  # known empty: what is written now is new
            if self._data is None:
                self._data = {}
            else:
                self._data.clear()  # the dict the handler holds stays the state's
            self._loaded, self._etag, self._ids = {}, None, ()
            self._unsettled.clear()
            self._updates.clear()
            return deleted

    def _reapply(self, loaded: Data, theirs: Data, ours: Data) -> Data:
        # The update() changes are replayed on both sides, so only the direct edits are
        # merged: base and theirs both carry this turn's updates, ours carries its edits.
        base, fresh = self._replay(copy_data(loaded)), self._replay(copy_data(theirs))
        if same_json(base, ours):
            return fresh  # every change came through update()
        merge = self.merge or merge_fields
        return merge(base, fresh, copy_data(ours))

    def _replay(self, data: Data) -> Data:
        for change in self._updates:
            change(data)
        return data

    def _removed_meanwhile(self) -> bool:
        return self.since is not None and removed_since(self.key, self.since, self.read_at)

    def _max_depth(self, *found: Data) -> int:
        """MAX_STATE_DEPTH, or as deep as a document read already was (an earlier
        version's): refused, no change to it could be saved, and every turn changing it
        would fail; it may not grow deeper, though."""
        limit = MAX_STATE_DEPTH
        for document in (self._loaded, *found):
            if isinstance(document, dict) and nests_deeper(document, limit):
                limit = nesting(document)
        return limit

    def _require_store(self) -> StateStore:
        if self._store is None:
            raise StateError("state: no state store is configured for this bot")
        return self._store
