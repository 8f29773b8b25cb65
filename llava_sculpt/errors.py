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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; turn a `UserError` into a readable message and exit status 2."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        text = " ".join(str(err).split())
        print("llava-sculpt: error: " + "\n  ".join(textwrap.wrap(text, 100, break_on_hyphens=False, break_long_words=False)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-sculpt: interrupted", file=sys.stderr)
        return 130
