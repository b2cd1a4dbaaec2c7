"""The switches of the kernels: one frozen :class:`KernelOptions`, read through :func:`current` (at call time;
``save_memory`` when a model is built).

Every switch picks between two ways of computing the same function (docs/design.md section 10); the
measurements that set each default are in the docstring of the file that holds the kernel. Benchmarks
and tests change them for a block only:

    with kernels.options(fuse_mix_when_compiling=True):
        ...
    with kernels.cpu_fast_paths(False):    # a CPU runs the kernels a GPU runs
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """What the kernels do; the defaults are what training uses.

    * ``save_memory``: the memory-saving training path (:mod:`.saving`). None: on for CUDA, off on a
      CPU; True/False force it. Read when a model is built (``model.save_memory`` overrides it).
    * ``grouped_1x1_as_matmul_on_cpu``, ``matmul_max_group_width``: a masked module's grouped 1x1 convs
      as one batched matmul on a CPU when a branch is at most that many channels wide (:mod:`.cpu`).
    * ``subsample_strided_1x1_on_cpu``: the projection shortcut's strided 1x1 conv as subsampling then a
      stride-1 conv on a CPU (:mod:`.cpu`).
    * ``small_map_pixels``: training-mode BN on a CPU over maps of at most this many pixels runs
      channels-last (:mod:`.cpu`); 0 turns it off.
    * ``fuse_mix_when_compiling``: under torch.compile, the mixing as a broadcast product that inductor
      fuses with the element-wise work around it instead of a bmm (:mod:`.mixing`).
    """

    save_memory: bool | None = None
    grouped_1x1_as_matmul_on_cpu: bool = True
    matmul_max_group_width: int = 64
    subsample_strided_1x1_on_cpu: bool = True
    small_map_pixels: int = 4
    fuse_mix_when_compiling: bool = False


DEFAULTS = KernelOptions()
_current = DEFAULTS


def current() -> KernelOptions:
    """The options in force now."""
    return _current


@contextlib.contextmanager
def options(**changes) -> Iterator[KernelOptions]:
    """Set some options (by field name; an unknown name is a TypeError) for the duration of a ``with``
    block, and restore the previous ones after it, also when it raises. Yields the options in force."""
    global _current
    before = _current
    _current = dataclasses.replace(before, **changes)
    try:
        yield _current
    finally:
        _current = before


def cpu_fast_paths(enabled: bool = True) -> contextlib.AbstractContextManager[KernelOptions]:
    """Switch the three CPU-only fast paths on or off for a ``with`` block: grouped 1x1 convs as matmul,
    the subsampled strided 1x1 and the small-map BN (on: at their default limits).

    ``enabled=False`` makes a CPU run the kernels a GPU runs (the grouped convolution and its
    ``convolution_backward`` in the saving path, the strided conv, torch's own BN), which is how the
    tests and ``maskconnect preflight`` cover the CUDA code path on a CPU. Same function either way.
    """
    on = bool(enabled)
    return options(grouped_1x1_as_matmul_on_cpu=on, subsample_strided_1x1_on_cpu=on,
                   small_map_pixels=DEFAULTS.small_map_pixels if on else 0)
