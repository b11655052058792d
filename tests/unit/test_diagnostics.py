"""shared/diagnostics.describe: where an exception was raised and how we got there, no text.

What an operator reads in the log: the innermost frame, the app's own frames that led
to it (even when a library's frames are many), the exceptions it was raised from, and
never the exception messages (they may carry tokens or a user's words).
"""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap

import pytest

from shared.diagnostics import MAX_FRAMES, describe

SECRET = "Bearer eyJ-secret-token and the user's words"
HERE = "unit/test_diagnostics.py"


@pytest.fixture
def deep_library(tmp_path, monkeypatch):
    """A module installed the way packages are (in a site-packages folder), failing deep."""
    packages = tmp_path / "site-packages"
    (packages / "deeplib").mkdir(parents=True)
    (packages / "deeplib" / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            def dive(depth):
                if depth == 0:
                    raise ValueError({SECRET!r})
                return dive(depth - 1)
            """
        )
    )
    monkeypatch.syspath_prepend(str(packages))
    yield importlib.import_module("deeplib")
    sys.modules.pop("deeplib", None)


def call_library(library) -> None:
    library.dive(2 * MAX_FRAMES)


def raise_from_ours(library) -> str:
    try:
        call_library(library)
    except ValueError as error:
        return describe(error)
    raise AssertionError("the library did not raise")


def test_a_failure_deep_in_a_package_still_shows_our_calling_line(deep_library):
    described = raise_from_ours(deep_library)

    assert described.startswith("ValueError at deeplib/__init__.py:4 in dive <- ")
    assert f"{HERE}:" in described and "in call_library" in described
    assert "in raise_from_ours" in described
    assert described.count("in dive") == 1  # the library's own recursion is left out
    assert SECRET not in described and "secret" not in described


def test_our_own_frames_are_shown_by_their_last_two_path_parts():
    def inner() -> None:
        raise KeyError(SECRET)

    try:
        inner()
    except KeyError as error:
        described = describe(error)

    assert described.startswith(f"KeyError at {HERE}:")
    assert "in inner <- " in described
    assert SECRET not in described


def test_explicit_cause_is_described_without_its_text():
    try:
        try:
            {}["missing"]
        except KeyError as error:
            raise RuntimeError(SECRET) from error
    except RuntimeError as error:
        described = describe(error)

    first, cause = described.split("; ")
    assert first.startswith(f"RuntimeError at {HERE}:")
    assert cause.startswith(f"from KeyError at {HERE}:")
    assert SECRET not in described and "missing" not in described


def test_an_exception_raised_while_handling_another_shows_both():
    try:
        try:
            raise OSError(SECRET)
        except OSError:
            raise TimeoutError(SECRET)  # noqa: B904 - the implicit context is what is tested
    except TimeoutError as error:
        described = describe(error)

    assert described.startswith("TimeoutError at ")
    assert "; while handling OSError at " in described
    assert SECRET not in described


def test_from_none_hides_the_context():
    try:
        try:
            raise OSError(SECRET)
        except OSError:
            raise ValueError("x") from None
    except ValueError as error:
        described = describe(error)

    assert "OSError" not in described and ";" not in described


def test_a_cycle_of_causes_ends():
    first, second = ValueError(SECRET), KeyError(SECRET)
    first.__cause__, second.__cause__ = second, first

    assert describe(first) == "ValueError; from KeyError"


def test_a_long_chain_is_cut_short():
    errors = [ValueError(str(n)) for n in range(10)]
    for error, cause in itertools.pairwise(errors):
        error.__cause__ = cause

    assert describe(errors[0]).count("; from ") == 2


def test_an_exception_never_raised_is_its_type():
    assert describe(ConnectionResetError(SECRET)) == "ConnectionResetError"
