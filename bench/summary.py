"""``python -m bench summary``: Markdown tables of the newest records in ``--out`` (one per benchmark and
device), to paste into bench/README.md: the goals, and the headline numbers of each benchmark."""

from __future__ import annotations

import json
from pathlib import Path

STATUS = {True: "**met**", False: "**not met**", None: "n/a"}


def newest_records(out: Path) -> dict[tuple[str, str, bool], dict]:
    """The newest record per (benchmark, device kind, quick or not), by creation time."""
    best: dict[tuple[str, str], dict] = {}
    for p in sorted(Path(out).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "benchmark" not in rec or "device_kind" not in rec:
            continue
        key = (rec["benchmark"], rec["device_kind"], bool(rec.get("quick")))
        if key not in best or rec["created_utc"] > best[key]["created_utc"]:
            rec["_path"] = p.name
            best[key] = rec
    return best


def _v(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def markdown(out: Path) -> str:
    recs = newest_records(out)
    lines = ["| goal | target | device | measured | status | measured on | record |", "|---|---|---|---:|---|---|---|"]
    for (bench, kind, _quick), rec in sorted(recs.items()):
        for g in rec.get("goals", []):
            lines.append(f"| {g['id']} | {g['target']} | {rec['device_name']}{' (quick)' if rec.get('quick') else ''} | "
                         f"{_v(g['value'])} | {STATUS[g['met']]}{' (CPU verdict)' if g.get('caveat') and g['met'] is not None else ''} | "
                         f"{g['measured_on']} | {rec['_path']} |")
    for (bench, kind, _quick), rec in sorted(recs.items()):
        rows = [r for r in rec.get("results", []) if "median" in r]
        if not rows:
            continue
        lines += ["", f"**{bench}** on {rec['device_name']} ({rec['dtype']}, warmup {rec['warmup']}, repeats "
                  f"{rec['repeats']}{', quick' if rec.get('quick') else ''}; `{rec['_path']}`)", "",
                  "| workload | batch | median s/call | IQR s | images/s | peak memory |", "|---|---:|---:|---:|---:|---:|"]
        if bench == "datapath":
            lines[-2] = lines[-2].replace("s/call", "s/epoch")
        for r in rows:
            mem = r.get("peak_memory_bytes")
            lines.append(f"| {r['name']} | {r['batch']} | {r['median']:.4g} | {r['spread']['iqr']:.2g} | "
                         f"{r['images_per_s']['median']:.4g} | {'-' if mem is None else f'{mem / 2**20:.0f} MiB'} |")
    return "\n".join(lines)


def run(out: Path) -> None:
    print(markdown(out))
