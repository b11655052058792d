"""What the producer command prints of text a client chose (shared/command_output.py)."""

from __future__ import annotations

import json

import pytest

from shared.command_output import key_line, print_json


@pytest.mark.parametrize(
    ("key", "line"),
    [
        # Unassigned here (category Cn), default-ignorable in Unicode: printed raw before.
        ("msteams/a\u2065:1", "msteams/a\\u2065:1"),
        ("msteams/a\ufff0:1", "msteams/a\\ufff0:1"),
        # Spaces: those inside as they are, those at the end escaped (a run of them
        # inside cost time quadratic in its length).
        ("webchat/a  b  ", "webchat/a  b\\x20\\x20"),
        ("webchat/" + " " * 1000 + "é", "webchat/" + " " * 1000 + "é"),
        ("webchat/a\u3000b", "webchat/a\\u3000b"),
    ],
)
def test_a_listed_key_shows_what_it_hides(key, line):
    assert key_line(key) == line


def test_printed_json_escapes_hidden_characters_and_reads_back_equal(capsys):
    value = {"target": "a\u2065\u202e\U000e0041 \u00a0b", "reason": "plain"}
    print_json(value)
    printed = capsys.readouterr().out
    assert json.loads(printed) == value
    assert printed.isascii() or not any(c in printed for c in "\u2065\u202e\u00a0")
