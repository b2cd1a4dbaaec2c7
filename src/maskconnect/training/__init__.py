"""Training as the paper's schedule (docs/design.md sections 4 and 6).

=============  ===========================================================================================
``config``     :class:`TrainConfig`: a run's fields, its recipe's defaults and every check (torch-free)
``options``    the same fields as ``maskconnect train``'s options (torch-free; the grid loader uses them)
``schedule``   the recipes, the LR and its drops, joint phase -> freeze -> fine-tune (torch-free)
``loop``       :func:`train`: one run, epoch by epoch, and its end (freeze, prune, metrics)
``step``       the training step, evaluation and :class:`Precision` (the hot path)
``device``     ``--device`` resolved, the CPU allocator tuned
``rundir``     the run directory's files (docs/run_format.md): checkpoints, resume, the record
``lock``       one writer per run directory
``ddp``        several processes (torchrun)
``progress``   the bar, or one line per epoch
``evaluation`` :func:`evaluate_run` (``maskconnect evaluate``)
=============  ===========================================================================================

This file imports nothing: ``import maskconnect.training.config`` stays torch-free (the grid loader
checks grids with it); the names below are loaded on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {"TrainConfig": "config", "config_from_args": "config", "identity_of": "config",
         "RECIPES": "schedule", "train": "loop", "evaluate_run": "evaluation"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
