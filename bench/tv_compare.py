"""Our Fixed-Full ResNeXt-50 ({50,4,32}) against torchvision's ``resnext50_32x4d``: the same training
step, batch, precision and memory layout, side by side. Before timing, torchvision's weights are
loaded into ours (weight for weight, strict) and the eval outputs compared.

Goal: ours >= 0.95x torchvision's training throughput on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from maskconnect.models import build_model

from .common import Context, finish, fmt_bytes, fmt_num, free_memory, goal, make_record, measure, result_row
from .workloads import Config, train_workload_for_model

GOAL_RATIO = 0.95


@torch.no_grad()
def _same_function(ours: torch.nn.Module, tv: torch.nn.Module, x: torch.Tensor) -> float:
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval(), tv.eval()
    diff = float((ours(x) - tv(x)).abs().max())
    ours.train(), tv.train()
    return diff


def run(ctx: Context) -> Path:
    size = 32 if ctx.quick else None
    batch = ctx.imagenet_batch or (2 if ctx.quick else 256)
    warmup, repeats = ctx.n_warmup(5), ctx.n_steps(20, 3)
    cfg = Config("50,4,32", dataset="imagenet", image_size=size)
    spec = cfg.spec()
    torch.manual_seed(0)
    ours, tv = build_model(spec), torchvision.models.resnext50_32x4d()
    x_check = torch.randn(2, spec.in_channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    diff = _same_function(ours, tv, x_check)
    torch.manual_seed(1)  # fresh weights again for training (the ones just compared are tv's)
    ours = build_model(spec)
    ws = [train_workload_for_model("ours ResNeXt {50,4,32} full", ours, spec, batch, ctx, {"model": "maskconnect"}),
          train_workload_for_model("torchvision resnext50_32x4d", tv, spec, batch, ctx, {"model": "torchvision"})]
    ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
    del ws, ours, tv
    free_memory(ctx.device)
    o, t = ms["ours ResNeXt {50,4,32} full"], ms["torchvision resnext50_32x4d"]
    ratio = t.median / o.median
    results = [result_row(o, throughput_vs_torchvision=ratio), result_row(t, throughput_vs_torchvision=1.0)]
    image = spec.image_size
    goals = [goal("ours_vs_torchvision_resnext50", "our Fixed-Full ResNeXt-50 training throughput / torchvision resnext50_32x4d",
                  value=ratio, threshold=GOAL_RATIO, ctx=ctx, measured_on=f"batch {batch}, {image}x{image} inputs",
                  valid=not ctx.quick, why_not=None if not ctx.quick else "--quick uses 32x32 inputs")]
    rec = make_record(ctx, "torchvision", batch=batch, warmup=warmup, repeats=repeats,
                      config={"image_size": image, "step": "maskconnect.training.step.train_step, SGD lr 0.1 momentum 0.9 wd 1e-4",
                              "weights_check_max_abs_diff_fp32": diff},
                      results=results, goals=goals,
                      notes=["weights_check: torchvision's state dict loads strictly into ours and the fp32 eval "
                             "logits of 2 images differ by at most this much"])
    table = [{"model": r["name"], "batch": r["batch"], "ms": fmt_num(r["median"] * 1e3), "iqr": fmt_num(r["spread"]["iqr"] * 1e3, 2),
              "ips": fmt_num(r["images_per_s"]["median"]), "x": f"{r['throughput_vs_torchvision']:.3f}x",
              "mem": fmt_bytes(r["peak_memory_bytes"])} for r in results]
    print(f"weights: torchvision state dict -> ours (strict), eval logits max |diff| = {diff:.2e}")
    return finish(ctx, rec, table, [("model", "model"), ("batch", "batch"), ("ms", "ms/step"), ("iqr", "IQR ms"),
                                    ("ips", "img/s"), ("x", "vs torchvision"), ("mem", "peak mem")])
