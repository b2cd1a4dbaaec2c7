"""``maskconnect bench ...``: the benchmarks of the repository's ``bench/`` folder, run as ``python -m bench``.

The benchmarks live at the repository root (``bench/``), not in the installed package: ``bench``
imports ``maskconnect``, never the reverse. This subcommand runs them in a child Python with the
checkout's root (found from an editable install: ``src/maskconnect`` -> repository root) first on
its path, forwards every argument, and returns the child's exit code:
``maskconnect bench all --quick`` = ``python -m bench all --quick`` from the repository root.
Outside a checkout it exits 2, saying where the benchmarks are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..errors import MaskConnectError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding maskconnect/ (src/ in a checkout)
REPO_ROOT = PACKAGE_ROOT.parent

# What the child runs: `python -m bench`, with the checkout (and this package) first on the path and
# the command line's name in the benchmarks' messages.
_CHILD = ("import sys; sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]; import bench; "
          "sys.exit(bench.main(sys.argv[1:], prog='maskconnect bench'))")


class BenchNotFound(MaskConnectError, RuntimeError):
    """The ``bench/`` folder of a maskconnect checkout is not where this package is installed from."""


def bench_root() -> Path:
    """The repository root holding ``bench/``; raises :class:`BenchNotFound` outside a checkout."""
    marker = REPO_ROOT / "bench" / "__init__.py"
    try:
        ours = "MASKCONNECT_BENCH" in marker.read_text(encoding="utf-8")
    except OSError:
        ours = False
    if not ours:
        raise BenchNotFound(
            f"the benchmarks live in the bench/ folder of a maskconnect checkout, and none was found "
            f"(looked in {REPO_ROOT}); install the package editable from a checkout (pip install -e .) "
            f"or run 'PYTHONPATH=src python -m bench ...' from the repository root")
    return REPO_ROOT


def _cmd_bench(args) -> int:
    argv = (["--help"] if args.bench_help else []) + list(args.bench_args)
    root = bench_root()
    return subprocess.run([sys.executable, "-c", _CHILD, str(root), str(PACKAGE_ROOT), *argv]).returncode


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", add_help=False, help="benchmarks (python -m bench): throughput, naive, torchvision, inference, "
                                      "datapath, projection, cuda-check, all",
        description="Run the repository's benchmarks; every argument goes to 'python -m bench' "
                    "(try 'maskconnect bench --help').")
    # REMAINDER does not take a leading option, so --help is caught here and passed on.
    p.add_argument("-h", "--help", action="store_true", dest="bench_help", help="show the benchmarks' help")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m bench")
    p.set_defaults(func=_cmd_bench)
