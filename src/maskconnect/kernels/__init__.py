"""What computes the model's function faster or leaner (docs/design.md section 10).

Nothing here changes what the model computes, only how: ``models/`` states the architecture, and calls
these where torch's own layer would do the same work more slowly or keep more memory.

* :mod:`.cpu`: the CPU-only fast paths: the small-map channels-last BN (:class:`BatchNorm2d`), the
  strided 1x1 as subsampling (:func:`conv1x1`, :class:`Shortcut1x1`), grouped 1x1 convs as a batched
  matmul (:func:`grouped_1x1`).
* :mod:`.mixing`: the connections between modules as one bmm (:func:`mix`), and its fused form under
  torch.compile.
* :mod:`.saving`: the memory-saving training path of a masked module (:func:`forward_saving`).
* :mod:`.earlier`: the masked ResNet's connections to all earlier blocks, one bmm per source stage
  (:class:`EarlierOutputs`).
* :mod:`.options`: the switches (:class:`KernelOptions`), read through :func:`current` and changed for a
  block with :func:`options` or :func:`cpu_fast_paths`.

Each is tested against torch's own kernels and plain autograd (tests/test_kernels.py,
tests/test_gpu_path_cpu.py, tests/test_memory_path.py, tests/test_compile.py). This package imports
torch only, never ``models``.
"""

from .earlier import EarlierOutputs
from .cpu import BatchNorm2d, Shortcut1x1, conv1x1, grouped_1x1
from .mixing import mix
from .options import DEFAULTS, KernelOptions, cpu_fast_paths, current, options
from .saving import forward_saving

__all__ = ["BatchNorm2d", "DEFAULTS", "EarlierOutputs", "KernelOptions", "Shortcut1x1", "conv1x1", "cpu_fast_paths", "current",
           "forward_saving", "grouped_1x1", "mix", "options"]
