"""The benchmarks' peer modules run only in their SDKs' own venvs, so no test imports them:
what any benchmark module takes from this repo's own packages is checked to exist by reading
the source (a peer's broadcast loop once imported a name its server no longer had, and
`make bench` failed at it after half an hour)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = ("benchmarks", "shared", "tools")


def module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined_names(path: Path) -> set[str]:
    """Names bound at a module's top level, in its `if` / `try` / `with` blocks too."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            if isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return names


BENCHMARK_MODULES = sorted((ROOT / "benchmarks").rglob("*.py"))


def missing_names(path: Path) -> list[str]:
    """What `path` takes from the repo's own packages that is not there: a module named by
    `import` or `from ... import`, a name imported from one, or an attribute used on a
    module imported so (`broadcast_loop.main`)."""
    tree = ast.parse(path.read_text())
    missing = []
    modules: dict[str, str] = {}  # a name bound in `path` -> the own module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in OWN_PACKAGES:
                    continue
                if module_path(alias.name) is None:
                    missing.append(alias.name)
                elif alias.asname:
                    modules[alias.asname] = alias.name
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module.split(".")[0] not in OWN_PACKAGES:
            continue
        source = module_path(node.module)
        if source is None:
            missing.append(node.module)
            continue
        defined = defined_names(source)
        for alias in node.names:
            submodule = f"{node.module}.{alias.name}"
            if module_path(submodule) is not None and alias.name not in defined:
                modules[alias.asname or alias.name] = submodule
            elif alias.name != "*" and alias.name not in defined:
                missing.append(submodule)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = modules.get(node.value.id)
            source = module_path(module) if module else None
            if source is not None and node.attr not in defined_names(source):
                missing.append(f"{module}.{node.attr}")
    return missing


@pytest.mark.parametrize("path", BENCHMARK_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_a_benchmark_module_takes_from_the_repo_exists(path: Path) -> None:
    assert missing_names(path) == []


def test_the_check_sees_each_way_a_module_names_what_is_not_there(tmp_path: Path) -> None:
    assert "ADAPTER" in defined_names(ROOT / "benchmarks/sdk/botbuilder_echo.py")
    assert "Config" not in defined_names(ROOT / "benchmarks/peers/botbuilder_server.py")
    module = tmp_path / "peer.py"
    module.write_text(
        "import benchmarks.peers.no_such_module\n"
        "import benchmarks.peers.broadcast_loop as loop\n"
        "from benchmarks.peers import broadcast_loop\n"
        "from benchmarks.peers.botbuilder_server import Config\n"
        "broadcast_loop.main_renamed(None)\n"
        "loop.main(None)\n"
    )
    assert missing_names(module) == [
        "benchmarks.peers.no_such_module",
        "benchmarks.peers.botbuilder_server.Config",
        "benchmarks.peers.broadcast_loop.main_renamed",
    ]
