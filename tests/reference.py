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


@torch.no_grad()
def reference_cifar_resnet(state: dict, x, blocks_per_stage: int, mask=None, eps: float = 1e-5):
    """Eval-mode CIFAR ResNet of He et al. (2016, section 4.2), written from the paper with functional ops on
    a state dict (torchvision's key names): a 3x3 stem, three stages of basic blocks, option-A shortcuts
    (every other pixel, zero channels appended), average pool, linear.

    ``mask`` (L-1, L-1): block j (0-based, j >= 1) reads the mean of the earlier blocks k with
    ``mask[j - 1, k] == 1``, each brought to its input's shape the option-A way (docs/design.md section 12);
    None: each block reads its predecessor (the standard network)."""

    def bn(h, p):
        return F.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], False, 0.0, eps)

    def shortcut_a(h, channels, stride):
        h = h[:, :, ::stride, ::stride]
        pad = h.new_zeros(h.shape[0], channels - h.shape[1], *h.shape[2:])
        return torch.cat([h, pad], 1)

    stem = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    outputs, stages = [], []
    for s in range(3):
        for b in range(blocks_per_stage):
            j = len(outputs)
            if j == 0:
                h = stem
            elif mask is None:
                h = outputs[-1]
            else:
                in_stage, width = stages[j - 1], outputs[j - 1].shape[1]
                chosen = [k for k in range(j) if mask[j - 1][k] == 1]
                h = sum(shortcut_a(outputs[k], width, 2 ** (in_stage - stages[k])) for k in chosen) / len(chosen)
            p = f"layer{s + 1}.{b}"
            stride = 2 if s > 0 and b == 0 else 1
            out = F.relu(bn(F.conv2d(h, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            outputs.append(F.relu(out + shortcut_a(h, out.shape[1], stride)))
            stages.append(s)
    return F.linear(outputs[-1].mean((2, 3)), state["fc.weight"], state["fc.bias"])


def reachable_blocks(mask) -> list[bool]:
    """Which blocks the classifier depends on: a search from the last block through the blocks each reads
    (row j-1 of ``mask`` is block j's choice), written as a graph walk."""
    n = len(mask) + 1
    seen, todo = {n - 1}, [n - 1]
    while todo:
        j = todo.pop()
        if j == 0:
            continue
        for k in range(j):
            if mask[j - 1][k] == 1 and k not in seen:
                seen.add(k)
                todo.append(k)
    return [j in seen for j in range(n)]
