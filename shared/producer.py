"""The producer API and command: enqueue proactive requests, read their delivery reports.

    from shared.producer import enqueue, read_report
    request_id = await enqueue({"to": {"conversation": "msteams/19:…"}, "text": "Hi"})
    report = await read_report(request_id)  # None until the request is known

    python -m shared.producer send --conversation KEY | --user JSON | --broadcast [FILTER]
                                   (--text TEXT | --activity JSON) [--id ID]
    python -m shared.producer report ID
    python -m shared.producer conversations [FILTER_JSON]
    python -m shared.producer schedule put NAME --cron NCRONTAB (a target and a content,
                                   as for send) [--disabled]
    python -m shared.producer schedule list | delete NAME

Requests are validated by the same parser delivery uses, so a request this accepts is
one the engine can deliver. Storage comes from the same `AzureWebJobsStorage` forms the
app accepts (connection string, or identity-based: on an operator's machine azure-identity's
default credential chain, when no `__credential` is given). Settings are read from the
environment, then from `local.settings.json` `Values` in the working folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from shared.activity import is_unicode_text, refuse_constant
from shared.command_output import (
    StdoutFailed,
    drop_stdout,
    key_line,
    print_done,
    print_json,
    printable,
    writing_stdout,
)
from shared.config import (
    DEFAULT_QUEUE,
    DEFAULT_REFERENCES_CONTAINER,
    Settings,
    SettingsError,
    StorageSettings,
    proactive_queue_name,
    references_container_name,
)
from shared.diagnostics import clip
from shared.proactive_schema import POISON_REASON, RESERVED, InvalidRequest, parse_request
from shared.queues import (
    MAX_DELAY_SECONDS,
    MAX_REQUEST_BYTES,
    QueueError,
    StorageQueue,
    compact_json,
    request_size,
)
from shared.urls import is_loopback_host

LOCAL_SETTINGS = "local.settings.json"
STORAGE_SETTING = "AzureWebJobsStorage"


async def enqueue(
    request: Mapping[str, Any],
    *,
    settings: Settings | None = None,
    delay: float = 0.0,
    refuse_another_request: bool = True,
) -> str:
    """Validate `request`, give it an id when it has none, record it pending, enqueue it.

    ``delay`` (seconds, up to about 7 days: the queue's visibility limit) holds the message
    back that long before any instance sees it; delivery and its guarantees are the same.

    Recording it (the report's head) needs blob write access; a producer with read access
    only (as the infra grants) enqueues all the same, and the report appears when the
    first delivery attempt starts.

    An id the report's head already holds for another request (other targets or
    content, or a broadcast for a single request) is refused: the queue would send only
    the one whose message comes first. ``refuse_another_request=False`` enqueues it all
    the same (a handler run again with another text for the same id: the first wins).

    Returns the request id. Raises InvalidRequest (short reason; nothing enqueued).
    """
    from shared.fanout import SAME_REQUEST, request_digest, same_request
    from shared.ledger import BlobLedger
    from shared.references.contract import StoreError
    from shared.reports import create_own_head, head_name

    settings = settings or producer_settings()
    if not isinstance(request, Mapping):
        raise InvalidRequest("the request must be an object")
    for own in (RESERVED, POISON_REASON):
        # A request sent again under its id is delivered once; with a poison copy's reason
        # it would be an operator's retry, and a failure that may have been posted (a 500)
        # would be sent again.
        if own in request:
            raise InvalidRequest(f"`{own}` is the engine's own field")
    if (
        not isinstance(delay, int | float)
        or isinstance(delay, bool)
        or not 0 <= delay <= MAX_DELAY_SECONDS
    ):
        raise InvalidRequest(f"the delay must be between 0 and {MAX_DELAY_SECONDS} seconds")
    message = dict(request)
    if message.get("id") is None:
        message["id"] = str(uuid.uuid4())
    text = request_text(message)
    parsed = parse_request(text)
    kind = "broadcast" if parsed.broadcast is not None else "single"
    queue = StorageQueue(settings)
    queue.check()  # settings that reach blobs but not queues: refused before a head is written
    ledger = BlobLedger(settings)
    head = None
    same = same_request(parsed)
    fields = {"digest": request_digest(parsed), SAME_REQUEST: same}
    try:
        head = await create_own_head(ledger, parsed.id, kind, time.time(), fields=fields)
    except StoreError as error:
        if error.status != 403:
            raise
        # A producer allowed to enqueue and read reports, not to write blobs (the role the
        # infra grants): the report appears with the first delivery attempt instead.
    if head is None and refuse_another_request:
        await _refuse_another_request(ledger, parsed.id, kind, same)
    try:
        await queue.put(text, delay=delay)
    except Exception as error:
        # Refused, so not queued: the head this call wrote would say `pending` for ever, so
        # it goes (unless it changed meanwhile). A put whose answer was lost may have landed
        # and be in an instance's hands already, which reads the head: that one stays.
        if head is not None and _refused(error):
            with contextlib.suppress(StoreError):
                await ledger.delete(head_name(parsed.id), head)
        raise
    return parsed.id


async def _refuse_another_request(ledger: Any, request_id: str, kind: str, same: str) -> None:
    """InvalidRequest when the head of `request_id` is another request's: another kind,
    or other targets or content (a head the engine or an earlier version wrote keeps no
    SAME_REQUEST: only its kind can be told). Read with the producer's read-only role too."""
    from shared.fanout import SAME_REQUEST
    from shared.references.contract import StoreError
    from shared.reports import head_name

    try:
        record = await ledger.read(head_name(request_id))
    except StoreError:
        return  # unreadable, or storage failing: sent as before the check
    head = record.data if record is not None else None
    if not isinstance(head, dict):
        return
    if head.get("kind") not in (None, kind) or head.get(SAME_REQUEST) not in (None, same):
        raise InvalidRequest(
            f"the id {clip(request_id)} is already another request's (its first request "
            "had other targets or content; `report` shows how it went): send this one with "
            "another id"
        )


def _refused(error: BaseException) -> bool:
    """Whether a queue put surely did not land: the service answered it with a refusal
    (4xx, which the storage client does not retry), or it was refused before it was sent.
    A 5xx, a timeout or a dropped connection may have landed, on that attempt or an
    earlier one the client retried (it raises only the last attempt's error; a connection
    error there says nothing of the attempts before it)."""
    if isinstance(error, QueueError) and error.status is not None:
        return 400 <= error.status < 500 and error.status not in (408, 429)
    return isinstance(error, ValueError)


def request_text(message: Mapping[str, Any]) -> str:
    """The request as it is queued (compact JSON); InvalidRequest when it is too large.

    The engine adds its bookkeeping to copies it requeues (and the poison queue a reason),
    so a request may use at most MAX_REQUEST_BYTES of a queue message.
    """
    try:
        text = compact_json(message, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        # A value JSON has no form for (NaN, Infinity, an object of another type, a cycle)
        # or nesting deeper than the parser's stack: refused here, not by every target.
        raise InvalidRequest(
            "the request is not JSON: objects, arrays, strings, finite numbers (no NaN or "
            "Infinity), true, false and null only"
        ) from None
    if request_size(message) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"the request is larger than {MAX_REQUEST_BYTES} bytes as JSON")
    return text


async def read_report(request_id: str, *, settings: Settings | None = None) -> dict | None:
    """The request's delivery report (docs/proactive.md), or None when none exists."""
    from shared.ledger import BlobLedger
    from shared.reports import read_report as read

    return await read(BlobLedger(settings or producer_settings()), request_id)


async def close() -> None:
    """Close the storage clients :func:`enqueue` and :func:`read_report` share across calls
    (a script calls it before its event loop ends; the next call opens new ones)."""
    from shared.storage import close_shared_clients

    await close_shared_clients()


def producer_settings(env: Mapping[str, str] | None = None, folder: Path | None = None) -> Settings:
    """What a producer needs: storage, container and queue, from the environment first,
    then `local.settings.json` Values. A producer needs no bot credentials.

    Storage is taken whole from one place: an environment that sets any form of
    `AzureWebJobsStorage` (an operator's identity-based URIs, say) replaces the file's
    (the connection string of the local Azurite that `make run` writes), never mixes with it.
    A blank one in the environment is no setting: it neither replaces nor blanks the file's.
    """
    environment = {
        name: value
        for name, value in (os.environ if env is None else env).items()
        if value.strip() or not _is_storage_setting(name)
    }
    merged = dict(_local_values(folder or Path.cwd()))
    if any(_is_storage_setting(name) for name in environment):
        merged = {name: value for name, value in merged.items() if not _is_storage_setting(name)}
    merged.update(environment)

    def get(name: str, default: str) -> str:
        return merged.get(name, "").strip() or default

    return Settings(
        storage=StorageSettings.from_env(merged),
        references_container=references_container_name(
            get("BOT_REFERENCES_CONTAINER", DEFAULT_REFERENCES_CONTAINER)
        ),
        proactive_queue=proactive_queue_name(get("BOT_PROACTIVE_QUEUE", DEFAULT_QUEUE)),
        allow_unauthenticated=True,  # unused: a producer sends nothing to a Connector
    )


def _is_storage_setting(name: str) -> bool:
    return name == STORAGE_SETTING or name.startswith(f"{STORAGE_SETTING}__")


def _local_values(folder: Path) -> dict[str, str]:
    path = folder / LOCAL_SETTINGS
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        raise SettingsError(LOCAL_SETTINGS, "is not readable JSON") from None
    values = document.get("Values") if isinstance(document, dict) else None
    if not isinstance(values, dict):
        return {}
    return {str(k): str(v) for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------- command


class UsageError(Exception):
    """A command-line argument is not usable; the message says which."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared.producer",
        description="Send proactive messages through the bot's queue; read their reports.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="enqueue a request; prints its id")
    _request_arguments(send)
    send.add_argument("--id", help="the request id (default: a new uuid)")
    report = commands.add_parser("report", help="print a request's delivery report")
    report.add_argument("id")
    conversations = commands.add_parser("conversations", help="list stored conversation keys")
    conversations.add_argument("filter", nargs="?", default="{}", metavar="FILTER_JSON")
    schedule = commands.add_parser("schedule", help="write, list or delete timed sends")
    actions = schedule.add_subparsers(dest="action", required=True)
    put = actions.add_parser(
        "put", help="write a schedule, replacing one of that name; prints its name"
    )
    put.add_argument("name")
    put.add_argument(
        "--cron", required=True, metavar="NCRONTAB", help='6 fields, UTC: "0 0 9 * * 1-5"'
    )
    _request_arguments(put)
    put.add_argument("--disabled", action="store_true", help="written, not run until enabled")
    actions.add_parser("list", help="print each schedule, or why it is skipped, as a JSON line")
    delete = actions.add_parser("delete", help="delete a schedule, or a listed blob")
    delete.add_argument("name", help="a schedule's name, or a `blob` that list shows")
    return parser


def _request_arguments(command: argparse.ArgumentParser) -> None:
    """A request's target and content (send, schedule put)."""
    target = command.add_mutually_exclusive_group(required=True)
    target.add_argument("--conversation", metavar="KEY", help="a stored conversation key")
    target.add_argument("--user", metavar="JSON", help='{"channelId","id","tenantId","serviceUrl"}')
    target.add_argument(
        "--broadcast", metavar="FILTER_JSON", nargs="?", const="{}", help="every match"
    )
    content = command.add_mutually_exclusive_group(required=True)
    content.add_argument("--text", help="the message text")
    content.add_argument("--activity", metavar="JSON", help="an activity object")


def _json_arg(name: str, text: str) -> Any:
    _text_arg(name, text)
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise UsageError(f"{name} is not valid JSON") from None


def _text_arg(name: str, text: str) -> str:
    """`text` when it is Unicode text; bytes the terminal's encoding could not decode come
    in as lone surrogates, which would be sent as such (UsageError)."""
    if not is_unicode_text(text):
        raise UsageError(f"{name} is not text in the terminal's encoding (UTF-8?)")
    return text


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.conversation is not None:
        to: dict[str, Any] = {"conversation": args.conversation}
    elif args.user is not None:
        to = {"user": _json_arg("--user", args.user)}
    else:
        to = {"broadcast": _json_arg("--broadcast", args.broadcast)}
    request: dict[str, Any] = {"to": to}
    if args.text is not None:
        request["text"] = _text_arg("--text", args.text)
    else:
        request["activity"] = _json_arg("--activity", args.activity)
    if getattr(args, "id", None) is not None:
        request["id"] = args.id
    return request


async def _conversations(settings: Settings, filters: Any) -> list[str]:
    from shared.proactive_schema import parse_broadcast
    from shared.references.blob import BlobReferenceStore

    wanted = parse_broadcast(filters)
    store = BlobReferenceStore(settings, cache_size=0)
    keys: list[str] = []
    continuation = None
    try:
        while True:
            page = await store.list(
                channel_id=wanted.channel_id,
                tenant_id=wanted.tenant_id,
                team_id=wanted.team_id,
                continuation=continuation,
                page_size=1000,
            )
            keys += [
                item.key
                for item in page.items
                if wanted.personal is None or item.personal == wanted.personal
            ]
            continuation = page.continuation
            if continuation is None:
                return keys
    finally:
        await store.close()


async def run(argv: Sequence[str] | None = None) -> int:
    from shared.references.contract import StoreError

    args = _parser().parse_args(argv)
    _quiet_library_logs()
    settings: Settings | None = None
    try:
        settings = producer_settings()
        if args.command == "send":
            request = build_request(args)
            request.setdefault("id", str(uuid.uuid4()))  # chosen here: an error can name it
            try:
                shown = printable(await enqueue(request, settings=settings))
                # Escaped where stdout cannot encode it: the put has landed, say so.
                print_done(shown, f"request {shown!r} was queued")
            except QueueError as error:
                if _refused(error):
                    raise
                # Its put may have landed: a second `send` would be a new request.
                raise QueueError(
                    f"{error}; request {request['id']!r} may have been queued: see "
                    f"`report -- {shlex.quote(request['id'])}` for it, and to try again send "
                    f"it with {_id_option(request['id'])}"
                ) from None
            except StoreError as error:
                # Its report's head failed, so nothing was queued; but a create whose
                # answers were lost may have landed, and its report reads `pending` until
                # the same id is sent again (the head is kept, the request queued).
                raise StoreError(
                    f"{str(error).rstrip()}; request {request['id']!r} was not queued: to "
                    f"try again send it with {_id_option(request['id'])}",
                    status=error.status,
                ) from None
        elif args.command == "schedule":
            return await _schedule(settings, args)
        elif args.command == "report":
            report = await read_report(args.id, settings=settings)
            if report is None:
                print(f"no report for {args.id!r} (yet)", file=sys.stderr)
                return 1
            with writing_stdout():
                print_json(report)
                sys.stdout.flush()
        else:
            keys = await _conversations(settings, _json_arg("FILTER_JSON", args.filter))
            with writing_stdout():
                for key in keys:
                    # One line each: a key's own line breaks (a client chose the id) escaped.
                    print(printable(key_line(key)))
                sys.stdout.flush()
        return 0
    except (UsageError, InvalidRequest, SettingsError, StoreError, QueueError) as error:
        print(f"error: {error}{_unreachable_hint(error, settings)}", file=sys.stderr)
        return 1
    except StdoutFailed as failed:
        drop_stdout()
        if isinstance(failed.error, BrokenPipeError):
            if args.command == "conversations" or getattr(args, "action", None) == "list":
                return 0  # the reader stopped reading (`| head`): it has whole lines
            print("error: stdout was closed before the output was written", file=sys.stderr)
        else:
            name = errno.errorcode.get(failed.error.errno or 0, type(failed.error).__name__)
            print(f"error: stdout could not be written ({name})", file=sys.stderr)
        return 1
    except Exception as error:
        if sys.stdout is None:  # no stdout to write to: storage was not the trouble
            drop_stdout()
            print("error: stdout was closed before the output was written", file=sys.stderr)
            return 1
        print(f"error: could not reach storage ({type(error).__name__})", file=sys.stderr)
        return 1
    finally:
        await close()


UNREACHABLE = "storage unreachable"  # the stores' and the queue's word for no answer
StorageService = Literal["blob", "queue"]


def _unreachable_hint(error: BaseException, settings: Settings | None) -> str:
    """For storage that did not answer: the endpoint tried (host and port only, never a key
    or a SAS) and, for one on this machine, what starts it."""
    if settings is None or UNREACHABLE not in str(error):
        return ""
    service: StorageService = "queue" if isinstance(error, QueueError) else "blob"
    host, port = storage_endpoint(settings.storage, service)
    if not host:
        return ""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    local = "; locally, `make run` starts it" if is_loopback_host(host) else ""
    return f" (tried {service} storage at {shown}{local})"


def storage_endpoint(
    storage: StorageSettings, service: Literal["blob", "queue"]
) -> tuple[str, int]:
    """The host and port the storage client of `service` reaches (("", 0) when unknown), as
    the storage SDK reads the settings (`UseDevelopmentStorage=true`: Azurite's ports)."""
    try:
        if storage.connection_string:
            if service == "blob":
                from azure.storage.blob import BlobServiceClient as Client
            else:
                from azure.storage.queue import QueueServiceClient as Client
            url = Client.from_connection_string(storage.connection_string).url
        else:
            url = storage.service_uri(service)
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except Exception:  # a setting the client would refuse: it was not reached for that
        return "", 0
    return host, port or (443 if parts.scheme == "https" else 80)


async def _schedule(settings: Settings, args: argparse.Namespace) -> int:
    from shared.ledger import BlobLedger, iso
    from shared.schedules import read_schedules, remove_schedule, write_schedule

    ledger = BlobLedger(settings)
    if args.action == "put":
        document = {
            "schedule": args.cron,
            "request": build_request(args),
            "enabled": not args.disabled,
        }
        await write_schedule(ledger, args.name, document)
        print_done(args.name, f"schedule {args.name!r} was written")
    elif args.action == "list":
        async for found in read_schedules(ledger):
            line: dict[str, Any] = {"name": found.name, "blob": found.blob}
            if found.schedule is None:
                line["problem"] = found.problem
            else:
                line |= {
                    "schedule": found.schedule.expression,
                    "enabled": found.schedule.enabled,
                    "request": found.schedule.request,
                    "updatedAt": iso(found.modified),
                }
            with writing_stdout():
                print_json(line)
        with writing_stdout():
            sys.stdout.flush()
    elif not await remove_schedule(ledger, args.name):
        print(f"error: no schedule named {args.name!r}", file=sys.stderr)
        return 1
    return 0


def _id_option(request_id: str) -> str:
    """The option that sends `request_id` again, as a shell reads it: quoted, and joined by
    `=` (an id starting with `-` is not taken for an option)."""
    return f"--id={shlex.quote(request_id)}"


def _quiet_library_logs() -> None:
    """Keep the Azure SDK's log records off the command's stderr, which carries the
    command's own one-line error and nothing else.

    Without a usable identity, azure-identity writes a dozen lines (every credential it
    tried, and where to read about each) each time a token is asked for, and the storage
    SDK asks on every retry; a storage answer it cannot parse (a 500 with no body) comes
    with a traceback. The command says what failed itself, naming the setting to check.
    """
    logging.getLogger("azure").setLevel(logging.CRITICAL + 1)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(argv))


if __name__ == "__main__":
    sys.exit(main())
