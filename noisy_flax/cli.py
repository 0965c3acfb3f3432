"""What the command-line entry points share: one-line user errors and quiet logs."""
from __future__ import annotations

import sys

from absl import app, flags, logging

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """The one line a user error prints, then exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError):  # KeyError quotes its message
        text = text.strip("'\"")
    lines = text.splitlines()
    if not lines:
        return type(error).__name__
    more = " (details: --verbosity=1)" if len(lines) > 1 else ""
    return lines[0].strip() + more


def start(argv) -> None:
    """The opening of every absl ``main``: no stray arguments, and warnings
    only unless --verbosity is given (orbax and tfds log every step at INFO)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
