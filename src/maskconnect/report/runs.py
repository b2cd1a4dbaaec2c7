"""The runs table: every finished training run of a results folder, one row each (docs/run_format.md).

A run is complete when its directory holds ``metrics.json`` with ``"status": "complete"``. Its row is
that file's numbers, with ``maskconnect evaluate``'s eval.json where the run has one: the model's and
the pruned model's top-1 (``eval_top1``, ``pruned_top1``), the pruned model's FLOPs (``flops_test``), and
its parameter and FLOP counts in place of metrics.json's. Every seed statistic of the suite is computed
from this table by :func:`.tables.summarize` (history.csv and masks.json feed the figures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from ..errors import ConfigError
from ..experiments.paths import RUN_ID_PARTS, parse_run_id
from ..specs import baseline_of
from .paper import model_parts, normalize_model

# Columns of the runs table, in order. Accuracies in %, parameters and FLOPs as counts.
RUN_COLUMNS = [
    "grid", "dataset", "arch", "depth", "width", "cardinality", "stage_width", "connectivity", "fan_in", "seed",
    "top1", "top5", "best_top1", "best_top5", "test_loss", "params_train", "params_test", "masks",
    "flops", "epochs", "wall_time_s", "eval_top1", "pruned_top1", "flops_test", "device", "git_commits", "git_dirty",
    "run_id", "path",
]
NUMERIC = ["top1", "top5", "best_top1", "best_top5", "test_loss", "params_train", "params_test", "masks", "flops",
           "epochs", "wall_time_s", "eval_top1", "pruned_top1", "flops_test"]
KEY = ["dataset", "arch", "connectivity", "fan_in", "seed"]
# A run id has RUN_ID_PARTS parts, dataset/arch/connectivity-K/seedN (maskconnect.experiments.run_id);
# whatever lies above them under the scanned folder is the grid's name.


UNKNOWN_COMMIT = "unknown"   # a run whose metrics.json records no commit (no git, or written before the record)


def run_code(metrics: Mapping) -> tuple[str, bool | None]:
    """The commits a run was trained from, in order, space-separated (one, or several for a run resumed
    under other code: ``code_history``; else ``git_commit``), and whether any of its epochs was trained
    from a tree with uncommitted changes (None: not recorded)."""
    history = metrics.get("code_history") or [{"git_commit": metrics.get("git_commit"),
                                               "git_dirty": metrics.get("git_dirty")}]
    commits = dict.fromkeys(h.get("git_commit") or UNKNOWN_COMMIT for h in history)
    dirty = [h.get("git_dirty") for h in history]
    return " ".join(commits), (True if True in dirty else None if None in dirty else False)


@dataclass(frozen=True)
class Provenance:
    """Which code trained a set of runs (:func:`code_provenance`). ``commits``: commit -> runs it trained
    (a run resumed under other code counts for each of its commits)."""

    runs: int
    commits: dict = field(default_factory=dict)
    dirty: int = 0          # runs with an epoch trained from a tree with uncommitted changes
    unrecorded: int = 0     # runs whose tree state was not recorded

    def warning(self) -> str | None:
        """What a reader of a table must know: several commits, or uncommitted changes; None if neither."""
        issues = []
        if len(self.commits) > 1:
            issues.append(f"mixes runs of {len(self.commits)} commits ({', '.join(short_commit(c) for c in self.commits)})")
        if self.dirty:
            issues.append(f"includes {self.dirty} run{'s' if self.dirty != 1 else ''} trained from a tree with "
                          "uncommitted changes")
        return " and ".join(issues) or None

    def describe(self) -> str:
        """The commits with their runs and the tree state, e.g. ``commit 314a9eb904e8 (18 runs); clean tree``."""
        listed = ", ".join(f"{short_commit(c)} ({n} run{'s' if n != 1 else ''})" for c, n in self.commits.items())
        state = []
        if self.dirty:
            state.append(f"{self.dirty} run{'s' if self.dirty != 1 else ''} with uncommitted changes")
        if self.unrecorded:
            state.append(f"tree state not recorded for {self.unrecorded}")
        return f"commit{'s' if len(self.commits) != 1 else ''} {listed}; " + (", ".join(state) or "clean tree")


def short_commit(commit: str) -> str:
    return commit if commit == UNKNOWN_COMMIT else commit[:12]


def code_provenance(runs: pd.DataFrame) -> Provenance:
    """The :class:`Provenance` of the runs of a table (columns ``git_commits``, ``git_dirty``)."""
    commits: dict[str, int] = {}
    for text in runs["git_commits"]:
        for c in str(text).split():
            commits[c] = commits.get(c, 0) + 1
    dirty = runs["git_dirty"]
    return Provenance(runs=len(runs), commits=dict(sorted(commits.items(), key=lambda kv: (-kv[1], kv[0]))),
                      dirty=int((dirty == True).sum()), unrecorded=int(dirty.isna().sum()))  # noqa: E712


@dataclass(frozen=True)
class Skipped:
    """A directory that looks like a run but is not counted, and why."""

    path: str
    reason: str


def _root(results_dir: Path, grid: str | None) -> Path:
    base = results_dir / "runs" if (results_dir / "runs").is_dir() else results_dir
    if grid is None:
        return base
    for cand in (base / grid, results_dir / grid):
        if cand.is_dir():
            return cand
    return base / grid  # may not exist yet: a grid with no finished run


def check_results(results_dir, grid: str | None = None) -> Path:
    """The folder a report of ``grid`` reads; a :class:`ConfigError` when ``results_dir`` is not a folder,
    or when ``grid`` has no folder there (a typo, or a grid that never ran: a report of it would
    have no run to show)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError("results", str(results_dir), "an existing folder holding run directories")
    root = _root(results_dir, grid)
    if grid is not None and not root.is_dir():
        base = results_dir / "runs"
        there = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise ConfigError("grid", grid, f"a grid with run directories under {results_dir} "
                                        f"({', '.join(there) if there else f'none in {base}'})")
    return root


def _row(metrics: Mapping, run_dir: Path, root: Path, grid: str | None) -> dict:
    arch = metrics.get("arch")
    if arch is None and all(metrics.get(k) is not None for k in ("depth", "width", "cardinality")):
        arch = f"{metrics['depth']},{metrics['width']},{metrics['cardinality']}"
    if arch is None:
        raise KeyError("arch")
    arch = normalize_model(arch)
    parts = model_parts(arch)
    depth, width, card = parts if parts else (metrics.get("depth"), metrics.get("width"),
                                              metrics.get("cardinality"))
    conn = str(metrics["connectivity"])
    fan_in = metrics.get("fan_in")
    if fan_in is None and conn in ("full", "prev"):
        fan_in = baseline_of(arch)[1]  # the fan-in of a model's own wiring: C (Fixed-Full), 1 (Fixed-Prev)
    rel = run_dir.relative_to(root)
    if grid is None:
        grid = "/".join(rel.parts[:-RUN_ID_PARTS]) if len(rel.parts) > RUN_ID_PARTS else ""
    row = {k: metrics.get(k) for k in RUN_COLUMNS}
    row.update(_evaluation(run_dir))
    row["git_commits"], row["git_dirty"] = run_code(metrics)
    row.update(grid=grid, dataset=str(metrics["dataset"]), arch=arch, depth=depth, width=width,
               cardinality=card, connectivity=conn, fan_in=int(fan_in), seed=int(metrics["seed"]),
               top1=float(metrics["top1"]), run_id=rel.as_posix(), path=str(run_dir))
    return row


def _evaluation(run_dir: Path) -> dict:
    """eval.json's fields of the runs table (none when the run has no readable eval.json)."""
    try:
        ev = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(ev, dict):
        return {}
    model = ev.get("model") if isinstance(ev.get("model"), dict) else {}
    pruned = ev.get("pruned") if isinstance(ev.get("pruned"), dict) else model
    out = {"eval_top1": model.get("test_top1"), "pruned_top1": pruned.get("test_top1"), "flops_test": ev.get("flops_test")}
    out.update({k: ev[k] for k in ("params_train", "params_test", "flops") if ev.get(k) is not None})
    return out


def scan_runs(results_dir, grid: str | None = None) -> tuple[pd.DataFrame, list[Skipped]]:
    """All complete runs under ``results_dir`` (recursively), and the run directories left out.

    ``results_dir`` may be the results folder (holding ``runs/<grid>/...``), a grid's folder, or any
    folder with run directories below it. With ``grid``, only ``runs/<grid>`` is scanned. The
    ``grid`` column is the part of a run's path above its four-part run id ("" if none).
    Runs left out: unreadable or incomplete metrics.json, directories with a config or history but
    no metrics.json (in progress or crashed), and a second copy of the same run in one grid.
    """
    results_dir = Path(results_dir)
    root = _root(results_dir, grid)
    rows, skipped = [], []
    if not root.is_dir():
        return pd.DataFrame(columns=RUN_COLUMNS), skipped
    for mpath in sorted(root.rglob("metrics.json")):
        try:
            metrics = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            skipped.append(Skipped(str(mpath.parent), f"unreadable metrics.json: {e}"))
            continue
        if not isinstance(metrics, dict) or metrics.get("status") != "complete":
            status = metrics.get("status") if isinstance(metrics, dict) else None
            skipped.append(Skipped(str(mpath.parent), f"status is {status!r}, not 'complete'"))
            continue
        try:
            rows.append(_row(metrics, mpath.parent, root, grid))
        except (KeyError, TypeError, ValueError) as e:
            skipped.append(Skipped(str(mpath.parent), f"metrics.json lacks a usable field: {e}"))
    done = {Path(r["path"]) for r in rows} | {Path(s.path) for s in skipped}
    for marker in ("config.json", "history.csv"):
        for p in sorted(root.rglob(marker)):
            if p.parent not in done:
                done.add(p.parent)
                skipped.append(Skipped(str(p.parent), "no metrics.json: in progress or stopped"))
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    dup = df.duplicated(subset=["grid", *KEY], keep="first")
    for path in df.loc[dup, "path"]:
        skipped.append(Skipped(path, "same grid, dataset, arch, connectivity, K and seed as another run"))
    df = df[~dup].reset_index(drop=True)
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("fan_in", "seed"):
        df[col] = df[col].astype(int)
    return df, skipped


# ---- expected runs (a grid's target list) -----------------------------------------------------------

def expected_keys(expected: Iterable) -> list[tuple]:
    """Run keys (dataset, arch, connectivity, fan_in, seed) from run ids or mappings with those keys."""
    keys = []
    for item in expected:
        if isinstance(item, str):
            d = parse_run_id(item)
        elif isinstance(item, Mapping):
            d = dict(item)
            d["arch"] = normalize_model(d["arch"])
            if d.get("fan_in") is None and d["connectivity"] in ("full", "prev"):
                d["fan_in"] = baseline_of(d["arch"])[1]
        else:
            d = dict(zip(KEY, item))
            d["arch"] = normalize_model(d["arch"])
        keys.append((str(d["dataset"]), d["arch"], str(d["connectivity"]), int(d["fan_in"]), int(d["seed"])))
    return keys


def missing_runs(runs: pd.DataFrame, expected: Iterable) -> pd.DataFrame:
    """The expected runs (run ids or mappings) with no complete run; columns KEY."""
    have = set(map(tuple, runs[KEY].itertuples(index=False, name=None))) if len(runs) else set()
    miss = [k for k in dict.fromkeys(expected_keys(expected)) if k not in have]
    return pd.DataFrame(miss, columns=KEY)
