"""The CIFAR data path: a training epoch fed by the device-resident loader
(:class:`maskconnect.data.tensor.TensorDataBundle`: uint8 images on the device, crop + flip +
normalise as batched tensor ops) against the same number of training steps on a fixed batch, and
the loader alone. All three run side by side, one whole epoch per repeat.

The images are real CIFAR-10 when ``--data-dir`` holds it, else random uint8 images of CIFAR's shape
(50000 x 3 x 32 x 32): the loader's work does not depend on pixel values, so the timing is the same.
Goal: the data path adds under 5% to the epoch time (on a GPU). ``--epoch-images`` shortens the epoch
(the loader's share of an epoch does not depend on its length; the record says how long it was).
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskconnect.data import DATASETS, batch_bounds, build_data
from maskconnect.data.sources import CIFAR_STATS
from maskconnect.data.tensor import TensorDataBundle
from maskconnect.training.step import train_step
from maskconnect.errors import MaskConnectError
from maskconnect.models import build_model

from .common import Context, Workload, finish, fmt_num, free_memory, goal, make_record, measure, result_row, tensor_bytes
from .workloads import Config, random_batch, sgd

GOAL_OVERHEAD = 0.05
CIFAR_TRAIN = 50000
ARCHS = ("20,4,8", "29,8,8", "29,64,8")
QUICK_ARCHS = ("20,4,8",)
QUICK_BATCHES = 8  # --quick: an "epoch" of 8 batches


def cifar_bundle(ctx: Context, batch: int, train_size: int) -> tuple[TensorDataBundle, str]:
    """The CIFAR-10 bundle on the device: real files from ``--data-dir`` if given, else random images."""
    if ctx.data_dir:
        try:
            bundle = build_data("cifar10", data_dir=ctx.data_dir, batch_size=batch, device=ctx.device, download=False)
            if train_size < bundle.train_size:  # --quick: keep the first images only
                bundle = TensorDataBundle(bundle.info, bundle.x_train[:train_size], bundle.y_train[:train_size],
                                          bundle.x_test[:batch], bundle.y_test[:batch], mean=bundle.mean.flatten().tolist(),
                                          std=bundle.std.flatten().tolist(), pad=4, flip=True, batch_size=batch,
                                          eval_batch_size=batch, device=ctx.device, seed=0, augment=True)
            return bundle, f"CIFAR-10 from {ctx.data_dir}"
        except MaskConnectError as e:
            print(f"datapath: no CIFAR-10 in {ctx.data_dir} ({e}); using random images of CIFAR's shape")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (train_size, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (train_size,), generator=g)
    mean, std = CIFAR_STATS["cifar10"]
    bundle = TensorDataBundle(DATASETS["cifar10"], x, y, x[:batch], y[:batch], mean=[255 * m for m in mean],
                              std=[255 * s for s in std], pad=4, flip=True, batch_size=batch, eval_batch_size=batch,
                              device=ctx.device, seed=0, augment=True)
    return bundle, "random uint8 images of CIFAR's shape (no CIFAR files given)"


def _epoch_workloads(cfg: Config, bundle: TensorDataBundle, ctx: Context) -> list[Workload]:
    torch.manual_seed(0)
    spec = cfg.spec()
    model = ctx.precision.prepare_model(build_model(spec)).train()
    opt = sgd(model, spec.layout)
    step_model = ctx.maybe_compile(model)
    sizes = [b - a for a, b in batch_bounds(bundle.train_size, bundle.batch_size)]
    x_fixed, y_fixed = random_batch(spec, max(sizes), ctx)
    epoch = {"n": 0}
    n = bundle.train_size

    def with_loader():
        epoch["n"] += 1
        for x, y in bundle.train_batches(epoch["n"]):
            train_step(step_model, opt, ctx.precision.prepare_input(x), y, ctx.precision)

    def step_only():
        for s in sizes:  # the same batch sizes as the loader's epoch (the last one may be smaller)
            train_step(step_model, opt, x_fixed[:s], y_fixed[:s], ctx.precision)

    def loader_only():
        epoch["n"] += 1
        for x, y in bundle.train_batches(epoch["n"]):
            ctx.precision.prepare_input(x)

    info = {"config": cfg.as_dict(), "train_images": n, "steps_per_epoch": len(sizes)}
    res = tensor_bytes(model, x_fixed, bundle.x_train)
    return [Workload(f"{cfg.label} epoch: loader + step", with_loader, n, res, {**info, "part": "loader+step"}),
            Workload(f"{cfg.label} epoch: step only", step_only, n, res, {**info, "part": "step only (fixed batch)"}),
            Workload(f"{cfg.label} epoch: loader only", loader_only, n, res, {**info, "part": "loader only"})]


def run(ctx: Context) -> Path:
    batch = ctx.cifar_batch()
    warmup, repeats = ctx.n_warmup(1), ctx.n_steps(3, 2)
    archs = QUICK_ARCHS if ctx.quick else ARCHS
    train_size = ctx.epoch_images or (batch * QUICK_BATCHES if ctx.quick else CIFAR_TRAIN)
    bundle, source = cifar_bundle(ctx, batch, train_size)
    results, overheads = [], {}
    for arch in archs:
        ws = _epoch_workloads(Config(arch), bundle, ctx)
        ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
        full, step, loader = (ms[w.name] for w in ws)
        overheads[arch] = full.median / step.median - 1.0
        for m in (full, step, loader):
            results.append(result_row(m, batch=batch, unit="seconds per epoch", epoch_vs_step_only=m.median / step.median,
                                      loader_overhead=overheads[arch]))
        del ws
        free_memory(ctx.device)
    worst = max(overheads, key=overheads.get)
    full_set = tuple(archs) == ARCHS
    goals = [goal("datapath_overhead", "CIFAR epoch time with the device-resident loader / training steps alone - 1 "
                  "(worst config)", value=overheads[worst], threshold=GOAL_OVERHEAD, below=True, ctx=ctx,
                  measured_on=f"Fixed-Full {', '.join('{' + a + '}' for a in archs)} (worst: {{{worst}}}), batch {batch}, "
                              f"{train_size} images/epoch",
                  valid=full_set, why_not=None if full_set else "--quick: one small config")]
    rec = make_record(ctx, "datapath", batch=batch, warmup=warmup, repeats=repeats,
                      config={"archs": list(archs), "connectivity": "full (the fastest step: the worst case for the "
                              "loader's share)", "images": source, "train_images": train_size,
                              "augmentation": "zero-pad 4, random 32x32 crop, horizontal flip, normalise (on the device)",
                              "unit": "one epoch per repeat"},
                      results=results, goals=goals,
                      notes=["loader_overhead = epoch(loader + step) / epoch(step only) - 1",
                             "loader only: the batches are produced (and put in the training layout) but not used"])
    table = [{"part": r["name"], "s": fmt_num(r["median"]), "iqr": fmt_num(r["spread"]["iqr"], 2),
              "ips": fmt_num(r["images_per_s"]["median"]), "rel": f"{r['epoch_vs_step_only']:.3f}"} for r in results]
    return finish(ctx, rec, table, [("part", "epoch of"), ("s", "s/epoch"), ("iqr", "IQR s"), ("ips", "img/s"),
                                    ("rel", "vs step only")])
