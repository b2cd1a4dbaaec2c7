"""What a model costs, measured on the model itself: forward FLOPs (``torch.utils.flop_counter``) and the
bytes autograd keeps for the backward pass. Any ``nn.Module``; parameters are counted in
``maskconnect.connectivity`` (``count_weights``: weights only, masks apart)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
