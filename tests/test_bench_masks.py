"""bench/masks.py (the planted-connectivity and long-schedule benchmark of docs/mask_rules.md): the pieces a
record depends on, on a short run."""

import pytest
import torch

from bench.masks import PAPER_SUMMED_MASK_LR, PlantedRun, paper_equivalent_mask_lr, planted_sources, run_planted  # conftest: root on sys.path


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


def test_clean_share_counts_live_rows_by_hand():
    from bench.masks import clean_share, live_rows

    # 2 masks, C = 3, K = 1. Module 0's source 2 and module 1's source 0 are useless.
    useless = torch.tensor([[False, False, True], [True, False, False]])
    # mask 0 rows = module 1's branches (branch 0 useless: dead row); mask 1 rows = the last module's (all live)
    masks = torch.tensor([[[0., 0., 1.],    # dead row reads useless source 2
                           [1., 0., 0.],    # clean
                           [0., 0., 1.]],   # useless source 2
                          [[0., 1., 0.],    # clean
                           [1., 0., 0.],    # useless source 0
                           [0., 0., 1.]]])  # clean
    assert live_rows(useless).tolist() == [[False, True, True], [True, True, True]]
    assert clean_share(masks, useless) == pytest.approx(3 / 6)
    assert clean_share(masks, useless, live_only=True) == pytest.approx(3 / 5)


@pytest.mark.parametrize("construction", ["decoy-noise", "decoy-shuffle"])
def test_decoys_carry_the_clean_branches_scale(construction):
    from bench.masks import _plant

    from maskconnect.models import build_model
    from maskconnect.specs import make_spec

    spec_kw = dict(dataset="synthetic", stage_width=8, num_classes=5, image_size=8)
    torch.manual_seed(0)
    model = build_model(make_spec("20,4,8", connectivity="learned", fan_in=2, **spec_kw))
    model.save_memory = False
    useless = planted_sources(model.masks.num_masks, 8, 3, seed=0)
    seen = []
    block = model.blocks()[0]
    _plant(model, useless, construction)
    block.register_forward_hook(lambda m, i, y: seen.append(y.detach()))  # runs after the planting hook: the replaced output
    with torch.no_grad():  # shrink the useless branches' own conv3 weights: a decoy must not follow
        w = block.conv3.weight.view(8, -1, *block.conv3.weight.shape[1:])
        w[useless[0]] *= 1e-3
    x = torch.randn(16, 3, 8, 8)
    model(x)
    y = seen[-1]
    sel, keep = useless[0], ~useless[0]
    ratio = float(y[:, sel].pow(2).mean().sqrt() / y[:, keep].pow(2).mean().sqrt())
    assert 0.7 < ratio < 1.4, ratio  # the decoy's scale is the clean branches', not the shrunk branch's


@pytest.mark.parametrize("argv, message", [
    (["--fan-in", "6"], "--fan-in 6: must be in 1..5"),
    (["--fan-in", "0"], "--fan-in 0: must be in 1..5"),
    (["--noisy", "5", "--fan-in", "4"], "--fan-in 4: must be in 1..3"),
    (["--rules", "projected", "softmax"], "--rules softmax: unknown; allowed: clip, centred, projected"),
])
def test_bad_fan_in_or_rule_is_refused_before_any_training(argv, message, capsys, tmp_path):
    from bench.masks import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
