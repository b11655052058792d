"""botsim's command line: `python -m tools.botsim chat [--bot URL] [--port N]`."""

from __future__ import annotations

import sys

from tools.botsim import chat

COMMANDS = {"chat": chat.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python -m tools.botsim chat [--bot URL] [--port N]", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    except KeyboardInterrupt:
        sys.exit(0)
