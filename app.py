"""The app: which bot the function adapters serve. The library never names it.

The HTTP and queue function folders get the process's runtime here, the same way, and
hand it to the library (`shared.messages`, `shared.proactive`); the timer
(`shared.schedules`) needs only the storage settings and does not import this module.
To serve another bot, change the one import below; for the example bot beside the echo:

    from examples.cards_and_state import router

(the example lives in `examples/`, which `.funcignore` keeps out of the deployed zip;
take `examples` out of `.funcignore` to deploy it).
"""

from __future__ import annotations

from shared.bot import router
from shared.runtime import Runtime, get_runtime


def runtime() -> Runtime:
    """The process's runtime for this app's bot: built on first use (no I/O), then reused.

    Raises SettingsError when the app settings do not validate; the library's entry points
    call this themselves so that becomes a clean answer rather than a crash.
    """
    return get_runtime(router)
