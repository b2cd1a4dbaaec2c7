"""``maskconnect preflight``: prove the device path on this machine before a grid spends GPU-days.

A few minutes on the user's own hardware that run, for the grid's models, what its training jobs will
run, and compare it against references that do not share the code under test:

* **environment**: torch, CUDA, cuDNN and driver versions, the GPU and its memory; a GPU that
  ``nvidia-smi`` sees and torch does not is named as the driver/wheel mismatch it is;
* **training step** of each masked model of the grid (each {D,w,C}, every learned and random K of
  the grid) on the path the device runs by default, against plain autograd (``steps.py``): outputs,
  every gradient (masks included), BN running statistics; fp32 with tight bounds, bf16 autocast +
  channels_last with bounds calibrated on this device. On a CPU it also runs what CUDA runs: the
  memory-saving path with the GPU's kernels (convolution-kernel 1x1 backward, strided 1x1, torch's BN)
  under fp32 and bf16 + channels_last, so CI proves that every check can fail;
* **1x1 backward**, both branches (batched matmul on a CPU; the convolution kernel);
* **compiled against eager** when the grid compiles (or ``--compile``);
* **data path**: the device's batches against torchvision's transforms, sample by sample
  (``datapath.py``);
* **DDP** over every visible GPU (NCCL) when there is more than one: masks identical on every rank;
* **memory** of a training step at the grid's batch against the device's memory (``cost.py``);
* **cost**: every run priced as its whole process from timings with their spread and load (``cost.py``,
  ``timing.py``, ``startup.py``), the grid's hours, device-hours and wall time, and whether the timings
  were disturbed.

The record is ``<out>/preflight.json`` (``runner.py``) and ``<out>/preflight.md`` (``render.py``). Exit code 0 when every check
passed, 1 otherwise (each failed check is named, with what to do), 2 for bad arguments.
Model, training and measurement code only: no mlflow, snakemake or dvc import.
"""

from __future__ import annotations

# The package is imported by the command line (cli.py registers the subcommand); torch and the checks
# load only when a preflight runs (runner.py).
