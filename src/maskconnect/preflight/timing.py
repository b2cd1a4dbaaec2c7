"""How the preflight times things, and when it says its timings cannot be trusted.

A timing: ``warmup`` untimed calls (their times are kept: the per-run warm-up term of the projection),
then ``repeats`` calls timed one by one, with CUDA events around each call on a GPU (no host
synchronisation between calls, so the queue stays full; one synchronise before the events are read)
and ``time.perf_counter`` on a CPU. What it records: every sample, their min, median and max, the
repeat count, and the machine's state at the start and at the end of the timed calls: the load
average (``os.getloadavg``), the CPU count (``os.cpu_count``) and the time this process's threads
spent runnable but waiting for a CPU (the run-queue wait of ``/proc/self/task/*/schedstat``), as a
fraction of the timing's wall time per computing thread.

A timing is *disturbed* (the cost check fails and says why; :func:`disturbance`) when

* the run-queue wait exceeds ``WAIT_MAX`` of a timing of at least ``WAIT_MIN_WINDOW_S``: other
  processes held the cores this process needed. It is measured over the timed calls themselves, so it sees a disturbance that
  started a second ago, which the one-minute load average takes a minute to show;
* the one-minute load average, at the start or the end, exceeds the CPU count by more than
  ``LOAD_MARGIN``: more runnable threads than cores (ours included) over the last minute;
* the slowest call took more than ``SPREAD_MAX`` times the median (with at least
  ``SPREAD_MIN_REPEATS`` calls of at least ``SPREAD_MIN_MEDIAN_S``): something else ran in bursts.

The bounds come from the measurements in ``bench/results/preflight-timing-cpu-20261206.json`` (one
training step of the demo's networks, one thread, on the 2-core CPU, quiet and beside busy processes).
torch is imported only for CUDA timings: the start-up probe (``startup.py``) imports this module
before it times the imports of a training process.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

# Chosen from bench/results/preflight-timing-cpu-20261206.json (see the module docstring).
WAIT_MAX = 0.10
WAIT_MIN_WINDOW_S = 0.25   # a shorter timing's wait is one scheduling event or none: judged by the longer ones
LOAD_MARGIN = 0.5
SPREAD_MAX = 3.0
SPREAD_MIN_REPEATS = 10
SPREAD_MIN_MEDIAN_S = 1e-3  # a call shorter than this costs the projection nothing, whatever its spread


def _runqueue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable and waiting for a CPU (Linux schedstat), or
    None where the kernel does not say."""
    total = 0
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def machine_state() -> dict:
    """The load average (1, 5, 15 minutes), the CPU count and this process's run-queue wait so far."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"loadavg": load, "cpus": os.cpu_count(), "wait_s": _runqueue_wait_s(), "t": time.perf_counter()}


def load_window(start: dict, end: dict, threads: int = 1) -> dict:
    """What a timing records of the machine: the load average and CPU count at its start and end, and
    the run-queue wait between them as a fraction of the wall time per computing thread."""
    wall = end["t"] - start["t"]
    wait = None
    if start["wait_s"] is not None and end["wait_s"] is not None and wall > 0:
        wait = round(max(0.0, end["wait_s"] - start["wait_s"]) / (wall * max(1, threads)), 4)
    return {"loadavg_start": start["loadavg"], "loadavg_end": end["loadavg"], "cpus": start["cpus"],
            "runqueue_wait": wait, "threads": threads, "wall_s": round(wall, 4)}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device, *, warmup: int, repeats: int,
               threads: int = 1) -> dict:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` calls (see the module docstring); returns the
    timing's record: ``median``, ``min``, ``max``, ``repeats``, ``samples``, ``warmup_s`` and ``load``."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warm = []
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    start = machine_state()
    if device.type == "cuda":
        import torch

        events = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1000.0 for s, e in events]
    else:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    end = machine_state()
    return summary(samples, warm, load_window(start, end, threads))


def summary(samples: list[float], warmup_s: list[float], load: dict) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "repeats": len(samples),
            "samples": [round(x, 6) for x in samples], "warmup_s": [round(x, 6) for x in warmup_s], "load": load}


def warmup_excess(t: dict) -> float:
    """Seconds the warm-up calls took beyond as many calls at the median: what a run's first steps of a
    phase cost on top of its steady steps (allocation, cuDNN's choice, torch.compile)."""
    return max(0.0, sum(t["warmup_s"]) - len(t["warmup_s"]) * t["median"])


def disturbance(t: dict) -> list[str]:
    """Why the timing ``t`` (``time_calls``'s record, or any dict with ``load`` and optionally
    ``median``/``max``/``repeats``) cannot be trusted; empty when it can."""
    why = []
    load = t.get("load") or {}
    wait = load.get("runqueue_wait")
    if wait is not None and wait > WAIT_MAX and (load.get("wall_s") or 0) >= WAIT_MIN_WINDOW_S:
        why.append(f"this process waited for a CPU {100 * wait:.0f}% of the time (bound {100 * WAIT_MAX:.0f}%)")
    cpus = load.get("cpus")
    peaks = [x[0] for x in (load.get("loadavg_start"), load.get("loadavg_end")) if x]
    if cpus and peaks and max(peaks) > cpus + LOAD_MARGIN:
        why.append(f"load average {max(peaks):.2f} on {cpus} CPUs (bound {cpus + LOAD_MARGIN:g})")
    if (t.get("repeats", 0) >= SPREAD_MIN_REPEATS and (t.get("median") or 0) >= SPREAD_MIN_MEDIAN_S
            and t["max"] > SPREAD_MAX * t["median"]):
        why.append(f"slowest call {t['max'] / t['median']:.1f}x the median (bound {SPREAD_MAX:g}x)")
    return why
