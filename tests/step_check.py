"""Test helper: one training step of two implementations of the same model (the memory-saving path and
the plain one, compiled and eager, ...) compared entry by entry with a tolerance measured on the
machine running the test, not fixed in advance.

Every tensor a step produces (the output, each parameter's gradient, masks included, and each buffer,
the BN running statistics) is also computed in float64 by the plain eager path from the same weights
and the same mask draw. For a tensor ``t`` with float64 value ``r``, the implementation under test
``a`` must agree with the plain one ``b`` to within a few times ``b``'s own rounding error:

    ||a - b|| <= slack * ||b - r|| + floor * ||r||

So the bound follows the precision (fp32, bf16) and the conditioning of each tensor (a BN-normalised
layer's weight gradient cancels heavily) on this CPU or GPU, while a wrong gradient (off by a factor
1.5, say) exceeds it by orders of magnitude. ``floor`` covers tensors that b computes exactly.
"""

from __future__ import annotations

import contextlib
import copy

import torch


@contextlib.contextmanager
def fp32_mask_draws():
    """Mask draws made in float32 whatever the masks' dtype, so a float64 copy of a model draws the
    same masks as the model from the same seed (torch.rand differs between dtypes)."""
    from maskconnect import connectivity

    sample = connectivity.sample_masks

    def draw(real, k, generator=None, floor=connectivity.PROB_FLOOR, valid=None):
        return sample(real.float(), k, generator=generator, floor=floor, valid=valid).to(real.dtype)

    connectivity.sample_masks = draw
    try:
        yield
    finally:
        connectivity.sample_masks = sample


def run_step(f, model: torch.nn.Module, x: torch.Tensor, amp: bool = False, seed: int = 7) -> dict[str, torch.Tensor]:
    """Forward through ``f`` (``model`` or a compiled form of it; mask draw from ``seed``), backward of
    a loss that weights the outputs unevenly; returns the output, every gradient and every buffer."""
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = f(x)
    assert out.dtype == (torch.bfloat16 if amp else x.dtype)  # autocast took effect (or not)
    out = out.float() if out.dtype == torch.bfloat16 else out
    (out.square().mean() + out[:, 0].sum()).backward()
    got = {"output": out.detach()}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        got[f"grad {name}"] = p.grad.detach().clone()
    for name, b in model.named_buffers():
        got[f"buffer {name}"] = b.detach().clone()
    return got


def float64_reference(model: torch.nn.Module, x: torch.Tensor, seed: int = 7) -> dict[str, torch.Tensor]:
    """The step of a float64 copy of ``model`` (taken before ``model`` steps) on the plain eager path
    and torch's own kernels (no CPU fast path): nothing of the project's own backward code in it."""
    from maskconnect.kernels import cpu_fast_paths

    ref = copy.deepcopy(model).double()
    ref.save_memory = False
    with fp32_mask_draws(), cpu_fast_paths(False):
        return run_step(ref, ref, x.double(), amp=False, seed=seed)


def assert_step_agrees(got: dict, want: dict, ref: dict, *, slack: float = 3.0, floor: float = 1e-6,
                       cap: float | None = None) -> dict[str, tuple]:
    """``got`` (the implementation under test) against ``want`` (the plain path), every tensor within
    ``slack`` times ``want``'s own distance from the float64 ``ref`` (see the module docstring), and
    within ``cap`` of its norm if given (for bf16, whose rounding of the forward pass, shared by both,
    makes some tensors' distance from float64 larger than the tensor itself).
    Returns {name: (distance got-want, distance want-ref)}, both relative to ||ref||."""
    assert got.keys() == want.keys() == ref.keys()
    seen = {}
    for name, r in ref.items():
        a, b = got[name].double(), want[name].double()
        assert a.shape == b.shape == r.shape, name
        if not torch.is_floating_point(got[name]) or name.endswith("masks.fixed"):
            assert torch.equal(got[name], want[name]) and torch.equal(b, r.to(b.dtype)), name  # counters, binary masks
            continue
        scale = float(r.norm())
        assert scale > 0 or name.startswith("buffer"), f"{name}: zero in float64 (the check would be empty)"
        d, e = float((a - b).norm()) / max(scale, 1e-30), float((b - r).norm()) / max(scale, 1e-30)
        seen[name] = (d, e)
        assert d <= slack * e + floor, (f"{name}: differs from the plain path by {d:.3g} of its norm, more than "
                                        f"{slack} x the plain path's own rounding error {e:.3g} + {floor:g}")
        assert cap is None or d <= cap, f"{name}: differs from the plain path by {d:.3g} of its norm (cap {cap:g})"
    return seen


def perturbed_learned(k: int, arch: str = "20,4,8", **spec) -> torch.nn.Module:
    """A learned {arch} model with fan-in ``k`` (seed ``k``, train mode, CPU) whose mask rows are not
    uniform (so the draw differs row by row) and whose BN parameters are away from their init (so a
    wrong BN gradient shows)."""
    from maskconnect.models import build_model
    from maskconnect.specs import make_spec

    torch.manual_seed(k)
    model = build_model(make_spec(arch, connectivity="learned", fan_in=k, **spec)).train()
    with torch.no_grad():
        model.masks.real.uniform_(0.05, 1.0)  # non-uniform rows: the draw differs row by row
        for m in model.modules():  # BN parameters away from their init, so a wrong BN gradient shows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model
