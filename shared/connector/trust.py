"""Which serviceUrls the bot's token may go to, decided on the URL alone.

A serviceUrl is parsed once, strictly (:func:`parse_service_url`); the request then goes
to exactly what was checked. Trusted: https on the Bot Framework and Teams hosts of the
configured cloud, and the ``BOT_TRUSTED_SERVICE_URLS`` prefixes (on whole path segments).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.urls import HOST_NAME, PATH_CHARS, has_dot_segment, is_ip_address, is_loopback_host

log = logging.getLogger("shared.connector")  # the package logs under one name

# Teams' Connector hosts: a request there is paced as Teams traffic even when its body
# does not say which channel it is for (a delete, a createConversation).
TEAMS_HOSTS = (
    "smba.trafficmanager.net",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
    "smba.infra.dod.teams.microsoft.us",
)

# Hosts the bot's token may be sent to (exact host or a subdomain of it), per cloud. GCC
# tenants use commercial Azure bots; GCC High and DoD bots live in Azure Government.
TRUSTED_HOSTS: dict[str, tuple[str, ...]] = {
    "public": (
        "botframework.com",
        "smba.trafficmanager.net",  # Teams, public cloud
        "smba.infra.gcc.teams.microsoft.com",  # Teams, GCC
    ),
    "usgov": (
        "botframework.us",
        "botframework.azure.us",
        "smba.infra.gov.teams.microsoft.us",  # Teams, GCC High
        "smba.infra.dod.teams.microsoft.us",  # Teams, DoD
    ),
}


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A serviceUrl that passed the strict parse: what is checked is what is called."""

    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int
    path: str  # percent-encoded as given, without a trailing slash ("" for the root)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


# Encoded "/", "\\", "." and NUL: servers that decode them could walk out of a path prefix.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[fFeE]|5[cC]|00)")


def parse_service_url(service_url: str) -> ServiceTarget | None:
    """The target of a well-formed absolute http(s) URL, else None.

    Strict on purpose: ASCII only (an IDN must come as punycode), no whitespace, control
    characters or backslashes, no userinfo, query or fragment, a plain DNS name or IP
    address (no trailing dot, no percent-encoding), a path without dot segments or
    encoded separators, and plain http only for loopback hosts.
    """
    if not isinstance(service_url, str) or not service_url.isascii():
        return None
    if any(c.isspace() or not c.isprintable() or c in "\\?#" for c in service_url):
        return None
    try:
        parts = urlsplit(service_url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("https", "http") or "@" in parts.netloc:  # https://trusted@evil
        return None
    if not (HOST_NAME.fullmatch(host) or is_ip_address(host)):
        return None
    if port is not None and not 0 < port < 65536:
        return None
    if scheme == "http" and not is_loopback_host(host):
        return None
    path = parts.path
    if not PATH_CHARS.fullmatch(path) or _ENCODED_SEPARATOR.search(path):
        return None
    if has_dot_segment(path):
        return None
    default = 443 if scheme == "https" else 80
    return ServiceTarget(scheme, host, port or default, path.rstrip("/"))


def trusted_prefixes(prefixes: Sequence[str]) -> tuple[ServiceTarget, ...]:
    """BOT_TRUSTED_SERVICE_URLS, parsed as strictly as the serviceUrls they must match."""
    parsed = []
    for prefix in prefixes:
        target = parse_service_url(prefix)
        if target is None:
            log.warning(
                "BOT_TRUSTED_SERVICE_URLS entry ignored (not a plain URL prefix): host=%s",
                host_for_log(prefix),
            )
            continue
        parsed.append(target)
    return tuple(parsed)


def host_in(host: str, trusted: tuple[str, ...]) -> bool:
    return any(host == name or host.endswith("." + name) for name in trusted)


def prefix_admits(prefix: ServiceTarget, target: ServiceTarget) -> bool:
    """A BOT_TRUSTED_SERVICE_URLS prefix: scheme, host and port exact, path on whole segments."""
    if (prefix.scheme, prefix.host, prefix.port) != (target.scheme, target.host, target.port):
        return False
    return (
        not prefix.path or target.path == prefix.path or target.path.startswith(prefix.path + "/")
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def host_for_log(service_url: str) -> str:
    try:
        host = urlsplit(service_url).hostname or "?"
    except (ValueError, TypeError, AttributeError):
        return "?"
    host = host.encode("ascii", "backslashreplace").decode("ascii")
    return _CONTROL.sub("?", host)[:100]
