"""Where a number was measured: the device, its driver and the software versions, the git commit.

The one home of these facts: a training run's metrics.json (``versions``, ``run_device``,
``git_commit``), its MLflow tags, the preflight record and the benchmarks' records
(bench/common.py) all describe a machine with these functions. torch is imported only inside the
functions that need it, so ``git_commit`` costs no torch import; nothing here imports mlflow,
snakemake or dvc.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(cwd: Path | str | None = None, timeout: float = 5.0) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (default: this package's directory), None if not a repo."""
    cwd = Path(cwd) if cwd is not None else PACKAGE_DIR
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def run_device(device: torch.device) -> str:
    """The ``device`` of a training run's metrics.json and MLflow tags: the GPU's name, or
    ``cpu (<processor>, <N> threads)``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    """The ``versions`` of a training run's metrics.json."""
    import torch
    import torchvision

    from . import __version__

    return {"maskconnect": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def device_kind(device: torch.device) -> str:
    """Short file-name tag: ``cpu`` or ``cuda-<gpu model>``, e.g. ``cuda-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower().replace("nvidia", "")
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def nvidia_smi() -> list[dict] | None:
    """The GPUs ``nvidia-smi`` sees (name, driver version, memory in MiB), None when there is no
    ``nvidia-smi`` or it fails (no driver loaded). Independent of torch, so it can tell a missing
    GPU from a torch build that cannot use the driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "driver_version": parts[1],
                         "memory_mib": int(parts[2]) if parts[2].isdigit() else None})
    return gpus


def environment(device: torch.device) -> dict:
    """Device, versions and host facts for a record."""
    import torch
    import torchvision

    cuda = device.type == "cuda"
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "device_kind": device_kind(device),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env
