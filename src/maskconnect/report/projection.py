"""Does the preflight's projection hold? Projected against measured time, per configuration.

The preflight record (``experiments.preflight_record``: results/preflight/<grid>/preflight.json)
prices every run of its grid: per phase, the seconds of an epoch's steps and evaluation, which is
what a run's history.csv measures as ``epoch_time_s``; the training loop with the checkpoints
(metrics.json's ``wall_time_s``); the whole process (Snakemake's benchmark file of the job, where
the pipeline ran it). This compares each with what the runs measured, as soon as a run has one epoch
in its history.csv. ``grid collect`` shows it (``timing``).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..experiments import benchmark_file, config_of, preflight_record


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _epoch_times(run_dir: Path) -> dict[str, list[float]]:
    """history.csv's epoch_time_s by phase."""
    out: dict[str, list[float]] = {}
    try:
        with open(run_dir / "history.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    out.setdefault(row["phase"], []).append(float(row["epoch_time_s"]))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        pass
    return out


def _process_seconds(path: Path) -> float | None:
    """The job's wall seconds from Snakemake's benchmark file (column ``s``)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return float(rows[-1]["s"])
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None


def _ratio(projected, measured) -> float | None:
    if projected is None or not measured:
        return None
    return round(projected / measured, 3)


def find_records(names: list[str], root: Path = Path(".")) -> list[tuple[str, dict]]:
    """The preflight records of grids ``names``, then every other one under results/preflight (a
    union grid's record prices its parts' runs): (path, record), first found first."""
    paths = [root / preflight_record(n) for n in names]
    every = (root / preflight_record("any")).parents[1]  # results/preflight
    paths += sorted(every.glob("*/preflight.json"))
    out, seen = [], set()
    for p in paths:
        rec = _json(p) if p.resolve() not in seen else None
        seen.add(p.resolve())
        if isinstance(rec, dict) and isinstance(rec.get("projection"), dict):
            out.append((str(p), rec))
    return out


def projected_vs_measured(runs, records: list[tuple[str, dict]], root: Path = Path(".")) -> dict:
    """Per configuration (run id less its seed) of ``runs`` (``experiments.Run``): the projected and the
    measured seconds and their ratio (projected / measured; above 1: the runs are faster than projected)

    * ``phases``: per phase (fixed, joint, finetune), an epoch's steps and evaluation: projected
      against the median ``epoch_time_s`` of the seeds' epochs of that phase so far (one epoch is enough);
    * ``loop``: the epochs with their checkpoints, against the mean ``wall_time_s`` of complete runs;
    * ``process``: the whole run, against the mean of Snakemake's benchmark ``s`` where there is one.

    ``records``: (path, preflight record), searched in order for each run (by grid part and run id).
    A run with no projection, or nothing measured yet, is left out; ``record`` names the record used
    and whether its timings were disturbed."""
    priced = {}
    for path, rec in records:
        for r in rec["projection"].get("runs", []):
            if r.get("seconds") is not None:
                priced.setdefault((r.get("grid"), r["run"]), (path, rec, r))
    configs: dict[str, dict] = {}
    for run in runs:
        hit = priced.get((run.grid, run.run_id))
        if hit is None:
            continue
        path, rec, proj = hit
        c = configs.setdefault(config_of(run.run_id), {
            "record": path, "disturbed": bool(rec["projection"].get("disturbed")), "proj": proj,
            "epochs": {}, "loop": [], "process": []})
        run_dir = root / run.run_dir
        for phase, times in _epoch_times(run_dir).items():
            c["epochs"].setdefault(phase, []).extend(times)
        m = _json(run_dir / "metrics.json")
        if isinstance(m, dict) and m.get("status") == "complete" and isinstance(m.get("wall_time_s"), (int, float)):
            c["loop"].append(m["wall_time_s"])
        s = _process_seconds(root / benchmark_file(run.grid, run.run_id))
        if s is not None:
            c["process"].append(s)
    out = {}
    for config, c in configs.items():
        proj = c["proj"]
        phases = {}
        for phase, p in (proj.get("phases") or {}).items():
            measured = c["epochs"].get(phase)
            if measured:
                med = statistics.median(measured)
                phases[phase] = {"projected_s": round(p["steps_evals_s"], 4), "measured_s": round(med, 4),
                                 "epochs_measured": len(measured), "ratio": _ratio(p["steps_evals_s"], med)}
        if not phases and not c["loop"] and not c["process"]:
            continue
        row = {"record": c["record"], "disturbed": c["disturbed"], "phases": phases}
        for what, key, values in (("loop", "loop_s", c["loop"]), ("process", "seconds", c["process"])):
            if values:
                mean = statistics.fmean(values)
                row[what] = {"projected_s": round(proj[key], 3), "measured_s": round(mean, 3), "runs": len(values),
                             "ratio": _ratio(proj[key], mean)}
        out[config] = row
    return out


def lines(table: dict) -> list[str]:
    """One line per configuration, for the command line."""
    out = []
    for config, row in table.items():
        parts = [f"{ph} epoch {v['projected_s']:.3g} / {v['measured_s']:.3g} s = {v['ratio']}" for ph, v in row["phases"].items()]
        parts += [f"{w} {row[w]['projected_s']:.4g} / {row[w]['measured_s']:.4g} s = {row[w]['ratio']}"
                  for w in ("loop", "process") if w in row]
        flag = " (the preflight's timings were disturbed)" if row["disturbed"] else ""
        out.append(f"projected/measured {config}: {'; '.join(parts)}{flag}")
    return out
