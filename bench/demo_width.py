"""The demo network's training step at the paper's stage width and at the demo grid's, side by side.

digits {20,4,8} (8x8 images, batch 64 as the demo recipe), Fixed-Full and Learned K=1, 2, 4, at stage
width 64 (the paper's {20,4,8}) and 32 (``stage_width`` in src/maskconnect/grids/demo.yaml). The
masked model keeps the C branch outputs of a module apart, C times the tensors of ResNeXt, and a CPU
step is bound by moving them through memory: its time follows the stage width, while Fixed-Full's
does much less. Every K computes every branch, so the K's differ only by the mask sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskconnect.connectivity import count_weights
from maskconnect.models import build_model
from maskconnect.specs import make_spec

from .common import Context, finish, fmt_num, free_memory, make_record, measure, result_row
from .workloads import train_workload_for_model

ARCH = "20,4,8"
WIDTHS = (64, 32)  # the paper's, the demo grid's
KINDS = (("full", None), ("learned", 1), ("learned", 2), ("learned", 4))
DEMO_BATCH = 64


def run(ctx: Context) -> Path:
    batch = ctx.batch or DEMO_BATCH
    warmup, repeats = ctx.n_warmup(2), ctx.n_steps(10 if ctx.quick else 30)
    ws = []
    for width in WIDTHS:
        for conn, k in KINDS:
            torch.manual_seed(0)
            spec = make_spec(ARCH, connectivity=conn, fan_in=k, dataset="digits", stage_width=width)
            model = build_model(spec)
            name = f"{{{ARCH}}} w{width} " + ("full" if conn == "full" else f"learned K={k}")
            ws.append(train_workload_for_model(
                name, model, spec, batch, ctx,
                info={"stage_width": width, "connectivity": conn, "fan_in": spec.fan_in,
                      "params": count_weights(model)}))
    # measure() interleaves the workloads' repeats, so both widths see the same machine state
    ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
    by = {(w.info["stage_width"], w.info["connectivity"], w.info["fan_in"]): ms[w.name] for w in ws}
    results = [result_row(m, time_vs_width_64=m.median / by[(WIDTHS[0], conn, k)].median,
                          time_vs_full_same_width=m.median / by[(width, "full", 8)].median)
               for (width, conn, k), m in by.items()]
    del ws
    free_memory(ctx.device)
    rec = make_record(ctx, "demo-width", batch=batch, warmup=warmup, repeats=repeats,
                      config={"arch": ARCH, "dataset": "digits", "stage_widths": list(WIDTHS),
                              "work": "training step (forward, backward, SGD step, mask rule), one fixed batch"},
                      results=results, goals=[],
                      notes=["time_vs_width_64: median step time over the same model at the paper's stage width 64",
                             "time_vs_full_same_width: median step time over Fixed-Full at the same stage width",
                             "decides grids/demo.yaml's stage width (docs/mask_rules.md section 3); no goal of its own"])
    table = [{"model": r["name"], "params": f"{r['params'] / 1e6:.3f}M", "ms": fmt_num(r["median"] * 1e3),
              "v64": f"{r['time_vs_width_64']:.2f}", "vf": f"{r['time_vs_full_same_width']:.2f}"} for r in results]
    return finish(ctx, rec, table, [("model", "model"), ("params", "params"), ("ms", "ms/step"),
                                    ("v64", "time / width 64"), ("vf", "time / Full")])
