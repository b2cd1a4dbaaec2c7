"""Training-step throughput (images/s) and peak memory.

Every CIFAR config x {full, random K=4, learned K=4} at batch 128, the three kinds of one {D,w,C}
side by side; and ImageNet {50,4,32} full vs learned K=16 at the largest batch that fits (on CUDA:
each at its own largest batch, and both side by side at the largest batch both fit).
Goal: learned K=4 >= 0.85x Fixed-Full for {29,64,8} on the same GPU (the paper reports ~0.72x).
"""

from __future__ import annotations

from pathlib import Path

from .common import (Context, finish, fmt_bytes, fmt_num, free_memory, goal, make_record, measure, peak_tflops,
                     result_row)
from .workloads import Config, achieved_tflops, flops_per_image, largest_batch, train_workload

CIFAR_ARCHS = ("20,4,8", "29,8,8", "29,64,8")
QUICK_CIFAR_ARCHS = ("20,4,8",)
GOAL_ARCH = "29,64,8"
GOAL_RATIO = 0.85
CPU_GOAL_RATIO = 0.6  # a goal for the CPU itself (bench/README.md, Goals)


def _rows_for(ms: dict, cfgs: list[Config], group: str, ctx: Context, peak: float | None) -> list[dict]:
    base = ms[cfgs[0].label].median
    rows = []
    for c in cfgs:
        m = ms[c.label]
        ips = m.items_per_s()["median"]
        tf = achieved_tflops(c, ips)
        rows.append(result_row(m, group=group, throughput_vs_first=base / m.median,
                               flops_per_image=flops_per_image(c), achieved_tflops=tf, fraction_of_peak=(tf / peak) if peak else None))
    return rows


def _side_by_side(cfgs: list[Config], batch: int, group: str, ctx: Context, warmup: int, repeats: int,
                  peak: float | None) -> list[dict]:
    workloads = [train_workload(c, batch, ctx) for c in cfgs]
    ms = measure(workloads, device=ctx.device, warmup=warmup, repeats=repeats)
    del workloads
    free_memory(ctx.device)
    return _rows_for(ms, cfgs, group, ctx, peak)


def run(ctx: Context) -> Path:
    batch = ctx.cifar_batch()
    warmup, repeats = ctx.n_warmup(10), ctx.n_steps(30)
    peak, peak_src = peak_tflops(ctx)
    archs = QUICK_CIFAR_ARCHS if ctx.quick else CIFAR_ARCHS
    results: list[dict] = []
    for arch in archs:
        cfgs = [Config(arch), Config(arch, "random", 4), Config(arch, "learned", 4)]
        results += _side_by_side(cfgs, batch, f"cifar {{{arch}}} batch {batch}", ctx, warmup, repeats, peak)

    # ImageNet {50,4,32}: full vs learned K=16.
    size = 32 if ctx.quick else None
    inet = [Config("50,4,32", dataset="imagenet", image_size=size),
            Config("50,4,32", "learned", 16, dataset="imagenet", image_size=size)]
    iw, ir = ctx.n_warmup(5), ctx.n_steps(15, 2)
    notes = []
    if ctx.imagenet_batch is not None or not ctx.cuda:
        ib = ctx.imagenet_batch or (2 if ctx.quick else 16)
        results += _side_by_side(inet, ib, f"imagenet {{50,4,32}} batch {ib} (side by side)", ctx, iw, ir, peak)
        notes.append(f"ImageNet batch {ib} was {'given' if ctx.imagenet_batch else 'fixed (no GPU: no largest-batch search)'}"
                     + (", inputs 32x32 (--quick)" if ctx.quick else ""))
    else:
        best = {c.label: largest_batch(c, ctx) for c in inet}
        for c in inet:
            if best[c.label]:
                results += _side_by_side([c], best[c.label], f"imagenet {{50,4,32}} own largest batch {best[c.label]}",
                                         ctx, iw, ir, peak)
        common = min((b for b in best.values() if b), default=None)
        if common:
            results += _side_by_side(inet, common, f"imagenet {{50,4,32}} batch {common} (side by side)", ctx, iw, ir, peak)
        notes.append(f"largest batch that fits (doubling from 8, one midpoint refinement): {best}")

    g_rows = [r for r in results if r["config"]["arch"] == GOAL_ARCH and r["config"]["dataset"] == "cifar100"]
    goal_arch = GOAL_ARCH if g_rows else archs[-1]
    rows = [r for r in results if r["config"]["arch"] == goal_arch and r["config"]["dataset"] == "cifar100"]
    learned = next(r for r in rows if r["config"]["connectivity"] == "learned")
    goals = [goal("learned_k4_vs_full_throughput", f"learned K=4 training throughput / Fixed-Full, {{{GOAL_ARCH}}}, same GPU",
                  value=learned["throughput_vs_first"], threshold=GOAL_RATIO, ctx=ctx,
                  measured_on=f"{{{goal_arch}}} batch {batch}", valid=goal_arch == GOAL_ARCH,
                  why_not=None if goal_arch == GOAL_ARCH else f"--quick measured {{{goal_arch}}}, not {{{GOAL_ARCH}}}"),
             # a goal for the CPU itself (fp32, side by side in one process)
             goal("learned_k4_vs_full_throughput_cpu", f"learned K=4 training throughput / Fixed-Full, {{{GOAL_ARCH}}}, "
                  "same CPU (CPU goal)", value=learned["throughput_vs_first"], threshold=CPU_GOAL_RATIO, ctx=ctx,
                  measured_on=f"{{{goal_arch}}} batch {batch}", gpu_only=False,
                  valid=goal_arch == GOAL_ARCH and not ctx.cuda,
                  why_not=("a CPU goal, measured on a GPU" if ctx.cuda
                           else f"--quick measured {{{goal_arch}}}, not {{{GOAL_ARCH}}}"))]
    if peak is None:
        notes.append(f"fraction of peak not computed: {peak_src}")
    rec = make_record(ctx, "throughput", batch=batch, warmup=warmup, repeats=repeats,
                      config={"cifar_archs": list(archs), "kinds": ["full", "random K=4", "learned K=4"],
                              "imagenet": [c.label for c in inet], "imagenet_warmup": iw, "imagenet_repeats": ir,
                              "optimizer": "SGD lr 0.1 momentum 0.9 (weight decay 5e-4 CIFAR, 1e-4 ImageNet)",
                              "step": "maskconnect.training.step.train_step on one fixed random batch",
                              "peak_tflops": peak, "peak_source": peak_src},
                      results=results, goals=goals,
                      notes=notes + ["throughput_vs_first: images/s relative to the first workload of the group (full)",
                                     "achieved_tflops = forward FLOPs/image x 3 x images/s (masked models count all branches)"])
    table = [{"group": r["group"], "model": r["name"], "batch": r["batch"], "ms": fmt_num(r["median"] * 1e3),
              "iqr": fmt_num(r["spread"]["iqr"] * 1e3, 2), "ips": fmt_num(r["images_per_s"]["median"]),
              "vs": f"{r['throughput_vs_first']:.2f}x", "mem": fmt_bytes(r["peak_memory_bytes"]),
              "tf": fmt_num(r["achieved_tflops"])} for r in results]
    return finish(ctx, rec, table, [("group", "group"), ("model", "model"), ("batch", "batch"), ("ms", "ms/step"),
                                    ("iqr", "IQR ms"), ("ips", "img/s"), ("vs", "vs full"), ("mem", "peak mem"),
                                    ("tf", "TFLOP/s")])
