"""Inference (eval mode, no autograd): the pruned learned K=1 model against the same model unpruned and
against Fixed-Full, side by side.

The learned model is untrained: its real-valued masks are drawn uniformly at random (seeded) and
frozen to their top-1, which prunes like a Fixed-Random K=1 network. A trained model prunes
differently (the paper's {29,64,8} learned K=1: 34.4M -> 20.5M parameters), so read the speed-up
together with the parameter and FLOP counts recorded beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskconnect.connectivity import count_weights, freeze_masks
from maskconnect.models.counting import count_flops
from maskconnect.models import build_model
from maskconnect.models.pruning import prune

from .common import Context, Workload, finish, fmt_bytes, fmt_num, free_memory, make_record, measure, result_row, tensor_bytes
from .workloads import Config, random_batch

ARCHS = ("20,4,8", "29,8,8", "29,64,8")
QUICK_ARCHS = ("20,4,8",)


def _models(arch: str, seed: int = 0):
    full_cfg, k1_cfg = Config(arch), Config(arch, "learned", 1)
    torch.manual_seed(seed)
    full = build_model(full_cfg.spec()).eval()
    learned = build_model(k1_cfg.spec()).eval()
    with torch.no_grad():
        learned.masks.real.copy_(torch.rand(learned.masks.real.shape, generator=torch.Generator().manual_seed(seed)))
    freeze_masks(learned)
    pruned = prune(learned).eval()
    return [("Fixed-Full", full_cfg, full), ("learned K=1 unpruned", k1_cfg, learned), ("learned K=1 pruned", k1_cfg, pruned)]


def _infer(model, x, ctx: Context):
    def fn():
        with torch.inference_mode(), ctx.precision.autocast():
            return model(x)
    return fn


def run(ctx: Context) -> Path:
    batch = ctx.cifar_batch()
    warmup, repeats = ctx.n_warmup(10), ctx.n_steps(30)
    archs = QUICK_ARCHS if ctx.quick else ARCHS
    results = []
    for arch in archs:
        models = _models(arch)
        spec = models[1][1].spec()
        shape = (spec.in_channels, spec.image_size, spec.image_size)
        x_check = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            prune_diff = float((models[1][2](x_check) - models[2][2](x_check)).abs().max())
        x, _ = random_batch(spec, batch, ctx)
        ws = []
        for kind, cfg, model in models:
            info = {"config": cfg.as_dict(), "model": kind, "params": count_weights(model),
                    "branches_per_module": getattr(model, "branches", None), "flops_per_image": count_flops(model, shape)}
            model = ctx.precision.prepare_model(model).eval()
            ws.append(Workload(f"{{{arch}}} {kind}", _infer(ctx.maybe_compile(model), x, ctx), batch,
                               tensor_bytes(model, x), info))
        ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
        full_t, unpruned_t = ms[ws[0].name].median, ms[ws[1].name].median
        for w in ws:
            m = ms[w.name]
            results.append(result_row(m, speed_vs_full=full_t / m.median, speed_vs_unpruned=unpruned_t / m.median,
                                      pruned_vs_unpruned_max_abs_diff_fp32=prune_diff))
        del ws, models
        free_memory(ctx.device)
    rec = make_record(ctx, "inference", batch=batch, warmup=warmup, repeats=repeats,
                      config={"archs": list(archs), "work": "eval-mode forward under torch.inference_mode",
                              "learned_masks": "untrained: uniform random real-valued masks (seed 0), frozen to top-1"},
                      results=results, goals=[],
                      notes=["no benchmark goal for inference; speed_vs_* are images/s ratios within one {D,w,C}",
                             "pruned_vs_unpruned_max_abs_diff_fp32: eval logits of the pruned and unpruned model, 4 images"])
    table = [{"model": r["name"], "batch": r["batch"], "params": f"{r['params'] / 1e6:.3f}M",
              "flops": f"{r['flops_per_image'] / 1e9:.3f}G", "ms": fmt_num(r["median"] * 1e3),
              "ips": fmt_num(r["images_per_s"]["median"]), "vf": f"{r['speed_vs_full']:.2f}x",
              "vu": f"{r['speed_vs_unpruned']:.2f}x", "mem": fmt_bytes(r["peak_memory_bytes"])} for r in results]
    return finish(ctx, rec, table, [("model", "model"), ("batch", "batch"), ("params", "params"), ("flops", "FLOPs/img"),
                                    ("ms", "ms/batch"), ("ips", "img/s"), ("vf", "vs full"), ("vu", "vs unpruned"),
                                    ("mem", "peak mem")])
