"""What a pipeline step's result depends on, as both workflow engines see it (pipelines/README.md,
"What each step depends on").

* A training run depends on its resolved config (:meth:`TrainConfig.resolved`, of the command line its
  job runs). Snakemake holds the digest of its identity (:func:`config_digest`) in the job's params; a
  DVC stage declares the recipe keys the run reads (:func:`recipe_params`) as params of recipes.yaml,
  beside the grid file's keys. A changed recipe value thus reruns exactly the runs that read it: a
  learned-only key (``mask_lr``) is no input of a Fixed-Full run, whose identity leaves it out.
* Every step depends on the code it runs (``provenance.STEP_CODE``): DVC ``deps:``
  (:func:`code_deps`), a Snakemake param holding its content digest (:func:`code_digest`).

Torch-free, like the rest of the package the Snakefile imports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import provenance
from ..training.schedule import RECIPES_PATH
from .grid import Run
from .loading import train_config


def run_config(run: Run):
    """The run's resolved :class:`~maskconnect.training.config.TrainConfig`, as its job resolves it."""
    return train_config(run).resolved()


def config_digest(run: Run) -> str:
    """SHA-256 of the run's identity (its resolved config less what does not change what it computes)."""
    return hashlib.sha256(json.dumps(run_config(run).identity(), sort_keys=True).encode()).hexdigest()


def recipe_params(run: Run) -> list[str]:
    """The keys of recipes.yaml that decide ``run`` (``<recipe>.<key>``; TrainConfig.recipe_keys)."""
    return [f"{run.recipe}.{key}" for key in train_config(run).recipe_keys()]


def code_digest(step: str) -> str:
    """Digest of the code ``step`` runs, in this package (the checkout's, for the Snakefile)."""
    return provenance.code_digest(step)


def code_deps(step: str) -> list[str]:
    """The code ``step`` runs as DVC deps: files and folders relative to the project root."""
    return [project_path(provenance.PACKAGE_DIR / part) for part in provenance.STEP_CODE[step]]


def recipes_file() -> str:
    """recipes.yaml relative to the project root (the file DVC reads the recipe params from)."""
    return project_path(RECIPES_PATH)


def project_path(path: Path | str) -> str:
    """``path`` relative to the project root (the current directory) if it lies inside, else as is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()
