"""The producer command's output: one line per thing shown, safe for a terminal.

What the command prints comes partly from clients (conversation ids, user names in a
report's failures): control characters, Unicode line breaks, format characters
(bidirectional controls, zero-width ones), other characters drawn as nothing or blank
(spaces but the ASCII one, fillers, variation selectors) and a key's trailing spaces are
escaped, so a line cannot be broken, a terminal cannot be driven, and one key does not
pass for another (characters that merely look alike, such as Cyrillic letters, are
printed as they are). Writing stdout can fail
on its own (a reader that stopped reading, a full disk): :class:`StdoutFailed` tells that
apart from storage failing, whose connection errors are OSErrors too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

_UNICODE_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
# What JSON leaves as it is and a terminal may act on (DEL and C1: U+009B starts an escape
# sequence), written as JSON's \u escapes: the same JSON value.
_JSON_ESCAPES = {
    **{code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)},
    **_UNICODE_LINE_BREAKS,
}
# What a listed key may hold that would break its line or fool a terminal: control
# characters (C0, DEL, C1), as Python's backslash escapes write them, and the Unicode
# line breaks; a backslash itself too, so no key prints as another's escape.
_KEY_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0), 0x5C)},
    **_UNICODE_LINE_BREAKS,
}


class StdoutFailed(Exception):
    """Writing the command's output failed (`error`): not storage's doing."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def writing_stdout() -> Iterator[None]:
    """Output written here: an OSError is stdout's (a closed pipe, a full disk), told
    apart from storage's (whose connection errors are OSErrors too)."""
    try:
        yield
    except OSError as error:
        raise StdoutFailed(error) from None


_NON_ASCII = re.compile(r"[^\x00-\x7f]|(?<! ) +\Z")  # not ` +$`: quadratic in a run of spaces
# Drawn as nothing, or as blank, though not format characters: Unicode's default-ignorable
# code points of other categories (the combining grapheme joiner, Hangul fillers,
# variation selectors) and the Braille blank.
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def _hidden(character: str) -> bool:
    """Whether a terminal would not show `character` as itself: format characters
    (category Cf: bidirectional controls that reorder a line, zero-width ones), spaces
    other than the ASCII one, what is drawn as nothing, and code points this Python's
    Unicode tables do not know (Cn: some are default-ignorable, others assigned since)."""
    return unicodedata.category(character) in ("Cf", "Zs", "Cn") or bool(
        _INVISIBLE.match(character)
    )


def _escape_format(text: str, escape: Callable[[str], str]) -> str:
    """`text` with what would make it look like another text written by `escape`: the
    hidden characters, and spaces at its end."""
    if text.isascii() and not text.endswith(" "):
        return text
    return _NON_ASCII.sub(
        lambda found: (
            "".join(map(escape, found[0]))
            if found[0].startswith(" ") or _hidden(found[0])
            else found[0]
        ),
        text,
    )


# What a terminal acts on rather than shows, in a message's text: control characters but
# the line feed and the tab (C0, DEL, C1), and the bidirectional controls, which reorder
# what follows them (joiners, soft hyphens and emoji tags are text: shown as they are).
_TERMINAL_CONTROLS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def terminal_text(text: str) -> str:
    """A message's text for a terminal: lines and tabs kept, and whatever would drive the
    terminal or reorder the line instead of showing as Python's backslash escapes."""
    return _TERMINAL_CONTROLS.sub(lambda found: _python_escape(found[0]), text)


def _json_escape(character: str) -> str:
    """A character as JSON's \\u escapes (two, a surrogate pair, beyond the BMP)."""
    units = character.encode("utf-16-be")
    return "".join(f"\\u{units[i] << 8 | units[i + 1]:04x}" for i in range(0, len(units), 2))


def key_line(key: str) -> str:
    """A listed key as its line: control characters, line breaks, backslashes, hidden
    characters and trailing spaces as Python's backslash escapes."""
    escaped = key.translate(_KEY_ESCAPES)
    return _escape_format(escaped, _python_escape)


def _python_escape(character: str) -> str:
    """A character as Python's backslash escape (a space as \\x20)."""
    return "\\x20" if character == " " else character.encode("unicode_escape").decode("ascii")


def print_json(value: Any) -> None:
    """One JSON line, as text when stdout can write it, else with \\u escapes (a lone
    surrogate, or a console whose encoding lacks a character): the same JSON either way."""
    text = json.dumps(value, ensure_ascii=False)
    if printable(text) != text:
        text = json.dumps(value)
    # Line breaks to a reader that splits lines the Unicode way: escaped, one object a line;
    # and terminal controls and hidden characters a client may have put in an id.
    print(_escape_format(text.translate(_JSON_ESCAPES), _json_escape))


def print_done(shown: str, said: str) -> None:
    """Print what a command made (`shown`: an id, a name) once it is made; when stdout is
    closed, `said` goes to stderr instead, and the command still succeeded."""
    if sys.stdout is None:  # started without any stdout
        print(said, file=sys.stderr)
        return
    try:
        print(shown, flush=True)
    except OSError:
        drop_stdout()
        print(said, file=sys.stderr)


def drop_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush of what could not
    be written raises nothing more at exit (no stdout at all: nothing to point)."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def printable(text: str) -> str:
    """`text` with what stdout cannot encode written as backslash escapes."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        return text.encode("ascii", "backslashreplace").decode("ascii")
    return text
