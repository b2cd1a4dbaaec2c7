"""`maskconnect gpu-slot`: each GPU job of a pipeline gets its own GPU (CUDA_VISIBLE_DEVICES).

Snakemake only counts GPUs; the wrapper picks free device ids with one lock file per GPU, held by
the job's process until it exits. No GPU is needed: the GPUs are named by CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from maskconnect import gpu_slot

PRINT_CVD = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]


def _env(tmp_path, **kw):
    env = dict(os.environ)
    env.pop("SLURM_JOB_ID", None)
    env[gpu_slot.LOCK_DIR_ENV] = str(tmp_path)
    env.update(kw)
    return env


def _slot(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "maskconnect", "gpu-slot", *args], env=env, capture_output=True,
                          text=True, timeout=60, **kw)


def test_visible_gpus():
    assert gpu_slot.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == ["0", "1", "3"]
    assert gpu_slot.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_slot.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert gpu_slot.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at an invalid id
    assert gpu_slot.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1234-abcd"}) == ["GPU-1234-abcd"]


def test_acquire_gives_distinct_gpus_and_waits(tmp_path):
    gpus = ["0", "1"]
    a, fa = gpu_slot.acquire(1, gpus, tmp_path)
    b, fb = gpu_slot.acquire(1, gpus, tmp_path)
    assert a != b and set(a + b) == {"0", "1"}
    with pytest.raises(TimeoutError):
        gpu_slot.acquire(1, gpus, tmp_path, timeout=0.3, poll=0.1)
    os.close(fa[0])  # the holder exits: its GPU is free again
    c, fc = gpu_slot.acquire(1, gpus, tmp_path, timeout=2, poll=0.1)
    assert c == a
    for fd in fb + fc:
        os.close(fd)


def test_multi_gpu_is_all_or_nothing(tmp_path):
    gpus = ["0", "1", "2"]
    one, f1 = gpu_slot.acquire(1, gpus, tmp_path)
    two, f2 = gpu_slot.acquire(2, gpus, tmp_path)
    assert sorted(one + two) == gpus
    with pytest.raises(TimeoutError):
        gpu_slot.acquire(2, gpus, tmp_path, timeout=0.3, poll=0.1)
    with pytest.raises(RuntimeError, match="4 GPUs asked for, 3 visible"):
        gpu_slot.acquire(4, gpus, tmp_path)
    for fd in f1 + f2:
        os.close(fd)


def test_command_runs_on_a_free_gpu_and_holds_it_until_it_exits(tmp_path):
    env = _env(tmp_path, CUDA_VISIBLE_DEVICES="3,5")
    held, fds = gpu_slot.acquire(1, ["3"], tmp_path)  # another job holds GPU 3
    out = _slot(["--gpus", "1", "--", *PRINT_CVD], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
    os.close(fds[0])
    # a long job keeps its GPU locked while it runs; a second job gets the other one
    slow = subprocess.Popen([sys.executable, "-m", "maskconnect", "gpu-slot", "--gpus", "1", "--", sys.executable, "-c",
                             "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = slow.stdout.readline().strip()
        second = _slot(["--gpus", "1", "--", *PRINT_CVD], env).stdout.strip()
        assert {first, second} == {"3", "5"}
        blocked = _slot(["--gpus", "2", "--timeout", "0.5", "--", *PRINT_CVD], env)
        assert blocked.returncode == 2 and "no 2 free GPU" in blocked.stderr
    finally:
        slow.kill()  # a killed job frees its GPU at once
        slow.wait()
    time.sleep(0.1)
    assert _slot(["--gpus", "2", "--", *PRINT_CVD], env).stdout.strip() == "3,5"


def test_no_gpus_or_too_few(tmp_path):
    out = _slot(["--gpus", "1", "--", *PRINT_CVD], _env(tmp_path, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2 and "1 GPUs asked for, 0 visible" in out.stderr
    out = _slot(["--gpus", "0", "--", sys.executable, "-c", "print('ran')"], _env(tmp_path, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0 and out.stdout.strip() == "ran"


def test_slurm_binds_gpus_itself(tmp_path):
    env = _env(tmp_path, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="42")
    held, fds = gpu_slot.acquire(1, ["0"], tmp_path)  # a lock elsewhere must not block a SLURM job
    out = _slot(["--gpus", "1", "--", *PRINT_CVD], env)
    assert out.returncode == 0 and out.stdout.strip() == "0"
    os.close(fds[0])


def test_exit_code_of_the_command_is_kept(tmp_path):
    out = _slot(["--gpus", "1", "--", sys.executable, "-c", "raise SystemExit(7)"], _env(tmp_path, CUDA_VISIBLE_DEVICES="0"))
    assert out.returncode == 7


def test_cli_is_registered():
    from maskconnect.cli import build_parser

    args = build_parser().parse_args(["gpu-slot", "--gpus", "2", "--", "echo", "hi"])
    assert args.gpus == 2 and args.cmd[-2:] == ["echo", "hi"]


# ---- inside a SLURM job: only the job's own GPUs ------------------------------------------------------

def test_visible_gpus_in_a_slurm_job_are_its_allocation(monkeypatch):
    import shutil

    # a node with 8 GPUs (nvidia-smi would list them all): a SLURM job may only use its own
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpu_slot.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="".join(f"{i}\n" for i in range(8))))
    assert gpu_slot.visible_gpus({}) == [str(i) for i in range(8)]  # outside SLURM: every GPU listed
    assert gpu_slot.visible_gpus({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,5"}) == ["2", "5"]
    assert gpu_slot.visible_gpus({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0-2,6"}) == ["0", "1", "2", "6"]
    # the step's GPUs win over the job's; CUDA_VISIBLE_DEVICES (set by SLURM) over both
    assert gpu_slot.visible_gpus({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,5", "SLURM_STEP_GPUS": "5"}) == ["5"]
    assert gpu_slot.visible_gpus({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,5", "CUDA_VISIBLE_DEVICES": "0"}) == ["0"]
    assert gpu_slot.visible_gpus({"SLURM_JOB_ID": "7"}) == []  # no GPU allocated: none, not the node's 8


def test_slurm_job_without_gpus_is_refused(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="42")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        env.pop(k, None)
    out = _slot(["--gpus", "1", "--", *PRINT_CVD], env)
    assert out.returncode == 2 and "SLURM job 42 was allocated 0" in out.stderr, out.stderr
    assert not list(tmp_path.glob("*.lock"))  # no GPU of the node was locked
    env["SLURM_JOB_GPUS"] = "3"
    out = _slot(["--gpus", "2", "--", *PRINT_CVD], env)
    assert out.returncode == 2 and "2 GPU(s) asked for, but SLURM job 42 was allocated 1 (3" in out.stderr


def test_slurm_job_gpus_used_when_cuda_visible_devices_is_unset(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="42", SLURM_JOB_GPUS="3,6")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    held, fds = gpu_slot.acquire(1, ["3"], tmp_path)  # another job's lock on this node does not matter
    out = _slot(["--gpus", "2", "--", *PRINT_CVD], env)
    assert out.returncode == 0 and out.stdout.strip() == "3,6", out.stderr
    os.close(fds[0])


def test_jobs_sharing_one_slurm_allocation_get_distinct_gpus(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="0,1")
    other, fds = gpu_slot.acquire(1, ["0"], tmp_path)  # a lock outside this job's folder: ignored
    slow = subprocess.Popen([sys.executable, "-m", "maskconnect", "gpu-slot", "--gpus", "1", "--", sys.executable, "-c",
                             "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(30)"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = slow.stdout.readline().strip()
        second = _slot(["--gpus", "1", "--", *PRINT_CVD], env).stdout.strip()
        assert {first, second} == {"0", "1"}
        assert (tmp_path / "slurm-42").is_dir()
        blocked = _slot(["--gpus", "2", "--timeout", "0.5", "--", *PRINT_CVD], env)  # one is held
        assert blocked.returncode == 2 and "no 2 free GPU" in blocked.stderr
    finally:
        slow.kill()
        slow.wait()
        os.close(fds[0])


# ---- SLURM partitions (profiles/slurm) ------------------------------------------------------------------

def test_partition_by_gpus():
    from maskconnect import slurm

    env = {"MASKCONNECT_SLURM_PARTITION": "a100", "MASKCONNECT_SLURM_CPU_PARTITION": "standard"}
    assert slurm.partition(1, env) == "a100" and slurm.partition(8, env) == "a100"
    assert slurm.partition(0, env) == "standard"
    assert slurm.partition(1, {}) == "gpu"  # the documented default
    assert slurm.partition(0, {}) == ""  # the cluster's default partition, never the GPU one
    assert slurm.partition(0, {"MASKCONNECT_SLURM_PARTITION": "a100"}) == ""
