"""Build the whole report: tables, figures, summary CSVs and REPORT.md (see the package docstring)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pandas as pd

from ..errors import ReportWarning
from ..io import atomic_write_text
from . import document, figures, tables
from .paper import model_label
from .runs import check_results, code_provenance, missing_runs, scan_runs


def _slug(*parts) -> str:
    return "_".join(str(p).replace(",", "-").replace("/", "-") for p in parts)


def _figures(runs, summary, fig_dir: Path, out_dir: Path, problems: list[str]) -> list[tuple[str, str]]:
    """Every figure for the runs of one grid (``summary``: theirs, tables.summarize): (caption, PNG path
    relative to out_dir)."""
    made = []

    def draw(caption, fn, *a, **kw):
        # A malformed history.csv or masks.json of one run must not stop the report.
        try:
            paths = fn(*a, **kw)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            problems.append(f"{caption}: {type(e).__name__}: {e}")
            return
        if paths:
            made.append((caption, paths[0].relative_to(out_dir).as_posix()))

    for (ds, arch), g in runs.groupby(["dataset", "arch"], sort=False):
        varied = g[g["connectivity"].isin(["learned", "random"])]
        if len(varied) and (varied["fan_in"].nunique() >= 2 or g["connectivity"].isin(["full", "prev"]).any()):
            draw(f"Effect of fan-in K: {ds}, {model_label(arch)}", figures.plot_fanin, runs, ds, arch,
                 fig_dir / f"fanin_{_slug(ds, arch)}", summary=summary)
        draw(f"Training curves: {ds}, {model_label(arch)}", figures.plot_history, g,
             fig_dir / f"curves_{_slug(ds, arch)}", title=f"{ds}, {model_label(arch)}")
        learned = g[g["connectivity"] == "learned"]
        if len(learned):
            draw(f"Mask dynamics: {ds}, {model_label(arch)} (Learned runs)", figures.plot_mask_dynamics, g,
                 fig_dir / f"mask_dynamics_{_slug(ds, arch)}", title=f"Mask dynamics: {ds}, {model_label(arch)}")
        for k, gk in learned.groupby("fan_in"):
            best = gk.sort_values(["top1", "seed"], ascending=[False, True])
            with_masks = [r for r in best.itertuples() if (Path(r.path) / "masks.json").is_file()]
            if not with_masks:
                continue
            r = with_masks[0]
            caption = f"Learned connectivity: {ds}, {model_label(arch)}, K={k}, seed {r.seed} (best of {len(gk)})"
            draw(caption, figures.plot_masks, Path(r.path) / "masks.json",
                 fig_dir / f"masks_{_slug(ds, arch, f'K{k}', f'seed{r.seed}')}", title=caption)
    return made


def build_report(results_dir, out_dir, *, grid: str | None = None, expected=None,
                 on_warning: Callable[[str], None] | None = None) -> dict[str, Path]:
    """See :func:`maskconnect.report.build_report`."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    root = check_results(results_dir, grid)
    runs, skipped = scan_runs(results_dir, grid)
    if runs.empty:  # the report is still written: REPORT.md lists the runs left out and why
        why = f"; {len(skipped)} run directories were left out (REPORT.md says why)" if skipped else ""
        warnings.warn(f"no complete run (metrics.json) found under {root}{why}: the report has no numbers",
                      ReportWarning, stacklevel=2)
    missing = missing_runs(runs, expected) if expected is not None else None
    written: dict[str, Path] = {}

    def put(path: Path):
        written[path.relative_to(out_dir).as_posix()] = path

    names = sorted(runs["grid"].unique()) or [grid or ""]
    multi = len(names) > 1
    sections, problems, summaries, code, code_warnings = {}, [], [], [], []
    for name in names:
        sub = runs[runs["grid"] == name] if len(runs) else runs
        sub_dir = Path(*name.split("/")) if multi and name else Path()
        summary = tables.summarize(sub)
        summaries.append(summary.assign(grid=name))
        made = []
        for t in tables.build_tables(sub, missing if not multi else None, summary=summary):
            paths = tables.write_table(t, out_dir / "tables" / sub_dir)
            for p in paths.values():
                put(p)
            made.append((t, {ext: p.relative_to(out_dir).as_posix() for ext, p in paths.items()}))
        if len(sub):  # which code made the grid's runs, and each table that mixes commits or has dirty runs
            code.append(f"- {f'grid `{name}`' if name else 'the runs'}: {code_provenance(sub).describe()}.")
            for t, _ in made:
                if t.code is not None and t.code.warning():
                    code_warnings.append(f"table `{t.spec.name}`{f' of grid `{name}`' if name else ''} {t.code.warning()}")
                    code.append(f"- **Warning:** {code_warnings[-1]}.")
        figs = _figures(sub, summary, out_dir / "figures" / sub_dir, out_dir, problems)
        for _, png in figs:
            for ext in ("png", "pdf"):
                put(out_dir / Path(png).with_suffix(f".{ext}"))
        sections[name] = {"runs": sub, "summary": summary, "tables": made, "figures": figs}
    summary = pd.concat(summaries, ignore_index=True).rename(columns={"arch": "model"})
    summary = summary[["grid", *[c for c in summary.columns if c != "grid"]]]
    put(atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False, float_format="%.6g")))
    put(atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False)))
    text = document.report_document(source=str(results_dir) + (f" (grid {grid})" if grid else ""),
                                  n_runs=len(runs), grids=sections, skipped=skipped, missing=missing,
                                  problems=problems, code=code)
    put(atomic_write_text(out_dir / "REPORT.md", text))
    for text in code_warnings if on_warning is not None else ():
        on_warning(f"{text.replace('`', '')} (see {out_dir / 'REPORT.md'})")
    return written
