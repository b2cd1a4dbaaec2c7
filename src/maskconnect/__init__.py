"""MaskConnect: connectivity learning in multi-branch networks (Ahmed & Torresani).

Layers point one way: ``connectivity`` (masks, sampling, straight-through, pruning maths) <- ``models``
<- ``train``/``evaluate`` <- ``cli`` <- pipelines and reports. mlflow, snakemake and dvc are imported
only where used, so the model and training code run with torch alone.
"""

__version__ = "0.1.0"
