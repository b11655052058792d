"""The app hands the bot to the library: `shared/` never names the bot module, and every
function folder gets its runtime from app.py the same way."""

from __future__ import annotations

import ast
from pathlib import Path

import app
from shared.bot import router as shipped_router
from shared.runtime import reset_runtime

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("messages_function", "proactive_function", "schedule_function")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_library_never_imports_a_bot_or_the_app():
    for path in sorted((ROOT / "shared").rglob("*.py")):
        if path.name == "bot.py" and path.parent.name == "shared":
            continue
        named = imported_modules(path)
        assert not {"shared.bot", "app", "examples"} & named, path.relative_to(ROOT)
        assert not any(name.startswith("examples.") for name in named), path.relative_to(ROOT)


def test_every_function_folder_gets_the_runtime_from_the_app():
    # The timer needs no runtime: it enqueues with the storage settings alone, so a bot
    # credential mistake never stops the schedules.
    for folder in FUNCTIONS:
        named = imported_modules(ROOT / folder / "__init__.py")
        if folder == "schedule_function":
            assert not any(name == "app" or name.startswith("app.") for name in named)
        else:
            assert "app.runtime" in named, folder
        assert "shared.runtime" not in named and "shared.bot" not in named, folder


def test_the_app_serves_its_router_and_builds_the_runtime_once(monkeypatch):
    monkeypatch.setenv("MicrosoftAppId", "")
    monkeypatch.setenv("BOT_ALLOW_UNAUTHENTICATED", "true")
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    from shared.config import reset_settings

    reset_settings()
    reset_runtime()
    try:
        runtime = app.runtime()
        assert runtime.router is shipped_router
        assert app.runtime() is runtime
    finally:
        reset_settings()
        reset_runtime()
