"""Reports: tables, figures and the claims check, rebuilt from run directories alone.

Reads only what docs/run_format.md promises (metrics.json, eval.json, history.csv, masks.json); never imports
torch or mlflow. Needs the ``report`` extra (pandas, scipy, seaborn, matplotlib, jinja2); this
module itself imports none of them until a report is built. The command line is
:mod:`maskconnect.cli.report`.

    maskconnect report --results results --out results/report [--grid NAME] [--expected FILE]

writes under the output folder:
  REPORT.md                    the paper's claims with our measurements and verdicts, tables, figures
  runs.csv, summary.csv        one row per run; one row per configuration (seed statistics, tests)
  tables/<name>.{tex,md,csv}   booktabs LaTeX fragment, Markdown, numbers
  figures/<name>.{png,pdf}     fan-in sweep, learned connectivity graphs, training curves
With several grids under the results folder, tables and figures go to a sub-folder per grid.

Modules: paper (the paper's numbers), stats (t intervals, Welch), runs (the runs table: one row per
run directory), tables (``summarize``: the one summary, one row per configuration, and the tables),
figures, claims (the paper's claims tested), document (REPORT.md), build (all of it); for ``maskconnect grid collect``: aggregate (the grid's
results JSON, its configurations rows of the same summary), compact (DVC's metrics files and K-effect
CSVs from it) and projection (the preflight's projected time against the measured one).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReportWarning

__all__ = ["build_report", "read_expected", "ReportWarning"]


def build_report(results_dir, out_dir, *, grid: str | None = None, expected=None, on_warning=None) -> dict[str, Path]:
    """Build every table, figure and REPORT.md from the runs under ``results_dir``.

    ``grid`` restricts the scan to ``<results_dir>/runs/<grid>`` (see runs.scan_runs). ``expected``
    is the grid's target list (run ids such as "cifar100/29-8-8/learned-K4/seed0", or mappings with
    dataset, arch, connectivity, fan_in, seed); runs on it that are not complete are listed in the
    tables' notes and in REPORT.md. ``on_warning(text)`` is called for each table whose runs come from
    several commits or include runs trained from a tree with uncommitted changes (REPORT.md says it too).
    Returns the files written, keyed by path relative to ``out_dir``.
    """
    from .build import build_report as build

    return build(results_dir, out_dir, grid=grid, expected=expected, on_warning=on_warning)


def read_expected(path) -> list:
    """Run ids from a file: a JSON list (of ids or mappings) or one id per line ('#' comments)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]
