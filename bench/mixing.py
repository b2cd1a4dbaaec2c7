"""The mask mixing and the element-wise work around it, alone: what the masked model pays at a module
boundary beyond ResNeXt's BN + add + ReLU, and what each implementation of the mixing costs.

One module's tail, forward + backward, with a learned mask (straight-through gradient to the
real-valued mask), on the branch tensors of a real layer:

* ``Fixed-Full tail``: ResNeXt's BN(out) + identity + ReLU on one (N, out, H, W) tensor (the baseline);
* ``masked, matmul``: the shared BN over the (N*C, out, H, W) view, the identity share, then
  ``torch.matmul(mask, y)`` and ReLU -- the implementation before this benchmark existed (kept here as
  the reference: its backward copies y transposed);
* ``masked, bmm``: the same with ``bmm`` and a stride-0 mask (``maskconnect.kernels.mix``, eager);
* ``masked, compiled bmm`` / ``masked, compiled fused``: under ``torch.compile``, the bmm form, and the
  broadcast-sum form that inductor fuses with the BN normalisation, identity share and ReLU into one
  kernel (``kernels.options(fuse_mix_when_compiling=True)``, what a compiled model uses).

Layers: {29,64,8} stage 1 (C=8, out=256, 32x32) at batch 128 (``--batch``), and ImageNet {50,4,32}
stage 1 (C=32, out=256, 56x56) at batch 16 (``--imagenet-batch``); ``--quick``: a {20,4,8}-like layer (C=8, out=64, 32x32) at batch 8.
The compiled variants always run on CUDA; on a CPU only with ``--compile`` (and a C++ compiler).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from maskconnect import kernels
from maskconnect.connectivity import sample_masks, straight_through

from .common import Context, finish, fmt_num, free_memory, make_record, measure, result_row, Workload

LAYERS = [("{29,64,8} stage 1", 8, 4, 256, 32, 128), ("{50,4,32} stage 1", 32, 16, 256, 56, 16)]
QUICK_LAYERS = [("{20,4,8} stage 1", 8, 4, 64, 32, 8)]


def _can_compile(ctx: Context) -> tuple[bool, str]:
    if ctx.cuda:
        return True, ""
    if not ctx.compile:
        return False, "on a CPU only with --compile (inductor's C++ compile takes a minute; not in the smoke run)"
    if shutil.which("c++") or shutil.which("g++"):
        return True, ""
    return False, "no C++ compiler: inductor cannot compile on this CPU"


def _tensors(n: int, k: int, out: int, hw: int, batch: int, ctx: Context):
    g = torch.Generator().manual_seed(0)
    dev = ctx.device
    dt = ctx.precision.amp_dtype or torch.float32
    h = torch.randn(batch, n * out, hw, hw, generator=g).to(dev, dt).requires_grad_()
    idt = torch.randn(batch, n * out, hw, hw, generator=g).to(dev, dt).requires_grad_()
    h_full = torch.randn(batch, out, hw, hw, generator=g).to(dev, dt).requires_grad_()
    idt_full = torch.randn(batch, out, hw, hw, generator=g).to(dev, dt).requires_grad_()
    gamma = torch.ones(out, device=dev, requires_grad=True)
    beta = torch.zeros(out, device=dev, requires_grad=True)
    real = torch.full((n, n), 0.5, device=dev, requires_grad=True)
    return h, idt, h_full, idt_full, gamma, beta, real


def _masked_tail(mixer):
    def tail(h, idt, gamma, beta, real, k: int, scale: float):
        mask = straight_through(sample_masks(real, k), real)
        n, out = mask.shape[1], gamma.shape[0]
        batch, hw = h.shape[0], h.shape[-1]
        z = F.batch_norm(h.reshape(batch * n, out, hw, hw), None, None, gamma, beta, training=True)
        z = z.reshape(batch, n, out, hw, hw) + idt.reshape(batch, n, out, hw, hw) * scale
        return mixer(mask, z)
    return tail


def _matmul_mix(mask, y):
    """The implementation this benchmark replaced: torch.matmul broadcasting the 2-D mask."""
    batch, n_in, ch, hh, ww = y.shape
    out = torch.matmul(mask.to(y.dtype), y.reshape(batch, n_in, ch * hh * ww))
    return F.relu(out).reshape(batch, mask.shape[0] * ch, hh, ww)


def _full_tail(h, idt, gamma, beta):
    return F.relu(F.batch_norm(h, None, None, gamma, beta, training=True) + idt)


def _fwd_bwd(fn, args, grad_of, ctx: Context):
    def run():
        with ctx.precision.autocast():
            out = fn(*args)
        out.float().mean().backward()
        for t in grad_of:
            t.grad = None
    return run


class _FuseSetting:
    """Run a callable with ``fuse_mix_when_compiling`` set (compiled code reads it at trace time)."""

    def __init__(self, fn, value: bool):
        self.fn, self.value = fn, value

    def __call__(self, *a):
        with kernels.options(fuse_mix_when_compiling=self.value):
            return self.fn(*a)


def run(ctx: Context) -> Path:
    warmup, repeats = ctx.n_warmup(5, 2), ctx.n_steps(30, 5)
    compile_ok, why = _can_compile(ctx)
    layers = QUICK_LAYERS if ctx.quick else LAYERS
    # --batch / --imagenet-batch override the CIFAR / ImageNet layer's batch
    layers = [(lb, n, k, o, hw, (ctx.imagenet_batch if n == 32 else ctx.batch) or b) for lb, n, k, o, hw, b in layers]
    results, notes = [], []
    if not compile_ok:
        notes.append(f"compiled variants skipped: {why}")
    for label, n, k, out, hw, batch in layers:
        h, idt, h_full, idt_full, gamma, beta, real = _tensors(n, k, out, hw, batch, ctx)
        scale = 1.0 / k
        masked_args = (h, idt, gamma, beta, real, k, scale)
        grads = (h, idt, gamma, beta, real)
        info = {"layer": label, "branches": n, "fan_in": k, "out_channels": out, "size": hw}
        ws = [Workload(f"{label}: Fixed-Full tail", _fwd_bwd(_full_tail, (h_full, idt_full, gamma, beta),
                                                             (h_full, idt_full, gamma, beta), ctx), batch, 0,
                       {**info, "impl": "BN + identity + ReLU on (N, out, H, W)"}),
              Workload(f"{label}: masked, matmul", _fwd_bwd(_masked_tail(_matmul_mix), masked_args, grads, ctx),
                       batch, 0, {**info, "impl": "torch.matmul (before)"}),
              Workload(f"{label}: masked, bmm", _fwd_bwd(_masked_tail(kernels.mix), masked_args, grads, ctx),
                       batch, 0, {**info, "impl": "bmm, stride-0 mask (eager default)"})]
        if compile_ok:
            for fuse, name in ((False, "compiled bmm"), (True, "compiled fused")):
                # dynamo guards on the kernel options, so each setting keeps its own graph; the
                # first (untimed) warm-up call compiles it
                fn = _FuseSetting(torch.compile(_masked_tail(kernels.mix), dynamic=False), fuse)
                ws.append(Workload(f"{label}: masked, {name}", _fwd_bwd(fn, masked_args, grads, ctx),
                                   batch, 0, {**info, "impl": f"torch.compile, fuse_mix_when_compiling={fuse}"}))
        ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
        base = ms[ws[0].name].median
        for w in ws:
            results.append(result_row(ms[w.name], group=label, time_vs_full_tail=ms[w.name].median / base))
        del ws, h, idt, h_full, idt_full
        free_memory(ctx.device)
    rec = make_record(ctx, "mixing", batch=None, warmup=warmup, repeats=repeats,
                      config={"layers": [dict(zip(("layer", "branches", "fan_in", "out", "size", "batch"), x)) for x in layers],
                              "work": "forward + backward of one module's tail, learned mask (one draw per call)"},
                      results=results,
                      notes=notes + ["time_vs_full_tail: median time / the Fixed-Full tail's of the same layer "
                                     "(the masked tail moves C times the tensor, so >= ~C is expected eagerly)"])
    table = [{"model": r["name"], "batch": r["batch"], "ms": fmt_num(r["median"] * 1e3),
              "iqr": fmt_num(r["spread"]["iqr"] * 1e3, 2), "x": f"{r['time_vs_full_tail']:.2f}x"} for r in results]
    return finish(ctx, rec, table, [("model", "workload"), ("batch", "batch"), ("ms", "ms fwd+bwd"),
                                    ("iqr", "IQR ms"), ("x", "time vs full tail")])
