"""Datasets for MaskConnect: digits, CIFAR-10, CIFAR-100, ImageNet and synthetic data.

``build_data(name, ...)`` returns a :class:`DataBundle` whose ``train_batches(epoch)`` and
``test_batches()`` yield ``(x, y)`` on the training device: ``x`` float32 NCHW normalised, ``y`` int64.

Datasets and the choices made for each (see docs/design.md section 6 for the protocol):

* ``digits`` -- scikit-learn's bundled 8x8 digits (1797 grey images, values 0..16, 10 classes; no
  download). Fixed stratified split, independent of the run seed: within each class, in the
  dataset's order, every 5th image (positions 4, 9, ...) is a test image: 1442 train / 355 test.
  Normalised with the scalar mean/std of the training pixels. Augmentation: zero-pad 1 pixel and
  take a random 8x8 crop (a shift of up to 1 pixel); no flip (digits are not mirror-invariant).
* ``cifar10`` / ``cifar100`` -- read with ``torchvision.datasets.CIFAR10/CIFAR100`` from
  ``data_dir`` (default ``<cwd>/data``; downloaded there when ``download=True``, with torchvision's
  md5 checks). Held whole as uint8 (N, 3, 32, 32) on ``device``; augmentation as batched tensor ops on
  that device: zero-pad 4 pixels (black, before normalisation), random 32x32 crop, random horizontal
  flip; then normalised with the published CIFAR per-channel mean/std. Missing or corrupted files ->
  :class:`~maskconnect.errors.DataError`.
* ``imagenet`` -- ``ImageFolder`` over ``data_dir/train`` and ``data_dir/val`` (default
  ``data_dir``: ``<cwd>/data/imagenet``), DataLoader with ``workers`` workers; RandomResizedCrop(224)
  + flip for training, Resize(256) + CenterCrop(224) for evaluation. The bundle's ``info`` reports
  the number of class folders found (``DATASETS['imagenet']`` says 1000).
* ``synthetic`` -- learnable random tensors from a fixed generator, configured by ``synthetic=``
  (keys ``num_classes``, ``image_size``, ``in_channels``, ``train_size``, ``test_size``,
  ``data_seed``; defaults 10, 32, 3, 512, 256, 0). Layout ``'cifar'`` if ``image_size <= 64`` else
  ``'imagenet'``. No augmentation.

Determinism and batching (details in :mod:`maskconnect.data.base`): the shuffle and augmentation
of epoch ``e`` come only from a generator seeded by ``(seed, e)``; the global RNGs are untouched.
Training batches keep the last incomplete batch (a single leftover sample joins the previous batch
instead, because BatchNorm cannot train on one sample). Test batches cover every test sample once,
in order. ``eval_batch_size`` defaults to ``batch_size``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import DataBundle, DatasetInfo, batch_bounds, epoch_generator, epoch_seed
from .tensor import TensorDataBundle, crop_flip

__all__ = ["DATASETS", "DatasetInfo", "DataBundle", "dataset_info", "build_data",
           "batch_bounds", "epoch_seed", "epoch_generator", "crop_flip"]

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, "cifar"),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, "cifar"),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, "cifar"),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, "imagenet"),
    "synthetic": DatasetInfo("synthetic", 10, 3, 32, "cifar"),
}


def _check_name(name) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ConfigError("dataset", name, f"one of {', '.join(DATASETS)}")
    return key


def _synthetic_info(cfg: dict) -> DatasetInfo:
    size = cfg["image_size"]
    return DatasetInfo("synthetic", cfg["num_classes"], cfg["in_channels"], size,
                       "cifar" if size <= 64 else "imagenet")


def dataset_info(name: str, **synthetic_kw) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` without loading any data.

    For ``'synthetic'``, ``synthetic_kw`` are the synthetic options (see :func:`build_data`); for the
    other datasets they are ignored. Unknown name -> ``ConfigError('dataset', name, ...)``.
    """
    key = _check_name(name)
    if key == "synthetic":
        from .sources import synthetic_config

        return _synthetic_info(synthetic_config(synthetic_kw))
    return DATASETS[key]


def _positive_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, value, "a positive integer")
    return value


def build_data(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int = 128,
               eval_batch_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
               download: bool = True, augment: bool = True, workers: int = 4,
               synthetic: dict | None = None) -> DataBundle:
    """Load dataset ``name`` and return a :class:`DataBundle` serving batches on ``device``.

    ``data_dir`` defaults to ``<cwd>/data`` (CIFAR) or ``<cwd>/data/imagenet`` (ImageNet) and is
    unused by ``digits`` and ``synthetic``. ``seed`` drives only the shuffle and augmentation (the
    digits split and the synthetic data are fixed). ``workers`` is used by ImageNet only.
    Raises :class:`~maskconnect.errors.ConfigError` for bad arguments and
    :class:`~maskconnect.errors.DataError` for missing or corrupted data.
    """
    key = _check_name(name)
    batch_size = _positive_int("batch_size", batch_size)
    eval_batch_size = batch_size if eval_batch_size is None else _positive_int("eval_batch_size", eval_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError("workers", workers, "an integer >= 0")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError("device", device, "a torch device such as 'cpu' or 'cuda:0'") from e
    common = dict(batch_size=batch_size, eval_batch_size=eval_batch_size, device=device, seed=seed,
                  augment=augment)

    if key == "imagenet":
        from .imagenet import ImageFolderBundle

        root = Path(data_dir) if data_dir is not None else Path.cwd() / "data" / "imagenet"
        return ImageFolderBundle(root, workers=workers, **common)

    from . import sources

    if key == "digits":
        xtr, ytr, xte, yte, mean, std = sources.load_digits_tensors()
        info, pad, flip = DATASETS["digits"], 1, False
    elif key in ("cifar10", "cifar100"):
        root = Path(data_dir) if data_dir is not None else Path.cwd() / "data"
        xtr, ytr, xte, yte, mean, std = sources.load_cifar_tensors(key, root, download)
        info, pad, flip = DATASETS[key], 4, True
    else:  # synthetic
        cfg = sources.synthetic_config(synthetic)
        xtr, ytr, xte, yte, mean, std = sources.synthetic_tensors(cfg)
        info, pad, flip = _synthetic_info(cfg), 0, False
    return TensorDataBundle(info, xtr, ytr, xte, yte, mean=mean, std=std, pad=pad, flip=flip, **common)
