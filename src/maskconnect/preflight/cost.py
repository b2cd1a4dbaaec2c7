"""Memory and time of the grid's training steps on this device, and what the grid will cost.

Memory: one training step (the run's path and precision) at the grid's batch per process.
* CUDA: ``torch.cuda.max_memory_allocated`` over the step, plus what the model, its gradients and
  SGD's momentum hold, against the GPU's total memory. An out-of-memory error is a measurement too:
  the check fails, and the largest batch that fits is found by halving.
* CPU: the bytes autograd keeps for the backward pass (``models.counting.saved_bytes``, exact) plus 3 x the
  parameter bytes, against the machine's physical memory.

Time (every timing through ``timing.time_calls``: its spread, repeat count and the machine's load are
recorded, and a disturbed timing fails the cost check). A run is priced as what its process does
(``price_run``; docs: README, "Before the first GPU-hour"):

* per epoch of each phase: training steps x (the phase's step + the loader's batch; an asynchronous
  loader, ImageNet's DataLoader, overlaps the step: the larger of the two) + evaluation passes x
  (evaluation pass + the loader's test batch) + the checkpoint and history.csv written after the
  epoch + the tracker's epoch log. A learned run's joint epochs (its resolved ``freeze_epoch``) run
  the learned step; its fine-tune epochs run the step of the same model with its masks frozen
  (``connectivity.freeze_masks``), measured as such; Fixed runs have one phase;
* per run: the process's start (interpreter, imports, device, dataset loading, the MLflow run's start
  and end when the run is tracked: ``startup.py``, measured in a fresh process), building the model,
  each phase's first steps beyond the steady step (allocation, torch.compile and the recompile after
  freezing: the warm-up calls' excess), and the end of the run (``training.loop.finish_run``: freeze,
  prune, count FLOPs, write masks.json, pruned.pt and metrics.json), measured by running it.

The grid's wall time runs the runs in the grid's order with its real concurrency (``grid_wall_s``):
CPU jobs at once = the CPU count / each job's threads; GPU jobs at once = the GPUs of this node / each
job's GPUs.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from pathlib import Path

import torch

from ..connectivity import freeze_masks, mask_banks, param_groups
from ..mask_rules import mask_rule
from ..models.counting import saved_bytes
from ..training.step import Precision, evaluate, train_step
from ..models import build_model
from .timing import time_calls, warmup_excess

# Training-set and test-set sizes (images) by dataset, for the projection.
SPLITS = {"digits": (1442, 355), "cifar10": (50000, 10000), "cifar100": (50000, 10000),
          "imagenet": (1281167, 50000), "synthetic": (512, 256)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _batch(spec, batch: int, device: torch.device, precision: Precision, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return precision.prepare_input(x), y.to(device)


def _model_and_opt(spec, precision: Precision):
    torch.manual_seed(0)
    model = precision.prepare_model(build_model(spec)).train()
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4), lr=0.1, momentum=0.9)
    return model, opt


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cuda_step_bytes(spec, batch: int, device: torch.device, precision: Precision) -> int:
    """Peak allocated bytes of a training step (after one step, so SGD's momentum exists)."""
    model = opt = None
    try:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        model, opt = _model_and_opt(spec, precision)
        x, y = _batch(spec, batch, device, precision)
        train_step(model, opt, x, y, precision)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, opt, x, y, precision)
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    finally:
        del model, opt
        torch.cuda.empty_cache()


def memory_check(spec, batch: int, device: torch.device, precision: Precision) -> dict:
    """Whether one training step at ``batch`` fits in the device's memory; if not, the largest batch
    that does."""
    total = device_memory_bytes(device)
    if device.type == "cuda":
        try:
            need = _cuda_step_bytes(spec, batch, device, precision)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            need = None
        fits_at = batch
        while need is None and fits_at > 1:
            fits_at //= 2
            try:
                _cuda_step_bytes(spec, fits_at, device, precision)
                break
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
        if need is None:
            return {"passed": False, "batch": batch, "device_bytes": total, "measure": "torch.cuda.max_memory_allocated",
                    "error": f"out of memory at batch {batch}", "largest_batch_found": fits_at if fits_at >= 1 else None}
        return {"passed": True, "batch": batch, "step_bytes": need, "device_bytes": total,
                "fraction": need / total, "measure": "torch.cuda.max_memory_allocated over a training step"}
    torch.manual_seed(0)
    model = build_model(spec).train()
    x, _ = _batch(spec, min(batch, 8), torch.device("cpu"), Precision(torch.device("cpu")))
    s = saved_bytes(model, x)
    per_image = s["activations"] / x.shape[0]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    need = int(per_image * batch + 3 * params)
    largest = int((total - 3 * params) // per_image) if per_image > 0 else None
    return {"passed": need <= total, "batch": batch, "step_bytes": need, "device_bytes": total,
            "fraction": need / total, "largest_batch_estimate": largest,
            "measure": "bytes autograd keeps for the backward pass (exact, fp32) x batch + 3 x parameter bytes"}


def _threads(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 1


def _run_model(plan, precision: Precision):
    """The run's model, optimiser, LR schedule and mask rule, as ``training.loop`` builds them."""
    from ..training.schedule import build_optimizer

    torch.manual_seed(plan.cfg.seed)
    model = precision.prepare_model(build_model(plan.spec)).train()
    optimizer, scheduler = build_optimizer(plan.cfg, model, 1)
    rule = mask_rule(plan.cfg.mask_rule)
    rule.after_step(mask_banks(model))
    return model, optimizer, scheduler, rule


def phases_of(plan) -> tuple[str, ...]:
    """The phases a run goes through (training.schedule): learned runs 'joint' then 'finetune'."""
    return ("joint", "finetune") if plan.spec.connectivity == "learned" else ("fixed",)


def phase_times(plan, device: torch.device, precision: Precision, *, repeats: int, warmup: int = 2) -> dict:
    """Per phase of the run: its training step (the training loop's call: the run's optimiser, mask rule
    and label smoothing; compiled if the run compiles) and its evaluation pass (``training.step.evaluate``
    on one batch), each a ``time_calls`` record, and the seconds to build the model. The fine-tune phase
    times the same model after ``freeze_masks``. Returns (phases, the last phase's model, optimiser,
    scheduler) for the checkpoint and end-of-run timings."""
    cfg, spec, threads = plan.cfg, plan.spec, _threads(device)
    out, last = {}, None
    for name in phases_of(plan):
        last = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model, opt, sched, rule = _run_model(plan, precision)
        if name == "finetune":
            freeze_masks(model, seed=cfg.seed)
        build_s = time.perf_counter() - t0
        step_model = torch.compile(model) if plan.compile else model
        banks = [b for b in mask_banks(model) if not b.frozen]
        x, y = _batch(spec, plan.batch, device, precision)
        train = time_calls(lambda: train_step(step_model, opt, x, y, precision, label_smoothing=cfg.label_smoothing,
                                              banks=banks, rule=rule), device, warmup=warmup, repeats=repeats,
                           threads=threads)
        xe, ye = _batch(spec, plan.eval_batch, device, precision, seed=1)
        ev = time_calls(lambda: evaluate(model, [(xe, ye)], precision, spec.num_classes), device, warmup=1,
                        repeats=max(3, repeats // 2), threads=threads)
        out[name] = {"train_step": train, "eval_pass": ev, "model_build_s": round(build_s, 4),
                     "warmup_s": round(warmup_excess(train) + warmup_excess(ev), 4)}
        last = (model, opt, sched)
    return out, last


def _history_row(epoch: int) -> dict:
    from ..training.rundir import HISTORY_COLUMNS

    return {**{k: 0.5 for k in HISTORY_COLUMNS}, "epoch": epoch, "phase": "fixed", "test_top1": 50.0,
            "test_top5": 90.0, "test_loss": 1.0}


def _state(plan):
    """A run's state near its end: a whole run's history rows (what each checkpoint rewrites)."""
    from ..training.rundir import State

    return State(plan.epochs, [_history_row(e + 1) for e in range(plan.epochs)], {"top1": 50.0, "top5": 90.0, "epoch": 1},
                 0.0, [])


def checkpoint_time(plan, model, optimizer, scheduler, device: torch.device, scratch: Path, repeats: int = 3) -> dict:
    """What the training loop writes after each epoch (``rundir.write_checkpoint``: history.csv and the
    checkpoint of the model, optimiser, schedule, RNG and a whole run's history), into ``scratch`` (the
    preflight's output folder: the disk the runs write to, as near as it knows)."""
    from ..training import rundir

    scratch.mkdir(parents=True, exist_ok=True)
    state = _state(plan)
    # perf_counter on every device: the save copies every tensor to the host, which synchronises
    return time_calls(lambda: rundir.write_checkpoint(scratch, plan.cfg, 1, state, model, optimizer, scheduler, device,
                                                      0.0),
                      torch.device("cpu"), warmup=1, repeats=repeats, threads=_threads(device))


def finish_time(plan, model, device: torch.device, scratch: Path) -> dict:
    """The end of a run, by running it: ``training.loop.finish_run`` (freeze, prune, count FLOPs, write
    masks.json, pruned.pt and metrics.json) on the timed model, into ``scratch``; one call."""
    from ..training.loop import finish_run
    from ..provenance import code_state
    from .timing import load_window, machine_state

    scratch.mkdir(parents=True, exist_ok=True)
    start = machine_state()
    finish_run(plan.cfg, model, plan.spec, _state(plan), device, scratch, code_state("train"))
    end = machine_state()
    return {"seconds": round(end["t"] - start["t"], 4), "repeats": 1, "load": load_window(start, end, _threads(device))}


def run_hours(dataset: str, epochs: int, batch: int, eval_batch: int, gpus: int, times: dict,
              train_size: int | None = None, test_size: int | None = None) -> float:
    """Hours of one run's training and evaluation compute alone: epochs x (training steps x
    ``train_step_s`` + evaluation passes x ``eval_step_s``)."""
    steps, evals = step_counts(dataset, batch, eval_batch, gpus, train_size, test_size)
    return epochs * (steps * times["train_step_s"] + evals * times["eval_step_s"]) / 3600


def step_counts(dataset: str, batch: int, eval_batch: int, gpus: int, train_size: int | None = None,
                test_size: int | None = None) -> tuple[int, int]:
    """(training steps, evaluation passes) of one epoch (the batch is per process)."""
    n_train, n_test = SPLITS[dataset]
    n_train, n_test = train_size or n_train, test_size or n_test
    return math.ceil(n_train / (batch * max(gpus, 1))), math.ceil(n_test / eval_batch)


def price_run(*, epochs: int, freeze_epoch: int | None, steps: int, evals: int, phases: dict, epoch_end: dict,
              per_run: dict, asynchronous_loader: bool = False) -> dict:
    """Seconds of one run's process, from its parts (module docstring).

    ``phases``: name -> ``train_step_s``, ``eval_step_s``, ``loader_s`` (one training batch),
    ``test_loader_s`` (one test batch), ``warmup_s``; a learned run has ``joint`` (its first
    ``freeze_epoch`` epochs) and ``finetune`` (the rest), a Fixed run ``fixed``. ``epoch_end``: seconds
    paid once per epoch (checkpoint, tracker), ``per_run``: seconds paid once per run. Returns each
    phase's epochs and epoch time, the loop's seconds (the epochs), the per-run terms (each phase's
    warm-up added as ``warmup_s``) and ``seconds``, the whole."""
    if "joint" in phases:
        counts = {"joint": freeze_epoch, "finetune": epochs - freeze_epoch}
    else:
        counts = {"fixed": epochs}
    out, loop, warm = {}, 0.0, 0.0
    end_s = sum(epoch_end.values())
    for name, n in counts.items():
        p = phases[name]
        step = (max(p["train_step_s"], p["loader_s"]) if asynchronous_loader else p["train_step_s"] + p["loader_s"])
        steps_evals_s = steps * step + evals * (p["eval_step_s"] + p["test_loader_s"])
        epoch_s = steps_evals_s + end_s
        out[name] = {"epochs": n, "epoch_s": epoch_s, "steps_evals_s": steps_evals_s, "step_s": step}
        loop += n * epoch_s
        if n:
            warm += p["warmup_s"]
    terms = {**per_run, "warmup_s": warm}
    return {"phases": out, "loop_s": loop, "per_run_s": terms, "seconds": loop + sum(terms.values())}


def grid_wall_s(jobs: list[tuple[float, int]], capacity: int) -> float | None:
    """Wall seconds of ``jobs`` ((seconds, units) in the grid's order) on ``capacity`` units (CPU cores
    or GPUs), each job started as soon as its units are free, in order (no job overtakes another);
    None when a job needs more units than there are."""
    if any(units > capacity for _, units in jobs):
        return None
    running: list[tuple[float, int]] = []
    free, now = capacity, 0.0
    for seconds, units in jobs:
        while free < units:
            end, u = heapq.heappop(running)
            now, free = max(now, end), free + u
        heapq.heappush(running, (now + seconds, units))
        free -= units
    return max((end for end, _ in running), default=0.0)
