"""Which SLURM partition a pipeline job goes to (read by the rules; used by profiles/slurm).

GPU jobs (the grid's ``gpus`` > 0) go to ``$MASKCONNECT_SLURM_PARTITION`` (default ``gpu``); jobs
that ask for no GPU go to ``$MASKCONNECT_SLURM_CPU_PARTITION``, or, where that is not set, to the
cluster's default partition (the SLURM executor then asks ``sinfo`` for it), never to the GPU
partition. Under any other executor the value is an unused resource.
"""

from __future__ import annotations

import os

GPU_PARTITION_ENV = "MASKCONNECT_SLURM_PARTITION"
CPU_PARTITION_ENV = "MASKCONNECT_SLURM_CPU_PARTITION"
DEFAULT_GPU_PARTITION = "gpu"


def partition(gpus: int, env: dict | None = None) -> str:
    """The partition for a job with ``gpus`` GPUs; "" means the cluster's default partition."""
    env = os.environ if env is None else env
    if gpus > 0:
        return env.get(GPU_PARTITION_ENV) or DEFAULT_GPU_PARTITION
    return env.get(CPU_PARTITION_ENV) or ""
