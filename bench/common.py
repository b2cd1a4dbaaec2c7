"""What every benchmark shares: the run context, timing, memory, records, goals and tables.

Timing rules (bench/README.md): warm up first, then time every repeat on its own -- with CUDA events on a
GPU (no host synchronisation between repeats, so the queue stays full), with ``perf_counter`` on the
CPU (where the work is synchronous) -- and report the median with its spread. Workloads that are
compared run side by side in one process, interleaved repeat by repeat (the starting workload
rotates), so drift in clocks or temperature hits both sides alike.
"""

from __future__ import annotations

import gc
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from maskconnect.training.device import configure_cudnn
from maskconnect.training.step import Precision
from maskconnect.io import atomic_write_json
from maskconnect.provenance import device_kind, device_name, environment  # noqa: F401 (re-exported)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_VERSION = 1

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name. Matched in order, so the more
# specific names come first. Sources: NVIDIA data sheets (H100 SXM 989.4, H100 PCIe 756, H100 NVL
# 835, H200 989.4, A100 312, L40S 362.05, L4 121). ``--peak-tflops`` overrides the lookup.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
]


# --- context ---------------------------------------------------------------------------------------

@dataclass
class Context:
    """Everything a benchmark needs to know about this invocation."""

    device: torch.device
    precision: Precision
    quick: bool = False
    steps: int | None = None        # timed repeats (None: the benchmark's default)
    warmup: int | None = None       # warm-up calls per workload
    batch: int | None = None        # overrides the CIFAR batch (default 128; 8 with --quick)
    out: Path = RESULTS_DIR
    compile: bool = False
    tag: str = ""
    data_dir: str | None = None
    peak_tflops: float | None = None
    imagenet_batch: int | None = None
    epoch_images: int | None = None  # datapath: images per "epoch" (default: all of CIFAR, 8 batches with --quick)
    env: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def n_warmup(self, gpu: int, quick: int = 1) -> int:
        return self.warmup if self.warmup is not None else (quick if self.quick else gpu)

    def n_steps(self, gpu: int, quick: int = 3) -> int:
        return self.steps if self.steps is not None else (quick if self.quick else gpu)

    def cifar_batch(self) -> int:
        return self.batch if self.batch is not None else (8 if self.quick else 128)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def maybe_compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.compile else model

    def dtype_name(self) -> str:
        if self.precision.amp_dtype is None:
            return "float32"
        return f"{str(self.precision.amp_dtype).replace('torch.', '')} (autocast)"


def make_context(device: torch.device, **kw) -> Context:
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    configure_cudnn()  # training's setting (maskconnect.training.device.CUDNN_BENCHMARK)
    ctx = Context(device=device, precision=Precision.for_device(device), **kw)
    ctx.env = environment(device)
    if not ctx.tag:
        ctx.tag = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return ctx


# --- environment -----------------------------------------------------------------------------------

# One home for what a record says about the machine (maskconnect.provenance, also used by the preflight).


def peak_tflops(ctx: Context) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where the number comes from."""
    if ctx.peak_tflops is not None:
        return float(ctx.peak_tflops), "--peak-tflops"
    if not ctx.cuda:
        return None, "no peak for CPUs (not a GPU)"
    name = ctx.env["device_name"].upper()
    for key, tf in PEAK_BF16_TFLOPS:
        if key in name:
            return tf, f"data sheet, dense bf16, matched '{key}'"
    return None, f"unknown GPU '{ctx.env['device_name']}' (pass --peak-tflops)"


# --- statistics ------------------------------------------------------------------------------------

def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict:
    """Median and spread (quartiles, IQR, min, max) of a list of measurements."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("no samples")
    q1, q3 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs), "n": len(xs)}


def rate(seconds: dict, items: float) -> dict:
    """Turn a time summary (seconds per call) into a rate summary (items per second)."""
    inv = lambda s: items / s if s > 0 else float("inf")  # noqa: E731
    return {"median": inv(seconds["median"]), "q1": inv(seconds["q3"]), "q3": inv(seconds["q1"]),
            "min": inv(seconds["max"]), "max": inv(seconds["min"])}


def spread(summary: dict) -> dict:
    return {k: summary[k] for k in ("q1", "q3", "iqr", "min", "max")}


# --- memory ----------------------------------------------------------------------------------------

def _rss_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_rss_hwm() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a stretch of work.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensor memory of the caching allocator). The peak is
    reported as ``resident`` (what the caller says the workload holds before it runs: weights,
    buffers, inputs) plus the rise above the allocation level at the start, so other workloads
    resident in the process do not count.
    CPU: the process's peak resident set size (VmHWM, reset at the start where Linux allows), which
    includes the interpreter, torch and everything else alive in the process.
    """

    def __init__(self, device: torch.device, resident: int = 0):
        self.device, self.resident = device, int(resident)
        self.kind = None
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._reset = _reset_rss_hwm()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = self.resident + torch.cuda.max_memory_allocated(self.device) - self._base
            self.kind = "cuda_max_memory_allocated (resident tensors + peak rise during the steps)"
        else:
            self.bytes = _rss_hwm_bytes()
            self.kind = ("cpu_process_peak_rss (VmHWM, reset before the workload; whole process)" if self._reset
                         else "cpu_process_peak_rss (VmHWM since process start; whole process)")
        return False


def tensor_bytes(*objs) -> int:
    """Bytes held by the parameters and buffers of modules, and by tensors."""
    n = 0
    for o in objs:
        if isinstance(o, nn.Module):
            n += sum(t.numel() * t.element_size() for t in list(o.parameters()) + list(o.buffers()))
        elif isinstance(o, torch.Tensor):
            n += o.numel() * o.element_size()
    return n


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --- timing ----------------------------------------------------------------------------------------

@dataclass
class Workload:
    """One thing to time: ``fn()`` does ``items`` units of work (images) per call."""

    name: str
    fn: Callable[[], Any]
    items: int = 1
    resident: int = 0               # bytes held before the first call (for the CUDA peak)
    info: dict = field(default_factory=dict)


@dataclass
class Measurement:
    name: str
    samples: list[float]            # seconds per call
    items: int
    peak_memory_bytes: int | None
    memory_kind: str | None
    info: dict

    @property
    def seconds(self) -> dict:
        return summarize(self.samples)

    @property
    def median(self) -> float:
        return self.seconds["median"]

    def items_per_s(self) -> dict:
        return rate(self.seconds, self.items)


def measure(workloads: Sequence[Workload], *, device: torch.device, warmup: int, repeats: int) -> dict[str, Measurement]:
    """Warm each workload up (measuring its peak memory), then time ``repeats`` calls of each,
    interleaved round-robin with a rotating start. Returns one :class:`Measurement` per name."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warmup = max(1, int(warmup))  # the first call allocates (optimizer state, cuDNN plans): never time it
    cuda = device.type == "cuda"
    peaks: dict[str, PeakMemory] = {}
    for w in workloads:
        with PeakMemory(device, w.resident) as pm:
            for _ in range(warmup):
                w.fn()
        peaks[w.name] = pm
    samples: dict[str, list] = {w.name: [] for w in workloads}
    n = len(workloads)
    for r in range(repeats):
        for w in list(workloads[r % n:]) + list(workloads[:r % n]):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                w.fn()
                end.record()
                samples[w.name].append((start, end))
            else:
                t0 = time.perf_counter()
                w.fn()
                samples[w.name].append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        samples = {k: [s.elapsed_time(e) / 1000.0 for s, e in v] for k, v in samples.items()}
    return {w.name: Measurement(w.name, samples[w.name], w.items, peaks[w.name].bytes, peaks[w.name].kind, w.info)
            for w in workloads}


def timing_method(ctx: Context) -> str:
    return ("cuda events around each call, no host sync between repeats; synchronize before reading"
            if ctx.cuda else "time.perf_counter around each call (CPU work is synchronous)")


def result_row(m: Measurement, **extra) -> dict:
    """The JSON form of a measurement: seconds per call (median + spread) and items/s."""
    s = m.seconds
    row = {"name": m.name, **m.info, "batch": m.items, "images_per_call": m.items, "unit": "seconds per call",
           "median": s["median"], "spread": spread(s), "mean": s["mean"], "repeats": s["n"],
           "images_per_s": m.items_per_s(), "peak_memory_bytes": m.peak_memory_bytes,
           "peak_memory_kind": m.memory_kind,
           "samples": [round(x, 9) for x in m.samples]}
    row.update(extra)
    return row


# --- records, goals, tables ------------------------------------------------------------------------

CPU_CAVEAT = ("the goal is stated for a GPU; this verdict holds for this CPU (fp32, no tensor cores) and "
              "says nothing about a GPU")


def goal(goal_id: str, description: str, *, value: float | None, threshold: float, ctx: Context,
         measured_on: str, below: bool = False, gpu_only: bool = True, valid: bool = True,
         why_not: str | None = None) -> dict:
    """A benchmark goal (bench/README.md, 'Goals') with its measured value and ``met`` true/false, or null where the run cannot
    decide it (a run on other configs than the goal names, such as ``--quick``, or no value).

    The verdict belongs to the device that measured it (``decided_on``): a GPU goal measured on a CPU
    is decided for that CPU and carries a ``caveat`` saying so.
    """
    met: bool | None = None
    reasons = []
    if not valid:
        reasons.append(why_not or "not measured on the configuration the goal names")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        reasons.append("no value measured")
    if not reasons:
        met = bool(value < threshold) if below else bool(value >= threshold)
    why_not = "; ".join(reasons)
    out = {"id": goal_id, "description": description,
           "target": f"{'<' if below else '>='} {threshold:g}", "threshold": threshold,
           "value": value, "met": met, "measured_on": measured_on, "device": ctx.env.get("device_name"),
           "decided_on": "gpu" if ctx.cuda else "cpu"}
    if gpu_only and not ctx.cuda:
        out["caveat"] = CPU_CAVEAT
    if met is None:
        out["why_null"] = why_not
    return out


def make_record(ctx: Context, benchmark: str, *, batch: int | None, warmup: int, repeats: int,
                config: dict, results: list[dict], goals: list[dict] | None = None,
                notes: Sequence[str] = (), extra: dict | None = None) -> dict:
    rec = {
        "benchmark": benchmark,
        "record_version": RECORD_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tag": ctx.tag,
        **ctx.env,
        "dtype": ctx.dtype_name(),
        "channels_last": ctx.precision.channels_last,
        "compile": ctx.compile,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "quick": ctx.quick,
        "batch": batch,
        "warmup": warmup,
        "repeats": repeats,
        "timing": timing_method(ctx),
        "memory": "cuda_max_memory_allocated" if ctx.cuda else "cpu_process_peak_rss (VmHWM)",
        "config": config,
        "results": results,
        "goals": goals or [],
        "notes": list(notes),
    }
    if extra:
        rec.update(extra)
    return rec


def record_path(ctx: Context, benchmark: str) -> Path:
    return Path(ctx.out) / f"{benchmark}-{ctx.env['device_kind']}-{ctx.tag}.json"


def write_record(ctx: Context, rec: dict) -> Path:
    path = record_path(ctx, rec["benchmark"])
    atomic_write_json(path, rec)
    return path


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f}MiB" if n < 2**30 else f"{n / 2**30:.2f}GiB"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def print_table(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> None:
    """Print ``rows`` (already formatted strings) as an aligned table; ``columns`` = (key, header)."""
    cells = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print(f"\n== {title}")
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def print_goals(goals: Sequence[dict]) -> None:
    if not goals:
        return
    rows = [{"id": g["id"], "target": g["target"], "value": fmt_num(g["value"]),
             "met": {True: "met", False: "NOT met", None: "n/a"}[g["met"]], "on": g["measured_on"]}
            for g in goals]
    print_table("goals", rows, [("id", "goal"), ("target", "target"), ("value", "measured"), ("met", "status"),
                                ("on", "measured on")])


def finish(ctx: Context, rec: dict, rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> Path:
    """Write the record, print its table and goals, and say where it went."""
    path = write_record(ctx, rec)
    print_table(f"{rec['benchmark']} on {ctx.env['device_name']} ({rec['dtype']}, warmup {rec['warmup']}, "
                f"repeats {rec['repeats']})", rows, columns)
    print_goals(rec["goals"])
    print(f"record: {path}")
    return path
