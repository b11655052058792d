"""The shape of the URLs the bot is configured with and sends to: hosts, paths, loopback.

Both the settings check (shared.config) and the Connector client's strict serviceUrl
parse (shared.connector) judge URLs with these, so they cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import re

# A DNS name in lower case (urlsplit lower-cases hostnames): no trailing dot, no "_".
HOST_NAME = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
# The characters a URL path may have (RFC 3986 pchar and "/"), percent-encodings complete.
PATH_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str | None) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts allowed over plain http."""
    if not host:
        return False
    host = host.lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addressed_to_this_machine(host: str | None, origin: str | None) -> bool:
    """Whether a request came by this machine's own address: its `Host` header (port
    aside) localhost or an IP address, and its `Origin`, when a browser sent one, too. A
    web page whose DNS name was rebound to 127.0.0.1 is same-origin to itself and sends
    its own name in both: what trusts any caller on this machine refuses it so. A request
    with no Host (not from a browser) passes."""
    from yarl import URL

    def by_address(url: str) -> bool:
        try:
            parsed = URL(url)
        except ValueError:
            return False
        name = (parsed.host or "").lower()  # none for "null" (a sandboxed page's Origin)
        if parsed.user is not None or parsed.password is not None:
            return False
        return name == "localhost" or is_ip_address(name)

    if origin is not None and not by_address(origin):
        return False
    if host is None:
        return True
    # A Host header is an authority alone: a path, query or userinfo in it would move
    # the host a URL parser finds.
    return not any(c in host for c in "@/\\?# ") and by_address(f"http://{host}")


def has_dot_segment(path: str) -> bool:
    """True when a path has a "." or ".." segment, also one with path parameters: servers
    that strip ";..." from a segment (Tomcat and others) read ``..;x`` as ``..``."""
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))
