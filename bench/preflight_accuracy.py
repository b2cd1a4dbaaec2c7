"""Does the preflight's projection hold for whole runs? Projected seconds against start-to-exit seconds.

Not a registered benchmark: the acceptance measurement of the preflight's cost model (its record:
bench/results/preflight-accuracy-cpu-<tag>.{json,md}). In a scratch folder it

1. runs ``maskconnect preflight --grid demo --device cpu`` (the pipeline's preflight job), quiet;
2. creates the MLflow store (the pipeline's ``tracking_init`` job), then trains the demo's Fixed-Full
   and Learned K=4 runs of seed 0 one after the other with the pipeline's own commands
   (``experiments.train_command``, one thread: ``OMP_NUM_THREADS=1``), each timed from spawn to exit;
3. with ``--busy N``: runs the preflight again while N processes spin (``while True: pass``; killed by
   pid afterwards) and records its projection against the quiet one and whether its record says the
   timings were disturbed.

The projection is the record's ``seconds`` for the run (``preflight.cost.price_run``).

    PYTHONPATH=src python -m bench.preflight_accuracy [--busy 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from maskconnect.experiments import load_grid, preflight_record, tracking_init_command, train_command

RESULTS = Path(__file__).resolve().parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "sqlite:///results/mlflow.db",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _sh(cmd: str, cwd: Path, ok=(0,)) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(), capture_output=True, text=True)
    if r.returncode not in ok:
        raise SystemExit(f"{cmd!r} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _preflight(cwd: Path, out: str, ok=(0,)) -> tuple[dict, float]:
    secs = _sh(f"maskconnect preflight --grid demo --device cpu --out {out}", cwd, ok)
    return json.loads((cwd / out / "preflight.json").read_text()), secs


def _projected(rec: dict, run_id: str) -> dict:
    return next(r for r in rec["projection"]["runs"] if r["run"] == run_id)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def markdown(rec: dict) -> str:
    lines = [f"# The preflight's projection against whole runs ({rec['created_utc'][:10]})", "",
             f"Command: `{rec['command']}`; {rec['cpus']} CPUs ({rec['cpu_model']}), torch {rec['torch']}.", "",
             "| run | projected (s) | measured, spawn to exit (s) | projected / measured | loop projected (s) | "
             "loop measured (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rec["runs"]:
        lines.append(f"| {r['run']} | {r['projected_s']:.1f} | {r['measured_s']:.1f} | {r['ratio']:.3f} | "
                     f"{r['loop_projected_s']:.1f} | {r['loop_measured_s']:.1f} |")
    lines += ["", f"Quiet preflight: {rec['quiet']['seconds']:.0f} s, timings disturbed: "
                  f"{len(rec['quiet']['disturbed'])}."]
    for b in rec.get("busy", []):
        lines += ["", f"With {b['busy']} spinning processes: the preflight took {b['seconds']:.0f} s; its record "
                      f"says the timings were disturbed: **{bool(b['disturbed'])}** ({len(b['disturbed'])} timings"
                      f"{': ' + b['disturbed'][0] if b['disturbed'] else ''}).", "",
                  "| run | busy projection / quiet projection |", "|---|---:|"]
        for run, ratio in b["ratio_to_quiet"].items():
            lines.append(f"| {run} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=2, help="spinning processes for the disturbed preflight (0: skip it)")
    ap.add_argument("--keep", help="scratch folder to use and keep (default: a temporary one, removed)")
    ap.add_argument("--tag", default=datetime.now(timezone.utc).strftime("%Y%m%d"))
    args = ap.parse_args(argv)
    import torch

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="maskconnect-accuracy-"))
    tmp.mkdir(parents=True, exist_ok=True)
    grid = load_grid("demo")
    chosen = [next(r for r in grid.runs if r.connectivity == "full" and r.seed == 0),
              next(r for r in grid.runs if r.connectivity == "learned" and r.fan_in == 4 and r.seed == 0)]
    out = Path(preflight_record("demo")).parent.as_posix()
    try:
        quiet, quiet_s = _preflight(tmp, out)
        print(f"quiet preflight: {quiet_s:.0f} s", flush=True)
        _sh(tracking_init_command(), tmp)
        runs = []
        for run in chosen:
            measured = _sh(train_command(run), tmp)
            metrics = json.loads((tmp / run.run_dir / "metrics.json").read_text())
            p = _projected(quiet, run.run_id)
            runs.append({"run": run.run_id, "projected_s": p["seconds"], "measured_s": measured,
                         "ratio": p["seconds"] / measured, "loop_projected_s": p["loop_s"],
                         "loop_measured_s": metrics["wall_time_s"], "per_run_s": p["per_run_s"],
                         "phases": p["phases"]})
            print(json.dumps(runs[-1]), flush=True)
        busy = []
        if args.busy:
            procs = _busy(args.busy)
            try:
                rec, secs = _preflight(tmp, out + "-busy", ok=(0, 1))  # 1: a check failed (the disturbed timings)
            finally:
                for q in procs:
                    q.kill()
                    q.wait()
            busy.append({"busy": args.busy, "seconds": secs, "disturbed": rec["projection"]["disturbed"],
                         "ratio_to_quiet": {r.run_id: _projected(rec, r.run_id)["seconds"] / _projected(quiet, r.run_id)["seconds"]
                                            for r in chosen}})
            print(json.dumps(busy[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    rec = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
           "cpu_model": cpu_model, "torch": torch.__version__,
           "command": "PYTHONPATH=src python -m bench.preflight_accuracy " + " ".join(argv or sys.argv[1:]),
           "quiet": {"seconds": quiet_s, "disturbed": quiet["projection"]["disturbed"]}, "runs": runs, "busy": busy}
    stem = RESULTS / f"preflight-accuracy-cpu-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rec))
    print(markdown(rec))


if __name__ == "__main__":
    main()
