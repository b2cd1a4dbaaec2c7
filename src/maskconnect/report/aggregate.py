"""A grid's results in one JSON object (``maskconnect grid collect``; results/metrics/<grid>.json).

Reads each run's metrics.json and eval.json (docs/run_format.md); :mod:`.compact` turns the result
into DVC's per-configuration metrics and the K-effect series.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..experiments import Grid, config_of, load_grid
from .projection import find_records, projected_vs_measured


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return mean, std


def collect(grid: Grid | str, part: str | None = None) -> dict:
    """The grid's results in one JSON object (``maskconnect grid collect``; DVC ``metrics:``).

    ``runs``: per run, the final top-1/top-5 (metrics.json), the pruned model's top-1 and the
    parameters and FLOPs before and after pruning (eval.json). ``configs``: per configuration
    (dataset, model, connectivity, K), the number of seeds and the mean, sample std and best of
    top-1. ``missing``: runs of the grid with no complete metrics.json. ``timing``: per configuration,
    the preflight's projected time against the runs' measured one (:mod:`.projection`), runs in
    progress included.
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    part = part or (grid.parts[0] if len(grid.parts) == 1 else grid.name)
    runs = grid.runs if part == grid.name else grid.runs_of(part)
    per_run, missing, groups = {}, [], {}
    for run in runs:
        m = _read_json(Path(run.run_dir) / "metrics.json")
        if not isinstance(m, dict) or m.get("status", "complete") != "complete":
            missing.append(run.run_id)
            continue
        ev = _read_json(Path(run.run_dir) / "eval.json") or {}
        row = {k: m.get(k) for k in ("top1", "top5", "best_top1", "params_train", "params_test", "flops",
                                     "epochs", "wall_time_s")}
        if ev:  # eval.json: "model" and "pruned" hold test_top1, test_top5, test_loss
            row["eval_top1"] = (ev.get("model") or {}).get("test_top1")
            row["pruned_top1"] = (ev.get("pruned") or ev.get("model") or {}).get("test_top1")
            row["flops_test"] = ev.get("flops_test")
            for k in ("params_train", "params_test", "flops"):
                if ev.get(k) is not None:
                    row[k] = ev[k]
        per_run[run.run_id] = row
        config = config_of(run.run_id)
        groups.setdefault(config, []).append(row)
    configs = {}
    for config, rows in groups.items():
        mean, std = _mean_std([r["top1"] for r in rows])
        top1 = [r["top1"] for r in rows if isinstance(r.get("top1"), (int, float))]
        configs[config] = {"seeds": len(rows), "top1_mean": mean, "top1_std": std,
                           "top1_best": max(top1) if top1 else None,
                           "params_train": rows[0].get("params_train"), "params_test": _mean_std(
                               [r.get("params_test") for r in rows])[0],
                           "flops": rows[0].get("flops")}
    timing = projected_vs_measured(runs, find_records([part, grid.name]))
    return {"grid": part, "runs_expected": len(runs), "runs_complete": len(per_run), "missing": missing,
            "configs": configs, "runs": per_run, "timing": timing}
