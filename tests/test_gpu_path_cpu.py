"""What a GPU runs, run on this CPU (docs/design.md section 10).

On CUDA a masked model trains by default on the memory-saving path (``MaskedBlock.forward_saving``,
``kernels.saving``: :class:`_MixedInput`, :class:`_SharedBNTail`), whose explicit 1x1 backward
(``_conv1x1_backward``) calls
``aten.convolution_backward``; on a CPU narrow branches take its matmul branch instead, and the CPU
default is the plain autograd path. ``kernels.cpu_fast_paths(False)`` makes a CPU run the GPU's kernels,
so both branches are compared here against the plain path, in NCHW and channels_last, float64, fp32 and bf16
autocast, for every fan-in: outputs, every gradient (masks included) and the BN running statistics.
A spy on the kernels' calls proves which branch ran, so the comparison cannot silently cover one.

Also: which path a forward pass takes (train with grad, eval, no_grad), and the ``centred`` mask rule
against ``clip(m - lr * (g - mean g))`` computed here from the raw gradient.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from collections import Counter

import pytest
import torch

from maskconnect import kernels
from maskconnect.kernels import cpu as cpu_kernels, saving
from maskconnect.connectivity import mask_banks, param_groups
from maskconnect.training.step import Precision, train_step
from maskconnect.models import MaskedBlock, MaskedResNeXt, build_model
from maskconnect.specs import make_spec
from step_check import assert_step_agrees, float64_reference, fp32_mask_draws, perturbed_learned, run_step

C = 8
# {20,4,8} at a small width on 8x8 inputs: every kind of module (stem-fed, identity, projection with
# stride 2, output node), the last stage on 2x2 maps (the small-map BN when the fast paths are on)
SMALL = dict(dataset="cifar10", stage_width=16)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a spy on the torch calls made by maskconnect.kernels -----------------------------------------------

# every module of the kernels package that calls torch: the spy replaces ``torch`` in each, so a kernel
# moved between them is still seen (test_the_spy_sees_the_calls_it_counts checks the spy itself)
KERNEL_MODULES = [m for m in (importlib.import_module(f"{kernels.__name__}.{i.name}")
                              for i in pkgutil.iter_modules(kernels.__path__)) if hasattr(m, "torch")]


class _TorchSpy:
    """Stands in for the ``torch`` module inside maskconnect.kernels: counts ``torch.matmul`` and every
    ``torch.ops.aten.*`` call, tagged with whether it ran inside ``_conv1x1_backward``."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.inside = False

    def __getattr__(self, name):
        return getattr(torch, name)

    def _count(self, name):
        self.calls[("conv1x1_backward" if self.inside else "elsewhere", name)] += 1

    def matmul(self, *args, **kwargs):
        self._count("matmul")
        return torch.matmul(*args, **kwargs)

    @property
    def ops(self):
        spy = self

        class _Aten:
            def __getattr__(self, name):
                op = getattr(torch.ops.aten, name)

                def call(*args, **kwargs):
                    spy._count(name)
                    return op(*args, **kwargs)
                return call

        class _Ops:
            aten = _Aten()

            def __getattr__(self, name):
                return getattr(torch.ops, name)
        return _Ops()

    def in_backward(self, name: str) -> int:
        return self.calls[("conv1x1_backward", name)]


@pytest.fixture
def spy(monkeypatch):
    s = _TorchSpy()
    real_backward = saving._conv1x1_backward

    def counted(*args, **kwargs):
        s.calls[("conv1x1_backward", "call")] += 1
        s.inside = True
        try:
            return real_backward(*args, **kwargs)
        finally:
            s.inside = False

    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "torch", s)
    monkeypatch.setattr(saving, "_conv1x1_backward", counted)  # where _MixedInput and _SharedBNTail look it up
    return s


def test_the_spy_sees_the_calls_it_counts(spy):
    """The spy itself: it counts a matmul and an aten op made through maskconnect.kernels' ``torch``."""
    assert {m.__name__.rsplit(".", 1)[-1] for m in KERNEL_MODULES} >= {"cpu", "mixing", "saving"}
    x, w = torch.randn(2, 8, 3, 3), torch.randn(8, 2, 1, 1)
    torch.testing.assert_close(cpu_kernels.grouped_1x1(x, w, 4), torch.nn.functional.conv2d(x, w, groups=4))
    assert spy.calls[("elsewhere", "matmul")] == 1
    saving._conv1x1_backward(torch.randn(2, 8, 3, 3), x, w, 4, True, True)
    assert spy.in_backward("call") == 1 and spy.in_backward("matmul") == 2
    with kernels.cpu_fast_paths(False):
        saving._conv1x1_backward(torch.randn(2, 8, 3, 3), x, w, 4, True, True)
    assert spy.in_backward("convolution_backward") == 1 and spy.in_backward("matmul") == 2


# --- saving path against plain path ------------------------------------------------------------------

LAYOUTS = ["nchw", "channels_last"]
DTYPES = ["fp64", "fp32", "bf16"]
# float64 has no rounding worth the name here: the two computations must agree to 1e-9 of each tensor's
# norm, which proves the gradients equal. fp32 and bf16 (autocast, the recomputation under the forward
# pass's autocast state) are held to a few times the plain path's own rounding error (step_check.py).
# In bf16 that error is large (the shared forward rounding: up to 1.5x the norm of a BN bias gradient
# here), so bf16 is also capped at 8 units of bf16 rounding (2^-8) of each tensor's norm: both paths
# run the same bf16 kernels on the same bf16 activations; measured at most 1.1e-4 (2-core AMD EPYC),
# where a gradient off by x0.5 is 0.5.
FLOAT64_FLOOR = 1e-9
BF16_CAP = 8 * 2.0 ** -8
BRANCHES = ["matmul", "convolution"]  # the 1x1 backward's branch: CPU fast path, or what CUDA runs


def _model(k: int, layout: str) -> tuple[MaskedResNeXt, MaskedResNeXt]:
    model = perturbed_learned(k, **SMALL)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    plain.save_memory = False
    model.save_memory = True
    return model, plain


def _steps(saving, plain, x, dtype: str) -> dict[str, tuple]:
    """One step of each (same weights, same mask draw), checked against the plain path (see FLOAT64_FLOOR)."""
    if dtype == "fp64":
        saving, plain, x = saving.double(), plain.double(), x.double()
    else:
        ref = float64_reference(plain, x)
    with fp32_mask_draws():
        got, want = run_step(saving, saving, x, dtype == "bf16"), run_step(plain, plain, x, dtype == "bf16")
    assert sum(k.startswith("grad ") for k in got) == sum(1 for _ in plain.parameters())  # masks included
    if dtype == "fp64":
        return assert_step_agrees(got, want, want, floor=FLOAT64_FLOOR)
    return assert_step_agrees(got, want, ref, cap=BF16_CAP if dtype == "bf16" else None)


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_saving_path_matches_plain_path_through_both_1x1_backward_branches(layout, dtype, branch, spy):
    """For every K in 1..C: the saving path (what CUDA trains on) against the plain autograd path, the
    1x1 backward's matmul branch (CPU fast paths on) or its convolution_backward branch (what CUDA
    runs: fast paths off), with the branch taken proved by the spy."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    worst = (0.0, 0.0, "")
    with kernels.cpu_fast_paths(branch == "matmul"):
        for k in range(1, C + 1):
            saving, plain = _model(k, layout)
            before = Counter(spy.calls)
            seen = _steps(saving, plain, x, dtype)
            worst = max(worst, *((d, e, name) for name, (d, e) in seen.items()))
            ran = spy.calls - before
            assert ran[("conv1x1_backward", "call")] >= 2 * (saving.spec.num_modules - 1), ran  # conv1 and conv3
            if branch == "matmul":
                assert ran[("conv1x1_backward", "matmul")] > 0, ran
                if layout == "nchw":  # NCHW: every branch narrow and contiguous, so only matmuls
                    assert ran[("conv1x1_backward", "convolution_backward")] == 0, ran
            else:
                assert ran[("conv1x1_backward", "convolution_backward")] > 0, ran
                assert ran[("conv1x1_backward", "matmul")] == 0 and ran[("elsewhere", "matmul")] == 0, ran
    print(f"{layout} {dtype} {branch}: largest saving-plain difference {worst[0]:.2e} ({worst[2]}; "
          f"plain vs float64 there {worst[1]:.2e})")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_fast_paths_compute_what_the_gpu_kernels_compute(layout, spy):
    """The plain path with the CPU fast paths (matmul 1x1, subsampled strided 1x1, channels-last
    small-map BN) against the same model on the kernels a GPU runs: outputs, gradients, buffers. In
    float64: the two run different kernels, and in fp32 a ReLU input that rounds to the other side of 0
    in one of them would move the gradients below it by ~1e-3 of their norm (seen once on a CPU)."""
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, fast = _model(3, layout)
    fast = fast.double()
    gpu = copy.deepcopy(fast)
    got = run_step(fast, fast, x)
    seen_fast = Counter(spy.calls)
    with kernels.cpu_fast_paths(False):
        want = run_step(gpu, gpu, x)
    seen_gpu = spy.calls - seen_fast
    if layout == "nchw":
        assert seen_fast[("elsewhere", "matmul")] > 0  # the fast paths ran...
        assert seen_fast[("elsewhere", "native_batch_norm")] > 0
    assert seen_gpu[("elsewhere", "matmul")] == 0 and seen_gpu[("elsewhere", "native_batch_norm")] == 0  # ...then not
    assert_step_agrees(got, want, want, floor=FLOAT64_FLOOR)


# --- which path runs -------------------------------------------------------------------------------

@pytest.fixture
def path_spy(monkeypatch):
    calls = Counter()
    saving, plain = MaskedBlock.forward_saving, MaskedBlock.plain

    def spy_saving(self, *a, **k):
        calls["saving"] += 1
        return saving(self, *a, **k)

    def spy_plain(self, *a, **k):
        calls["plain"] += 1
        return plain(self, *a, **k)

    monkeypatch.setattr(MaskedBlock, "forward_saving", spy_saving)
    monkeypatch.setattr(MaskedBlock, "plain", spy_plain)
    return calls


@pytest.mark.parametrize("save_memory", [True, False, None])
@pytest.mark.parametrize("mode", ["train+grad", "train+no_grad", "train+inference_mode", "eval+grad", "eval+no_grad"])
def test_which_path_runs(save_memory, mode, path_spy):
    """The saving path runs only in training with autograd on and ``save_memory`` True (or None on CUDA,
    tests/test_cuda.py; on a CPU None is the plain path); every other forward pass is the plain one."""
    torch.manual_seed(0)
    model = build_model(make_spec("20,4,8", connectivity="learned", fan_in=2, **SMALL))
    model.save_memory = save_memory
    n = len(model.blocks())
    train, grad = mode.split("+")
    model.train(train == "train")
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad]
    with ctx():
        out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    want_saving = save_memory is True and mode == "train+grad"
    assert dict(path_spy) == ({"saving": n} if want_saving else {"plain": n}), (mode, save_memory, dict(path_spy))


# --- the centred mask rule -------------------------------------------------------------------------

def test_centred_rule_step_is_clip_of_the_centred_gradient_step():
    """One training step under ``centred`` with plain SGD moves the masks to exactly
    clip(m - lr * (g - mean_row(g)), 0, 1), g being the raw mask gradient of the same draw (taken here
    from an identical model); entries near the bounds are clipped, the others move freely."""
    lr = 4.0
    spec = make_spec("20,4,8", connectivity="learned", fan_in=3, dataset="synthetic", stage_width=8,
                     num_classes=5, image_size=8)
    torch.manual_seed(0)
    model = build_model(spec).train()
    real = mask_banks(model)[0].real
    with torch.no_grad():
        real.uniform_(0.3, 0.7)
        real[:, 0, 0], real[:, 1, 1] = 0.999, 0.001  # next to a bound: a step crosses it
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    m0 = real.detach().clone()

    ref = copy.deepcopy(model)  # the raw gradient of the same draw, computed outside the rule
    torch.manual_seed(3)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    g = mask_banks(ref)[0].real.grad.detach().clone()
    centred = g - g.mean(-1, keepdim=True)
    assert (g.mean(-1).abs() * lr > 1e-3).any()  # a common mode the rule must remove
    want = (m0 - lr * centred).clamp(0.0, 1.0)

    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=0.0, mask_lr=lr), lr=0.1, momentum=0.0)
    torch.manual_seed(3)
    train_step(model, opt, x, y, Precision.for_device("cpu"), rule="centred")
    got = real.detach()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    moved = (got - m0).abs()
    assert (moved > 1e-3).float().mean() > 0.5, moved  # most masks actually moved
    assert ((want == 0) | (want == 1)).any() and ((want > 0) & (want < 1)).any()  # both clipped and free entries
    clipped = (m0 - lr * g).clamp(0.0, 1.0)  # the `clip` rule's step: differs, by the common mode
    assert (clipped - want).abs().max() > 1e-3
