"""Correctness of the training step on this device: the path a run takes by default against plain
autograd, the two 1x1 backward kernels, compiled against eager.

The reference is always the plain autograd path (``model.save_memory = False``) with torch's own
kernels (``kernels.cpu_fast_paths(False)``): nothing in it is written by this project except the
forward pass. A candidate path is one training step (forward with one mask draw, cross-entropy,
backward) of a deep copy of the same model, on the same batch, with the same draw. Compared: the
logits, every gradient (the real-valued masks included) and every buffer (BN running statistics,
updated by the forward pass), each tensor by its relative L2 error ``|a - b| / |b|``.

Bounds:

Each tensor's error is *trimmed*: its ``max(2, numel / 1000)`` largest element-wise differences are
left out of the numerator. A change of summation order (the saving path recomputes tensors, the CPU's
matmul 1x1 sums in another order) moves a pre-activation that sits within an ulp of a ReLU's or a
max-pool's kink to the other side, and that flips a handful of gradient entries by O(1) relative
(measured, {29,8,8} Fixed-Random K=2 on a CPU: one entry of a BN bias gradient moved 10%, which made the
untrimmed error of the whole tensor 8e-3, while the same step in float64 was exact on both paths). A
wrong gradient moves most entries, which trimming cannot hide.

* fp32 (TF32 off on CUDA): ``FP32_TOL`` = 1e-4 per tensor (the paths measured 1e-9 to 5e-5 apart,
  trimmed, on {20,4,8} and {29,8,8}); a wrong gradient is off by O(1).
* bf16 autocast + channels_last: the candidate and the plain path both run under the same autocast,
  but round at different places. The bound is calibrated on this device, per tensor: the change of
  the fp32 reference itself when every weight and the input are perturbed by a relative u = 2^-8 (what
  rounding them to bf16 once does), averaged over two perturbations; the candidate may differ from
  the plain bf16 step by ``BF16_FACTOR`` times that, plus ``BF16_FLOOR`` for tensors that bf16
  rounding barely moves.

What each catches. The fp32 rows catch a gradient 1% off in any tensor whose bound is ``FP32_TOL`` (all
of the tests' {11,2,4}; a tensor whose fp32 sensitivity is high, up to 5e-3 in the smoke grid's learned
{20,4,8}, gets ``FP32_FACTOR`` times that). The bf16 rows catch a gradient error of about ten times what
bf16 autocast itself does to that tensor, no less: two correct bf16 steps can differ by twice that (each
rounds its own way), and the sensitivity estimates it only within a factor 0.6 to 1.9 (measured against
the bf16 step itself), so ``BF16_FACTOR`` cannot be smaller than about 4. On the digits models of the
CPU grids (8x8 images, batch 8) bf16 moves the median gradient by 15-35% (ReLU and max-pool kinks
crossed: per unit of u, the sensitivity at 2^-8 is 10-15 times that at 2^-20), which puts most bounds
between 0.3 and 2 there: a gradient of the wrong sign fails, a 2x error fails in most tensors, a 1.2x
error passes (0.2 against 0.37 for the last conv3 weight of the tests' {11,2,4}). An error made in every
precision is the fp32 rows' to catch: the backward code under test is the same.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import cpu as cpu_kernels, saving as saving_kernels
from ..training.step import Precision

FP32_TOL = 1e-4
FP32_FACTOR = 4.0
U_FP32 = 2.0 ** -20
U_BF16 = 2.0 ** -8
BF16_FACTOR = 4.0
BF16_FLOOR = 2e-3
DRAW_SEED = 7


@dataclass(frozen=True)
class Path:
    """How one training step runs: the memory-saving path or plain autograd, the CPU fast paths on or
    off, and the precision (autocast dtype, memory format)."""

    save_memory: bool
    fast_paths: bool
    precision: Precision

    def describe(self) -> str:
        parts = ["saving path" if self.save_memory else "plain autograd"]
        if self.precision.device.type == "cpu":
            parts.append("CPU fast paths" if self.fast_paths else "GPU kernels")
        p = self.precision.describe()
        parts.append("fp32" if p["autocast_dtype"] is None else f"{p['autocast_dtype']} autocast")
        if self.precision.channels_last:
            parts.append("channels_last")
        return ", ".join(parts)


@contextlib.contextmanager
def exact_fp32():
    """TF32 off on CUDA (cuDNN convolutions and matmuls), restored after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def run_step(model: nn.Module, x: Tensor, y: Tensor, path: Path, *, perturb_seed: int | None = None,
             u: float = 0.0, step_model=None) -> dict[str, Tensor]:
    """One training step of a deep copy of ``model`` on ``path``; returns every compared tensor
    (``logits``, ``grad:<param>``, ``buffer:<name>``) as float64 on the CPU. ``perturb_seed``: first
    multiply every weight (not the masks) and the input by 1 + ``u`` * uniform(-1, 1)."""
    m = path.precision.prepare_model(copy.deepcopy(model)).train()
    if hasattr(m, "save_memory"):
        m.save_memory = path.save_memory
    if perturb_seed is not None:
        g = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "masks" not in name:
                    p.mul_((1 + u * (2 * torch.rand(p.shape, generator=g) - 1)).to(p.device))
            x = x * (1 + u * (2 * torch.rand(x.shape, generator=g) - 1)).to(x.device)
    runner = m if step_model is None else step_model(m)
    with kernels.cpu_fast_paths(path.fast_paths):
        torch.manual_seed(DRAW_SEED)  # the same mask draw on every path
        with path.precision.autocast():
            logits = runner(path.precision.prepare_input(x))
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
    out = {"logits": logits.detach().double().cpu()}
    for name, p in m.named_parameters():
        if p.grad is not None:
            out[f"grad:{name}"] = p.grad.detach().double().cpu()
    for name, b in m.named_buffers():
        if b.is_floating_point():
            out[f"buffer:{name}"] = b.detach().double().cpu()
    return out


def trimmed_diff_norm(diff: Tensor) -> float:
    """L2 norm of ``diff`` without its ``max(2, numel // 1000)`` largest entries (see the module's doc;
    tensors of at most 4 entries are not trimmed)."""
    flat = diff.abs().flatten()
    n = flat.numel()
    k = max(2, n // 1000) if n > 4 else 0
    return float(flat.sort().values[:n - k].norm())


def rel_errors(candidate: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Trimmed relative L2 error of each tensor; a tensor present on one side only counts as error 1 (a
    gradient that went missing, or appeared)."""
    errs = {}
    for key in sorted(set(candidate) | set(reference)):
        if key not in candidate or key not in reference:
            errs[key] = 1.0
            continue
        a, b = candidate[key], reference[key]
        if a.shape != b.shape:
            errs[key] = 1.0
            continue
        if not torch.isfinite(a).all():
            errs[key] = float("inf")
            continue
        nb = float(b.norm())
        d = trimmed_diff_norm(a - b)
        errs[key] = d / nb if nb > 0 else d
    return errs


def _worst(errs: dict[str, float], bounds: dict[str, float]) -> tuple[list[dict], dict]:
    failed = [{"tensor": k, "rel_error": errs[k], "bound": bounds[k]} for k in errs if not errs[k] <= bounds[k]]
    ratio_key = max(errs, key=lambda k: errs[k] / bounds[k])
    return failed, {"tensor": ratio_key, "rel_error": errs[ratio_key], "bound": bounds[ratio_key]}


def sensitivity(model: nn.Module, x: Tensor, y: Tensor, path: Path, ref: dict[str, Tensor], u: float) -> dict[str, float]:
    """How far ``path``'s own step moves, tensor by tensor, when every weight and the input are
    perturbed by a relative ``u``: the mean over two perturbations of the relative error."""
    errs = [rel_errors(run_step(model, x, y, path, perturb_seed=s, u=u), ref) for s in (1, 2)]
    return {k: (errs[0][k] + errs[1][k]) / 2 for k in errs[0]}


def compare_step(model: nn.Module, x: Tensor, y: Tensor, candidate: Path, device: torch.device,
                 fp32_reference: tuple[dict, dict] | None = None) -> dict:
    """One training step of ``candidate`` against the plain autograd path with torch's kernels under the
    same precision, each tensor within a bound calibrated by the fp32 reference's own sensitivity (see
    the module's doc). ``fp32_reference``: (the fp32 reference step, its sensitivity), if already run."""
    plain32 = Path(False, False, Precision(device, None, False))
    bf16 = candidate.precision.amp_dtype is not None
    with exact_fp32():
        if fp32_reference is None:
            ref32 = run_step(model, x, y, plain32)
            fp32_reference = ref32, sensitivity(model, x, y, plain32, ref32, U_FP32)
        ref32, sens32 = fp32_reference
        sens = sensitivity(model, x, y, plain32, ref32, U_BF16) if bf16 else sens32
        reference = Path(False, False, candidate.precision)
        ref = run_step(model, x, y, reference) if bf16 else ref32
        got = run_step(model, x, y, candidate)
    errs = rel_errors(got, ref)
    factor, floor, u = (BF16_FACTOR, BF16_FLOOR, "2^-8") if bf16 else (FP32_FACTOR, FP32_TOL, "2^-20")
    bounds = {k: max(factor * sens.get(k, 0.0), floor) for k in errs}
    failed, worst = _worst(errs, bounds)
    return {"passed": not failed, "tensors": len(errs), "worst": worst, "failed_tensors": failed[:10],
            "bound": (f"per tensor: trimmed relative L2 error <= max({factor:g} x the fp32 reference's change under "
                      f"relative {u} perturbations of weights and input, {floor:g})"),
            "median_sensitivity": float(torch.tensor(list(sens.values())).median()),
            "reference": reference.describe() if bf16 else plain32.describe(), "candidate": candidate.describe()}


def conv1x1_backward_check(device: torch.device, *, matmul: bool, seed: int = 0) -> dict:
    """``kernels.saving._conv1x1_backward`` (input and weight gradients of a grouped 1x1 conv, the saving
    path's explicit backward) against autograd through ``F.conv2d``, on masked-module shapes: wide to
    narrow (conv1) and narrow to wide (conv3). ``matmul``: the batched-matmul branch (CPU only; it is
    taken there for narrow branches), else the convolution-kernel branch (what CUDA runs)."""
    dev = torch.device("cpu") if matmul else device
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    shapes = [(4, 8, 16, 4, 6, 6), (4, 8, 4, 16, 6, 6), (3, 4, 32, 64, 5, 5)]  # (N, groups, cin/g, cout/g, H, W)
    with exact_fp32(), kernels.cpu_fast_paths(matmul):
        for n, groups, ci, co, hh, ww in shapes:
            x = torch.randn(n, groups * ci, hh, ww, generator=g, dtype=torch.float64).float().to(dev)
            w = torch.randn(groups * co, ci, 1, 1, generator=g).to(dev)
            grad = torch.randn(n, groups * co, hh, ww, generator=g).to(dev)
            taken = cpu_kernels._matmul_1x1(x, groups, groups * co)
            if taken != matmul:
                return {"passed": False, "error": f"the {'matmul' if matmul else 'convolution'} branch was not taken "
                                                  f"for shape {(n, groups * ci, hh, ww)}"}
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            F.conv2d(xr, wr, groups=groups).backward(grad)
            gi, gw = saving_kernels._conv1x1_backward(grad, x, w, groups, True, True)
            for got, want in ((gi, xr.grad), (gw, wr.grad)):
                if got is None or got.shape != want.shape:
                    return {"passed": False, "error": "missing or misshapen gradient"}
                worst = max(worst, float((got - want).norm() / want.norm()))
    return {"passed": worst <= FP32_TOL, "worst_rel_error": worst, "bound": f"relative L2 error <= {FP32_TOL:g}",
            "device": str(dev), "shapes": len(shapes)}


def compile_check(model: nn.Module, x: Tensor, y: Tensor, path: Path) -> dict:
    """The compiled step (torch.compile, inductor) against eager on ``path``'s precision; inductor's
    random numbers fall back to eager's (``fallback_random``) so both draw the same masks."""
    import torch._inductor.config as inductor_config

    before = inductor_config.fallback_random
    inductor_config.fallback_random = True
    torch._dynamo.reset()
    try:
        eager = run_step(model, x, y, path)
        compiled = run_step(model, x, y, path, step_model=torch.compile)
    finally:
        torch._dynamo.reset()
        inductor_config.fallback_random = before
    errs = rel_errors(compiled, eager)
    bf16 = path.precision.amp_dtype is not None
    tol = 5e-2 if bf16 else 1e-3  # inductor fuses and reorders; bf16 rounds the fused results once less
    failed, worst = _worst(errs, dict.fromkeys(errs, tol))
    return {"passed": not failed, "tensors": len(errs), "worst": worst, "failed_tensors": failed[:10],
            "bound": f"relative L2 error <= {tol:g} per tensor", "candidate": "torch.compile, " + path.describe()}
