"""Shared command-line plumbing: expected failures and warnings are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from typing import Callable

from jaxquant.evaluation import DEFAULT_OVERLAP, DEFAULT_TILE

EXPECTED_ERRORS = (ValueError, OSError, KeyError)  # bad input (PthError is a ValueError) or a failing disk
# jax_default_matmul_precision values. "highest" (full float32) is what the parity tests check; on a GPU,
# "default" runs float32 matmuls in TF32 (about 3e-4 relative error, spec section 8).
MATMUL_PRECISIONS = ("highest", "high", "default")


def add_matmul_precision_flag(parser: argparse.ArgumentParser, default: str | None = "highest") -> None:
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default=default,
                        help="float32 matmul precision (default: highest, as the parity tests check; 'default' is "
                             "faster on a GPU: TF32 there)")


def add_devices_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, metavar="N", help="split each batch over the first N devices of this "
                        "process (default: all of them; docs/scaling.md)")


def main_guard(main: Callable[..., None]) -> Callable[..., None]:
    """Run `main`, turning expected errors and Ctrl-C into a one-line message and exit status, and printing
    warnings as one line each (not with the source line that raised them)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> None:
        warnings.formatwarning = _one_line_warning
        try:
            main(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:
            sys.exit("interrupted")

    return run


def interrupted(stopped: KeyboardInterrupt, resume_command: str) -> str:
    """The exit message of a run stopped by Ctrl-C: what was checkpointed (where the loop said) and how to go on."""
    return f"interrupted{f' ({stopped})' if str(stopped) else ''}; continue with: {resume_command}"


def add_tiling_flags(parser: argparse.ArgumentParser) -> None:
    """`--tile` and `--tile-overlap` (SwinIR's test script's `--tile` and `--tile_overlap`); see `Tiling`."""
    parser.add_argument("--tile", type=int, metavar="N", help="run the model on N x N LR tiles, averaged where they "
                        f"overlap (default: whole images, or tiles of {DEFAULT_TILE} where a benchmark's whole images "
                        "would not fit in memory; 0: whole images always)")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, metavar="M",
                        help=f"LR pixels that neighbouring tiles share (default: {DEFAULT_OVERLAP})")


def _one_line_warning(message: Warning | str, *_) -> str:
    return f"warning: {message}\n"
