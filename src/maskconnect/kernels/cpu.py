"""The CPU-only fast paths (docs/design.md section 10). Each computes the same function as torch's own
kernel, which a GPU keeps (cuDNN); ``kernels.cpu_fast_paths(False)`` turns all three off. Measured:

* **Small-map BN, channels-last** (:class:`BatchNorm2d`, ``small_map_pixels`` = 4). Training-mode BN on
  a CPU over maps of at most 4 pixels runs on a channels-last copy. torch's NCHW kernel loops over
  (image, channel) pairs with the pixels innermost, which is slow when a map has only a few pixels
  (digits' 2x2 last stage, where a masked module normalises 512 branch maps per batch of 64); the
  channels-last kernel vectorises over channels. Same function (same kernel family, same batch
  statistics). One thread, fwd+bwd incl. the layout copies, torch 2.15: (512, 256, 2, 2) 9.1 -> 1.5 ms;
  (512, 128, 4, 4) 4.6 -> 5.1 ms (not used there), (512, 64, 8, 8) 9.5 -> 15.8 ms. Digits Learned step
  215 -> 203 ms.
* **Strided 1x1 as subsample + stride-1 conv** (:func:`conv1x1`, :class:`Shortcut1x1`,
  ``subsample_strided_1x1_on_cpu``). The projection shortcut P (a 1x1 conv, stride 2 where a stage
  starts): a 1x1 kernel without padding reads only the pixels the stride lands on, and oneDNN's strided
  1x1 kernels are the slow ones. One thread, fwd+bwd of the conv alone, torch 2.15, 2-core dev box (the
  whole-step effect is in bench/results' throughput records): {20,4,8} digits shapes, the masked
  model's per-branch projection (512 maps, 64->128 at 8x8 and 128->256 at 4x4): 29.2 -> 9.2 ms and
  12.3 -> 8.4 ms; {29,64,8} shapes at batch 8 (64 maps, 256->512 at 32x32 and 512->1024 at 16x16):
  410 -> 311 ms and 247 -> 157 ms. Digits Learned K=2 step 221 -> 200 ms.
* **Grouped 1x1 as a batched matmul** (:func:`grouped_1x1`, ``grouped_1x1_as_matmul_on_cpu``,
  ``matmul_max_group_width`` = 64). A masked module's grouped 1x1 convs (conv1 and conv3: one group per
  branch, as wide as the module on one side and as narrow as the branch on the other) run as one
  batched matmul when the branch is narrow. One thread, fwd+bwd, on a shared machine: at {20,4,8} and
  {29,64,8} stage-1 shapes (32x32, branch width 4 / 64) conv1 1.8x / 1.8x faster, conv3 1.7x / 1.2x
  than the grouped convolution (oneDNN, or the per-group slow path at batches under 16); at {29,64,8}
  stage 3 (8x8, branch width 256) the convolution was 1.7x faster, hence the limit. Same function;
  the summation order, hence the round-off, differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import current

# --- training-mode BN on small maps ------------------------------------------------------------------


def _small_maps(x: Tensor) -> bool:
    return x.dim() == 4 and x.shape[-1] * x.shape[-2] <= current().small_map_pixels and x.device.type == "cpu"


def _bn_layout(x: Tensor) -> Tensor:
    """``x`` in the layout training-mode BN runs in: channels-last for small maps on a CPU."""
    return x.contiguous(memory_format=torch.channels_last) if _small_maps(x) else x


def bn_train_forward(x: Tensor, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of ``x`` with ``bn``'s running statistics and hyper-parameters, run in
    :func:`_bn_layout`; returns the output (contiguous), the batch mean and the inverse std."""
    out, mean, invstd = torch.ops.aten.native_batch_norm(_bn_layout(x), weight, bias, bn.running_mean,
                                                         bn.running_var, True, bn.momentum, bn.eps)
    return out.contiguous(), mean, invstd


def bn_train_backward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float,
                      need: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (input, weight, bias) of :func:`bn_train_forward`, in the same layout; the input
    gradient is returned contiguous."""
    gi, gw, gb = torch.ops.aten.native_batch_norm_backward(_bn_layout(g), _bn_layout(x), weight, None, None, mean,
                                                           invstd, True, eps, need)
    return (None if gi is None else gi.contiguous()), gw, gb


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) that takes the channels-last
    kernel for small maps in training on a CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.training and _small_maps(x) and x.is_contiguous() and self.track_running_stats
                and self.momentum is not None and not torch.compiler.is_compiling()):
            self.num_batches_tracked.add_(1)
            return _ChannelsLastBN.apply(x, self.weight, self.bias, self)
        return super().forward(x)


class _ChannelsLastBN(torch.autograd.Function):
    """Training-mode batch norm computed on channels-last copies of the input and of the gradient; the
    output and the input gradient are returned in the input's (contiguous) layout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d):
        out, mean, invstd = bn_train_forward(x, weight, bias, bn)
        ctx.eps = bn.eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (*bn_train_backward(g, x, weight, mean, invstd, ctx.eps, [need[0], need[1], need[2]]), None)


# --- the strided 1x1 conv of the projection shortcut ---------------------------------------------------

def conv1x1(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, stride=stride)`` for a 1x1 kernel, no padding, no bias."""
    if stride != 1 and current().subsample_strided_1x1_on_cpu and x.device.type == "cpu":
        return F.conv2d(x[:, :, ::stride, ::stride], weight)
    return F.conv2d(x, weight, stride=stride)


class Shortcut1x1(nn.Conv2d):
    """The projection shortcut's conv: an ``nn.Conv2d`` (same parameters and state-dict keys, so a
    torchvision state dict still loads) whose forward pass is :func:`conv1x1`."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1(x, self.weight, self.stride[0])


# --- grouped 1x1 convs as one batched matmul -----------------------------------------------------------

def _matmul_1x1(x: Tensor, groups: int, out_ch: int) -> bool:
    """Whether :func:`grouped_1x1` (and the saving path's explicit backward) takes the matmul form."""
    opts = current()
    narrow = min(x.shape[1], out_ch) // groups  # the branch width
    return (opts.grouped_1x1_as_matmul_on_cpu and groups > 1 and narrow <= opts.matmul_max_group_width
            and x.device.type == "cpu" and x.is_contiguous())


def grouped_1x1(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """``F.conv2d(x, weight, groups=groups)`` for a 1x1 kernel, stride 1, no bias."""
    if not _matmul_1x1(x, groups, weight.shape[0]):
        return F.conv2d(x, weight, groups=groups)
    n, cin, hh, ww = x.shape
    out = torch.matmul(weight.view(groups, -1, cin // groups), x.view(n, groups, cin // groups, hh * ww))
    return out.view(n, -1, hh, ww)
