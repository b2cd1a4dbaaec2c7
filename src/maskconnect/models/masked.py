"""The masked multi-branch model: ResNeXt whose branches read chosen branches of the previous module
(``random`` or ``learned`` connectivity; docs/design.md section 3).

Every branch k of module i has its own input x_k^(i). Module 1 reads the stem; the mask m^(i+1), a
C x C binary matrix with K ones per row, says which outputs of module i each branch of module i+1 sums:

    y_k^(i)   = F_k^(i)(x_k^(i)) + P^(i)(x_k^(i)) / K
    x_j^(i+1) = ReLU( sum_k m_jk^(i+1) * y_k^(i) )
    output    = ReLU( sum_k [ F_k^(L)(x_k^(L)) + P^(L)(x_k^(L)) / C ] )  -> average pool -> linear

Two choices the paper leaves open (docs/design.md section 11), stated here as :func:`identity_share`
and :func:`initial_gamma` of a sum's fan, the number of branch outputs it adds (K into a masked
connection, C into the output node):

* **the identity share** 1 / fan: each branch carries P(x_k) / K, so K full identities do not scale the
  shortcut by K per module, and with all-ones masks (K = C) the model is exactly ResNeXt:
  sum_k (F_k(x) + P(x) / C) = P(x) + sum_k F_k(x);
* **the initial gamma** 1 / sqrt(fan) of the last BN, which the C branches of a module share: each
  branch output is unit-variance after its BN and fan of them are summed, where ResNeXt normalises after
  the sum. Without it the masked models diverge at the paper's LR 0.1.

The model is vectorised over branches: a module's C branch tensors are one (N, C*width, H, W) tensor,
its 1x1 convs are grouped (groups = C), the 3x3 is ResNeXt's grouped conv, and the mixing is one bmm
(``kernels.mix``). A masked model has exactly the weights of its ResNeXt baseline; the masks are counted
apart. ``MaskedBlock.forward`` is a module's one entry point: it mixes its input and runs the plain form
(:meth:`MaskedBlock.plain`) or, in training on CUDA, :func:`maskconnect.kernels.forward_saving`, the same
function with fewer tensors kept for the backward pass (``model.save_memory``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..connectivity import MaskBank
from ..kernels import BatchNorm2d, grouped_1x1, mix
from ..specs import ModelSpec, validate
from .resnext import StemMixin, init_weights, module_plan, shortcut, stem


def fan_of(spec: ModelSpec, last: bool) -> int:
    """How many branch outputs one sum adds: K into a masked connection, C into the output node."""
    return spec.cardinality if last else spec.fan_in


def identity_share(fan: int) -> float:
    """The share of the shortcut a branch carries: 1/K into a masked connection, 1/C into the output."""
    return 1.0 / fan


def initial_gamma(fan: int) -> float:
    """The initial gamma of a module's shared last BN: 1/sqrt(K), 1/sqrt(C) in the last module."""
    return fan ** -0.5


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
        self.bn1 = BatchNorm2d(n * bw)
        self.conv2 = nn.Conv2d(n * bw, n * bw, 3, stride=stride, padding=1, groups=n, bias=False)
        self.bn2 = BatchNorm2d(n * bw)
        self.conv3 = nn.Conv2d(n * bw, n * out_ch, 1, groups=n, bias=False)
        self.bn3 = BatchNorm2d(out_ch)  # shared by the n branches: applied to the (N*n, out, H, W) view
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor | None = None, *, y_prev: Tensor | None = None, mask: Tensor | None = None,
                save: bool = False) -> Tensor:
        """The module on its input: ``x`` for the stem-fed module, else the previous module's branch outputs
        ``y_prev`` mixed by ``mask`` (``kernels.mix``: x_j = ReLU(sum_k m_jk y_k)). The one entry point:
        with ``save`` (the model's ``save_memory``) a training pass with autograd on runs the same function
        on the memory-saving path (:meth:`forward_saving`), every other pass :meth:`plain`."""
        if save and self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.forward_saving(x, y_prev, mask)
        return self.plain(x if y_prev is None else mix(mask, y_prev))

    def plain(self, x: Tensor) -> Tensor:
        """Y_k = F_k(x_k) + P(x_k) * identity_scale, as autograd keeps it (the architecture's statement)."""
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

    def forward_saving(self, x: Tensor | None = None, y_prev: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``plain(mix(mask, y_prev))`` (``plain(x)`` for the stem-fed module) on the memory-saving path
        (training only): :func:`maskconnect.kernels.forward_saving`, which reads the attributes
        ``kernels.saving.SavingBlock`` declares."""
        return kernels.forward_saving(self, x, y_prev, mask)


class MaskedResNeXt(StemMixin, nn.Module):
    """ResNeXt with masked branch connectivity (``random`` or ``learned``), or a pruned compact one.

    ``branches`` gives the number of branches per module (default C everywhere; a pruned model has
    fewer), ``masks`` a :class:`MaskBank` (default, from the spec) or ``connectivity.FixedMasks``
    (pruned). The identity share and the initial gamma follow the spec's K and C (section 3 above).
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
        self.conv1, self.bn1, self.maxpool = stem(spec)
        self.relu = nn.ReLU(inplace=True)
        idx = 0
        for s, stage in enumerate(module_plan(spec), start=1):
            blocks = []
            for i, o, bw, st in stage:
                share = identity_share(fan_of(spec, last=idx == num - 1))
                blocks.append(MaskedBlock(i, o, bw, self.branches[idx], st, shared_input=idx == 0, identity_scale=share))
                idx += 1
            setattr(self, f"layer{s}", nn.ModuleList(blocks))
        self.num_stages = len(spec.stages)
        self.masks = masks if masks is not None else MaskBank(num - 1, c, k, spec.connectivity, seed=spec.seed, init=spec.mask_init)
        self.save_memory = kernels.current().save_memory
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths()[-1], spec.num_classes)
        init_weights(self)
        for i, block in enumerate(self.blocks()):
            nn.init.constant_(block.bn3.weight, initial_gamma(fan_of(spec, last=i == num - 1)))

    def blocks(self) -> list[MaskedBlock]:
        return [b for s in range(1, self.num_stages + 1) for b in getattr(self, f"layer{s}")]

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem_forward(x)
        masks = self.masks()  # one draw per forward pass (= per training iteration)
        blocks = self.blocks()
        save = x.is_cuda if self.save_memory is None else self.save_memory
        y = blocks[0](x, save=save)
        for i in range(1, len(blocks)):
            y = blocks[i](y_prev=y, mask=masks[i - 1], save=save)
        return self.fc(torch.flatten(self.avgpool(F.relu(y.sum(1))), 1))  # the output node: all C branches
