"""``maskconnect gpu-slot``: run a command on GPUs no other job of this machine is using.

Snakemake counts GPUs (``resources: gpu=1`` per job, ``--resources gpu=N`` in total; the workflow
profile sets N to :func:`visible_gpus`), but it does not say *which* GPU a job gets: every job would
see every GPU and start on ``cuda:0``. This wrapper picks the device ids. Each GPU has a lock file
(``<lock dir>/maskconnect-gpu-<id>.lock``); a job takes ``flock`` locks on free GPUs, sets
``CUDA_VISIBLE_DEVICES`` to them and ``exec``s the command, which inherits the locks and holds them
until it exits (a killed job frees its GPUs at once: the kernel drops the lock). When fewer GPUs are
free than asked for, it waits.

Inside a SLURM job only the job's own GPUs are candidates, never the rest of the node:
``CUDA_VISIBLE_DEVICES`` where SLURM set it, else ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``; a SLURM job
with no GPUs allocated is refused with a message saying so (rather than locking some other job's
GPU). There the lock files live in a folder of that job (``<lock dir>/slurm-<job id>/``): they
only keep apart the commands sharing one allocation (the SLURM profile runs one per job, which then
gets the whole allocation at once), never a GPU of another job. With ``--gpus 0`` the command runs
unchanged. Imports nothing heavy: the profile uses :func:`visible_gpus` while Snakemake starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCK_DIR_ENV = "MASKCONNECT_GPU_LOCK_DIR"
LOCK_PREFIX = "maskconnect-gpu-"


def _id_list(text: str) -> list[str]:
    """GPU ids from a SLURM list such as ``0,2`` or ``0-3,6`` (ranges expanded)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            out += [str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)]
        elif part:
            out.append(part)
    return out


def slurm_job(env: dict | None = None) -> str | None:
    """The SLURM job id this process runs in, or None outside SLURM."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or None


def visible_gpus(env: dict | None = None) -> list[str]:
    """The GPUs a job may use: ``CUDA_VISIBLE_DEVICES`` if set (ids or UUIDs); else, inside a SLURM
    job, the GPUs SLURM allocated to it (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``; none if neither is
    set: the rest of the node belongs to other jobs); else those ``nvidia-smi`` lists; else none."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d.strip() for d in cvd.split(",") if d.strip()]
        # CUDA stops at the first invalid id ("-1" is the usual way to hide every GPU)
        out = []
        for d in ids:
            if d.startswith("-"):
                break
            out.append(d)
        return out
    if slurm_job(env):
        for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            if env.get(key):
                return _id_list(env[key])
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        text = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip().isdigit()]


def gpu_count() -> int:
    """How many GPUs Snakemake may hand out at once (the workflow profile's ``resources: gpu``)."""
    return len(visible_gpus())


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())


def _lock_path(directory: Path, gpu: str) -> Path:
    return directory / f"{LOCK_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def acquire(n: int, gpus: list[str], directory: Path | None = None, *, timeout: float | None = None,
            poll: float = 1.0) -> tuple[list[str], list[int]]:
    """Lock ``n`` of ``gpus``; returns (ids, open lock fds). Waits while fewer than ``n`` are free
    (all or nothing, so two multi-GPU jobs never hold half each). ``timeout``: seconds, None = forever."""
    import fcntl

    if n > len(gpus):
        raise RuntimeError(f"{n} GPUs asked for, {len(gpus)} visible ({','.join(gpus) or 'none'})")
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        got_ids, got_fds = [], []
        for gpu in gpus:
            fd = os.open(_lock_path(directory, gpu), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            got_ids.append(gpu)
            got_fds.append(fd)
            if len(got_ids) == n:
                for fd in got_fds:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return got_ids, got_fds
        for fd in got_fds:
            os.close(fd)  # releases the lock
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no {n} free GPU(s) among {','.join(gpus)} after {timeout:.0f} s")
        time.sleep(poll)


def run(command: list[str], n: int = 1, *, timeout: float | None = None) -> int:
    """Exec ``command`` with ``CUDA_VISIBLE_DEVICES`` set to ``n`` free GPUs (does not return)."""
    if not command:
        raise SystemExit("maskconnect gpu-slot: no command given (usage: maskconnect gpu-slot --gpus 1 -- CMD ...)")
    env = dict(os.environ)
    if n > 0:
        gpus = visible_gpus(env)
        job = slurm_job(env)
        if job and len(gpus) < n:
            print(f"maskconnect gpu-slot: {n} GPU(s) asked for, but SLURM job {job} was allocated "
                  f"{len(gpus)} ({','.join(gpus) or 'none'}; from CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS or "
                  "SLURM_JOB_GPUS): submit the job with --gpus/--gres (the SLURM profile does so from the "
                  "grid's `gpus`); GPUs outside the allocation belong to other jobs", file=sys.stderr)
            return 2
        # in a SLURM job the locks only exclude the commands sharing this job's allocation (its ids
        # may be renumbered from 0 and mean other devices in another job)
        directory = lock_dir() / f"slurm-{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}" if job else None
        try:
            ids, fds = acquire(n, gpus, directory, timeout=timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"maskconnect gpu-slot: {e}", file=sys.stderr)
            return 2
        for fd in fds:
            os.set_inheritable(fd, True)  # the command holds the locks until it exits
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        env["MASKCONNECT_GPU_SLOT"] = env["CUDA_VISIBLE_DEVICES"]
        print(f"maskconnect gpu-slot: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
              + (f" (SLURM job {job})" if job else ""), file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"maskconnect gpu-slot: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    return 0  # not reached
