"""REPORT.md: how to read it, then per grid the claims, the mask dynamics, the tables and the figures,
and the runs missing or left out (``build.build_report`` assembles the parts)."""

from __future__ import annotations

import pandas as pd

from ..experiments import run_id
from .claims import NONINFERIORITY_MARGIN, PRUNE_MIN, claims_markdown
from .dynamics import dynamics_markdown
from .runs import KEY
from .stats import ALPHA
from .tables import markdown_document

METHOD = f"""\
How to read this report: every number of ours is the final test accuracy (%) over seeds, given as
mean ± half-width of the 95% Student-t interval (\"n=1\" where one seed gives no interval). Comparisons
use Welch's two-sided t-test on the seeds (Δ with its 95% interval). A claim is **reproduced** when the
effect has the claimed sign with p < {ALPHA}, **not reproduced** when the opposite effect has p < {ALPHA}
(claim 4: or pruning removes less than {PRUNE_MIN:.0%} of the parameters, or K=1 is worse by more than
{NONINFERIORITY_MARGIN} points over its whole interval), and **inconclusive** otherwise (too few seeds,
no variance, p ≥ {ALPHA}). Claim 4's "about equal accuracy" is a non-inferiority check: the lower end of
the 95% interval of (K=1 − Fixed-Full) must lie above −{NONINFERIORITY_MARGIN} points. The overhead
claims (5 and 9) compare mean training wall times of Learned and Fixed-Random runs of the same network and
K: reproduced when the 95% interval of the overhead lies at or below the paper's number (read as an upper
bound), not reproduced when it lies above it. A ResNet's own wiring is Fixed-Prev (each block reads its
predecessor: the standard ResNet). The paper's numbers come from its tables (best (mean ± std) over 4
runs; Table 1 and ResNet-50 single values) and Fig. 3 and Fig. 2 (read off the bar charts).
Known inconsistencies in the paper: its text claims gains "up to 2.2%" while Table 2 gives +2.37 and
+1.82 (best over best); Table 3 lists ResNeXt-101 32x4d top-5 as 94.1 where ResNeXt's paper gives 94.4.
We compare with the table values.
"""


def report_document(*, source: str, n_runs: int, grids: dict, skipped: list, missing: pd.DataFrame | None,
                    problems: list[str], code: list[str] = ()) -> str:
    """REPORT.md. ``grids`` maps a grid name ("" for none) to a dict with ``runs`` (DataFrame),
    ``tables`` (list of (Table, {ext: relative path})) and ``figures`` (list of (caption, relative png)).
    ``code``: Markdown list items naming the commits the runs came from, and warnings (build.py)."""
    lines = ["# MaskConnect reproduction report", "",
             f"Runs from `{source}`: {n_runs} complete, {len(skipped)} left out"
             + (f", {len(missing)} expected but missing" if missing is not None else "") + ".", ""]
    if code:
        lines += ["Code the runs were trained from (a run resumed under other code counts for each of its commits):",
                  "", *code, ""]
    lines.append(METHOD)
    multi = len(grids) > 1
    for name, part in grids.items():
        base = 2
        if multi or name:
            lines += [f"## Grid `{name or '(top level)'}`", ""]
            base = 3
        runs = part["runs"]
        if runs.empty:
            lines += ["No complete run yet.", ""]
        for ds in dict.fromkeys(runs["dataset"]):
            lines.append(claims_markdown(runs, ds, level=base, summary=part.get("summary")))
            lines.append(dynamics_markdown(runs, ds, level=base))
        if part["tables"]:
            lines += ["#" * base + " Tables", ""]
            for table, paths in part["tables"]:
                links = ", ".join(f"[{ext}]({p})" for ext, p in paths.items())
                lines += [markdown_document(table, level=base + 1).rstrip("\n"), f"- Files: {links}.", ""]
        if part["figures"]:
            lines += ["#" * base + " Figures", ""]
            for caption, png in part["figures"]:
                lines += [f"**{caption}**", "", f"![{caption}]({png})", ""]
    if missing is not None and len(missing):
        lines += ["## Missing runs", "", f"{len(missing)} expected runs have no complete run:", ""]
        lines += [f"- `{run_id(*r)}`" for r in missing[KEY].itertuples(index=False, name=None)]
        lines.append("")
    if skipped:
        lines += ["## Run directories left out", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in skipped]
        lines.append("")
    if problems:
        lines += ["## Figures not drawn", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)
