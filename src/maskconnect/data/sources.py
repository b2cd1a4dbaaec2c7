"""Reading the tensor-resident datasets: scikit-learn digits, CIFAR-10/100 (via torchvision), synthetic.

Each loader returns CPU tensors ``(x_train, y_train, x_test, y_test)`` plus the normalisation
constants in the raw units of ``x``; :class:`maskconnect.data.tensor.TensorDataBundle` moves them to
the device.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError

# Published per-channel statistics of the CIFAR training sets (in [0, 1]); fixed constants, not
# recomputed from the files, so a run's normalisation never depends on what was loaded.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DIGITS_TEST_EVERY = 5  # within each class, every 5th image (positions 4, 9, 14, ...) is a test image


def digits_split(target: np.ndarray) -> np.ndarray:
    """Boolean test mask of the fixed digits split (independent of any seed or library version).

    Within each class, taken in the dataset's original order, the images at positions 4, 9, 14, ...
    (every 5th) are test images and the rest are training images: a stratified 80/20 split
    (1442 train / 355 test images of the 1797).
    """
    test = np.zeros(len(target), dtype=bool)
    for c in np.unique(target):
        idx = np.flatnonzero(target == c)
        test[idx[DIGITS_TEST_EVERY - 1::DIGITS_TEST_EVERY]] = True
    return test


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The (1797, 64) pixels and the labels of scikit-learn's digits.

    Read straight from the CSV scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixel
    columns, then the label), which is what ``sklearn.datasets.load_digits`` reads, found without
    importing scikit-learn: that import alone takes about 1.8 s, paid by every training and evaluation
    process of the demo (36 of them). Falls back to ``load_digits`` where the file is not there.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = None
    if spec is not None and spec.submodule_search_locations:
        csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.data), np.asarray(d.target, dtype=np.int64)


def load_digits_tensors():
    """scikit-learn's bundled 8x8 digits: float32 (N, 1, 8, 8) with raw values 0..16, 10 classes.

    Normalisation: the single mean and (population) standard deviation of all training pixels.
    """
    images, target = _read_digits()
    images = images.astype(np.float32).reshape(-1, 1, 8, 8)      # (1797, 1, 8, 8)
    test = digits_split(target)
    xtr, xte = images[~test], images[test]
    mean, std = float(xtr.mean()), float(xtr.std())
    t = torch.from_numpy
    return (t(np.ascontiguousarray(xtr)), t(target[~test]), t(np.ascontiguousarray(xte)),
            t(target[test]), (mean,), (std,))


def load_cifar_tensors(name: str, root: Path, download: bool):
    """CIFAR-10/100 through torchvision (download and md5 checks are torchvision's).

    Returns uint8 (N, 3, 32, 32) images, int64 labels and the mean/std in 0..255 units. Any failure to
    find, download, verify or read the files becomes a :class:`DataError` naming the folder.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    num_classes = 10 if name == "cifar10" else 100
    folder = Path(root) / cls.base_folder
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=False)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError,
            tarfile.TarError) as e:
        damaged = _damaged_cifar_files(cls, Path(root))
        if damaged:  # the cause to name first: a retried download's network error would hide it
            shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
            again = f"; downloading them again failed ({e})" if download else ""
            raise DataError(f"{name}: {shown} in {Path(root)} fail their md5 check (damaged or incomplete){again}; "
                            f"delete {folder} and rerun `maskconnect prepare-data --dataset {name}` to download it again, "
                            f"or put {cls.filename} (md5 {cls.tgz_md5}) from {cls.url} into {root}") from e
        if download:
            how = (f"the download from {cls.url} or its md5 check failed: check the network, or "
                   f"download {cls.filename} (md5 {cls.tgz_md5}) by hand into {root} and rerun; "
                   f"delete {folder} if it holds damaged files")
        else:
            how = (f"rerun with download enabled, or extract {cls.filename} from {cls.url} "
                   f"into {root} so that {folder} holds the batch files")
        raise DataError(f"{name}: dataset not found or corrupted in {folder} ({e}); {how}") from e

    def convert(ds, split):
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
            raise DataError(f"{name}: unexpected {split} image array {data.dtype}{data.shape} in {folder}")
        y = np.asarray(ds.targets, dtype=np.int64)
        if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
            raise DataError(f"{name}: {split} labels in {folder} do not match the images or lie "
                            f"outside 0..{num_classes - 1}")
        x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
        return x, torch.from_numpy(y)

    xtr, ytr = convert(train, "train")
    xte, yte = convert(test, "test")
    mean, std = CIFAR_STATS[name]
    return xtr, ytr, xte, yte, tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std)


def _damaged_cifar_files(cls, root: Path) -> list[str]:
    """The CIFAR files under ``root`` that exist but fail torchvision's md5 check (paths relative to ``root``)."""
    from torchvision.datasets.utils import check_integrity

    folder = root / cls.base_folder
    files = [(folder / f, md5) for f, md5 in cls.train_list + cls.test_list] + [(folder / cls.meta["filename"], cls.meta["md5"]),
                                                                               (root / cls.filename, cls.tgz_md5)]
    return [str(p.relative_to(root)) for p, md5 in files if p.is_file() and not check_integrity(str(p), md5)]


SYNTHETIC_DEFAULTS = {"num_classes": 10, "image_size": 32, "in_channels": 3,
                      "train_size": 512, "test_size": 256, "data_seed": 0}


def synthetic_config(kw: dict | None) -> dict:
    """Fill in the synthetic defaults and check every value (ConfigError on a bad key or value)."""
    kw = dict(kw or {})
    unknown = sorted(set(kw) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError("synthetic", unknown[0], f"keys must be among {sorted(SYNTHETIC_DEFAULTS)}")
    cfg = {**SYNTHETIC_DEFAULTS, **kw}
    for key, value in cfg.items():
        low = 0 if key == "data_seed" else (2 if key == "num_classes" else 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"synthetic.{key}", value, f"an integer >= {low}")
        cfg[key] = int(value)
    return cfg


def synthetic_tensors(cfg: dict):
    """Learnable random data from a fixed generator (``data_seed``, not the run seed).

    Each class has a random N(0, 1) prototype image; a sample is ``(prototype[y] + noise) / sqrt(2)``
    with N(0, 1) noise, so pixels are roughly standard normal (mean 0, std 1 normalisation) and a
    linear model can learn the labels. Labels are drawn uniformly; train samples are drawn before
    test samples.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(cfg["data_seed"])
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    protos = torch.randn((cfg["num_classes"], *shape), generator=g)

    def draw(n):
        y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
        x = (protos[y] + torch.randn((n, *shape), generator=g)) / math.sqrt(2.0)
        return x, y

    xtr, ytr = draw(cfg["train_size"])
    xte, yte = draw(cfg["test_size"])
    c = cfg["in_channels"]
    return xtr, ytr, xte, yte, (0.0,) * c, (1.0,) * c
