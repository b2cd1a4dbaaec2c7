"""The paper's models, by family (docs/design.md sections 1-3 and 12), in one registry (:data:`MODELS`).

* :mod:`.resnext`: Fixed-Full, torchvision's ResNeXt weight for weight (:class:`ResNeXt`).
* :mod:`.masked`: the masked ResNeXt, its identity share and initialisation (:class:`MaskedResNeXt`,
  :class:`MaskedBlock`).
* :mod:`.resnet`: the ResNets of the ECCV extension: Fixed-Prev, the standard ResNet (:class:`ResNet`,
  torchvision's for ImageNet), and the masked ResNet whose blocks read K earlier blocks
  (:class:`MaskedResNet`).
* :mod:`.weights`: baseline weights into a masked model (:func:`load_baseline_weights`).
* :mod:`.pruning`: the compact model without what nothing reads (docs/design.md section 5):
  ``prune``, ``prune_report``, ``save_pruned``/``load_pruned``.
* :mod:`.counting`: what a model costs (FLOPs, bytes saved for the backward pass).

How the layers are computed fast or with less memory is ``maskconnect.kernels``' business.
"""

from __future__ import annotations

from torch import nn

from ..specs import ModelSpec, validate
from .masked import MaskedBlock, MaskedResNeXt
from .resnet import MaskedResNet, ResNet
from .resnext import ResNeXt
from .weights import load_baseline_weights, load_full_weights

# family -> (the baseline network, the masked network): what ``build_model`` builds for a spec
MODELS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "resnext": (ResNeXt, MaskedResNeXt),
    "resnet": (ResNet, MaskedResNet),
}

__all__ = ["MODELS", "MaskedBlock", "MaskedResNeXt", "MaskedResNet", "ResNeXt", "ResNet", "build_model",
           "load_baseline_weights", "load_full_weights"]


def build_model(spec: ModelSpec) -> nn.Module:
    """The model for a spec: the family's baseline network (``full``, ``prev``) or its masked one."""
    spec = validate(spec)
    baseline, masked = MODELS[spec.family]
    return masked(spec) if spec.masked else baseline(spec)
