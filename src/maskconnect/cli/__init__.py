"""The ``maskconnect`` command line: one module per subcommand, each a thin layer over the package.

Bad input exits with code 2 and a one-line message naming the field, the value and what is allowed.
Subcommands import their heavy dependencies (torch, mlflow, pandas) lazily, so ``--help`` is quick.

    describe, train, evaluate, prepare-data, report, track, grid, gpu-slot, preflight, bench
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import MaskConnectError

# The modules that register the subcommands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = ("describe", "train", "evaluate", "prepare_data", "track", "report", "grid", "gpu_slot",
                      "preflight", "bench")


class _Parser(argparse.ArgumentParser):
    """A bad option is one line too, as every other bad value (argparse names the option, the value and,
    from the option's type or choices, what is allowed), not a usage block of 16 lines around it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maskconnect",
        description="MaskConnect reproduction suite: masked ResNeXt models, training, reports.",
    )
    parser.add_argument("--version", action="version", version=f"maskconnect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MaskConnectError as e:
        print(f"maskconnect {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"maskconnect {args.command}: interrupted", file=sys.stderr)
        return 130
