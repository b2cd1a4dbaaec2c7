"""``maskconnect bench ...``: the benchmarks of the repository's ``bench/`` folder.

The benchmarks live at the repository root (``bench/``), not in the installed package, so that they
run on a GPU machine from a bare checkout (``PYTHONPATH=src python -m bench ...``). This subcommand
finds that folder from the editable install (``src/maskconnect`` -> repository root) and forwards
every argument to ``bench.main``: ``maskconnect bench all --quick`` = ``python -m bench all --quick``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import MaskConnectError

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchNotFound(MaskConnectError, RuntimeError):
    """The ``bench`` package of a maskconnect checkout cannot be imported."""


def load_bench():
    """Import the repository's ``bench`` package (adding the repository root to ``sys.path`` if
    needed). Raises :class:`BenchNotFound` outside a checkout."""
    if (REPO_ROOT / "bench" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        bench = importlib.import_module("bench")
    except ModuleNotFoundError as e:
        if e.name != "bench":
            raise
        bench = None
    if bench is None or not getattr(bench, "MASKCONNECT_BENCH", False):
        raise BenchNotFound(
            f"the benchmarks live in the bench/ folder of a maskconnect checkout, and none was found "
            f"(looked in {REPO_ROOT}); install the package editable from a checkout (pip install -e .) "
            f"or run 'PYTHONPATH=src python -m bench ...' from the repository root")
    return bench


def _cmd_bench(args) -> int:
    argv = (["--help"] if args.bench_help else []) + list(args.bench_args)
    return int(load_bench().main(argv, prog="maskconnect bench") or 0)


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
