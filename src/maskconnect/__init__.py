"""MaskConnect: connectivity learning in multi-branch networks (Ahmed & Torresani).

Layers point one way (README "Layout"; the design in docs/design.md): ``specs``, ``connectivity``
(masks, sampling, straight-through, freezing) and ``mask_rules`` <- ``kernels`` (the same functions,
faster or leaner) <- ``models`` (the architecture, pruning, FLOPs) <- ``describe``, ``training``
(logging to ``tracking``) <-
``experiments`` (grids, paths, commands, dvc.yaml) <- ``report``, ``preflight`` <- ``cli``. mlflow,
snakemake and dvc are imported only where used, so the model and training code run with torch alone.
"""

__version__ = "0.1.0"
