"""Names and paths of every file a pipeline reads or writes, and the run id with its one parser.

A run's name is :func:`run_id` (docs/run_format.md), e.g. ``cifar100/29-8-8/learned-K4/seed0``;
:func:`parse_run_id` reads it back and :data:`RUN_ID_REGEX` is its pattern for Snakemake's
wildcards. Every other path (markers, metrics, tables, logs) is a function here, so the Snakefile,
dvc.yaml and the commands name each file the same way. All paths are relative to the project root
(where snakemake / dvc run).
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..specs import CONNECTIVITIES, FAMILIES, arch_token, baseline_of, canonical_arch

RESULTS = "results"
RUNS_ROOT = f"{RESULTS}/runs"
TABLES = "paper_tables"
DATA_DIR = "data"


# ---- run ids ------------------------------------------------------------------------------------------

def run_id(dataset: str, arch, connectivity: str, fan_in: int, seed: int) -> str:
    """The name of a run, e.g. ``cifar100/29-8-8/learned-K4/seed0`` or ``cifar100/resnet38/prev-K1/seed0``
    (docs/run_format.md).

    ``arch`` is "D,w,C" (or a (D, w, C) tuple) or "resnetD"; ``fan_in`` of a ``full`` run is C, of a
    ``prev`` run 1.
    """
    return f"{dataset}/{arch_token(arch)}/{connectivity}-K{int(fan_in)}/seed{int(seed)}"


_CONNS = "|".join(CONNECTIVITIES)
_ARCHS = "|".join(f.token_regex for f in FAMILIES.values())
# The pattern of a run id (Snakemake's wildcard constraint; run ids contain '/').
RUN_ID_REGEX = rf"[^/]+/(?:{_ARCHS})/(?:{_CONNS})-K[0-9]+/seed[0-9]+"
RUN_ID_PARTS = 4  # dataset/arch/connectivity-K<k>/seed<n>
_CONN_RE = re.compile(rf"^({_CONNS})(?:-K(\d+))?$")


def parse_run_id(text: str) -> dict:
    """"cifar100/29-8-8/learned-K4/seed0" -> {dataset, arch ("29,8,8"), connectivity, fan_in, seed}.

    Only the last four parts are read, so a path with the grid in front works too; a baseline run
    (``full``, ``prev``) may leave out its K (C, or 1). Raises ValueError naming the id if it is not one.
    """
    parts = str(text).strip("/").split("/")
    invalid = f"invalid run id {text!r}: expected dataset/arch/connectivity-K<k>/seed<n> (arch: D-w-C or resnetD)"
    if len(parts) < RUN_ID_PARTS:
        raise ValueError(invalid)
    dataset, arch, conn, seed = parts[-RUN_ID_PARTS:]
    m = _CONN_RE.match(conn)
    s = re.fullmatch(r"seed(\d+)", seed)
    if not m or not s:
        raise ValueError(invalid)
    try:
        canonical = canonical_arch(arch)
    except ConfigError:
        raise ValueError(invalid) from None
    fan_in = m.group(2)
    if fan_in is None:
        baseline, k = baseline_of(canonical)
        if m.group(1) != baseline:
            raise ValueError(f"invalid run id {text!r}: connectivity {conn!r} needs -K<k>")
        fan_in = k
    return {"dataset": dataset, "arch": canonical, "connectivity": m.group(1), "fan_in": int(fan_in),
            "seed": int(s.group(1))}


def config_of(run_id_text: str) -> str:
    """The configuration of a run id: the run id less its seed (``digits/20-4-8/learned-K2``)."""
    return run_id_text.rsplit("/", 1)[0]


def run_dir(grid, entry) -> str:
    """``results/runs/<grid>/<run_id>``. ``grid`` is a grid name (or a grid); ``entry`` is a run or a
    mapping with dataset, arch, connectivity, fan_in and seed."""
    name = grid if isinstance(grid, str) else grid.name
    rid = getattr(entry, "run_id", None)
    if rid is None:
        rid = run_id(entry["dataset"], entry["arch"], entry["connectivity"], entry["fan_in"], entry["seed"])
    return f"{RUNS_ROOT}/{name}/{rid}"


# Snakemake's pattern of a run directory, built from the same parts.
RUN_DIR_PATTERN = f"{RUNS_ROOT}/{{grid}}/{{run}}"


# ---- markers, results, logs ---------------------------------------------------------------------------

def data_marker(dataset: str) -> str:
    """Written by ``maskconnect prepare-data`` once a dataset is ready."""
    return f"{DATA_DIR}/{dataset}.prepared.json"


def tracking_marker() -> str:
    """Written once the MLflow store exists (before any training job starts)."""
    return f"{RESULTS}/tracking/store.txt"


def sync_marker(grid: str) -> str:
    return f"{RESULTS}/tracking/{grid}.synced.txt"


def report_marker(grid: str) -> str:
    return f"{RESULTS}/tracking/{grid}.report.txt"


def metrics_file(grid: str) -> str:
    """The grid's aggregated metrics (``maskconnect grid collect``): one JSON, committed."""
    return f"{RESULTS}/metrics/{grid}.json"


def expected_file(grid: str) -> str:
    """The grid's run ids, one per line (the report lists the missing ones)."""
    return f"{RESULTS}/metrics/{grid}.runs.txt"


def summary_dir(grid: str) -> str:
    """The grid's compact results (``grid collect --summary-dir``): one small metrics file per
    configuration (DVC's metrics: ``dvc metrics show`` prints one row each) and the K-effect series."""
    return f"{RESULTS}/metrics/{grid}"


def config_metrics_file(grid: str, config: str) -> str:
    """A configuration's compact metrics: top-1 mean, 95% CI half-width, n, parameters train/test."""
    return f"{summary_dir(grid)}/{config.replace('/', '-')}.json"


def keffect_file(grid: str, dataset: str, arch: str, connectivity: str) -> str:
    """Top-1 against the fan-in K of one model and connectivity (CSV: K, top1, ci95, n)."""
    return f"{summary_dir(grid)}/keffect-{dataset}-{arch.replace(',', '-')}-{connectivity}.csv"


def tables_dir(grid: str) -> str:
    return f"{TABLES}/{grid}"


def log_file(grid: str, step: str, name: str | None = None) -> str:
    return f"{RESULTS}/logs/{grid}/{step}" + (f"/{name}.log" if name else ".log")


def preflight_record(grid: str) -> str:
    """``maskconnect preflight``'s record for a grid; the training jobs of a GPU grid wait for it."""
    return f"{RESULTS}/preflight/{grid}/preflight.json"


def benchmark_file(grid: str, rid: str) -> str:
    return f"{RESULTS}/benchmarks/{grid}/{rid}.tsv"
