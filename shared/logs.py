"""What the app logs in production, decided here rather than left to the host.

The Python worker forwards every record at INFO and above to the Functions host (DEBUG
too with the app setting `PYTHON_ENABLE_DEBUG_LOGGING=1`). At INFO the Azure SDK logs
every storage request and response with its headers, and MSAL every token step: noise and
ingestion cost, nothing an operator of the bot acts on (failures surface through the
app's own log lines). So those libraries log warnings and errors only, wherever the app
runs. The app's own loggers log one line per anomaly at INFO and above, and the detail of
each activity at DEBUG.
"""

from __future__ import annotations

import logging

QUIET_LIBRARIES = ("azure", "msal")  # "azure" covers azure.core's HTTP logging policy


def quiet_libraries() -> None:
    """Hold the Azure SDK and MSAL loggers at WARNING."""
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
