"""torch.compile on the CPU: the compiled masked model computes what the eager one does, compiles as
one graph (no graph break, hence no host synchronisation in the forward pass or the mask draw), and the
mask mixing is fused with the element-wise work around it.

Inductor generates C++ on a CPU, so these tests need a C++ compiler; they skip without one. The same
checks on a GPU (Triton kernels, bf16) are in tests/test_cuda.py and ``python -m bench cuda-check
--compile``.
"""

import contextlib
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from maskconnect import kernels
from maskconnect.models import build_model
from maskconnect.specs import make_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="torch.compile (inductor) needs a C++ compiler on a CPU"),
]

# A small masked network that still has every kind of module: the stem-fed first module, identity
# modules, projection modules (stride 2), two masks and the output node.
SPEC = dict(connectivity="learned", fan_in=2, dataset="cifar10", stage_width=16)


@pytest.fixture
def fused():
    with contextlib.ExitStack() as stack:
        def set_(value: bool):
            stack.enter_context(kernels.options(fuse_mix_when_compiling=value))
            torch._dynamo.reset()
        yield set_
    torch._dynamo.reset()


@pytest.fixture
def same_random():
    """Inductor draws random numbers with its own generator unless told to fall back to eager's: with
    the fallback the compiled mask draw is the eager one, so outputs and gradients can be compared."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def _step(model, x, compiled: bool):
    torch.manual_seed(1)  # the mask draw
    f = torch.compile(model, fullgraph=True) if compiled else model  # fullgraph: a graph break raises
    out = f(x)
    out.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-mix", "bmm-mix"])
def test_compiled_learned_training_step_matches_eager(fuse, fused, same_random):
    fused(fuse)
    spec = make_spec("11,2,4", **SPEC)
    torch.manual_seed(0)
    model = build_model(spec).train()
    x = torch.randn(4, 3, 32, 32)
    ref_out, ref_grads = _step(copy.deepcopy(model), x, compiled=False)
    out, grads = _step(copy.deepcopy(model), x, compiled=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads) and "masks.real" in grads
    assert ref_grads["masks.real"].abs().sum() > 0  # the straight-through gradient reaches the masks
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert ((g - ref_grads[name]).abs().max() / scale) < 1e-3, name


def test_compiled_eval_of_frozen_masks_matches_eager(fused):
    fused(True)
    spec = make_spec("11,2,4", **{**SPEC, "connectivity": "random"})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _tail(mask, h, idt, gamma, beta):
    """A masked module's last steps as MaskedBlock + mix compute them: the shared last BN over the
    (N*n, out, H, W) view, the identity share, then the mixing (with its ReLU)."""
    n_batch, n, out = idt.shape[0], mask.shape[1], gamma.shape[0]
    hh, ww = h.shape[-2:]
    z = F.batch_norm(h.reshape(n_batch * n, out, hh, ww), None, None, gamma, beta, training=True)
    z = z.reshape(n_batch, n, out, hh, ww) + idt.reshape(n_batch, n, out, hh, ww) * 0.5
    return kernels.mix(mask, z)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-mix", "bmm-mix"])
def test_mixing_is_fused_with_the_elementwise_tail(fuse, fused):
    """With the fused form, inductor emits one kernel for BN normalisation + identity share + mixing +
    ReLU (no bmm, no intermediate branch tensor); the bmm form needs an extern bmm and a buffer for
    the summed branch tensor in between. Both compute the eager result."""
    from torch._inductor.utils import run_and_get_code

    fused(fuse)
    g = torch.Generator().manual_seed(0)
    n_batch, n, out, hw = 2, 4, 8, 4
    mask = (torch.rand(n, n, generator=g) > 0.5).float()
    h = torch.randn(n_batch, n * out, hw, hw, generator=g)
    idt = torch.randn(n_batch, n * out, hw, hw, generator=g)
    gamma, beta = torch.rand(out, generator=g) + 0.5, torch.randn(out, generator=g)
    with torch.no_grad():
        ref = _tail(mask, h, idt, gamma, beta)
        got, (code, *_) = run_and_get_code(torch.compile(_tail, fullgraph=True), mask, h, idt, gamma, beta)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    branch_buffers = code.count(f"({n_batch}, {n}, {out}, {hw}, {hw})") + code.count(f"({n_batch}, {n}, {out * hw * hw})")
    if fuse:
        assert "extern_kernels.bmm" not in code
        assert branch_buffers == 1, code  # only the result
    else:
        assert "extern_kernels.bmm" in code
        assert branch_buffers >= 2, code  # the summed branch tensor, then the result
