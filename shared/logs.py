"""What the app logs in production, decided here rather than left to the host.

The Python worker forwards every record at INFO and above to the Functions host (DEBUG
too with the app setting `PYTHON_ENABLE_DEBUG_LOGGING=1`). At INFO the Azure SDK logs
every storage request and response with its headers, and MSAL every token step: noise and
ingestion cost, nothing an operator of the bot acts on (failures surface through the
app's own log lines). So the Azure SDK logs warnings and errors only, wherever the app
runs, and MSAL nothing: its error lines quote the token endpoint's answer as it came
(a proxy's page may echo the request's form, client secret or assertion included), and
the app reports every failed token request itself, without that text. The app's own
loggers log one line per anomaly at INFO and above, and the detail of
each activity at DEBUG.
"""

from __future__ import annotations

import logging

QUIET_LIBRARIES = ("azure",)  # "azure" covers azure.core's HTTP logging policy
SILENT_LIBRARIES = ("msal",)


def quiet_libraries() -> None:
    """Hold the Azure SDK's loggers at WARNING and MSAL's above CRITICAL."""
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
