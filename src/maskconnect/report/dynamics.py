"""What the masks did, and whether each run converged: a REPORT.md section read from history.csv and
metrics.json (docs/run_format.md), so an unconverged run is never presented as a finding.

For every Learned configuration (dataset, model, K, mask rule) over its seeds, at the end of the joint
phase: normalised row entropy (entropy / the uniform row's, ln C for a ResNeXt; 1 is uniform), rows whose top-K set still changed in the
last joint epoch, rows tied at the K-th place (saturated: decided by ties, not by learning), entries at
the upper bound, and rows decided by ties at freezing. For every run: the change of test top-1 over its
last epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from ..specs import make_spec
from .paper import model_label

# A learned configuration's masks "converged" when, at the end of the joint phase, the rows moved away
# from uniform (entropy below 0.97 ln C, the acceptance bar of docs/design.md section 8), at most 10% of the rows still change their
# top-K set per epoch, and no row is tied at the K-th place.
ENTROPY_BAR, CHANGED_BAR = 0.97, 0.10
# A run's accuracy "converged" when test top-1 moved by at most this many points over the last epochs.
TOP1_WINDOW, TOP1_BAR = 3, 1.0


def _history(path: str) -> pd.DataFrame | None:
    p = Path(path) / "history.csv"
    try:
        h = pd.read_csv(p)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    return h if len(h) and "epoch" in h else None


def _metrics(path: str) -> dict:
    try:
        return json.loads((Path(path) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def uniform_entropy(dataset: str, arch: str, k: int, cardinality: float | None = None) -> float:
    """Mean entropy of a uniform row over the rows with a choice (more candidates than K): ln C for a
    ResNeXt; for a ResNet the mean of ln(candidates) over its rows with more than K."""
    try:
        spec = make_spec(arch, dataset=dataset, connectivity="learned", fan_in=int(k))
    except ConfigError:
        return math.log(float(cardinality)) if cardinality else float("nan")
    free = [math.log(n) for n in spec.fam.row_candidates(spec) if n > k]
    return sum(free) / len(free) if free else float("nan")


def _to_khot(entropy: float, uniform: float, k: int) -> float:
    if not uniform > math.log(k):
        return float("nan")
    return (uniform - entropy) / (uniform - math.log(k))


def _f(x, fmt: str = ".3f") -> str:
    """A number for the table; '-' where the run's files do not have it (older run formats)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def mask_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per Learned run: the mask statistics at the end of its joint phase."""
    rows = []
    for r in runs[runs["connectivity"] == "learned"].itertuples():
        h = _history(r.path)
        if h is None or "mask_entropy" not in h:
            continue
        joint = h[h["phase"] == "joint"] if "phase" in h else h
        if joint.empty:
            continue
        end = joint.iloc[-1]
        m = _metrics(r.path)
        n_rows = m.get("mask_rows") or None
        uniform = uniform_entropy(r.dataset, r.arch, int(r.fan_in), r.cardinality)
        rows.append({
            "dataset": r.dataset, "arch": r.arch, "fan_in": int(r.fan_in), "seed": r.seed,
            "rule": (m.get("config") or {}).get("mask_rule", m.get("mask_rule", "clip")),
            "joint_epochs": len(joint), "entropy_ratio": float(end["mask_entropy"]) / uniform,
            # 0 at a uniform row, 1 at a K-hot row (entropy ln K): how far the rows went towards a wiring
            "to_khot": _to_khot(float(end["mask_entropy"]), uniform, int(r.fan_in)),
            "changed_last": float(end.get("mask_changed", float("nan"))),
            "ties_end": float(end.get("mask_ties", float("nan"))), "at_1": float(end.get("mask_at_1", float("nan"))),
            "tied_at_freeze": m.get("mask_tied_rows"), "rows": n_rows,
        })
    return pd.DataFrame(rows)


def accuracy_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: how much test top-1 moved over its last TOP1_WINDOW epochs."""
    rows = []
    for r in runs.itertuples():
        h = _history(r.path)
        if h is None or "test_top1" not in h:
            continue
        tail = pd.to_numeric(h["test_top1"], errors="coerce").dropna().tail(TOP1_WINDOW)
        if len(tail):
            rows.append({"dataset": r.dataset, "arch": r.arch, "connectivity": r.connectivity, "fan_in": int(r.fan_in),
                         "seed": r.seed, "epochs": len(h), "top1_move": float(tail.max() - tail.min())})
    return pd.DataFrame(rows)


def dynamics_markdown(runs: pd.DataFrame, dataset: str, level: int = 2) -> str:
    g = runs[runs["dataset"] == dataset]
    masks, acc = mask_rows(g), accuracy_rows(g)
    if masks.empty and acc.empty:
        return ""
    h = "#" * level
    lines = [f"{h} What the masks did ({dataset})", ""]
    if not masks.empty:
        lines += ["At the end of the joint phase, mean over seeds, over the rows with a choice. Entropy is the "
                  "row entropy / a uniform row's, ln C for a ResNeXt, the mean ln(candidates) for a ResNet "
                  "(1 = uniform); *to K-hot*: (ln C - entropy) / (ln C - ln K), 0 for uniform rows and 1 for K-hot "
                  "rows; *changed*: rows whose top-K set changed in the last joint epoch (in the demo that epoch "
                  "runs at LR/10); *tied*: rows whose K-th and (K+1)-th values are equal (saturated rows "
                  "included); *at 1.0*: fraction of entries at the upper clip bound; *ties at freezing*: rows a "
                  "random draw had to decide; '-': not in the run's files (an older run format).", "",
                  "| model | K | rule | seeds | joint epochs | entropy / ln C | to K-hot | changed | tied | at 1.0 | ties at freezing | masks |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for (arch, k, rule), gk in masks.groupby(["arch", "fan_in", "rule"]):
            rows_n = gk["rows"].dropna()
            changed, ties_end = gk["changed_last"].mean(), gk["ties_end"].max()
            ties = gk["tied_at_freeze"].dropna()
            if rows_n.empty or math.isnan(changed) or math.isnan(ties_end):
                verdict = "unknown"
            elif gk["entropy_ratio"].mean() < ENTROPY_BAR and changed / rows_n.mean() <= CHANGED_BAR and ties_end == 0:
                verdict = "converged"
            else:
                verdict = "**not converged**"
            lines.append(f"| {model_label(arch)} | {k} | {rule} | {len(gk)} | {int(gk['joint_epochs'].max())} | "
                         f"{_f(gk['entropy_ratio'].mean())} | {_f(gk['to_khot'].mean(), '.2f')} | {_f(changed, '.1f')} | "
                         f"{_f(gk['ties_end'].mean(), '.1f')} | {_f(gk['at_1'].mean())} | "
                         f"{'-' if ties.empty else _f(float(ties.mean()), '.1f')} | {verdict} |")
        lines += ["", f"*converged*: entropy / ln C < {ENTROPY_BAR}, at most {CHANGED_BAR:.0%} of rows changing in the "
                  "last joint epoch, no tied row. Masks that did not converge were frozen from a near-uniform or "
                  "saturated state, and Learned results from them say little about learned connectivity.", ""]
    if not acc.empty:
        bad = acc[acc["top1_move"] > TOP1_BAR]
        lines.append(f"Accuracy convergence: test top-1 moved by at most {acc['top1_move'].max():.2f} points over the "
                     f"last {TOP1_WINDOW} epochs of any run ({len(acc)} runs, bar {TOP1_BAR} point)."
                     if bad.empty else
                     f"**{len(bad)} of {len(acc)} runs had not converged**: test top-1 still moved by more than "
                     f"{TOP1_BAR} point over their last {TOP1_WINDOW} epochs (largest {bad['top1_move'].max():.2f}); "
                     "their comparisons are not findings.")
        lines.append("")
    return "\n".join(lines)
