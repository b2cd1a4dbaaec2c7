"""The memory-saving training path of a masked module (docs/design.md section 10): what
``block(mix(mask, y_prev))`` computes, with fewer tensors kept for the backward pass.

Plain autograd keeps, per masked module, the previous module's branch tensors, their mixture, its ReLU
and the shared BN's input: several C x module-width tensors. :func:`forward_saving` keeps the first
only (``python -m bench memory``, bench/README.md), plus the bottleneck tensors ResNeXt keeps too, with
two autograd Functions:

* :class:`_MixedInput` (mixing -> ReLU -> first 1x1 conv, and the identity path or the per-branch
  projection) saves only the previous module's branch tensors and the mask, which the mask gradient
  needs anyway; its backward recomputes the mixing and the projection and takes the 1x1 conv's
  gradients straight from its backward kernel (:func:`_conv1x1_backward`).
* :class:`_SharedBNTail` (last 1x1 conv + shared BN) saves the conv's input and the BN's batch mean and
  inverse std, and recomputes the conv's output in the backward pass.

BN running statistics are updated once, in the forward pass. Nothing synchronises with the host;
autocast is re-entered for the recomputation. torch.compile always traces the plain path: AOT
autograd's partitioner makes its own choice of what to recompute.

When it runs (``save_memory``; ``model.save_memory`` per model): None (default) is the saving path on
CUDA, where GPU memory bounds the batch (80 GB: {50,4,32} learned K=16 fits an estimated 104 images
instead of 35), and the plain path on a CPU, where memory is rarely the limit and the backward's
recomputation costs speed (measured, 1 thread, {29,64,8} learned K=4 / Fixed-Full: 0.46 saving vs 0.55
plain; digits {20,4,8} K=2 step 249 vs 214 ms). True/False force it; the tests compare the two paths.

The functions here read a masked module (``models.masked.MaskedBlock``) through the attributes
:class:`SavingBlock` declares, and nothing else; ``MaskedBlock.forward`` is the one entry point that
chooses this path or the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from typing import Protocol

from .cpu import _matmul_1x1, bn_train_backward, bn_train_forward, conv1x1, grouped_1x1
from .mixing import mix


class SavingBlock(Protocol):
    """What the saving path reads of a masked module (``models.masked.MaskedBlock``): its layers, with the
    parameters and BN statistics of the plain form, and its shape."""

    conv1: nn.Conv2d          # grouped 1x1 (plain for the stem-fed module), n branches
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d          # the grouped 3x3
    bn2: nn.BatchNorm2d
    conv3: nn.Conv2d          # grouped 1x1, stored per branch
    bn3: nn.BatchNorm2d       # shared by the n branches
    downsample: nn.Sequential | None   # the projection shortcut P (1x1 conv, BN) or None
    branches: int
    in_ch: int
    out_ch: int
    identity_scale: float


def forward_saving(block: SavingBlock, x: Tensor | None = None, y_prev: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:
    """What ``block(mix(mask, y_prev))`` computes (``block(x)`` for the stem-fed module), keeping for
    the backward pass only ``y_prev`` (the previous module's branch tensors, which the mask gradient
    needs anyway) and the bottleneck tensors ResNeXt keeps too. The mixed input and its ReLU (conv1's
    input, the identity path), the projection shortcut and the last 1x1 conv's output are recomputed
    in the backward pass (:class:`_MixedInput`, :class:`_SharedBNTail`). BN running statistics are
    updated once, in the forward pass. Training mode only (the BNs use batch statistics).
    """
    n, out_ch = block.branches, block.out_ch
    if y_prev is None:  # stem-fed: the plain head (its tensors are ResNeXt's own)
        batch = x.shape[0]
        h1 = grouped_1x1(x, block.conv1.weight, block.conv1.groups)
        idt = (x if block.downsample is None else block.downsample(x)).unsqueeze(1)
    else:
        batch = y_prev.shape[0]
        ds = () if block.downsample is None else (block.downsample[0].weight, block.downsample[1].weight,
                                                   block.downsample[1].bias)
        h1, idt = _MixedInput.apply(block, y_prev, mask, block.conv1.weight, *ds)
    h = F.relu(block.bn1(h1))
    h = F.relu(block.bn2(block.conv2(h)))
    h = _SharedBNTail.apply(block, h, block.conv3.weight, block.bn3.weight, block.bn3.bias)
    hh, ww = h.shape[-2:]
    h = h.reshape(batch, n, out_ch, hh, ww)
    if y_prev is not None:
        idt = idt.reshape(batch, n, out_ch, hh, ww)
    return torch.add(h, idt, alpha=block.identity_scale)  # one pass: h + idt * scale


def _projection(block: SavingBlock, x: Tensor, w: Tensor, g: Tensor, b: Tensor, first: bool) -> Tensor:
    """P on every branch: the shared projection on the (N*n, in, H, W) view. The first call (forward
    pass) is the BN module's own, which updates the running statistics; the recomputation in the
    backward pass normalises by the same batch statistics and updates nothing."""
    conv, bn = block.downsample
    d = conv1x1(x.reshape(x.shape[0] * block.branches, block.in_ch, x.shape[-2], x.shape[-1]), w, conv.stride[0])
    return bn(d) if first else F.batch_norm(d, None, None, g, b, True, 0.0, bn.eps)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _conv1x1_backward(grad: Tensor, x: Tensor, weight: Tensor, groups: int, need_input: bool, need_weight: bool):
    """Input and weight gradients of ``grouped_1x1(x, weight, groups)`` without recomputing its output.
    ``x`` has the dtype the forward pass ran in (autocast casts the weight to it; the weight gradient is
    cast back, as autocast's cast does in its backward)."""
    if _matmul_1x1(x, groups, weight.shape[0]):
        n, cin, hh, ww = x.shape
        g = grad.reshape(n, groups, -1, hh * ww)
        gi = gw = None
        if need_input:
            w = weight.to(x.dtype).view(groups, -1, cin // groups)
            gi = torch.matmul(w.transpose(1, 2), g).view(n, cin, hh, ww)
        if need_weight:
            xg = x.view(n, groups, cin // groups, hh * ww)
            gw = torch.matmul(g, xg.transpose(-1, -2)).sum(0).view(weight.shape).to(weight.dtype)
        return gi, gw
    gi, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight.to(x.dtype), None, [1, 1], [0, 0], [1, 1],
                                                     False, [0, 0], groups, [need_input, need_weight, False])
    return gi, (None if gw is None else gw.to(weight.dtype))


class _MixedInput(torch.autograd.Function):
    """A masked module's head: x = mix(mask, y_prev) -> (conv1(x), identity path: x or P(x) per branch).

    Saves only ``y_prev`` and the mask (plus weights). The backward pass recomputes x (bmm + ReLU) and the
    projection shortcut, and differentiates them, while conv1's gradients come from its backward kernel
    directly (its output is not needed for them). Nothing synchronises with the host.
    """

    @staticmethod
    def forward(ctx, block: SavingBlock, y_prev: Tensor, mask: Tensor, w1: Tensor, *ds: Tensor):
        ctx.block, ctx.autocast = block, _autocast_state(y_prev.device.type)
        ctx.set_materialize_grads(False)
        x = mix(mask, y_prev)
        h1 = grouped_1x1(x, w1, block.branches)
        idt = _projection(block, x, *ds, first=True) if ds else x
        ctx.save_for_backward(y_prev, mask, w1, *ds)
        return h1, idt

    @staticmethod
    def backward(ctx, g_h1: Tensor | None, g_idt: Tensor | None):
        block = ctx.block
        y_prev, mask, w1, *ds = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        yd = y_prev.detach().requires_grad_(need[0])
        md = mask.detach().requires_grad_(need[1])
        dsd = [t.detach().requires_grad_(r) for t, r in zip(ds, need[3:])]
        outs, grads, g_w1 = [], [], None
        dev, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            x = mix(md, yd)
            if g_h1 is not None:
                gi, g_w1 = _conv1x1_backward(g_h1, x.detach(), w1, block.branches, True, need[2])
                outs.append(x)
                grads.append(gi)
            if g_idt is not None:
                outs.append(_projection(block, x, *dsd, first=False) if dsd else x)
                grads.append(g_idt)
        inputs = [yd, md, *dsd]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True) if outs and wanted else [])
        g = [next(got) if t.requires_grad else None for t in inputs]
        return (None, g[0], g[1], g_w1, *g[2:])


class _SharedBNTail(torch.autograd.Function):
    """A masked module's tail: the last (grouped) 1x1 conv and the BN shared by the branches, on the
    (N*n, out, H, W) view. Saves the conv's input (which the ReLU before it keeps anyway) and the BN's
    batch statistics; the backward pass recomputes the conv's output for the BN gradient. The running
    statistics are updated once, in the forward pass, as ``nn.BatchNorm2d`` does in training."""

    @staticmethod
    def forward(ctx, block: SavingBlock, h2: Tensor, w3: Tensor, g3: Tensor, b3: Tensor):
        bn = block.bn3
        h = grouped_1x1(h2, w3, block.branches)
        hv = h.reshape(h.shape[0] * block.branches, block.out_ch, h.shape[-2], h.shape[-1])
        out, mean, invstd = bn_train_forward(hv, g3, b3, bn)
        bn.num_batches_tracked.add_(1)
        ctx.block, ctx.autocast = block, _autocast_state(h2.device.type)
        ctx.save_for_backward(h2, w3, g3, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        block = ctx.block
        h2, w3, g3, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        dev, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            h = grouped_1x1(h2, w3, block.branches)
        hv = h.reshape(h.shape[0] * block.branches, block.out_ch, h.shape[-2], h.shape[-1])
        gh, g_g3, g_b3 = bn_train_backward(g_out, hv, g3, mean, invstd, block.bn3.eps, [True, need[2], need[3]])
        g_h2, g_w3 = _conv1x1_backward(gh.reshape(h.shape), h2.to(h.dtype), w3, block.branches, need[0], need[1])
        return None, g_h2, g_w3, g_g3, g_b3
