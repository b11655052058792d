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
