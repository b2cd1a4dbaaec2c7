"""Where a number was measured: the device, its driver and the software versions, the git commit, and
which code made it.

The one home of these facts: a training run's metrics.json (``versions``, ``run_device``,
``git_commit``, ``git_dirty``, ``code_history``), its MLflow tags, the preflight record and the
benchmarks' records (bench/common.py) all describe a machine with these functions. ``STEP_CODE`` names
the code each pipeline step runs; the pipelines depend on it (DVC ``deps:``, a Snakemake param holding
:func:`code_digest`) and a training run records its digest. torch is imported only inside the functions
that need it, so ``git_commit`` costs no torch import; nothing here imports mlflow, snakemake or dvc.
"""

from __future__ import annotations

import hashlib
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

# The code each pipeline step runs, as parts of this package (a file or a folder): what its result depends
# on, at the granularity a researcher changes it (pipelines/README.md, "What each step depends on"). The
# recipes (recipes.yaml) and grids are not code here: a run depends on their values through its resolved
# config, so a changed value reruns only the runs that read it.
_MODEL_CODE = ("specs.py", "connectivity.py", "mask_rules.py", "models", "kernels", "data", "training")
STEP_CODE: dict[str, tuple[str, ...]] = {
    "train": _MODEL_CODE,
    "evaluate": _MODEL_CODE,
    "aggregate": ("report",),
    "report": ("report", "paper"),
}


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


def git_dirty(cwd: Path | str | None = None, timeout: float = 5.0) -> bool | None:
    """Whether ``cwd`` (default: this package's source folder) has uncommitted changes, untracked files
    included (ignored ones not): ``git status --porcelain`` of that folder. None outside a git repository
    or before its first commit. Only the package counts: results, tables and docs the pipelines write
    into the checkout do not make a run dirty."""
    cwd = Path(cwd) if cwd is not None else PACKAGE_DIR
    if git_commit(cwd, timeout) is None:
        return None
    try:  # --no-optional-locks: never take the index lock another git command may hold
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "."], cwd=cwd,
                             capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def code_files(step: str, root: Path | str | None = None) -> list[Path]:
    """The files of ``STEP_CODE[step]`` under the package folder ``root`` (default: this package), sorted;
    Python's caches left out."""
    root = Path(root) if root is not None else PACKAGE_DIR
    files = []
    for part in STEP_CODE[step]:
        path = root / part
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [p for p in found if "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return files


def code_digest(step: str, root: Path | str | None = None) -> str:
    """SHA-256 of the code ``step`` runs (:func:`code_files`): each file's path in the package and its
    bytes. Content, not times: a checkout or a touch that leaves the files as they were leaves it as it was."""
    root = Path(root) if root is not None else PACKAGE_DIR
    h = hashlib.sha256()
    for path in code_files(step, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def code_state(step: str = "train") -> dict:
    """The code running now, as a run records it: git commit, dirty tree, digest of ``step``'s code."""
    return {"git_commit": git_commit(), "git_dirty": git_dirty(), "code_digest": code_digest(step)}


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
