"""The command of every pipeline step: the one text a Snakemake job (pipelines/rules/*.smk) and its
DVC stage (dvc.yaml, :mod:`.dvc`) both run.

Each is a ``maskconnect`` command line (a GPU job under ``maskconnect gpu-slot``); the rules add only
where the output and the log go.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import ConfigError
from .grid import Grid, Run
from .paths import (RESULTS, data_marker, expected_file, metrics_file, preflight_record, report_marker,
                    summary_dir, sync_marker, tables_dir, tracking_marker)


def launcher(gpus: int) -> str:
    """What a GPU job's command starts with: a free GPU slot (``maskconnect gpu-slot``), and for
    more than one GPU torchrun with one process per GPU. Empty for CPU jobs."""
    if gpus <= 0:
        return ""
    if gpus == 1:
        return "maskconnect gpu-slot --gpus 1 -- "
    return f"maskconnect gpu-slot --gpus {gpus} -- torchrun --standalone --nproc-per-node {gpus} -m "


def _join(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def prepare_command(dataset: str) -> str:
    return f"maskconnect prepare-data --dataset {dataset} --marker {data_marker(dataset)}"


def tracking_init_command() -> str:
    # (DVC does not create an output's folder; the mkdir goes once `track init` writes a --marker)
    return f"mkdir -p {Path(tracking_marker()).parent.as_posix()} && maskconnect track init > {tracking_marker()}"


def check_pipeline_config(config: Mapping, schema_path: Path | str) -> None:
    """The pipeline's configuration (pipelines/config.yaml and ``--config key=value``) against its schema,
    key by key: the first problem is a :class:`ConfigError` naming the key, the value and what the
    schema's description says is allowed, one line, where Snakemake's ``validate`` prints the whole
    schema around it. (The Snakefile validates with the schema itself too, after this.)"""
    import difflib

    import jsonschema

    from .loading import read_yaml

    schema = read_yaml(Path(schema_path))
    props = schema.get("properties", {})
    for key, value in config.items():
        if key not in props:
            close = difflib.get_close_matches(str(key), list(props), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, value, f"not a key of the pipeline's configuration{hint}; the keys are "
                                          f"{', '.join(props)}")
    for key, prop in props.items():
        if key not in config:
            if key in schema.get("required", []):
                raise ConfigError(key, None, f"{prop.get('description', '')} (it is required)")
            continue
        cls = jsonschema.validators.validator_for(schema)
        if any(True for _ in cls(prop).iter_errors(config[key])):
            value = "" if config[key] is None else config[key]  # `--config grid=` gives None
            raise ConfigError(key, value, prop.get("description", "see the schema"))


def needs_preflight(grid: "Grid", setting: str | bool = "auto") -> bool:
    """Whether the pipeline runs ``maskconnect preflight`` before the grid's training jobs: ``auto``
    (the default) for a grid whose runs go to a GPU, ``true``/``false`` to force it."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "true", "false"):
        raise ConfigError("preflight", setting, "auto (GPU grids), true or false")
    if setting != "auto":
        return setting == "true"
    return any(r.gpus > 0 or r.device.startswith("cuda") for r in grid.runs)


def preflight_command(grid: "Grid") -> str:
    """The preflight job: one GPU (a GPU grid), the grid's checks, its record."""
    gpus = 1 if any(r.gpus > 0 for r in grid.runs) else 0
    out = Path(preflight_record(grid.name)).parent.as_posix()
    return f"{launcher(gpus)}maskconnect preflight --grid {grid.ref} --out {out}"


def train_command(run: Run) -> str:
    # --replace: when a grid's training settings change, the old run is moved aside, not mixed in.
    return (f"{launcher(run.gpus)}maskconnect train {_join(run.train_args())} --out {run.run_dir} "
            "--replace --progress lines")


def evaluate_command(run: Run) -> str:
    return f"{launcher(min(run.gpus, 1))}maskconnect evaluate --run {run.run_dir} --device {run.device}"


def aggregate_command(grid: Grid, part: str) -> str:
    return (f"maskconnect grid collect --grid {_grid_ref(grid, part)} "
            f"--out {metrics_file(part)} --expected-out {expected_file(part)} --summary-dir {summary_dir(part)}")


def report_command(part: str) -> str:
    return (f"maskconnect report --results {RESULTS} --out {tables_dir(part)} --grid {part} "
            f"--expected {expected_file(part)}")


def tracking_sync_command(grid: Grid, part: str) -> str:
    dirs = " ".join(r.run_dir for r in grid.runs_of(part))
    return f"mkdir -p {Path(sync_marker(part)).parent.as_posix()} && maskconnect track sync {dirs} > {sync_marker(part)}"


def tracking_report_command(part: str) -> str:
    return f"maskconnect track log-report --report-dir {tables_dir(part)} --marker {report_marker(part)}"


def _grid_ref(grid: Grid, part: str) -> str:
    return grid.ref if part == grid.name else part
