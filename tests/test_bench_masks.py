"""bench/masks.py (issue 10's planted-connectivity and long-schedule benchmark): the pieces a
record depends on, on a short run."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench package sits at the repo root

from bench.masks import PAPER_SUMMED_MASK_LR, PlantedRun, paper_equivalent_mask_lr, planted_sources, run_planted  # noqa: E402


def test_paper_equivalent_mask_lr():
    # CIFAR: 50,000 images / batch 128 = 391 steps per epoch, 150 joint epochs at LR 0.1
    assert PAPER_SUMMED_MASK_LR == pytest.approx(150 * 391 * 0.1)
    assert paper_equivalent_mask_lr(15 * 23) == pytest.approx(17.0, abs=0.01)


def test_planted_sources_are_seeded_and_count_per_module():
    a, b, c = planted_sources(5, 8, 3, seed=0), planted_sources(5, 8, 3, seed=0), planted_sources(5, 8, 3, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(-1) == 3).all()


@pytest.mark.parametrize("construction", ["shuffle", "noise"])
def test_a_short_planted_run(construction):
    r = run_planted(PlantedRun(construction, "learned", "projected", 0, epochs=2, stage_width=8))
    assert 0.0 <= r["on_clean"] <= 1.0 and r["clean_fraction"] == pytest.approx(5 / 8)
    assert 0.0 <= r["top1"] <= 100.0 and r["ties_at_freeze"] == 0
    assert r["mask_lr"] == pytest.approx(paper_equivalent_mask_lr(23))
    assert set(r["stats_at_freeze"]) >= {"mask_at_0", "mask_at_1", "mask_margin", "mask_ties", "mask_entropy"}
