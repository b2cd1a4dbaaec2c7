"""Several processes, one run (torchrun): who is who, the process group, and what the ranks share.

Every rank trains on its shard of each global batch; rank 0 alone locks and writes the run directory
and tracks the run, and the others follow its decisions (the run directory's state, the checkpoint
to resume from), broadcast from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(dist: Distributed, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank's device."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend)
    return device


def cleanup_distributed(dist: Distributed) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def from_main(dist: Distributed, value):
    """``value`` as rank 0 has it, on every rank (itself, with one process)."""
    if dist.world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model, dist: Distributed, device: torch.device):
    """The model as the step runs it: DistributedDataParallel with several processes. DDP registers the
    parameters that need gradients when it is built, so the loop wraps again after freezing the masks."""
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def epoch_means(loss_sum, correct, seen: int, dist: Distributed, device: torch.device) -> tuple[float, float]:
    """Mean training loss and top-1 (%) of the epoch, over every process."""
    if dist.world > 1:
        stats = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        torch.distributed.all_reduce(stats)
        loss_sum, correct, seen = stats[0], stats[1], int(stats[2])
    return float(loss_sum) / max(seen, 1), 100.0 * float(correct) / max(seen, 1)
