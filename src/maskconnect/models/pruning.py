"""Pruning: remove what nothing reads (docs/design.md sections 5 and 12), giving a compact model that
computes the same function in eval mode.

* ResNeXt: after the masks are frozen, a branch is dead when no *live* branch of the next module selects
  it (the last module feeds the output node, so its branches all live). Dead branches are removed from
  the output backwards: a :class:`MaskedResNeXt` whose modules have varying numbers of branches.
* ResNet: a block is dead when no live later block reads it (the last block feeds the classifier), a
  :class:`MaskedResNet` without those blocks.

Each masked model's *structure* says what it kept: branches per module (ResNeXt), or whether each
block is kept (ResNet); ``branch_counts`` gives both as counts per module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..connectivity import FixedMasks, count_mask_entries, count_weights, live_blocks, live_branches, mask_banks
from .masked import MaskedBlock, MaskedResNeXt
from .resnet import MaskedResNet


def _rows(live: Tensor, per: int) -> Tensor:
    """Channel indices of the live branches when each branch owns ``per`` consecutive channels."""
    idx = torch.nonzero(live).flatten()
    return (idx[:, None] * per + torch.arange(per)[None, :]).flatten()


def _frozen_masks(model: nn.Module) -> Tensor:
    banks = mask_banks(model)
    if not isinstance(model, (MaskedResNeXt, MaskedResNet)) or not banks:
        raise ValueError("prune needs an unpruned masked model (connectivity 'random' or 'learned')")
    if not banks[0].frozen:
        raise ValueError("masks are not frozen: call maskconnect.connectivity.freeze_masks(model) first")
    return banks[0].fixed.detach().cpu()


def structure(model: nn.Module) -> list:
    """What a masked model kept: branches per module (ResNeXt) or, per block, whether it is kept (ResNet)."""
    return list(model.branches) if isinstance(model, MaskedResNeXt) else list(model.alive)


def live_parts(model: nn.Module) -> list:
    """What would survive pruning of an unpruned masked model with frozen masks: per module the live
    branches (ResNeXt: lists of bools), or per block whether it lives (ResNet: bools)."""
    masks = _frozen_masks(model)
    if isinstance(model, MaskedResNet):
        return live_blocks(masks[0]).tolist()
    return [lv.tolist() for lv in live_branches(masks)]


def branch_counts(model: nn.Module) -> list[int]:
    """Branches per module: a ResNeXt module's, or 1 for a kept ResNet block and 0 for a removed one."""
    return [int(b) for b in structure(model)]


@torch.no_grad()
def prune(model: nn.Module) -> nn.Module:
    """Return the compact model without dead branches or blocks (the input model is unchanged).

    The masks must be frozen (Fixed-Random always is; call ``freeze_masks`` for learned ones).
    """
    masks = _frozen_masks(model)
    if any(b == 0 or b != model.spec.cardinality for b in branch_counts(model)):
        raise ValueError("model is already pruned")
    ref = next(model.parameters())
    compact = _PRUNE[type(model)](model, masks)
    compact.to(device=ref.device, dtype=ref.dtype)
    if isinstance(compact, MaskedResNet):
        own = compact.state_dict()
        compact.load_state_dict({k: v for k, v in model.state_dict().items() if k in own and not k.startswith("masks.")},
                                strict=False)
    compact.train(model.training)
    return compact


def _prune_resnext(model: MaskedResNeXt, masks: Tensor) -> MaskedResNeXt:
    live = live_branches(masks)
    compact_masks = [masks[i][live[i + 1]][:, live[i]] for i in range(masks.shape[0])]
    compact = MaskedResNeXt(model.spec, branches=[int(l.sum()) for l in live], masks=FixedMasks(compact_masks))
    device = next(model.parameters()).device
    compact.to(device)
    for src, dst, alive in zip(model.blocks(), compact.blocks(), live):
        _copy_block(src, dst, alive.to(device))
    for name in ("conv1", "bn1", "fc"):
        getattr(compact, name).load_state_dict(getattr(model, name).state_dict())
    return compact


def _prune_resnet(model: MaskedResNet, masks: Tensor) -> MaskedResNet:
    live = live_blocks(masks[0])
    kept = torch.nonzero(live).flatten()
    rows, cols = kept[1:] - 1, kept[:-1]   # row j-1 is block j's; column k is block k
    compact_mask = masks[0][rows][:, cols]
    return MaskedResNet(model.spec, alive=live.tolist(), masks=FixedMasks([compact_mask]))


_PRUNE = {MaskedResNeXt: _prune_resnext, MaskedResNet: _prune_resnet}


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


def prune_report(model: nn.Module, compact: nn.Module | None = None) -> dict:
    """Parameters before ("train") and after ("test") pruning, and branch counts (a ResNet block counts as
    one branch). ``compact``: the pruned model, when the caller has it (else pruned here if the masks are
    frozen). For a learned model whose masks are not yet frozen nothing can be pruned: test equals train.
    """
    params_train = count_weights(model)
    spec = model.spec
    full = [spec.cardinality] * spec.num_modules
    report = {
        "params_train": params_train, "params_test": params_train, "modules": spec.num_modules,
        "branches_train": sum(full), "branches_test": sum(full), "branches_per_module": full,
        "masks": count_mask_entries(model),
    }
    banks = mask_banks(model)
    if compact is None and banks and banks[0].frozen:
        compact = prune(model)
    if compact is not None:
        report["params_test"] = count_weights(compact)
        report["branches_per_module"] = branch_counts(compact)
        report["branches_test"] = sum(report["branches_per_module"])
    return report


def save_pruned(path, compact: nn.Module) -> None:
    """Save a compact model as its spec, structure and state dict (loadable with :func:`load_pruned`)."""
    from ..io import atomic_torch_save

    atomic_torch_save(path, {"spec": compact.spec.to_dict(), "structure": structure(compact),
                             "mask_shapes": [list(m.shape) for m in compact.masks()],
                             "state_dict": compact.state_dict()})


def load_pruned(path, map_location="cpu") -> nn.Module:
    from ..specs import ModelSpec
    from . import MODELS

    blob = torch.load(path, map_location=map_location, weights_only=True)
    spec = ModelSpec(**blob["spec"])
    masks = FixedMasks([torch.zeros(*s) for s in blob["mask_shapes"]])
    structure_ = blob["structure"] if "structure" in blob else blob["branches"]   # "branches": files before ResNets
    model = MODELS[spec.family][1](spec, structure_, masks=masks)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
