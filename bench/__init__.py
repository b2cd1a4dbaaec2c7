"""Benchmarks for the maskconnect suite, runnable on CPU (smoke) and on CUDA (the real numbers).

Run from the repository root::

    PYTHONPATH=src python -m bench all --quick --device cpu     # CPU smoke run (< ~1 min)
    PYTHONPATH=src python -m bench all --device cuda            # the GPU numbers
    maskconnect bench throughput --device cuda                  # same, through the suite's CLI

Each benchmark writes one JSON record to ``bench/results/`` and prints a short table; see
``bench/README.md``. Only torch, torchvision, numpy and maskconnect are imported, so the benchmarks
run on a GPU machine that has nothing else installed.
"""

# Lets ``maskconnect bench`` check that the ``bench`` it imported is this package.
MASKCONNECT_BENCH = True

BENCHMARKS = ("throughput", "naive", "mixing", "torchvision", "inference", "datapath", "projection", "memory")


def main(argv=None, prog: str = "python -m bench") -> int:
    from .cli import main as _main

    return _main(argv, prog)
