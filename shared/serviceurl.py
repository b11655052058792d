"""Where the bot's token may go: the one serviceUrl trust module.

Used by the settings check (``BOT_TRUSTED_SERVICE_URLS``, :func:`service_url_problem`),
by inbound authentication (the ``serviceurl`` claim must name the activity's serviceUrl;
an Emulator token, which has no such claim, still needs a well-formed one) and by the
Connector client (:class:`TrustPolicy`), so all three judge a URL by the same parse.

A serviceUrl is parsed once, strictly (:func:`parse_service_url`), and a request goes to
exactly what was checked. Trusted: https on the Bot Framework and Teams hosts of the
configured cloud, and the ``BOT_TRUSTED_SERVICE_URLS`` prefixes (scheme, host and port
exact, the path on whole segments); with ``BOT_ALLOW_UNAUTHENTICATED`` only loopback hosts.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.urls import HOST_NAME, PATH_CHARS, has_dot_segment, is_ip_address, is_loopback_host

log = logging.getLogger("shared.connector")  # as before: these lines are the client's

# Teams' Connector hosts: a request there is paced as Teams traffic even when its body
# does not say which channel it is for (a delete, a createConversation).
TEAMS_HOSTS = (
    "smba.trafficmanager.net",
    "smba.onyx.prod.teams.trafficmanager.net",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
    "smba.infra.dod.teams.microsoft.us",
)

# Hosts the bot's token may be sent to, per cloud: `*.domain` any subdomain of a domain
# Microsoft holds, anything else that host exactly. Teams' hosts are exact: the region is
# in the path (/amer/), and trafficmanager.net is Azure Traffic Manager's shared zone,
# where a customer's profile may take a name under smba.trafficmanager.net. GCC tenants
# use commercial Azure bots; GCC High and DoD bots live in Azure Government.
TRUSTED_HOSTS: dict[str, tuple[str, ...]] = {
    "public": (
        "*.botframework.com",
        "smba.trafficmanager.net",  # Teams, public cloud
        "smba.onyx.prod.teams.trafficmanager.net",  # Teams, public cloud
        "smba.infra.gcc.teams.microsoft.com",  # Teams, GCC
    ),
    "usgov": (
        "*.botframework.us",
        "*.botframework.azure.us",
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


def parse_service_url(service_url: object) -> ServiceTarget | None:
    """The target of a well-formed absolute http(s) URL, else None.

    Strict on purpose: ASCII only (an IDN must come as punycode), no whitespace, control
    characters or backslashes, no userinfo, query or fragment, a plain DNS name or IP
    address (no trailing dot, no percent-encoding), a path without dot segments or
    encoded separators, and plain http only for loopback hosts.
    """
    if type(service_url) is str and len(service_url) <= _CACHED_LENGTH:
        parsed = _parse_remembered(service_url)
    else:
        parsed = _parse(service_url)
    return parsed if isinstance(parsed, ServiceTarget) else None


def prefix_problem(prefix: str) -> str:
    """Why a ``BOT_TRUSTED_SERVICE_URLS`` entry is unusable ("" when the Connector client
    can use it), worded for a settings error: it never repeats the value. Anything the
    client's own parse refuses is a problem, encoded separators included: the client
    would trust nothing under such a prefix, so the app must not start as if it did.
    """
    parsed = _parse(prefix)
    return "" if isinstance(parsed, ServiceTarget) else parsed


def _parse(url: object) -> ServiceTarget | str:
    if not isinstance(url, str) or not url.isascii():
        return "must be one ASCII URL (separate entries with commas; punycode for IDNs)"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must be one ASCII URL (separate entries with commas; punycode for IDNs)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "has an invalid port or host"
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("https", "http") or not host:
        return "must be an absolute https URL"
    if "@" in parts.netloc or any(c in "\\?#" for c in url):  # https://trusted@evil
        return "must be a plain URL prefix (no user, query or fragment)"
    if scheme == "http" and not is_loopback_host(host):
        return "must be https (plain http only for loopback hosts)"
    if not (HOST_NAME.fullmatch(host) or is_ip_address(host)):
        return "has an invalid host name"
    if (port is not None and not 0 < port < 65536) or parts.netloc.endswith(":"):
        return "has an invalid port"
    path = parts.path
    if _ENCODED_SEPARATOR.search(path):
        return "has encoded separators (%2F, %2E, %5C or %00) in its path"
    if not PATH_CHARS.fullmatch(path) or has_dot_segment(path):
        return "has a path with dot segments or characters a URL path cannot have"
    default = 443 if scheme == "https" else 80
    return ServiceTarget(scheme, host, port or default, path.rstrip("/"))


# A turn parses its serviceUrl three times (the token's claim, the activity's, the reply's
# target) and a process meets a handful of them: the last few hundred parses are kept.
# Entries are short strings and frozen results; longer input is parsed every time.
_CACHED_LENGTH = 256
_parse_remembered = functools.lru_cache(maxsize=512)(_parse)


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """The serviceUrls the bot's token may be sent to, for one app's settings."""

    hosts: tuple[str, ...]  # https on port 443, as host_in reads them
    prefixes: tuple[ServiceTarget, ...]  # BOT_TRUSTED_SERVICE_URLS
    loopback_only: bool = False  # BOT_ALLOW_UNAUTHENTICATED: nothing but this machine

    @classmethod
    def configured(
        cls, channel_service: str, trusted_service_urls: Sequence[str], *, loopback_only: bool
    ) -> TrustPolicy:
        """From the settings: the cloud's hosts, BOT_TRUSTED_SERVICE_URLS, and whether the
        bot runs unauthenticated (BOT_ALLOW_UNAUTHENTICATED)."""
        return cls(
            TRUSTED_HOSTS[channel_service], trusted_prefixes(trusted_service_urls), loopback_only
        )

    def target(self, service_url: str) -> ServiceTarget | None:
        """Where a request for `service_url` goes, or None when the token may not go there."""
        target = parse_service_url(service_url)
        if target is None:
            return None
        if self.loopback_only:
            # Local, unauthenticated mode: only loopback Connectors (botsim) are reachable.
            return target if is_loopback_host(target.host) else None
        if target.scheme == "https" and target.port == 443 and host_in(target.host, self.hosts):
            return target
        if any(prefix_admits(prefix, target) for prefix in self.prefixes):
            return target
        return None


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
    """Whether `host` is one of `trusted`: a name exactly, or under a `*.domain`."""
    return any(
        host.endswith(name[1:]) if name.startswith("*.") else host == name for name in trusted
    )


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
