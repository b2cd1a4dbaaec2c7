"""``maskconnect report``: tables, figures and the claims report from a results folder.

Registering the subcommand imports none of the report extra (pandas, scipy, seaborn, matplotlib,
jinja2): the GPU box that has torch alone still gets a working ``maskconnect --help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, MaskConnectError

REPORT_EXTRA = {"pandas", "scipy", "seaborn", "matplotlib", "jinja2"}


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


def register(sub) -> None:
    p = sub.add_parser("report", help="tables, figures and the claims report from a results folder",
                       description="Build the paper's tables (LaTeX, Markdown, CSV), figures and REPORT.md from "
                                   "run directories (metrics.json is the source of truth).")
    add_report_arguments(p)
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """`maskconnect report`: build the report; user errors raise MaskConnectError (exit code 2)."""
    from ..io import check_output_dir
    from ..report import build_report, read_expected
    from .messages import one_line_warnings

    try:
        from ..report.runs import check_results, expected_keys
    except ModuleNotFoundError as e:
        if e.name not in REPORT_EXTRA:
            raise
        raise MaskConnectError(f"the report needs {e.name}: pip install 'maskconnect[report]'") from e
    check_results(args.results, args.grid)
    expected = None
    if getattr(args, "expected", None) is not None:
        try:
            expected = read_expected(args.expected)
            expected_keys(expected)  # fail here, naming the file, on a malformed run id
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError("expected", str(args.expected), f"a readable list of run ids ({e})") from e
    check_output_dir(args.out, "--out")  # before the work: an unusable path fails in a second, exit 2
    with one_line_warnings("report"):
        written = build_report(args.results, args.out, grid=args.grid, expected=expected,
                               on_warning=lambda text: print(f"warning: {text}", file=sys.stderr))
    print(f"wrote {len(written)} files under {args.out}; see {Path(args.out) / 'REPORT.md'}")
    return 0
