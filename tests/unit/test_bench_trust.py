"""The benchmarks' one trust store: the system's CA certificates plus the fake AAD's, for
every bot, in every round (benchmarks/trust.py, warm.py, cold_start.py)."""

from __future__ import annotations

import ssl
from contextlib import ExitStack
from pathlib import Path

import trustme

from benchmarks import cold_start, trust, warm


def ca_count(path: str | Path) -> int:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(path))
    return context.cert_store_stats()["x509_ca"]


def fake_ca(tmp_path: Path) -> Path:
    path = tmp_path / "fake-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_the_store_is_the_system_bundle_python_finds_plus_the_fake_ca(tmp_path):
    default = ssl.get_default_verify_paths().cafile
    system = trust.system_ca_file()
    if default:  # else certifi's (the next test)
        assert system == Path(default)

    store = trust.bundle(fake_ca(tmp_path), tmp_path)

    assert store.read_bytes().startswith(Path(system).read_bytes().rstrip(b"\n"))
    assert ca_count(store) == ca_count(system) + 1
    assert trust.env(store) == {"SSL_CERT_FILE": str(store), "REQUESTS_CA_BUNDLE": str(store)}


def test_without_a_default_ca_file_the_store_starts_from_certifis(tmp_path, monkeypatch):
    import certifi

    nothing = ssl.DefaultVerifyPaths(None, None, "SSL_CERT_FILE", "", "SSL_CERT_DIR", "")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: nothing)

    assert trust.system_ca_file() == Path(certifi.where())
    assert ca_count(trust.bundle(fake_ca(tmp_path), tmp_path)) == ca_count(certifi.where()) + 1


def test_every_warm_bot_trusts_the_system_store_and_the_fake_aad():
    with ExitStack() as stack:
        services = warm.start_services(stack, need_storage=False)
        system = trust.system_ca_file().read_bytes().rstrip(b"\n")
        for target in warm.TARGETS.values():
            env = services.env(target, 0)
            assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == services.ca_path
            assert Path(services.ca_path).read_bytes().startswith(system)
            assert ca_count(services.ca_path) == ca_count(trust.system_ca_file()) + 1
        store = Path(services.ca_path)
    assert not store.exists()  # removed with the services


def test_cold_start_gives_every_bot_the_same_store_in_both_rounds(tmp_path):
    trusted = trust.env(trust.bundle(fake_ca(tmp_path), tmp_path))
    sdk = Path("sdk-python")

    bots = cold_start.contenders(sdk, "http://127.0.0.1:1", "", ["ours", "botbuilder"], trusted)

    class Channel:
        metadata_url = jwks_url = "http://127.0.0.1:2/"

    for bot in bots:
        unauthenticated = cold_start.child_env(bot.env)
        authenticated = cold_start.child_env(
            cold_start.authenticated(bot, "app", "secret", "https://127.0.0.1:3", Channel).env
        )
        for env in (unauthenticated, authenticated):
            assert {k: env[k] for k in trusted} == trusted
