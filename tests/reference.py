"""Test-only references: a naive per-branch loop implementation of the masked model (docs/design.md
section 3, written the obvious way) and helpers that make eval-mode comparisons non-trivial."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm random affine parameters and running statistics, so an eval-mode
    comparison exercises the BN mapping instead of identity BNs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _bn(h, bn, rows=None):
    sl = (lambda t: t) if rows is None else (lambda t: t[rows])
    return F.batch_norm(h, sl(bn.running_mean), sl(bn.running_var), sl(bn.weight), sl(bn.bias), False, 0.0, bn.eps)


@torch.no_grad()
def naive_masked_forward(model, x, masks=None):
    """Eval-mode forward of a MaskedResNeXt with a Python loop over every branch of every module."""
    if masks is None:
        masks = model.masks()
    out = model.maxpool(F.relu(model.bn1(model.conv1(x))))
    blocks = model.blocks()
    inputs = [out] * blocks[0].branches
    for i, blk in enumerate(blocks):
        bw, oc = blk.branch_width, blk.out_ch
        ys = []
        for k in range(blk.branches):
            xk = inputs[k]
            rows = slice(k * bw, (k + 1) * bw)
            h = F.relu(_bn(F.conv2d(xk, blk.conv1.weight[rows]), blk.bn1, rows))
            h = F.conv2d(h, blk.conv2.weight[rows], stride=blk.conv2.stride, padding=1)
            h = F.relu(_bn(h, blk.bn2, rows))
            h = _bn(F.conv2d(h, blk.conv3.weight[k * oc:(k + 1) * oc]), blk.bn3)
            p = xk if blk.downsample is None else blk.downsample(xk)
            ys.append(h + p * blk.identity_scale)
        if i < len(blocks) - 1:
            m = masks[i]
            inputs = [F.relu(sum(m[j, k] * ys[k] for k in range(blk.branches))) for j in range(m.shape[0])]
        else:
            out = F.relu(sum(ys))
    return model.fc(torch.flatten(model.avgpool(out), 1))
