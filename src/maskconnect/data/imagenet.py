"""ImageNet (or any ImageFolder tree with train/ and val/) through a DataLoader.

Layout: ``<data_dir>/train/<class>/<image>`` and ``<data_dir>/val/<class>/<image>`` (the validation
images sorted into class folders, as for torchvision's ``ImageFolder``). Both splits must have the
same class folders.

Transforms (the standard ResNeXt recipe): train = RandomResizedCrop(224, scale (0.08, 1), ratio
(3/4, 4/3)) + horizontal flip with probability 1/2 + ToTensor + Normalize (ImageNet mean/std);
eval (and train with ``augment=False``) = Resize(256) + CenterCrop(224) + ToTensor + Normalize.

Determinism: the epoch generator draws the permutation and then one 62-bit seed per sample
position; the crop and flip of a sample are drawn from a generator seeded with its own seed inside
``__getitem__``. The global RNG is never used (the DataLoader also gets its own generator), so the
batches depend only on (seed, epoch) and not on the number of workers.

Unreadable images (real ImageNet copies hold a few): the loader stops at the first one with a
:class:`DataError` naming the file, rather than skipping it, since a skipped image would change the
data a run's numbers come from without the run knowing it. :func:`find_bad_images`, run by
``maskconnect prepare-data --dataset imagenet``, finds every one beforehand: by default a header
check (PIL opens each file: unknown or damaged headers, empty files), ``--check-images full`` decodes
every image (also truncated image data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .base import DataBundle, DatasetInfo, epoch_generator, epoch_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SIZE = 224
RESIZE_SIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)

LAYOUT_HELP = ("expected an ImageFolder layout: <dir>/train/<class>/<image> and "
               "<dir>/val/<class>/<image> with the same class folders in both")


def random_resized_crop_params(width: int, height: int, g: torch.Generator,
                               scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0].item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1].item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _image_error(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def bad_image(path, e: BaseException) -> DataError:
    return DataError(f"imagenet: cannot read image {path} ({_image_error(e)}); remove or replace it "
                     "(`maskconnect prepare-data --dataset imagenet --check-images full` lists every such file)")


def find_bad_images(root: Path, *, full: bool = False, threads: int = 8) -> tuple[int, list[tuple[str, str]]]:
    """The images of ``root``'s train/ and val/ that cannot be read: ``(images checked, [(path, why)])``.

    ``full=False`` opens each file (PIL reads the header: minutes for ImageNet); ``full=True`` also
    decodes the pixels, as training would (about as long as an epoch's loading)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    paths = [p for split in ("train", "val") for p, _ in _image_folder(Path(root) / split).samples]

    def check(path):
        try:
            with Image.open(path) as img:
                if full:
                    img.convert("RGB")  # what the loader does (torchvision's pil_loader)
        except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError (truncated), ...
            return path, _image_error(e)
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        bad = [b for b in pool.map(check, paths, chunksize=256) if b is not None]
    return len(paths), bad


class SeededImageFolder(Dataset):
    """Wraps an ``ImageFolder``; train items are keyed ``(index, sample_seed)``, eval items by index."""

    def __init__(self, folder, train: bool):
        self.folder = folder
        self.train = train

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key):
        from torchvision.transforms import functional as F

        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.folder.samples[index]
        try:
            img = self.folder.loader(path)
        except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError (truncated), ...
            raise bad_image(path, e) from None
        if self.train and sample_seed is not None:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(sample_seed))
            width, height = img.size
            i, j, h, w = random_resized_crop_params(width, height, g)
            img = F.resized_crop(img, i, j, h, w, [CROP_SIZE, CROP_SIZE], antialias=True)
            if torch.rand(1, generator=g).item() < 0.5:
                img = F.hflip(img)
        else:
            img = F.center_crop(F.resize(img, RESIZE_SIZE, antialias=True), CROP_SIZE)
        x = F.normalize(F.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
        return x, target


def _image_folder(path: Path):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"imagenet: directory {path} not found; {LAYOUT_HELP}")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise DataError(f"imagenet: cannot read {path} ({e}); {LAYOUT_HELP}") from e


class ImageFolderBundle(DataBundle):
    """An ImageFolder train/val pair served by DataLoaders; see :class:`DataBundle`."""

    def __init__(self, root: Path, *, batch_size: int, eval_batch_size: int, device: torch.device,
                 seed: int, augment: bool, workers: int):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"imagenet: data directory {root} not found; {LAYOUT_HELP}")
        train = _image_folder(root / "train")
        val = _image_folder(root / "val")
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))[:5]
            only_val = sorted(set(val.classes) - set(train.classes))[:5]
            raise DataError(f"imagenet: class folders of {root / 'train'} and {root / 'val'} differ "
                            f"(only in train: {only_train}, only in val: {only_val}); {LAYOUT_HELP}")
        info = DatasetInfo("imagenet", len(train.classes), 3, CROP_SIZE, "imagenet")
        super().__init__(info, train_size=len(train.samples), test_size=len(val.samples),
                         batch_size=batch_size, eval_batch_size=eval_batch_size, device=device,
                         seed=seed, augment=augment)
        self.root = root
        self.classes = list(train.classes)
        self.workers = int(workers)
        self.train_set = SeededImageFolder(train, train=True)
        self.val_set = SeededImageFolder(val, train=False)

    def _loader(self, dataset, batches, loader_seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator(device="cpu")
        g.manual_seed(loader_seed)  # the loader's worker base seed must not come from the global RNG
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=g)
        try:
            for x, y in loader:
                yield (x.to(self.device, non_blocking=True),
                       y.to(self.device, dtype=torch.int64, non_blocking=True))
        except DataError as e:
            # from a worker, torch re-raises it with the worker's traceback in its text: keep our line
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            raise DataError(lines[-1].removeprefix(f"{DataError.__module__}.{DataError.__qualname__}: ")) from None

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(self.train_size, generator=g).tolist()
        if self.augment:
            seeds = torch.randint(0, 2**62, (self.train_size,), generator=g).tolist()
            keys = list(zip(perm, seeds))
        else:
            keys = perm
        batches = [keys[a:b][self.rank::self.world] for a, b in self._train_bounds()[start_step:]]
        return self._loader(self.train_set, batches, epoch_seed(self.seed, epoch, stream=1))

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = [list(range(a, b)) for a, b in self._test_bounds()]
        return self._loader(self.val_set, batches, 0)
