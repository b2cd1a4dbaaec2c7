"""Datasets held whole as tensors on the training device (digits, CIFAR, synthetic), airbench style.

The raw images stay on the device in their stored dtype (uint8 for CIFAR, float32 for digits and
synthetic). Each batch is gathered, augmented and normalised there with batched tensor ops, so the
same code runs on CPU and GPU and no DataLoader worker is involved.

Augmentation (when enabled): zero-pad by ``pad`` pixels (zero in raw units, i.e. black pixels,
before normalisation, as ``torchvision.transforms.RandomCrop(padding=pad)`` does), take a random
crop of the original size, and, if ``flip``, mirror horizontally with probability 1/2. All draws come
from the epoch's generator (see :mod:`maskconnect.data.base`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from .base import DataBundle, DatasetInfo, epoch_generator


def crop_flip(raw: Tensor, idx: Tensor, dy: Tensor | None, dx: Tensor | None, flip: Tensor | None,
              pad: int) -> Tensor:
    """Gather ``raw[idx]``, cropped from the zero-padded image and optionally mirrored, in one gather.

    ``raw`` is (N, C, H, W) of any dtype; ``idx``, ``dy``, ``dx`` are (B,) integer tensors with
    ``0 <= dy, dx <= 2 * pad`` (the crop's top-left corner in the padded image); ``flip`` is a (B,)
    bool tensor. ``dy``/``dx``/``flip`` may be None (no shift / no flip). Returns (B, C, H, W) in
    ``raw``'s dtype; pixels that fall in the padding are 0.
    """
    _, c, h, w = raw.shape
    if dy is None and dx is None and flip is None:
        return raw[idx]
    dev = raw.device
    b = idx.numel()
    zero = torch.zeros(b, dtype=torch.long, device=dev)
    dy = zero if dy is None else dy.to(dev, torch.long) - pad
    dx = zero if dx is None else dx.to(dev, torch.long) - pad
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h                                                # (B, H)
    cols = dx[:, None] + ar_w                                                # (B, W)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], dx[:, None] + (w - 1 - ar_w), cols)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = raw[idx.to(dev)[:, None, None, None],
              torch.arange(c, device=dev)[None, :, None, None],
              rows.clamp(0, h - 1)[:, None, :, None],
              cols.clamp(0, w - 1)[:, None, None, :]]
    return out.masked_fill_(~valid[:, None], 0)


class TensorDataBundle(DataBundle):
    """Train/test tensors resident on ``device``; see :class:`maskconnect.data.base.DataBundle`.

    ``mean``/``std`` are per-channel, in the raw units of the stored tensors (e.g. 0..255 for uint8
    CIFAR); batches are ``(x.float() - mean) / std``.
    """

    def __init__(self, info: DatasetInfo, x_train: Tensor, y_train: Tensor, x_test: Tensor,
                 y_test: Tensor, *, mean: Sequence[float], std: Sequence[float], pad: int, flip: bool,
                 batch_size: int, eval_batch_size: int, device: torch.device, seed: int,
                 augment: bool):
        super().__init__(info, train_size=len(y_train), test_size=len(y_test), batch_size=batch_size,
                         eval_batch_size=eval_batch_size, device=device, seed=seed, augment=augment)
        if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
            raise ValueError("images and labels differ in length")
        dev = self.device
        self.x_train = x_train.to(dev).contiguous()
        self.y_train = y_train.to(dev, torch.int64)
        self.x_test = x_test.to(dev).contiguous()
        self.y_test = y_test.to(dev, torch.int64)
        c = self.x_train.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=dev).reshape(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=dev).reshape(1, c, 1, 1)
        self.pad = int(pad)
        self.flip = bool(flip)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.to(torch.float32) - self.mean) / self.std

    def epoch_draws(self, epoch: int) -> dict[str, Tensor | None]:
        """The epoch's random draws, made on the CPU in a fixed order: the permutation, then the
        vertical and horizontal crop offsets, then the flips, one per sample position."""
        g = epoch_generator(self.seed, epoch)
        n = self.train_size
        draws: dict[str, Tensor | None] = {"perm": torch.randperm(n, generator=g),
                                            "dy": None, "dx": None, "flip": None}
        if self.augment and self.pad > 0:
            draws["dy"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            draws["dx"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        if self.augment and self.flip:
            draws["flip"] = torch.rand(n, generator=g) < 0.5
        return draws

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        draws = {k: (None if v is None else v.to(self.device)) for k, v in self.epoch_draws(epoch).items()}
        perm = draws["perm"]
        for a, b in self._train_bounds()[start_step:]:
            r, w = self.rank, self.world
            idx = perm[a:b][r::w]
            sl = lambda t: None if t is None else t[a:b][r::w]  # noqa: E731
            x = crop_flip(self.x_train, idx, sl(draws["dy"]), sl(draws["dx"]), sl(draws["flip"]), self.pad)
            yield self._normalise(x), self.y_train[idx]

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for a, b in self._test_bounds():
            yield self._normalise(self.x_test[a:b]), self.y_test[a:b]
