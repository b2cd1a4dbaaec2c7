"""``maskconnect gpu-slot``: run a command on free GPUs (the logic is :mod:`maskconnect.gpu_slot`)."""

from __future__ import annotations

import argparse

from ..gpu_slot import LOCK_DIR_ENV, gpu_count, run


def _cmd(args) -> int:
    if args.count:
        print(gpu_count())
        return 0
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    return run(command, args.gpus, timeout=args.timeout)


def register(sub) -> None:
    p = sub.add_parser("gpu-slot", help="run a command on free GPUs (sets CUDA_VISIBLE_DEVICES; for pipelines)",
                       description="Run COMMAND with CUDA_VISIBLE_DEVICES set to GPUs that no other gpu-slot job on "
                                   "this machine holds (flock on a lock file per GPU, held until COMMAND exits). "
                                   "Waits while fewer are free. Inside a SLURM job only the job's own GPUs are used "
                                   "(CUDA_VISIBLE_DEVICES, else SLURM_STEP_GPUS/SLURM_JOB_GPUS); none allocated is an error. "
                                   f"Lock files live in ${LOCK_DIR_ENV} or the temp folder.")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the command needs (default 1; 0 runs it unchanged)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds of waiting (default: wait)")
    p.add_argument("--count", action="store_true", help="print the number of visible GPUs and exit")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=_cmd)
