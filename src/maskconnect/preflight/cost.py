"""Memory and time of the grid's training steps on this device, and what the grid will cost.

Memory: one training step (the run's path and precision) at the grid's batch per process.
* CUDA: ``torch.cuda.max_memory_allocated`` over the step, plus what the model, its gradients and
  SGD's momentum hold, against the GPU's total memory. An out-of-memory error is a measurement too:
  the check fails, and the largest batch that fits is found by halving.
* CPU: the bytes autograd keeps for the backward pass (``models.counting.saved_bytes``, exact) plus 3 x the
  parameter bytes, against the machine's physical memory.

Time: the median of a few timed training steps (after warm-up steps; CUDA synchronised) and of
evaluation forward passes. The projection multiplies them by the run's steps: epochs x (training
steps + evaluation steps per epoch). It ignores data loading (on the device for CIFAR) and the
checkpoint written once per epoch.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from ..connectivity import param_groups
from ..models.counting import saved_bytes
from ..training.step import Precision, train_step
from ..models import build_model

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


def step_times(spec, batch: int, device: torch.device, precision: Precision, *, warmup: int = 2,
               repeats: int = 5, eval_batch: int | None = None, compile: bool = False) -> dict:
    """Median seconds of a training step at ``batch`` and of an evaluation forward pass at
    ``eval_batch`` (default: ``batch``), on the run's path and precision."""
    model, opt = _model_and_opt(spec, precision)
    step_model = torch.compile(model) if compile else model
    x, y = _batch(spec, batch, device, precision)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        train_step(step_model, opt, x, y, precision)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    eb = eval_batch or batch
    xe, _ = _batch(spec, eb, device, precision, seed=1)
    model.eval()
    evals = []
    with torch.no_grad(), precision.autocast():
        for i in range(1 + max(2, repeats // 2)):
            _sync(device)
            t0 = time.perf_counter()
            step_model(xe)
            _sync(device)
            if i >= 1:
                evals.append(time.perf_counter() - t0)
    return {"train_step_s": statistics.median(times), "eval_step_s": statistics.median(evals),
            "batch": batch, "eval_batch": eb, "repeats": repeats}


def run_hours(dataset: str, epochs: int, batch: int, eval_batch: int, gpus: int, times: dict,
              train_size: int | None = None, test_size: int | None = None) -> float:
    """Wall-clock hours of one run: epochs x (training steps + evaluation passes)."""
    n_train, n_test = SPLITS[dataset]
    n_train, n_test = train_size or n_train, test_size or n_test
    steps = math.ceil(n_train / (batch * max(gpus, 1)))
    evals = math.ceil(n_test / eval_batch)
    return epochs * (steps * times["train_step_s"] + evals * times["eval_step_s"]) / 3600
