"""Mask sampling, the straight-through gradient, clipping, freezing and pruning."""

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from maskconnect.connectivity import (
    MaskBank, count_weights, freeze_masks, live_branches, param_groups, random_masks, sample_masks, topk_masks,
)
from maskconnect.mask_rules import clip_
from maskconnect.models import MaskedResNeXt, build_model
from maskconnect.models.pruning import load_pruned, prune, prune_report, save_pruned
from maskconnect.specs import make_spec
from reference import naive_masked_forward, randomize_bn

SMALL = dict(dataset="synthetic", stage_width=8, num_classes=5, image_size=8)


def _small(arch="20,2,4", **kw):
    return make_spec(arch, **{**SMALL, **kw})


def _assert_k_distinct(m, k):
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.sum(-1) == k).all()


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_sampled_masks_have_k_distinct_ones(k):
    torch.manual_seed(0)
    real = torch.rand(50, 8, 8)
    for _ in range(20):
        _assert_k_distinct(sample_masks(real, k), k)


def test_degenerate_rows_still_give_k_sources():
    torch.manual_seed(0)
    real = torch.zeros(3, 6)
    real[1, 2] = 0.7            # one positive entry, K=3
    real[2, [0, 5]] = 1.0       # two positive entries, K=3
    for _ in range(200):
        m = sample_masks(real, 3)
        _assert_k_distinct(m, 3)
        assert m[1, 2] == 1 and m[2, 0] == 1 and m[2, 5] == 1  # positive entries always win over the floor


def test_sampling_frequencies_match_normalised_masks():
    # K = 1: each draw picks source k with probability m~_k / sum(m~); chi-square over 20000 draws.
    gen = torch.Generator().manual_seed(1234)
    real = torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1, 0.0, 0.05, 0.6])
    n = 20000
    draws = sample_masks(real.expand(n, 8).contiguous(), 1, generator=gen)
    counts = draws.sum(0)
    p = real / real.sum()
    expected = p * n
    nz = expected > 0
    assert counts[~nz].sum() <= 1  # the zero entry is (almost) never drawn: floor 1e-6
    chi2 = stats.chisquare(counts[nz].numpy(), expected[nz].numpy() * counts[nz].sum().item() / expected[nz].sum().item())
    assert chi2.pvalue > 0.001, (counts, expected)
    # and not a uniform sampler: the largest entry is drawn far more often than the smallest
    assert counts[0] > 10 * counts[6]


def test_sampling_without_replacement_inclusion_is_monotone():
    # K = 2 from weights (4, 2, 1, 1): inclusion probabilities follow the weights' order.
    gen = torch.Generator().manual_seed(7)
    real = torch.tensor([0.8, 0.4, 0.2, 0.2]).expand(20000, 4).contiguous()
    incl = sample_masks(real, 2, generator=gen).mean(0)
    # exact inclusion probability of item 0 under successive sampling: 1 - P(not first) * P(not second)
    p = torch.tensor([4.0, 2, 1, 1]) / 8
    p0 = p[0] + sum(p[j] * p[0] / (1 - p[j]) for j in range(1, 4))
    assert abs(incl[0] - p0) < 0.015
    assert incl[0] > incl[1] > incl[2]
    assert abs(incl.sum() - 2) < 1e-6


def test_random_masks_depend_only_on_seed():
    a, b, c = random_masks(8, 8, 4, seed=1), random_masks(8, 8, 4, seed=1), random_masks(8, 8, 4, seed=2)
    _assert_k_distinct(a, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_straight_through_gradient_equals_analytic():
    """dL/dm~_jk = <dL/dx_j, F_k(x_k) + P(x_k)/K>, with x_j the pre-activation input of branch j."""
    torch.manual_seed(0)
    model = MaskedResNeXt(_small(connectivity="learned", fan_in=2)).double().train()
    with torch.no_grad():
        model.masks.real.uniform_(0.1, 0.9)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])

    torch.manual_seed(42)
    F.cross_entropy(model(x), target).backward()
    autograd = model.masks.real.grad.clone()
    model.zero_grad()

    # The same forward pass written out, keeping the pre-activations and the branch outputs.
    torch.manual_seed(42)
    masks = model.masks()          # the same draw (same RNG state)
    binary = masks.detach()
    h = model._stem_forward(x)
    pre_acts, ys = [], []
    blocks = model.blocks()
    for i, blk in enumerate(blocks):
        y = blk(h)
        if i < len(blocks) - 1:
            pre = torch.matmul(binary[i], y.reshape(y.shape[0], y.shape[1], -1))
            pre.retain_grad()
            pre_acts.append(pre)
            ys.append(y.reshape(y.shape[0], y.shape[1], -1))
            h = F.relu(pre).reshape(y.shape[0], -1, *y.shape[-2:])
        else:
            h = F.relu(y.sum(1))
    logits = model.fc(torch.flatten(model.avgpool(h), 1))
    F.cross_entropy(logits, target).backward()
    analytic = torch.stack([torch.einsum("njd,nkd->jk", g.grad, y) for g, y in zip(pre_acts, ys)])
    assert torch.allclose(autograd, analytic, atol=1e-10)
    assert (analytic != 0).sum() > (binary == 1).sum()  # unselected entries get a gradient too


def test_forward_value_is_exactly_binary():
    bank = MaskBank(3, 4, 2, "learned", init=0.37).train()
    out = bank()
    _assert_k_distinct(out.detach(), 2)
    assert out.requires_grad


def test_param_groups_clip_and_freeze():
    model = MaskedResNeXt(_small(connectivity="learned", fan_in=2))
    groups = param_groups(model, lr=0.1, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["weights", "masks"]
    assert groups[1]["weight_decay"] == 0 and groups[1]["params"] == [model.masks.real]
    assert sum(p.numel() for p in groups[0]["params"]) == count_weights(model)
    with torch.no_grad():
        model.masks.real.uniform_(-1, 2)
    with torch.no_grad():
        clip_(model.masks.real)
    assert model.masks.real.min() >= 0 and model.masks.real.max() <= 1

    real = torch.rand(model.masks.real.shape)
    with torch.no_grad():
        model.masks.real.copy_(real)
    freeze_masks(model)
    expected = torch.zeros_like(real).scatter_(-1, real.topk(2, dim=-1).indices, 1.0)
    assert torch.equal(model.masks.fixed, expected)
    model.train()
    assert torch.equal(model.masks(), expected)  # frozen: no more sampling, even in training mode
    # the frozen flag survives a state-dict round trip
    other = MaskedResNeXt(_small(connectivity="learned", fan_in=2))
    other.load_state_dict(model.state_dict())
    assert other.masks.frozen and torch.equal(other.masks(), expected)


def test_eval_before_freezing_uses_topk():
    bank = MaskBank(2, 4, 2, "learned")
    with torch.no_grad():
        bank.real.copy_(torch.tensor([[0.9, 0.1, 0.8, 0.2]] * 4).expand(2, 4, 4))
    bank.eval()
    assert torch.equal(bank(), topk_masks(bank.real, 2))
    assert bank()[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_live_branches_backwards():
    c = 3
    masks = torch.zeros(2, c, c)
    masks[1, :, 0] = 1  # module 3: every branch reads branch 0 of module 2
    masks[0, 0, 1] = 1  # module 2 branch 0 reads module 1 branch 1
    masks[0, 1, 2] = 1  # module 2 branch 1 (dead) reads module 1 branch 2
    masks[0, 2, 2] = 1
    live = live_branches(masks)
    assert [l.tolist() for l in live] == [[False, True, False], [True, False, False], [True, True, True]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pruned_model_computes_the_same_function(k):
    torch.manual_seed(k)
    model = MaskedResNeXt(_small(connectivity="random", fan_in=k, seed=k)).double().eval()
    randomize_bn(model, seed=k)
    compact = prune(model).eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), atol=1e-10)
    assert torch.allclose(naive_masked_forward(compact, x), model(x).detach(), atol=1e-10)
    dead = model.spec.num_modules * model.spec.cardinality - sum(compact.branches)
    if dead:
        assert count_weights(compact) < count_weights(model)
    else:
        assert count_weights(compact) == count_weights(model)


def test_pruning_removes_dead_branches_with_known_masks():
    torch.manual_seed(0)
    model = MaskedResNeXt(_small(connectivity="random", fan_in=1)).double().eval()
    randomize_bn(model)
    with torch.no_grad():
        model.masks.fixed.zero_()
        model.masks.fixed[:, :, 0] = 1  # every branch reads branch 0 only
    compact = prune(model)
    assert compact.branches == [1] * (model.spec.num_modules - 1) + [4]
    assert count_weights(compact) < count_weights(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(compact.eval()(x), model(x), atol=1e-10)


def test_prune_report_on_paper_model():
    k4 = prune_report(build_model(make_spec("29,64,8", dataset="cifar100", connectivity="random", fan_in=4, seed=0)))
    k1 = prune_report(build_model(make_spec("29,64,8", dataset="cifar100", connectivity="random", fan_in=1, seed=0)))
    assert k4["params_train"] == k1["params_train"]
    assert 1 - k4["params_test"] / k4["params_train"] < 0.01   # paper: 34.4M -> 34.3M
    assert 1 - k1["params_test"] / k1["params_train"] > 0.10   # K=1 leaves many branches unread
    learned = prune_report(build_model(make_spec("29,64,8", dataset="cifar100", connectivity="learned", fan_in=4)))
    assert learned["params_test"] == learned["params_train"]   # nothing frozen before training


def test_prune_needs_frozen_masks_and_roundtrips(tmp_path):
    model = MaskedResNeXt(_small(connectivity="learned", fan_in=2))
    with pytest.raises(ValueError, match="not frozen"):
        prune(model)
    with torch.no_grad():
        model.masks.real.uniform_()
    freeze_masks(model)
    compact = prune(model).eval()
    save_pruned(tmp_path / "pruned.pt", compact)
    loaded = load_pruned(tmp_path / "pruned.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))


def test_a_bank_saved_before_the_rename_of_binary_to_fixed_still_loads():
    """Checkpoints and pruned models written before the fixed masks' buffer was renamed hold it as
    ``masks.binary``: they load into the same masks."""
    model = MaskedResNeXt(_small(connectivity="random", fan_in=2, seed=4))
    state = {(k.replace("masks.fixed", "masks.binary")): v for k, v in model.state_dict().items()}
    assert "masks.binary" in state and "masks.fixed" not in state
    other = MaskedResNeXt(_small(connectivity="random", fan_in=2, seed=9))
    assert not torch.equal(other.masks.fixed, model.masks.fixed)
    other.load_state_dict(state)
    assert torch.equal(other.masks.fixed, model.masks.fixed)
