"""Data-parallel training under torchrun: 2 processes, gloo, CPU.

One recorded run (tests/train_hooks.py --record: every rank logs, after every step, the masks it drew,
its real-valued masks, its batch and its LRs) serves three checks: every rank draws the same masks at
every step, the ranks' shards split each global batch exactly, and the LR follows the documented rule
when --batch-size is given. A fourth test kills a torchrun run after its first epoch (train()'s
kill_after_epoch hook), resumes it under torchrun and expects the recorded run's result exactly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "train_hooks.py"
WORLD = 2
BATCH = 48  # per process, given explicitly: global batch 96, not the smoke recipe's 64
# The smoke recipe: mask LR = the weight LR, masks frozen at the first LR drop (after epoch 1 of 2)
ARGS = ["--dataset", "digits", "--arch", "11,2,4", "--stage-width", "8", "--connectivity", "learned", "--fan-in", "2",
        "--recipe", "smoke", "--epochs", "2", "--seed", "3", "--batch-size", str(BATCH), "--device", "cpu", "--no-track", "--progress", "none"]


def _torchrun(out: Path, *hook_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a shared 2-core runner
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(HOOKS), *hook_args,
                           "--", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _records(directory: Path) -> list[list[dict]]:
    """records[rank][step]"""
    return [[json.loads(line) for line in (directory / f"rank{r}.jsonl").read_text().splitlines()] for r in range(WORLD)]


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    r = _torchrun(base / "run", "--record", str(base / "rec"))
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "run", _records(base / "rec")


def test_every_rank_draws_the_same_masks_at_every_step(recorded):
    run, rec = recorded
    assert len(rec[0]) == len(rec[1]) > 0
    phases = [row["phase"] for row in _history(run)]
    assert phases == ["joint", "finetune"]
    joint = [step for step in range(len(rec[0])) if rec[0][step]["draw"] is not None]
    assert 0 < len(joint) < len(rec[0])  # drawn in the joint phase, fixed once frozen
    for step, (a, b) in enumerate(zip(*rec)):
        assert a["draw"] == b["draw"], f"step {step}: the ranks drew different masks"
        assert a["real"] == b["real"], f"step {step}: the real-valued masks differ across ranks"
    draws = {json.dumps(rec[0][s]["draw"]) for s in joint}
    assert len(draws) > 1  # the draws change from step to step: the comparison above is not vacuous
    masks = torch.tensor(rec[0][joint[0]]["draw"])
    assert (masks.sum(-1) == 2).all()  # K=2 sources per branch


def _digest(t) -> str:  # as tests/train_hooks.py
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def test_shards_split_every_global_batch_exactly(recorded):
    """Rank r's batch is the r::2 slice of the global batch: interleaving the ranks' batches step by
    step gives, over an epoch, exactly the sequence of (augmented) images and labels that one process
    sees with the global batch size; so no image is seen twice or skipped."""
    from maskconnect.data import build_data

    run, rec = recorded
    ref = build_data("digits", batch_size=BATCH * WORLD, device="cpu", seed=3, augment=True)
    steps = build_data("digits", batch_size=BATCH * WORLD, device="cpu", seed=3).shard(0, WORLD).steps_per_epoch()
    assert len(rec[0]) == len(rec[1]) == 2 * steps  # 2 epochs
    for epoch in range(2):
        rows, labels = [], []
        for step in range(epoch * steps, (epoch + 1) * steps):
            a, b = rec[0][step], rec[1][step]
            assert len(a["y"]) - len(b["y"]) in (0, 1) and len(a["y"]) >= 1
            for i in range(len(a["y"]) + len(b["y"])):
                part = (a, b)[i % WORLD]
                rows.append(part["rows"][i // WORLD])
                labels.append(part["y"][i // WORLD])
        want_rows, want_labels = [], []
        for x, y in ref.train_batches(epoch):
            want_rows += [_digest(r) for r in x]
            want_labels += y.tolist()
        assert labels == want_labels, f"epoch {epoch}: labels"
        assert rows == want_rows, f"epoch {epoch}: images"
        assert len(rows) == ref.train_size
        assert Counter(labels) == Counter(ref.y_train.tolist())  # every training image once


def test_lr_with_explicit_batch_size_follows_the_documented_rule(recorded):
    """README: --batch-size is per process; lr x global_batch / lr_reference_batch, the reference
    being the recipe's batch (smoke: LR 0.1 for 64 images)."""
    from maskconnect.training.schedule import RECIPES

    run, rec = recorded
    recipe = RECIPES["smoke"]
    want = recipe["lr"] * BATCH * WORLD / recipe["batch_size"]
    assert want == pytest.approx(0.15)
    rows = _history(run)
    assert float(rows[0]["lr"]) == pytest.approx(want) and float(rows[1]["lr"]) == pytest.approx(want * 0.1)
    steps = len(rec[0]) // 2
    for r in range(WORLD):  # what the optimiser really used, on every rank
        assert all(s["lr"]["weights"] == pytest.approx(want) for s in rec[r][:steps])
        assert all(s["lr"]["weights"] == pytest.approx(want * 0.1) for s in rec[r][steps:])
        assert rec[r][0]["lr"]["masks"] == pytest.approx(want)  # masks: the weight LR unless --mask-lr
    config = json.loads((run / "config.json").read_text())
    assert config["batch_size"] == BATCH and config["lr_reference_batch"] == recipe["batch_size"]


def test_resume_under_torchrun_after_a_kill(recorded, tmp_path):
    run, rec = recorded
    out = tmp_path / "killed"
    killed = _torchrun(out, "--kill-after", "1", "--record", str(tmp_path / "rec1"))
    assert killed.returncode != 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "metrics.json").exists()
    resumed = _torchrun(out, "--record", str(tmp_path / "rec2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1/2" in resumed.stderr
    # the kill and the resume change nothing: same steps, same masks, same result as the uninterrupted run
    before, after = _records(tmp_path / "rec1"), _records(tmp_path / "rec2")
    for r in range(WORLD):
        steps = [*before[r], *after[r]]
        assert [(s["draw"], s["real"], s["rows"]) for s in steps] == [(s["draw"], s["real"], s["rows"]) for s in rec[r]]
    a, b = json.loads((run / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    for key in ("top1", "test_loss", "params_test"):
        assert a[key] == b[key], key
    assert json.loads((run / "masks.json").read_text()) == json.loads((out / "masks.json").read_text())
