"""The data path and multi-GPU training on this device.

* Data: the bundle a run builds on this device (CIFAR and digits held on the device and augmented
  there; ImageNet through a DataLoader) against a reference written here with torchvision's own
  transforms, sample by sample, on the CPU: pad, crop at the epoch's drawn offsets, mirror at the
  drawn flips, normalise. Where the dataset's files are not here (a GPU box that downloads CIFAR in
  the pipeline's prepare_data step, or no network), the same code runs on stand-in images of the
  dataset's shape and dtype, and the record says so.
* Throughput (``loader_times``): one training batch and one test batch as the run's bundle serves
  them at the grid's batch, timed like the steps (the real files where they are here, else the
  stand-in images: the device-resident loader's cost per batch does not depend on what the images show).
* DDP: with more than one GPU visible, a few training steps under DistributedDataParallel (NCCL), one
  process per GPU; the masks must be identical on every rank afterwards (every rank draws from the same
  seeded RNG, and the mask gradients are all-reduced).
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torchvision.transforms.v2.functional as TF

from ..data import DATASETS, build_data
from ..data.tensor import TensorDataBundle
from ..errors import MaskConnectError

PAD = {"digits": 1, "cifar10": 4, "cifar100": 4, "synthetic": 0}
FLIP = {"digits": False, "cifar10": True, "cifar100": True, "synthetic": False}
BATCHES = 3


def _bundle(dataset: str, device: torch.device, batch: int, data_dir: str | None,
            eval_batch: int | None = None) -> tuple[TensorDataBundle, str]:
    """The run's bundle on ``device``, or one over stand-in images of the dataset's shape."""
    eval_batch = eval_batch or batch
    try:
        return build_data(dataset, data_dir=data_dir, batch_size=batch, eval_batch_size=eval_batch, device=device,
                          seed=0, download=False), "the dataset's files"
    except MaskConnectError as e:
        info = DATASETS[dataset]
        g = torch.Generator().manual_seed(0)
        n = max(4 * batch + 3, eval_batch)
        x = torch.randint(0, 256, (n, info.in_channels, info.image_size, info.image_size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, info.num_classes, (n,), generator=g)
        mean, std = [120.0] * info.in_channels, [60.0] * info.in_channels
        bundle = TensorDataBundle(info, x, y, x[:eval_batch], y[:eval_batch], mean=mean, std=std, pad=PAD[dataset],
                                  flip=FLIP[dataset], batch_size=batch, eval_batch_size=eval_batch, device=device,
                                  seed=0, augment=True)
        return bundle, f"stand-in images of the dataset's shape ({str(e).splitlines()[0]})"


def data_check(dataset: str, device: torch.device, batch: int, data_dir: str | None = None) -> dict:
    """The first batches of epoch 1 as the device's bundle serves them, against torchvision's
    transforms applied sample by sample to the same raw images with the same draws."""
    if dataset == "imagenet":
        return _imagefolder_check(device, batch, data_dir)
    bundle, source = _bundle(dataset, device, batch, data_dir)
    draws = bundle.epoch_draws(1)
    raw = bundle.x_train.cpu()
    mean, std = bundle.mean.cpu()[0], bundle.std.cpu()[0]
    worst, compared = 0.0, 0
    for b, ((x, y), (a, z)) in enumerate(zip(bundle.train_batches(1), bundle._train_bounds())):
        if b == BATCHES:
            break
        idx = draws["perm"][a:z]
        if not torch.equal(y.cpu(), bundle.y_train.cpu()[idx]):
            return {"passed": False, "error": f"batch {b}: labels differ from the epoch's permutation", "source": source}
        for i, j in enumerate(idx.tolist()):
            img = raw[j]
            if bundle.augment and bundle.pad:
                img = TF.pad(img, [bundle.pad], fill=0)
                img = TF.crop(img, int(draws["dy"][a + i]), int(draws["dx"][a + i]), raw.shape[-2], raw.shape[-1])
            if draws["flip"] is not None and bool(draws["flip"][a + i]):
                img = TF.horizontal_flip(img)
            want = (img.float() - mean) / std
            worst = max(worst, float((x[i].cpu() - want).abs().max()))
            compared += 1
    return {"passed": worst <= 1e-5, "max_abs_difference": worst, "bound": 1e-5, "images": compared,
            "source": source, "device": str(bundle.device), "path": "tensors on the device, augmented there",
            "reference": "torchvision.transforms.v2.functional pad/crop/horizontal_flip per sample, on the CPU"}


def _imagefolder_check(device: torch.device, batch: int, data_dir: str | None) -> dict:
    """ImageNet: the DataLoader with its workers against the same dataset read in this process."""
    try:
        loaded = build_data("imagenet", data_dir=data_dir, batch_size=min(batch, 8), device=device, seed=0, workers=2)
        inline = build_data("imagenet", data_dir=data_dir, batch_size=min(batch, 8), device="cpu", seed=0, workers=0)
    except MaskConnectError as e:
        return {"passed": True, "skipped": f"no ImageNet here ({str(e).splitlines()[0]}); "
                                          "tests/test_data.py covers the ImageFolder path on written images"}
    (x1, y1), (x2, y2) = next(iter(loaded.train_batches(0))), next(iter(inline.train_batches(0)))
    diff = float((x1.cpu() - x2).abs().max())
    return {"passed": diff <= 1e-5 and torch.equal(y1.cpu(), y2), "max_abs_difference": diff, "bound": 1e-5,
            "path": "DataLoader, 2 workers", "reference": "the same dataset read in this process"}


def _cycle(batches):
    """Endless batches: ``batches(epoch)`` for epoch 0, 1, ..."""
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1


def loader_times(dataset: str, device: torch.device, batch: int, eval_batch: int, *, repeats: int,
                 data_dir: str | None = None, workers: int = 4, synthetic: dict | None = None) -> dict:
    """Seconds per training batch and per test batch of the run's bundle (``timing.time_calls`` records),
    its source, and whether it loads asynchronously (a DataLoader with workers: ImageNet)."""
    from .timing import time_calls

    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if dataset == "imagenet":
        try:
            bundle = build_data("imagenet", data_dir=data_dir, batch_size=batch, eval_batch_size=eval_batch,
                                device=device, seed=0, workers=workers)
        except MaskConnectError as e:
            return {"skipped": f"no ImageNet here ({str(e).splitlines()[0]}): data loading not priced"}
        source, asynchronous = "the dataset's files", workers > 0
    elif dataset == "synthetic":
        bundle = build_data("synthetic", batch_size=batch, eval_batch_size=eval_batch, device=device, seed=0,
                            synthetic=synthetic or None)
        source, asynchronous = "synthetic tensors", False
    else:
        bundle, source = _bundle(dataset, device, batch, data_dir, eval_batch)
        asynchronous = False
    train, test = _cycle(bundle.train_batches), _cycle(lambda _: bundle.test_batches())
    return {"source": source, "asynchronous": asynchronous, "batch": batch, "eval_batch": eval_batch,
            "train_batch": time_calls(lambda: next(train), device, warmup=1, repeats=repeats, threads=threads),
            "test_batch": time_calls(lambda: next(test), device, warmup=1, repeats=max(3, repeats // 2), threads=threads)}


# --- DDP -------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, backend: str, device_type: str, port: int, out_dir: str, spec_kw: dict) -> None:
    from ..connectivity import param_groups
    from ..training.step import Precision, train_step
    from ..models import build_model
    from ..specs import make_spec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # every rank: the same initial weights and the same mask draws
        precision = Precision.for_device(device)
        model = precision.prepare_model(build_model(make_spec(**spec_kw)))
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4, mask_lr=1.0), lr=0.1, momentum=0.9)
        spec = model.spec
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a sharded loader gives
        for _ in range(3):
            x = torch.randn(4, spec.in_channels, spec.image_size, spec.image_size, generator=g)
            y = torch.randint(0, spec.num_classes, (4,), generator=g)
            train_step(ddp, opt, precision.prepare_input(x), y.to(device), precision)
        torch.save({"masks": model.masks.real.detach().cpu(), "draw": model.masks.last_sample.cpu()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def ddp_check(world: int, *, backend: str = "nccl", device_type: str = "cuda", spec_kw: dict | None = None) -> dict:
    """Three DDP training steps of a learned model on ``world`` processes; the real-valued masks and
    the last mask draw must be identical on every rank, and have moved."""
    import torch.multiprocessing as mp

    spec_kw = spec_kw or {"arch": "11,2,4", "dataset": "cifar10", "connectivity": "learned", "fan_in": 2, "stage_width": 16}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(world, backend, device_type, _free_port(), tmp, spec_kw), nprocs=world, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    same = all(torch.equal(g["masks"], got[0]["masks"]) and torch.equal(g["draw"], got[0]["draw"]) for g in got)
    moved = bool((got[0]["masks"] - got[0]["masks"].mean()).abs().max() > 0)
    return {"passed": same and moved, "ranks": world, "backend": backend, "masks_identical": same,
            "masks_moved": moved, "steps": 3}
