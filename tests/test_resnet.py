"""The ResNet family (docs/design.md section 12): parameter counts against the paper and torchvision, Fixed-Prev
as the standard network, the masked ResNet against a reference written from the paper, its vectorised
connections against its plain form, mask gradients against finite differences, pruning, and masks whose
rows have different numbers of candidates."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from maskconnect.connectivity import (candidate_masks, count_mask_entries, count_weights, freeze_masks, mask_banks,
                                      random_masks, sample_masks, topk_masks)
from maskconnect.mask_rules import MASK_RULES, centre_rows_, project_capped_simplex
from maskconnect.models import ResNet, build_model, load_baseline_weights
from maskconnect.models.pruning import load_pruned, prune, prune_report, save_pruned
from maskconnect.specs import make_spec
from reference import randomize_bn, reachable_blocks, reference_cifar_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def _paper(model: str, source: str, metric: str = "top1") -> dict:
    with resources.files("maskconnect").joinpath("paper/reference_results.csv").open() as f:
        return {(r["connectivity"], r["fan_in"]): float(r["value"]) for r in csv.DictReader(f)
                if r["model"] == model and r["metric"] == metric and r["source"] == source}


def cifar_resnet_params(n: int, classes: int = 100) -> int:
    """He et al.'s CIFAR ResNet with option-A shortcuts, counted by hand: a 3x3 stem of 16 with BN, three
    stages of n basic blocks (two 3x3 convs with BN each), widths 16/32/64, a linear classifier."""
    total, width = 3 * 16 * 9 + 2 * 16, 16
    for out in (16, 32, 64):
        for _ in range(n):
            total += width * out * 9 + out * out * 9 + 4 * out
            width = out
    return total + 64 * classes + classes


# ---- the networks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,n,millions", [("resnet38", 6, 0.57), ("resnet74", 12, 1.15), ("resnet110", 18, 1.73)])
def test_cifar_resnet_parameters(arch, n, millions):
    for conn, k in (("prev", None), ("random", 10), ("learned", 10)):
        model = build_model(make_spec(arch, dataset="cifar100", connectivity=conn, fan_in=k))
        assert count_weights(model) == cifar_resnet_params(n)   # masks are not weights
    assert round(cifar_resnet_params(n) / 1e6, 2) == millions     # the paper's 0.57M for ResNet-38; the others


def test_resnet50_is_torchvision_parameter_for_parameter_and_computes_its_outputs():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    randomize_bn(tv)
    ours = build_model(make_spec("resnet50", dataset="imagenet", connectivity="prev")).eval()
    assert isinstance(ours, ResNet)
    tv_state = tv.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv_state.items()}
    ours.load_state_dict(tv_state)  # strict: the same names and shapes
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert float((a - b).norm() / b.norm()) < 1e-5   # the same function; CPU fast paths sum in another order
    # the learned ResNet-50 of the paper (K = 10) has the same weights, and torchvision's load into it
    learned = build_model(make_spec("resnet50", dataset="imagenet", connectivity="learned", fan_in=10))
    assert count_weights(learned) == sum(p.numel() for p in tv.parameters())
    load_baseline_weights(learned, tv_state)


def _cifar(arch: str = "resnet20", conn: str = "prev", k: int | None = None, **kw):
    return make_spec(arch, dataset="cifar10", connectivity=conn, fan_in=k, **kw)


def test_fixed_prev_is_the_standard_cifar_resnet():
    torch.manual_seed(1)
    model = build_model(_cifar()).eval()
    randomize_bn(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_cifar_resnet(model.state_dict(), x, 3), atol=1e-5)


def _predecessor_mask(n_blocks: int) -> torch.Tensor:
    return torch.eye(n_blocks - 1).unsqueeze(0)   # row j-1 (block j) reads block j-1: the diagonal


@pytest.mark.parametrize("conn", ["learned", "random"])
def test_masked_resnet_reading_each_predecessor_is_fixed_prev(conn):
    """Fixed-Prev's weights in a masked ResNet whose every block reads its predecessor (K = 1) compute the
    standard network, in eval and in training mode (outputs, weight gradients, BN statistics)."""
    torch.manual_seed(2)
    prev = build_model(_cifar())
    randomize_bn(prev)
    masked = build_model(_cifar(conn=conn, k=1))
    load_baseline_weights(masked, prev.state_dict())
    with torch.no_grad():
        if conn == "learned":
            masked.masks.real.copy_(_predecessor_mask(9))
            freeze_masks(masked)
        else:
            masked.masks.fixed.copy_(_predecessor_mask(9))
    assert torch.equal(masked.masks()[0], _predecessor_mask(9)[0])
    x = torch.randn(4, 3, 32, 32)
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(prev), copy.deepcopy(masked)
        getattr(a, mode)(), getattr(b, mode)()
        ya, yb = a(x), b(x)
        assert torch.allclose(ya, yb, atol=1e-5), mode
        if mode == "train":
            ya.square().sum().backward()
            yb.square().sum().backward()
            gb = dict(b.named_parameters())
            for name, p in a.named_parameters():
                assert torch.allclose(p.grad, gb[name].grad, atol=1e-4, rtol=1e-4), name
            for name, buf in a.named_buffers():
                assert torch.allclose(buf.float(), dict(b.named_buffers())[name].float(), atol=1e-6), name


@pytest.mark.parametrize("conn,k", [("random", 3), ("learned", 4), ("random", 8)])
def test_masked_resnet_matches_the_reference_written_from_the_paper(conn, k):
    torch.manual_seed(3)
    model = build_model(_cifar(conn=conn, k=k, seed=5)).eval()
    randomize_bn(model)
    if conn == "learned":
        with torch.no_grad():
            model.masks.real.uniform_(0.05, 1.0, generator=torch.Generator().manual_seed(4))
        freeze_masks(model)
    mask = model.masks()[0].tolist()
    # the stem is no candidate beyond block 1, and a row with fewer than K candidates reads them all
    assert [sum(row) for row in mask] == [min(k, j) for j in range(1, 9)]
    assert mask != _predecessor_mask(9)[0].tolist()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = reference_cifar_resnet(model.state_dict(), x, 3, mask=mask)
        assert torch.allclose(model(x), ref, atol=1e-5)
        model.save_memory = False   # the plain form, too
        assert torch.allclose(model(x), ref, atol=1e-5)


def _learned_model(arch="resnet20", k=4, dtype=torch.float64, channels_last=False, seed=0):
    torch.manual_seed(seed)
    model = build_model(_cifar(arch, "learned", k)).to(dtype)
    with torch.no_grad():  # rows far from uniform, so the draws differ from row to row
        model.masks.real.uniform_(0.05, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _step(model, x, y, *, fast: bool, draw: int = 7) -> dict:
    m = copy.deepcopy(model).train()
    m.save_memory = None if fast else False
    torch.manual_seed(draw)  # the same mask draw on both paths
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({f"grad:{n}": p.grad for n, p in m.named_parameters()})
    out.update({f"buf:{n}": b.double() for n, b in m.named_buffers() if b is not None and b.is_floating_point()})
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_vectorised_connections_compute_the_plain_form(channels_last):
    """kernels.EarlierOutputs (one bmm per source stage, gradients gathered per stage) against the model's
    plain loop over candidates under plain autograd, in float64: the loss, every gradient (the real-valued
    masks' straight-through gradient included) and every BN statistic."""
    model = _learned_model(channels_last=channels_last)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (5,))
    fast, plain = _step(model, x, y, fast=True), _step(model, x, y, fast=False)
    assert set(fast) == set(plain) and fast["grad:masks.real"] is not None
    for key, ref in plain.items():
        assert fast[key] is not None, key
        assert torch.allclose(fast[key], ref, rtol=1e-10, atol=1e-12), key
    # the mask gradient reaches unselected candidates too (straight-through), never a non-candidate; a row
    # whose block this draw leaves unread gets none (dL/dx_j = 0), the last block's always does
    g = fast["grad:masks.real"][0]
    valid = candidate_masks(range(1, 9))
    assert (g[~valid] == 0).all() and (g[-1] != 0).all()
    touched = (g != 0).any(-1)
    assert ((g != 0) == (valid & touched[:, None])).all()


def test_vectorised_connections_in_bf16_autocast_follow_the_plain_form():
    model = _learned_model(dtype=torch.float32)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    grads = {}
    for fast in (True, False):
        m = copy.deepcopy(model).train()
        m.save_memory = None if fast else False
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        grads[fast] = torch.cat([p.grad.flatten().float() for p in m.parameters()])
    rel = float((grads[True] - grads[False]).norm() / grads[False].norm())
    assert rel < 0.05, rel   # both round to bf16, at different places


@pytest.mark.parametrize("fast", [True, False])
def test_mask_gradients_match_finite_differences(fast):
    """The masks as continuous numbers (what the straight-through gradient differentiates): d loss / d m by
    autograd against central finite differences, every candidate entry (gradcheck, float64)."""
    torch.manual_seed(4)
    model = build_model(make_spec("resnet14", dataset="digits", connectivity="learned", fan_in=2)).double().train()
    model.save_memory = None if fast else False

    class Given(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self):
            return self.m

    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    valid = candidate_masks(range(1, 6)).double()
    m0 = (torch.rand(1, 5, 5, dtype=torch.float64) * valid).requires_grad_()

    def loss(m):
        model.masks = Given(m * valid)
        return F.cross_entropy(model(x), y)

    assert torch.autograd.gradcheck(loss, (m0,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- pruning -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("conn,k,seed", [("learned", 1, 0), ("learned", 2, 3), ("random", 1, 1), ("random", 2, 5)])
def test_pruning_removes_exactly_the_unread_blocks_and_keeps_the_function(conn, k, seed, tmp_path):
    torch.manual_seed(seed)
    model = build_model(make_spec("resnet38", dataset="digits", connectivity=conn, fan_in=k, seed=seed))
    randomize_bn(model, seed)
    if conn == "learned":
        with torch.no_grad():
            model.masks.real.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        freeze_masks(model)
    model.eval()
    compact = prune(model).eval()
    mask = model.masks()[0].tolist()
    assert compact.alive == reachable_blocks(mask)
    assert not all(compact.alive), "these seeds leave some block unread"
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), compact(x), atol=1e-5)
        compact.save_memory = False
        assert torch.allclose(model(x), compact(x), atol=1e-5)
    dead = [j for j, a in enumerate(compact.alive) if not a]
    per_block = {j: sum(p.numel() for n, p in model.named_parameters() if n.startswith(_block_prefix(model, j)))
                 for j in dead}
    report = prune_report(model)
    assert report["params_test"] == report["params_train"] - sum(per_block.values())
    assert report["branches_test"] == sum(compact.alive) and report["branches_train"] == 18
    save_pruned(tmp_path / "pruned.pt", compact)
    again = load_pruned(tmp_path / "pruned.pt")
    with torch.no_grad():
        assert torch.equal(again(x), compact(x))


def _block_prefix(model, j: int) -> str:
    stage = model.plan[j][0]
    first = next(i for i, p in enumerate(model.plan) if p[0] == stage)
    return f"layer{stage + 1}.{j - first}."


def test_fixed_prev_and_full_fan_in_prune_nothing():
    model = build_model(make_spec("resnet38", dataset="digits", connectivity="random", fan_in=17))
    assert all(prune(model.eval()).alive)
    assert prune_report(model)["params_test"] == prune_report(model)["params_train"]


# ---- masks with rows of different lengths ------------------------------------------------------------

def test_rows_read_min_k_candidates_in_every_mask_operation():
    counts = list(range(1, 18))   # ResNet-38: block j reads among blocks 1..j-1
    valid = candidate_masks(counts)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 17, 17, generator=g) * valid
    for k in (1, 4, 10, 17):
        want = torch.tensor([min(k, n) for n in counts], dtype=torch.float32)
        for masks in (sample_masks(real, k, generator=g, valid=valid), topk_masks(real, k, valid=valid),
                      random_masks(3, 17, k, seed=k, valid=valid)):
            assert (masks * ~valid).sum() == 0                         # never a non-candidate
            assert torch.equal(masks.sum(-1), want.expand(3, 17))      # min(K, candidates) ones per row
        proj = project_capped_simplex(real.double(), k, valid)
        assert torch.allclose(proj.sum(-1), want.double().expand(3, 17)) and (proj * ~valid).abs().sum() == 0
        assert proj.min() >= 0 and proj.max() <= 1


def test_projection_on_a_row_is_the_closest_point_of_its_capped_simplex():
    """Against the definition, per row: the projection is feasible, and no feasible point the test draws is
    closer to the input (uniform points of the set, and the projection moved along feasible directions)."""
    g = torch.Generator().manual_seed(1)
    valid = candidate_masks([3, 6, 9, 12])
    v = torch.randn(4, 12, generator=g, dtype=torch.float64) * valid
    k = 4
    p = project_capped_simplex(v, k, valid)
    for r, n in enumerate((3, 6, 9, 12)):
        if n <= k:
            continue
        d0 = (p[r, :n] - v[r, :n]).norm()
        for _ in range(200):   # moves that keep the sum and the box: +e on one entry, -e on another
            i, j = torch.randint(0, n, (2,), generator=g).tolist()
            if i == j:
                continue
            e = float(torch.rand((), generator=g)) * 0.05
            q = p[r, :n].clone()
            q[i] += e
            q[j] -= e
            if q.min() >= 0 and q.max() <= 1:
                assert (q - v[r, :n]).norm() >= d0 - 1e-12


def test_rules_keep_non_candidates_at_zero_and_rows_feasible():
    spec = make_spec("resnet20", dataset="digits", connectivity="learned", fan_in=3)
    for name, rule in MASK_RULES.items():
        model = build_model(spec).train()
        bank = mask_banks(model)[0]
        rule.after_step([bank])
        opt = torch.optim.SGD([bank.real], lr=5.0)
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(4, 1, 8, 8)).square().sum().backward()
            rule.before_step([bank])
            opt.step()
            rule.after_step([bank])
            opt.zero_grad()
        assert (bank.real[0][~bank.valid] == 0).all(), name
        assert bank.real.min() >= 0 and bank.real.max() <= 1, name
    g = torch.randn(2, 8, 8) * candidate_masks(range(1, 9))
    centre_rows_(g, candidate_masks(range(1, 9)))
    assert torch.allclose(g.sum(-1), torch.zeros(2, 8), atol=1e-6)
    assert (g * ~candidate_masks(range(1, 9)) == 0).all()


def test_mask_entries_count_candidates_only():
    model = build_model(make_spec("resnet38", dataset="digits", connectivity="learned", fan_in=10))
    assert count_mask_entries(model) == 17 * 18 // 2


# ---- the command line ------------------------------------------------------------------------------

def test_describe_gives_the_resnets_parameters():
    for arch, n in (("resnet38", 6), ("resnet110", 18)):
        out = subprocess.run([sys.executable, "-m", "maskconnect", "describe", "--dataset", "cifar100", "--arch", arch,
                              "--json"], capture_output=True, text=True, check=True)
        info = json.loads(out.stdout)
        assert info["params_train"] == cifar_resnet_params(n) and info["connectivity"] == "prev"
        assert info["family"] == "resnet" and info["fan_in"] == 1
    out = subprocess.run([sys.executable, "-m", "maskconnect", "describe", "--dataset", "cifar100", "--arch", "resnet38",
                          "--connectivity", "learned", "--fan-in", "18"], capture_output=True, text=True)
    assert out.returncode == 2 and "fan_in" in out.stderr and "17" in out.stderr and "Traceback" not in out.stderr


def test_paper_numbers_of_the_resnet_half_ship_with_the_suite():
    """The suite's copy of the paper's numbers holds Table 1, Fig. 2 and ResNet-50 (its values read here
    with the csv module; test_report.py checks the tables built from them)."""
    t1 = _paper("resnet38", "eccv-table1")
    assert t1 == {("prev", "1"): 68.54, ("random", "10"): 62.67, ("learned", "10"): 70.40}
    assert sorted(int(k) for _, k in _paper("resnet38", "eccv-fig2")) == list(range(1, 18))
    assert _paper("resnet50", "eccv-text") == {("prev", "1"): 76.15, ("learned", "10"): 78.09}


def test_the_suites_paper_numbers_equal_the_briefs_copy():
    """The suite ships the paper's numbers (src/maskconnect/paper/); the project's brief beside the checkout
    holds the reference copy, which gained Fig. 2's readings: the two stay equal, byte for byte."""
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / "reference_results.csv"
    if not shared.is_file():
        pytest.skip("no ../shared beside this checkout (CI always has it)")
    ours = resources.files("maskconnect").joinpath("paper/reference_results.csv").read_bytes()
    assert ours == shared.read_bytes()
