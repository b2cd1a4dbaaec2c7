"""Models: parameter counts against the paper, torchvision equality, the masked model's equivalences."""

import csv
import math
from importlib import resources

import pytest
import torch
import torchvision

from maskconnect.connectivity import count_weights, mask_banks
from maskconnect.models import MaskedResNeXt, ResNeXt, build_model, load_full_weights
from maskconnect.specs import make_spec
from reference import naive_masked_forward, randomize_bn


def paper_params(model: str, dataset: str = "cifar100") -> float:
    """params_train of Fixed-Full from the paper's Table 2, read from the shipped CSV."""
    with resources.files("maskconnect").joinpath("paper/reference_results.csv").open() as f:
        for row in csv.DictReader(f):
            if (row["model"], row["dataset"], row["connectivity"], row["metric"]) == (model, dataset, "full", "params_train"):
                return float(row["value"])
    raise KeyError(model)


@pytest.mark.parametrize(
    "arch,paper,tol",
    [
        ("29,64,8", paper_params("29,64,8"), 0.005),
        ("29,8,8", paper_params("29,8,8"), 0.04),
        ("20,4,8", 0.28e6, 0.04),  # Fig. 3 model; 0.28M from the paper's text (docs/design.md section 1)
    ],
)
def test_cifar100_params_match_paper(arch, paper, tol):
    n = count_weights(build_model(make_spec(arch, dataset="cifar100")))
    assert abs(n - paper) / paper < tol, (arch, n, paper)


@pytest.mark.parametrize("arch,dataset,millions", [
    ("29,64,8", "cifar100", 34.52), ("29,8,8", "cifar100", 0.843), ("20,4,8", "cifar100", 0.273),
    ("29,64,8", "cifar10", 34.43), ("29,8,8", "cifar10", 0.820), ("20,4,8", "cifar10", 0.250),
])
def test_cifar_params_are_design_md_counts(arch, dataset, millions):
    """docs/design.md section 1's plain counts, as literals (the paper's own numbers differ by up to 4%):
    any change to the architecture rules shows up here, whatever the paper tolerance allows."""
    n = count_weights(build_model(make_spec(arch, dataset=dataset)))
    digits = 2 if millions > 10 else 3
    assert round(n / 1e6, digits) == millions, (arch, dataset, n)


def test_imagenet_101_4_32_params_match_paper():
    n = count_weights(build_model(make_spec("101,4,32", dataset="imagenet")))
    assert abs(n - 44.2e6) / 44.2e6 < 0.005, n  # ResNeXt-101 32x4d: 44.2M (Xie et al.)


@pytest.mark.parametrize("arch,tv_name", [("50,4,32", "resnext50_32x4d"), ("101,4,64", "resnext101_64x4d")])
def test_imagenet_full_is_torchvision(arch, tv_name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, tv_name)(weights=None).eval()
    ours = ResNeXt(make_spec(arch, dataset="imagenet")).eval()
    tv_shapes = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == tv_shapes  # parameter for parameter, buffer for buffer
    randomize_bn(tv, seed=1)
    ours.load_state_dict(tv.state_dict())  # strict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dataset,arch,k", [("cifar100", "29,8,8", 4), ("cifar10", "20,4,8", 1), ("imagenet", "50,4,32", 16)])
@pytest.mark.parametrize("connectivity", ["random", "learned"])
def test_masked_model_has_the_weights_of_full(dataset, arch, k, connectivity):
    full = build_model(make_spec(arch, dataset=dataset))
    masked = build_model(make_spec(arch, dataset=dataset, connectivity=connectivity, fan_in=k))
    full_sd = full.state_dict()
    masked_sd = {n: v for n, v in masked.state_dict().items() if not n.startswith("masks.")}
    assert masked_sd.keys() == full_sd.keys()
    assert {n: v.numel() for n, v in masked_sd.items()} == {n: v.numel() for n, v in full_sd.items()}
    assert count_weights(masked) == count_weights(full)
    c = masked.spec.cardinality
    assert mask_banks(masked)[0].fixed.shape == (masked.spec.num_modules - 1, c, c)


SMALL = dict(dataset="synthetic", stage_width=8, num_classes=5, image_size=8)


def _small(arch="20,2,4", **kw):
    return make_spec(arch, **{**SMALL, **kw})


@pytest.mark.parametrize("arch", ["20,2,4", "11,3,3"])
@pytest.mark.parametrize("connectivity", ["random", "learned"])
def test_full_weights_in_masked_model_with_all_ones_masks_is_resnext(arch, connectivity):
    torch.manual_seed(0)
    full = ResNeXt(_small(arch)).double()
    randomize_bn(full)
    c = full.spec.cardinality
    masked = MaskedResNeXt(_small(arch, connectivity=connectivity, fan_in=c)).double()
    load_full_weights(masked, full.state_dict())
    assert torch.equal(masked.masks.current(), torch.ones_like(masked.masks.current()))  # K = C
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    full.eval(), masked.eval()
    with torch.no_grad():
        assert torch.allclose(masked(x), full(x), atol=1e-10)


def test_full_weights_equivalence_imagenet_layout():
    torch.manual_seed(0)
    spec = dict(dataset="imagenet", stage_width=16, num_classes=7)
    full = ResNeXt(make_spec("50,2,4", **spec)).double().eval()
    randomize_bn(full)
    masked = MaskedResNeXt(make_spec("50,2,4", connectivity="random", fan_in=4, **spec)).double().eval()
    load_full_weights(masked, full.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(masked(x), full(x), atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_vectorised_forward_equals_per_branch_loop(k):
    torch.manual_seed(k)
    model = MaskedResNeXt(_small(connectivity="random", fan_in=k, seed=10 + k)).double().eval()
    randomize_bn(model, seed=k)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        fast = model(x)
    ref = naive_masked_forward(model, x)
    assert torch.allclose(fast, ref, atol=1e-10)
    # with K < C the branches really read different sources (otherwise the mixing would go untested)
    m = model.masks.fixed
    assert (m.sum(-1) == k).all()
    if k < 4:
        assert (m != m[:, :1, :]).any()


def test_vectorised_equals_loop_for_learned_sampled_masks():
    torch.manual_seed(3)
    model = MaskedResNeXt(_small(connectivity="learned", fan_in=2)).double()
    randomize_bn(model, seed=3)
    with torch.no_grad():
        model.masks.real.uniform_(0, 1)
    sampled = mask_banks(model)[0]
    from maskconnect.connectivity import sample_masks

    m = sample_masks(sampled.real, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        sampled.fixed.copy_(m)
        sampled.frozen = True
        fast = model(x)
    assert torch.allclose(fast, naive_masked_forward(model, x, masks=m), atol=1e-10)


def test_vectorised_forward_is_batch_independent_in_eval():
    model = MaskedResNeXt(_small(connectivity="random", fan_in=2)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        whole = model(x)
        parts = torch.cat([model(x[:2]), model(x[2:])])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_backward_runs_and_reaches_every_weight():
    model = MaskedResNeXt(_small(connectivity="learned", fan_in=2)).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.masks.real.grad.abs().sum() > 0


# --- the model's identity share and initial scale (docs/design.md sections 3 and 11) ------------------
# References computed from the definitions, never read back from the attributes of the code under test.

RULES_SMALL = dict(dataset="synthetic", stage_width=8, num_classes=5, image_size=8)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_identity_share_is_one_over_k_into_masks_and_one_over_c_into_the_output(k):
    """With every residual function zeroed (conv3 = 0, shared BN3 beta = 0), a module's branch outputs
    are its identity paths times the share; read at each module's plain form (its mixed input, its output)."""
    c = 4
    spec = make_spec("20,2,4", connectivity="random", fan_in=k, **RULES_SMALL)
    model = MaskedResNeXt(spec).eval()
    seen = []

    def watch(blk):
        plain = blk.plain

        def spy(x):
            y = plain(x)
            seen.append((blk, x, y))
            return y

        blk.plain = spy

    for blk in model.blocks():
        torch.nn.init.zeros_(blk.conv3.weight)
        torch.nn.init.zeros_(blk.bn3.bias)
        watch(blk)
    model(torch.randn(3, 3, 8, 8))
    last = len(seen) - 1
    for i, (blk, x, y) in enumerate(seen):
        if blk.downsample is not None:
            continue  # a projection: P is a conv, not the identity
        share = 1.0 / c if i == last else 1.0 / k
        if i == 0:  # fed by the stem: every branch reads the same input
            expect = x.unsqueeze(1).expand(-1, c, -1, -1, -1) * share
        else:
            expect = x.reshape(x.shape[0], c, -1, *x.shape[-2:]) * share
        torch.testing.assert_close(y, expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_initial_gamma_of_the_shared_last_bn(k):
    c = 8
    spec = make_spec("20,2,8", connectivity="learned", fan_in=k, **RULES_SMALL)
    blocks = MaskedResNeXt(spec).blocks()
    for i, blk in enumerate(blocks):
        fan = c if i == len(blocks) - 1 else k   # the output node sums all C branches
        assert torch.allclose(blk.bn3.weight, torch.full_like(blk.bn3.weight, 1 / math.sqrt(fan)))
