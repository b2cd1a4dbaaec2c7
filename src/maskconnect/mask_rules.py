"""The mask update rules: how the real-valued masks m~ are kept feasible around each optimiser step
(``--mask-rule``; docs/design.md sections 4 and 8, measurements in docs/mask_rules.md).

The paper normalises a real-valued row to sum to one to sample from it, and clips m~ to [0, 1]; it does
not say whether the normalisation is written back to m~. The rules are the readings we measured
(bench/masks.py, bench/results/masks-*.md):

| rule | before the step | after the step |
|---|---|---|
| ``clip`` (literal) | - | clip to [0, 1] (:func:`clip_`) |
| ``centred`` | subtract each row's mean from its gradient (:func:`centre_rows_`) | clip to [0, 1] |
| ``projected`` (**default**) | - | Euclidean projection onto {m in [0,1]^C : sum m = K} (:func:`project_capped_simplex`) |

Each acts on a row's candidates only (``MaskBank.valid``: a ResNet block's earlier blocks); the entries
outside them stay 0.

* ``clip``: sample from the normalised row, keep m~ unnormalised, clip it after each step. The
  straight-through gradient has a large component of the same sign across a row, so whole rows drift
  together to a clip bound; a row at 1.0 samples uniformly and freezes by ties. Kept so that the
  comparison can always be rerun.
* ``centred``: the step no longer moves a row's sum (until entries hit a bound), so the common mode
  cannot saturate a row; the sum stays at its initial value (C/2 for the default init), so a converged
  row can hold more than K ones.
* ``projected``: the paper's normalisation written back, scaled to K (so entries read as approximate
  inclusion probabilities: exact at K-hot and uniform rows), with the clip to [0, 1] kept. The set is
  the convex hull of the fan-in-K binary masks (the set the sampled masks live in); the projection
  removes the gradient's common mode, and its vertices are exactly the K-hot rows, so a converged row
  is a fan-in-K mask and cannot saturate (at most K entries fit at 1) or tie at the K-th place against
  a zero.

A rule acts on unfrozen learned banks only and never synchronises with the host. The masks themselves
(banks, sampling, freezing) are ``maskconnect.connectivity``'s.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .connectivity import MaskBank
from .defaults import DEFAULT_MASK_RULE, MASK_RULE_NAMES


def clip_(real: Tensor) -> Tensor:
    """Clip real-valued masks to [0, 1] in place: the one clip of the code."""
    return real.clamp_(0.0, 1.0)


def centre_rows_(grad: Tensor, valid: Tensor | None = None) -> Tensor:
    """Subtract each row's mean over its candidates from a mask gradient in place (the ``centred`` rule);
    entries outside ``valid`` stay 0."""
    if valid is None:
        return grad.sub_(grad.mean(-1, keepdim=True))
    mean = (grad * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return grad.sub_(mean).mul_(valid)


def project_capped_simplex(v: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Euclidean projection of each row of ``v`` onto {m in [0, 1]^C : sum(m) = k}, over the row's
    candidates (``valid``; 0 elsewhere). A row with at most k candidates projects to all of them at 1.

    The projection is clip(v - tau, 0, 1) with the row's tau chosen so the row sums to k. That sum,
    f(tau), is piecewise linear and non-increasing, with its kinks at v_i - 1 and v_i; it is evaluated at
    all 2C kinks at once (sorted), the segment where it crosses k is found, and tau is solved on it
    exactly: about twenty vectorised ops, no iteration and no host sync (O(C^2) work per row; C is at
    most 64 for the paper's models). Written by hand: torch has no projection onto a capped simplex.
    """
    c = v.shape[-1]
    if valid is None and k >= c:
        return torch.ones_like(v)
    if valid is not None:  # non-candidates sit 2 below every candidate: they clip to 0 for any tau that matters
        low = torch.where(valid, v, torch.full((), float("inf"), dtype=v.dtype, device=v.device)).amin(-1, keepdim=True)
        v = torch.where(valid, v, low - 2)
    kinks = torch.cat([v - 1, v], -1).sort(-1).values                       # (..., 2C), ascending
    f = (v.unsqueeze(-2) - kinks.unsqueeze(-1)).clamp(0.0, 1.0).sum(-1)      # f at each kink, non-increasing
    j = ((f >= k).sum(-1, keepdim=True) - 1).clamp(0, 2 * c - 2)            # the last kink with f >= k
    t0, t1 = kinks.gather(-1, j), kinks.gather(-1, j + 1)
    f0, f1 = f.gather(-1, j), f.gather(-1, j + 1)
    tau = torch.where(f0 > f1, t0 + (f0 - k) * (t1 - t0) / (f0 - f1).clamp(min=1e-30), t0)
    out = (v - tau).clamp(0.0, 1.0)
    if valid is not None:
        out = torch.where(valid.sum(-1, keepdim=True) <= k, valid.to(out.dtype), out * valid)
    return out


class MaskRule:
    """How the real-valued masks are updated around the optimiser step (see the module docstring).

    ``before_step`` edits the mask gradient (after backward, after any DDP all-reduce), and
    ``after_step`` puts the masks back into their feasible set. Both act on unfrozen banks only and
    never synchronise with the host.
    """

    def __init__(self, name: str, centre_gradient: bool, project: bool, summary: str):
        self.name, self.centre_gradient, self.project, self.summary = name, centre_gradient, project, summary

    @torch.no_grad()
    def before_step(self, banks: Sequence[MaskBank]) -> None:
        if self.centre_gradient:
            for b in _learning(banks):
                g = b.real.grad
                if g is not None:
                    centre_rows_(g, b.valid)

    @torch.no_grad()
    def after_step(self, banks: Sequence[MaskBank]) -> None:
        for b in _learning(banks):
            if self.project:
                b.real.copy_(project_capped_simplex(b.real, b.fan_in, b.valid))
            else:
                clip_(b.real)

    def __repr__(self) -> str:
        return f"MaskRule({self.name!r})"


def _learning(banks: Sequence[MaskBank]) -> list[MaskBank]:
    return [b for b in banks if b.real is not None and not b.frozen]


MASK_RULES: dict[str, MaskRule] = {
    "clip": MaskRule("clip", False, False, "the literal reading: sample from the normalised row, clip m~ to [0, 1]"),
    "centred": MaskRule("centred", True, False, "subtract the row mean from the mask gradient, then clip to [0, 1]"),
    "projected": MaskRule("projected", False, True,
                          "project each row onto {m in [0,1]^C : sum m = K}, the hull of the fan-in-K masks"),
}
# the names and the default (decided by measurement: docs/mask_rules.md) are maskconnect.defaults'
assert tuple(MASK_RULES) == MASK_RULE_NAMES and DEFAULT_MASK_RULE in MASK_RULES


def mask_rule(name: str) -> MaskRule:
    from .errors import ConfigError

    if name not in MASK_RULES:
        raise ConfigError("mask_rule", name, f"one of {', '.join(MASK_RULES)}")
    return MASK_RULES[name]
