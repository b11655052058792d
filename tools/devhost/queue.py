"""Queue triggers: poll a Storage queue and process its messages as the Functions host does.

- Fetch up to `batchSize` messages; fetch again when no more than `newBatchThreshold`
  are still being processed. Back off (100 ms, doubling) while the queue is empty,
  never waiting longer than `maxPollingInterval`.
- Decode per `messageEncoding` (base64 or none) and pass a real
  `azure.functions.QueueMessage`.
- Success: delete. Failure: the message becomes visible again after
  `visibilityTimeout`; once it has been dequeued `maxDequeueCount` times it is copied,
  as the original text, to `<queue>-poison` (created if missing) and deleted. A message
  that cannot be decoded goes to the poison queue at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.functions.queue import QueueMessage as TriggerMessage

from tools.devhost.app import Function, QueueOptions, QueueTrigger
from tools.devhost.invoker import Invoker, Outcome

if TYPE_CHECKING:
    from azure.storage.queue import QueueMessage
    from azure.storage.queue.aio import QueueClient, QueueServiceClient

logger = logging.getLogger(__name__)

MIN_POLLING_INTERVAL = 0.1  # seconds, as the host's randomized backoff starts
RECEIVE_VISIBILITY = 600  # seconds a dequeued message stays hidden while it is processed


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


class QueueListener:
    """Polls one queue for one function until stopped."""

    def __init__(
        self,
        function: Function,
        service: QueueServiceClient,
        options: QueueOptions,
        invoker: Invoker,
    ) -> None:
        trigger = function.spec.trigger
        assert isinstance(trigger, QueueTrigger)
        self.function = function
        self.queue_name = trigger.queue_name
        self.options = options
        self._invoker = invoker
        self._queue: QueueClient = service.get_queue_client(trigger.queue_name)
        self._poison: QueueClient = service.get_queue_client(f"{trigger.queue_name}-poison")
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
        message = TriggerMessage(
            id=str(uuid.uuid4()),
            body=text.encode("utf-8"),
            dequeue_count=1,
            insertion_time=now,
            expiration_time=now + timedelta(days=7),
            time_next_visible=now,
            pop_receipt=None,
        )
        return await self._invoker.invoke(self.function, self._argument(message))

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
            messages_per_page=count, visibility_timeout=RECEIVE_VISIBILITY
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
        try:
            body = decode_body(text, self.options.message_encoding)
        except UndecodableMessage:
            logger.warning(
                "Message %s on queue '%s' is not valid %s; moving it to '%s'",
                message.id,
                self.queue_name,
                self.options.message_encoding,
                self._poison.queue_name,
            )
            await self._move_to_poison(message, text)
            return
        max_count = self.options.max_dequeue_count
        if message.dequeue_count > max_count:
            # Seen more often than allowed (e.g. the host stopped mid-invocation): give up.
            logger.warning(
                "Message %s was dequeued %d times; moving it to queue '%s'",
                message.id,
                message.dequeue_count,
                self._poison.queue_name,
            )
            await self._move_to_poison(message, text)
            return
        outcome = await self._invoker.invoke(self.function, self._argument(_trigger(message, body)))
        if outcome.succeeded:
            await self._delete(message)
        elif message.dequeue_count >= max_count:
            logger.warning(
                "Message %s has reached MaxDequeueCount of %d; moving it to queue '%s'",
                message.id,
                max_count,
                self._poison.queue_name,
            )
            await self._move_to_poison(message, text)
        else:
            await self._queue.update_message(
                message.id,
                pop_receipt=message.pop_receipt,
                visibility_timeout=round(self.options.visibility_timeout),
            )

    def _argument(self, message: TriggerMessage) -> Any:
        """The trigger value in the type `main` asks for (str, bytes or QueueMessage)."""
        annotation = self.function.trigger_annotation
        if annotation in (str, "str"):
            return message.get_body().decode("utf-8")
        if annotation in (bytes, "bytes"):
            return message.get_body()
        return message

    async def _move_to_poison(self, message: QueueMessage, text: str) -> None:
        """Copy the original text to `<queue>-poison` (creating it if needed), then delete."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            await self._poison.send_message(text)
        except ResourceNotFoundError:
            await self._poison.create_queue()
            await self._poison.send_message(text)
        await self._delete(message)

    async def _delete(self, message: QueueMessage) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        # Gone already (deleted elsewhere, or the queue was removed): nothing left to do.
        with contextlib.suppress(ResourceNotFoundError):
            await self._queue.delete_message(message.id, message.pop_receipt)

    async def _wait_for_room(self) -> None:
        while self._in_flight > self.options.new_batch_threshold and not self._stopping.is_set():
            self._room.clear()
            await self._room.wait()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


def _trigger(message: QueueMessage, body: bytes) -> TriggerMessage:
    return TriggerMessage(
        id=message.id,
        body=body,
        dequeue_count=message.dequeue_count,
        insertion_time=message.inserted_on,
        expiration_time=message.expires_on,
        time_next_visible=message.next_visible_on,
        pop_receipt=message.pop_receipt,
    )


def _log_storage_error(action: str, queue: str, exc: Exception) -> None:
    # Status and error code only: storage error text can echo request details.
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
        getattr(exc, "error_code", None),
    )
