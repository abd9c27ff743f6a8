"""The ``flashfn`` command line (console script ``flashfn = flashfn.cli:main``).

Subcommands:

- ``flashfn bench``: the side-by-side time-to-target benchmark of plain
  training against Flash Mode and its components (``docs/benchmark.md``).

Example:
    >>> build_parser().parse_args(["bench", "--quick", "--workload", "fashion"]).workload
    'fashion'
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``flashfn`` parser with its subcommands."""
    from . import __version__
    from .bench import DESCRIPTION, add_arguments

    parser = argparse.ArgumentParser(prog="flashfn", description="flashfn: Flash Mode for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"flashfn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="time-to-target benchmark: plain training vs Flash Mode (and ablations)",
                           description=DESCRIPTION)
    add_arguments(bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``flashfn`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import _command, run_from_args

        return run_from_args(args, _command("flashfn", argv))
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
