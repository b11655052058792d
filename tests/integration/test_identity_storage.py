"""Identity-based storage, end to end: a managed identity's token, accepted by Azurite.

The settings are those of an Azure deployment without a connection string
(``AzureWebJobsStorage__blobServiceUri`` / ``__queueServiceUri``,
``__credential=managedidentity``, ``__clientId``): shared/storage.py gives the clients
azure-identity's ManagedIdentityCredential, which asks the App Service managed identity
endpoint (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``) for a storage token. Azurite runs
here with a throwaway CA's certificate and ``--oauth basic``: it accepts a bearer token
whose issuer, audience and lifetime are right (it does not check the signature) and
rejects any other.

Why each scenario runs in a child process: the async clients use aiohttp, which builds its
default TLS context, and so reads ``SSL_CERT_FILE``, once, when it is imported. The only way
for the product code to trust the test CA without changing it or patching aiohttp is the
way a host does it: ``SSL_CERT_FILE`` set before the process starts. So each scenario runs
this module (``python -m``) in a fresh interpreter that prints what it saw as JSON; the
test checks that, what reached Azurite (read back with the account key) and what the
managed identity endpoint was asked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.config import Settings
from shared.references import BlobReferenceStore, StoreError
from shared.storage import close_client, create_queue_service
from tests.fixtures.storage import FAST_STORAGE
from tools.azurite import Azurite
from tools.botsim.aad import FakeManagedIdentity
from tools.botsim.server import BackgroundServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.test_identity_storage"
CLIENT_ID = "6f1c2a9e-0b7d-4c1e-9a55-3d2f8e7b1c04"  # the bot's user-assigned identity
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
STORAGE_RESOURCE = "https://storage.azure.com"
# Anything in the parent's environment that would make azure-identity pick another source.
_IDENTITY_ENV_PREFIXES = ("IDENTITY_", "MSI_", "IMDS_", "AZURE_", "AzureWebJobs")

GROUP = {
    "channelId": "msteams",
    "serviceUrl": "https://smba.trafficmanager.net/amer/",
    "conversation": {
        "id": "19:general@thread.tacv2",
        "conversationType": "channel",
        "isGroup": True,
        "tenantId": TENANT,
    },
    "bot": {"id": "28:bot", "name": "bot"},
}
PERSONAL = {
    "channelId": "msteams",
    "serviceUrl": "https://smba.trafficmanager.net/amer/",
    "conversation": {"id": "a:1on1-chat", "conversationType": "personal", "tenantId": TENANT},
    "user": {"id": "29:user", "aadObjectId": "0d6c8f0e-user-aad"},
    "bot": {"id": "28:bot", "name": "bot"},
}
GROUP_KEY = "msteams/19:general@thread.tacv2"
PERSONAL_KEY = "msteams/a:1on1-chat"


# ---------------------------------------------------------------------------- local services


@dataclass(frozen=True, slots=True)
class Tls:
    ca_path: str
    cert_path: str
    key_path: str


class JwtManagedIdentity:
    """The App Service managed identity endpoint (api-version 2019-08-01), minting JWTs.

    botsim's FakeManagedIdentity cannot serve here: its tokens are opaque strings, with no
    way to script them, and Azurite's basic OAuth decodes the bearer token as a JWT and
    checks its issuer, audience, iat, nbf and exp. So this one speaks the same protocol and
    signs its tokens with a throwaway RSA key (Azurite does not check signatures).
    """

    def __init__(self, *, client_ids: tuple[str, ...], lifetime: int = 3600) -> None:
        self.secret = secrets.token_hex(16)
        self.client_ids = set(client_ids)
        self.lifetime = lifetime
        self.requests: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_get("/msi/token", self._token)
        self.server = BackgroundServer(app)

    @property
    def endpoint(self) -> str:
        return f"{self.server.url}/msi/token"

    async def _token(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        header_ok = request.headers.get("X-IDENTITY-HEADER") == self.secret
        with self._lock:
            self.requests.append({"query": query, "header_ok": header_ok})
        if not header_ok:
            return web.json_response({"statusCode": 401, "message": "Unauthorized"}, status=401)
        client_id = query.get("client_id", "")
        if query.get("api-version") != "2019-08-01" or client_id not in self.client_ids:
            return web.json_response(
                {"statusCode": 400, "message": "No managed identity with this client_id"},
                status=400,
            )
        now = int(time.time())
        claims = {
            "aud": query.get("resource", ""),
            "iss": f"https://sts.windows.net/{TENANT}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "appid": client_id,
            "oid": client_id,
            "sub": client_id,
            "tid": TENANT,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256")
        with self._lock:
            self.tokens.append(token)
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(now + self.lifetime),
                "resource": query.get("resource", ""),
                "token_type": "Bearer",
                "client_id": client_id,
            }
        )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA and Azurite's certificate for 127.0.0.1 / localhost."""
    directory = tmp_path_factory.mktemp("azurite-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = Tls(
        str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "key.pem")
    )
    ca.cert_pem.write_to_path(paths.ca_path)
    server.cert_chain_pems[0].write_to_path(paths.cert_path)
    server.private_key_pem.write_to_path(paths.key_path)
    return paths


@pytest.fixture(scope="module")
def oauth_azurite(tls: Tls):
    """Azurite over HTTPS accepting bearer tokens (and the account key, used to check)."""
    with Azurite(cert_path=tls.cert_path, key_path=tls.key_path, oauth=True) as instance:
        yield instance


@pytest.fixture
def jwt_identity():
    identity = JwtManagedIdentity(client_ids=(CLIENT_ID,))
    identity.server.start()
    yield identity
    identity.server.stop()


def identity_settings(azurite: Azurite, container: str) -> dict[str, str]:
    """The app settings of an identity-based deployment, pointed at this Azurite."""
    return {
        "BOT_ALLOW_UNAUTHENTICATED": "true",
        "BOT_REFERENCES_CONTAINER": container,
        "AzureWebJobsStorage__blobServiceUri": azurite.blob_url,
        "AzureWebJobsStorage__queueServiceUri": azurite.queue_url,
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": CLIENT_ID,
    }


def child_env(tls: Tls, endpoint: str, header: str, **settings: str) -> dict[str, str]:
    """A child's environment: this machine's, with azure-identity pointed at ``endpoint``
    (the App Service managed identity form) and the test's CA trusted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_IDENTITY_ENV_PREFIXES)}
    env.pop("REQUESTS_CA_BUNDLE", None)
    env.update(SSL_CERT_FILE=tls.ca_path, IDENTITY_ENDPOINT=endpoint, IDENTITY_HEADER=header)
    return {**env, **settings}


def run_scenario(
    scenario: str, settings_env: dict[str, str], tls: Tls, endpoint: str, header: str, *extra: str
) -> dict[str, Any]:
    """Run `scenario` in a child interpreter set up like a Functions host; its JSON result."""
    Settings.from_env(settings_env)  # a settings mistake fails here, readably
    completed = subprocess.run(
        [sys.executable, "-m", MODULE, scenario, json.dumps(settings_env), *extra],
        cwd=ROOT,
        env=child_env(tls, endpoint, header),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # The clients and their credential's session were closed (aiohttp warns otherwise).
    assert "Unclosed" not in completed.stderr, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def admin_blobs(azurite: Azurite, tls: Tls):
    """A check-side client with the account key (not the identity under test)."""
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(
        azurite.connection_string, connection_verify=tls.ca_path
    )


def admin_queue(azurite: Azurite, tls: Tls, name: str):
    from azure.storage.queue import QueueClient

    return QueueClient.from_connection_string(
        azurite.connection_string, name, connection_verify=tls.ca_path
    )


def queued(azurite: Azurite, tls: Tls, name: str) -> int:
    """How many messages the queue ``name`` holds (0 when it does not exist)."""
    from azure.core.exceptions import ResourceNotFoundError

    with admin_queue(azurite, tls, name) as client:
        try:
            return client.get_queue_properties().approximate_message_count
        except ResourceNotFoundError:
            return 0


def container_exists(azurite: Azurite, tls: Tls, container: str) -> bool:
    with admin_blobs(azurite, tls) as service:
        return service.get_container_client(container).exists()


def stored_documents(azurite: Azurite, tls: Tls, container: str) -> dict[str, dict[str, Any]]:
    """Every reference document in `container` by key; {} when the container does not exist."""
    with admin_blobs(azurite, tls) as service:
        client = service.get_container_client(container)
        if not client.exists():
            return {}
        documents = {}
        for blob in client.list_blobs(name_starts_with="refs/"):
            document = json.loads(client.download_blob(blob.name).readall())
            documents[document["key"]] = document
        return documents


# ---------------------------------------------------------------------------- tests


def test_references_live_in_storage_reached_with_the_managed_identity(
    oauth_azurite, tls, jwt_identity, unique_name
):
    container = unique_name("refs")
    settings = identity_settings(oauth_azurite, container)

    result = run_scenario("store", settings, tls, jwt_identity.endpoint, jwt_identity.secret)

    assert result["created"] == [True, True]
    assert result["got"] == {"key": GROUP_KEY, "reference": GROUP, "tenant": TENANT}
    assert sorted(result["listed_before"]) == sorted([GROUP_KEY, PERSONAL_KEY])
    assert result["found_by_aad"] == PERSONAL_KEY
    assert result["deleted"] is True
    assert result["listed_after"] == [GROUP_KEY]
    # In Azurite, read back with the account key: the group's document, not the deleted one.
    documents = stored_documents(oauth_azurite, tls, container)
    assert list(documents) == [GROUP_KEY]
    assert documents[GROUP_KEY]["reference"] == GROUP
    # Every token came from the managed identity endpoint, for storage, for this identity.
    assert jwt_identity.tokens
    assert jwt_identity.requests
    for request in jwt_identity.requests:
        assert request["header_ok"]
        assert request["query"]["resource"] == STORAGE_RESOURCE
        assert request["query"]["client_id"] == CLIENT_ID


def test_queue_client_sends_and_receives_with_the_managed_identity(
    oauth_azurite, tls, jwt_identity, unique_name
):
    name = unique_name("q")
    settings = identity_settings(oauth_azurite, unique_name("refs"))
    with admin_queue(oauth_azurite, tls, name) as admin:
        admin.create_queue()
        admin.send_message("from-the-account-key")

        result = run_scenario(
            "queue", settings, tls, jwt_identity.endpoint, jwt_identity.secret, name
        )

        # The identity's message is in the queue, and the one it received was deleted by it.
        left = [m.content for m in admin.receive_messages(max_messages=32)]
    assert result["received"] == ["from-the-account-key"]
    assert left == ["from-the-identity"]
    assert {r["query"]["client_id"] for r in jwt_identity.requests} == {CLIENT_ID}
    assert {r["query"]["resource"] for r in jwt_identity.requests} == {STORAGE_RESOURCE}


def test_without_a_usable_identity_the_store_fails_clearly_and_writes_nothing(
    oauth_azurite, tls, unique_name
):
    container = unique_name("refs")
    settings = identity_settings(oauth_azurite, container)
    # botsim's endpoint, knowing another identity only: it answers 400 to this client id.
    with FakeManagedIdentity(client_ids=("some-other-identity",)) as identity:
        result = run_scenario("store-error", settings, tls, identity.endpoint, identity.secret)
        asked = list(identity.requests)

    assert result["error"] is not None, "the write must not succeed"
    assert result["type"] == "StorageAuthFailed"  # a StoreError: a credential to fix
    assert "storage authentication failed" in result["error"]
    assert "AzureWebJobsStorage" in result["error"]  # names the setting to check
    assert identity.secret not in result["error"]
    assert asked and all(q["client_id"] == CLIENT_ID for q in asked)
    assert "No managed identity" not in result["error"]  # the endpoint's text stays out
    assert not identity.issued
    assert not container_exists(oauth_azurite, tls, container)


def test_a_token_storage_does_not_accept_fails_clearly_and_writes_nothing(
    oauth_azurite, tls, unique_name
):
    container = unique_name("refs")
    settings = identity_settings(oauth_azurite, container)
    # botsim's endpoint gives this identity an opaque token: not a JWT, so Azurite refuses it.
    with FakeManagedIdentity(client_ids=(CLIENT_ID,)) as identity:
        result = run_scenario("store-error", settings, tls, identity.endpoint, identity.secret)
        tokens = set(identity.tokens)

    assert result["error"] is not None, "the write must not succeed"
    assert result["type"] == "StorageAuthFailed"  # a StoreError: a credential to fix
    assert "storage authentication failed" in result["error"]
    assert result["status"] in (401, 403)
    assert tokens and not any(token in result["error"] for token in tokens)
    assert identity.secret not in result["error"]
    assert not container_exists(oauth_azurite, tls, container)


def test_a_producer_with_the_default_credential_chain_enqueues_and_reads_reports(
    oauth_azurite, tls, jwt_identity, unique_name
):
    # An operator's producer: identity-based storage without `__credential`, so
    # azure-identity's default chain finds its identity (here the managed identity endpoint).
    name = unique_name("q")
    settings = identity_settings(oauth_azurite, unique_name("refs"))
    del settings["AzureWebJobsStorage__credential"]
    settings["BOT_PROACTIVE_QUEUE"] = name

    result = run_scenario("producer", settings, tls, jwt_identity.endpoint, jwt_identity.secret)

    assert result["report"]["id"] == result["id"] and result["report"]["state"] == "pending"
    with admin_queue(oauth_azurite, tls, name) as admin:
        [message] = admin.receive_messages(max_messages=32)
    queued = json.loads(base64.b64decode(message.content))
    assert queued == {"to": {"conversation": GROUP_KEY}, "text": "hi", "id": result["id"]}
    assert jwt_identity.tokens


def test_a_producer_without_a_usable_identity_is_told_which_setting_to_check(
    oauth_azurite, tls, unique_name
):
    # The operator of README Deploy step 5 before `az login`: the producer's first write (the
    # report's head) cannot get a token; the error says so, not "HTTP None".
    settings = identity_settings(oauth_azurite, unique_name("refs"))
    settings["BOT_PROACTIVE_QUEUE"] = unique_name("q")
    with FakeManagedIdentity(client_ids=("some-other-identity",)) as identity:
        result = run_scenario("producer-error", settings, tls, identity.endpoint, identity.secret)

    assert result["type"] == "StorageAuthFailed"  # a StoreError: a credential to fix
    assert "storage authentication failed" in result["error"]
    assert "AzureWebJobsStorage" in result["error"]
    assert identity.secret not in result["error"]
    assert "No managed identity" not in result["error"]  # the endpoint's text stays out


def test_the_producer_command_without_a_usable_identity_prints_one_clear_error(
    oauth_azurite, tls, unique_name, tmp_path
):
    # The same operator at the command line: azure-identity would log every credential of
    # its default chain it tried, a dozen lines per token request and four requests over
    # the storage SDK's retries, before the command's own error. Only that error is shown.
    queue = unique_name("q")
    settings = identity_settings(oauth_azurite, unique_name("refs"))
    del settings["AzureWebJobsStorage__credential"]  # the default chain, as on a laptop
    settings["BOT_PROACTIVE_QUEUE"] = queue
    command = ["send", "--conversation", GROUP_KEY, "--text", "hi"]
    with FakeManagedIdentity(client_ids=("some-other-identity",)) as identity:
        completed = subprocess.run(
            [sys.executable, "-m", "shared.producer", *command],
            cwd=tmp_path,  # no local.settings.json there: the environment only
            env={
                **child_env(tls, identity.endpoint, identity.secret, **settings),
                "PYTHONPATH": str(ROOT),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        asked = list(identity.requests)

    assert completed.returncode == 1
    assert completed.stdout == ""  # no request id: nothing was enqueued
    [line] = completed.stderr.splitlines()
    assert line.startswith("error: ") and "storage authentication failed" in line
    assert "AzureWebJobsStorage" in line
    assert identity.secret not in line
    assert asked, "the default chain's managed identity was asked"
    assert queued(oauth_azurite, tls, queue) == 0


def test_azurite_refuses_oauth_without_https():
    with pytest.raises(ValueError, match="HTTPS"):
        Azurite(oauth=True)
    with pytest.raises(ValueError, match="cert_path and key_path"):
        Azurite(cert_path="server.pem")


# ---------------------------------------------------------------------------- child side


async def _store(settings: Settings) -> dict[str, Any]:
    store = BlobReferenceStore(settings, options=FAST_STORAGE)
    try:
        created = [await store.upsert(GROUP), await store.upsert(PERSONAL)]
        got = await store.get(GROUP_KEY)
        before = await store.list(channel_id="msteams")
        found = await store.find_by_user(channel_id="msteams", aad_object_id="0d6c8f0e-user-aad")
        deleted = await store.delete(PERSONAL_KEY)
        after = await store.list(channel_id="msteams")
    finally:
        await store.close()
    return {
        "created": created,
        "got": got and {"key": got.key, "reference": got.reference, "tenant": got.tenant_id},
        "listed_before": [item.key for item in before.items],
        "found_by_aad": found and found.key,
        "deleted": deleted,
        "listed_after": [item.key for item in after.items],
    }


async def _store_error(settings: Settings) -> dict[str, Any]:
    store = BlobReferenceStore(settings, options=FAST_STORAGE)
    try:
        await store.upsert(GROUP)
    except StoreError as exc:
        return {"error": str(exc), "type": type(exc).__name__, "status": exc.status}
    finally:
        await store.close()
    return {"error": None}


async def _queue(settings: Settings, name: str) -> dict[str, Any]:
    service = create_queue_service(settings.storage, FAST_STORAGE)
    try:
        queue = service.get_queue_client(name)
        received = []
        async for message in queue.receive_messages(max_messages=32):
            received.append(message.content)
            await queue.delete_message(message)
        await queue.send_message("from-the-identity")
    finally:
        await close_client(service)
    return {"received": received}


async def _producer(settings: Settings) -> dict[str, Any]:
    from shared import producer
    from shared.storage import close_shared_clients

    env = {**os.environ, **json.loads(sys.argv[2])}
    settings = producer.producer_settings(env)
    try:
        request_id = await producer.enqueue(
            {"to": {"conversation": GROUP_KEY}, "text": "hi"}, settings=settings
        )
        report = await producer.read_report(request_id, settings=settings)
    finally:
        await close_shared_clients()
    return {"id": request_id, "report": report}


async def _producer_error(settings: Settings) -> dict[str, Any]:
    from shared import producer
    from shared.storage import close_shared_clients

    try:
        await producer.enqueue({"to": {"conversation": GROUP_KEY}, "text": "hi"}, settings=settings)
    except StoreError as exc:
        return {"error": str(exc), "type": type(exc).__name__}
    finally:
        await close_shared_clients()
    return {"error": None, "type": None}


def _child(argv: list[str]) -> None:
    scenario, settings_env, *extra = argv
    settings = Settings.from_env(json.loads(settings_env))
    scenarios = {
        "store": _store,
        "store-error": _store_error,
        "queue": _queue,
        "producer": _producer,
        "producer-error": _producer_error,
    }
    result = asyncio.run(scenarios[scenario](settings, *extra))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
