"""A grid's results in one JSON object (``maskconnect grid collect``; results/metrics/<grid>.json).

The runs are the runs table (:func:`.runs.scan_runs`: metrics.json with eval.json) of the grid's run
directories; every per-configuration number is a row of :func:`.tables.summarize`, the one summary the
report's tables, REPORT.md and figures are built from. :mod:`.compact` turns the result into DVC's
per-configuration metrics and the K-effect series, so all of them agree to the last digit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..experiments import RESULTS, Grid, config_of, load_grid
from .projection import find_records, projected_vs_measured
from .runs import scan_runs
from .tables import GROUP, summarize

RUN_FIELDS = ("top1", "top5", "best_top1", "params_train", "params_test", "flops", "epochs", "wall_time_s",
              "eval_top1", "pruned_top1", "flops_test")
CONFIG_FIELDS = {"seeds": "n", "top1_mean": "top1_mean", "top1_ci95": "top1_ci95", "top1_std": "top1_std",
                 "top1_best": "top1_best", "params_train_M": "params_train_M", "params_test_M": "params_test_M",
                 "flops": "flops"}


COUNTS = {"params_train", "params_test", "flops", "flops_test", "epochs", "seeds"}


def _json_value(x, key: str):
    """A table cell as JSON: NaN (undefined, or not measured) is null; whole counts are ints."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if hasattr(x, "item"):
        x = x.item()
    return int(x) if key in COUNTS and float(x).is_integer() else x


def runs_table(grid: Grid, part: str, results_dir: str | Path = RESULTS) -> tuple[pd.DataFrame, list[str]]:
    """The runs table of the grid's runs of ``part`` (complete runs only, in the grid's order), and the
    run ids of the grid with no complete run."""
    runs = grid.runs if part == grid.name else grid.runs_of(part)
    tables = []
    for name in dict.fromkeys(r.grid for r in runs):
        df, _ = scan_runs(results_dir, name)
        tables.append(df)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    by_id = {(g, rid): i for i, (g, rid) in enumerate(zip(table.get("grid", []), table.get("run_id", [])))}
    order = [by_id[(r.grid, r.run_id)] for r in runs if (r.grid, r.run_id) in by_id]
    missing = [r.run_id for r in runs if (r.grid, r.run_id) not in by_id]
    return table.iloc[order].reset_index(drop=True), missing


def collect(grid: Grid | str, part: str | None = None, results_dir: str | Path = RESULTS) -> dict:
    """The grid's results in one JSON object (``maskconnect grid collect``; DVC ``metrics:``).

    ``runs``: per run, its row of the runs table (final top-1/top-5 from metrics.json; the model's and
    the pruned model's top-1, parameters and FLOPs from eval.json where there is one). ``configs``: per
    configuration (dataset, model, connectivity, K), its row of :func:`.tables.summarize`: the number of
    seeds, the mean, 95% Student-t half-width, sample std and best of top-1, the parameters (millions)
    before and after pruning, the FLOPs. ``missing``: runs of the grid with no complete metrics.json.
    ``timing``: per configuration, the preflight's projected time against the runs' measured one
    (:mod:`.projection`), runs in progress included.
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    part = part or (grid.parts[0] if len(grid.parts) == 1 else grid.name)
    table, missing = runs_table(grid, part, results_dir)
    per_run = {rid: {k: _json_value(row[k], k) for k in RUN_FIELDS} for rid, (_, row) in zip(table["run_id"], table.iterrows())}
    configs = {}
    if len(table):
        config = dict(zip(map(tuple, table[GROUP].itertuples(index=False, name=None)), table["run_id"].map(config_of)))
        for _, row in summarize(table).iterrows():
            key = (row["dataset"], row["arch"], row["connectivity"], int(row["fan_in"]))
            configs[config[key]] = {k: _json_value(row[c], k) for k, c in CONFIG_FIELDS.items()}
    runs = grid.runs if part == grid.name else grid.runs_of(part)
    timing = projected_vs_measured(runs, find_records([part, grid.name]))
    return {"grid": part, "runs_expected": len(runs), "runs_complete": len(per_run), "missing": missing,
            "configs": configs, "runs": per_run, "timing": timing}
