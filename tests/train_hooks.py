"""``maskconnect train`` with test hooks, as a script (also under torchrun):

    python tests/train_hooks.py [--kill-after N] [--record DIR] -- <maskconnect train arguments>

``--kill-after N``: the process exits abruptly (exit code 137, no cleanup) right after epoch N's
checkpoint, through a callback of train() (:class:`KillAfter`): a deterministic stand-in for a SIGKILL.

``--record DIR``: after every training step, each rank appends one JSON line to DIR/rank<R>.jsonl:
the masks drawn for that step (``MaskBank.last_sample``; null once frozen), a digest of the
real-valued masks after the step, the labels and a digest of every image of its batch, and the
optimiser's LRs. The tests compare the ranks' files line by line. Recording reads tensors only: it
draws no random numbers and does not change what the run computes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def _digest(t) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _install_recorder(directory: Path) -> None:
    import maskconnect.training.loop as T
    from maskconnect.connectivity import mask_banks

    rank = T.Distributed.from_env().rank
    directory.mkdir(parents=True, exist_ok=True)
    log = open(directory / f"rank{rank}.jsonl", "a", buffering=1)
    original = T.train_step

    def recorded(step_model, optimizer, x, y, precision, **kw):
        out = original(step_model, optimizer, x, y, precision, **kw)
        bank = next((b for b in mask_banks(step_model) if b.kind == "learned"), None)
        row = {
            "draw": None if bank is None or bank.frozen else bank.last_sample.int().tolist(),
            "real": None if bank is None else _digest(bank.real),
            "y": y.tolist(), "rows": [_digest(r) for r in x],
            "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
        }
        log.write(json.dumps(row) + "\n")
        return out

    T.train_step = recorded


def _sync_before_kill(epoch: int) -> None:
    """Under torchrun, only rank 0 writes the checkpoint: the other ranks wait for it (a barrier at
    the end of the kill epoch), or their exit could make torchrun stop rank 0 before it has written."""
    import torch.distributed as dist

    from maskconnect.training.progress import Progress

    end_epoch = Progress.end_epoch

    def end_epoch_then_sync(self, row, eta_s):
        end_epoch(self, row, eta_s)
        if row["epoch"] == epoch and dist.is_available() and dist.is_initialized():
            dist.barrier()

    Progress.end_epoch = end_epoch_then_sync


class KillAfter:
    """A train() callback: exit abruptly (os._exit, as a SIGKILL would) after epoch ``epoch``'s checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def epoch_end(self, row: dict) -> None:
        if row["epoch"] == self.epoch:
            os._exit(137)

    def run_end(self, metrics, files, error) -> None:
        pass


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after", type=int)
    p.add_argument("--record", type=Path)
    ours = p.parse_args(argv[:split])
    if ours.record:
        _install_recorder(ours.record)
    if ours.kill_after is not None:
        _sync_before_kill(ours.kill_after)
    from maskconnect.cli import build_parser
    from maskconnect.training import config_from_args, train

    args = build_parser().parse_args(["train", *argv[split + 1:]])
    callbacks = [KillAfter(ours.kill_after)] if ours.kill_after is not None else []
    train(config_from_args(args), replace=args.replace, callbacks=callbacks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
