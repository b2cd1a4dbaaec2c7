"""The training schedule, in one place: the recipes, the LR and its drops, and the MaskConnect phases
(docs/design.md sections 4 and 6).

A learned run has two phases. In the *joint* phase the weights and the real-valued masks are learned
together (one mask draw per step). It ends after ``freeze_epoch`` epochs, by default where the LR
first drops plus the recipe's ``settle_epochs``: every mask row is then
frozen to its top-K entries and the weights are *fine-tuned* with the wiring fixed for the remaining
epochs. Fixed-Full and Fixed-Random runs have one phase, *fixed*.
The LR is the recipe's for the recipe's batch, scaled linearly with the global batch, and divided by
``gamma`` (10) at each milestone; the real-valued masks follow the same drops from ``mask_lr``
(default: the recipe's; null there means the weight LR). The recipes' values: ``maskconnect/recipes.yaml``.

Torch-free at import (the grid loader resolves configs with it); :func:`build_optimizer` imports torch.
"""

from __future__ import annotations

from pathlib import Path

# The recipes' values live in one file, maskconnect/recipes.yaml (package data), so that DVC can read them
# as params of the stages that use them; this module loads it. Each recipe sets every key of RECIPE_KEYS
# (the file's header says what each means).
RECIPES_PATH = Path(__file__).parents[1] / "recipes.yaml"
RECIPE_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "milestone_fracs", "mask_rule", "mask_lr",
               "settle_epochs")


def load_recipes(path: Path = RECIPES_PATH) -> dict[str, dict]:
    """The recipes of ``path``: name -> {key: value}, every key of RECIPE_KEYS present and no other."""
    import yaml

    from ..errors import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("recipes", str(path), f"a readable YAML file of recipes ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError("recipes", str(path), "a YAML mapping of recipe names to their settings")
    for name, recipe in data.items():
        keys = set(recipe) if isinstance(recipe, dict) else set()
        if keys != set(RECIPE_KEYS):
            raise ConfigError(f"recipes.{name}", recipe, f"every key of {', '.join(RECIPE_KEYS)} and no other "
                                                         f"(missing: {sorted(set(RECIPE_KEYS) - keys) or 'none'}; "
                                                         f"unknown: {sorted(keys - set(RECIPE_KEYS)) or 'none'}) in {path}")
        # the other keys are checked where a run resolves them (TrainConfig.resolved); these two only here
        fracs, settle = recipe["milestone_fracs"], recipe["settle_epochs"]
        if not (isinstance(fracs, list) and all(_number(f) and 0 < f < 1 for f in fracs)):
            raise ConfigError(f"recipes.{name}.milestone_fracs", fracs, f"a list of fractions of the run in (0, 1) ({path})")
        if not (isinstance(settle, int) and not isinstance(settle, bool) and settle >= 0):
            raise ConfigError(f"recipes.{name}.settle_epochs", settle, f"an integer >= 0 ({path})")
    return data


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


RECIPES: dict[str, dict] = load_recipes()

JOINT, FINETUNE, FIXED = "joint", "finetune", "fixed"   # history.csv's phases


def milestones_of(fracs: list[float], epochs: int) -> list[int]:
    """The LR drops at ``fracs`` of a run of ``epochs``, rounded (Python rounds halves to even:
    0.75 x 18 = 13.5 -> 14), the drops at or after the last epoch left out."""
    drops = {max(1, round(f * epochs)) for f in fracs}
    return sorted(m for m in drops if m < epochs)


def recipe_milestones(recipe: str, epochs: int) -> list[int]:
    """The LR drops of ``recipe`` for a run of ``epochs`` (:func:`milestones_of` its fractions)."""
    return milestones_of(RECIPES[recipe]["milestone_fracs"], epochs)


def recipe_value(recipe: str, name: str):
    """A recipe's setting (recipes.yaml)."""
    return RECIPES[recipe][name]


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
