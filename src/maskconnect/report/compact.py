"""The grid's compact results for DVC: one small metrics file per configuration, and top-1 against
the fan-in K per model (written by ``maskconnect grid collect --summary-dir``).

``dvc metrics show`` prints one row per metrics file and one column per key, so a file per
configuration with five keys (top-1 mean, the half-width of its 95% Student-t interval, n, parameters
before and after pruning, in millions) reads as a table, and ``dvc metrics diff`` compares two commits
configuration by configuration. One file for the whole grid would flatten to five columns per
configuration (30 for the demo, 90 for cifar100).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .. import experiments as G
from ..io import atomic_write_json, atomic_write_text


def _round(x, digits: int):
    return None if x is None else round(float(x), digits)


def config_summary(collected: dict) -> dict[str, dict]:
    """configuration -> {top1, ci95, n, params_train_M, params_test_M}: :func:`.aggregate.collect`'s
    ``configs`` (rows of :func:`.tables.summarize`), rounded for ``dvc metrics show``."""
    out = {}
    for config, c in collected["configs"].items():
        if c.get("top1_mean") is None:
            continue
        out[config] = {"top1": _round(c["top1_mean"], 3), "ci95": _round(c.get("top1_ci95"), 3), "n": c["seeds"],
                       "params_train_M": _round(c.get("params_train_M"), 4),
                       "params_test_M": _round(c.get("params_test_M"), 4)}
    return out


def write_summary(grid: G.Grid, part: str, collected: dict, out_dir: str | Path) -> list[Path]:
    """Write the per-configuration metrics files and the K-effect CSVs of ``part`` into ``out_dir``
    (the names of ``experiments.config_metrics_file`` / ``experiments.keffect_file``, relative to it). Every file the
    grid declares is written: a configuration with no complete run yet gets nulls (n = 0), a K with
    no run yet is left out of its series."""
    out_dir = Path(out_dir)
    runs = grid.runs if part == grid.name else grid.runs_of(part)
    summary = config_summary(collected)
    written = []
    empty = {"top1": None, "ci95": None, "n": 0, "params_train_M": None, "params_test_M": None}
    for config in dict.fromkeys(G.config_of(r.run_id) for r in runs):
        path = out_dir / Path(G.config_metrics_file(part, config)).name
        atomic_write_json(path, summary.get(config, empty))
        written.append(path)
    for (ds, arch), kinds in G.keffect_series(runs).items():
        for conn in kinds:
            rows = sorted({(r.fan_in, G.config_of(r.run_id)) for r in runs
                           if (r.dataset, r.arch, r.connectivity) == (ds, arch, conn)})
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["K", "top1", "ci95", "n"])
            for k, config in rows:
                s = summary.get(config)
                if s is not None:
                    w.writerow([k, s["top1"], "" if s["ci95"] is None else s["ci95"], s["n"]])
            path = out_dir / Path(G.keffect_file(part, ds, arch, conn)).name
            atomic_write_text(path, buf.getvalue())
            written.append(path)
    return written
