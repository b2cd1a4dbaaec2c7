"""The ResNet family of the ECCV extension (docs/design.md section 12): the standard ResNet (Fixed-Prev)
and the masked ResNet, whose blocks each read the mean of K earlier blocks' outputs.

* CIFAR (He et al. 2016, section 4.2): a 3x3 conv of 16 filters, three stages of n basic blocks (two
  3x3 convs) of widths 16/32/64, stride 2 in the first block of stages 2 and 3, option-A shortcuts
  (parameter-free: every other pixel, zero channels), average pool, linear. D = 6n + 2.
* ImageNet: torchvision's resnet50/101/152, attribute for attribute (bottleneck blocks, projection
  shortcuts where the shape changes): a torchvision state dict loads as is.

The masked ResNet has exactly these weights. With L blocks (0-based), block j reads

    x_0 = the stem's output
    x_j = (1 / K_j) sum_{k < j} m_jk A_j(y_k),     K_j = min(K, j) ones in m_j   (j >= 1)
    y_j = ReLU(F_j(x_j) + S_j(x_j))                   the standard block, S_j its own shortcut
    output = linear(average pool(y_{L-1}))

A_j brings y_k to the shape of x_j (that of y_{j-1}: channels double and the resolution halves per
stage) with the option-A shortcut, so the candidates span all stages and cost no parameters. With
m_j selecting only block j-1 (Fixed-Prev) this is the standard ResNet. Our readings where the paper is
silent (section 12): the stem is not a candidate beyond block 0, a row with fewer than K candidates
reads them all, and the selected outputs are averaged (1/K_j), not summed.

:meth:`MaskedResNet.forward` states the mixing as a loop over candidates (the plain form, traced by
torch.compile and used as the tests' reference); training and evaluation run the same function through
``kernels.EarlierOutputs`` (one bmm per source stage, no per-reader copies; ``save_memory`` False
forces the plain form).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..connectivity import MaskBank, candidate_masks
from ..kernels import BatchNorm2d, EarlierOutputs, Shortcut1x1
from ..specs import ModelSpec, validate
from .resnext import init_weights


def option_a(x: Tensor, out_ch: int, stride: int) -> Tensor:
    """The option-A shortcut: every ``stride``-th pixel, then zero channels up to ``out_ch``."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    if out_ch > x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, out_ch - x.shape[1]))
    return x


class BasicBlock(nn.Module):
    """CIFAR ResNet block: y = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + A(x)), A the option-A shortcut."""

    def __init__(self, in_ch: int, out_ch: int, inner: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_ch, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.out_ch, self.stride = out_ch, stride

    def residual(self, x: Tensor) -> Tensor:
        """F(x) + A(x), before the block's last ReLU."""
        h = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(h)) + option_a(x, self.out_ch, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride in the 3x3 conv), same attribute names:
    y = ReLU(BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(x))))))) + P(x)), P a 1x1 conv + BN where the
    shape changes, else the identity."""

    def __init__(self, in_ch: int, out_ch: int, inner: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn1 = BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(Shortcut1x1(in_ch, out_ch, stride), BatchNorm2d(out_ch))

    def residual(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h)) + (x if self.downsample is None else self.downsample(x))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x))


def block_plan(spec: ModelSpec) -> list[tuple[int, int, int, int, int]]:
    """Every block in order: (stage, in_width, out_width, inner_width, stride); stride 2 in the first
    block of every stage after the first. The stem's width is ``spec.width`` (16 on CIFAR, 64 on ImageNet)."""
    plan, in_w = [], spec.width
    for s, (n, out_w, inner) in enumerate(zip(spec.stages, spec.stage_widths(), spec.branch_widths())):
        for b in range(n):
            plan.append((s, in_w, out_w, inner, 2 if (s > 0 and b == 0) else 1))
            in_w = out_w
    return plan


class _Stem(nn.Module):
    """Shared by both ResNets: the stem, the stages (``layer1``, ...), the pool and the classifier, with
    torchvision's attribute names."""

    def _build(self, spec: ModelSpec, keep: Sequence[bool], container) -> None:
        if spec.layout == "imagenet":
            self.conv1 = nn.Conv2d(spec.in_channels, spec.width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.width, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = BatchNorm2d(spec.width)
        self.relu = nn.ReLU(inplace=True)
        block = Bottleneck if spec.layout == "imagenet" else BasicBlock
        plan = block_plan(spec)
        self.plan = plan
        for s in range(len(spec.stages)):
            blocks = {str(b): block(*p[1:]) for b, p in enumerate(q for q in plan if q[0] == s)}
            kept = [j for j, p in enumerate(plan) if p[0] == s]
            first = kept[0]
            setattr(self, f"layer{s + 1}", container({k: v for k, v in blocks.items() if keep[first + int(k)]}))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths()[-1], spec.num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def head(self, y: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(y), 1))


class ResNet(_Stem):
    """Fixed-Prev: the standard ResNet (``connectivity='prev'``)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec = validate(spec)
        self.spec = spec
        self._build(spec, [True] * spec.num_modules, lambda d: nn.Sequential(*d.values()))

    def blocks(self) -> list[nn.Module]:
        return [b for s in range(len(self.spec.stages)) for b in getattr(self, f"layer{s + 1}")]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for s in range(len(self.spec.stages)):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.head(x)


class MaskedResNet(_Stem):
    """A ResNet whose blocks read K earlier blocks (``random`` or ``learned``), or its pruned form.

    ``alive`` lists, per block, whether the model keeps it (default all; a pruned model lacks the blocks
    nothing reads), ``masks`` a :class:`MaskBank` of shape (1, L-1, L-1) (default, from the spec; row
    j-1 is block j's choice among blocks 0..j-1) or ``connectivity.FixedMasks`` holding that matrix
    restricted to the kept blocks (pruned). Block state-dict keys are the standard ResNet's
    (``layer2.3.conv1.weight``), also in a pruned model.
    """

    def __init__(self, spec: ModelSpec, alive: Sequence[bool] | None = None, masks: nn.Module | None = None):
        super().__init__()
        spec = validate(spec)
        if not spec.masked:
            raise ValueError("MaskedResNet needs connectivity 'random' or 'learned'; use ResNet for 'prev'")
        self.spec = spec
        n = spec.num_modules
        self.alive = [bool(a) for a in alive] if alive is not None else [True] * n
        if len(self.alive) != n or not self.alive[0] or not self.alive[-1]:
            raise ValueError(f"alive must list {n} blocks, the first and the last kept")
        self._build(spec, self.alive, nn.ModuleDict)
        self.kept = [j for j in range(n) if self.alive[j]]
        if masks is None:
            masks = MaskBank(1, n - 1, spec.fan_in, spec.connectivity, seed=spec.seed, init=spec.mask_init,
                             valid=candidate_masks(spec.fam.row_candidates(spec)))
        self.masks = masks
        # 1/K_j of every kept reader: K_j = min(K, j) ones, which pruning keeps (a live row reads live blocks)
        self.scales = [1.0 / min(spec.fan_in, j) for j in self.kept[1:]]
        self.save_memory = kernels.current().save_memory

    def blocks(self) -> list[nn.Module]:
        """The kept blocks, in order."""
        return [getattr(self, f"layer{self.plan[j][0] + 1}")[str(j - self._first(j))] for j in self.kept]

    def _first(self, j: int) -> int:
        s = self.plan[j][0]
        return next(i for i, p in enumerate(self.plan) if p[0] == s)

    def _input_stage(self, j: int) -> int:
        """The stage whose shape block j's input has: that of block j-1's output."""
        return self.plan[j - 1][0]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        row_masks = self.masks()[0]   # one draw per forward pass (= per training iteration)
        fast = self.save_memory is not False and not torch.compiler.is_compiling()
        sizes = [x.shape[-2]]
        for _ in range(1, len(self.spec.stages)):
            sizes.append((sizes[-1] + 1) // 2)
        widths = self.spec.stage_widths()
        blocks, kept, last = self.blocks(), self.kept, len(self.kept) - 1
        stage_of = [self.plan[j][0] for j in kept]
        if fast:
            counts = [sum(1 for r in range(last) if stage_of[r] == s) for s in range(len(widths))]
            store = EarlierOutputs(counts)
            tokens: list[Tensor] = []
        else:
            ys: list[Tensor] = []
        for r, (j, block) in enumerate(zip(kept, blocks)):
            if r > 0:
                u = self._input_stage(j)
                shape = (widths[u], sizes[u], sizes[u])
                row = row_masks[r - 1, :r]
                if fast:
                    parts = tuple((s, sum(1 for c in range(r) if stage_of[c] == s), 2 ** (u - s)) for s in range(u + 1))
                    x = store.mix(row, parts, self.scales[r - 1], shape, tokens)
                else:
                    x = self.scales[r - 1] * sum(
                        row[c] * option_a(ys[c], widths[u], 2 ** (u - stage_of[c])) for c in range(r))
            z = block.residual(x)
            if r == last:
                return self.head(F.relu(z))
            if fast:
                tokens.append(store.put(z, stage_of[r], sum(1 for c in range(r) if stage_of[c] == stage_of[r])))
            else:
                ys.append(F.relu(z))
        raise AssertionError("unreachable: the last block returns")
