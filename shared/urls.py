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


def has_dot_segment(path: str) -> bool:
    """True when a path has a "." or ".." segment, also one with path parameters: servers
    that strip ";..." from a segment (Tomcat and others) read ``..;x`` as ``..``."""
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))
