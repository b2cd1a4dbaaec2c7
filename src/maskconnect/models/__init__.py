"""The paper's model: ResNeXt with fixed (``full``) or masked (``random``, ``learned``) branch
connectivity (docs/design.md sections 1-3).

* :mod:`.resnext`: Fixed-Full, torchvision's ResNeXt weight for weight (:class:`ResNeXt`).
* :mod:`.masked`: the masked model, its identity share and initialisation (:class:`MaskedResNeXt`,
  :class:`MaskedBlock`).
* :mod:`.weights`: Fixed-Full weights into a masked model (:func:`load_full_weights`).
* :mod:`.pruning`: the compact model without the branches nothing reads (docs/design.md section 5):
  ``prune``, ``prune_report``, ``save_pruned``/``load_pruned``. It lives beside the masked model
  because it copies a :class:`MaskedBlock`'s weights branch by branch.
* :mod:`.counting`: what a model costs (FLOPs, bytes saved for the backward pass).

How the layers are computed fast or with less memory is ``maskconnect.kernels``' business.
"""

from __future__ import annotations

from torch import nn

from ..specs import ModelSpec, validate
from .masked import MaskedBlock, MaskedResNeXt
from .resnext import ResNeXt
from .weights import load_full_weights

__all__ = ["MaskedBlock", "MaskedResNeXt", "ResNeXt", "build_model", "load_full_weights"]


def build_model(spec: ModelSpec) -> nn.Module:
    """The model for a spec: :class:`ResNeXt` for ``full``, :class:`MaskedResNeXt` otherwise."""
    spec = validate(spec)
    return ResNeXt(spec) if spec.connectivity == "full" else MaskedResNeXt(spec)
