"""Queue triggers: poll a Storage queue and process its messages as the Functions host does.

- Fetch up to `batchSize` messages; fetch again when no more than `newBatchThreshold`
  are still being processed. Back off (100 ms, doubling) while the queue is empty,
  never waiting longer than `maxPollingInterval`.
- A message is received hidden for 10 minutes, renewed halfway while its function
  runs, so a long invocation is never delivered twice at once.
- Decode per `messageEncoding` (base64 or none). The value is bound as the host sends
  it to the worker: a string (UTF-8; a body that is not valid UTF-8 fails the
  invocation), or bytes with `"dataType": "binary"`; wrapped in a real
  `azure.functions.QueueMessage` unless `main` asks for `str` or `bytes`.
- Success: delete. Failure: the message becomes visible again after
  `visibilityTimeout`; once it has been dequeued `maxDequeueCount` times (or more, when
  received) it is copied, as the original text, to `<queue>-poison` (created if
  missing) and deleted. A message that cannot be decoded goes to the poison queue at
  once. A queue whose name ends in `-poison`, or is too long for the suffix, has no
  poison queue: a failed message is then left hidden, as the host leaves it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.functions.queue import QueueMessage as TriggerMessage

from tools.devhost.app import Function, QueueOptions, QueueTrigger
from tools.devhost.invoker import BindingError, Invoker, Outcome

if TYPE_CHECKING:
    from azure.storage.queue import QueueMessage
    from azure.storage.queue.aio import QueueClient, QueueServiceClient

logger = logging.getLogger(__name__)

MIN_POLLING_INTERVAL = 0.1  # seconds, as the host's randomized backoff starts
RECEIVE_VISIBILITY = 600  # seconds a dequeued message stays hidden, renewed while processed
POISON_SUFFIX = "-poison"
MAX_QUEUE_NAME = 63


class UndecodableMessage(ValueError):
    """The message text is not valid for the configured messageEncoding."""


def decode_body(text: str, encoding: str) -> bytes:
    if encoding == "none":
        return text.encode("utf-8")
    try:
        # Like .NET's Convert.FromBase64String: whitespace is ignored, anything else is strict.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UndecodableMessage("not valid base64") from None


def encode_body(body: bytes | str, encoding: str) -> str:
    """Queue text for a body under `encoding` (what a producer sends)."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return raw.decode("utf-8") if encoding == "none" else base64.b64encode(raw).decode("ascii")


def poison_queue_name(queue_name: str) -> str | None:
    """`<queue>-poison`, or None where the host has no poison queue (see module doc)."""
    if queue_name.endswith(POISON_SUFFIX) or len(queue_name) + len(POISON_SUFFIX) > MAX_QUEUE_NAME:
        return None
    return queue_name + POISON_SUFFIX


@dataclass(slots=True)
class _Lease:
    """A received message's current pop receipt (each visibility update issues a new one)."""

    message_id: str
    pop_receipt: str


class QueueListener:
    """Polls one queue for one function until stopped."""

    def __init__(
        self,
        function: Function,
        service: QueueServiceClient,
        options: QueueOptions,
        invoker: Invoker,
        *,
        receive_visibility: float = RECEIVE_VISIBILITY,
    ) -> None:
        trigger = function.spec.trigger
        assert isinstance(trigger, QueueTrigger)
        self.function = function
        self.queue_name = trigger.queue_name
        self.options = options
        self._binary = trigger.data_type == "binary"
        self._invoker = invoker
        self._visibility = max(1, round(receive_visibility))
        self._queue: QueueClient = service.get_queue_client(trigger.queue_name)
        poison = poison_queue_name(trigger.queue_name)
        self._poison: QueueClient | None = service.get_queue_client(poison) if poison else None
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._in_flight = 0

    def stop(self) -> None:
        self._stopping.set()
        self._room.set()

    async def run(self) -> None:
        """Create the queue if missing, then poll until :meth:`stop`."""
        if not await self._ensure_queue():
            return
        delay = MIN_POLLING_INTERVAL
        while not self._stopping.is_set():
            await self._wait_for_room()
            if self._stopping.is_set():
                break
            try:
                messages = await self._receive(self.options.batch_size)
            except Exception as exc:
                _log_storage_error("receiving from", self.queue_name, exc)
                messages = []
                delay = self.options.max_polling_interval
            if messages:
                delay = MIN_POLLING_INTERVAL
                for message in messages:
                    self._in_flight += 1
                    self._invoker.spawn(self._process(message))
                continue
            await self._sleep(delay)
            delay = min(delay * 2, self.options.max_polling_interval)

    async def invoke_manually(self, text: str) -> Outcome:
        """Run the function on `text` without touching the queue (admin endpoint)."""
        now = datetime.now(UTC)
        fields = {
            "id": str(uuid.uuid4()),
            "dequeue_count": 1,
            "insertion_time": now,
            "expiration_time": now + timedelta(days=7),
            "time_next_visible": now,
            "pop_receipt": None,
        }
        bind = functools.partial(self._bind, fields, text.encode("utf-8"))
        return await self._invoker.invoke(self.function, bind)

    async def _ensure_queue(self) -> bool:
        from azure.core.exceptions import ResourceExistsError

        delay = MIN_POLLING_INTERVAL
        while not self._stopping.is_set():
            try:
                with contextlib.suppress(ResourceExistsError):
                    await self._queue.create_queue()
                return True
            except Exception as exc:
                _log_storage_error("creating", self.queue_name, exc)
                await self._sleep(delay)
                delay = min(delay * 2, max(self.options.max_polling_interval, 5.0))
        return False

    async def _receive(self, count: int) -> list[QueueMessage]:
        pages = self._queue.receive_messages(
            messages_per_page=count, visibility_timeout=self._visibility
        ).by_page()
        try:
            page = await pages.__anext__()
        except StopAsyncIteration:
            return []
        return [message async for message in page]

    async def _process(self, message: QueueMessage) -> None:
        try:
            await self._handle(message)
        except Exception as exc:
            _log_storage_error(f"completing message {message.id} on", self.queue_name, exc)
        finally:
            self._in_flight -= 1
            if self._in_flight <= self.options.new_batch_threshold:
                self._room.set()

    async def _handle(self, message: QueueMessage) -> None:
        text = message.content or ""
        lease = _Lease(message.id, message.pop_receipt or "")
        try:
            body = decode_body(text, self.options.message_encoding)
        except UndecodableMessage:
            logger.warning(
                "Message %s on queue '%s' is not valid %s",
                message.id,
                self.queue_name,
                self.options.message_encoding,
            )
            await self._give_up(lease, text)
            return
        max_count = self.options.max_dequeue_count
        if message.dequeue_count > max_count:
            # Seen more often than allowed (e.g. the host stopped mid-invocation): give up.
            logger.warning(
                "Message %s was dequeued %d times (MaxDequeueCount %d)",
                message.id,
                message.dequeue_count,
                max_count,
            )
            await self._give_up(lease, text)
            return
        outcome = await self._invoke_leased(
            lease, functools.partial(self._bind, _fields(message), body)
        )
        if outcome.succeeded:
            await self._delete(lease)
        elif self._poison is None:
            pass  # no poison queue: left hidden, so a failing message cannot spin (as the host)
        elif message.dequeue_count >= max_count:
            logger.warning("Message %s has reached MaxDequeueCount of %d", message.id, max_count)
            await self._move_to_poison(lease, text)
        else:
            await self._release(lease)

    async def _invoke_leased(self, lease: _Lease, bind: Any) -> Outcome:
        """Invoke while renewing the message's invisibility halfway through each period."""
        done = asyncio.Event()
        renewal = asyncio.create_task(self._keep_hidden(lease, done))
        try:
            return await self._invoker.invoke(self.function, bind)
        finally:
            done.set()
            await renewal  # lets a renewal in progress finish: the lease needs its receipt

    async def _keep_hidden(self, lease: _Lease, done: asyncio.Event) -> None:
        """Renew the lease at half its time; after a failed renewal, again at half of what
        is left, as the host speeds up (at its usual pace once under half a second is
        left); never once the message is gone or leased to another receiver."""
        loop = asyncio.get_running_loop()
        expires = loop.time() + self._visibility
        wait = self._visibility / 2
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=wait)
            if done.is_set():
                return
            renewed = None
            try:
                with _unless_gone(lease, "renew"):
                    renewed = await self._queue.update_message(
                        lease.message_id,
                        pop_receipt=lease.pop_receipt,
                        visibility_timeout=self._visibility,
                    )
            except Exception as exc:
                _log_storage_error(f"renewing message {lease.message_id} on", self.queue_name, exc)
                left = expires - loop.time()
                wait = left / 2 if left > 0.5 else self._visibility / 2
                continue
            if renewed is None:
                return  # deleted, or received again elsewhere: not this run's to keep
            lease.pop_receipt = renewed.pop_receipt or lease.pop_receipt
            expires = loop.time() + self._visibility
            wait = self._visibility / 2

    def _bind(self, fields: dict[str, Any], body: bytes) -> Any:
        """The trigger value as the host sends it and the worker converts it."""
        if self._binary:
            value: str | bytes = body
        else:
            try:
                value = body.decode("utf-8")
            except UnicodeDecodeError:
                raise BindingError(
                    f"Exception binding parameter '{self.function.spec.trigger.name}': the "
                    'message is not valid UTF-8 (use "dataType": "binary" for bytes)'
                ) from None
        if self.function.trigger_annotation in (str, bytes):
            return value  # the worker's generic binding: the host's value as it is
        return TriggerMessage(body=value, **fields)

    async def _give_up(self, lease: _Lease, text: str) -> None:
        if self._poison is None:
            logger.warning(
                "Queue '%s' has no poison queue: message %s stays hidden for %ds",
                self.queue_name,
                lease.message_id,
                self._visibility,
            )
            return
        await self._move_to_poison(lease, text)

    async def _move_to_poison(self, lease: _Lease, text: str) -> None:
        """Copy the original text to `<queue>-poison` (creating it if needed), then delete."""
        from azure.core.exceptions import ResourceNotFoundError

        assert self._poison is not None
        logger.warning("Moving message %s to queue '%s'", lease.message_id, self._poison.queue_name)
        try:
            await self._poison.send_message(text)
        except ResourceNotFoundError:
            await self._poison.create_queue()
            await self._poison.send_message(text)
        await self._delete(lease)

    async def _release(self, lease: _Lease) -> None:
        """Make a failed message visible again after `visibilityTimeout`."""
        with _unless_gone(lease, "release"):
            await self._queue.update_message(
                lease.message_id,
                pop_receipt=lease.pop_receipt,
                visibility_timeout=round(self.options.visibility_timeout),
            )

    async def _delete(self, lease: _Lease) -> None:
        with _unless_gone(lease, "delete"):
            await self._queue.delete_message(lease.message_id, lease.pop_receipt)

    async def _wait_for_room(self) -> None:
        while self._in_flight > self.options.new_batch_threshold and not self._stopping.is_set():
            self._room.clear()
            await self._room.wait()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


@contextlib.contextmanager
def _unless_gone(lease: _Lease, action: str):
    """Like the host: a message deleted, re-leased elsewhere or whose queue is gone is fine."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        yield
    except ResourceNotFoundError:
        logger.debug("Cannot %s message %s: it or its queue is gone", action, lease.message_id)
    except HttpResponseError as exc:
        if getattr(exc, "error_code", None) != "PopReceiptMismatch":
            raise
        logger.debug("Cannot %s message %s: its lease has passed on", action, lease.message_id)


def _fields(message: QueueMessage) -> dict[str, Any]:
    """The trigger metadata the host passes along with the body."""
    return {
        "id": message.id,
        "dequeue_count": message.dequeue_count,
        "insertion_time": message.inserted_on,
        "expiration_time": message.expires_on,
        "time_next_visible": message.next_visible_on,
        "pop_receipt": message.pop_receipt,
    }


def _log_storage_error(action: str, queue: str, exc: Exception) -> None:
    # Status and error code only: storage error text can echo request details.
    from tools.azurite import TOO_OLD, too_old

    try:  # the bot's (an app served with --root has its own `shared`, or none)
        from shared.storage import unreadable_answer
    except ImportError:
        unreadable_answer = _never

    if too_old(exc):
        logger.warning("Storage error %s queue '%s': %s", action, queue, TOO_OLD)
        return
    if unreadable_answer(exc):
        # Storage answered (a proxy's page, XML cut short): not "unreachable", and the
        # answer's text stays out of the log.
        logger.warning(
            "Storage's answer could not be read %s queue '%s' (%s)",
            action,
            queue,
            type(exc).__name__,
        )
        return
    status = getattr(exc, "status_code", None)
    if status is None:
        logger.warning(
            "Storage not reachable %s queue '%s' (%s); is the storage emulator running?",
            action,
            queue,
            type(exc).__name__,
        )
        return
    logger.warning(
        "Storage error %s queue '%s': %s (status=%s, code=%s)",
        action,
        queue,
        type(exc).__name__,
        status,
        _error_code(exc),
    )


def _never(_error: BaseException) -> bool:
    return False


def _error_code(exc: Exception) -> str | None:
    """Storage's error code, when it is a code's name ("QueueNotFound"): a proxy in between
    may put anything in that header, the request's URL with its SAS included."""
    code = getattr(exc, "error_code", None)
    if not code:
        return None
    text = str(getattr(code, "value", code))
    return text if re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", text) else "UnrecognisedErrorCode"
