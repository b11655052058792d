"""MSAL without instance discovery, for peers whose SDK has no setting for it.

MSAL asks a Microsoft host whether an authority it does not know is real before it uses
it. botsim's fake AAD is on loopback and this machine reaches no Microsoft host, so the
peers that cannot turn the check off themselves get MSAL's own ``instance_discovery=False``
as the default (the same switch our bot and the Bot Framework SDK's VALIDATE_AUTHORITY
use for a non-Microsoft authority). Nothing else about their authentication changes.
"""

from __future__ import annotations

from typing import Any


def without_instance_discovery(msal: Any) -> None:
    original = msal.ConfidentialClientApplication.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("instance_discovery", False)
        original(self, *args, **kwargs)

    msal.ConfidentialClientApplication.__init__ = __init__
