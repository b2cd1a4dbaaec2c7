"""Reports: tables, figures and the claims check, rebuilt from run directories alone.

Reads only what docs/run_format.md promises (metrics.json, history.csv, masks.json); never imports
torch or mlflow. Needs the ``report`` extra (pandas, scipy, seaborn, matplotlib, jinja2); this
module itself imports none of them until a report is built, so the CLI can register the
``report`` subcommand where only torch is installed.

    maskconnect report --results results --out results/report [--grid NAME] [--expected FILE]

writes under the output folder:
  REPORT.md                    the paper's claims with our measurements and verdicts, tables, figures
  runs.csv, summary.csv        one row per run; one row per configuration (seed statistics, tests)
  tables/<name>.{tex,md,csv}   booktabs LaTeX fragment, Markdown, numbers
  figures/<name>.{png,pdf}     fan-in sweep, learned connectivity graphs, training curves
With several grids under the results folder, tables and figures go to a sub-folder per grid.

Modules: paper (the paper's numbers), stats (t intervals, Welch), runs (collect run directories),
tables, figures, claims (REPORT.md), build (all of it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, MaskConnectError

__all__ = ["build_report", "add_report_arguments", "run_report", "read_expected"]


def build_report(results_dir, out_dir, *, grid: str | None = None, expected=None) -> dict[str, Path]:
    """Build every table, figure and REPORT.md from the runs under ``results_dir``.

    ``grid`` restricts the scan to ``<results_dir>/runs/<grid>`` (see runs.scan_runs). ``expected``
    is the grid's target list (run ids such as "cifar100/29-8-8/learned-K4/seed0", or mappings with
    dataset, arch, connectivity, fan_in, seed); runs on it that are not complete are listed in the
    tables' notes and in REPORT.md. Returns the files written, keyed by path relative to ``out_dir``.
    """
    from .build import build_report as build

    return build(results_dir, out_dir, grid=grid, expected=expected)


# ---- command line -----------------------------------------------------------------------------------

def read_expected(path) -> list:
    """Run ids from a file: a JSON list (of ids or mappings) or one id per line ('#' comments)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `maskconnect report`."""
    parser.add_argument("--results", required=True, type=Path,
                        help="results folder (holding runs/<grid>/...) or any folder with run directories")
    parser.add_argument("--out", required=True, type=Path, help="folder for REPORT.md, tables/ and figures/")
    parser.add_argument("--grid", default=None, help="only the runs of this grid (results/runs/<grid>)")
    parser.add_argument("--expected", default=None, type=Path,
                        help="file listing the grid's run ids (one per line, or a JSON list); "
                             "those without a complete run are reported as missing")
    return parser


REPORT_EXTRA = {"pandas", "scipy", "seaborn", "matplotlib", "jinja2"}


def run_report(args: argparse.Namespace) -> int:
    """`maskconnect report`: build the report; user errors raise MaskConnectError (exit code 2)."""
    try:
        from .runs import expected_keys
    except ModuleNotFoundError as e:
        if e.name not in REPORT_EXTRA:
            raise
        raise MaskConnectError(f"the report needs {e.name}: pip install 'maskconnect[report]'") from e
    expected = None
    if getattr(args, "expected", None) is not None:
        try:
            expected = read_expected(args.expected)
            expected_keys(expected)  # fail here, naming the file, on a malformed run id
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError("expected", str(args.expected), f"a readable list of run ids ({e})") from e
    written = build_report(args.results, args.out, grid=args.grid, expected=expected)
    print(f"wrote {len(written)} files under {args.out}; see {Path(args.out) / 'REPORT.md'}")
    return 0
