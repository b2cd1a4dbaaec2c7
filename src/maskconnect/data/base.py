"""Shared pieces of the data layer: dataset descriptors, the bundle interface, batching and seeding.

Determinism contract (resumable training must be bit-identical):

* Everything random about epoch ``e`` of a run with seed ``s`` (the shuffle order and every
  augmentation draw) comes from one ``torch.Generator`` seeded with :func:`epoch_seed` ``(s, e)``.
  The global torch/numpy/python RNGs are never read or advanced, so a run restarted at epoch 5 sees
  exactly the batches an uninterrupted run sees at epoch 5.
* All draws of an epoch are made up front on the CPU (one ``randperm`` and one vector of draws per
  sample position), so they do not depend on the device, on how many batches were consumed before,
  or (for ImageNet) on the number of loader workers.

Batch policy (:func:`batch_bounds`): batches are consecutive slices of ``batch_size`` samples in the
epoch's order and the last, incomplete batch is kept, except that a lone leftover sample is appended
to the previous batch (one batch of ``batch_size + 1``), because BatchNorm cannot train on a batch of
one. Test batches keep every sample, in dataset order, whatever the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``layout`` picks the architecture family (one of :data:`maskconnect.specs.LAYOUTS`): ``'cifar'``
    (3x3 stem, 3 stages) for small images, ``'imagenet'`` (7x7 stem + max-pool, 4 stages) for 224x224 images.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    layout: str


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, stream), via numpy's SeedSequence.

    SeedSequence hashes its entropy words, so neighbouring (seed, epoch) pairs give unrelated
    streams (unlike ``seed + epoch``, where seed 0 epoch 1 would equal seed 1 epoch 0).
    """
    seed, epoch, stream = int(seed), int(epoch), int(stream)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    words = np.random.SeedSequence([seed, epoch, stream, 0x4D43]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A fresh CPU generator for epoch ``epoch`` of a run seeded ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(epoch_seed(seed, epoch, stream))
    return g


def batch_bounds(n: int, batch_size: int, *, merge_singleton: bool = True, min_last: int = 2) -> list[tuple[int, int]]:
    """(start, stop) slices covering ``range(n)`` in batches of ``batch_size``.

    The last incomplete batch is kept. With ``merge_singleton`` (training), a final batch of fewer than
    ``min_last`` samples (default 2: a single sample) is merged into the previous batch instead, so that
    no training batch (or, under data parallelism, no process's share of one) has size 1.
    """
    if n <= 0:
        return []
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if merge_singleton and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


class DataBundle:
    """A dataset ready for training: train/test batch iterators on the target device.

    Attributes: ``info`` (:class:`DatasetInfo`, with the real number of classes), ``train_size``,
    ``test_size``, ``batch_size``, ``eval_batch_size``, ``device``, ``seed``, ``augment``.

    * ``train_batches(epoch)`` yields ``(x, y)``: ``x`` float32 NCHW, normalised, augmented (if
      ``augment``), on ``device``; ``y`` int64 on ``device``. The order and augmentation of epoch
      ``epoch`` are a pure function of ``(seed, epoch)``. ``start_step`` skips the first batches of
      the epoch (for a mid-epoch resume) without changing the remaining ones.
    * ``test_batches()`` yields every test sample exactly once, in dataset order, without
      augmentation; the last batch may be smaller than ``eval_batch_size``.
    * ``steps_per_epoch()`` is the number of batches ``train_batches`` yields.
    """

    info: DatasetInfo
    train_size: int
    test_size: int

    def __init__(self, info: DatasetInfo, *, train_size: int, test_size: int, batch_size: int,
                 eval_batch_size: int, device: torch.device, seed: int, augment: bool):
        self.info = info
        self.train_size = int(train_size)
        self.test_size = int(test_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> "DataBundle":
        """Data-parallel training: each training batch is the global batch's ``rank::world`` slice
        (the order and augmentation of the global batch are unchanged). Test batches are not sharded."""
        self.rank, self.world = int(rank), int(world)
        return self

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _train_bounds(self) -> list[tuple[int, int]]:
        return batch_bounds(self.train_size, self.batch_size, merge_singleton=True, min_last=2 * self.world)

    def _test_bounds(self) -> list[tuple[int, int]]:
        return batch_bounds(self.test_size, self.eval_batch_size, merge_singleton=False)

    def steps_per_epoch(self) -> int:
        return len(self._train_bounds())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.name!r}, classes={self.info.num_classes}, "
                f"train={self.train_size}, test={self.test_size}, batch={self.batch_size}, "
                f"device={str(self.device)!r}, augment={self.augment})")
