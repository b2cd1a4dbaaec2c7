"""The training schedule, in one place: the recipes, the LR and its drops, and the MaskConnect phases
(docs/design.md sections 4 and 6).

A learned run has two phases. In the *joint* phase the weights and the real-valued masks are learned
together (one mask draw per step). It ends after ``freeze_epoch`` epochs, by default where the LR
first drops plus the recipe's ``settle_epochs`` (the demo's 1, the others 0): every mask row is then
frozen to its top-K entries and the weights are *fine-tuned* with the wiring fixed for the remaining
epochs. Fixed-Full and Fixed-Random runs have one phase, *fixed*.
The LR is the recipe's for the recipe's batch, scaled linearly with the global batch, and divided by
``gamma`` (10) at each milestone; the real-valued masks follow the same drops from ``mask_lr``
(default: the recipe's; None, i.e. the weight LR, except the demo's 2.0).

Torch-free at import (the grid loader resolves configs with it); :func:`build_optimizer` imports torch.
"""

from __future__ import annotations

# Milestones are fractions of the run's epochs (the paper's 150/225 of 300 are 0.5/0.75), so a
# shortened run keeps the shape of the schedule; ``--milestones`` sets absolute epochs instead.
# ``mask_rule`` is how the real-valued masks are updated (mask_rules.MASK_RULES). Every recipe uses
# ``projected``, chosen by measurement (docs/mask_rules.md); ``--mask-rule clip`` reruns the literal reading.
# ``mask_lr`` (default None: the weight LR) and ``settle_epochs`` (default 0: the masks are frozen where
# the LR first drops; n: n joint epochs later, at the lower LR) are the mask schedule.
RECIPES: dict[str, dict] = {
    # CIFAR: the paper's protocol (docs/design.md section 6).
    "paper": dict(epochs=300, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected"),
    # ImageNet: the ResNeXt recipe (fb.resnet.torch): batch 256, LR 0.1 divided by 10 three times.
    # The paper gives no epoch count; we use 100 with drops at 30/60/90 (our choice).
    "paper-imagenet": dict(epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, milestone_fracs=[0.3, 0.6, 0.9], mask_rule="projected"),
    # The default recipe and the demo grid's (digits, 2-core CPU, a few seconds an epoch): 18 epochs, a
    # mask LR of 2.0, masks frozen one epoch after the first drop (after epoch 10). docs/design.md
    # section 9 gives why, with the measurements.
    "demo": dict(epochs=18, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected",
                 mask_lr=2.0, settle_epochs=1),
    # Tests and CI smoke runs.
    "smoke": dict(epochs=2, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected"),
}

JOINT, FINETUNE, FIXED = "joint", "finetune", "fixed"   # history.csv's phases


def recipe_milestones(recipe: str, epochs: int) -> list[int]:
    """The LR drops of ``recipe`` for a run of ``epochs``: its fractions of the run, rounded (Python
    rounds halves to even: 0.75 x 18 = 13.5 -> 14), the drops at or after the last epoch left out."""
    drops = {max(1, round(f * epochs)) for f in RECIPES[recipe]["milestone_fracs"]}
    return sorted(m for m in drops if m < epochs)


def recipe_value(recipe: str, name: str):
    """A recipe's setting, with the mask schedule's defaults (``mask_lr`` None, ``settle_epochs`` 0)."""
    return RECIPES[recipe].get(name, {"mask_lr": None, "settle_epochs": 0}.get(name))


def default_freeze_epoch(milestones: list[int], epochs: int, settle_epochs: int = 0) -> int:
    """The joint phase ends ``settle_epochs`` after the LR first drops (the whole run when it never drops)."""
    return min(milestones[0] + settle_epochs, epochs) if milestones else epochs


def joint_phase_over(epoch: int, freeze_epoch: int) -> bool:
    """Whether the masks are to be frozen before epoch ``epoch`` (0-based) runs."""
    return epoch >= freeze_epoch


def phase(learned: bool, frozen: bool) -> str:
    return FIXED if not learned else (FINETUNE if frozen else JOINT)


def scaled_lr(lr: float, batch_size: int, world: int, lr_reference_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr`` is meant for ``lr_reference_batch`` images."""
    return lr * batch_size * world / lr_reference_batch


def build_optimizer(cfg, model, world: int):
    """SGD over the weights and (learned) the real-valued masks in their own group (``mask_lr``,
    ``mask_momentum``, no weight decay), and the step schedule: divided by ``gamma`` at each milestone."""
    import torch

    from ..connectivity import param_groups

    lr = scaled_lr(cfg.lr, cfg.batch_size, world, cfg.lr_reference_batch)
    groups = param_groups(model, lr=lr, weight_decay=cfg.weight_decay, mask_lr=cfg.mask_lr)
    for g in groups:
        if g["name"] == "masks":
            g["momentum"] = cfg.mask_momentum
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
