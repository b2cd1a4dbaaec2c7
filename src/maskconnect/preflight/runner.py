"""Plans a grid's preflight, runs the checks (checks.py) and writes the record (report.py)."""


from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import experiments as G
from ..io import atomic_write_json, atomic_write_text, check_output_dir
from ..training.device import resolve_device
from ..specs import MASKED, ModelSpec

RECORD_VERSION = 2  # 2: every timing's spread and load, per-phase and per-run pricing, the grid's wall time
DEFAULT_OUT = "results/preflight"
DEFAULT_TIME_STEPS = 20


@dataclass
class RunPlan:
    """What one grid run will execute, resolved from the grid and its recipe."""

    run: G.Run
    spec: ModelSpec
    batch: int          # per process
    eval_batch: int
    epochs: int
    compile: bool
    amp: bool | None
    channels_last: bool | None
    cfg: object = None  # the run's resolved TrainConfig (freeze epoch, optimiser, mask rule, tracking)

    @property
    def model_key(self) -> tuple:
        """Runs that cost the same (memory and time): the same network and batch; K does not change
        what a masked model computes (every branch runs), but learning the masks does."""
        s = self.spec
        return (s.dataset, s.arch, s.stage_width, s.connectivity, self.batch, self.eval_batch, self.compile,
                self.run.threads)


@dataclass
class Preflight:
    grid: G.Grid
    device: torch.device
    plans: list[RunPlan]
    checks: list[dict] = field(default_factory=list)
    out: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    env: dict | None = None

    def add(self, name: str, result: dict, seconds: float) -> dict:
        row = {"name": name, "passed": bool(result.get("passed")), **result, "seconds": round(seconds, 3)}
        self.checks.append(row)
        if self.out is not None:  # the record so far: a preflight killed at a time limit still says what it saw
            write(self.out, record(self, None, time.perf_counter() - self.started, complete=False))
        status = "skipped" if row.get("skipped") else ("ok" if row["passed"] else "FAILED")
        print(f"preflight: [{len(self.checks)}] {name}: {status} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        return row


def plan_runs(grid: G.Grid) -> list[RunPlan]:
    """Every run of ``grid`` with its resolved model, batch, epochs and precision settings."""
    from ..training.config import TrainConfig

    plans = []
    for run in grid.runs:
        cfg = TrainConfig(dataset=run.dataset, arch=run.arch, connectivity=run.connectivity,
                          fan_in=run.fan_in if run.connectivity in MASKED else None, seed=run.seed,
                          recipe=run.recipe, **dict(run.train)).resolved()
        plans.append(RunPlan(run, TrainConfig.spec(cfg), cfg.batch_size, cfg.eval_batch_size, cfg.epochs,
                             cfg.compile, cfg.amp, cfg.channels_last, cfg))
    return plans


def grid_device(grid: G.Grid) -> str:
    """The device the grid's runs ask for: cuda if any does, else cpu if any does, else auto."""
    devices = {r.device for r in grid.runs}
    for d in ("cuda", "cpu"):
        if any(x == d or x.startswith(d + ":") for x in devices):
            return d
    return "auto"


def run_preflight(grid_ref: str, device: str = "grid", out: str | Path | None = None, *,
                  compile: bool | None = None, ddp: bool = True, time_steps: int = DEFAULT_TIME_STEPS) -> tuple[dict, int]:
    """Run every check for ``grid_ref`` on ``device``; write the record; return (record, exit code)."""
    from . import checks

    grid = G.load_grid(grid_ref)
    dev = resolve_device(grid_device(grid) if device == "grid" else device, require_available=False)
    out = Path(out) if out is not None else Path(DEFAULT_OUT) / grid.name
    _check_out(out)
    pf = Preflight(grid, dev, plan_runs(grid), out=out)
    env_ok = checks.environment(pf)
    if env_ok:
        from ..training.device import configure_cudnn, tune_cpu_allocator

        configure_cudnn()  # as training sets it
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if dev.type == "cpu":
            tune_cpu_allocator()
        checks.correctness(pf, compile=compile)
        checks.data(pf)
        checks.ddp(pf, enabled=ddp)
        projection = checks.cost(pf, repeats=time_steps)
    else:
        projection = None
    rec = record(pf, projection, time.perf_counter() - pf.started)
    write(out, rec)
    failed = [c for c in pf.checks if not c["passed"]]
    print(f"preflight: {len(pf.checks) - len(failed)} of {len(pf.checks)} checks passed in "
          f"{rec['seconds']:.0f} s; record: {out / 'preflight.json'}", file=sys.stderr)
    for c in failed:
        print(f"preflight: FAILED {c['name']}: {c.get('advice') or c.get('error') or _worst_text(c)}", file=sys.stderr)
    return rec, 0 if not failed else 1


def _worst_text(c: dict) -> str:
    w = c.get("worst")
    if w:
        return (f"{w['tensor']} differs by {w['rel_error']:.3g} (bound {w['bound']:.3g}); the device's training path "
                "computes another gradient than plain autograd: do not train on this setup, and report it with "
                "preflight.json")
    return "see preflight.json"


def _check_out(out: Path) -> None:
    """Refuse an output folder that cannot be written before any work is done."""
    check_output_dir(out, "--out")


def record(pf: Preflight, projection: dict | None, seconds: float, complete: bool = True) -> dict:
    from ..provenance import environment, nvidia_smi

    if pf.env is None:  # once per preflight (git and nvidia-smi are subprocesses)
        usable = torch.cuda.is_available() or pf.device.type == "cpu"
        pf.env = environment(pf.device if usable else torch.device("cpu"))
        pf.env["nvidia_smi"] = nvidia_smi()
        pf.env["cuda_device_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = pf.env
    return {"record_version": RECORD_VERSION, "grid": pf.grid.name, "grid_file": str(pf.grid.path),
            "device": str(pf.device), "environment": env, "complete": complete,
            "passed": complete and all(c["passed"] for c in pf.checks),
            "checks": pf.checks, "projection": projection, "seconds": seconds}


def write(out: Path, rec: dict) -> None:
    from .render import markdown

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "preflight.json", rec)
    atomic_write_text(out / "preflight.md", markdown(rec))


__all__ = ["run_preflight", "plan_runs", "grid_device", "Preflight", "RunPlan", "DEFAULT_OUT"]
