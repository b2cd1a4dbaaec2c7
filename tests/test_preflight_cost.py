"""The preflight's cost projection: the verdict on disturbed timings, the per-phase and per-run pricing,
the grid's wall time with its concurrency, and projected against measured after the runs.

No assertion here is about this machine's speed: the arithmetic runs on made-up times, the verdict on
made-up loads, and the one real timing is of a process that shares its core with a busy one on
purpose (so it must have waited, whatever the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maskconnect.cli import main
from maskconnect.preflight import cost, timing
from maskconnect.report.projection import find_records, projected_vs_measured


def _timing(median=0.05, mx=None, repeats=20, wait=0.0, load=(0.5, 0.6), cpus=2, wall=1.0) -> dict:
    return {"median": median, "min": median * 0.9, "max": mx if mx is not None else median * 1.1, "repeats": repeats,
            "load": {"loadavg_start": [load[0], 0, 0], "loadavg_end": [load[1], 0, 0], "cpus": cpus,
                     "runqueue_wait": wait, "threads": 1, "wall_s": wall}}


def test_a_quiet_timing_is_trusted_and_each_kind_of_disturbance_is_named():
    assert timing.disturbance(_timing()) == []
    # waiting for a CPU: the bound, and only over a window long enough to say so
    assert "waited for a CPU 30%" in " ".join(timing.disturbance(_timing(wait=0.30)))
    assert timing.disturbance(_timing(wait=0.09)) == []
    assert timing.disturbance(_timing(wait=0.30, wall=0.05)) == []
    # the load average, at the start or the end, against the CPU count
    assert "load average 3.10 on 2 CPUs" in " ".join(timing.disturbance(_timing(load=(0.4, 3.1))))
    assert "load average 3.00" in " ".join(timing.disturbance(_timing(load=(3.0, 0.4))))
    assert timing.disturbance(_timing(load=(2.4, 2.4))) == []
    assert timing.disturbance(_timing(load=(3.0, 3.0), cpus=16)) == []
    # the spread: a burst, given enough calls of a size that matters
    assert "slowest call 4.0x the median" in " ".join(timing.disturbance(_timing(mx=0.2)))
    assert timing.disturbance(_timing(mx=0.14)) == []
    assert timing.disturbance(_timing(mx=0.2, repeats=5)) == []
    assert timing.disturbance(_timing(median=1e-4, mx=5e-4)) == []
    # no schedstat, no load average (another OS): nothing to judge by but the spread
    assert timing.disturbance({"median": 0.05, "max": 0.06, "repeats": 20,
                               "load": {"runqueue_wait": None, "loadavg_start": None, "loadavg_end": None, "cpus": 2}}) == []


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/self/schedstat").exists(),
                    reason="needs Linux's CPU affinity and schedstat")
def test_a_timing_beside_a_busy_process_on_its_core_records_the_wait_and_is_flagged():
    """This process and a spinning one pinned to the same core: each gets about half of it, so the
    timing must record a run-queue wait near 50%, and the verdict must say it was disturbed."""
    before = os.sched_getaffinity(0)
    core = min(before)
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {core})
        time.sleep(0.3)  # the child is spinning on the core

        def spin():
            t = time.perf_counter()
            while time.perf_counter() - t < 0.02:
                pass
        t = timing.time_calls(spin, torch.device("cpu"), warmup=1, repeats=20)
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait()
    assert t["repeats"] == 20 and len(t["samples"]) == 20 and len(t["warmup_s"]) == 1
    assert t["min"] <= t["median"] <= t["max"]
    assert t["load"]["cpus"] == os.cpu_count() and len(t["load"]["loadavg_start"]) == 3
    assert t["load"]["runqueue_wait"] > 0.25, t["load"]
    assert any("waited for a CPU" in why for why in timing.disturbance(t))


PHASES = {"joint": {"train_step_s": 0.1, "eval_step_s": 0.05, "loader_s": 0.001, "test_loader_s": 0.002, "warmup_s": 0.3},
          "finetune": {"train_step_s": 0.08, "eval_step_s": 0.04, "loader_s": 0.001, "test_loader_s": 0.002, "warmup_s": 0.2}}


def test_a_learned_run_is_priced_per_phase_with_its_epoch_and_run_terms():
    per_run = {"interpreter_s": 2.0, "import_s": 2.5, "data_s": 0.1, "tracker_s": 5.0, "finish_s": 0.4}
    p = cost.price_run(epochs=18, freeze_epoch=10, steps=23, evals=2, phases=PHASES,
                       epoch_end={"checkpoint_s": 0.02, "tracker_epoch_s": 0.01}, per_run=per_run)
    joint = 23 * 0.101 + 2 * 0.052
    finetune = 23 * 0.081 + 2 * 0.042
    assert p["phases"]["joint"]["epochs"] == 10 and p["phases"]["finetune"]["epochs"] == 8
    assert p["phases"]["joint"]["steps_evals_s"] == pytest.approx(joint)
    assert p["phases"]["finetune"]["epoch_s"] == pytest.approx(finetune + 0.03)
    assert p["loop_s"] == pytest.approx(10 * (joint + 0.03) + 8 * (finetune + 0.03))
    assert p["per_run_s"]["warmup_s"] == pytest.approx(0.5)  # each phase's first steps
    assert p["seconds"] == pytest.approx(p["loop_s"] + 10.0 + 0.5)
    # frozen at the last epoch: no fine-tune epoch, and no fine-tune warm-up
    whole = cost.price_run(epochs=18, freeze_epoch=18, steps=23, evals=2, phases=PHASES, epoch_end={}, per_run={})
    assert whole["phases"]["finetune"]["epochs"] == 0 and whole["seconds"] == pytest.approx(18 * joint + 0.3)
    # a Fixed run has one phase; an asynchronous loader overlaps the step (the slower of the two counts)
    fixed = {"fixed": {**PHASES["joint"], "loader_s": 0.3}}
    assert cost.price_run(epochs=2, freeze_epoch=None, steps=10, evals=1, phases=fixed, epoch_end={},
                          per_run={})["loop_s"] == pytest.approx(2 * (10 * 0.4 + 0.052))
    assert cost.price_run(epochs=2, freeze_epoch=None, steps=10, evals=1, phases=fixed, epoch_end={}, per_run={},
                          asynchronous_loader=True)["loop_s"] == pytest.approx(2 * (10 * 0.3 + 0.052))


def test_the_grid_wall_time_runs_as_many_jobs_at_once_as_fit():
    assert cost.grid_wall_s([(10.0, 1)] * 4, 2) == 20.0          # two CPU jobs at once on 2 cores
    assert cost.grid_wall_s([(10.0, 1)] * 4, 1) == 40.0
    assert cost.grid_wall_s([(10.0, 1), (5.0, 1), (5.0, 1)], 2) == 10.0
    assert cost.grid_wall_s([(10.0, 2), (10.0, 1), (10.0, 1)], 2) == 20.0  # the 2-unit job holds both
    assert cost.grid_wall_s([(10.0, 8)], 1) is None               # an 8-GPU run on a 1-GPU node
    assert cost.grid_wall_s([], 2) == 0.0


def _write_record(root: Path, grid: str, runs: list[dict], disturbed=()) -> None:
    path = root / "results" / "preflight" / grid / "preflight.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"projection": {"runs": runs, "disturbed": list(disturbed)}}))


def _history(run_dir: Path, rows: list[tuple[str, float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,phase,epoch_time_s"] + [f"{i + 1},{ph},{t}" for i, (ph, t) in enumerate(rows)]
    (run_dir / "history.csv").write_text("\n".join(lines) + "\n")


def _run(grid, rid):
    return SimpleNamespace(grid=grid, run_id=rid, run_dir=f"results/runs/{grid}/{rid}")


def test_projected_against_measured_per_configuration_from_the_first_epoch(tmp_path):
    projected = {"phases": {"joint": {"steps_evals_s": 3.0}, "finetune": {"steps_evals_s": 2.0}},
                 "loop_s": 50.0, "seconds": 60.0}
    learned = [_run("g", f"digits/20-4-8/learned-K4/seed{s}") for s in (0, 1)]
    full = _run("g", "digits/20-4-8/full-K8/seed0")
    _write_record(tmp_path, "g", [{"grid": "g", "run": r.run_id, **projected} for r in learned]
                  + [{"grid": "other", "run": full.run_id, **projected}])
    # seed 0 complete (two joint epochs, one fine-tune, metrics and Snakemake's benchmark); seed 1 after one epoch
    _history(tmp_path / learned[0].run_dir, [("joint", 2.0), ("joint", 3.5), ("finetune", 2.5)])
    (tmp_path / learned[0].run_dir / "metrics.json").write_text(json.dumps({"status": "complete", "wall_time_s": 40.0}))
    bench = tmp_path / "results" / "benchmarks" / "g" / f"{learned[0].run_id}.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\tmax_rss\n48.0\t0:00:48\t100\n")
    _history(tmp_path / learned[1].run_dir, [("joint", 4.0)])  # the median of 2, 3.5, 4: not the mean, not the last
    _history(tmp_path / full.run_dir, [("fixed", 1.0)])
    table = projected_vs_measured(learned + [full], find_records(["g"], tmp_path), tmp_path)
    row = table["digits/20-4-8/learned-K4"]
    assert row["phases"]["joint"] == {"projected_s": 3.0, "measured_s": 3.5, "epochs_measured": 3, "ratio": round(3 / 3.5, 3)}
    assert row["phases"]["finetune"]["ratio"] == 0.8
    assert row["loop"] == {"projected_s": 50.0, "measured_s": 40.0, "runs": 1, "ratio": 1.25}
    assert row["process"]["ratio"] == round(60 / 48, 3) and row["disturbed"] is False
    assert "digits/20-4-8/full-K8" not in table  # its projection is another grid's run
    # after one epoch of a run, and a record whose timings were disturbed says so
    _write_record(tmp_path / "b", "g", [{"grid": "g", "run": learned[1].run_id, **projected}], disturbed=["x"])
    only = projected_vs_measured(learned[1:], find_records(["g"], tmp_path / "b"), tmp_path)
    assert only["digits/20-4-8/learned-K4"]["phases"] == {"joint": {"projected_s": 3.0, "measured_s": 4.0,
                                                                    "epochs_measured": 1, "ratio": 0.75}}
    assert only["digits/20-4-8/learned-K4"]["disturbed"] is True and "loop" not in only["digits/20-4-8/learned-K4"]


def test_grid_collect_prints_projected_against_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.yaml").write_text("name: g\ndefaults: {dataset: digits, seeds: [0], recipe: smoke, device: cpu}\n"
                                     "entries:\n  - {arch: '11,2,4', connectivity: full}\n")
    rid = "digits/11-2-4/full-K4/seed0"
    _write_record(tmp_path, "g", [{"grid": "g", "run": rid, "phases": {"fixed": {"steps_evals_s": 1.2}},
                                   "loop_s": 3.0, "seconds": 9.0}])
    _history(tmp_path / "results" / "runs" / "g" / rid, [("fixed", 1.0)])
    assert main(["grid", "collect", "--grid", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert "projected/measured digits/11-2-4/full-K4: fixed epoch 1.2 / 1 s = 1.2" in err
    assert json.loads((tmp_path / "m.json").read_text())["timing"]["digits/11-2-4/full-K4"]["phases"]["fixed"]["ratio"] == 1.2
