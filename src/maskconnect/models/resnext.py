"""Fixed-Full: the ResNeXt of {D, w, C} (docs/design.md sections 1 and 2), and the parts the masked
model shares with it: the stem, the module plan, the projection shortcut and the initialisation.

The attribute names are torchvision's, so a torchvision ``resnext50_32x4d`` state dict loads as is.
One grouped convolution per layer; the branch outputs are summed inside the last 1x1 conv:

    y = ReLU( P(x) + BN(conv1x1(ReLU(BN(gconv3x3(ReLU(BN(conv1x1(x))))))) )

The BN and the shortcut's 1x1 conv come from ``kernels`` (same parameters and state-dict keys as
torch's layers, faster on a CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import BatchNorm2d, Shortcut1x1
from ..specs import ModelSpec, validate

STEM_WIDTH = 64


def shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """The projection shortcut P: a 1x1 conv with the module's stride, then BN."""
    return nn.Sequential(Shortcut1x1(in_ch, out_ch, stride), BatchNorm2d(out_ch))


def stem(spec: ModelSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(conv, BN, pool): ImageNet's 7x7 stride-2 conv and max-pool, or CIFAR's 3x3 conv."""
    if spec.layout == "imagenet":
        conv = nn.Conv2d(spec.in_channels, STEM_WIDTH, 7, stride=2, padding=3, bias=False)
        pool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
    else:  # CIFAR: a 3x3 conv with 64 filters, as ResNeXt-29
        conv = nn.Conv2d(spec.in_channels, STEM_WIDTH, 3, stride=1, padding=1, bias=False)
        pool = nn.Identity()
    return conv, BatchNorm2d(STEM_WIDTH), pool


def module_plan(spec: ModelSpec) -> list[list[tuple[int, int, int, int]]]:
    """Per stage, per module: (in_width, out_width, branch_width, stride); stride 2 in the first module
    of every stage after the first."""
    plan, in_w = [], STEM_WIDTH
    for s, (n, out_w, bw) in enumerate(zip(spec.stages, spec.stage_widths(), spec.branch_widths())):
        stage = []
        for m in range(n):
            stride = 2 if (s > 0 and m == 0) else 1
            stage.append((in_w, out_w, bw, stride))
            in_w = out_w
        plan.append(stage)
    return plan


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation, so Fixed-Full matches torchvision's resnext at init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StemMixin:
    def _stem_forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class Bottleneck(nn.Module):
    """ResNeXt block: y = ReLU(P(x) + BN(conv1x1(ReLU(BN(gconv3x3(ReLU(BN(conv1x1(x))))))))).

    ``width`` is C * w (all branches), the 3x3 conv has ``groups = C``.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int, groups: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeXt(StemMixin, nn.Module):
    """Fixed-Full ResNeXt (``connectivity='full'``)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec = validate(spec)
        self.spec = spec
        self.conv1, self.bn1, self.maxpool = stem(spec)
        self.relu = nn.ReLU(inplace=True)
        for s, stage in enumerate(module_plan(spec), start=1):
            blocks = [Bottleneck(i, o, spec.cardinality * bw, spec.cardinality, st) for i, o, bw, st in stage]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.num_stages = len(spec.stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths()[-1], spec.num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem_forward(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
