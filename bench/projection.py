"""Cost projection: device-hours to run each experiment grid at the paper's recipe, from measured step
times, and the fraction of the GPU's peak FLOP/s the training step achieves.

    hours(run) = step time at the recipe batch x steps per epoch x epochs / 3600
    steps per epoch = ceil(train images / batch)  (the loader keeps the last, smaller batch)
    CIFAR: 50000 images, batch 128 -> 391 steps, 300 epochs;  ImageNet: 1281167 images, batch 256 ->
    5005 steps, 100 epochs (the ResNeXt recipe)

A config whose recipe batch does not fit is measured at the largest batch that does and its step time
scaled linearly to the recipe batch (marked in the table). Evaluation passes and checkpoints are not
counted. The masked models compute every branch whatever K is, so one measurement per
{D,w,C} x connectivity serves every K (the K-sweep of Fig. 3 included).

With ``--quick`` (the CPU smoke run) only {20,4,8} is measured, at a small batch, and every other
config is projected from it by its FLOPs (same connectivity kind): a *CPU projection* that shows
the arithmetic works, not GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from maskconnect.io import atomic_write_text

from .common import Context, finish, fmt_num, free_memory, make_record, measure, peak_tflops, result_row
from .workloads import Config, achieved_tflops, flops_per_image, largest_batch, train_workload

# The paper recipe (docs/design.md section 6).
RECIPE = {
    "cifar": {"train_images": 50000, "batch": 128, "epochs": 300},
    "imagenet": {"train_images": 1281167, "batch": 256, "epochs": 100},
}


@dataclass(frozen=True)
class Run:
    """``seeds`` training runs of one config on one dataset (``fan_in`` is C for ``full``)."""

    dataset: str
    arch: str
    connectivity: str
    fan_in: int | None
    seeds: int

    @property
    def layout(self) -> str:
        return "imagenet" if self.dataset == "imagenet" else "cifar"

    @property
    def cost_key(self) -> tuple[str, str, str]:
        """What the step time depends on: layout, {D,w,C} and connectivity (not K, not the dataset's
        number of classes, which only sizes the final linear layer)."""
        return (self.layout, self.arch, self.connectivity)


# The grids' home is maskconnect.experiments (src/maskconnect/grids/*.yaml). It needs pyyaml and jsonschema,
# which a GPU machine with torch alone may lack, so the benchmarks keep this copy as a fallback; a
# test checks that the two agree.
def _cifar100() -> list[Run]:
    runs = []
    for arch in ("29,8,8", "29,64,8"):  # Table 2
        runs += [Run("cifar100", arch, "full", 8, 4), Run("cifar100", arch, "learned", 1, 4),
                 Run("cifar100", arch, "learned", 4, 4), Run("cifar100", arch, "random", 4, 4)]
    runs += [Run("cifar100", "20,4,8", "learned", k, 4) for k in range(1, 8)]  # Fig. 3: K = 1..7
    runs.append(Run("cifar100", "20,4,8", "full", 8, 4))                     # ... and K = C = 8
    return runs


def _cifar10() -> list[Run]:
    return [Run("cifar10", arch, kind, k, 4) for arch in ("20,4,8", "29,8,8", "29,64,8")
            for kind, k in (("full", 8), ("learned", 4), ("random", 4))]


def _imagenet() -> list[Run]:
    runs = []
    for arch, c in (("50,4,32", 32), ("101,4,32", 32), ("101,4,64", 64)):
        runs += [Run("imagenet", arch, "full", c, 1), Run("imagenet", arch, "learned", c // 2, 1),
                 Run("imagenet", arch, "random", c // 2, 1)]
    return runs


def _cifar100_resnet() -> list[Run]:
    runs = []
    for arch, k in (("resnet38", 10), ("resnet74", 15), ("resnet110", 20)):   # Table 1
        runs += [Run("cifar100", arch, "prev", 1, 4), Run("cifar100", arch, "random", k, 4),
                 Run("cifar100", arch, "learned", k, 4)]
    return runs + [Run("cifar100", "resnet38", "learned", k, 4) for k in range(1, 18) if k != 10]   # Fig. 2


def _imagenet_resnet() -> list[Run]:
    return [Run("imagenet", "resnet50", "prev", 1, 1), Run("imagenet", "resnet50", "learned", 10, 1)]


BUILTIN_GRIDS: dict[str, list[Run]] = {"cifar100": _cifar100(), "cifar10": _cifar10(), "imagenet": _imagenet(),
                                       "cifar100-resnet": _cifar100_resnet(), "imagenet-resnet": _imagenet_resnet()}
BUILTIN_GRIDS["paper"] = [r for runs in BUILTIN_GRIDS.values() for r in runs]
GRID_NAMES = ("cifar100", "cifar10", "imagenet", "cifar100-resnet", "imagenet-resnet", "paper")


def suite_grids() -> dict[str, list[Run]]:
    """The paper grids from ``maskconnect.experiments``, one :class:`Run` per config with its seed count.
    Raises ImportError where pyyaml/jsonschema (or the module) are missing."""
    from maskconnect.experiments import load_grid

    grids = {}
    for name in GRID_NAMES:
        counts: dict[tuple, int] = {}
        for r in load_grid(name).runs:
            key = (r.dataset, r.arch, r.connectivity, int(r.fan_in))
            counts[key] = counts.get(key, 0) + 1
        grids[name] = [Run(*key, seeds=n) for key, n in counts.items()]
    return grids


def load_grids() -> tuple[dict[str, list[Run]], str]:
    """The grids to project, and where they came from."""
    try:
        return suite_grids(), "maskconnect.experiments (src/maskconnect/grids/*.yaml)"
    except Exception as e:  # noqa: BLE001 - any failure (missing yaml, a grid file being edited): use the copy
        return BUILTIN_GRIDS, f"bench's built-in copy (maskconnect.experiments unavailable: {type(e).__name__}: {e})"



def steps_per_epoch(layout: str) -> int:
    r = RECIPE[layout]
    return math.ceil(r["train_images"] / r["batch"])


def run_hours(step_seconds: float, layout: str) -> float:
    """Hours of one training run at the recipe, given the step time at the recipe batch."""
    return step_seconds * steps_per_epoch(layout) * RECIPE[layout]["epochs"] / 3600.0


def project(step_seconds: dict[tuple, float], grids: dict[str, list[Run]]) -> dict:
    """Hours per grid from step times at the recipe batch (keyed by :attr:`Run.cost_key`).

    Returns ``{grid: {"runs": n, "hours": h, "by_config": [...]}}``.
    """
    out = {}
    for name, runs in grids.items():
        rows, total, n = [], 0.0, 0
        for r in runs:
            h = run_hours(step_seconds[r.cost_key], r.layout) * r.seeds
            rows.append({"dataset": r.dataset, "arch": r.arch, "connectivity": r.connectivity, "fan_in": r.fan_in,
                         "seeds": r.seeds, "hours": h})
            total += h
            n += r.seeds
        out[name] = {"runs": n, "hours": total, "by_config": rows}
    return out


def grid_flops(grids: dict[str, list[Run]]) -> dict[str, float]:
    """Training FLOPs of each grid at the recipe: forward FLOPs/image x 3 (forward + backward) x training
    images x epochs, summed over runs and seeds. Device-independent: hours on any device at a sustained
    X FLOP/s are this / X / 3600."""
    out = {}
    for name, runs in grids.items():
        total = 0.0
        for r in runs:
            rec = RECIPE[r.layout]
            total += flops_per_image(_config(r.cost_key)) * 3 * rec["train_images"] * rec["epochs"] * r.seeds
        out[name] = total
    return out


def _cost_keys(grids: dict[str, list[Run]]) -> list[tuple]:
    keys = []
    for runs in grids.values():
        for r in runs:
            if r.cost_key not in keys:
                keys.append(r.cost_key)
    return keys


def _config(key: tuple, image_size: int | None = None) -> Config:
    """The model a cost key stands for; a masked one at any valid K (every branch or candidate is computed
    whatever K is): ResNeXt K=4 (CIFAR) or C/2, ResNet K=10 (or its largest)."""
    from maskconnect.specs import make_spec

    layout, arch, kind = key
    dataset = "cifar100" if layout == "cifar" else "imagenet"
    base = make_spec(arch, dataset=dataset)
    if kind == base.connectivity:
        k = None
    elif base.family == "resnet":
        k = min(10, base.max_fan_in)
    else:
        k = 4 if layout == "cifar" else base.cardinality // 2
    return Config(arch, kind, k, dataset=dataset, image_size=image_size)


def run(ctx: Context) -> Path:
    warmup, repeats = ctx.n_warmup(5, 1), ctx.n_steps(20, 2)
    peak, peak_src = peak_tflops(ctx)
    grids, grids_source = load_grids()
    keys = _cost_keys(grids)
    measured: dict[tuple, dict] = {}
    results = []
    proxy_batch = ctx.batch or 8
    to_measure = [k for k in keys if k[0] == "cifar" and k[1] == "20,4,8"] if ctx.quick else keys
    for key in to_measure:
        cfg = _config(key)
        recipe_batch = RECIPE[key[0]]["batch"]
        if ctx.quick:
            batch = proxy_batch
        elif key[0] == "cifar":
            batch = ctx.batch or recipe_batch
        elif ctx.imagenet_batch:
            batch = ctx.imagenet_batch
        elif ctx.cuda:  # the recipe batch, or the largest below it that fits
            batch = largest_batch(cfg, ctx, cap=recipe_batch)
        else:
            batch = 8  # ImageNet on a CPU without --imagenet-batch: small, then scaled
        if batch is None:
            measured[key] = {"step_s": float("nan"), "source": "does not fit at batch 8"}
            continue
        w = train_workload(cfg, batch, ctx)
        m = measure([w], device=ctx.device, warmup=warmup, repeats=repeats)[w.name]
        del w
        free_memory(ctx.device)
        step = m.median * recipe_batch / batch
        ips = m.items_per_s()["median"]
        tf = achieved_tflops(cfg, ips)
        source = "measured" if batch == recipe_batch else f"measured at batch {batch}, scaled to {recipe_batch}"
        measured[key] = {"step_s": step, "source": source, "batch": batch, "tflops": tf}
        results.append(result_row(m, measured_batch=batch, recipe_batch=recipe_batch, step_s_at_recipe_batch=step,
                                  flops_per_image=flops_per_image(cfg), achieved_tflops=tf,
                                  fraction_of_peak=(tf / peak) if peak else None, source=source))
    if ctx.quick:  # project every other config from {20,4,8} of the same kind by FLOPs per image
        for key in keys:
            if key in measured:
                continue
            proxy = ("cifar", "20,4,8", "full" if key[2] == "prev" else key[2])   # a model's own wiring
            scale = flops_per_image(_config(key)) / flops_per_image(_config(proxy))
            recipe_batch = RECIPE[key[0]]["batch"]
            step = measured[proxy]["step_s"] * scale * recipe_batch / RECIPE["cifar"]["batch"]
            measured[key] = {"step_s": step, "source": f"FLOPs-scaled from {{20,4,8}} {key[2]} (x{scale:.1f})"}
    steps = {k: v["step_s"] for k, v in measured.items()}
    proj = project(steps, grids)
    unit = "GPU-hours" if ctx.cuda else "CPU-hours (CPU projection, not GPU-hours)"
    per_key = [{"layout": k[0], "arch": k[1], "connectivity": k[2], "step_s_at_recipe_batch": v["step_s"],
                "epoch_s": v["step_s"] * steps_per_epoch(k[0]), "run_hours": run_hours(v["step_s"], k[0]),
                "flops_per_image": flops_per_image(_config(k)), "source": v["source"],
                "achieved_tflops": v.get("tflops"), "fraction_of_peak": (v["tflops"] / peak) if peak and v.get("tflops") else None}
               for k, v in measured.items()]
    flops = grid_flops(grids)
    for g in proj:
        proj[g]["train_flops"] = flops[g]
    md = markdown(ctx, proj, per_key, unit, peak, peak_src, grids_source)
    md_path = Path(ctx.out) / f"projection-{ctx.env['device_kind']}.md"
    atomic_write_text(md_path, md)
    batch0 = proxy_batch if ctx.quick else RECIPE["cifar"]["batch"]
    rec = make_record(ctx, "projection", batch=batch0, warmup=warmup, repeats=repeats,
                      config={"recipe": RECIPE, "steps_per_epoch": {k: steps_per_epoch(k) for k in RECIPE},
                              "grids": {g: sum(r.seeds for r in rs) for g, rs in grids.items()},
                              "grids_source": grids_source, "unit": unit,
                              "peak_tflops": peak, "peak_source": peak_src,
                              "excluded": "evaluation passes, checkpoints, data download, start-up"},
                      results=results, goals=[],
                      notes=["hours = step time at recipe batch x steps/epoch x epochs x seeds / 3600",
                             "achieved FLOP/s = forward FLOPs/image x 3 x images/s; masked models count all branches"]
                            + (["--quick: CPU projection from {20,4,8} at a small batch, FLOPs-scaled to the other "
                                "configs; NOT GPU-hours"] if ctx.quick else []),
                      extra={"projection": {g: {"runs": v["runs"], "hours": v["hours"], "train_flops": v["train_flops"]}
                                            for g, v in proj.items()},
                             "per_config": per_key, "projection_by_run": {g: v["by_config"] for g, v in proj.items()},
                             "markdown": str(md_path)})
    table = [{"grid": g, "runs": v["runs"], "hours": fmt_num(v["hours"], 4), "days": fmt_num(v["hours"] / 24, 3)}
             for g, v in proj.items()]
    print(md)
    return finish(ctx, rec, table, [("grid", "grid"), ("runs", "runs"), ("hours", unit), ("days", "days (1 device)")])


def markdown(ctx: Context, proj: dict, per_key: list[dict], unit: str, peak, peak_src, grids_source: str) -> str:
    lines = [f"# Cost projection on {ctx.env['device_name']} ({ctx.dtype_name()})", ""]
    if not ctx.cuda:
        lines += ["**CPU projection**: measured on a CPU" + (" with `--quick` ({20,4,8} at a small batch, other "
                  "configs scaled by FLOPs)" if ctx.quick else "") + ". These are CPU-hours, not GPU-hours.", ""]
    lines += [f"Recipe: CIFAR {RECIPE['cifar']['epochs']} epochs x {steps_per_epoch('cifar')} steps (batch 128); "
              f"ImageNet {RECIPE['imagenet']['epochs']} epochs x {steps_per_epoch('imagenet')} steps (batch 256). "
              "Evaluation passes and checkpoints not counted. Device-hours assume data-parallel runs (the "
              "ImageNet grid trains each run on 8 GPUs) scale perfectly: wall-clock time is hours / GPUs per run.",
              f"Grids from {grids_source}.", "",
              "Training compute = forward FLOPs/image x 3 x images x epochs (masked models count every branch); "
              "hours at a sustained X PFLOP/s = EFLOP / X / 3.6.", "",
              f"| grid | runs | training EFLOP | {unit} | days on one device | achieved PFLOP/s (compute / time) |",
              "|---|---:|---:|---:|---:|---:|"]
    for g, v in proj.items():
        lines.append(f"| {g} | {v['runs']} | {v['train_flops'] / 1e18:,.1f} | {v['hours']:,.1f} | {v['hours'] / 24:,.2f} | "
                     f"{v['train_flops'] / (v['hours'] * 3600) / 1e15:.3g} |")
    lines += ["", "| layout | {D,w,C} | connectivity | step s (recipe batch) | epoch s | hours/run | GFLOPs/img (fwd) | "
              "achieved TFLOP/s | of peak | source |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in per_key:
        tf = "-" if r["achieved_tflops"] is None else f"{r['achieved_tflops']:.3g}"
        fr = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}%"
        lines.append(f"| {r['layout']} | {{{r['arch']}}} | {r['connectivity']} | {r['step_s_at_recipe_batch']:.4g} | "
                     f"{r['epoch_s']:.4g} | {r['run_hours']:.4g} | {r['flops_per_image'] / 1e9:.3g} | {tf} | {fr} | {r['source']} |")
    lines += ["", f"Peak: {peak if peak is not None else 'n/a'} TFLOP/s ({peak_src}).", ""]
    return "\n".join(lines)
