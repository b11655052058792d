"""The repo's commands name themselves as the README says to run them (`python -m ...`)."""

from __future__ import annotations

import importlib

import pytest

COMMANDS = {
    "tools.devhost.__main__": "python -m tools.devhost",
    "tools.run_local": "python -m tools.run_local",
    "tools.azurite": "python -m tools.azurite",
    "tools.playground.__main__": "python -m tools.playground",
    "tools.botsim.chat": "python -m tools.botsim chat",
    "tools.package": "python -m tools.package",
    "tools.teams_package": "python -m tools.teams_package",
    "tools.infra_check": "python -m tools.infra_check",
}


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_the_command_a_user_types(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {COMMANDS[module]} ")


PORT_ERROR = "is not a port (1-65535)"
ANY_PORT_ERROR = "is not a port (0-65535; 0: any free port)"
URL_ERROR = "is not an http(s) URL with a host, such as http://127.0.0.1:7071/api/messages"
SECRET_URL_ERROR = (
    "a URL with a user name or password, spaces or control characters cannot be sent to; "
    "give one such as http://127.0.0.1:7071/api/messages"
)
OWN = "give each its own port"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:3978/@me/messages",  # an @ in the path or query is no password
        "http://127.0.0.1:3978/api/messages?email=a@b.c",
        "http://[fe80::1%25eth0]:3978/api/messages",
    ],
)
def test_a_bot_url_with_an_at_sign_past_its_host_is_taken(url):
    from tools.args import http_url

    assert http_url(url) == url


@pytest.mark.parametrize(
    ("module", "argv", "error"),
    [
        ("tools.run_local", ["--port", "99999"], f"argument --port: '99999' {PORT_ERROR}"),
        ("tools.run_local", ["--port", "0"], f"argument --port: '0' {PORT_ERROR}"),
        ("tools.run_local", ["--blob-port", "-1"], f"argument --blob-port: '-1' {PORT_ERROR}"),
        ("tools.run_local", ["--table-port", "x"], f"argument --table-port: 'x' {PORT_ERROR}"),
        (
            "tools.devhost.__main__",
            ["--port", "99999"],
            f"argument --port: '99999' {ANY_PORT_ERROR}",
        ),
        ("tools.botsim.chat", ["--port", "99999"], f"argument --port: '99999' {ANY_PORT_ERROR}"),
        ("tools.botsim.chat", ["--bot", "notaurl"], f"argument --bot: 'notaurl' {URL_ERROR}"),
        (
            "tools.botsim.chat",
            ["--bot", "127.0.0.1:7071/api/messages"],  # no scheme: "no bot answers" it said
            f"argument --bot: '127.0.0.1:7071/api/messages' {URL_ERROR}",
        ),
        (
            "tools.playground.__main__",
            ["--port", "99999"],
            f"argument --port: '99999' {PORT_ERROR}",
        ),
        (
            "tools.playground.__main__",
            ["--bot", "ftp://127.0.0.1/api/messages"],
            f"argument --bot: 'ftp://127.0.0.1/api/messages' {URL_ERROR}",
        ),
        (
            "tools.botsim.chat",
            ["--bot", "http://user:s3cret@127.0.0.1:7071/api/messages"],  # never echoed
            f"argument --bot: {SECRET_URL_ERROR}",
        ),
        (
            "tools.botsim.chat",
            ["--bot", "http://127.0.0.1:7071/api/ messages"],
            f"argument --bot: {SECRET_URL_ERROR}",
        ),
        (
            "tools.botsim.chat",
            ["--bot", "ftp://user:s3cret@127.0.0.1/api/messages"],  # two mistakes: no echo
            f"argument --bot: {SECRET_URL_ERROR}",
        ),
        (
            "tools.botsim.chat",
            ["--bot", "http:/bob:s3cret@127.0.0.1:3978/api/messages"],  # no //: no echo either
            f"argument --bot: {SECRET_URL_ERROR}",
        ),
        ("tools.run_local", ["--port", "10000"], "--port and --blob-port are both 10000: " + OWN),
        (
            "tools.run_local",
            ["--blob-port", "12000", "--queue-port", "12000"],
            "--blob-port and --queue-port are both 12000: " + OWN,
        ),
    ],
)
def test_a_port_or_url_that_is_not_one_is_refused_before_anything_starts(
    module, argv, error, capsys, monkeypatch, tmp_path
):
    # Tracebacks, and `tools.playground --port 99999` started and stopped the bot and
    # Azurite first: now argparse's error (exit 2), before anything starts.
    started = []
    monkeypatch.setattr("tools.playground.__main__.start_bot", started.append)
    monkeypatch.setattr("tools.playground.Playground.start", started.append)
    monkeypatch.setattr("tools.azurite.Azurite.start", started.append)
    monkeypatch.setattr("tools.botsim.connector.FakeConnector.start", started.append)
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr("asyncio.run", lambda coroutine: started.append(coroutine.close()))
    # Should it get past parsing, nothing of the repo's: its own settings file and ports.
    if module == "tools.run_local":
        argv = [*argv, "--settings", str(tmp_path / "local.settings.json")]
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{COMMANDS[module]}: error: {error}"
    assert "Traceback" not in err and "s3cret" not in err
    assert started == []
