"""One trust store for every bot a benchmark runs: the system's CA certificates plus the
CA of botsim's HTTPS fake AAD, in one PEM file.

Every bot reaches the fake AAD over HTTPS, so it has to trust the fake's CA; it is given
the file as ``SSL_CERT_FILE`` (Python's ``ssl`` default contexts: aiohttp's, MSAL's
through requests when ``REQUESTS_CA_BUNDLE`` is unset) and ``REQUESTS_CA_BUNDLE``
(requests, hence MSAL). Pointing both at the fake's CA alone made every default TLS
context a bot built load one certificate instead of the whole system store (about 13 ms
against 31-34 ms per context on the benchmarks' machine), which took 80-100 ms off each
bot's cold start; with the system's certificates beside the fake's, a bot loads what it
would load where deployed, plus one.

The system's certificates are found as Python finds them (:func:`system_ca_file`).
"""

from __future__ import annotations

import ssl
from pathlib import Path

NAME = "trust.pem"


def system_ca_file() -> Path:
    """The CA file a default TLS context of this Python loads:
    ``ssl.get_default_verify_paths().cafile`` (``SSL_CERT_FILE`` when set, else OpenSSL's
    default file, when it exists); where there is none, certifi's bundle, what requests
    uses, when certifi is installed."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile:
        return Path(cafile)
    try:
        import certifi
    except ImportError:
        raise FileNotFoundError(
            "no CA file for a default TLS context (ssl.get_default_verify_paths()) and no"
            " certifi: set SSL_CERT_FILE to the system's CA bundle"
        ) from None
    return Path(certifi.where())


def bundle(extra_ca: str | Path, directory: str | Path) -> Path:
    """Write ``directory``/trust.pem, the system's CA certificates followed by
    ``extra_ca``'s (the fake AAD's), and return its path."""
    system = system_ca_file().read_bytes().rstrip(b"\n")
    path = Path(directory) / NAME
    path.write_bytes(system + b"\n" + Path(extra_ca).read_bytes())
    return path


def env(path: str | Path) -> dict[str, str]:
    """The settings that make a bot's process trust ``path`` (a :func:`bundle`)."""
    return {"SSL_CERT_FILE": str(path), "REQUESTS_CA_BUNDLE": str(path)}
