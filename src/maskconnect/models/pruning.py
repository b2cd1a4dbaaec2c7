"""Pruning: remove branches that no branch of the next module reads (docs/design.md section 5).

After the masks are frozen, a branch is dead when no *live* branch of the next module selects it (the
last module feeds the output node, so its branches all live). Dead branches are removed from the output
backwards, giving a compact :class:`MaskedResNeXt` whose modules have varying numbers of branches and
which computes the same function in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..connectivity import FixedMasks, count_mask_entries, count_weights, live_branches, mask_banks
from .masked import MaskedBlock, MaskedResNeXt


def _rows(live: Tensor, per: int) -> Tensor:
    """Channel indices of the live branches when each branch owns ``per`` consecutive channels."""
    idx = torch.nonzero(live).flatten()
    return (idx[:, None] * per + torch.arange(per)[None, :]).flatten()


@torch.no_grad()
def prune(model: MaskedResNeXt) -> MaskedResNeXt:
    """Return the compact model without dead branches (the input model is unchanged).

    The masks must be frozen (Fixed-Random always is; call ``freeze_masks`` for learned ones).
    """
    banks = mask_banks(model)
    if not isinstance(model, MaskedResNeXt) or not banks:
        raise ValueError("prune needs a masked model (connectivity 'random' or 'learned')")
    if any(b != model.spec.cardinality for b in model.branches):
        raise ValueError("model is already pruned")
    bank = banks[0]
    if not bank.frozen:
        raise ValueError("masks are not frozen: call maskconnect.connectivity.freeze_masks(model) first")
    masks = bank.binary.detach().cpu()
    live = live_branches(masks)
    compact_masks = [masks[i][live[i + 1]][:, live[i]] for i in range(masks.shape[0])]
    ref = next(model.parameters())
    device = ref.device
    compact = MaskedResNeXt(model.spec, branches=[int(l.sum()) for l in live], masks=FixedMasks(compact_masks))
    compact.to(device=device, dtype=ref.dtype)
    src_blocks, dst_blocks = model.blocks(), compact.blocks()
    for src, dst, alive in zip(src_blocks, dst_blocks, live):
        _copy_block(src, dst, alive.to(device))
    for name in ("conv1", "bn1", "fc"):
        getattr(compact, name).load_state_dict(getattr(model, name).state_dict())
    compact.train(model.training)
    return compact


def _copy_block(src: MaskedBlock, dst: MaskedBlock, alive: Tensor) -> None:
    bw, out_ch = src.branch_width, src.out_ch
    rows = _rows(alive, bw)
    for name in ("conv1", "conv2"):
        getattr(dst, name).weight.copy_(getattr(src, name).weight[rows])
    dst.conv3.weight.copy_(src.conv3.weight[_rows(alive, out_ch)])
    for name in ("bn1", "bn2"):
        s, d = getattr(src, name), getattr(dst, name)
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(d, t).copy_(getattr(s, t)[rows])
        d.num_batches_tracked.copy_(s.num_batches_tracked)
    dst.bn3.load_state_dict(src.bn3.state_dict())
    if src.downsample is not None:
        dst.downsample.load_state_dict(src.downsample.state_dict())


def prune_report(model: nn.Module) -> dict:
    """Parameters before ("train") and after ("test") pruning, and branch counts.

    For a learned model whose masks are not yet frozen nothing can be pruned: test equals train.
    """
    params_train = count_weights(model)
    banks = mask_banks(model)
    num_modules = model.spec.num_modules
    report = {
        "params_train": params_train,
        "params_test": params_train,
        "modules": num_modules,
        "branches_train": num_modules * model.spec.cardinality,
        "branches_test": num_modules * model.spec.cardinality,
        "branches_per_module": [model.spec.cardinality] * num_modules,
        "masks": count_mask_entries(model),
    }
    if banks and banks[0].frozen:
        compact = prune(model)
        report["params_test"] = count_weights(compact)
        report["branches_per_module"] = compact.branches
        report["branches_test"] = sum(compact.branches)
    return report


def save_pruned(path, compact: MaskedResNeXt) -> None:
    """Save a compact model as its spec, branch counts and state dict (loadable with :func:`load_pruned`)."""
    from ..io import atomic_torch_save

    atomic_torch_save(path, {"spec": compact.spec.to_dict(), "branches": compact.branches,
                             "mask_shapes": [list(m.shape) for m in compact.masks()],
                             "state_dict": compact.state_dict()})


def load_pruned(path, map_location="cpu") -> MaskedResNeXt:
    from ..specs import ModelSpec

    blob = torch.load(path, map_location=map_location, weights_only=True)
    spec = ModelSpec(**blob["spec"])
    masks = FixedMasks([torch.zeros(*s) for s in blob["mask_shapes"]])
    model = MaskedResNeXt(spec, branches=blob["branches"], masks=masks)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
