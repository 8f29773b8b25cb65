"""One error type for bad user input, and the wrapper every command-line entry point runs under.

A `UserError` carries a complete, one-paragraph explanation (which file, line, field or flag, and what
was expected).  Entry points print it without a traceback and exit with status 2.
"""
from __future__ import annotations

import sys
import textwrap
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what was expected."""


def json_error_text(err, line: bool = True) -> str:
    """A `json.JSONDecodeError` as one phrase with its position: "Expecting ',' delimiter at line 36, column 5".
    Some of json's messages already end in "at" ("Unterminated string starting at"); they get the position
    directly.  `line=False` leaves the line out (JSON Lines files name the file's line themselves)."""
    where = f"line {err.lineno}, column {err.colno}" if line else f"column {err.colno}"
    return f"{err.msg} {where}" if err.msg.endswith(" at") else f"{err.msg} at {where}"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; turn a `UserError` into a readable message and exit status 2.  Also drops the
    third-party messages listed in `llava_sculpt.quiet` (every command-line entry point runs here)."""
    from llava_sculpt import quiet

    quiet.install()
    try:
        return int(main(argv) or 0)
    except UserError as err:
        text = " ".join(str(err).split())
        print("llava-sculpt: error: " + "\n  ".join(textwrap.wrap(text, 100, break_on_hyphens=False, break_long_words=False)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-sculpt: interrupted", file=sys.stderr)
        return 130
