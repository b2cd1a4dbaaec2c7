"""``maskconnect describe``'s numbers for a spec: parameters before/after pruning, FLOPs, modules and branches."""

from __future__ import annotations

import torch

from .models import build_model
from .models.counting import count_flops
from .models.pruning import prune, prune_report
from .specs import ModelSpec, validate


def describe(spec: ModelSpec) -> dict:
    """Everything ``maskconnect describe`` prints, as a dict.

    ``params_*`` count weights only; ``masks`` counts mask entries separately. For ``random`` the
    seed's masks are pruned; for ``learned`` before training nothing is frozen yet, so
    ``params_test == params_train``.
    """
    spec = validate(spec)
    torch.manual_seed(0)  # initial weights do not matter here; keep the call reproducible
    model = build_model(spec).eval()
    report = prune_report(model)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    flops = count_flops(model, shape)
    banks_frozen = spec.connectivity == "random"
    flops_test = count_flops(prune(model), shape) if banks_frozen else flops
    return {
        "dataset": spec.dataset,
        "family": spec.family,
        "arch": spec.arch,
        "depth": spec.depth,
        "width": spec.width,
        "cardinality": spec.cardinality,
        "connectivity": spec.connectivity,
        "fan_in": spec.fan_in,
        "seed": spec.seed,
        "num_classes": spec.num_classes,
        "stage_widths": spec.stage_widths(),
        "modules_per_stage": list(spec.stages),
        **report,
        "flops": flops,
        "flops_test": flops_test,
    }
