"""Connectivity: binary fan-in-K masks, their sampling, the straight-through rule, freezing, liveness.

A mask row belongs to one reader (a branch of a ResNeXt module, a ResNet block) and has one entry per
*candidate* it may read; exactly K of them are 1 (fewer when the row has fewer candidates: it then reads
them all). All rows of a network live in one tensor, so that sampling, the mask rules and freezing are
single vectorised ops (no Python loop over modules or rows):

* ResNeXt with L modules of C branches: (L-1, C, C). Mask i belongs to module i+2: row j lists which
  branches of module i+1 branch j reads. Every entry is a candidate.
* ResNet with L blocks: (1, L-1, L-1). Row r belongs to block r+2 (1-based) and column c is block c+1:
  block j reads among blocks 1..j-1, so the candidates of a row are its lower triangle with the
  diagonal (``valid``, :func:`candidate_masks`), and rows have different numbers of candidates.

MaskConnect (ECCV 2018, section 3.3), as implemented here:

* each binary row m_j has a real-valued copy m~_j in [0, 1]^C (``MaskBank.real``; 0 outside ``valid``);
* every training iteration, K *distinct* sources per row are drawn from the normalised m~_j
  (Gumbel-top-K = sampling without replacement), one draw per iteration shared by the batch;
* forward and backward use the binary mask; the gradient w.r.t. the binary mask is applied to m~
  unchanged (straight-through, as in BinaryConnect), so unselected entries get a gradient too;
* after each optimiser step m~ is brought back to its feasible set by the *mask rule*;
* at the end of the joint phase the masks are frozen to the top-K entries of each row; exact ties are
  broken by a seeded random draw (never by index) and counted.

The mask rule, which keeps m~ feasible around each step (clip, centred, projected), is
``maskconnect.mask_rules``' (docs/design.md section 8). This file: docs/design.md sections 2, 4, 5 and 12.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .defaults import DEFAULT_MASK_INIT

# Probabilities are floored so a row with fewer than K positive entries (all zero, say) still yields K
# distinct sources. A floored entry is rarely drawn while enough positive entries remain: the Gumbel noise
# can exceed |log 1e-6| (measured: 15 draws of a zero-valued source in 2,000,000 converged K=2 rows).
PROB_FLOOR = 1e-6
# Offset of the tie-breaking draw's seed from the bank's seed: evaluation before freezing and freezing
# itself draw from the same generator (MaskBank.tie_generator), so they pick the same wiring.
TIE_SEED_OFFSET = 0x5EED


def candidate_masks(counts: Sequence[int], width: int | None = None) -> Tensor:
    """Which entries are candidates, per row: row r has its first ``counts[r]`` entries (a bool tensor of
    shape (len(counts), width)). A ResNet's rows read blocks 1..j-1: counts 1, 2, ..., L-1."""
    width = max(counts) if width is None else width
    return torch.arange(width)[None, :] < torch.as_tensor(list(counts))[:, None]


def _hide(x: Tensor, valid: Tensor | None, fill: float) -> Tensor:
    return x if valid is None else torch.where(valid, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _keep(masks: Tensor, valid: Tensor | None) -> Tensor:
    return masks if valid is None else masks * valid


def sample_masks(real: Tensor, k: int, generator: torch.Generator | None = None, floor: float = PROB_FLOOR,
                 valid: Tensor | None = None) -> Tensor:
    """Draw binary masks with exactly ``k`` distinct ones per row (all candidates of a row with fewer).

    Row j is sampled without replacement from ``real[..., j, :] / real[..., j, :].sum()`` over its
    candidates (``valid``; None: every entry) with the Gumbel-top-K trick: the top-K of
    ``log p + Gumbel noise`` is a sample of K distinct items from p (successive sampling without
    replacement). Works on any leading shape and stays on the device (no host synchronisation).
    """
    logp = _hide(torch.log(real.detach().clamp(min=floor)), valid, float("-inf"))
    u = torch.rand(real.shape, generator=generator, device=real.device, dtype=logp.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
    idx = torch.topk(logp + gumbel, k, dim=-1).indices
    return _keep(torch.zeros_like(logp).scatter_(-1, idx, 1.0), valid)


def topk_masks(real: Tensor, k: int, generator: torch.Generator | None = None, valid: Tensor | None = None) -> Tensor:
    """Binary masks keeping the K largest candidates of each row (all candidates of a row with fewer).

    Exact ties at the K-th place go to the lower index, or, with a (CPU) ``generator``, to a random
    draw: the row is visited in a random order and the sort is stable, so among equal values the
    first visited wins. Freezing uses the random form (index order would turn saturated rows into a
    structured wiring that nothing learned).
    """
    real = _hide(real.detach(), valid, float("-inf"))
    if generator is None:
        idx = torch.sort(real, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        order = torch.rand(real.shape, generator=generator).argsort(-1).to(real.device)
        pos = torch.sort(real.gather(-1, order), dim=-1, descending=True, stable=True).indices[..., :k]
        idx = order.gather(-1, pos)
    return _keep(torch.zeros_like(real, dtype=torch.float32).scatter_(-1, idx, 1.0), valid)


def free_rows(real: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Rows with a choice: more candidates than K (a row with at most K reads them all)."""
    if valid is None:
        return torch.full(real.shape[:-1], k < real.shape[-1], dtype=torch.bool, device=real.device)
    return (valid.sum(-1) > k).expand(real.shape[:-1])


def tied_rows(real: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Which rows have their top-K set decided by an exact tie (K-th value == (K+1)-th value among the
    candidates). A row with more than K entries at the upper bound is one of them; a row that converged to
    K entries near 1 and the rest near 0 is not, and neither is a row without a choice."""
    if k >= real.shape[-1]:
        return torch.zeros(real.shape[:-1], dtype=torch.bool, device=real.device)
    top = _hide(real.detach(), valid, float("-inf")).topk(k + 1, dim=-1).values
    return (top[..., k - 1] == top[..., k]) & free_rows(real, k, valid)


def mask_stats(real: Tensor, k: int, valid: Tensor | None = None) -> dict[str, float | int]:
    """Per-epoch statistics of the real-valued masks (history.csv, MLflow, the report), over the rows
    with a choice (:func:`free_rows`; all rows if none has) and their candidates.

    ``mask_entropy``: mean entropy of the normalised rows (nats; ln(candidates) is uniform);
    ``mask_mean``; ``mask_at_0`` / ``mask_at_1``: fraction of entries exactly at each clip bound;
    ``mask_margin``: mean gap between the K-th and (K+1)-th largest value of a row; ``mask_ties``: rows
    whose top-K set is decided by exact ties. One host sync for all of them.
    """
    r = real.detach().float()
    free = free_rows(r, k, valid)
    rows = free if k < r.shape[-1] else torch.ones_like(free)
    cand = (torch.ones_like(r, dtype=torch.bool) if valid is None else valid.expand(r.shape)) & rows[..., None]
    n_rows, n_cand = rows.sum().clamp(min=1), cand.sum().clamp(min=1)
    if k < r.shape[-1]:
        top = _hide(r, valid, float("-inf")).topk(k + 1, dim=-1).values
        gap = torch.where(free, top[..., k - 1] - top[..., k], torch.zeros((), device=r.device))
    else:
        gap = torch.zeros(r.shape[:-1], device=r.device)
    vals = torch.stack([
        (row_entropy(r, valid=valid) * rows).sum() / n_rows, (r * cand).sum() / n_cand,
        ((r == 0) & cand).sum() / n_cand, ((r == 1) & cand).sum() / n_cand,
        gap.sum() / n_rows, ((gap == 0) & free).sum().float(),
    ]).tolist()
    keys = ("mask_entropy", "mask_mean", "mask_at_0", "mask_at_1", "mask_margin")
    return {**dict(zip(keys, vals[:5])), "mask_ties": int(vals[5])}


def random_masks(num_masks: int, cardinality: int, k: int, seed: int, valid: Tensor | None = None) -> Tensor:
    """Fixed-Random connectivity: K sources per row drawn uniformly among its candidates from ``seed`` (on
    the CPU, so the same seed gives the same masks on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    keys = torch.rand((num_masks, cardinality, cardinality), generator=g)
    return topk_masks(keys, k, valid=valid)


def straight_through(binary: Tensor, real: Tensor) -> Tensor:
    """Return ``binary`` in the forward pass; in the backward pass the gradient goes to ``real``.

    ``real - real.detach()`` is exactly zero in IEEE arithmetic, so the value is bit-for-bit ``binary``.
    """
    return binary + (real - real.detach())


def row_entropy(real: Tensor, floor: float = PROB_FLOOR, valid: Tensor | None = None) -> Tensor:
    """Entropy (nats) of each normalised real-valued row over its candidates; log(candidates) is uniform,
    0 is one source."""
    p = _keep(real.detach().clamp(min=floor), valid)
    p = p / p.sum(-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(-1)


def live_branches(masks: Tensor) -> list[Tensor]:
    """ResNeXt: which branches survive pruning, per module (list of L bool tensors of shape (C_i,)).

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


def live_blocks(mask: Tensor) -> Tensor:
    """ResNet: which of the L blocks survive pruning (a bool tensor of shape (L,)), from a (L-1, L-1) mask
    whose row r is block r+1's (0-based) choice among blocks 0..r.

    The last block feeds the classifier, so it lives; going backwards, a block lives if some *live*
    later block reads it (a block read only by dead blocks is dead too)."""
    mask = mask.detach().to("cpu") > 0
    n = mask.shape[0] + 1
    live = torch.zeros(n, dtype=torch.bool)
    live[-1] = True
    for b in range(n - 2, -1, -1):
        live[b] = bool((mask[b:, b] & live[b + 1:]).any())
    return live


class MaskBank(nn.Module):
    """All masks of one masked network: ``kind`` is ``"random"`` (fixed) or ``"learned"``; shape
    (num_masks, cardinality, cardinality), with ``valid`` (cardinality x cardinality, bool) marking the
    candidates of each row (None: every entry; docs/design.md section 12 for the ResNet's).

    Calling the bank returns the masks to use for this forward pass:

    * learned, training, not frozen: a fresh sample, with the straight-through gradient to ``real``;
    * learned, eval, not frozen: the current top-K masks (evaluation always uses top-K masks);
    * frozen (learned after :meth:`freeze`, and random from the start): the fixed binary masks, in
      ``fixed`` (zeros in a learned bank until it is frozen: :meth:`current` gives the masks in use).
    """

    def __init__(self, num_masks: int, cardinality: int, fan_in: int, kind: str, *, seed: int = 0,
                 init: float = DEFAULT_MASK_INIT, valid: Tensor | None = None):
        super().__init__()
        if kind not in ("random", "learned"):
            raise ValueError(f"MaskBank kind must be 'random' or 'learned', got {kind!r}")
        self.kind, self.cardinality, self.fan_in, self.seed = kind, cardinality, fan_in, int(seed)
        shape = (num_masks, cardinality, cardinality)
        # the candidates are the architecture's, not state: rebuilt with the model, not saved
        self.register_buffer("valid", None if valid is None else valid.bool().clone(), persistent=False)
        if kind == "learned":
            self.real = nn.Parameter(_keep(torch.full(shape, float(init)), self.valid))
            self.register_buffer("fixed", torch.zeros(shape))  # filled by freeze()
            self.frozen = False
        else:
            self.register_parameter("real", None)
            self.register_buffer("fixed", random_masks(num_masks, cardinality, fan_in, seed, valid=self.valid))
            self.frozen = True
        self.last_sample: Tensor | None = None  # the most recent training draw (for statistics)
        self.tied_at_freeze: int | None = None  # rows whose top-K set an exact tie decided at freezing

    @property
    def num_masks(self) -> int:
        return self.fixed.shape[0]

    @property
    def rows(self) -> int:
        """Rows with a choice (more candidates than K): the rows learning decides."""
        return int(free_rows(self.fixed, self.fan_in, self.valid).sum())

    def forward(self) -> Tensor:
        if self.frozen:
            return self.fixed
        if self.training:
            sample = sample_masks(self.real, self.fan_in, valid=self.valid)
            self.last_sample = sample
            return straight_through(sample, self.real)
        return topk_masks(self.real, self.fan_in, generator=self.tie_generator(), valid=self.valid)

    def tie_generator(self, seed: int | None = None) -> torch.Generator:
        """The seeded draw that breaks exact ties at the K-th place (from ``seed``, default the bank's own):
        the same one for evaluation before freezing and for freezing, so both pick the same wiring (a
        fresh generator each call)."""
        return torch.Generator().manual_seed((self.seed if seed is None else int(seed)) + TIE_SEED_OFFSET)

    def stats(self) -> dict[str, float | int]:
        """:func:`mask_stats` of the real-valued masks (learned banks)."""
        return mask_stats(self.real, self.fan_in, self.valid)

    @torch.no_grad()
    def freeze(self, generator: torch.Generator | None = None) -> int:
        """Fix the masks to the top-K entries of each real-valued row; no more sampling.

        Exact ties are broken by ``generator`` (a seeded CPU generator; default :meth:`tie_generator`,
        the bank's own seed). Returns, and remembers in ``tied_at_freeze``, how many rows a tie decided.
        """
        if self.real is not None and not self.frozen:
            gen = generator if generator is not None else self.tie_generator()
            self.fixed.copy_(topk_masks(self.real, self.fan_in, generator=gen, valid=self.valid))
            self.real.requires_grad_(False)
            self.tied_at_freeze = int(tied_rows(self.real, self.fan_in, self.valid).sum())
        self.frozen = True
        return self.tied_at_freeze or 0

    def current(self) -> Tensor:
        """The binary masks evaluation would use now (top-K if learned and not yet frozen)."""
        if self.frozen:
            return self.fixed.detach().clone()
        return topk_masks(self.real, self.fan_in, generator=self.tie_generator(), valid=self.valid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "binary" in state_dict:  # checkpoints and pruned models written before the rename
            state_dict[prefix + "fixed"] = state_dict.pop(prefix + "binary")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    """Number of mask entries, candidates only (binary and real-valued copies count once per entry)."""
    return sum(b.fixed.numel() if b.valid is None else int(b.valid.sum()) * b.num_masks for b in mask_banks(model))


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
    return sum(b.freeze(generator=None if seed is None else b.tie_generator(seed)) for b in mask_banks(model))


def masks_frozen(model: nn.Module) -> bool:
    return all(b.frozen for b in mask_banks(model))


def current_masks(model: nn.Module) -> Tensor | None:
    """The binary masks evaluation uses now, (L-1, C, C); None for a Fixed-Full model."""
    banks = mask_banks(model)
    return banks[0].current() if banks else None


def changed_rows(before: Tensor, after: Tensor) -> int:
    """How many mask rows select a different set of sources."""
    return int((before != after).any(-1).sum())
