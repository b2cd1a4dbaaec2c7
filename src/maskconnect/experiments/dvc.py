"""dvc.yaml, generated from a grid (``maskconnect grid dvc --grid demo --out dvc.yaml``).

The stages are the Snakemake DAG with one stage per job, each running the command of the rule of the
same name (:mod:`.commands`); the plots overlay each configuration's seeds and draw the K-effect.
A test checks that the committed dvc.yaml equals the generated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .commands import (aggregate_command, evaluate_command, needs_preflight, preflight_command, prepare_command,
                       report_command, tracking_init_command, tracking_report_command, tracking_sync_command,
                       train_command)
from .grid import DEFAULT_GRID, Grid, Run, keffect_series
from .inputs import code_deps, project_path, recipe_params, recipes_file
from .loading import load_grid, read_yaml
from .paths import (config_metrics_file, config_of, data_marker, expected_file, keffect_file, metrics_file,
                    preflight_record, report_marker, sync_marker, tables_dir, tracking_marker)


# Entry fields that change what a run computes (and so its `maskconnect train` command); a DVC train
# stage declares them as params of the grid file, and the recipe keys its run reads as params of
# recipes.yaml (.inputs), so `dvc params diff` shows what changed. Every stage depends on its code.
RUN_PARAM_KEYS = ("dataset", "arch", "connectivity", "recipe", "device", "gpus", "train")
DVC_HEADER = """\
# Generated from the grid {name!r} ({source}) by
#     maskconnect grid dvc --grid {ref} > dvc.yaml
# Do not edit: change the grid file and regenerate. tests/test_pipeline.py checks that this file
# equals the generated one. Each stage runs the command of the Snakemake rule of the same name
# (pipelines/rules/*.smk); stage names are <rule>-<run id with '-' for '/'>.
"""


def _param_keys(run: Run, data: Mapping) -> list[str]:
    defaults = data.get("defaults") or {}
    entry = data["entries"][run.entry - 1]
    return ([f"defaults.{k}" for k in RUN_PARAM_KEYS if k in defaults]
            + [f"entries.{run.entry - 1}.{k}" for k in RUN_PARAM_KEYS if k in entry])


def dvc_stages(grid: Grid) -> dict:
    """The ``stages:`` of dvc.yaml for ``grid``: the Snakemake DAG with one stage per job."""
    nocache = {"cache": False}
    stages: dict = {}
    for ds in grid.datasets():
        stages[f"prepare_data-{ds}"] = {"cmd": prepare_command(ds), "outs": [{data_marker(ds): dict(nocache)}]}
    stages["tracking_init"] = {"cmd": tracking_init_command(), "outs": [{tracking_marker(): dict(nocache)}]}
    preflight = needs_preflight(grid)
    if preflight:  # a failed check (exit 1) stops `dvc repro` before any training stage
        stages["preflight"] = {"cmd": preflight_command(grid), "deps": [project_path(grid.path)] + code_deps("train"),
                               "outs": [{preflight_record(grid.name): dict(nocache)}]}
    files = {}
    for part in grid.parts:
        runs = grid.runs_of(part)
        if runs:
            files[part] = read_yaml(Path(runs[0].source))
        for run in runs:
            source = project_path(Path(run.source))
            stages[f"train-{run.slug}"] = {
                "cmd": train_command(run),
                "deps": ([data_marker(run.dataset), tracking_marker()] + ([preflight_record(grid.name)] if preflight else [])
                         + code_deps("train")),
                "params": [{source: _param_keys(run, files[part])}, {recipes_file(): recipe_params(run)}],
                # persist: a stage that runs again resumes or skips the run (`maskconnect train` decides).
                # Per-run files are outputs; the grid's compact summary is the metric, and the
                # top-level plots overlay the runs (dvc_plots)
                "outs": [{f"{run.run_dir}/{name}": {"cache": False, "persist": True}}
                         for name in ("metrics.json", "history.csv")],
            }
        for run in runs:
            stages[f"evaluate-{run.slug}"] = {
                "cmd": evaluate_command(run),
                "deps": [f"{run.run_dir}/metrics.json"] + code_deps("evaluate"),
                "outs": [{f"{run.run_dir}/eval.json": dict(nocache)}],
            }
    for part in grid.parts:
        runs = grid.runs_of(part)
        results = [f"{r.run_dir}/{f}" for r in runs for f in ("metrics.json", "eval.json")]
        stages[f"aggregate-{part}"] = {
            "cmd": aggregate_command(grid, part),
            "deps": results + code_deps("aggregate"),
            "metrics": [{config_metrics_file(part, c): dict(nocache)}
                        for c in dict.fromkeys(config_of(r.run_id) for r in runs)],
            "outs": [{f: dict(nocache)} for f in (metrics_file(part), expected_file(part), *_keffect_files(part, runs))],
        }
        stages[f"report-{part}"] = {
            "cmd": report_command(part),
            "deps": [metrics_file(part), expected_file(part)] + code_deps("report"),
            "outs": [{tables_dir(part): dict(nocache)}],
        }
        stages[f"tracking_sync-{part}"] = {
            "cmd": tracking_sync_command(grid, part),
            "deps": [f"{r.run_dir}/metrics.json" for r in runs] + [tracking_marker()],
            "outs": [{sync_marker(part): dict(nocache)}],
        }
        stages[f"tracking_report-{part}"] = {
            "cmd": tracking_report_command(part),
            "deps": [tables_dir(part), sync_marker(part)],
            "outs": [{report_marker(part): dict(nocache)}],
        }
    return stages


def _keffect_files(part: str, runs: list[Run]) -> list[str]:
    return [keffect_file(part, ds, arch, c) for (ds, arch), kinds in keffect_series(runs).items() for c in kinds]


def dvc_plots(grid: Grid) -> list[dict]:
    """The top-level ``plots:`` of dvc.yaml: per configuration, its runs' test top-1 against the epoch
    overlaid (one line per seed); per model trained at several K, top-1 against K for Learned and
    Fixed-Random (Fixed-Full at K = C)."""
    plots = []
    for part in grid.parts:
        runs = grid.runs_of(part)
        configs: dict[str, list[Run]] = {}
        for r in runs:
            configs.setdefault(config_of(r.run_id), []).append(r)
        for config, members in configs.items():
            plots.append({f"{part}/curves/{config.replace('/', '-')}": {
                "title": f"{part}: {config}, test top-1 (%) per epoch, one line per seed",
                "template": "linear", "x": "epoch", "x_label": "epoch", "y_label": "test top-1 (%)",
                "y": {f"{r.run_dir}/history.csv": "test_top1" for r in members}}})
        for (ds, arch), kinds in keffect_series(runs).items():
            plots.append({f"{part}/k-effect/{ds}-{arch.replace(',', '-')}": {
                "title": f"{part}: {ds} {{{arch}}}, top-1 (%) against the fan-in K (mean over seeds)",
                "template": "linear", "x": "K", "x_label": "fan-in K", "y_label": "test top-1 (%), mean",
                "y": {keffect_file(part, ds, arch, c): "top1" for c in kinds}}})
    return plots


def dvc_yaml(grid: Grid | str = DEFAULT_GRID) -> str:
    """The text of dvc.yaml for ``grid`` (``maskconnect grid dvc``)."""
    import yaml

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    header = DVC_HEADER.format(name=grid.name, source=project_path(grid.path), ref=grid.ref)
    body = yaml.safe_dump({"stages": dvc_stages(grid), "plots": dvc_plots(grid)}, sort_keys=False, width=1000,
                          default_flow_style=False)
    return header + body
