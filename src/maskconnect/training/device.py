"""The device a run trains on: ``--device`` resolved, the CPU's allocator tuned for the masked
model's large tensors, and cuDNN's algorithm choice (one setting for training, the preflight and bench/)."""

from __future__ import annotations

import torch

# glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap,
# and the kernel zero-fills its pages on first touch; the heap is trimmed back to the OS above the trim
# threshold. A masked model's branch-stacked tensors (C times a module's width: 64 MiB per tensor at
# {29,64,8}, batch 8) are above it, so every one of them, forward and backward, pays page faults.
# Raising both thresholds keeps freed blocks for reuse. Measured (one thread, {29,64,8} batch 8,
# side by side in one process, 3 repeats): learned K=4 step 5.91 -> 4.36 s, Fixed-Full 3.10 -> 3.25 s
# (noise), the learned / full time ratio 1.91 -> 1.34. torch's CPU performance guide recommends
# jemalloc/tcmalloc by LD_PRELOAD for the same reason; this needs no extra library. The cost: freed
# memory stays with the process, which holds its peak anyway while training.
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameter numbers (malloc.h)


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (see above) for this process; True if done.

    A no-op (False) without glibc, when ``MASKCONNECT_TUNE_MALLOC=0``, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` themselves (theirs win).
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    if (not sys.platform.startswith("linux") or os.environ.get("MASKCONNECT_TUNE_MALLOC", "1") == "0"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


# cuDNN times its convolution algorithms for each new input shape and keeps the fastest (a CIFAR run
# has three shapes: the batch, the epoch's last batch, the evaluation batch). Training, the preflight
# that projects its hours and bench/ all run with this one value, so their step times agree. It
# changes which kernel computes a convolution on CUDA (not the function; summation order may differ
# from run to run), and nothing on a CPU.
CUDNN_BENCHMARK = True


def configure_cudnn() -> bool:
    """Set ``torch.backends.cudnn.benchmark`` to :data:`CUDNN_BENCHMARK`; returns it."""
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    return CUDNN_BENCHMARK


def resolve_device(name: str = "auto", *, require_available: bool = True) -> torch.device:
    """``auto`` is CUDA when available, else CPU. ``require_available=False`` accepts a CUDA device torch
    cannot see (the preflight reports that as a failed check instead of a bad argument)."""
    from ..errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", name, "auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and require_available and not torch.cuda.is_available():
        raise ConfigError("device", name, "a CUDA device, but torch sees no GPU here (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", name, "auto, cpu, cuda or cuda:N")
    return dev
