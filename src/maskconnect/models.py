"""ResNeXt with fixed (``full``) or masked (``random``, ``learned``) branch connectivity.

Fixed-Full is the usual grouped-convolution ResNeXt block, with torchvision's attribute names so a
torchvision ``resnext50_32x4d`` state dict loads as is.

The masked model keeps the C branch inputs of a module as one (N, C*width, H, W) tensor. Each branch's
1x1 convs become grouped convs (groups=C), the 3x3 is ResNeXt's grouped conv, and the connections
between modules are one batched matmul over the branch axis (design.md section 3):

    x_j^(i+1) = ReLU( sum_k m_jk^(i+1) * ( F_k(x_k^(i)) + P(x_k^(i)) / K ) )
    output    = ReLU( sum_k ( F_k(x_k^(L)) + P(x_k^(L)) / C ) )

The identity path is averaged over the K selected branches (our reading of the paper: it makes K=C
with all-ones masks exactly ResNeXt; a plain sum would scale the identity by K per module). The last BN
of a branch is shared by the C branches of a module, so a masked model has exactly the weights of its
ResNeXt baseline (masks aside).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .connectivity import FixedMasks, MaskBank
from .specs import ModelSpec, validate

STEM_WIDTH = 64


def _bn(ch: int) -> nn.BatchNorm2d:
    return _BatchNorm2d(ch)


# Training-mode BN on a CPU over maps of at most this many pixels runs on a channels-last copy. torch's
# NCHW kernel loops over (image, channel) pairs with the pixels innermost, which is slow when a map has
# only a few pixels (digits' 2x2 last stage, where a masked module normalises 512 branch maps per batch
# of 64); the channels-last kernel vectorises over channels. Same function (same kernel family, same
# batch statistics). Measured (one thread, fwd+bwd incl. the layout copies, torch 2.15): (512, 256, 2, 2)
# 9.1 -> 1.5 ms; (512, 128, 4, 4) 4.6 -> 5.1 ms (not used there), (512, 64, 8, 8) 9.5 -> 15.8 ms.
SMALL_MAP_PIXELS = 4
_SMALL_MAP_PIXELS_ON = SMALL_MAP_PIXELS


def _small_maps(x: Tensor) -> bool:
    return x.dim() == 4 and x.shape[-1] * x.shape[-2] <= SMALL_MAP_PIXELS and x.device.type == "cpu"


def _bn_layout(x: Tensor) -> Tensor:
    """``x`` in the layout training-mode BN runs in: channels-last for small maps on a CPU."""
    return x.contiguous(memory_format=torch.channels_last) if _small_maps(x) else x


def _bn_train_forward(x: Tensor, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of ``x`` with ``bn``'s running statistics and hyper-parameters, run in
    :func:`_bn_layout`; returns the output (contiguous), the batch mean and the inverse std."""
    out, mean, invstd = torch.ops.aten.native_batch_norm(_bn_layout(x), weight, bias, bn.running_mean,
                                                         bn.running_var, True, bn.momentum, bn.eps)
    return out.contiguous(), mean, invstd


def _bn_train_backward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float,
                       need: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (input, weight, bias) of :func:`_bn_train_forward`, in the same layout; the input
    gradient is returned contiguous."""
    gi, gw, gb = torch.ops.aten.native_batch_norm_backward(_bn_layout(g), _bn_layout(x), weight, None, None, mean,
                                                           invstd, True, eps, need)
    return (None if gi is None else gi.contiguous()), gw, gb


class _BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) that takes the channels-last
    kernel for small maps in training on a CPU (:data:`SMALL_MAP_PIXELS`)."""

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
        out, mean, invstd = _bn_train_forward(x, weight, bias, bn)
        ctx.eps = bn.eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (*_bn_train_backward(g, x, weight, mean, invstd, ctx.eps, [need[0], need[1], need[2]]), None)


# The projection shortcut P (a 1x1 conv, stride 2 where a stage starts) runs on a CPU as a subsampling
# followed by a stride-1 conv. Same function (a 1x1 kernel without padding reads only the pixels the
# stride lands on); oneDNN's strided 1x1 kernels are the slow ones. Measured (one thread, fwd+bwd of
# the conv alone, torch 2.15, 2-core dev box; the whole-step effect is in bench/results'
# throughput records): {20,4,8} digits shapes, the masked model's per-branch
# projection (512 maps, 64->128 at 8x8 and 128->256 at 4x4): 29.2 -> 9.2 ms and 12.3 -> 8.4 ms;
# {29,64,8} shapes at batch 8 (64 maps, 256->512 at 32x32 and 512->1024 at 16x16): 410 -> 311 ms and
# 247 -> 157 ms. On a GPU the strided convolution (cuDNN) is kept.
SUBSAMPLE_STRIDED_1X1_ON_CPU = True


def conv1x1(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, stride=stride)`` for a 1x1 kernel, no padding, no bias."""
    if stride != 1 and SUBSAMPLE_STRIDED_1X1_ON_CPU and x.device.type == "cpu":
        return F.conv2d(x[:, :, ::stride, ::stride], weight)
    return F.conv2d(x, weight, stride=stride)


class _Shortcut1x1(nn.Conv2d):
    """The projection shortcut's conv: an ``nn.Conv2d`` (same parameters and state-dict keys, so a
    torchvision state dict still loads) whose forward pass is :func:`conv1x1`."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1(x, self.weight, self.stride[0])


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_Shortcut1x1(in_ch, out_ch, stride), _bn(out_ch))


def _stem(spec: ModelSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    if spec.layout == "imagenet":
        conv = nn.Conv2d(spec.in_channels, STEM_WIDTH, 7, stride=2, padding=3, bias=False)
        pool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
    else:  # CIFAR: a 3x3 conv with 64 filters, as ResNeXt-29
        conv = nn.Conv2d(spec.in_channels, STEM_WIDTH, 3, stride=1, padding=1, bias=False)
        pool = nn.Identity()
    return conv, _bn(STEM_WIDTH), pool


def _module_plan(spec: ModelSpec) -> list[list[tuple[int, int, int, int]]]:
    """Per stage, per module: (in_width, out_width, branch_width, stride)."""
    plan, in_w = [], STEM_WIDTH
    for s, (n, out_w, bw) in enumerate(zip(spec.stages, spec.stage_widths(), spec.branch_widths())):
        stage = []
        for m in range(n):
            stride = 2 if (s > 0 and m == 0) else 1
            stage.append((in_w, out_w, bw, stride))
            in_w = out_w
        plan.append(stage)
    return plan


def _init_weights(model: nn.Module) -> None:
    # torchvision's ResNet initialisation, so Fixed-Full matches torchvision's resnext at init.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _StemMixin:
    def _stem_forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


# --- Fixed-Full ----------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """ResNeXt block: y = ReLU(P(x) + BN(conv1x1(ReLU(BN(gconv3x3(ReLU(BN(conv1x1(x))))))))).

    ``width`` is C * w (all branches), the 3x3 conv has ``groups = C``.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int, groups: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeXt(_StemMixin, nn.Module):
    """Fixed-Full ResNeXt (``connectivity='full'``)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec = validate(spec)
        self.spec = spec
        self.conv1, self.bn1, self.maxpool = _stem(spec)
        self.relu = nn.ReLU(inplace=True)
        for s, stage in enumerate(_module_plan(spec), start=1):
            blocks = [Bottleneck(i, o, spec.cardinality * bw, spec.cardinality, st) for i, o, bw, st in stage]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.num_stages = len(spec.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths()[-1], spec.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem_forward(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- Masked --------------------------------------------------------------------------------------

class MaskedBlock(nn.Module):
    """One module of ``n`` branches, vectorised: returns Y of shape (N, n, out, H, W) with
    Y_k = F_k(x_k) + P(x_k) * identity_scale.

    With ``shared_input`` (the first module, fed by the stem) every branch reads the same (N, in, H, W)
    tensor and conv1 is a plain conv; otherwise the input is (N, n*in, H, W), branch k's slice being x_k,
    and conv1 is grouped. Parameter shapes equal ResNeXt's except conv3, whose (out, n*bw) weight is
    stored per branch as (n*out, bw).
    """

    def __init__(self, in_ch: int, out_ch: int, branch_width: int, branches: int, stride: int,
                 shared_input: bool, identity_scale: float):
        super().__init__()
        n, bw = branches, branch_width
        self.in_ch, self.out_ch, self.branches, self.branch_width = in_ch, out_ch, n, bw
        self.shared_input, self.identity_scale = shared_input, float(identity_scale)
        self.conv1 = nn.Conv2d(in_ch if shared_input else n * in_ch, n * bw, 1, groups=1 if shared_input else n, bias=False)
        self.bn1 = _bn(n * bw)
        self.conv2 = nn.Conv2d(n * bw, n * bw, 3, stride=stride, padding=1, groups=n, bias=False)
        self.bn2 = _bn(n * bw)
        self.conv3 = nn.Conv2d(n * bw, n * out_ch, 1, groups=n, bias=False)
        self.bn3 = _bn(out_ch)  # shared by the n branches: applied to the (N*n, out, H, W) view
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        n, out_ch = self.branches, self.out_ch
        batch = x.shape[0]
        h = F.relu(self.bn1(grouped_1x1(x, self.conv1.weight, self.conv1.groups)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = grouped_1x1(h, self.conv3.weight, n)
        hh, ww = h.shape[-2:]
        h = self.bn3(h.reshape(batch * n, out_ch, hh, ww)).reshape(batch, n, out_ch, hh, ww)
        if self.shared_input:
            idt = x if self.downsample is None else self.downsample(x)
            idt = idt.unsqueeze(1)  # broadcast over branches: P is computed once
        else:
            xb = x.reshape(batch * n, self.in_ch, x.shape[-2], x.shape[-1])
            idt = xb if self.downsample is None else self.downsample(xb)
            idt = idt.reshape(batch, n, out_ch, hh, ww)
        return torch.add(h, idt, alpha=self.identity_scale)  # one pass: h + idt * scale

    # --- the memory-saving form (training): same maths, fewer tensors kept for the backward pass ----

    def forward_saving(self, x: Tensor | None = None, y_prev: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """What ``block(mix(mask, y_prev))`` computes (``block(x)`` for the stem-fed module), keeping for
        the backward pass only ``y_prev`` (the previous module's branch tensors, which the mask gradient
        needs anyway) and the bottleneck tensors ResNeXt keeps too. The mixed input and its ReLU (conv1's
        input, the identity path), the projection shortcut and the last 1x1 conv's output are recomputed
        in the backward pass (:class:`_MixedInput`, :class:`_SharedBNTail`). BN running statistics are
        updated once, in the forward pass. Training mode only (the BNs use batch statistics).
        """
        n, out_ch = self.branches, self.out_ch
        if y_prev is None:  # stem-fed: the plain head (its tensors are ResNeXt's own)
            batch = x.shape[0]
            h1 = grouped_1x1(x, self.conv1.weight, self.conv1.groups)
            idt = (x if self.downsample is None else self.downsample(x)).unsqueeze(1)
        else:
            batch = y_prev.shape[0]
            ds = () if self.downsample is None else (self.downsample[0].weight, self.downsample[1].weight,
                                                      self.downsample[1].bias)
            h1, idt = _MixedInput.apply(self, y_prev, mask, self.conv1.weight, *ds)
        h = F.relu(self.bn1(h1))
        h = F.relu(self.bn2(self.conv2(h)))
        h = _SharedBNTail.apply(self, h, self.conv3.weight, self.bn3.weight, self.bn3.bias)
        hh, ww = h.shape[-2:]
        h = h.reshape(batch, n, out_ch, hh, ww)
        if y_prev is not None:
            idt = idt.reshape(batch, n, out_ch, hh, ww)
        return torch.add(h, idt, alpha=self.identity_scale)  # one pass: h + idt * scale

    def _projection(self, x: Tensor, w: Tensor, g: Tensor, b: Tensor, first: bool) -> Tensor:
        """P on every branch: the shared projection on the (N*n, in, H, W) view. The first call (forward
        pass) is the BN module's own, which updates the running statistics; the recomputation in the
        backward pass normalises by the same batch statistics and updates nothing."""
        conv, bn = self.downsample
        d = conv1x1(x.reshape(x.shape[0] * self.branches, self.in_ch, x.shape[-2], x.shape[-1]), w, conv.stride[0])
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
    def forward(ctx, block: "MaskedBlock", y_prev: Tensor, mask: Tensor, w1: Tensor, *ds: Tensor):
        ctx.block, ctx.autocast = block, _autocast_state(y_prev.device.type)
        ctx.set_materialize_grads(False)
        x = mix(mask, y_prev)
        h1 = grouped_1x1(x, w1, block.branches)
        idt = block._projection(x, *ds, first=True) if ds else x
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
                outs.append(block._projection(x, *dsd, first=False) if dsd else x)
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
    def forward(ctx, block: "MaskedBlock", h2: Tensor, w3: Tensor, g3: Tensor, b3: Tensor):
        bn = block.bn3
        h = grouped_1x1(h2, w3, block.branches)
        hv = h.reshape(h.shape[0] * block.branches, block.out_ch, h.shape[-2], h.shape[-1])
        out, mean, invstd = _bn_train_forward(hv, g3, b3, bn)
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
        gh, g_g3, g_b3 = _bn_train_backward(g_out, hv, g3, mean, invstd, block.bn3.eps, [True, need[2], need[3]])
        g_h2, g_w3 = _conv1x1_backward(gh.reshape(h.shape), h2.to(h.dtype), w3, block.branches, need[0], need[1])
        return None, g_h2, g_w3, g_g3, g_b3


# A masked module's grouped 1x1 convs (conv1 and conv3: one group per branch, as wide as the module on one
# side and as narrow as the branch on the other) run as one batched matmul on a CPU when the branch is
# narrow (<= 64 channels). Measured there (one thread, fwd+bwd, on a shared machine): at {20,4,8} and
# {29,64,8} stage-1 shapes (32x32, branch width 4 / 64) conv1 1.8x / 1.8x faster, conv3 1.7x / 1.2x than
# the grouped convolution (oneDNN, or the per-group slow path at batches under 16); at {29,64,8} stage 3
# (8x8, branch width 256) the convolution was 1.7x faster. On a GPU the grouped convolution (cuDNN) is
# kept. Same function; the summation order, hence the round-off, differs.
GROUPED_1X1_AS_MATMUL_ON_CPU = True
MATMUL_MAX_GROUP_WIDTH = 64


def _matmul_1x1(x: Tensor, groups: int, out_ch: int) -> bool:
    narrow = min(x.shape[1], out_ch) // groups  # the branch width
    return (GROUPED_1X1_AS_MATMUL_ON_CPU and groups > 1 and narrow <= MATMUL_MAX_GROUP_WIDTH
            and x.device.type == "cpu" and x.is_contiguous())


def grouped_1x1(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """``F.conv2d(x, weight, groups=groups)`` for a 1x1 kernel, stride 1, no bias."""
    if not _matmul_1x1(x, groups, weight.shape[0]):
        return F.conv2d(x, weight, groups=groups)
    n, cin, hh, ww = x.shape
    out = torch.matmul(weight.view(groups, -1, cin // groups), x.view(n, groups, cin // groups, hh * ww))
    return out.view(n, -1, hh, ww)


# Two ways to write the mixing under torch.compile. The bmm form (default) keeps the mixing an extern
# GEMM. The fused form writes it as a broadcast product summed over the source axis, which inductor
# turns into one kernel with the element-wise work around it (the shared last BN's normalisation, the
# identity share, the ReLU: tests/test_compile.py checks the fusion), so the branch tensors are read
# once and the mixed inputs written once in the forward pass. Its backward, though, computes the mask
# gradient as C*C separate reductions over the whole batch (each reading a pair of branch tensors)
# where the bmm form does one GEMM. Measured on a CPU (bench/mixing.py, {20,4,8} stage-1 tail,
# batch 8, 2 threads, fwd+bwd): eager bmm 31 ms, compiled bmm 46 ms, compiled fused 160 ms; forward
# alone 22 / 5.1 / 5.8 ms. So the bmm form is the default until a GPU measurement
# (``python -m bench mixing --device cuda``) says otherwise. Eager mode always uses bmm: the fused
# expression would materialise an (N, n_out, n_in, ...) product.
FUSE_MIX_WHEN_COMPILING = False

# The memory-saving training path (MaskedBlock.forward_saving): per module, the backward pass keeps the
# previous module's branch tensors once, instead of them, their mixture and the shared BN's input
# (bench/README.md, ``python -m bench memory``). Same maths; ``model.save_memory = False`` gives the
# plain autograd path (the tests compare the two). torch.compile always traces the plain path: AOT
# autograd's partitioner makes its own choice of what to recompute.
# None (default): the saving path on CUDA, where GPU memory bounds the batch (80 GB: {50,4,32} learned
# K=16 fits an estimated 104 images instead of 35), and the plain path on a CPU, where memory is rarely
# the limit and the backward's recomputation costs speed (measured, 1 thread, {29,64,8} learned K=4 /
# Fixed-Full: 0.46 saving vs 0.55 plain; digits {20,4,8} K=2 step 249 vs 214 ms). True/False force it.
SAVE_MEMORY: bool | None = None


@contextlib.contextmanager
def cpu_fast_paths(enabled: bool = True) -> Iterator[None]:
    """Switch the CPU-only fast paths on or off for the duration of a ``with`` block: grouped 1x1 convs
    as matmul (:data:`GROUPED_1X1_AS_MATMUL_ON_CPU`), the subsampled strided 1x1
    (:data:`SUBSAMPLE_STRIDED_1X1_ON_CPU`) and the small-map BN (:data:`SMALL_MAP_PIXELS`).

    ``enabled=False`` makes a CPU run the kernels a GPU runs (the grouped convolution and its
    ``convolution_backward`` in the saving path, the strided conv, torch's own BN), which is how the
    tests and ``maskconnect preflight`` cover the CUDA code path on a CPU. Same function either way.
    """
    global GROUPED_1X1_AS_MATMUL_ON_CPU, SUBSAMPLE_STRIDED_1X1_ON_CPU, SMALL_MAP_PIXELS
    before = GROUPED_1X1_AS_MATMUL_ON_CPU, SUBSAMPLE_STRIDED_1X1_ON_CPU, SMALL_MAP_PIXELS
    GROUPED_1X1_AS_MATMUL_ON_CPU = SUBSAMPLE_STRIDED_1X1_ON_CPU = bool(enabled)
    SMALL_MAP_PIXELS = _SMALL_MAP_PIXELS_ON if enabled else 0
    try:
        yield
    finally:
        GROUPED_1X1_AS_MATMUL_ON_CPU, SUBSAMPLE_STRIDED_1X1_ON_CPU, SMALL_MAP_PIXELS = before


def mix(mask: Tensor, y: Tensor) -> Tensor:
    """Connections between modules: out_j = ReLU(sum_k mask[j, k] * y_k).

    ``mask`` (n_out, n_in), ``y`` (N, n_in, C, H, W) -> (N, n_out*C, H, W). The mask is cast to y's
    dtype (exact for 0/1, so bf16 autocast is safe).
    """
    batch, n_in, ch, hh, ww = y.shape
    n_out = mask.shape[0]
    m = mask.to(y.dtype)
    y3 = y.reshape(batch, n_in, ch * hh * ww)
    if FUSE_MIX_WHEN_COMPILING and torch.compiler.is_compiling():
        out = (m.view(1, n_out, n_in, 1) * y3.unsqueeze(1)).sum(2)
    else:
        # bmm with the mask broadcast by a stride-0 expand, not torch.matmul: matmul folds a 2-D @ 3-D
        # product into one tall (N*X, n) GEMM whose backward copies y transposed; for a learned mask
        # that made the mixing 3-6x slower on a CPU (bench/README.md). Here the mask gradient is
        # bmm(grad, y^T) summed over the batch, with no copy.
        out = torch.bmm(m.expand(batch, n_out, n_in), y3)
    return F.relu(out).reshape(batch, n_out * ch, hh, ww)


class MaskedResNeXt(_StemMixin, nn.Module):
    """ResNeXt with masked branch connectivity (``random`` or ``learned``), or a pruned compact one.

    ``branches`` gives the number of branches per module (default C everywhere; a pruned model has
    fewer), ``masks`` a :class:`MaskBank` (default, from the spec) or :class:`FixedMasks` (pruned).
    """

    def __init__(self, spec: ModelSpec, branches: Sequence[int] | None = None, masks: nn.Module | None = None):
        super().__init__()
        spec = validate(spec)
        if not spec.masked:
            raise ValueError("MaskedResNeXt needs connectivity 'random' or 'learned'; use ResNeXt for 'full'")
        self.spec = spec
        c, k = spec.cardinality, spec.fan_in
        num = spec.num_modules
        self.branches = list(branches) if branches is not None else [c] * num
        if len(self.branches) != num:
            raise ValueError(f"branches must list {num} modules, got {len(self.branches)}")
        self.conv1, self.bn1, self.maxpool = _stem(spec)
        self.relu = nn.ReLU(inplace=True)
        idx = 0
        for s, stage in enumerate(_module_plan(spec), start=1):
            blocks = []
            for i, o, bw, st in stage:
                last = idx == num - 1
                # identity share: 1/K into a masked connection, 1/C into the output node
                blocks.append(MaskedBlock(i, o, bw, self.branches[idx], st, shared_input=idx == 0,
                                          identity_scale=1.0 / (c if last else k)))
                idx += 1
            setattr(self, f"layer{s}", nn.ModuleList(blocks))
        self.num_stages = len(spec.stages)
        self.masks = masks if masks is not None else MaskBank(num - 1, c, k, spec.connectivity, seed=spec.seed, init=spec.mask_init)
        self.save_memory = SAVE_MEMORY
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths()[-1], spec.num_classes)
        _init_weights(self)
        # Initial scale: each branch's last BN makes F_k unit-variance, and the next module sums K of
        # them (the output node sums C), where ResNeXt's BN after the sum gives unit variance. gamma =
        # 1/sqrt(fan) makes the summed residual unit-variance at init, as in ResNeXt; without it the
        # masked model diverges at the paper's LR 0.1 (our choice: the paper gives no initialisation).
        for i, block in enumerate(self.blocks()):
            fan = c if i == num - 1 else k
            nn.init.constant_(block.bn3.weight, fan ** -0.5)

    def blocks(self) -> list[MaskedBlock]:
        return [b for s in range(1, self.num_stages + 1) for b in getattr(self, f"layer{s}")]

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem_forward(x)
        masks = self.masks()  # one draw per forward pass (= per training iteration)
        blocks = self.blocks()
        save = x.is_cuda if self.save_memory is None else self.save_memory
        if save and self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            y = blocks[0].forward_saving(x)
            for i in range(1, len(blocks)):
                y = blocks[i].forward_saving(y_prev=y, mask=masks[i - 1])
            return self.fc(torch.flatten(self.avgpool(F.relu(y.sum(1))), 1))
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            y = block(x)
            x = mix(masks[i], y) if i < last else F.relu(y.sum(1))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(spec: ModelSpec) -> nn.Module:
    """The model for a spec: :class:`ResNeXt` for ``full``, :class:`MaskedResNeXt` otherwise."""
    spec = validate(spec)
    return ResNeXt(spec) if spec.connectivity == "full" else MaskedResNeXt(spec)


# --- weight mapping ------------------------------------------------------------------------------

@torch.no_grad()
def load_full_weights(masked: MaskedResNeXt, full_state: dict[str, Tensor]) -> MaskedResNeXt:
    """Load a Fixed-Full (ResNeXt / torchvision) state dict into an unpruned masked model.

    conv3's (out, C*w) weight is re-laid out per branch as (C*out, w); the shared last BN takes the
    same gamma and running variance, and beta / C and running mean / C, because the C branch outputs
    are summed after it. With all-ones masks (K = C) the masked model then computes the same function
    in eval mode. Masks are left untouched.
    """
    if any(b != masked.spec.cardinality for b in masked.branches):
        raise ValueError("load_full_weights needs an unpruned masked model")
    c = masked.spec.cardinality
    state = {}
    own = masked.state_dict()
    for name, value in full_state.items():
        if name not in own:
            raise KeyError(f"unexpected key in Fixed-Full state dict: {name}")
        if name.endswith("conv3.weight"):
            out_ch, cw = value.shape[:2]
            value = value.reshape(out_ch, c, cw // c).permute(1, 0, 2).reshape(c * out_ch, cw // c, 1, 1)
        elif ".bn3." in name and (name.endswith("bias") or name.endswith("running_mean")):
            value = value / c
        state[name] = value
    missing = [k for k in own if k not in state and not k.startswith("masks.")]
    if missing:
        raise KeyError(f"Fixed-Full state dict lacks {missing[:5]}")
    masked.load_state_dict(state, strict=False)
    return masked
