"""Shared command-line plumbing: expected failures end in one line on stderr, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from weights_convert.torch_pickle import PthError

EXPECTED_ERRORS = (PthError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
                   KeyError)


def main_guard(main: Callable[[], int | None]) -> Callable[[], None]:
    """Run `main`, turning expected errors and Ctrl-C into a one-line message and exit status."""

    @functools.wraps(main)
    def run() -> None:
        try:
            sys.exit(main())
        except EXPECTED_ERRORS as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:
            sys.exit("interrupted")

    return run
