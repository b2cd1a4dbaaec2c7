"""Baseline weights in a masked model (docs/design.md sections 3 and 12)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masked import MaskedResNeXt
from .resnet import MaskedResNet


@torch.no_grad()
def load_full_weights(masked: MaskedResNeXt, full_state: dict[str, Tensor]) -> MaskedResNeXt:
    """Load a Fixed-Full (ResNeXt / torchvision) state dict into an unpruned masked ResNeXt.

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
    _load(masked, state)
    return masked


@torch.no_grad()
def load_prev_weights(masked: MaskedResNet, prev_state: dict[str, Tensor]) -> MaskedResNet:
    """Load a Fixed-Prev (standard ResNet, torchvision's for ImageNet) state dict into an unpruned masked
    ResNet: the same keys, the same tensors. With every block reading its predecessor it then computes
    the standard network. Masks are left untouched."""
    if not all(masked.alive):
        raise ValueError("load_prev_weights needs an unpruned masked model")
    own = masked.state_dict()
    unexpected = [k for k in prev_state if k not in own]
    if unexpected:
        raise KeyError(f"unexpected key in Fixed-Prev state dict: {unexpected[0]}")
    _load(masked, dict(prev_state))
    return masked


def _load(masked: nn.Module, state: dict[str, Tensor]) -> None:
    missing = [k for k in masked.state_dict() if k not in state and not k.startswith("masks.")]
    if missing:
        raise KeyError(f"baseline state dict lacks {missing[:5]}")
    masked.load_state_dict(state, strict=False)


def load_baseline_weights(masked: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """The family's baseline weights (Fixed-Full, Fixed-Prev) into its unpruned masked model."""
    load = {MaskedResNeXt: load_full_weights, MaskedResNet: load_prev_weights}[type(masked)]
    return load(masked, state)
