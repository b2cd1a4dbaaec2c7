"""Model accounting: parameters before/after pruning, FLOPs, bytes kept for the backward pass, modules and branches."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import build_model
from .pruning import prune, prune_report
from .specs import ModelSpec, validate


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs per image (FLOPs = 2 x MACs), counted by ``torch.utils.flop_counter``.

    The model is copied to the meta device, so nothing is computed: counting a ResNeXt-101 is instant.
    Eval mode: learned masks are their top-K, as at test time.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    x = torch.empty((1, *input_shape), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops())


def saved_bytes(model: nn.Module, x: torch.Tensor) -> dict:
    """Bytes of the distinct storages autograd saves in one forward pass of ``model`` on ``x``
    (training mode, grad enabled): ``activations`` (not parameters), ``parameters`` (parameter storages
    that were saved) and ``total``. Also ``tensors``: how many distinct storages."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    keep = []  # hold every saved tensor, so no storage is freed and its address reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    act = sum(n for p, n in seen.items() if p not in params)
    par = sum(n for p, n in seen.items() if p in params)
    del out, keep
    return {"activations": act, "parameters": par, "total": act + par, "tensors": len(seen)}


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
