"""The framework-neutral shape of an HTTP exchange.

Function folders convert `azure.functions.HttpRequest` to :class:`HttpRequest`, call
one function in `shared`, and convert the :class:`HttpResponse` back; tests and the
local host call the same function without any Functions runtime.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class HttpRequest:
    method: str
    headers: Mapping[str, str]  # keys lower-cased by :meth:`create`
    body: bytes = b""
    url: str = ""

    @classmethod
    def create(
        cls, method: str, headers: Mapping[str, str], body: bytes = b"", url: str = ""
    ) -> HttpRequest:
        return cls(method.upper(), {k.lower(): v for k, v in headers.items()}, body, url)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any) -> HttpResponse:
        return cls(
            status,
            json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
        )

    @classmethod
    def text(cls, status: int, message: str) -> HttpResponse:
        return cls(status, message.encode(), {"Content-Type": "text/plain; charset=utf-8"})
