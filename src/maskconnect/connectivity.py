"""Connectivity: binary fan-in-K masks, their sampling, the straight-through rule, freezing, liveness.

A network of L modules with C branches each has L-1 masks (module 1 reads the stem). Mask i, of shape
(C, C), belongs to module i+2: row j lists which branches of module i+1 branch j reads, and has exactly
K ones. All masks of a network live in one tensor of shape (L-1, C, C) so that sampling, clipping and
freezing are single vectorised ops (no Python loop over modules or branches).

MaskConnect (ECCV 2018, section 3.3), as implemented here:

* each binary row m_j has a real-valued copy m~_j in [0, 1]^C (``MaskBank.real``);
* every training iteration, K *distinct* sources per row are drawn from the normalised m~_j
  (Gumbel-top-K = sampling without replacement), one draw per iteration shared by the batch;
* forward and backward use the binary mask; the gradient w.r.t. the binary mask is applied to m~
  unchanged (straight-through, as in BinaryConnect), so unselected entries get a gradient too;
* after each optimiser step m~ is brought back to its feasible set by the *mask rule*;
* at the end of the joint phase the masks are frozen to the top-K entries of each row; exact ties are
  broken by a seeded random draw (never by index) and counted.

The mask rule, which keeps m~ feasible around each step (clip, centred, projected), is
``maskconnect.mask_rules``' (docs/design.md section 8). This file: docs/design.md sections 2, 4 and 5.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

# Probabilities are floored so a row with fewer than K positive entries (all zero, say) still yields K
# distinct sources: the floored entries are drawn only when nothing else is left.
PROB_FLOOR = 1e-6


def sample_masks(real: Tensor, k: int, generator: torch.Generator | None = None, floor: float = PROB_FLOOR) -> Tensor:
    """Draw binary masks with exactly ``k`` distinct ones per row.

    Row j is sampled without replacement from ``real[..., j, :] / real[..., j, :].sum()`` with the
    Gumbel-top-K trick: the top-K of ``log p + Gumbel noise`` is a sample of K distinct items from p
    (successive sampling without replacement). Works on any leading shape and stays on the device
    (no host synchronisation).
    """
    logp = torch.log(real.detach().clamp(min=floor))
    u = torch.rand(real.shape, generator=generator, device=real.device, dtype=logp.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
    idx = torch.topk(logp + gumbel, k, dim=-1).indices
    return torch.zeros_like(logp).scatter_(-1, idx, 1.0)


def topk_masks(real: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Binary masks keeping the K largest entries of each row.

    Exact ties at the K-th place go to the lower index, or, with a (CPU) ``generator``, to a random
    draw: the row is visited in a random order and the sort is stable, so among equal values the
    first visited wins. Freezing uses the random form (index order would turn saturated rows into a
    structured wiring that nothing learned).
    """
    real = real.detach()
    if generator is None:
        idx = torch.sort(real, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        order = torch.rand(real.shape, generator=generator).argsort(-1).to(real.device)
        pos = torch.sort(real.gather(-1, order), dim=-1, descending=True, stable=True).indices[..., :k]
        idx = order.gather(-1, pos)
    return torch.zeros_like(real, dtype=torch.float32).scatter_(-1, idx, 1.0)


def tied_rows(real: Tensor, k: int) -> Tensor:
    """Which rows have their top-K set decided by an exact tie (K-th value == (K+1)-th value).

    A row with more than K entries at the upper bound is one of them; a row that converged to K
    entries near 1 and the rest near 0 is not."""
    if k >= real.shape[-1]:
        return torch.zeros(real.shape[:-1], dtype=torch.bool, device=real.device)
    top = real.detach().topk(k + 1, dim=-1).values
    return top[..., k - 1] == top[..., k]


def mask_stats(real: Tensor, k: int) -> dict[str, float | int]:
    """Per-epoch statistics of the real-valued masks (history.csv, MLflow, the report).

    ``mask_entropy``: mean entropy of the normalised rows (nats; ln C is uniform); ``mask_mean``;
    ``mask_at_0`` / ``mask_at_1``: fraction of entries exactly at each clip bound; ``mask_margin``:
    mean gap between the K-th and (K+1)-th largest value of a row; ``mask_ties``: rows whose top-K set
    is decided by exact ties. One host sync for all of them.
    """
    r = real.detach().float()
    c = r.shape[-1]
    if k < c:
        top = r.topk(k + 1, dim=-1).values
        gap = top[..., k - 1] - top[..., k]
    else:
        gap = torch.zeros(r.shape[:-1], device=r.device)
    vals = torch.stack([
        row_entropy(r).mean(), r.mean(), (r == 0).float().mean(), (r == 1).float().mean(),
        gap.mean(), (gap == 0).float().sum() if k < c else gap.sum(),
    ]).tolist()
    keys = ("mask_entropy", "mask_mean", "mask_at_0", "mask_at_1", "mask_margin")
    return {**dict(zip(keys, vals[:5])), "mask_ties": int(vals[5])}


def random_masks(num_masks: int, cardinality: int, k: int, seed: int) -> Tensor:
    """Fixed-Random connectivity: K sources per row drawn uniformly from ``seed`` (on the CPU, so the
    same seed gives the same masks on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    keys = torch.rand((num_masks, cardinality, cardinality), generator=g)
    return topk_masks(keys, k)


def straight_through(binary: Tensor, real: Tensor) -> Tensor:
    """Return ``binary`` in the forward pass; in the backward pass the gradient goes to ``real``.

    ``real - real.detach()`` is exactly zero in IEEE arithmetic, so the value is bit-for-bit ``binary``.
    """
    return binary + (real - real.detach())


def row_entropy(real: Tensor, floor: float = PROB_FLOOR) -> Tensor:
    """Entropy (nats) of each normalised real-valued row; log(C) is uniform, 0 is one source."""
    p = real.detach().clamp(min=floor)
    p = p / p.sum(-1, keepdim=True)
    return -(p * p.log()).sum(-1)


def live_branches(masks: Tensor) -> list[Tensor]:
    """Which branches survive pruning, per module (list of L bool tensors of shape (C_i,)).

    The last module feeds the output node, so all its branches live. Going backwards, a branch of
    module i lives if some *live* branch of module i+1 reads it.
    """
    masks = masks.detach().to("cpu")
    num = masks.shape[0] + 1
    live: list[Tensor] = [torch.ones(0, dtype=torch.bool)] * num
    live[-1] = torch.ones(masks.shape[1], dtype=torch.bool)
    for i in range(num - 2, -1, -1):
        live[i] = masks[i][live[i + 1]].sum(0) > 0
    return live


class MaskBank(nn.Module):
    """All masks of one masked network: ``kind`` is ``"random"`` (fixed) or ``"learned"``.

    Calling the bank returns the (L-1, C, C) masks to use for this forward pass:

    * learned, training, not frozen: a fresh sample, with the straight-through gradient to ``real``;
    * learned, eval, not frozen: the current top-K masks (evaluation always uses top-K masks);
    * frozen (learned after :meth:`freeze`, and random from the start): the fixed binary masks.
    """

    def __init__(self, num_masks: int, cardinality: int, fan_in: int, kind: str, *, seed: int = 0, init: float = 0.5):
        super().__init__()
        if kind not in ("random", "learned"):
            raise ValueError(f"MaskBank kind must be 'random' or 'learned', got {kind!r}")
        self.kind, self.cardinality, self.fan_in, self.seed = kind, cardinality, fan_in, int(seed)
        shape = (num_masks, cardinality, cardinality)
        if kind == "learned":
            self.real = nn.Parameter(torch.full(shape, float(init)))
            self.register_buffer("binary", torch.zeros(shape))
            self.frozen = False
        else:
            self.register_parameter("real", None)
            self.register_buffer("binary", random_masks(num_masks, cardinality, fan_in, seed))
            self.frozen = True
        self.last_sample: Tensor | None = None  # the most recent training draw (for statistics)
        self.tied_at_freeze: int | None = None  # rows whose top-K set an exact tie decided at freezing

    @property
    def num_masks(self) -> int:
        return self.binary.shape[0]

    def forward(self) -> Tensor:
        if self.frozen:
            return self.binary
        if self.training:
            sample = sample_masks(self.real, self.fan_in)
            self.last_sample = sample
            return straight_through(sample, self.real)
        return topk_masks(self.real, self.fan_in, generator=self.tie_generator())

    def tie_generator(self) -> torch.Generator:
        """The seeded draw that breaks exact ties at the K-th place: the same one for evaluation before
        freezing and for freezing, so both pick the same wiring (a fresh generator each call)."""
        return torch.Generator().manual_seed(self.seed + 0x5EED)

    @torch.no_grad()
    def freeze(self, generator: torch.Generator | None = None) -> int:
        """Fix the masks to the top-K entries of each real-valued row; no more sampling.

        Exact ties are broken by ``generator`` (a seeded CPU generator; default :meth:`tie_generator`,
        the bank's own seed). Returns, and remembers in ``tied_at_freeze``, how many rows a tie decided.
        """
        if self.real is not None and not self.frozen:
            gen = generator if generator is not None else self.tie_generator()
            self.binary.copy_(topk_masks(self.real, self.fan_in, generator=gen))
            self.real.requires_grad_(False)
            self.tied_at_freeze = int(tied_rows(self.real, self.fan_in).sum())
        self.frozen = True
        return self.tied_at_freeze or 0

    def current(self) -> Tensor:
        """The binary masks evaluation would use now (top-K if learned and not yet frozen)."""
        if self.frozen:
            return self.binary.detach().clone()
        return topk_masks(self.real, self.fan_in, generator=self.tie_generator())

    def entropy(self) -> float | None:
        if self.real is None:
            return None
        return float(row_entropy(self.real).mean())

    # The frozen flag is part of the state dict, so a checkpoint restores it.
    def get_extra_state(self):
        return {"frozen": self.frozen, "tied_at_freeze": self.tied_at_freeze}

    def set_extra_state(self, state) -> None:
        self.frozen = bool(state["frozen"])
        self.tied_at_freeze = state.get("tied_at_freeze")
        if self.frozen and self.real is not None:
            self.real.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, masks={self.num_masks}, C={self.cardinality}, K={self.fan_in}, frozen={self.frozen}"


class FixedMasks(nn.Module):
    """Binary masks of varying shapes (C_{i+1}, C_i), for pruned networks."""

    def __init__(self, masks: Sequence[Tensor]):
        super().__init__()
        self.n = len(masks)
        for i, m in enumerate(masks):
            self.register_buffer(f"mask{i}", m.detach().float().clone())
        self.frozen = True

    def forward(self) -> list[Tensor]:
        return [getattr(self, f"mask{i}") for i in range(self.n)]


# --- helpers a training loop uses ---------------------------------------------------------------

def mask_banks(model: nn.Module) -> list[MaskBank]:
    return [m for m in model.modules() if isinstance(m, MaskBank)]


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The real-valued masks (learned connectivity only). They are not weights."""
    return [b.real for b in mask_banks(model) if b.real is not None]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the real-valued masks."""
    masks = {id(p) for p in mask_parameters(model)}
    return [p for p in model.parameters() if id(p) not in masks]


def count_weights(model: nn.Module) -> int:
    """Number of weights (masks excluded), what the paper calls the parameter count."""
    return sum(p.numel() for p in weight_parameters(model))


def count_mask_entries(model: nn.Module) -> int:
    """Number of mask entries (binary and real-valued copies count once per entry)."""
    return sum(b.binary.numel() for b in mask_banks(model))


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    mask_lr: float | None = None,
    mask_weight_decay: float = 0.0,
) -> list[dict]:
    """Optimiser parameter groups: weights, and the real-valued masks in a group of their own
    (their own learning rate, default the weight LR, and no weight decay). The mask group carries
    ``"name": "masks"`` so schedulers and logs can find it."""
    groups = [{"params": weight_parameters(model), "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    masks = mask_parameters(model)
    if masks:
        groups.append({"params": masks, "lr": lr if mask_lr is None else mask_lr,
                       "weight_decay": mask_weight_decay, "name": "masks"})
    return groups


def freeze_masks(model: nn.Module, seed: int | None = None) -> int:
    """Freeze every learned mask to its top-K entries; returns the number of rows decided by ties.

    Exact ties are broken by a random draw, never by index: from ``seed`` when given, else from each
    bank's own seed (the spec's, which is the run's seed: then freezing picks the wiring that
    evaluation before freezing used)."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed) + 0x5EED)
    return sum(b.freeze(generator=gen) for b in mask_banks(model))


def masks_frozen(model: nn.Module) -> bool:
    return all(b.frozen for b in mask_banks(model))


def current_masks(model: nn.Module) -> Tensor | None:
    """The binary masks evaluation uses now, (L-1, C, C); None for a Fixed-Full model."""
    banks = mask_banks(model)
    return banks[0].current() if banks else None


def changed_rows(before: Tensor, after: Tensor) -> int:
    """How many mask rows select a different set of sources."""
    return int((before != after).any(-1).sum())
