"""The Bot Connector REST API v3 client, in three modules:

- :mod:`shared.connector.client`: :class:`ConnectorClient`, the 15 operations and the one
  request path (trust check, pacing, token, retries);
- :mod:`shared.connector.errors`: :class:`ConnectorError` and the classification of the
  Connector's answers, and the retry policy;
- :mod:`shared.connector.transport`: the HTTP session, when a request left, request bodies
  and URLs, bounded reads.

Which serviceUrls the bot's token may go to is :mod:`shared.serviceurl` (shared with the
settings check and inbound auth). The names below are re-exported so
``from shared.connector import ...`` keeps working.
The client's names load on first use: importing the error model (as the proactive engine
does) does not import aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.connector.errors import (
    GONE_403_CODES,
    MAX_RETRY_AFTER,
    NO_RETRY,
    RETRY_STATUSES,
    TEAMS_BLOCKED_ERROR_CODE,
    ConnectorError,
    ErrorKind,
    RetryPolicy,
    classify,
    error_from_response,
    parse_error_body,
    parse_retry_after,
)
from shared.serviceurl import TEAMS_HOSTS, TRUSTED_HOSTS, ServiceTarget, parse_service_url

if TYPE_CHECKING:
    from shared.connector.client import (
        DEFAULT_TIMEOUT,
        Clock,
        ConnectorClient,
        Sleep,
    )
    from shared.connector.transport import (
        MAX_ERROR_BODY_BYTES,
        MAX_REDIRECTS,
        MAX_RESPONSE_BYTES,
        Expect,
        departure_tracing,
    )

_LAZY = {
    "ConnectorClient": "shared.connector.client",
    "DEFAULT_TIMEOUT": "shared.connector.client",
    "MAX_REDIRECTS": "shared.connector.transport",
    "Sleep": "shared.connector.client",
    "Clock": "shared.connector.client",
    "Expect": "shared.connector.transport",
    "MAX_RESPONSE_BYTES": "shared.connector.transport",
    "MAX_ERROR_BODY_BYTES": "shared.connector.transport",
    "departure_tracing": "shared.connector.transport",
}

__all__ = [
    "DEFAULT_TIMEOUT",
    "GONE_403_CODES",
    "MAX_ERROR_BODY_BYTES",
    "MAX_REDIRECTS",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "NO_RETRY",
    "RETRY_STATUSES",
    "TEAMS_BLOCKED_ERROR_CODE",
    "TEAMS_HOSTS",
    "TRUSTED_HOSTS",
    "Clock",
    "ConnectorClient",
    "ConnectorError",
    "ErrorKind",
    "Expect",
    "RetryPolicy",
    "ServiceTarget",
    "Sleep",
    "classify",
    "departure_tracing",
    "error_from_response",
    "parse_error_body",
    "parse_retry_after",
    "parse_service_url",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shared.connector' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
