"""When is a preflight timing disturbed? The preflight's own timings, quiet and beside busy processes.

Not a registered benchmark: a one-off measurement that chose the bounds of
``maskconnect.preflight.timing`` (its record: bench/results/preflight-timing-cpu-<tag>.json).
For each condition (0, 1, 2 ... processes spinning ``while True: pass`` beside it, started when the
condition starts and killed by pid after it), it times the demo grid's Fixed-Full and Learned K=4
networks as the preflight does (``cost.phase_times``: every phase's training step and evaluation
pass, ``--repeats`` calls each) ``--rounds`` times, and the start-up probe once; it records each
timing's median, min, max, the run-queue wait, the load average, and the median's ratio to the
quiet one.

    PYTHONPATH=src python -m bench.preflight_timing [--busy 0,1,2] [--rounds 3] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from maskconnect.experiments import load_grid
from maskconnect.preflight import cost, startup
from maskconnect.preflight.runner import plan_runs
from maskconnect.preflight.timing import disturbance
from maskconnect.training.step import Precision

RESULTS = Path(__file__).resolve().parent / "results"


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _row(condition: str, rnd: int, what: str, t: dict) -> dict:
    load = t["load"]
    return {"condition": condition, "round": rnd, "timing": what, "median": t.get("median", t.get("process_s")),
            "min": t.get("min"), "max": t.get("max"), "repeats": t.get("repeats"),
            "max_over_median": (t["max"] / t["median"]) if t.get("median") else None,
            "runqueue_wait": load["runqueue_wait"], "loadavg_start": load["loadavg_start"][0],
            "loadavg_end": load["loadavg_end"][0], "cpus": load["cpus"], "disturbed_by_current_bounds": disturbance(t)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", default="0,1,2", help="busy processes per condition, in order")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tag", default=datetime.now(timezone.utc).strftime("%Y%m%d"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plans = plan_runs(load_grid("demo"))
    chosen = [next(p for p in plans if p.spec.connectivity == "full"),
              next(p for p in plans if p.spec.connectivity == "learned" and p.spec.fan_in == 4)]
    dev = torch.device("cpu")
    precision = Precision.for_device(dev)
    rows = []
    for n in [int(x) for x in args.busy.split(",")]:
        condition = f"{n} busy"
        procs = _busy(n)
        try:
            for rnd in range(args.rounds):
                for p in chosen:
                    phases, _ = cost.phase_times(p, dev, precision, repeats=args.repeats)
                    for name, ph in phases.items():
                        for part in ("train_step", "eval_pass"):
                            rows.append(_row(condition, rnd, f"{p.spec.connectivity} {name} {part}", ph[part]))
                            print(json.dumps(rows[-1]), flush=True)
            pr = startup.probe(dataset="digits", batch=64, eval_batch=256, device="cpu", threads=1, track=True)
            rows.append(_row(condition, args.rounds, "start-up probe (process)", pr))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            _stop(procs)
        time.sleep(5)
    quiet = {r["timing"]: r["median"] for r in rows if r["condition"] == "0 busy" and r["round"] == 0}
    for r in rows:
        r["ratio_to_quiet"] = r["median"] / quiet[r["timing"]] if quiet.get(r["timing"]) else None
    rec = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "command": "PYTHONPATH=src python -m bench.preflight_timing " + " ".join(argv or sys.argv[1:]),
           "rows": rows}
    out = RESULTS / f"preflight-timing-cpu-{args.tag}.json"
    out.write_text(json.dumps(rec, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
