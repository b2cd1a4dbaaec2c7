"""Fixed-Full weights in a masked model (docs/design.md section 3, "The shared last BN")."""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import MaskedResNeXt


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
