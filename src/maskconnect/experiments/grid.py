"""The grid model: a :class:`Grid` of :class:`Run` s, and where grid files live.

A grid is a YAML file in ``maskconnect/grids/`` (package data). Each entry lists a model, a
connectivity kind, fan-ins K and seeds; the grid expands into one :class:`Run` per (entry, K, seed)
(:mod:`.loading` reads and validates the file). ``paper`` is the union of other grids
(``include:``); its runs keep their own grid's directories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..defaults import DEFAULT_GRID, DEFAULT_RECIPE  # noqa: F401 (DEFAULT_GRID: re-exported for the loader)
from ..errors import ConfigError
from ..specs import MASKED
from . import paths

GRIDS_DIR = Path(__file__).parents[1] / "grids"
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "grid.schema.json"

# Entry fields and their defaults (schemas/grid.schema.json documents each).
SETTINGS_DEFAULTS = {"recipe": DEFAULT_RECIPE, "device": "auto", "gpus": 0, "threads": 1, "runtime": None, "mem_mb": None}

# Training overrides with their own `maskconnect train` option; any other key goes through --set.
TRAIN_OPTIONS = {
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "lr_reference_batch": "--lr-reference-batch",
    "momentum": "--momentum", "weight_decay": "--weight-decay", "milestones": "--milestones",
    "freeze_epoch": "--freeze-epoch", "mask_lr": "--mask-lr", "mask_init": "--mask-init", "mask_rule": "--mask-rule",
    "stage_width": "--stage-width", "workers": "--workers", "amp": "--amp",
}


@dataclass(frozen=True)
class Run:
    """One training run of a grid: a model, its connectivity and fan-in, a seed, how to train it."""

    grid: str           # the grid that defines it (its directory lives under results/runs/<grid>)
    entry: int          # 1-based index of its entry in that grid's file
    label: str
    dataset: str
    arch: str           # "D,w,C" or "resnetD"
    connectivity: str
    fan_in: int         # K (C for full, 1 for prev)
    seed: int
    recipe: str = DEFAULT_RECIPE
    device: str = "auto"
    gpus: int = 0
    threads: int = 1
    runtime: int | None = None
    mem_mb: int | None = None
    train: tuple = ()   # ((key, value), ...) recipe overrides, sorted
    source: str = ""    # the grid file

    @property
    def run_id(self) -> str:
        return paths.run_id(self.dataset, self.arch, self.connectivity, self.fan_in, self.seed)

    @property
    def run_dir(self) -> str:
        return paths.run_dir(self.grid, self)

    @property
    def slug(self) -> str:
        """The run id as one name without slashes (DVC stage keys, log names)."""
        return self.run_id.replace("/", "-")

    @property
    def experiment(self) -> str:
        """MLflow experiment: ``maskconnect/<dataset>/<grid>`` (as ``maskconnect track sync`` names it)."""
        return f"maskconnect/{self.dataset}/{self.grid}"

    def train_args(self) -> list[str]:
        """Options of ``maskconnect train`` for this run, except ``--out``."""
        args = ["--dataset", self.dataset, "--arch", self.arch, "--connectivity", self.connectivity]
        if self.connectivity in MASKED:
            args += ["--fan-in", str(self.fan_in)]
        args += ["--seed", str(self.seed), "--recipe", self.recipe]
        for key, value in self.train:
            text = _cli_value(value)
            if key in TRAIN_OPTIONS:
                args += [TRAIN_OPTIONS[key], text]
            else:
                args += ["--set", f"{key}={json.dumps(value)}"]
        args += ["--device", self.device, "--experiment", self.experiment]
        return args


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Grid:
    """A validated, expanded grid. ``parts`` are the grids whose runs it holds (itself, or the
    grids it includes); each part has its own results, metrics and report."""

    name: str
    path: Path
    description: str
    runs: list[Run]
    parts: list[str] = field(default_factory=list)
    ref: str = ""   # how to name it on a command line: the packaged name, or the file's path

    def runs_of(self, part: str) -> list[Run]:
        return [r for r in self.runs if r.grid == part]

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.runs))


def keffect_series(runs: Iterable[Run]) -> dict[tuple[str, str], list[str]]:
    """(dataset, arch) -> the connectivities whose top-1 against K is drawn (Learned and Fixed-Random,
    with the baseline: Fixed-Full as the K = C point, Fixed-Prev as K = 1), for the models of ``runs``
    trained at more than one K."""
    ks: dict[tuple[str, str], set] = {}
    kinds: dict[tuple[str, str], set] = {}
    for r in runs:
        ks.setdefault((r.dataset, r.arch), set()).add(r.fan_in)
        kinds.setdefault((r.dataset, r.arch), set()).add(r.connectivity)
    order = ("learned", "random", "full", "prev")
    return {key: [c for c in order if c in kinds[key]] for key in ks if len(ks[key]) > 1}


def available_grids() -> list[str]:
    """Names of the packaged grids."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(grid: str | Path) -> Path:
    """The file of a grid: a packaged name (``demo``) or a path to a YAML file."""
    text = str(grid)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError("grid", text, "an existing grid file (YAML), or one of " + ", ".join(available_grids()))
        return path
    path = GRIDS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError("grid", text, "one of " + ", ".join(available_grids()) + ", or a path to a grid file (YAML)")
    return path
