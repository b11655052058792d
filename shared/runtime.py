"""The per-process parts the messages endpoint works with, created once and reused.

Warm invocations reuse the authenticator's key cache, the Connector client's HTTP
session and token, and the reference store's client. Building a :class:`Runtime` does no
I/O and imports nothing heavy: each part connects (and imports its SDK) on first use.
The first request that passes the cheap checks calls :meth:`Runtime.prepare`, which
starts that first use in the background (see there).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.config import Settings, get_settings

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from shared.auth.inbound import InboundAuthenticator
    from shared.auth.tokens import MsalTokenProvider
    from shared.connector.client import ConnectorClient
    from shared.references.contract import ReferenceStore
    from shared.router import Router
    from shared.state import StateStore


@dataclass(slots=True)
class Runtime:
    settings: Settings
    authenticator: InboundAuthenticator
    connector: ConnectorClient
    references: ReferenceStore
    router: Router
    state: StateStore | None = None  # None: handlers that use state get a clear StateError
    tokens: MsalTokenProvider | None = None  # the Connector client's, to prefetch
    preload: tuple[str, ...] = ()  # modules every turn needs, imported by prepare()
    _prepared: bool = field(default=False, init=False, repr=False)

    @classmethod
    def create(cls, settings: Settings, router: Router) -> Runtime:
        """The production parts for `settings` (raises SettingsError for a bad setting)."""
        from shared.auth.inbound import InboundAuthenticator
        from shared.auth.tokens import create_token_provider
        from shared.connector.client import ConnectorClient
        from shared.references.blob import create_reference_store
        from shared.state_blob import create_state_store

        tokens = create_token_provider(settings)
        return cls(
            settings=settings,
            authenticator=InboundAuthenticator(settings),
            connector=ConnectorClient(settings, tokens),
            references=create_reference_store(settings),
            router=router,
            state=create_state_store(settings),
            tokens=tokens,
            preload=BLOB_STORE_MODULES,
        )

    def prepare(self) -> None:
        """Start in the background what the first turn will need anyway; once per runtime.

        Called by the messages endpoint for the first request that passed the cheap checks
        (before its token is checked). On a cold start the turn would otherwise import and
        connect one part after the other; started together, the bot's own token request
        and the storage SDK's import overlap the inbound token check (signing keys
        fetched over the network) instead of following it. Nothing here is sent on the
        request's behalf: the token is only cached (see MsalTokenProvider.prefetch, at
        most one request to Entra ID this way), and the imports have no side effect.
        """
        if self._prepared:
            return
        self._prepared = True
        if self.tokens is not None:
            self.tokens.prefetch()
        if self.preload:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, _import_quietly, self.preload)

    async def close(self) -> None:
        await self.authenticator.close()
        await self.connector.close()
        await self.references.close()
        if self.state is not None:
            await self.state.close()


# What the blob reference store imports on its first call (shared.storage): the SDK's
# import is most of a cold turn's CPU.
BLOB_STORE_MODULES = ("azure.storage.blob.aio", "azure.core.exceptions")


def _import_quietly(names: tuple[str, ...]) -> None:
    """Import ``names`` (in a worker thread); a failure is left for the real use to report."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # e.g. a package missing: its user raises properly
            logger.debug("preloading %s failed: %s", name, type(error).__name__)


_runtime: Runtime | None = None


def get_runtime(router: Router) -> Runtime:
    """The process's runtime for the app's bot: settings from the environment, the
    handlers of `router` (the app names the bot, see app.py; the library never does).

    Built on first use and reused; a process serves one bot, so a call with another
    router builds a runtime for that one. A failure (e.g. a SettingsError) is raised again
    at the next call rather than remembered, so fixing the app settings needs no redeploy.
    """
    global _runtime
    if _runtime is None or _runtime.router is not router:
        _runtime = Runtime.create(get_settings(), router)
    return _runtime


def reset_runtime() -> None:
    """Forget the process's runtime (tests and hosts that change the environment)."""
    global _runtime
    _runtime = None
