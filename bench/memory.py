"""Memory kept for the backward pass: bytes per training image, exact and device-independent (docs/design.md section 10).

One training-mode forward pass (fp32, NCHW, no autocast) runs under
``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves is noted by its storage, and
the distinct storages (deduplicated by data pointer: a view, or a tensor saved by two nodes, counts once)
are summed. Parameters are counted apart: they are kept whatever the batch, so they are not "per image".

    activation bytes per image = (saved bytes of non-parameter storages at batch B) / B

which is exact up to the few batch-independent tensors autograd also saves (BN batch mean and inverse
std, the masks: a few KiB). The masked models are measured twice, side by side: the memory-saving
training path (``MaskedResNeXt.save_memory``, the default) and the plain autograd path. On CUDA the
record adds the peak allocated memory of one training step (forward + backward) at the same batch, in
the training precision (bf16 autocast + channels_last), above what the model holds before the step.

The largest batch that fits on an 80 GB GPU is an estimate derived from these numbers:

    floor((80e9 bytes - 3 x parameter bytes) / activation bytes per image)

(weights, their gradients and SGD momentum, all fp32; activations in fp32 as measured). It ignores the
backward pass's transient tensors, the allocator's fragmentation and the workspace of cuDNN, so a real run
fits somewhat less; bf16 autocast keeps most activations in half the bytes, so it fits somewhat more.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from maskconnect import kernels
from maskconnect.models.counting import count_flops, saved_bytes  # noqa: F401 (saved_bytes: re-exported)
from maskconnect.models import build_model

from .common import Context, finish, fmt_num, free_memory, goal, make_record
from .workloads import Config, random_batch

CIFAR_ARCHS = ("20,4,8", "29,8,8", "29,64,8")
QUICK_CIFAR_ARCHS = ("20,4,8",)
IMAGENET_ARCH, IMAGENET_K = "50,4,32", 16
CIFAR_K = 4
# The paper grid's other ImageNet models, at K = C/2 (full run only; no plain path: it is large and slow)
EXTRA_IMAGENET = (("101,4,32", 16), ("101,4,64", 32))
GPU_BYTES = 80 * 10**9  # "80 GB" as sold (H100/A100 80GB)

# Goal: learned / full activation bytes per image, at most ~10% above the floor (one branch tensor
# per masked module on top of ResNeXt's own tensors).
GOAL_RATIO = {"29,64,8": 1.6, "20,4,8": 2.2, IMAGENET_ARCH: 7.5}


def _cuda_peak_step(model: nn.Module, x: torch.Tensor, ctx: Context) -> int:
    """Peak allocated bytes of one forward + backward above what is allocated before it (CUDA)."""
    model = ctx.precision.prepare_model(model).train()
    x = ctx.precision.prepare_input(x)
    free_memory(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    with ctx.precision.autocast():
        out = model(x)
    out.float().square().mean().backward()
    torch.cuda.synchronize(ctx.device)
    peak = torch.cuda.max_memory_allocated(ctx.device) - base
    model.zero_grad(set_to_none=True)
    return int(peak)


def _measure(cfg: Config, batch: int, ctx: Context, save_memory: bool | None) -> dict:
    torch.manual_seed(0)
    spec = cfg.spec()
    model = build_model(spec).train()
    if save_memory is not None:
        model.save_memory = save_memory
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x_cpu = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size,
                        generator=torch.Generator().manual_seed(0))
    # exact count: fp32 NCHW on this device, no autocast (the same on every device). The plain path is
    # measured as it was before the memory-saving path, with grouped convolutions: the CPU's batched-matmul form of the
    # grouped 1x1 convs would make autograd keep a per-image copy of their weights there.
    model_dev = model.to(ctx.device)
    as_matmul = kernels.current().grouped_1x1_as_matmul_on_cpu and save_memory is not False
    with kernels.options(grouped_1x1_as_matmul_on_cpu=as_matmul):
        s = saved_bytes(model_dev, x_cpu.to(ctx.device))
    per_image = s["activations"] / batch
    row = {"name": cfg.label + ("" if save_memory is None else (" (saving path)" if save_memory else " (plain path)")),
           "label": cfg.label, "config": cfg.as_dict(), "path": None if save_memory is None else ("saving" if save_memory else "plain"),
           "batch": batch, "saved_activation_bytes": s["activations"], "saved_parameter_bytes": s["parameters"],
           "saved_tensors": s["tensors"], "activation_bytes_per_image": per_image,
           # the baseline measure (every saved storage incl. parameters, at batch 2, / 2); batch-dependent
           "issue_measure_bytes_per_image": (s["activations"] + s["parameters"]) / batch,
           "parameter_bytes": param_bytes,
           "batch_80gb_estimate": int((GPU_BYTES - 3 * param_bytes) // per_image),
           "forward_flops_per_image": count_flops(model_dev, (spec.in_channels, spec.image_size, spec.image_size))}
    if ctx.cuda:
        x, _ = random_batch(spec, batch, ctx)
        row["cuda_step_peak_bytes"] = _cuda_peak_step(model_dev, x, ctx)
        row["cuda_step_peak_kind"] = f"max_memory_allocated above the model, one fwd+bwd, {ctx.dtype_name()}"
    del model, model_dev
    free_memory(ctx.device)
    return row


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def run(ctx: Context) -> Path:
    cifar_batch = ctx.batch if ctx.batch is not None else 2
    # quick: 32x32 inputs leave 1x1 maps in the last stage, where training-mode BN needs two images
    inet_batch = ctx.imagenet_batch if ctx.imagenet_batch is not None else (2 if ctx.quick else 1)
    size = 32 if ctx.quick else None
    groups = [(Config(a), Config(a, "random", CIFAR_K), Config(a, "learned", CIFAR_K), cifar_batch)
              for a in (QUICK_CIFAR_ARCHS if ctx.quick else CIFAR_ARCHS)]
    groups.append((Config(IMAGENET_ARCH, dataset="imagenet", image_size=size),
                   Config(IMAGENET_ARCH, "random", IMAGENET_K, dataset="imagenet", image_size=size),
                   Config(IMAGENET_ARCH, "learned", IMAGENET_K, dataset="imagenet", image_size=size), inet_batch))
    results, goals = [], []
    for full, rnd, lrn, batch in groups:
        rows = {"full": _measure(full, batch, ctx, None)}
        for kind, cfg in (("random", rnd), ("learned", lrn)):
            for path in (True, False):
                rows[f"{kind}-{'saving' if path else 'plain'}"] = _measure(cfg, batch, ctx, path)
        base = rows["full"]["activation_bytes_per_image"]
        for r in rows.values():
            r["vs_full"] = r["activation_bytes_per_image"] / base
            r["issue_measure_vs_full"] = r["issue_measure_bytes_per_image"] / rows["full"]["issue_measure_bytes_per_image"]
        results += list(rows.values())
        arch = full.arch
        if arch in GOAL_RATIO:
            valid = full.image_size is None
            why = "--quick measures ImageNet models at 32x32 inputs" if not valid else None
            goals.append(goal(f"saved_bytes_learned_vs_full_{arch.replace(',', '_')}",
                              f"saved activation bytes per image, learned K={lrn.fan_in} / Fixed-Full, {{{arch}}}",
                              value=rows["learned-saving"]["vs_full"], threshold=GOAL_RATIO[arch], ctx=ctx,
                              measured_on=f"{{{arch}}} batch {batch}", below=True, gpu_only=False, valid=valid,
                              why_not=why))
            goals.append(goal(f"saved_bytes_learned_vs_random_{arch.replace(',', '_')}",
                              f"saved activation bytes per image, learned / random K={lrn.fan_in} (random no more "
                              f"than learned), {{{arch}}}",
                              value=rows["learned-saving"]["activation_bytes_per_image"]
                              / rows["random-saving"]["activation_bytes_per_image"], threshold=1.0, ctx=ctx,
                              measured_on=f"{{{arch}}} batch {batch}", gpu_only=False, valid=valid, why_not=why))
    if not ctx.quick:  # the grid's other ImageNet models (K = C/2): Fixed-Full and the learned training path
        for arch, k in EXTRA_IMAGENET:
            full = _measure(Config(arch, dataset="imagenet"), inet_batch, ctx, None)
            lrn = _measure(Config(arch, "learned", k, dataset="imagenet"), inet_batch, ctx, True)
            for r in (full, lrn):
                r["vs_full"] = r["activation_bytes_per_image"] / full["activation_bytes_per_image"]
                r["issue_measure_vs_full"] = r["issue_measure_bytes_per_image"] / full["issue_measure_bytes_per_image"]
            results += [full, lrn]
    rec = make_record(ctx, "memory", batch=cifar_batch, warmup=0, repeats=1,
                      config={"cifar_batch": cifar_batch, "imagenet_batch": inet_batch, "cifar_fan_in": CIFAR_K,
                              "imagenet_fan_in": IMAGENET_K, "imagenet_image_size": size or 224,
                              "count": "distinct storages saved by autograd in one training-mode forward pass "
                                       "(saved_tensors_hooks, deduplicated by storage data_ptr), fp32 NCHW; "
                                       "parameters counted apart",
                              "batch_80gb_estimate": "floor((80e9 - 3 x parameter bytes) / activation bytes per "
                                                     "image): weights + gradients + momentum in fp32; an estimate"},
                      results=results, goals=goals,
                      notes=["activation_bytes_per_image excludes parameters (kept whatever the batch); "
                             "issue_measure_bytes_per_image is the baseline measure (parameters included, divided by "
                             "the batch), kept to compare with the baseline numbers",
                             "plain path: model.save_memory = False with grouped convolutions (the autograd graph "
                             "before the memory-saving path); saving path: the default training path",
                             "the count is exact and the same on every device; only cuda_step_peak_bytes is "
                             "device-specific"],
                      extra={"memory": "autograd saved tensors (exact)" + (", cuda max_memory_allocated" if ctx.cuda else "")})
    table = [{"model": r["name"], "batch": r["batch"], "act": _mib(r["activation_bytes_per_image"]),
              "vs": f"{r['vs_full']:.2f}", "issue": _mib(r["issue_measure_bytes_per_image"]),
              "b80": f"{r['batch_80gb_estimate']:,}", "flops": f"{r['forward_flops_per_image'] / 1e9:.2f}",
              "peak": _mib(r.get("cuda_step_peak_bytes") and r["cuda_step_peak_bytes"] / r["batch"])}
             for r in results]
    cols = [("model", "model"), ("batch", "batch"), ("act", "saved MiB/img"), ("vs", "vs full"),
            ("issue", "issue measure MiB/img"), ("b80", "80 GB batch (est.)"), ("flops", "fwd GFLOP/img")]
    if ctx.cuda:
        cols.append(("peak", "CUDA step peak MiB/img"))
    path = finish(ctx, rec, table, cols)
    _write_markdown(ctx, rec, path.with_suffix(".md"))
    return path


def _write_markdown(ctx: Context, rec: dict, path: Path) -> None:
    lines = [f"# Memory kept for the backward pass ({rec['device_name']}, torch {rec['torch_version']}"
             f"{', quick' if rec['quick'] else ''})", "",
             "Saved activation bytes per training image (autograd's saved tensors, distinct storages, fp32, "
             "parameters excluded); the 80 GB batch is floor((80e9 - 3 x parameter bytes) / bytes per image), "
             "an estimate.", "",
             "| model | path | batch | saved MiB / image | vs full | baseline measure MiB / image | "
             "80 GB batch (est.) | fwd GFLOP / image |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rec["results"]:
        lines.append(f"| {r['label']} "
                     f"| {r['path'] or '-'} | {r['batch']} | {_mib(r['activation_bytes_per_image'])} | {r['vs_full']:.2f} "
                     f"| {_mib(r['issue_measure_bytes_per_image'])} | {r['batch_80gb_estimate']:,} "
                     f"| {r['forward_flops_per_image'] / 1e9:.2f} |")
    lines += ["", "| goal | target | measured | verdict |", "|---|---|---:|---|"]
    for g in rec["goals"]:
        verdict = {True: "met", False: "NOT met", None: f"undecided ({g.get('why_null', '')})"}[g["met"]]
        lines.append(f"| {g['description']} | {g['target']} | {fmt_num(g['value'])} | {verdict} |")
    path.write_text("\n".join(lines) + "\n")
