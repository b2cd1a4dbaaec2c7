"""A training run's configuration: :class:`TrainConfig`, its recipe defaults (the schedule's rules
live in :mod:`.schedule`) and every check of its fields (``TrainConfig.resolved``), and the command
line's way to build one (:func:`config_from_args`).

Torch-free: the grid loader (imported by the Snakefile and ``maskconnect grid check``) validates a
grid's ``train:`` overrides with these same rules before any job starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from ..errors import ConfigError
from ..defaults import DEFAULT_MASK_INIT, DEFAULT_RECIPE, MASK_RULE_NAMES
from ..io import name_problem
from ..specs import ModelSpec, canonical_arch, make_spec
from .schedule import RECIPES, default_freeze_epoch, milestones_of, recipe_value

# Fields that do not change what a run computes: they may differ when a run is resumed.
NON_IDENTITY = {"out", "data_dir", "device", "workers", "experiment", "tracking_uri", "track", "compile", "progress"}
# Fields that only a learned run reads (the real-valued masks and their schedule). On a full or random
# run they do nothing, so they are ignored there and are not part of the run's identity: a Fixed-Full
# run is the same run with or without --mask-rule clip (a grid's defaults may set mask_lr for every
# entry, Fixed-Full ones included).
LEARNED_ONLY = ("mask_lr", "mask_momentum", "mask_init", "mask_rule", "freeze_epoch")


@dataclass
class TrainConfig:
    dataset: str
    arch: str
    connectivity: str | None = None        # default: the family's own wiring (full for a ResNeXt, prev for a ResNet)
    fan_in: int | None = None
    seed: int = 0
    out: str = "results/runs/manual"
    recipe: str = DEFAULT_RECIPE
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    lr_reference_batch: int | None = None   # lr is for this global batch; scaled linearly otherwise
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool = False
    milestones: list[int] | None = None
    gamma: float = 0.1
    label_smoothing: float = 0.0
    mask_lr: float | None = None            # default: the recipe's (None: the weight LR and its schedule)
    mask_momentum: float = 0.0
    mask_init: float = DEFAULT_MASK_INIT
    mask_rule: str | None = None            # how the real-valued masks are updated (mask_rules.MASK_RULES); default: the recipe's
    freeze_epoch: int | None = None         # default: the first LR drop (+ the recipe's settle_epochs)
    stage_width: int | None = None
    augment: bool = True
    amp: bool | None = None                 # bf16 autocast; None: the device's default (CUDA on, CPU off)
    channels_last: bool | None = None       # channels_last tensors; None: the device's default (CUDA on, CPU off)
    compile: bool = False
    data_dir: str | None = None
    device: str = "auto"
    workers: int = 4
    synthetic: dict = field(default_factory=dict)
    experiment: str | None = None
    tracking_uri: str | None = None
    track: bool = True
    progress: str = "auto"                  # auto (bar on a terminal), bar, lines, none

    def resolved(self) -> "TrainConfig":
        """Fill recipe defaults and check every field; returns a new config."""
        return self._resolve(lambda key, _field: recipe_value(self.recipe, key))

    def recipe_keys(self) -> list[str]:
        """The keys of its recipe (recipes.yaml) that decide this run: those its resolution reads into a
        field of its :meth:`identity` (a learned-only key is no key of a Fixed-Full run; a key the run
        overrides is none either). What a DVC training stage declares as params."""
        read: list[tuple[str, str]] = []

        def recording(key: str, fld: str):
            read.append((key, fld))
            return recipe_value(self.recipe, key)

        identity = self._resolve(recording).identity()
        return sorted({key for key, fld in read if fld in identity})

    def _resolve(self, recipe: Callable[[str, str], object]) -> TrainConfig:
        """:meth:`resolved`, reading recipe values through ``recipe(key, field)``: the recipe's ``key``
        for the config's ``field``."""
        if self.recipe not in RECIPES:
            raise ConfigError("recipe", self.recipe, f"one of {', '.join(RECIPES)}")
        c = TrainConfig(**asdict(self))
        c.out = check_out(c.out)
        for name in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "mask_rule", "mask_lr"):
            if getattr(c, name) is None:
                setattr(c, name, recipe(name, name))
        if c.lr_reference_batch is None:
            c.lr_reference_batch = (c.batch_size if self.batch_size is None or self.lr is not None
                                    else recipe("batch_size", "lr_reference_batch"))
        if c.eval_batch_size is None:
            c.eval_batch_size = max(c.batch_size, 256)
        _positive("epochs", c.epochs)
        _positive("batch_size", c.batch_size)
        _positive("eval_batch_size", c.eval_batch_size)
        _positive("lr_reference_batch", c.lr_reference_batch)
        if not (isinstance(c.lr, (int, float)) and c.lr > 0 and math.isfinite(c.lr)):
            raise ConfigError("lr", c.lr, "a positive finite number")
        if c.mask_lr is not None and not _number(c.mask_lr, lo=0.0, open_lo=True):
            raise ConfigError("mask_lr", c.mask_lr, "a positive number (or omitted: the weight LR)")
        if c.milestones is None:
            c.milestones = milestones_of(recipe("milestone_fracs", "milestones"), c.epochs)
        if not isinstance(c.milestones, list) or not all(isinstance(m, int) and not isinstance(m, bool) for m in c.milestones):
            raise ConfigError("milestones", c.milestones, "a list of epochs, e.g. [150, 225]")
        c.milestones = sorted(c.milestones)
        if any(not 0 < m < c.epochs for m in c.milestones):
            raise ConfigError("milestones", c.milestones, f"epochs strictly between 0 and epochs={c.epochs}")
        for name, lo, hi, allowed in (
            ("momentum", 0.0, None, "a number >= 0"), ("weight_decay", 0.0, None, "a number >= 0"),
            ("mask_momentum", 0.0, None, "a number >= 0"), ("gamma", 0.0, None, "a number > 0 (LR factor at each milestone)"),
            ("label_smoothing", 0.0, 1.0, "a number in [0, 1)"),
        ):
            v = getattr(c, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo and (hi is None or v < hi)
            if not ok or (name == "gamma" and v == 0):
                raise ConfigError(name, v, allowed)
        if c.nesterov and c.momentum <= 0:
            raise ConfigError("nesterov", c.nesterov, "false unless momentum > 0")
        if not isinstance(c.workers, int) or c.workers < 0:
            raise ConfigError("workers", c.workers, "an integer >= 0")
        if not isinstance(c.synthetic, dict):
            raise ConfigError("synthetic", c.synthetic, 'a JSON object, e.g. {"train_size": 512, "image_size": 32}')
        for flag in ("nesterov", "augment", "compile", "track"):
            if not isinstance(getattr(c, flag), bool):
                raise ConfigError(flag, getattr(c, flag), "true or false")
        for flag in ("amp", "channels_last"):
            if getattr(c, flag) is not None and not isinstance(getattr(c, flag), bool):
                raise ConfigError(flag, getattr(c, flag), "true, false or null (the device's default)")
        if not isinstance(c.mask_init, (int, float)) or isinstance(c.mask_init, bool):
            raise ConfigError("mask_init", c.mask_init, "a number in (0, 1]")
        if c.mask_rule not in MASK_RULE_NAMES:
            raise ConfigError("mask_rule", c.mask_rule, f"one of {', '.join(MASK_RULE_NAMES)}")
        for name in ("data_dir", "experiment", "tracking_uri"):
            if getattr(c, name) is not None and not isinstance(getattr(c, name), str):
                raise ConfigError(name, getattr(c, name), "a string")
        if not isinstance(c.device, str):
            raise ConfigError("device", c.device, "auto, cpu, cuda or cuda:N")
        spec = self.spec(c)  # validates dataset/arch/connectivity/fan_in
        c.arch, c.connectivity, c.fan_in = spec.arch, spec.connectivity, spec.fan_in
        if c.freeze_epoch is None:
            c.freeze_epoch = default_freeze_epoch(c.milestones, c.epochs, recipe("settle_epochs", "freeze_epoch"))
        if not (isinstance(c.freeze_epoch, int) and 0 <= c.freeze_epoch <= c.epochs):
            raise ConfigError("freeze_epoch", c.freeze_epoch, f"an epoch in 0..epochs={c.epochs} (masks are learned before it)")
        if c.progress not in ("auto", "bar", "lines", "none"):
            raise ConfigError("progress", c.progress, "auto, bar, lines or none")
        if c.experiment is None:
            c.experiment = f"maskconnect/{c.dataset}"
        return c

    @staticmethod
    def spec(c: "TrainConfig", num_classes: int | None = None) -> ModelSpec:
        syn = c.synthetic or {}
        return make_spec(
            c.arch, connectivity=c.connectivity, fan_in=c.fan_in, dataset=c.dataset, seed=c.seed,
            stage_width=c.stage_width, mask_init=c.mask_init, num_classes=num_classes or syn.get("num_classes"),
            in_channels=syn.get("in_channels"), image_size=syn.get("image_size"),
        )

    def identity(self) -> dict:
        """The fields that decide what the run computes (two configs with equal identities are one run)."""
        return identity_of(asdict(self))

    def ignored_fields(self) -> list[str]:
        """Learned-only fields given to a full or random run (they do nothing there)."""
        if self.connectivity == "learned":
            return []
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        return [k for k in LEARNED_ONLY if getattr(self, k) is not None and getattr(self, k) != defaults[k]]


def identity_of(config: dict) -> dict:
    """:meth:`TrainConfig.identity` of a config dict (e.g. a run directory's config.json)."""
    skip = set(NON_IDENTITY) | (set() if config.get("connectivity") == "learned" else set(LEARNED_ONLY))
    out = {k: v for k, v in config.items() if k not in skip}
    try:  # one architecture, however spelled ("29-8-8" and "29,8,8"; "ResNet-38" and "resnet38")
        out["arch"] = canonical_arch(out["arch"])
    except (KeyError, ConfigError):
        pass
    return out


def check_out(out) -> str:
    """The run directory of ``--out`` as a string; an empty or non-path value is a :class:`ConfigError`."""
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out.strip():
        raise ConfigError("out", out, "a run directory path (--out DIR), not empty")
    if "\0" in out:
        raise ConfigError("out", out, "a path without NUL characters")
    problem = name_problem(out)
    if problem:
        raise ConfigError("out", out, problem)
    return out


def _option(name: str, value) -> str:
    """How ``maskconnect train`` spells field ``name`` set to ``value`` (options.add_train_arguments)."""
    if name in ("track", "compile"):  # flags without a value
        return "--no-track" if name == "track" else "--compile"
    shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"--{name.replace('_', '-')} {shown}"


def _number(v, *, lo: float, open_lo: bool = False) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return False
    return v > lo if open_lo else v >= lo


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(name, v, "a positive integer")


def config_from_args(args) -> TrainConfig:
    """The config of ``maskconnect train``'s options (unset ones are None: the recipe's or TrainConfig's
    default applies). A field given twice, by its option and by ``--set``, is refused: which one won
    would be a guess."""
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    given = dict(kw)
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError("set", item, "key=value with key a TrainConfig field")
        k, v = item.split("=", 1)
        if k == "out":
            raise ConfigError("set", item, "out is not a --set field: give the run directory with --out DIR")
        if k not in names:
            raise ConfigError("set", k, f"a TrainConfig field: {', '.join(sorted(names))}")
        if k in given:
            raise ConfigError("set", item, f"{k} is also given by its option ({_option(k, given[k])}): give it once")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return TrainConfig(**kw)
