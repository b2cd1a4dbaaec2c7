"""The memory-saving training path of the masked model (docs/design.md section 10): the same outputs, gradients (weights
and real-valued masks) and BN statistics as the plain autograd path, for every fan-in, with fewer bytes
kept for the backward pass; and the memory benchmark's smoke run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bench  # the repository's bench/ package (tests/conftest.py puts the repository root on sys.path)
from bench.memory import saved_bytes
from maskconnect.connectivity import freeze_masks
from maskconnect.models import MaskedResNeXt, build_model
from maskconnect.models.pruning import prune
from maskconnect.specs import make_spec

C = 8
# {20,4,8} at a small width: every kind of module (stem-fed, identity, projection with stride 2, output node)
SMALL = dict(dataset="cifar10", stage_width=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(model: MaskedResNeXt) -> tuple[MaskedResNeXt, MaskedResNeXt]:
    plain = copy.deepcopy(model)
    plain.save_memory = False
    assert model.save_memory is None  # default: the saving path on CUDA, the plain one on a CPU
    model.save_memory = True
    return model, plain


def _step(model, x, seed=7):
    torch.manual_seed(seed)  # the mask draw
    out = model(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    return out.detach()


def _assert_same_step(saving, plain, x):
    out_s, out_p = _step(saving, x), _step(plain, x)
    torch.testing.assert_close(out_s, out_p, rtol=1e-6, atol=1e-6)
    gs, gp = dict(saving.named_parameters()), dict(plain.named_parameters())
    assert gs.keys() == gp.keys()
    n = 0
    for name, p in gp.items():
        if p.grad is None:
            assert gs[name].grad is None, name
            continue
        scale = p.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(gs[name].grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
        n += 1
    assert n == sum(1 for p in gp.values() if p.requires_grad)  # every weight (and the masks) got a gradient
    bs, bp = dict(saving.named_buffers()), dict(plain.named_buffers())
    for name, b in bp.items():  # running statistics updated once per step, as the plain path does
        assert torch.equal(bs[name], b), name


@pytest.mark.parametrize("connectivity", ["learned", "random"])
@pytest.mark.parametrize("k", range(1, C + 1))
def test_saving_path_matches_plain_path_for_every_fan_in(connectivity, k):
    torch.manual_seed(k)
    model = build_model(make_spec("20,4,8", connectivity=connectivity, fan_in=k, **SMALL)).train()
    if connectivity == "learned":
        with torch.no_grad():
            model.masks.real.uniform_(0.05, 1.0)  # non-uniform rows: the draw differs row by row
    saving, plain = _pair(model)
    x = torch.randn(3, 3, 8, 8)
    _assert_same_step(saving, plain, x)
    if connectivity == "learned" and k < C:
        g = saving.masks.real.grad
        assert (g != 0).sum() > k * g.shape[0] * g.shape[1]  # straight-through: unselected entries too


def test_saving_path_matches_plain_path_on_a_pruned_model():
    """Branch counts differ between modules (non-square masks, FixedMasks)."""
    torch.manual_seed(0)
    model = build_model(make_spec("20,4,8", connectivity="learned", fan_in=1, **SMALL))
    with torch.no_grad():
        model.masks.real.copy_(torch.rand(model.masks.real.shape, generator=torch.Generator().manual_seed(3)))
    freeze_masks(model)
    compact = prune(model).train()
    assert len(set(compact.branches)) > 1
    saving, plain = _pair(compact)
    _assert_same_step(saving, plain, torch.randn(3, 3, 8, 8))


def test_saving_path_matches_plain_path_under_cpu_bf16_autocast():
    """The recomputation in the backward pass runs under the forward pass's autocast state."""
    torch.manual_seed(0)
    saving, plain = _pair(build_model(make_spec("20,4,8", connectivity="learned", fan_in=3, **SMALL)).train())
    x = torch.randn(3, 3, 8, 8)
    outs = []
    for m in (saving, plain):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        out.float().square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), saving.parameters()):
        scale = p.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-2, atol=1e-2 * scale, msg=name)


def test_saving_path_keeps_one_branch_tensor_per_masked_module():
    """Learned and random keep the same bytes (the mask gradient costs nothing extra), far fewer than
    the plain path, and the learned/full ratio of {20,4,8} is within its goal (< 2.2, bench/README.md)."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    full = saved_bytes(build_model(make_spec("20,4,8")).train(), x)["activations"]
    got = {}
    for kind in ("learned", "random"):
        saving, plain = _pair(build_model(make_spec("20,4,8", connectivity=kind, fan_in=4)).train())
        got[kind] = saved_bytes(saving, x)["activations"], saved_bytes(plain, x)["activations"]
    assert got["learned"][0] == got["random"][0]
    assert got["learned"][0] < 0.5 * got["learned"][1] and got["random"][0] < 0.6 * got["random"][1]
    assert got["learned"][0] / full < 2.2


def test_eval_and_no_grad_use_the_plain_path():
    torch.manual_seed(0)
    saving, plain = _pair(build_model(make_spec("20,4,8", connectivity="learned", fan_in=2, **SMALL)))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = saving.train()(x)
        torch.manual_seed(1)
        b = plain.train()(x)
    assert torch.equal(a, b)
    assert torch.equal(saving.eval()(x), plain.eval()(x))


def test_memory_benchmark_quick(tmp_path):
    assert bench.main(["memory", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                       "--tag", "t"]) == 0
    rec = json.loads((tmp_path / "memory-cpu-t.json").read_text())
    assert rec["benchmark"] == "memory" and rec["quick"] is True and rec["device"] == "cpu"
    rows = {r["name"]: r for r in rec["results"]}
    assert {r["path"] for r in rec["results"]} == {None, "saving", "plain"}
    for r in rec["results"]:
        assert r["activation_bytes_per_image"] > 0 and r["batch_80gb_estimate"] > 0
    saving, plain = rows["{20,4,8} learned K=4 (saving path)"], rows["{20,4,8} learned K=4 (plain path)"]
    assert saving["activation_bytes_per_image"] < plain["activation_bytes_per_image"]
    goals = {g["id"]: g for g in rec["goals"]}
    assert goals["saved_bytes_learned_vs_full_20_4_8"]["met"] is True  # exact and device-independent: decided
    assert "caveat" not in goals["saved_bytes_learned_vs_full_20_4_8"]
    assert goals["saved_bytes_learned_vs_full_50_4_32"]["met"] is None  # 32x32 ImageNet inputs under --quick
    assert (tmp_path / "memory-cpu-t.md").read_text().count("\n|") >= 10
