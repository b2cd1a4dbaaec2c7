# Configuration, the grid, and the helpers the rules share. Nothing here runs a job.

import re
import sys
from pathlib import Path

from snakemake.utils import validate

# The grid logic comes from this checkout's package (src/), also where an older copy is installed.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from maskconnect import experiments as G  # noqa: E402
from maskconnect import slurm as S  # noqa: E402
from maskconnect.errors import ConfigError  # noqa: E402



def config_error(e):
    """Bad configuration: one line naming the key, the value and what is allowed, and exit 2, as every
    `maskconnect` command does for bad input (docs/run_format.md, "Exit codes")."""
    print(f"maskconnect pipeline: error: {e}", file=sys.stderr)
    sys.exit(2)


# Validate the configuration, then the grid file, before any job starts. A bad grid stops here
# with a message naming the grid entry, e.g. "grid 'x' entry 3 (cifar100 29,8,8 learned): invalid
# fan_in=9: an integer K with 1 <= K <= C=8".
try:
    G.check_pipeline_config(config, Path(workflow.basedir) / "pipelines" / "schemas" / "config.schema.yaml")
    validate(config, "../schemas/config.schema.yaml")  # the schema stays the reference (and fills defaults)
    GRID = G.load_grid(config["grid"])
    PREFLIGHT = G.needs_preflight(GRID, config.get("preflight", "auto"))
except ConfigError as e:
    config_error(e)

# (grid, run id) -> maskconnect.experiments.Run
RUNS = {(r.grid, r.run_id): r for r in GRID.runs}
ENV = "../envs/maskconnect.yaml"

# What a job's result depends on beyond its input files, as params (Snakemake reruns a job whose params
# changed): the code its step runs, by content (a checkout that leaves the files as they were reruns
# nothing, as mtimes would), and for a training job the digest of its run's resolved config
# (maskconnect.experiments.inputs; pipelines/README.md, "What each step depends on").
CODE = {step: G.code_digest(step) for step in ("train", "evaluate", "aggregate", "report")}


wildcard_constraints:
    grid="|".join(re.escape(p) for p in GRID.parts),
    run=G.RUN_ID_REGEX,
    dataset="[a-z0-9_]+",


def run_of(wildcards):
    return RUNS[(wildcards.grid, wildcards.run)]


def run_file(name):
    """Pattern of a file in a run directory: results/runs/{grid}/{run}/<name>."""
    return f"{G.RUN_DIR_PATTERN}/{name}"


def grid_run_files(part, names):
    return [f"{r.run_dir}/{n}" for r in GRID.runs_of(part) for n in names]


def slurm_partition(gpus):
    """SLURM partition of a job with `gpus` GPUs (profiles/slurm): $MASKCONNECT_SLURM_PARTITION for
    GPU jobs, $MASKCONNECT_SLURM_CPU_PARTITION (else the cluster's default) for the others."""
    return S.partition(gpus)


def runtime_of(run, attempt):
    """Time limit in minutes: the grid's `runtime` (default 60) times the attempt. A job killed at its
    limit resumes from its checkpoint with a longer limit, so a retry never dies at the same limit."""
    return (run.runtime or 60) * attempt


def attempts_log(step, wildcards):
    """Every attempt's output, appended (Snakemake deletes the declared log before each attempt)."""
    return G.log_file(wildcards.grid, step, wildcards.run).removesuffix(".log") + ".attempts.log"


def preflight_input(wildcards):
    """The grid's preflight record, for the training jobs of a grid that runs one (ancient: a newer
    record, e.g. after a rerun of the preflight, never re-runs a finished training job)."""
    return ancient(G.preflight_record(GRID.name)) if PREFLIGHT else []


REPORT_KINDS = {"fanin": "K-effect", "curves": "training curves", "masks": "masks", "mask_dynamics": "mask dynamics"}


def _report_dataset(wildcards):
    """The dataset a report file is about: figure and table names start with it (``fanin_digits_20-4-8``,
    ``table_digits``); REPORT.md covers the grid."""
    name = getattr(wildcards, "name", None) or (getattr(wildcards, "table", "") or "").removeprefix("table_")
    return name.split("_")[0] if name else "all datasets"


def report_subcategory(wildcards):
    """`snakemake --report`'s subcategory: the dataset, then the kind (claims report, tables, figures)."""
    if getattr(wildcards, "kind", None):
        kind = REPORT_KINDS[wildcards.kind]
    elif getattr(wildcards, "table", None):
        kind = "tables"
    else:
        kind = "claims report"
    return f"{_report_dataset(wildcards)}: {kind}"


def report_labels(wildcards):
    if getattr(wildcards, "kind", None):
        return {"figure": REPORT_KINDS[wildcards.kind], "model": wildcards.name}
    if getattr(wildcards, "table", None):
        return {"table": wildcards.table}
    return {"document": "REPORT.md"}


def all_targets():
    targets = []
    for part in GRID.parts:
        targets += [G.tables_dir(part), G.report_marker(part), G.sync_marker(part), G.metrics_file(part)]
    return targets
