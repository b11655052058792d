"""The per-process parts the messages endpoint works with, created once and reused.

Warm invocations reuse the authenticator's key cache, the Connector client's HTTP
session and token, and the reference store's client. Building a :class:`Runtime` does no
I/O and imports nothing heavy: each part connects (and imports its SDK) on first use.
The first request that passes the cheap checks calls :meth:`Runtime.prepare`, which
starts the bot's token acquisition in the background (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.config import Settings, get_settings

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
        )

    def prepare(self) -> None:
        """Start the bot's token acquisition in the background; once per runtime.

        Called by the messages endpoint for the first request that passed the cheap checks,
        before its token is checked. On a cold start the turn would otherwise check the
        inbound token (signing keys fetched over the network) and only then import MSAL
        and ask Entra ID (two more round trips); started together, they overlap. Nothing
        is sent on the request's behalf: the token is only cached, and this asks Entra ID
        at most once per process (see MsalTokenProvider.prefetch). The storage SDK is not
        preloaded here: its import is CPU work that would compete with the reply.
        """
        if self._prepared:
            return
        self._prepared = True
        if self.tokens is not None:
            self.tokens.prefetch()

    async def close(self) -> None:
        await self.authenticator.close()
        await self.connector.close()
        await self.references.close()
        if self.state is not None:
            await self.state.close()


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
