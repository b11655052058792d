"""Clients of one container's blobs, by name: kept for reuse, a new one copied from a sibling.

The storage SDK's ``ContainerClient.get_blob_client`` builds each blob's client from
nothing: a pipeline around the container's transport and policies, then a generated REST
client whose constructor makes a configuration and a set of policies it never uses (it
is handed the pipeline) and a serializer over every model of the REST API. That is about
0.16 ms of CPU here, as much as the request the client then makes, paid for every new
blob name: a new conversation's reference and its user's index entry, every outcome of a
broadcast.

:func:`sibling` makes the client of another blob of the same container from one the SDK
built: the same pipeline, credentials, configuration and serializers, the blob's name and
URL its own. It leans on how this SDK version lays a blob client out (parts it does not
publish, as shared/listing.py does); where a client is not laid out as expected, or the
container's settings a blob client takes (credential, encryption, location mode) changed
since the template was built, the SDK builds the new one itself.
tests/unit/test_blob_clients.py compares a copy with the SDK's own client of the same
name, part by part, and sends requests through copies.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobClient, ContainerClient

# The generated REST client's operation groups: each holds the client's URL configuration.
_GROUPS = ("service", "container", "blob", "page_blob", "append_blob", "block_blob")
# All the generated client holds: anything more might keep the template's URL.
_REST_PARTS = frozenset({"_config", "_client", "_serialize", "_deserialize", *_GROUPS})
# What a blob client takes from its container when the SDK builds it: a template built
# before the container's were changed is not copied any more.
_FROM_CONTAINER = (
    "credential",
    "require_encryption",
    "encryption_version",
    "key_encryption_key",
    "key_resolver_function",
    "_location_mode",
)
# The first client the SDK built for each container, and the container's settings then:
# one for every BlobClients of that container (an engine, with its ledger, is made per
# queue message), dropped with the container's client.
_TEMPLATES: weakref.WeakKeyDictionary[Any, tuple[Any, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


class BlobClients:
    """The clients of one container's blobs: the last `size` names' are kept (the least
    recently used dropped first), all dropped when the container's client changes."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._clients: OrderedDict[str, BlobClient] = OrderedDict()
        self._container: ContainerClient | None = None  # the container they belong to

    def get(self, container: ContainerClient, name: str) -> BlobClient:
        if container is not self._container:
            self.clear()
            self._container = container
        blob = self._clients.get(name)
        if blob is not None:
            self._clients.move_to_end(name)
            return blob
        blob = self._clients[name] = client_of(container, name)
        if len(self._clients) > self._size:
            self._clients.popitem(last=False)
        return blob

    def clear(self) -> None:
        self._clients.clear()
        self._container = None


def client_of(container: ContainerClient, name: str) -> BlobClient:
    """A new client of blob `name`: a copy of the container's template when it can be
    one, else built by the SDK (and then the container's template)."""
    settings = tuple(getattr(container, part, None) for part in _FROM_CONTAINER)
    kept = _TEMPLATES.get(container)
    blob = sibling(kept[0], name) if kept is not None and kept[1] == settings else None
    if blob is None:
        blob = container.get_blob_client(name)
        _TEMPLATES[container] = (blob, settings)
    return blob


def sibling(template: BlobClient, name: str) -> BlobClient | None:
    """The client of blob `name` in `template`'s container, copied from `template` (None
    when `template` is not laid out as this module expects, or `name` is empty)."""
    if not name or not isinstance(name, str) or not _laid_out_as_expected(template):
        return None
    rest = template._client  # type: ignore[attr-defined]
    blob = copy.copy(template)
    blob.blob_name = name
    url = blob.url  # the SDK's own formatting of the blob's URL (its name quoted)
    config = copy.copy(rest._config)
    config.url = url
    pipeline_client = copy.copy(rest._client)
    pipeline_client._base_url = url
    new_rest = copy.copy(rest)
    new_rest._config = config
    new_rest._client = pipeline_client
    for group in _GROUPS:
        operations = copy.copy(getattr(rest, group))
        operations._config = config
        operations._client = pipeline_client
        setattr(new_rest, group, operations)
    blob._client = new_rest
    # A URL kept anywhere this module does not rewrite would still be the template's.
    return blob if blob.url != template.url or name == template.blob_name else None


def _laid_out_as_expected(template: Any) -> bool:
    """Whether every place the SDK keeps a blob client's URL is one this module rewrites:
    the generated client's configuration, its pipeline client's base URL and each
    operation group (which must share the client's configuration and pipeline client),
    the generated client holding nothing else. A snapshot or version client is never
    copied (its URL has a query of its own)."""
    try:
        rest = template._client
        config, pipeline_client = rest._config, rest._client
        groups = [getattr(rest, group) for group in _GROUPS]
        return (
            set(vars(rest)) == _REST_PARTS
            and getattr(template, "snapshot", None) is None
            and getattr(template, "version_id", None) is None
            and config.url == template.url == pipeline_client._base_url
            and all(g._config is config and g._client is pipeline_client for g in groups)
        )
    except AttributeError:
        return False
